//! The reaper: the database is the ledger, and expired roles are dropped
//! whoever created them. (Its own test binary, so its own cluster: no other
//! replica competes for the reaper lock.)

mod common;

use std::time::Duration;

use common::cluster;
use common::proxy::{
    role_prefix, wait_until_no_roles, ProxyOptions, TestProxy, BILLING_ID, DATABASE,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_drops_expired_roles_left_by_a_dead_process() {
    let template = "l_orphan";
    // A role that looks like one a crashed Ephemera left: expired lease comment.
    let role = format!("{}deadbeef", role_prefix(template));
    let comment = serde_json::json!({
        "ephemera_lease": 1,
        "lease_id": uuid::Uuid::new_v4(),
        "kind": "session",
        "identity": BILLING_ID,
        "template": template,
        "database": DATABASE,
        "issued_at": "2020-01-01T00:00:00Z",
        "expires_at": "2020-01-01T00:15:00Z",
        "max_expires_at": "2020-01-01T01:00:00Z"
    });
    cluster()
        .exec_sql(
            "postgres",
            &format!("CREATE ROLE \"{role}\" LOGIN; COMMENT ON ROLE \"{role}\" IS '{comment}';"),
        )
        .await;
    let mut options = ProxyOptions::templates(&[template]);
    options.reap_interval = "500ms";
    let proxy = TestProxy::start(options).await;
    assert!(
        wait_until_no_roles(&role_prefix(template), Duration::from_secs(5)).await,
        "the reaper drops the orphan"
    );
    let audit = proxy.files.audit_events();
    assert!(
        audit
            .iter()
            .any(|e| e["event"] == "reaped" && e["role"] == role.as_str()),
        "{audit:?}"
    );
    proxy.shutdown().await;
}
