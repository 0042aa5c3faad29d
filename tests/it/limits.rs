//! Limits that keep the proxy serving: slow clients, too many connections,
//! and identities that create sessions too fast. Each test checks that the
//! good client still gets in.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use std::time::{Duration, Instant};

use common::proxy::{
    admin_client, role_prefix, wait_until_no_roles, ProxyOptions, TestProxy, ADMIN_ID, BILLING_ID,
    DATABASE, STRANGER_ID,
};
use ephemera::admin::client::AdminClientError;
use tokio::io::AsyncWriteExt;

const OTHER_ID: &str = "spiffe://example.org/ns/prod/sa/other";

async fn refused_code(proxy: &TestProxy, id: &str, template: &str) -> (String, String) {
    match proxy
        .connect(Some(&proxy.svid(id)), template, DATABASE)
        .await
    {
        Ok(_) => panic!("accepted"),
        Err(e) => {
            let db = e
                .as_db_error()
                .unwrap_or_else(|| panic!("an ErrorResponse, got {e:?}"));
            (db.code().code().to_owned(), db.message().to_owned())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_does_not_keep_a_good_client_out() {
    let template = "lim_slow";
    let proxy = TestProxy::start(ProxyOptions::templates(&[template])).await;
    // 1 000 connections that dribble a partial startup packet.
    let mut slow = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let mut socket = tokio::net::TcpStream::connect(proxy.addr)
            .await
            .expect("connect");
        socket.write_all(&[0]).await.expect("one byte");
        slow.push(socket);
    }
    let dribble = tokio::spawn(async move {
        for round in 0..3u8 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            for socket in &mut slow {
                let _ = socket.write_all(&[round]).await;
            }
        }
        slow
    });
    let started = Instant::now();
    let client = proxy
        .connect(Some(&proxy.svid(BILLING_ID)), template, DATABASE)
        .await
        .expect("the good client gets in");
    let took = started.elapsed();
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("query")
        .get(0);
    assert!(user.starts_with(&role_prefix(template)));
    assert!(
        took < Duration::from_secs(1),
        "connected in {took:?} beside 1 000 slow clients"
    );
    drop(dribble.await.expect("dribbler"));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_clients_get_53300_until_a_slot_frees() {
    let template = "lim_conn";
    let mut options = ProxyOptions::templates(&[template]);
    options.listen_extra = "max_connections = 2".into();
    let proxy = TestProxy::start(options).await;
    let svid = proxy.svid(BILLING_ID);
    let first = proxy
        .connect(Some(&svid), template, DATABASE)
        .await
        .expect("1st");
    let _second = proxy
        .connect(Some(&svid), template, DATABASE)
        .await
        .expect("2nd");
    let (code, message) = refused_code(&proxy, BILLING_ID, template).await;
    assert_eq!(code, "53300", "{message}");
    assert!(message.contains("at most 2 sessions"), "{message}");

    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match proxy.connect(Some(&svid), template, DATABASE).await {
            Ok(client) => {
                client
                    .simple_query("SELECT 1")
                    .await
                    .expect("the freed slot serves");
                break;
            }
            Err(_) => {
                assert!(Instant::now() < deadline, "the slot was never freed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_past_its_rate_limit_gets_53300_and_others_do_not() {
    let template = "lim_rate";
    let mut options = ProxyOptions::templates(&[template]);
    options.lease_extra = "issue_rate_per_identity = 0.5\nissue_burst_per_identity = 3".into();
    let proxy = TestProxy::start(options).await;
    // Let a second identity use the template too.
    let config = std::fs::read_to_string(&proxy.files.config_path).expect("config");
    std::fs::write(
        &proxy.files.config_path,
        format!("{config}\n[[policy]]\nspiffe_id = \"{OTHER_ID}\"\ntemplates = [\"{template}\"]\n"),
    )
    .expect("config");
    proxy.reloader.reload().expect("reload");

    let svid = proxy.svid(BILLING_ID);
    for _ in 0..3 {
        let client = proxy
            .connect(Some(&svid), template, DATABASE)
            .await
            .expect("within the burst");
        drop(client);
    }
    let (code, message) = refused_code(&proxy, BILLING_ID, template).await;
    assert_eq!(code, "53300", "{message}");
    assert!(
        message.contains(BILLING_ID) && message.contains("0.5 per second"),
        "{message}"
    );
    let other = proxy
        .connect(Some(&proxy.svid(OTHER_ID)), template, DATABASE)
        .await
        .expect("another identity is not limited by the first one's bucket");
    other.simple_query("SELECT 1").await.expect("query");
    let audit = proxy.files.audit_events();
    assert!(audit
        .iter()
        .any(|e| e["event"] == "denied" && e["identity"] == BILLING_ID));
    proxy.shutdown().await;
}

/// `/v1/creds` draws from the same per-identity bucket as sessions, so the
/// admin API is no way around the limit on role creation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_credentials_count_against_the_issue_limit() {
    let template = "lim_creds";
    let mut options = ProxyOptions::templates(&[template]);
    options.admin_listen = Some("127.0.0.1:0".into());
    options.lease_extra = "issue_rate_per_identity = 0.01\nissue_burst_per_identity = 2".into();
    let proxy = TestProxy::start(options).await;
    let job = admin_client(
        &proxy.files,
        proxy.admin_addr.expect("admin API"),
        &proxy.svid(BILLING_ID),
    );
    let first = job.creds(template).await.expect("within the burst");
    let session = proxy
        .connect(Some(&proxy.svid(BILLING_ID)), template, DATABASE)
        .await
        .expect("within the burst");
    match job.creds(template).await {
        Err(AdminClientError::Api {
            status: 429,
            message,
        }) => {
            assert!(
                message.contains(BILLING_ID) && message.contains("issue_rate_per_identity"),
                "{message}"
            );
        }
        other => panic!("the third role is refused with 429, got {other:?}"),
    }
    let (code, _) = refused_code(&proxy, BILLING_ID, template).await;
    assert_eq!(code, "53300");
    drop(session);
    job.revoke_lease(first.lease_id)
        .await
        .expect("the holder gives its lease back");
    assert!(wait_until_no_roles(&role_prefix(template), Duration::from_secs(5)).await);
    proxy.shutdown().await;
}

/// An identity that is not an admin may renew or revoke only its own
/// standalone lease, and each attempt may read the ledger: past a burst it
/// gets 429 instead of more lookups. Admins are not limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_lookups_by_non_admins_are_rate_limited() {
    let template = "lim_lookup";
    let mut options = ProxyOptions::templates(&[template]);
    options.admin_listen = Some("127.0.0.1:0".into());
    let proxy = TestProxy::start(options).await;
    let addr = proxy.admin_addr.expect("admin API");
    let stranger = admin_client(&proxy.files, addr, &proxy.svid(STRANGER_ID));
    // 40 at once: the burst (20) answers 403, and the bucket cannot refill
    // 20 tokens (4 s at 5/s) while they are in flight.
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let stranger = stranger.clone();
        calls.spawn(async move { stranger.revoke_lease(uuid::Uuid::new_v4()).await });
    }
    let mut statuses = Vec::new();
    while let Some(result) = calls.join_next().await {
        match result.expect("task") {
            Err(AdminClientError::Api { status, .. }) => statuses.push(status),
            other => panic!("a stranger never revokes anything, got {other:?}"),
        }
    }
    let refused = statuses.iter().filter(|&&s| s == 403).count();
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!(refused + limited, 40, "{statuses:?}");
    eprintln!("lookups: {refused} refused (403), {limited} limited (429)");
    assert!(refused >= 20 && limited >= 1, "{statuses:?}");
    let admin = admin_client(&proxy.files, addr, &proxy.svid(ADMIN_ID));
    for _ in 0..30 {
        match admin.revoke_lease(uuid::Uuid::new_v4()).await {
            Err(AdminClientError::Api { status: 404, .. }) => {}
            other => panic!("an admin gets 404 for an unknown lease, got {other:?}"),
        }
    }
    proxy.shutdown().await;
}
