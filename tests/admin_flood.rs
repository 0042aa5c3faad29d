//! Issue 12, finding 5: ~1 000 idle connections to the admin API, with the
//! usual soft limit of 1 024 open files, made both ports stop answering.
//! Now the soft limit is raised to the hard limit at start, the admin API
//! caps its connections (shedding the oldest) and times idle ones out, and
//! a good client gets through on both ports while 2 000 sit idle.
//! (Its own binary: it changes the process's file limit.)
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

mod common;

use nix::sys::resource::{getrlimit, setrlimit, Resource};

use std::time::Duration;

use common::proxy::{admin_client, ProxyOptions, TestProxy, ADMIN_ID, BILLING_ID, DATABASE};
use tokio::net::TcpStream;

fn soft_file_limit() -> u64 {
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    soft
}

fn set_soft_file_limit(soft: u64) {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, soft.min(hard), hard).expect("setrlimit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_admin_connections_lock_nobody_out() {
    common::proxy::upstream().await;
    set_soft_file_limit(1024);
    let template = "f_flood";
    let mut options = ProxyOptions::templates(&[template]);
    options.admin_listen = Some("127.0.0.1:0".into());
    let proxy = TestProxy::start(options).await;
    assert!(
        soft_file_limit() > 1024,
        "the proxy raised the soft file limit (it is {})",
        soft_file_limit()
    );
    let admin_addr = proxy.admin_addr.expect("admin API");

    let mut idle = Vec::with_capacity(2000);
    for i in 0..2000 {
        match TcpStream::connect(admin_addr).await {
            Ok(tcp) => idle.push(tcp),
            Err(e) => panic!("idle connection {i} failed: {e}"),
        }
    }

    let admin = admin_client(&proxy.files, admin_addr, &proxy.svid(ADMIN_ID));
    let health = tokio::time::timeout(Duration::from_secs(10), admin.health()).await;
    assert!(
        matches!(health, Ok(Ok(_))),
        "the admin API answers a good client: {health:?}"
    );
    let session = tokio::time::timeout(
        Duration::from_secs(10),
        proxy.connect(Some(&proxy.svid(BILLING_ID)), template, DATABASE),
    )
    .await
    .expect("the PostgreSQL port answers in time")
    .expect("a session");
    let one: i32 = session.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    drop(session);
    drop(idle);
    proxy.shutdown().await;
}
