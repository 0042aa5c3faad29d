//! The admin CLI against a running proxy: `ephemera revoke`, `leases`, `creds`.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use std::time::{Duration, Instant};

use common::proxy::{
    psql, role_prefix, roles_with_prefix, wait_until_no_roles, ProxyOptions, TestProxy, ADMIN_ID,
    BILLING_ID, DATABASE,
};
use tokio::io::AsyncReadExt;

/// `ephemera <args…>` as `identity`, against the proxy's admin API.
async fn ephemera_cli(proxy: &TestProxy, identity: &str, args: &[&str]) -> std::process::Output {
    let (cert, key) = proxy.files.write_cert(&proxy.svid(identity));
    tokio::process::Command::new(env!("CARGO_BIN_EXE_ephemera"))
        .args(args)
        .env(
            "EPHEMERA_ADMIN",
            format!("https://{}", proxy.admin_addr.expect("admin")),
        )
        .env("EPHEMERA_CERT", cert)
        .env("EPHEMERA_KEY", key)
        .env("EPHEMERA_CA", &proxy.files.server_ca_path)
        .output()
        .await
        .expect("the CLI runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_identity_ends_a_live_psql_session_within_a_second() {
    let template = "cli_billing";
    let mut options = ProxyOptions::templates(&[template]);
    options.admin_listen = Some("127.0.0.1:0".into());
    let proxy = TestProxy::start(options).await;
    let conninfo = proxy.conninfo(&proxy.svid(BILLING_ID), template, DATABASE);
    let mut session = tokio::process::Command::new(psql())
        .args([conninfo.as_str(), "-X", "-c", "select pg_sleep(30)"])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("psql");
    let deadline = Instant::now() + Duration::from_secs(10);
    while roles_with_prefix(&role_prefix(template)).await.is_empty() {
        assert!(Instant::now() < deadline, "the psql session never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // `ephemera leases list` shows it.
    let listed = ephemera_cli(
        &proxy,
        ADMIN_ID,
        &["leases", "list", "--template", template],
    )
    .await;
    let table = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(
        table.contains(BILLING_ID) && table.contains("active"),
        "{table}"
    );

    let revoked = ephemera_cli(&proxy, ADMIN_ID, &["revoke", "--identity", BILLING_ID]).await;
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    let returned = Instant::now();
    assert!(String::from_utf8_lossy(&revoked.stdout).contains("revoked 1 lease"));
    assert!(
        wait_until_no_roles(&role_prefix(template), Duration::from_secs(1)).await,
        "the role is gone within 1 s of the command returning"
    );
    assert!(returned.elapsed() <= Duration::from_secs(1));

    let status = tokio::time::timeout(Duration::from_secs(5), session.wait())
        .await
        .expect("psql ends")
        .expect("wait");
    let mut stderr = String::new();
    session
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .await
        .expect("stderr");
    assert!(!status.success());
    assert!(stderr.contains("FATAL"), "the client sees FATAL: {stderr}");

    // A non-admin is refused, with a message that says why.
    let refused = ephemera_cli(&proxy, BILLING_ID, &["leases", "list"]).await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("403"));

    // `ephemera creds` as the workload prints credentials; --json parses.
    let creds = ephemera_cli(&proxy, BILLING_ID, &["creds", template, "--json"]).await;
    assert!(
        creds.status.success(),
        "{}",
        String::from_utf8_lossy(&creds.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&creds.stdout).expect("JSON");
    assert!(json["username"]
        .as_str()
        .unwrap_or_default()
        .starts_with(&role_prefix(template)));

    // The holder gives its standalone lease back (standalone leases outlive
    // a proxy restart, so nothing else would end it before it expires).
    let id = json["lease_id"].as_str().expect("lease_id");
    let revoked = ephemera_cli(&proxy, BILLING_ID, &["leases", "revoke", id]).await;
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    assert!(String::from_utf8_lossy(&revoked.stdout).contains("revoked"));
    proxy.shutdown().await;
    assert!(roles_with_prefix(&role_prefix(template)).await.is_empty());
}
