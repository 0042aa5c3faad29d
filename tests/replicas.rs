//! Two replicas on one upstream share the reaper through a row lock in
//! `ephemera.reaper_election`:
//! kill the holder and the other takes over. (Its own test binary, so its
//! own cluster: no other Ephemera competes for the lock.)
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

mod common;

use std::time::{Duration, Instant};

use common::cluster;
use common::proxy::{
    free_port, role_prefix, signal, spawn_binary, wait_until_no_roles, ProxyFiles, ProxyOptions,
    BILLING_ID, DATABASE,
};

/// An expired lease role, as a crashed Ephemera would leave it.
async fn plant_orphan(template: &str, tag: &str) -> String {
    let role = format!("{}{tag}", role_prefix(template));
    let comment = serde_json::json!({
        "ephemera_lease": 1, "lease_id": uuid::Uuid::new_v4(), "kind": "session",
        "identity": BILLING_ID, "template": template, "database": DATABASE,
        "issued_at": "2020-01-01T00:00:00Z", "expires_at": "2020-01-01T00:15:00Z",
        "max_expires_at": "2020-01-01T01:00:00Z"
    });
    cluster()
        .exec_sql(
            "postgres",
            &format!("CREATE ROLE \"{role}\"; COMMENT ON ROLE \"{role}\" IS '{comment}';"),
        )
        .await;
    role
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_takes_over_reaping_when_the_first_dies() {
    let template = "f_replica";
    let mut options = ProxyOptions::templates(&[template]);
    options.reap_interval = "1s";
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let listen = format!("127.0.0.1:{}", free_port());
        let files = ProxyFiles::write(&options, &listen).await;
        let child = spawn_binary(&files.config_path, &listen, None, &[]).await;
        replicas.push((files, child));
    }
    let reaped_by = |files: &ProxyFiles, role: &str| {
        files
            .audit_events()
            .iter()
            .any(|e| e["event"] == "reaped" && e["role"] == role)
    };
    let first = plant_orphan(template, "first").await;
    assert!(
        wait_until_no_roles(&first, Duration::from_secs(5)).await,
        "one replica reaps"
    );
    let leader = replicas
        .iter()
        .position(|(files, _)| reaped_by(files, &first))
        .expect("the reaper audited it");
    let (_, mut child) = replicas.remove(leader);
    signal(&child, libc::SIGKILL);
    child.wait().await.expect("killed");

    let killed = Instant::now();
    let second = plant_orphan(template, "second").await;
    assert!(
        wait_until_no_roles(&second, Duration::from_secs(5)).await,
        "the survivor takes over reaping"
    );
    assert!(killed.elapsed() < Duration::from_secs(5));
    eprintln!(
        "replicas: the survivor reaped {:?} after the leader was killed",
        killed.elapsed()
    );
    let (files, mut survivor) = replicas.pop().expect("the other replica");
    assert!(reaped_by(&files, &second));
    signal(&survivor, libc::SIGTERM);
    survivor.wait().await.expect("exits");
}
