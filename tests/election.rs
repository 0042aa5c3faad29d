//! Issue 12, finding 1: no role but Ephemera's admin role can switch the
//! reaper off. (Its own test binary, so its own cluster: nothing else
//! competes for the election.)
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

mod common;

use std::time::{Duration, Instant};

use common::cluster;
use common::proxy::{
    admin_client, plant_expired_role_sql, upstream, wait_until_no_roles, ProxyOptions, TestProxy,
    ADMIN_ID,
};

async fn plant_expired_role(role: &str, template: &str) {
    cluster()
        .exec_sql("postgres", &plant_expired_role_sql(role, template))
        .await;
}

/// Terminate the backend holding the leader's election transaction.
async fn end_the_leaders_election() {
    cluster()
        .superuser("postgres")
        .await
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE usename = 'ephemera_admin' AND datname = 'postgres' \
             AND state LIKE 'idle in transaction%'",
            &[],
        )
        .await
        .expect("terminate the leader's election connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_other_role_can_hold_or_block_the_reaper_election() {
    upstream().await;
    cluster()
        .exec_sql(
            "postgres",
            "CREATE ROLE squatter LOGIN PASSWORD 'squatter-pw'",
        )
        .await;
    let squatter = cluster()
        .connect("squatter", "squatter-pw", "postgres")
        .await
        .expect("the squatter logs in to the admin database");
    // The old election: an advisory lock on a public constant, which
    // anyone who can connect could take while Ephemera was down.
    let old_key = i64::from_be_bytes(*b"ephemera");
    squatter
        .execute("SELECT pg_advisory_lock($1)", &[&old_key])
        .await
        .expect("any role can take an advisory lock");
    // The new one is closed to it, whatever it tries.
    for attempt in [
        "SELECT * FROM ephemera.reaper_election FOR UPDATE",
        "LOCK TABLE ephemera.reaper_election IN ACCESS EXCLUSIVE MODE",
        "SELECT * FROM ephemera.reaper_election FOR KEY SHARE",
    ] {
        let refused = squatter.batch_execute(attempt).await;
        assert!(refused.is_err(), "{attempt} was allowed");
    }
    let template = "e_squat";
    let role = "eph_e_squat_expired00000000000";
    plant_expired_role(role, template).await;
    let mut options = ProxyOptions::templates(&[template]);
    options.reap_interval = "200ms";
    options.admin_listen = Some("127.0.0.1:0".into());
    let proxy = TestProxy::start(options).await;
    assert!(
        wait_until_no_roles(role, Duration::from_secs(15)).await,
        "the expired role is reaped despite the squatter"
    );

    // A lock that needs no privilege (pg_relation_size takes ACCESS SHARE),
    // held in an open transaction, does not block the election either.
    squatter
        .batch_execute(
            "BEGIN; SELECT pg_relation_size(oid) FROM pg_class WHERE relname = 'reaper_election';",
        )
        .await
        .expect("pg_relation_size needs no privilege");

    // Someone who is not the admin role (here a superuser) holding the
    // election's row lock: Ephemera says so and reaps anyway.
    let superuser = cluster().superuser("postgres").await;
    let locking = tokio::spawn(async move {
        superuser
            .batch_execute("BEGIN; SELECT * FROM ephemera.reaper_election FOR UPDATE;")
            .await
            .expect("the superuser takes the row lock");
        superuser
    });
    // Make this replica lose the lead: end its election transaction; the
    // superuser, queued for the lock, gets it first.
    end_the_leaders_election().await;
    let superuser = locking.await.expect("the superuser holds the lock");
    let second = "eph_e_squat_expired00000000001";
    plant_expired_role(second, template).await;
    assert!(
        wait_until_no_roles(second, Duration::from_secs(15)).await,
        "reaped while a stranger holds the election"
    );
    let admin = admin_client(
        &proxy.files,
        proxy.admin_addr.expect("admin API"),
        &proxy.svid(ADMIN_ID),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = admin.metrics().await.expect("metrics");
        let squatted = metrics
            .lines()
            .find(|l| l.starts_with("ephemera_reaper_election_squatted_total"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if squatted >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no squatted election counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    superuser.batch_execute("ROLLBACK").await.unwrap();

    // No election possible at all (the schema is gone and the admin role
    // may not create it, as after an upgrade nobody prepared): the replica
    // reaps anyway. The DROP queues for the table; ending the leader's
    // election transaction lets it through before the next election.
    let dropping = tokio::spawn(async move {
        superuser
            .batch_execute("DROP SCHEMA ephemera CASCADE")
            .await
            .expect("drop the election schema");
    });
    end_the_leaders_election().await;
    dropping.await.expect("the schema is dropped");
    let third = "eph_e_squat_expired00000000002";
    plant_expired_role(third, template).await;
    assert!(
        wait_until_no_roles(third, Duration::from_secs(15)).await,
        "reaped without any election"
    );
    drop(squatter);
    proxy.shutdown().await;
}
