//! Proves the shared test harness in `tests/common` works: the PostgreSQL cluster
//! starts, speaks TLS, enforces passwords and logs statements; the PKI makes SVIDs.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use std::net::{IpAddr, Ipv4Addr};

use common::{cluster, TestCa};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

#[tokio::test]
async fn cluster_runs_postgres_15_over_tls_with_scram() {
    let pg = cluster();
    let client = pg.superuser("postgres").await;

    let version: String = client
        .query_one("select version()", &[])
        .await
        .expect("select version() works")
        .get(0);
    assert!(
        version.starts_with("PostgreSQL 15"),
        "unexpected version: {version}"
    );

    // The connection really is TLS (pg_stat_ssl is the server's point of view).
    let ssl: bool = client
        .query_one(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl is readable")
        .get(0);
    assert!(ssl, "the superuser connection is not encrypted");

    // A wrong password is refused: authentication is SCRAM, not trust.
    let error = pg
        .connect(common::SUPERUSER, "not-the-password", "postgres")
        .await
        .expect_err("a wrong password must be refused");
    let code = error.code().expect("the server sent an error code");
    assert_eq!(
        code,
        &tokio_postgres::error::SqlState::INVALID_PASSWORD,
        "{error}"
    );
}

#[tokio::test]
async fn tls_is_used_and_statements_are_logged() {
    let pg = cluster();
    let client = pg.superuser("postgres").await;

    // sslinfo's ssl_is_used() asks the server whether this session is encrypted.
    pg.exec_sql("postgres", "create extension if not exists sslinfo")
        .await;
    let used: bool = client
        .query_one("select ssl_is_used()", &[])
        .await
        .expect("ssl_is_used() works")
        .get(0);
    assert!(used, "the superuser connection is not encrypted");

    let before = pg.log_len();
    let marker = format!("select 'harness-smoke-{}' as marker", std::process::id());
    client
        .batch_execute(&marker)
        .await
        .expect("marker statement runs");
    // log_statement is written before the statement executes, so it is already there.
    let log = pg.server_log_since(before);
    assert!(
        log.contains(&marker),
        "statement missing from {}:\n{log}",
        pg.log_path().display()
    );

    // The free-function shorthand and the URL helper work too.
    common::exec_sql("postgres", "create table if not exists smoke_t (id int)").await;

    // libpq (psql) accepts the URL helper: verify-full against the harness CA.
    let output = std::process::Command::new(pg.bin_dir().join("psql"))
        .arg(pg.superuser_url("postgres"))
        .args([
            "-XAtc",
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
        ])
        .output()
        .expect("psql runs");
    assert!(
        output.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "t");
}

/// `cluster()` may be called from many threads at once, inside a multi-threaded runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_is_shared_across_threads() {
    let tasks: Vec<_> = (0..8)
        .map(|_| tokio::spawn(async { cluster().port() }))
        .collect();
    for task in tasks {
        assert_eq!(task.await.expect("task did not panic"), cluster().port());
    }
}

#[test]
fn pki_makes_spiffe_svids() {
    let ca = TestCa::new("smoke");
    let id = "spiffe://example.org/ns/prod/sa/api";
    let svid = ca.svid(id);

    let der = svid.cert_der();
    let (_, cert) = X509Certificate::from_der(&der).expect("the SVID parses as X.509");
    let san = cert
        .subject_alternative_name()
        .expect("SAN extension is well formed")
        .expect("SAN extension is present");
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    assert_eq!(uris, [id]);
    let basic = cert
        .basic_constraints()
        .expect("basic constraints well formed")
        .expect("basic constraints present");
    assert!(!basic.value.ca, "an SVID must not be a CA");
    assert!(cert.validity().is_valid(), "the SVID is valid now");

    // The CA really signed it: verify the chain with webpki for client auth.
    let ca_der = ca.cert_der();
    let anchor = webpki::anchor_from_trusted_cert(&ca_der).expect("CA is a valid trust anchor");
    let end_entity = webpki::EndEntityCert::try_from(&der).expect("webpki parses the SVID");
    end_entity
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            rustls::pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .expect("the SVID chains to its CA");

    // The key is PKCS#8 and never shown by Debug.
    assert!(svid.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(!format!("{svid:?}").contains("PRIVATE"));

    // Bad variants are produced as described.
    let expired = ca.svid_expired(id);
    let expired_der = expired.cert_der();
    let (_, cert) = X509Certificate::from_der(&expired_der).expect("parses");
    assert!(!cert.validity().is_valid());
    let server = ca.server_cert(&["localhost"], &[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    let dir = tempfile::tempdir().expect("temp dir");
    let (_, key_path) = server.write(dir.path(), "server");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_path)
            .expect("key file exists")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}
