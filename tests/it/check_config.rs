//! `ephemera check-config`: the annotated example passes (given its files),
//! and broken configurations are each reported with their key path, exit 1.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use std::path::{Path, PathBuf};

use common::proxy::{free_port, upstream, ADMIN_USER};

/// A directory holding a copy of the example config.toml and the files it
/// names (certificates from the dev CA, an admin password file).
fn example_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
    let config = dir.path().join("config.toml");
    std::fs::copy(example, &config).expect("copy the example");
    ephemera::dev::pki::DevCerts::ensure(&dir.path().join("certs")).expect("certificates");
    std::fs::create_dir_all(dir.path().join("secrets")).expect("secrets dir");
    std::fs::write(
        dir.path().join("secrets/admin-password"),
        "not-a-real-password\n",
    )
    .expect("password");
    (dir, config)
}

fn check(config: &Path, extra: &[&str]) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ephemera"))
        .arg("check-config")
        .arg(config)
        .args(extra)
        .output()
        .expect("check-config runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() || output.status.code() == Some(1),
        "exit code 0 or 1: {text}"
    );
    (output.status.success(), text)
}

#[test]
fn the_example_passes_and_each_broken_variant_is_reported_with_its_key() {
    let (dir, config) = example_dir();
    let (ok, text) = check(&config, &[]);
    assert!(ok, "the example config passes: {text}");

    std::fs::write(dir.path().join("garbage-key.pem"), "not a key").expect("write");
    let example = std::fs::read_to_string(&config).expect("read");
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "unknown key",
            "pool_size = 4",
            "pool_size = 4\npool_sise = 4",
            "upstream.pool_sise",
        ),
        (
            "missing file",
            "cert = \"certs/server.pem\"",
            "cert = \"certs/nope.pem\"",
            "tls.cert",
        ),
        (
            "unreadable key",
            "key = \"certs/server-key.pem\"",
            "key = \"garbage-key.pem\"",
            "tls.key",
        ),
        (
            "policy names a missing template",
            "templates = [\"billing_rw\"]\n",
            "templates = [\"billing_ro\"]\n",
            "policy[0].templates[0]",
        ),
        (
            "bad policy pattern",
            "spiffe_id = \"spiffe://example.org/ns/prod/sa/billing\"",
            "spiffe_id = \"spiffe://example.org/**/billing\"",
            "policy[0].spiffe_id",
        ),
        (
            "duration that does not parse",
            "ttl = \"15m\"",
            "ttl = \"fifteen minutes\"",
            "templates.billing_rw.ttl",
        ),
        (
            "trust bundle without a CA",
            "trust_bundle = \"certs/ca.pem\"",
            "trust_bundle = \"certs/server.pem\"",
            "tls.trust_bundle",
        ),
        (
            "unknown sslmode",
            "sslmode = \"require\"",
            "sslmode = \"verify-ca\"",
            "upstream.sslmode",
        ),
        (
            "max_ttl below ttl",
            "max_ttl = \"1h\"",
            "max_ttl = \"1m\"",
            "templates.billing_rw.max_ttl",
        ),
        (
            "max_ttl past the 10-year maximum",
            "max_ttl = \"1h\"",
            "max_ttl = \"9000y\"",
            "templates.billing_rw.max_ttl",
        ),
        (
            "ttl past the 10-year maximum",
            "ttl = \"15m\"",
            "ttl = \"100000years\"",
            "templates.billing_rw.ttl",
        ),
        (
            "missing password file",
            "admin_password_file = \"secrets/admin-password\"",
            "admin_password_file = \"secrets/nope\"",
            "upstream.admin_password_file",
        ),
        (
            "bad listen address",
            "address = \"127.0.0.1:5432\"",
            "address = \"localhost\"",
            "listen.address",
        ),
        (
            "bad admin identity",
            "identities = [\"spiffe://example.org/ops/**\"]",
            "identities = [\"ops\"]",
            "admin.identities[0]",
        ),
    ];
    for (name, from, to, key) in cases {
        assert!(example.contains(from), "{name}: the example has {from:?}");
        let broken = dir.path().join("broken.toml");
        std::fs::write(&broken, example.replacen(from, to, 1)).expect("write");
        let (ok, text) = check(&broken, &[]);
        assert!(!ok, "{name}: accepted");
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(&format!("{key}:"))),
            "{name}: no line starts with {key}: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_checks_the_upstream() {
    let admin_password = upstream().await.admin_password.clone();
    let c = common::cluster();
    let (dir, config) = example_dir();
    let example = std::fs::read_to_string(&config).expect("read");
    let at_cluster = example
        .replace("port = 5433", &format!("port = {}", c.port()))
        .replace("sslmode = \"require\"", "sslmode = \"verify-full\"")
        .replace(
            "ca = \"\"",
            &format!("ca = \"{}\"", c.ca_pem_path().display()),
        );
    std::fs::write(dir.path().join("secrets/admin-password"), &admin_password).expect("password");
    std::fs::write(&config, &at_cluster).expect("write");
    let (ok, text) = tokio::task::spawn_blocking({
        let config = config.clone();
        move || check(&config, &["--connect"])
    })
    .await
    .expect("task");
    assert!(ok, "a correct setup passes --connect: {text}");

    // The same over the Unix socket (Ephemera on the database's host).
    let over_socket = example
        .replace(
            "host = \"127.0.0.1\"",
            &format!("host = \"{}\"", c.socket_dir().display()),
        )
        .replace("port = 5433", &format!("port = {}", c.port()))
        .replace("sslmode = \"require\"", "sslmode = \"disable\"");
    std::fs::write(&config, &over_socket).expect("write");
    let (ok, text) = tokio::task::spawn_blocking({
        let config = config.clone();
        move || check(&config, &["--connect"])
    })
    .await
    .expect("task");
    assert!(ok, "a Unix-socket upstream passes --connect: {text}");
    assert!(!text.contains("templates.billing_rw.owner"), "{text}");

    // An owner that may do more than the groups: a warning (the owner is
    // the ceiling of every session), not a failure.
    c.exec_sql(
        "billing",
        "CREATE TABLE cc_owner_only (x int); ALTER TABLE cc_owner_only OWNER TO billing_owner;",
    )
    .await;
    let (ok, text) = tokio::task::spawn_blocking({
        let config = config.clone();
        move || check(&config, &["--connect"])
    })
    .await
    .expect("task");
    assert!(ok, "{text}");
    assert!(
        text.contains("warning: templates.billing_rw.owner:")
            && text.contains("cc_owner_only: DELETE"),
        "{text}"
    );
    c.exec_sql("billing", "DROP TABLE cc_owner_only").await;

    // No CREATEROLE, and a group that does not exist.
    let verifier = postgres_protocol::password::scram_sha_256(b"plain-user-pw");
    c.exec_sql(
        "postgres",
        &format!("CREATE ROLE cc_plain LOGIN PASSWORD '{verifier}'"),
    )
    .await;
    std::fs::write(dir.path().join("secrets/plain"), "plain-user-pw").expect("write");
    let weak = at_cluster
        .replace(
            &format!("admin_user = \"{ADMIN_USER}\""),
            "admin_user = \"cc_plain\"",
        )
        .replace("secrets/admin-password", "secrets/plain")
        .replace(
            "member_of = [\"billing_rw\"]",
            "member_of = [\"no_such_group\"]",
        );
    std::fs::write(&config, &weak).expect("write");
    let (ok, text) = tokio::task::spawn_blocking({
        let config = config.clone();
        move || check(&config, &["--connect"])
    })
    .await
    .expect("task");
    assert!(!ok);
    assert!(
        text.contains("upstream.admin_user: \"cc_plain\" lacks CREATEROLE"),
        "{text}"
    );
    assert!(
        text.contains("templates.billing_rw.member_of[0]:"),
        "{text}"
    );
    assert!(text.contains("templates.billing_rw.owner:"), "{text}");

    // Nothing listening.
    let closed = at_cluster.replace(
        &format!("port = {}", c.port()),
        &format!("port = {}", free_port()),
    );
    std::fs::write(&config, closed).expect("write");
    let (ok, text) = tokio::task::spawn_blocking(move || check(&config, &["--connect"]))
        .await
        .expect("task");
    assert!(!ok);
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("upstream: cannot log in")),
        "{text}"
    );
}

