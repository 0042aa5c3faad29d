//! The reaper: the database is the ledger, and expired roles are dropped
//! whoever created them. (Its own test binary, so its own cluster: no other
//! replica competes for the reaper lock.)
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

mod common;

use std::time::{Duration, Instant};

use common::cluster;
use common::proxy::{
    plant_expired_role_sql, role_prefix, roles_with_prefix, wait_until_no_roles, ProxyOptions,
    TestProxy,
};

/// 250 orphans (batches of 100, 100 and 50) are all dropped; one more that
/// cannot be dropped (it owns a database, which no `DROP OWNED` removes)
/// fails its batch, which is
/// then revoked role by role: the others still go, the blocked one is
/// retried until the obstacle is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_drops_expired_roles_left_by_a_dead_process() {
    let template = "l_orphan";
    let prefix = role_prefix(template);
    let orphans: Vec<String> = (0..250).map(|i| format!("{prefix}dead{i:04}")).collect();
    let blocked = format!("{prefix}blocked");
    let mut sql: String = orphans
        .iter()
        .map(|role| plant_expired_role_sql(role, template))
        .collect();
    sql.push_str(&plant_expired_role_sql(&blocked, template));
    cluster().exec_sql("postgres", &sql).await;
    cluster()
        .exec_sql(
            "postgres",
            &format!("CREATE DATABASE reaper_obstacle OWNER \"{blocked}\""),
        )
        .await;

    let mut options = ProxyOptions::templates(&[template]);
    options.reap_interval = "500ms";
    let proxy = TestProxy::start(options).await;

    // The orphans go; the blocked role stays, and its failure is audited.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = roles_with_prefix(&prefix).await;
        let failed = proxy
            .files
            .audit_events()
            .iter()
            .any(|e| e["event"] == "revoke_failed" && e["role"] == blocked.as_str());
        if left == [blocked.clone()] && failed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left: {} roles, revoke_failed audited: {failed}",
            left.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let audit = proxy.files.audit_events();
    for role in &orphans {
        assert!(
            audit
                .iter()
                .any(|e| e["event"] == "reaped" && e["role"] == role.as_str()),
            "no reaped event for {role}"
        );
    }

    // Remove the obstacle: the retry drops the last one.
    cluster()
        .exec_sql("postgres", "DROP DATABASE reaper_obstacle")
        .await;
    assert!(
        wait_until_no_roles(&prefix, Duration::from_secs(40)).await,
        "the blocked role is dropped once it can be"
    );
    let reaped = |events: &[serde_json::Value]| {
        events
            .iter()
            .any(|e| e["event"] == "reaped" && e["role"] == blocked.as_str())
    };
    assert!(reaped(&proxy.files.audit_events_when(reaped).await));
    proxy.shutdown().await;
}
