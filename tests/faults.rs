//! Faults: the upstream goes away and comes back, the admin pool's
//! connections are killed or its password rotated, two replicas share the
//! reaper, and `kill -9` hits a storm of connecting sessions. Ephemera keeps
//! serving and loses no role.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

mod common;

use std::time::{Duration, Instant};

use common::proxy::{
    free_port, role_prefix, roles_with_prefix, signal, spawn_binary, upstream, wait_until_no_roles,
    ProxyFiles, ProxyOptions, TestProxy, ADMIN_USER, BILLING_ID, DATABASE, GROUP,
};
use common::{cluster, make_tls_connect};
use ephemera::dev::cluster::{server_user, LocalCluster, Running};

const SUPERUSER_PASSWORD: &str = "restartable-superuser-pw";

/// A second PostgreSQL we may stop and start, set up like the shared one
/// (same admin role and password, same group, same server CA).
struct Restartable {
    local: LocalCluster,
    running: Option<Running>,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Restartable {
    async fn new() -> Restartable {
        use std::os::unix::fs::PermissionsExt;
        let admin_password = upstream().await.admin_password.clone();
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let local = LocalCluster {
            bin_dir: cluster().bin_dir().to_owned(),
            data_dir: dir.path().join("pg"),
            log_path: dir.path().join("postgres.log"),
            user: server_user().expect("server user"),
        };
        let server = cluster()
            .ca()
            .server_cert(&["localhost"], &["127.0.0.1".parse().expect("ip")]);
        let superuser = "restartable-superuser-pw";
        local
            .init(superuser, &server.cert_pem, &server.key_pem)
            .expect("initdb");
        let mut this = Restartable {
            local,
            running: None,
            port: free_port(),
            _dir: dir,
        };
        this.start().await;
        let client = this.superuser().await;
        let verifier = postgres_protocol::password::scram_sha_256(admin_password.as_bytes());
        client
            .batch_execute(&format!(
                "CREATE ROLE {ADMIN_USER} LOGIN CREATEROLE PASSWORD '{verifier}'; CREATE ROLE {GROUP} NOLOGIN;"
            ))
            .await
            .expect("admin role");
        client
            .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
            .await
            .expect("database");
        this
    }

    async fn superuser(&self) -> tokio_postgres::Client {
        let mut config = tokio_postgres::Config::new();
        config
            .host("localhost")
            .hostaddr("127.0.0.1".parse().expect("ip"))
            .port(self.port)
            .user("postgres")
            .password(SUPERUSER_PASSWORD)
            .dbname("postgres")
            .ssl_mode(tokio_postgres::config::SslMode::Require);
        let (client, connection) = config
            .connect(make_tls_connect(cluster().ca_pem(), None))
            .await
            .expect("superuser connects");
        tokio::spawn(connection);
        client
    }

    async fn start(&mut self) {
        let running = self.local.start(self.port).expect("postgres starts");
        let local = self.local.clone();
        let running = tokio::task::spawn_blocking(move || {
            local
                .wait_ready(&running, Duration::from_secs(30))
                .expect("postgres is ready");
            running
        })
        .await
        .expect("task");
        self.running = Some(running);
    }

    fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop(Duration::from_secs(10));
        }
    }
}

impl Drop for Restartable {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_going_away_and_back() {
    let template = "f_up";
    let mut db = Restartable::new().await;
    let mut options = ProxyOptions::templates(&[template]);
    options.upstream_port = Some(db.port);
    options.template_extra = "ttl = \"3s\"".into();
    options.reap_interval = "1s";
    let proxy = TestProxy::start(options).await;
    let svid = proxy.svid(BILLING_ID);
    let session = proxy
        .connect(Some(&svid), template, DATABASE)
        .await
        .expect("connects");

    db.stop();
    let error = session
        .simple_query("SELECT 1")
        .await
        .expect_err("the upstream is gone");
    if let Some(db_error) = error.as_db_error() {
        assert_eq!(db_error.code().code(), "57P01", "{db_error:?}");
    }
    let refused = proxy
        .connect(Some(&svid), template, DATABASE)
        .await
        .expect_err("no upstream, no session");
    let refused = refused.as_db_error().expect("an ErrorResponse");
    assert_eq!(refused.code().code(), "08006", "{refused:?}");
    assert!(
        refused
            .message()
            .contains(&format!("127.0.0.1:{}", db.port)),
        "{refused:?}"
    );
    let failed_mint = |events: &[serde_json::Value]| {
        events.iter().any(|e| {
            e["event"] == "issue_failed" && e["identity"] == BILLING_ID && e["template"] == template
        })
    };
    let audit = proxy.files.audit_events_when(failed_mint).await;
    assert!(failed_mint(&audit), "the failed mint is audited: {audit:?}");