/// A duration that would overflow lease times (it passed, and then every
/// session panicked) is refused with its key and the maximum.
#[test]
fn durations_past_ten_years_are_refused_naming_the_key() {
    let (dir, config) = example_dir();
    let example = std::fs::read_to_string(&config).expect("read");
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        example.replacen("max_ttl = \"1h\"", "max_ttl = \"9000y\"", 1),
    )
    .expect("write");
    let (ok, text) = check(&broken, &[]);
    assert!(!ok, "9000y accepted: {text}");
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("templates.billing_rw.max_ttl:"))
        .unwrap_or_else(|| panic!("no line names templates.billing_rw.max_ttl: {text}"));
    assert!(line.contains("at most 10 years"), "{line}");

    // The maximum itself is allowed.
    std::fs::write(
        &broken,
        example.replacen("max_ttl = \"1h\"", "max_ttl = \"10y\"", 1),
    )
    .expect("write");
    let (ok, text) = check(&broken, &[]);
    assert!(ok, "10y is the documented maximum: {text}");
}

/// A secret file that group or others can read passes, with a warning per
/// file naming its key and path and saying `chmod 600` (as libpq refuses
/// such a key); with mode 0600 there is no warning.
#[test]
fn group_or_world_readable_secret_files_are_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, config) = example_dir();
    let key = dir.path().join("certs/server-key.pem");
    let password = dir.path().join("secrets/admin-password");
    let chmod = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    chmod(&key, 0o640);
    chmod(&password, 0o604);
    let (ok, text) = check(&config, &[]);
    assert!(ok, "a warning is not a failure: {text}");
    for (name, path, mode) in [
        ("tls.key", &key, "0640"),
        ("upstream.admin_password_file", &password, "0604"),
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("warning: {name}:")))
            .unwrap_or_else(|| panic!("no warning for {name}: {text}"));
        assert!(
            line.contains(&path.display().to_string()),
            "names the file: {line}"
        );
        assert!(line.contains(mode), "shows the mode: {line}");
        assert!(
            line.contains(&format!("chmod 600 {}", path.display())),
            "says what to do: {line}"
        );
    }

    chmod(&key, 0o600);
    chmod(&password, 0o400);
    let (ok, text) = check(&config, &[]);
    assert!(ok, "{text}");
    assert!(
        !text.contains("warning"),
        "no warning for 0600/0400: {text}"
    );
}
