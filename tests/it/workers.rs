//! Thread-per-core serving (issue 14): sessions are relayed on different
//! session threads, handshakes and cancel requests run on the
//! multi-threaded runtime, and all of them share one lease table, one
//! cancel map and one set of limits. Which thread relays a session is read
//! off the proxy's own per-worker counts, not assumed from the round-robin
//! order.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use std::time::Duration;

use crate::cancel::wait_for_running_sleep;
use common::make_tls_connect;
use common::proxy::{admin_client, ProxyOptions, ADMIN_ID, DATABASE};
use ephemera::admin::api::{LeaseFilter, RevokeRequest};
use ephemera_engine::LeaseState;

/// An identity of this test's own: the revoke below acts on all its leases.
const WORKER_ID: &str = "spiffe://example.org/ns/prod/sa/thread-per-core";

/// The worker whose count went up between two readings.
fn worker_that_took(before: &[u64], after: &[u64]) -> usize {
    let grew: Vec<usize> = (0..after.len()).filter(|&i| after[i] > before[i]).collect();
    assert_eq!(
        grew.len(),
        1,
        "one connection, one worker: {before:?} -> {after:?}"
    );
    grew[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_on_different_threads_share_leases_cancels_and_limits() {
    let template = "w_shared";
    let mut options = ProxyOptions::templates(&[template]);
    options.admin_listen = Some("127.0.0.1:0".into());
    options.listen_extra = "workers = 2\nmax_connections = 2".into();
    let proxy = common::proxy::start_proxy_with_extra_config(
        options,
        &format!("[[policy]]\nspiffe_id = \"{WORKER_ID}\"\ntemplates = [\"{template}\"]"),
    )
    .await;
    let svid = proxy.svid(WORKER_ID);
    assert_eq!(proxy.workers.workers(), 2);

    // Two sessions, on two threads.
    let before = proxy.workers.accepted();
    let first = proxy
        .connect(Some(&svid), template, DATABASE)
        .await
        .unwrap();
    let after_first = proxy.workers.accepted();
    let second = proxy
        .connect(Some(&svid), template, DATABASE)
        .await
        .unwrap();
    let after_second = proxy.workers.accepted();
    let first_thread = worker_that_took(&before, &after_first);
    let second_thread = worker_that_took(&after_first, &after_second);
    assert_ne!(
        first_thread, second_thread,
        "the two sessions share no thread"
    );
    for client in [&first, &second] {
        client.simple_query("SELECT 1").await.unwrap();
    }

    // One set of limits: max_connections = 2 counts both threads' sessions.
    let refused = proxy
        .connect(Some(&svid), template, DATABASE)
        .await
        .expect_err("a third session is over the limit");
    assert_eq!(
        refused.code().map(|c| c.code()),
        Some("53300"),
        "{refused:?}"
    );

    // One cancel map: the first session's query is cancelled by a cancel
    // request that a thread other than the session's own accepts.
    let token = first.cancel_token();
    let sleeper = tokio::spawn(async move {
        let result = first.simple_query("SELECT pg_sleep(60)").await;
        (first, result)
    });
    wait_for_running_sleep(template).await;
    // A cancel request is served where handshakes are, never on a
    // session thread: it reaches no worker, yet finds the session's key.
    let before_cancel = proxy.workers.accepted();
    token
        .cancel_query(make_tls_connect(
            proxy.files.server_ca.cert_pem(),
            Some(&svid),
        ))
        .await
        .unwrap();
    assert_eq!(
        proxy.workers.accepted(),
        before_cancel,
        "the cancel was not relayed on a session thread"
    );
    let (first, result) = tokio::time::timeout(Duration::from_secs(5), sleeper)
        .await
        .expect("the cancel ends the query")
        .unwrap();
    let error = result.expect_err("the sleep was cancelled");
    assert_eq!(error.code().map(|c| c.code()), Some("57014"), "{error:?}");
    first
        .simple_query("SELECT 1")
        .await
        .expect("the session goes on");

    // One lease table: both sessions' leases are listed, and one revoke
    // ends the sessions on both threads.
    let admin = admin_client(
        &proxy.files,
        proxy.admin_addr.unwrap(),
        &proxy.svid(ADMIN_ID),
    );
    let filter = LeaseFilter {
        identity: Some(WORKER_ID.into()),
        state: Some(LeaseState::Active),
        ..Default::default()
    };
    assert_eq!(admin.list_leases(&filter).await.unwrap().len(), 2);
    let revoked = admin
        .revoke(RevokeRequest {
            identity: Some(WORKER_ID.into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(revoked.revoked, 2);
    for client in [&first, &second] {
        let error = client
            .simple_query("SELECT 1")
            .await
            .expect_err("the session was ended by the revoke");
        assert!(
            error.is_closed() || error.code().map(|c| c.code()) == Some("57P01"),
            "{error:?}"
        );
    }
    assert!(admin.list_leases(&filter).await.unwrap().is_empty());
    proxy.shutdown().await;
}
