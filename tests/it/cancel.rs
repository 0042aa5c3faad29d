//! Cancel requests: libpq's PQcancel (plaintext, no certificate, before
//! PostgreSQL 17) and over TLS; psql's Ctrl-C; a wrong key does nothing.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use std::time::{Duration, Instant};

use common::proxy::{
    psql, role_prefix, wait_until_no_roles, ProxyOptions, TestProxy, BILLING_ID, DATABASE,
};
use common::{cluster, make_tls_connect};

/// Wait until a `pg_sleep` runs as a role of `template`.
pub(crate) async fn wait_for_running_sleep(template: &str) {
    let admin = cluster().superuser("postgres").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let running: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE starts_with(usename, $1) AND query LIKE '%pg_sleep%' AND state = 'active'",
                &[&format!("eph_{template}_")],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if running > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "the sleep never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn cancel_over_tls(proxy: &TestProxy, template: &str) {
    let svid = proxy.svid(BILLING_ID);
    let client = proxy
        .connect(Some(&svid), template, DATABASE)
        .await
        .expect("connects");
    let token = client.cancel_token();
    let started = Instant::now();
    let sleeper = tokio::spawn(async move {
        let result = client.simple_query("SELECT pg_sleep(60)").await;
        (client, result)
    });
    wait_for_running_sleep(template).await;
    // tokio-postgres sends it over TLS, like libpq 17. (libpq before 17
    // sends it in plaintext: the psql test below covers that.)
    token
        .cancel_query(make_tls_connect(
            proxy.files.server_ca.cert_pem(),
            Some(&svid),
        ))
        .await
        .expect("the cancel request is sent over TLS");
    let (client, result) = tokio::time::timeout(Duration::from_secs(2), sleeper)
        .await
        .expect("the query ends within 2 s of the cancel")
        .expect("task");
    let error = result.expect_err("the sleep was cancelled");
    assert_eq!(error.code().map(|c| c.code()), Some("57014"), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    let one: String = client
        .simple_query("SELECT 'still usable'")
        .await
        .expect("the session is still usable")
        .into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("a row");
    assert_eq!(one, "still usable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_over_tls_ends_the_query_and_keeps_the_session() {
    let template = "c_token";
    let proxy = TestProxy::start(ProxyOptions::templates(&[template])).await;
    cancel_over_tls(&proxy, template).await;
    proxy.shutdown().await;
}

/// `upstream.host` naming the socket directory: sessions reach PostgreSQL
/// over the Unix socket (no client address on the backend), cancels still
/// find their backend, and roles are still dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_upstream_serves_sessions_and_cancels() {
    let template = "c_unix";
    let mut options = ProxyOptions::templates(&[template]);
    options.upstream_unix_socket = true;
    let proxy = TestProxy::start(options).await;
    let svid = proxy.svid(BILLING_ID);
    let client = proxy
        .connect(Some(&svid), template, DATABASE)
        .await
        .expect("connects");
    let over_unix: bool = client
        .query_one(
            "SELECT client_addr IS NULL AND client_port = -1 FROM pg_stat_activity WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("query")
        .get(0);
    assert!(over_unix, "the session's backend was reached over TCP");
    drop(client);
    cancel_over_tls(&proxy, template).await;
    assert!(
        wait_until_no_roles(&role_prefix(template), Duration::from_secs(5)).await,
        "roles are dropped over the Unix socket too"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_cancel_key_does_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let template = "c_wrong";
    let proxy = TestProxy::start(ProxyOptions::templates(&[template])).await;
    let client = proxy
        .connect(Some(&proxy.svid(BILLING_ID)), template, DATABASE)
        .await
        .expect("connects");
    let sleeper = tokio::spawn(async move {
        client
            .simple_query("SELECT pg_sleep(1.5)")
            .await
            .map(|_| ())
    });
    wait_for_running_sleep(template).await;
    for pid in [1, 2, i32::MAX] {
        let mut socket = tokio::net::TcpStream::connect(proxy.addr)
            .await
            .expect("connect");
        let packet =
            ephemera::session::protocol::encode_cancel(ephemera::session::protocol::CancelKey {
                pid,
                secret: 12345,
            });
        socket.write_all(&packet).await.expect("write");
        let mut rest = Vec::new();
        socket
            .read_to_end(&mut rest)
            .await
            .expect("the proxy closes");
        assert!(rest.is_empty(), "a cancel request gets no answer");
    }
    sleeper
        .await
        .expect("task")
        .expect("the query was not cancelled by wrong keys");
    proxy.shutdown().await;
}

/// psql 15's Ctrl-C sends the CancelRequest on a new plaintext connection
/// without a certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_ctrl_c_cancels_a_long_sleep_within_two_seconds() {
    let template = "c_psql";
    let proxy = TestProxy::start(ProxyOptions::templates(&[template])).await;
    let conninfo = proxy.conninfo(&proxy.svid(BILLING_ID), template, DATABASE);
    let mut child = tokio::process::Command::new(psql())
        .args([conninfo.as_str(), "-X", "-c", "select pg_sleep(60)"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("psql runs");
    wait_for_running_sleep(template).await;
    let pid = child.id().expect("psql is running") as i32;
    // Our own child, as a terminal's Ctrl-C would.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("signalling psql");
    let status = tokio::time::timeout(Duration::from_secs(2), child.wait())
        .await
        .expect("psql ends within 2 s of Ctrl-C")
        .expect("wait");
    let mut stderr = String::new();
    use tokio::io::AsyncReadExt;
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .await
        .expect("read stderr");
    assert!(!status.success());
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}"
    );
    proxy.shutdown().await;
}