    db.start().await;
    let back = Instant::now();
    let client = loop {
        match proxy.connect(Some(&svid), template, DATABASE).await {
            Ok(client) => break client,
            Err(e) => {
                assert!(
                    back.elapsed() < Duration::from_secs(1),
                    "not serving 1 s after the upstream returned: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let served_after = back.elapsed();
    let current: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("query")
        .get(0);
    assert!(
        served_after < Duration::from_secs(1),
        "served again after {served_after:?}"
    );
    eprintln!("faults: served again {served_after:?} after the upstream returned");

    // The broken session's role (revoke retried while the upstream was
    // down) is dropped now that it is back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let admin = db.superuser().await;
        let roles: Vec<String> = admin
            .query(
                "SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, $1)",
                &[&role_prefix(template)],
            )
            .await
            .expect("roles")
            .iter()
            .map(|r| r.get(0))
            .collect();
        if roles == [current.clone()] {
            break;
        }
        assert!(Instant::now() < deadline, "left behind: {roles:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(client);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_pool_recovers_from_killed_connections_and_a_rotated_password() {
    let template = "f_pool";
    let proxy = TestProxy::start(ProxyOptions::templates(&[template])).await;
    let svid = proxy.svid(BILLING_ID);
    let admin = cluster().superuser("postgres").await;
    let kill_admin_connections = || async {
        admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1 AND application_name = 'ephemera'",
                &[&ADMIN_USER],
            )
            .await
            .expect("terminate")
            .len()
    };
    drop(
        proxy
            .connect(Some(&svid), template, DATABASE)
            .await
            .expect("warms the pool"),
    );
    assert!(wait_until_no_roles(&role_prefix(template), Duration::from_secs(5)).await);
    assert!(
        kill_admin_connections().await > 0,
        "the pool had connections"
    );
    let client = proxy
        .connect(Some(&svid), template, DATABASE)
        .await
        .expect("the pool recovered");
    client.simple_query("SELECT 1").await.expect("query");
    drop(client);
    assert!(wait_until_no_roles(&role_prefix(template), Duration::from_secs(5)).await);

    // Rotate the admin password: in PostgreSQL, then in the file, then reload.
    let new_password = "rotated-admin-password-f-pool";
    let verifier = postgres_protocol::password::scram_sha_256(new_password.as_bytes());
    admin
        .batch_execute(&format!("ALTER ROLE {ADMIN_USER} PASSWORD '{verifier}'"))
        .await
        .expect("rotate");
    std::fs::write(proxy.files.dir.path().join("admin-password"), new_password).expect("write");
    proxy.reloader.reload().expect("reload");
    kill_admin_connections().await;
    let client = proxy
        .connect(Some(&svid), template, DATABASE)
        .await
        .expect("the new password is used");
    client.simple_query("SELECT 1").await.expect("query");
    drop(client);
    assert!(wait_until_no_roles(&role_prefix(template), Duration::from_secs(5)).await);
    // Put the shared fixture's password back for the other tests.
    let old =
        postgres_protocol::password::scram_sha_256(upstream().await.admin_password.as_bytes());
    admin
        .batch_execute(&format!("ALTER ROLE {ADMIN_USER} PASSWORD '{old}'"))
        .await
        .expect("restore");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_storm_of_500_connecting_sessions_leaks_nothing() {
    let template = "f_storm";
    let listen = format!("127.0.0.1:{}", free_port());
    let mut options = ProxyOptions::templates(&[template]);
    options.template_extra = "ttl = \"3s\"".into();
    options.reap_interval = "1s";
    options.lease_extra = "issue_burst_per_identity = 1000".into();
    let files = ProxyFiles::write(&options, &listen).await;
    let mut first = spawn_binary(&files.config_path, &listen, None, &[]).await;
    let svid = files.svid(BILLING_ID);
    let port: u16 = listen
        .rsplit(':')
        .next()
        .expect("port")
        .parse()
        .expect("port");
    let mut storm = tokio::task::JoinSet::new();
    for _ in 0..500 {
        let tls = make_tls_connect(files.server_ca.cert_pem(), Some(&svid));
        storm.spawn(async move {
            let mut config = tokio_postgres::Config::new();
            config
                .host("localhost")
                .hostaddr("127.0.0.1".parse().expect("ip"))
                .port(port)
                .user(template)
                .dbname(DATABASE)
                .ssl_mode(tokio_postgres::config::SslMode::Require)
                .connect_timeout(Duration::from_secs(20));
            if let Ok((client, connection)) = config.connect(tls).await {
                tokio::spawn(connection);
                let _ = client.simple_query("SELECT pg_sleep(30)").await;
            }
        });
    }
    // Kill it while roles are being minted.
    let deadline = Instant::now() + Duration::from_secs(20);
    while roles_with_prefix(&role_prefix(template)).await.len() < 20 {
        assert!(Instant::now() < deadline, "the storm never got going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&first, libc::SIGKILL);
    first.wait().await.expect("killed");
    storm.abort_all();

    let mut second = spawn_binary(&files.config_path, &listen, None, &[]).await;
    let restarted = Instant::now();
    // ttl (3 s) + reap_interval (1 s), plus slack for a loaded machine.
    assert!(
        wait_until_no_roles(&role_prefix(template), Duration::from_secs(10)).await,
        "left: {:?}",
        roles_with_prefix(&role_prefix(template)).await
    );
    eprintln!(
        "faults: storm roles all reaped {:?} after the restart",
        restarted.elapsed()
    );
    signal(&second, libc::SIGTERM);
    second.wait().await.expect("exits");
}
