//! The session path end to end: an SVID in, a minted role upstream, the role
//! gone when the session ends.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

mod common;

use std::time::Duration;

use common::proxy::{
    psql, role_prefix, roles_with_prefix, wait_until_no_roles, ProxyOptions, TestProxy, BILLING_ID,
    DATABASE, GROUP,
};
use common::{cluster, make_tls_connect};
use ephemera_engine::LeaseComment;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_lands_as_a_fresh_role_that_is_dropped_at_the_end() {
    let template = "s_tokio";
    let proxy = TestProxy::start(ProxyOptions::templates(&[template])).await;
    let svid = proxy.svid(BILLING_ID);

    let client = proxy
        .connect(Some(&svid), template, DATABASE)
        .await
        .expect("a valid SVID connects");
    let row = client
        .query_one(
            "SELECT current_user::text, session_user::text, pg_has_role(current_user, $1, 'MEMBER')",
            &[&GROUP],
        )
        .await
        .expect("the session runs queries");
    let (current, session, member): (String, String, bool) = (row.get(0), row.get(1), row.get(2));
    assert!(current.starts_with(&role_prefix(template)), "{current}");
    assert!(current.len() <= 63);
    assert_eq!(session, current);
    assert!(member, "{current} is a member of {GROUP}");
    let total: i64 = client
        .query_one("SELECT count(*) FROM invoices", &[])
        .await
        .expect("the group's privileges apply")
        .get(0);
    assert_eq!(total, 2);

    // The role as the database sees it: the lease in its comment, a login
    // window already closed (Ephemera's login is done), one connection.
    let admin = cluster().superuser("postgres").await;
    let row = admin
        .query_one(
            "SELECT shobj_description(oid, 'pg_authid'), rolconnlimit,
                    extract(epoch FROM rolvaliduntil)::float8, rolcanlogin, rolsuper, rolcreaterole
             FROM pg_roles WHERE rolname = $1",
            &[&current],
        )
        .await
        .expect("the minted role exists while the session lives");
    let comment: String = row.get(0);
    let lease = LeaseComment::from_json(&comment).expect("the comment is a lease");
    assert_eq!(lease.identity, BILLING_ID);
    assert_eq!(lease.template, template);
    assert_eq!(lease.database, DATABASE);
    assert_eq!(row.get::<_, i32>(1), 1);
    let valid_until: f64 = row.get(2);
    assert!(
        valid_until < lease.issued_at.unix_timestamp() as f64,
        "rolvaliduntil ({valid_until}) is in the past once the session is relayed"
    );
    assert!(row.get::<_, bool>(3));
    assert!(!row.get::<_, bool>(4) && !row.get::<_, bool>(5));

    drop(client);
    assert!(
        wait_until_no_roles(&role_prefix(template), Duration::from_secs(5)).await,
        "the role is dropped within 5 s of the session ending: {:?}",
        roles_with_prefix(&role_prefix(template)).await
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_with_an_svid_gets_a_minted_role() {
    let template = "s_psql";
    let proxy = TestProxy::start(ProxyOptions::templates(&[template])).await;
    let conninfo = proxy.conninfo(&proxy.svid(BILLING_ID), template, DATABASE);
    let output = tokio::process::Command::new(psql())
        .args([
            conninfo.as_str(),
            "-X",
            "-A",
            "-t",
            "-c",
            "select current_user, session_user = current_user, application_name from pg_stat_activity where pid = pg_backend_pid()",
        ])
        .env("PGAPPNAME", "billing-report")
        .output()
        .await
        .expect("psql runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let fields: Vec<&str> = stdout.trim().split('|').collect();
    assert!(fields[0].starts_with(&role_prefix(template)), "{stdout}");
    assert_eq!(fields[1], "t");
    assert_eq!(
        fields[2], "billing-report",
        "application_name is passed through"
    );
    assert!(
        wait_until_no_roles(&role_prefix(template), Duration::from_secs(5)).await,
        "the role is dropped within 5 s of psql exiting"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_with_alpn_works() {
    let template = "s_direct";
    let proxy = TestProxy::start(ProxyOptions::templates(&[template])).await;
    let svid = proxy.svid(BILLING_ID);
    let mut tls = common::tls_client_config(proxy.files.server_ca.cert_pem(), Some(&svid));
    tls.alpn_protocols = vec![b"postgresql".to_vec()];
    let mut config = proxy.pg_config(template, DATABASE);
    config.ssl_negotiation(tokio_postgres::config::SslNegotiation::Direct);
    let (client, connection) = config
        .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
        .await
        .expect("direct TLS connects");
    tokio::spawn(connection);
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("query")
        .get(0);
    assert!(user.starts_with(&role_prefix(template)), "{user}");
    drop(client);
    assert!(wait_until_no_roles(&role_prefix(template), Duration::from_secs(5)).await);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_created_in_the_session_go_to_the_owner_and_the_role_still_drops() {
    let template = "s_owner";
    let mut options = ProxyOptions::templates(&[template]);
    options.template_extra = "owner = \"billing_owner\"\ncreation_statements = [\"GRANT SELECT ON invoices TO {{name}}\"]\nrevocation_statements = [\"REVOKE SELECT ON invoices FROM {{name}}\"]".into();
    let proxy = TestProxy::start(options).await;
    let client = proxy
        .connect(Some(&proxy.svid(BILLING_ID)), template, DATABASE)
        .await
        .expect("connects");
    client
        .batch_execute("CREATE TABLE s_owner_scratch (x int)")
        .await
        .expect("the session can create a table (CREATE on public via the group)");
    drop(client);
    assert!(
        wait_until_no_roles(&role_prefix(template), Duration::from_secs(5)).await,
        "a role that owns objects and has direct grants is still dropped"
    );
    let admin = cluster().superuser(DATABASE).await;
    let owner: String = admin
        .query_one(
            "SELECT tableowner::text FROM pg_tables WHERE tablename = 's_owner_scratch'",
            &[],
        )
        .await
        .expect("the table survives the role")
        .get(0);
    assert_eq!(owner, "billing_owner");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_revokes_live_sessions() {
    let template = "s_shutdown";
    let proxy = TestProxy::start(ProxyOptions::templates(&[template])).await;
    let client = proxy
        .connect(Some(&proxy.svid(BILLING_ID)), template, DATABASE)
        .await
        .expect("connects");
    assert_eq!(roles_with_prefix(&role_prefix(template)).await.len(), 1);
    proxy.shutdown().await;
    assert!(roles_with_prefix(&role_prefix(template)).await.is_empty());
    let error = client
        .simple_query("SELECT 1")
        .await
        .expect_err("the session was terminated");
    if let Some(db) = error.as_db_error() {
        assert_eq!(db.code().code(), "57P01", "{db:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_statement_log_never_sees_a_plaintext_password() {
    let template = "s_log";
    let proxy = TestProxy::start(ProxyOptions::templates(&[template])).await;
    let offset = cluster().log_len();
    let client = proxy
        .connect(Some(&proxy.svid(BILLING_ID)), template, DATABASE)
        .await
        .expect("connects");
    client.simple_query("SELECT 1").await.expect("query");
    drop(client);
    assert!(wait_until_no_roles(&role_prefix(template), Duration::from_secs(5)).await);
    proxy.shutdown().await;

    assert!(
        cluster()
            .wait_for_log(
                offset,
                &format!("CREATE ROLE \"{}", role_prefix(template)),
                Duration::from_secs(5)
            )
            .await,
        "log_statement = 'all' recorded the role creation"
    );
    let log = cluster().server_log();
    let mut seen = 0;
    for (at, _) in log.match_indices("PASSWORD '") {
        seen += 1;
        let rest = &log[at + "PASSWORD '".len()..];
        assert!(
            rest.starts_with("SCRAM-SHA-256$"),
            "a password that is not a SCRAM verifier reached the log: {}",
            &rest[..rest.len().min(40)]
        );
    }
    assert!(
        seen > 0,
        "the check saw at least one CREATE ROLE … PASSWORD"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_psql_from_a_config_file() {
    let template = "s_binary";
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        listener.local_addr().expect("address").port()
    };
    let listen = format!("127.0.0.1:{port}");
    let files =
        common::proxy::ProxyFiles::write(&ProxyOptions::templates(&[template]), &listen).await;
    let mut child = common::proxy::spawn_binary(&files.config_path, &listen, None, &[]).await;

    let conninfo = files.conninfo(
        listen.parse().expect("addr"),
        &files.svid(BILLING_ID),
        template,
        DATABASE,
    );
    let output = tokio::process::Command::new(psql())
        .args([
            conninfo.as_str(),
            "-X",
            "-A",
            "-t",
            "-c",
            "select current_user",
        ])
        .output()
        .await
        .expect("psql runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.trim().starts_with("eph_s_binary_"),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(wait_until_no_roles(&role_prefix(template), Duration::from_secs(5)).await);

    // SIGTERM: an orderly exit.
    common::proxy::signal(&child, libc::SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("ephemera exits after SIGTERM")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    let _ = make_tls_connect; // keep the import used in every configuration
}
