//! `upstream.login = "certificate"` (issue 18, acceptance 3): minted roles
//! have no password or verifier in `pg_authid`, sessions log in with a
//! client certificate Ephemera issued for that one login, and that
//! certificate expires with the login window. Runs against the harness's
//! second cluster, configured for `cert` auth ([`common::pg::cert_cluster`]).
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::pg::cert_cluster;
use common::proxy::{admin_client, start_proxy_with_extra_config, ProxyFiles, ProxyOptions};
use ephemera::admin::client::AdminClientError;
use time::OffsetDateTime;

/// This module's own identity (no revoke-by-identity test uses it).
const CERT_ID: &str = "spiffe://example.org/ns/test/sa/certlogin";

fn policy(templates: &[&str]) -> String {
    let list: Vec<String> = templates.iter().map(|t| format!("\"{t}\"")).collect();
    format!(
        "[[policy]]\nspiffe_id = \"{CERT_ID}\"\ntemplates = [{}]\n",
        list.join(", ")
    )
}

/// Roles with `prefix` on the certificate cluster.
async fn cert_roles(prefix: &str) -> Vec<String> {
    let client = cert_cluster().superuser("postgres").await;
    client
        .query(
            "SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, $1) ORDER BY 1",
            &[&prefix],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// The audit log's `login` event for `role`, polled until written.
async fn login_event(files: &ProxyFiles, role: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = files
            .audit_events()
            .into_iter()
            .find(|e| e["event"] == "login" && e["role"] == role);
        if let Some(event) = found {
            return event;
        }
        assert!(Instant::now() < deadline, "no login event for {role}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn check_config_connect(config: &Path) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ephemera"))
        .arg("check-config")
        .arg(config)
        .arg("--connect")
        .output()
        .expect("check-config runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_logins_leave_no_verifier_and_their_certificate_expires_with_the_window() {
    let template = "certlogin";
    let mut options = ProxyOptions::templates(&[]);
    options.cert_login = true;
    options.admin_listen = Some("127.0.0.1:0".into());
    let extra = format!(
        "[templates.{template}]\ndatabase = \"billing\"\nmember_of = [\"billing_rw\"]\n\n{}",
        policy(&[template])
    );
    let proxy = start_proxy_with_extra_config(options, &extra).await;
    let svid = proxy.svid(CERT_ID);

    let before_login = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let client = proxy
        .connect(Some(&svid), template, "billing")
        .await
        .expect("a session logs in with a certificate");
    let row = client
        .query_one(
            "SELECT current_user::text, (SELECT count(*) FROM invoices),
                    s.ssl, s.client_dn, s.client_serial::text
             FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("the session runs a query");
    let role: String = row.get(0);
    assert!(role.starts_with("eph_certlogin_"), "{role}");
    assert_eq!(row.get::<_, i64>(1), 2, "it sees what its group may");
    assert!(row.get::<_, bool>(2), "the upstream login used TLS");
    let dn: String = row.get(3);
    assert_eq!(dn, format!("/CN={role}"), "the certificate names the role");
    let serial: String = row.get(4);

    // No password, no verifier: nothing in pg_authid to steal.
    let superuser = cert_cluster().superuser("postgres").await;
    let no_password: bool = superuser
        .query_one(
            "SELECT rolpassword IS NULL FROM pg_authid WHERE rolname = $1",
            &[&role],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        no_password,
        "the role has no rolpassword while its session is up"
    );

    // The certificate the server saw is the one the audit log records, and
    // it is dead a minute after the login at the latest.
    let event = login_event(&proxy.files, &role).await;
    assert_eq!(event["client_cert_serial"], serial.as_str(), "{event}");
    let not_after = OffsetDateTime::parse(
        event["client_cert_not_after"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let after_login = OffsetDateTime::now_utc();
    // The certificate is made for the login, just before it: it ends at
    // most the login window (60 s) after the login event. (Measured against
    // the event, not the test's clock before connecting: on a loaded CI
    // machine the connect itself once took a minute.)
    let logged_in = OffsetDateTime::parse(
        event["time"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(logged_in >= before_login, "{event}");
    assert!(
        not_after <= logged_in + time::Duration::seconds(60),
        "not_after {not_after} is at most the login + 60 s ({logged_in})"
    );
    assert!(
        not_after > after_login - time::Duration::seconds(1),
        "{not_after}"
    );
    let text = std::fs::read_to_string(proxy.files.dir.path().join("audit.jsonl")).unwrap();
    assert!(!text.contains("PRIVATE KEY"), "no key in the audit log");

    // Standalone credentials would need a password: refused, nothing made.
    let addr = proxy.admin_addr.unwrap();
    let job = admin_client(&proxy.files, addr, &svid);
    match job.creds(template).await {
        Err(AdminClientError::Api { message, .. }) => assert!(
            message.contains("upstream.login = \"certificate\""),
            "{message}"
        ),
        other => panic!("standalone creds are refused, got {other:?}"),
    }

    drop(client);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cert_roles("eph_certlogin_").await.is_empty() {
        assert!(Instant::now() < deadline, "the roles are dropped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // check-config --connect: this upstream takes the certificate.
    let config = proxy.files.config_path.clone();
    let (ok, text) = tokio::task::spawn_blocking(move || check_config_connect(&config))
        .await
        .unwrap();
    assert!(ok, "check-config --connect passes: {text}");
    assert!(
        cert_roles("eph_preflight_").await.is_empty(),
        "the probe role is dropped"
    );

    // A login CA that is not the server's ssl_ca_file: refused, and said so.
    let stranger = common::pki::TestCa::new("not the ssl_ca_file");
    let dir = proxy.files.dir.path();
    std::fs::write(dir.join("login-ca.pem"), stranger.cert_pem()).unwrap();
    std::fs::write(dir.join("login-ca-key.pem"), stranger.key_pem()).unwrap();
    let config = proxy.files.config_path.clone();
    let (ok, text) = tokio::task::spawn_blocking(move || check_config_connect(&config))
        .await
        .unwrap();
    eprintln!("check-config --connect with a CA the server does not trust:\n{text}");
    assert!(!ok, "{text}");
    assert!(
        text.contains("upstream.login:") && text.contains("ssl_ca_file must be the login CA"),
        "{text}"
    );
    assert!(
        cert_roles("eph_preflight_").await.is_empty(),
        "the probe role is dropped"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_reports_the_pg_hba_line_a_scram_only_upstream_lacks() {
    // The shared cluster: SCRAM for everyone, no ssl_ca_file.
    let mut options = ProxyOptions::templates(&["certlogin_refused"]);
    options.upstream_port = None;
    let files = ProxyFiles::write(&options, "127.0.0.1:0").await;
    let ca = common::pki::TestCa::new("a login CA nobody trusts");
    std::fs::write(files.dir.path().join("login-ca.pem"), ca.cert_pem()).unwrap();
    let key = files.dir.path().join("login-ca-key.pem");
    std::fs::write(&key, ca.key_pem()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = std::fs::read_to_string(&files.config_path)
        .unwrap()
        .replace(
            "pool_size = 2",
            "login = \"certificate\"\nlogin_ca_cert = \"login-ca.pem\"\n\
         login_ca_key = \"login-ca-key.pem\"\npool_size = 2",
        );
    std::fs::write(&files.config_path, config).unwrap();
    let path = files.config_path.clone();
    let (ok, text) = tokio::task::spawn_blocking(move || check_config_connect(&path))
        .await
        .unwrap();
    eprintln!("check-config --connect against a SCRAM-only upstream:\n{text}");
    assert!(!ok, "a SCRAM-only upstream fails the check: {text}");
    assert!(
        text.contains("upstream.login:")
            && text.contains("asked for a password instead of taking the certificate")
            && text.contains("hostssl billing all")
            && text.contains("cert clientcert=verify-full")
            && text.contains("ssl_ca_file"),
        "{text}"
    );
    assert!(
        common::proxy::roles_with_prefix("eph_preflight_")
            .await
            .is_empty(),
        "the probe role is dropped"
    );

    // A key that is not the CA's: refused before anything connects.
    let other = common::pki::TestCa::new("another CA");
    std::fs::write(&key, other.key_pem()).unwrap();
    let path = files.config_path.clone();
    let (ok, text) = tokio::task::spawn_blocking(move || check_config_connect(&path))
        .await
        .unwrap();
    assert!(!ok, "{text}");
    assert!(
        text.contains("upstream.login_ca_key:") && text.contains("does not match"),
        "{text}"
    );
}

/// `check-config` without `--connect` (nothing dialled).
fn check_config(config: &Path) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ephemera"))
        .arg("check-config")
        .arg(config)
        .output()
        .expect("check-config runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_login_ca_is_validated_with_its_key_paths() {
    let options = ProxyOptions::templates(&["certlogin_keys"]);
    let files = ProxyFiles::write(&options, "127.0.0.1:0").await;
    let dir = files.dir.path();
    let ca = common::pki::TestCa::new("certlogin validation CA");
    std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(dir.join("ca-key.pem"), ca.key_pem()).unwrap();
    let leaf = ca.svid(CERT_ID);
    let (leaf_cert, leaf_key) = files.write_cert(&leaf);
    let original = std::fs::read_to_string(&files.config_path).unwrap();
    let with = |lines: &str| {
        let text = original.replace("pool_size = 2", &format!("{lines}\npool_size = 2"));
        std::fs::write(&files.config_path, text).unwrap();
        check_config(&files.config_path)
    };
    let cases: &[(&str, String, &[&str])] = &[
        (
            "both files missing",
            "login = \"certificate\"".into(),
            &["upstream.login_ca_cert:", "upstream.login_ca_key:"],
        ),
        (
            "unreadable certificate",
            "login = \"certificate\"\nlogin_ca_cert = \"nope.pem\"\nlogin_ca_key = \"ca-key.pem\""
                .into(),
            &["upstream.login_ca_cert: cannot read"],
        ),
        (
            "a leaf, not a CA",
            format!(
                "login = \"certificate\"\nlogin_ca_cert = \"{}\"\nlogin_ca_key = \"{}\"",
                leaf_cert.display(),
                leaf_key.display()
            ),
            &["upstream.login_ca_cert: is not a CA certificate"],
        ),
        (
            "a key that is not a key",
            "login = \"certificate\"\nlogin_ca_cert = \"ca.pem\"\nlogin_ca_key = \"ca.pem\"".into(),
            &["upstream.login_ca_key: is not a PEM private key"],
        ),
        (
            "an unknown login",
            "login = \"kerberos\"".into(),
            &["upstream.login: \"kerberos\" is not one of"],
        ),
        (
            "CA files with scram",
            "login_ca_cert = \"ca.pem\"".into(),
            &["upstream.login_ca_cert: is only used with"],
        ),
    ];
    for (name, lines, expected) in cases {
        let (ok, text) = with(lines);
        assert!(!ok, "{name}: refused: {text}");
        for needle in *expected {
            assert!(text.contains(needle), "{name}: {needle:?} in {text}");
        }
    }
    let (ok, text) =
        with("login = \"certificate\"\nlogin_ca_cert = \"ca.pem\"\nlogin_ca_key = \"ca-key.pem\"");
    assert!(ok, "a CA and its own key pass: {text}");
    assert!(
        text.contains("warning: upstream.login_ca_key:"),
        "a key readable by others is warned about: {text}"
    );
    assert!(!text.contains("PRIVATE KEY"), "{text}");
}
