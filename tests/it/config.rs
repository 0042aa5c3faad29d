//! The configuration schema: the annotated example parses, and broken
//! configurations are reported with the key path.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use std::path::Path;

use ephemera::config::{read_file_config, ConfigErrors, Settings};

/// Load `toml` as a config file (in a fresh directory); it must be refused.
pub(crate) fn refused(toml: &str) -> ConfigErrors {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, toml).expect("write");
    Settings::load(&config).expect_err("the configuration is refused")
}

#[test]
fn the_annotated_example_uses_the_real_schema() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
    let file = read_file_config(&path).unwrap_or_else(|p| panic!("{p}"));
    assert_eq!(file.listen.address, "127.0.0.1:5432");
    assert!(file.templates.contains_key("billing_rw"));
    assert_eq!(file.policy[0].templates, ["billing_rw"]);
}

#[test]
fn problems_are_reported_with_their_key_paths() {
    let errors = refused(
        r#"
[listen]
address = "not an address"
[tls]
cert = "missing.pem"
key = "missing-key.pem"
trust_bundle = "missing-ca.pem"
trust_domains = ["Example.org"]
[upstream]
host = "127.0.0.1"
port = 5432
admin_user = "ephemera_admin"
admin_password_file = "missing-password"
sslmode = "verify-ca"
[templates.Bad-Name]
database = "billing"
[[policy]]
spiffe_id = "spiffe://example.org/**/x"
templates = ["nope"]
"#,
    );
    let keys: Vec<&str> = errors.problems.iter().map(|p| p.key.as_str()).collect();
    for key in [
        "listen.address",
        "tls.trust_domains[0]",
        "tls.trust_bundle",
        "tls.cert",
        "tls.key",
        "upstream.sslmode",
        "upstream.admin_password_file",
        "templates.Bad-Name",
        "policy[0].spiffe_id",
        "policy[0].templates[0]",
    ] {
        assert!(keys.contains(&key), "{key} not reported: {errors}");
    }
}

#[test]
fn a_unix_socket_upstream_needs_sslmode_disable() {
    let errors = refused(
        r#"
[listen]
address = "127.0.0.1:5432"
[tls]
cert = "server.pem"
key = "server-key.pem"
trust_bundle = "ca.pem"
trust_domains = ["example.org"]
[upstream]
host = "/var/run/postgresql"
port = 5432
admin_user = "ephemera_admin"
admin_password_file = "password"
sslmode = "require"
"#,
    );
    let problem = errors
        .problems
        .iter()
        .find(|p| p.key == "upstream.sslmode")
        .unwrap_or_else(|| panic!("upstream.sslmode not reported: {errors}"));
    assert!(
        problem.to_string().contains("sslmode = \"disable\""),
        "{problem}"
    );
}

#[test]
fn unknown_keys_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[listen]\naddress = \"127.0.0.1:1\"\nhandshake_timeuot = \"1s\"\n",
    )
    .expect("write");
    let problem = read_file_config(&config).expect_err("typo refused");
    assert_eq!(problem.key, "listen.handshake_timeuot", "{problem}");
    assert!(problem.message.contains("unknown key"), "{problem}");
    assert!(
        problem.message.contains("handshake_timeout"),
        "lists the valid keys: {problem}"
    );
}

#[test]
fn a_federated_trust_domain_has_one_bundle_and_a_valid_name() {
    let errors = refused(
        r#"
[listen]
address = "127.0.0.1:5432"
[tls]
cert = "server.pem"
key = "server-key.pem"
trust_bundle = "ca.pem"
trust_domains = ["example.org"]
[tls.federation]
"example.org" = "again.pem"
"Not A Domain" = "partner.pem"
[upstream]
host = "127.0.0.1"
port = 5432
admin_user = "ephemera_admin"
admin_password_file = "password"
"#,
    );
    let find = |key: &str| {
        errors
            .problems
            .iter()
            .find(|p| p.key == key)
            .unwrap_or_else(|| panic!("{key} not reported: {errors}"))
            .to_string()
    };
    assert!(find("tls.federation.example.org").contains("also in tls.trust_domains"));
    assert!(find("tls.federation.Not A Domain").contains("not a trust domain name"));
}

#[test]
fn on_behalf_of_is_checked_with_its_key_paths() {
    let errors = refused(
        r#"
[listen]
address = "127.0.0.1:5432"
[tls]
cert = "missing.pem"
key = "missing-key.pem"
trust_bundle = "missing-ca.pem"
trust_domains = ["example.org"]
[upstream]
host = "127.0.0.1"
port = 5432
admin_user = "ephemera_admin"
admin_password_file = "missing-password"
[templates.finance_ro]
database = "finance"
[[policy]]
spiffe_id = "spiffe://example.org/agent/a"
on_behalf_of = { token_issuer = "nobody" }
templates = ["finance_ro"]
[[tokens.issuer]]
name = "corp"
issuer = "https://corp.example"
audience = "ephemera"
jwks_file = "missing-jwks.json"
[[policy]]
token_issuer = "corp"
claims = { sub = "x" }
on_behalf_of = { token_issuer = "corp", claims = { sub = "y" } }
templates = ["finance_ro"]
"#,
    );
    let keys: Vec<&str> = errors.problems.iter().map(|p| p.key.as_str()).collect();
    for key in [
        "policy[0].on_behalf_of.token_issuer",
        "policy[0].on_behalf_of.claims",
        "policy[1].on_behalf_of",
    ] {
        assert!(keys.contains(&key), "{key} not reported: {errors}");
    }
}
