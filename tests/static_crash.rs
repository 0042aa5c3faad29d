//! `kill -9` of Ephemera with postgres-static leases open, then a restart:
//! the reaper finds them in the ledger, takes them out, and closes the role
//! with a verifier nobody holds. (Its own binary: it asserts what the
//! reaper did, which another proxy on the same cluster could do first.)
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

mod common;

use std::time::Duration;

use common::cluster;
use common::make_tls_connect;
use common::proxy::{
    free_port, signal, spawn_binary, upstream, ProxyFiles, ProxyOptions, BILLING_ID, DATABASE,
    STRANGER_ID,
};

async fn ledger_rows(role: &str) -> i64 {
    cluster()
        .superuser("postgres")
        .await
        .query_one(
            "SELECT count(*) FROM ephemera.static_leases WHERE role = $1",
            &[&role],
        )
        .await
        .unwrap()
        .get(0)
}

async fn authid(role: &str) -> (String, bool) {
    let row = cluster()
        .superuser("postgres")
        .await
        .query_one(
            "SELECT rolpassword, coalesce(rolvaliduntil < now(), false) FROM pg_authid WHERE rolname = $1",
            &[&role],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_static_leases_open_then_restart_rotates_and_closes_the_role() {
    let (template, role) = ("legacy_crash", "st_crash_app");
    upstream().await;
    cluster()
        .exec_sql("postgres", &format!("CREATE ROLE {role} LOGIN"))
        .await;
    let listen = format!("127.0.0.1:{}", free_port());
    let mut options = ProxyOptions::templates(&[]);
    options.reap_interval = "1s";
    let files = ProxyFiles::write(&options, &listen).await;
    let mut config = std::fs::read_to_string(&files.config_path).unwrap();
    config.push_str(&format!(
        "\n[templates.{template}]\nengine = \"postgres-static\"\ndatabase = \"{DATABASE}\"\n\
         role = \"{role}\"\nttl = \"3s\"\n\
         [[policy]]\nspiffe_id = \"{BILLING_ID}\"\ntemplates = [\"{template}\"]\n\
         [[policy]]\nspiffe_id = \"{STRANGER_ID}\"\ntemplates = [\"{template}\"]\n"
    ));
    std::fs::write(&files.config_path, config).unwrap();
    let mut first = spawn_binary(&files.config_path, &listen, None, &[]).await;

    let port: u16 = listen.rsplit(':').next().unwrap().parse().unwrap();
    let mut clients = Vec::new();
    for identity in [BILLING_ID, STRANGER_ID] {
        let mut config = tokio_postgres::Config::new();
        config
            .host("localhost")
            .hostaddr("127.0.0.1".parse().unwrap())
            .port(port)
            .user(template)
            .dbname(DATABASE)
            .ssl_mode(tokio_postgres::config::SslMode::Require);
        let (client, connection) = config
            .connect(make_tls_connect(
                files.server_ca.cert_pem(),
                Some(&files.svid(identity)),
            ))
            .await
            .expect("a session connects");
        tokio::spawn(connection);
        let user: String = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(user, role);
        clients.push(client);
    }
    assert_eq!(ledger_rows(role).await, 2);
    let (while_open, _) = authid(role).await;

    signal(&first, libc::SIGKILL);
    first.wait().await.expect("killed");
    assert_eq!(ledger_rows(role).await, 2, "only the ledger knows now");

    let mut second = spawn_binary(&files.config_path, &listen, None, &[]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while ledger_rows(role).await != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restarted reaper did not end the static leases"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (after, closed) = authid(role).await;
    assert_ne!(after, while_open, "the reaper rotated the verifier");
    assert!(after.starts_with("SCRAM-SHA-256$"), "{after}");
    assert!(closed, "and set VALID UNTIL in the past");
    let reaped_count =
        |events: &[serde_json::Value]| events.iter().filter(|e| e["event"] == "reaped").count();
    let reaped = reaped_count(&files.audit_events_when(|e| reaped_count(e) >= 2).await);
    assert_eq!(reaped, 2, "both orphans are reaped and audited");
    signal(&second, libc::SIGTERM);
    second.wait().await.expect("exits");
    drop(clients);
}
