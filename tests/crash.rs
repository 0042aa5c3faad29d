//! The real binary under crashes, and what it writes: `kill -9` leaks no
//! role, and no secret ever reaches its log or audit file, even at `trace`.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

mod common;

use std::time::{Duration, Instant};

use common::make_tls_connect;
use common::proxy::{
    admin_client, free_port, psql, role_prefix, roles_with_prefix, signal, spawn_binary, upstream,
    wait_until_no_roles, ProxyFiles, ProxyOptions, ADMIN_ID, BILLING_ID, DATABASE,
};
use ephemera::admin::api::RevokeRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_live_sessions_leaks_no_role_after_restart() {
    let template = "k_storm";
    let listen = format!("127.0.0.1:{}", free_port());
    let mut options = ProxyOptions::templates(&[template]);
    options.template_extra = "ttl = \"3s\"".into();
    options.reap_interval = "1s";
    let files = ProxyFiles::write(&options, &listen).await;
    let mut first = spawn_binary(&files.config_path, &listen, None, &[]).await;

    let svid = files.svid(BILLING_ID);
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut config = tokio_postgres::Config::new();
        config
            .host("localhost")
            .hostaddr("127.0.0.1".parse().expect("ip"))
            .port(
                listen
                    .rsplit(':')
                    .next()
                    .expect("port")
                    .parse()
                    .expect("port"),
            )
            .user(template)
            .dbname(DATABASE)
            .ssl_mode(tokio_postgres::config::SslMode::Require);
        let (client, connection) = config
            .connect(make_tls_connect(files.server_ca.cert_pem(), Some(&svid)))
            .await
            .expect("a session connects");
        tokio::spawn(connection);
        clients.push(client);
    }
    assert_eq!(roles_with_prefix(&role_prefix(template)).await.len(), 20);

    signal(&first, libc::SIGKILL);
    first.wait().await.expect("killed");
    let killed_at = Instant::now();
    // The roles outlive the process: only the ledger knows about them now.
    assert!(!roles_with_prefix(&role_prefix(template)).await.is_empty());

    let mut second = spawn_binary(&files.config_path, &listen, None, &[]).await;
    // ttl (3 s) + reap_interval (1 s), plus slack for a loaded machine.
    assert!(
        wait_until_no_roles(&role_prefix(template), Duration::from_secs(8)).await,
        "left after restart: {:?}",
        roles_with_prefix(&role_prefix(template)).await
    );
    assert!(killed_at.elapsed() < Duration::from_secs(8));
    let reaped = files
        .audit_events()
        .iter()
        .filter(|e| e["event"] == "reaped")
        .count();
    assert_eq!(reaped, 20, "every orphan is reaped and audited");
    signal(&second, libc::SIGTERM);
    second.wait().await.expect("exits");
    drop(clients);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_log_or_audit_file_even_at_trace() {
    let template = "k_secrets";
    let listen = format!("127.0.0.1:{}", free_port());
    let admin_listen = format!("127.0.0.1:{}", free_port());
    let mut options = ProxyOptions::templates(&[template]);
    options.admin_listen = Some(admin_listen.clone());
    let files = ProxyFiles::write(&options, &listen).await;
    let log_path = files.dir.path().join("ephemera.log");
    let mut child = spawn_binary(
        &files.config_path,
        &listen,
        Some(&log_path),
        &[("EPHEMERA_LOG", "trace")],
    )
    .await;

    // A proxied session (psql), standalone credentials, a revocation.
    let svid = files.svid(BILLING_ID);
    let conninfo = files.conninfo(listen.parse().expect("addr"), &svid, template, DATABASE);
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
        .expect("psql");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let job = admin_client(&files, admin_listen.parse().expect("addr"), &svid);
    let creds = job.creds(template).await.expect("creds");
    let admin = admin_client(
        &files,
        admin_listen.parse().expect("addr"),
        &files.svid(ADMIN_ID),
    );
    admin
        .revoke(RevokeRequest {
            // By template: other tests in this binary use the same identity.
            template: Some(template.into()),
            ..Default::default()
        })
        .await
        .expect("revoke");
    assert!(wait_until_no_roles(&role_prefix(template), Duration::from_secs(5)).await);
    signal(&child, libc::SIGTERM);
    child.wait().await.expect("exits");

    let log = std::fs::read_to_string(&log_path).expect("the log");
    let audit =
        std::fs::read_to_string(files.dir.path().join("audit.jsonl")).expect("the audit log");
    assert!(
        log.contains("TRACE") || log.contains("trace"),
        "the log is at trace level"
    );
    assert!(audit.lines().count() >= 4, "{audit}");
    let admin_password = upstream().await.admin_password.clone();
    let server_key = std::fs::read_to_string(files.dir.path().join("server-key.pem")).expect("key");
    let mut secrets: Vec<(String, String)> = vec![
        ("standalone password".into(), creds.password.clone()),
        ("admin password".into(), admin_password),
        ("verifier".into(), "SCRAM-SHA-256$".into()),
    ];
    for (name, pem) in [
        ("server key", server_key),
        ("svid key", svid.key_pem.clone()),
    ] {
        for line in pem
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() > 16)
        {
            secrets.push((name.to_owned(), line.to_owned()));
        }
    }
    for (file, text) in [("log", &log), ("audit", &audit)] {
        for (name, secret) in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "the {name} appears in the {file}"
            );
        }
    }
}
