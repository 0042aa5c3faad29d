//! Leases end to end: TTL and max TTL enforced on live sessions, admin
//! revocation, standalone credentials, the admin API's authorisation, the
//! audit log and metrics.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use std::time::{Duration, Instant};

use common::cluster;
use common::proxy::{
    admin_client, role_prefix, roles_with_prefix, wait_until_no_roles, ProxyOptions, TestProxy,
    ADMIN_ID, BILLING_ID, DATABASE, STRANGER_ID,
};
use ephemera::admin::api::{LeaseFilter, RevokeRequest};
use ephemera::admin::client::AdminClientError;
use ephemera_engine::LeaseState;

const REVOKEE_ID: &str = "spiffe://example.org/ns/prod/sa/revokee";

fn admin_options(templates: &[&str]) -> ProxyOptions {
    let mut options = ProxyOptions::templates(templates);
    options.admin_listen = Some("127.0.0.1:0".into());
    options
}

fn admin_of(proxy: &TestProxy, id: &str) -> ephemera::admin::client::AdminClient {
    let addr = proxy.admin_addr.expect("the admin API is configured");
    admin_client(&proxy.files, addr, &proxy.svid(id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_renews_a_live_session_until_max_ttl_ends_it() {
    let template = "l_ttl";
    let mut options = ProxyOptions::templates(&[template]);
    options.template_extra = "ttl = \"2s\"\nmax_ttl = \"4s\"".into();
    let proxy = TestProxy::start(options).await;
    let started = Instant::now();
    let client = proxy
        .connect(Some(&proxy.svid(BILLING_ID)), template, DATABASE)
        .await
        .expect("connects");
    client.simple_query("SELECT 1").await.expect("query");

    assert!(
        wait_until_no_roles(&role_prefix(template), Duration::from_secs(10)).await,
        "the role is dropped at max_ttl"
    );
    let lived = started.elapsed();
    assert!(
        lived >= Duration::from_millis(2500),
        "renewal kept the session past its 2 s TTL (it lived {lived:?}; lease times are whole seconds, so max_ttl ends it 3 to 4 s in)"
    );
    assert!(
        client.simple_query("SELECT 1").await.is_err(),
        "the session was terminated"
    );

    let events = proxy.files.audit_events();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert!(
        kinds.contains(&"lease_issued") && kinds.contains(&"login"),
        "{kinds:?}"
    );
    assert!(
        kinds.iter().filter(|k| **k == "renewed").count() >= 1,
        "{kinds:?}"
    );
    let expired = events
        .iter()
        .find(|e| e["event"] == "expired")
        .expect("an expired event");
    assert_eq!(expired["reason"], "max_ttl");
    assert_eq!(expired["identity"], BILLING_ID);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_by_identity_kills_the_session_and_drops_the_role() {
    let template = "l_revoke";
    // An identity of its own: revoking by identity acts on the whole ledger,
    // and other tests in this binary hold leases of BILLING_ID.
    let proxy = common::proxy::start_proxy_with_extra_config(
        admin_options(&[template]),
        &format!("[[policy]]\nspiffe_id = \"{REVOKEE_ID}\"\ntemplates = [\"{template}\"]"),
    )
    .await;
    let client = proxy
        .connect(Some(&proxy.svid(REVOKEE_ID)), template, DATABASE)
        .await
        .expect("connects");
    let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    let admin = admin_of(&proxy, ADMIN_ID);
    let deadline = Instant::now() + Duration::from_secs(5);
    while roles_with_prefix(&role_prefix(template)).await.is_empty() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let revoked = admin
        .revoke(RevokeRequest {
            identity: Some(REVOKEE_ID.into()),
            ..Default::default()
        })
        .await
        .expect("revoke");
    assert!(revoked.revoked >= 1);
    assert!(
        roles_with_prefix(&role_prefix(template)).await.is_empty(),
        "the role is gone when the call returns"
    );
    let error = tokio::time::timeout(Duration::from_secs(2), sleeper)
        .await
        .expect("the session ends at once")
        .expect("task")
        .expect_err("the query was terminated");
    assert_eq!(error.code().map(|c| c.code()), Some("57P01"), "{error:?}");

    let listed = admin
        .list_leases(&LeaseFilter {
            template: Some(template.into()),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, LeaseState::Revoked);
    assert!(listed[0]
        .end_reason
        .as_deref()
        .unwrap_or_default()
        .contains(ADMIN_ID));
    let audit = proxy.files.audit_events();
    assert!(audit
        .iter()
        .any(|e| e["event"] == "revoked" && e["actor"] == ADMIN_ID));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_credentials_log_in_directly_until_revoked() {
    let template = "l_creds";
    let proxy = TestProxy::start(admin_options(&[template])).await;
    let job = admin_of(&proxy, BILLING_ID);
    let creds = job
        .creds(template)
        .await
        .expect("an allowed identity gets credentials");
    assert!(creds.username.starts_with(&role_prefix(template)));
    assert_eq!(creds.database, DATABASE);
    assert!(
        !format!("{creds:?}").contains(&creds.password),
        "Debug redacts the password"
    );

    let c = cluster();
    let direct = c
        .connect(&creds.username, &creds.password, &creds.database)
        .await
        .expect("the credentials log in directly to PostgreSQL");
    let user: String = direct
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("query")
        .get(0);
    assert_eq!(user, creds.username);

    let admin = admin_of(&proxy, ADMIN_ID);
    let shown = admin.show_lease(creds.lease_id).await.expect("show");
    assert_eq!(shown.state, LeaseState::Active);
    let renewed = admin
        .renew_lease(creds.lease_id, Some(Duration::from_secs(120)))
        .await
        .expect("renew");
    let in_two_minutes = time::OffsetDateTime::now_utc() + time::Duration::seconds(120);
    assert!(
        renewed.expires_at <= in_two_minutes
            && renewed.expires_at >= in_two_minutes - time::Duration::seconds(10),
        "renewed to now + 120 s: {}",
        renewed.expires_at
    );
    let revoked = admin.revoke_lease(creds.lease_id).await.expect("revoke");
    assert_eq!(revoked.state, LeaseState::Revoked);

    assert!(
        direct.simple_query("SELECT 1").await.is_err(),
        "the open session is terminated"
    );
    let again = c
        .connect(&creds.username, &creds.password, &creds.database)
        .await;
    assert!(again.is_err(), "the credentials no longer log in");
    assert!(roles_with_prefix(&role_prefix(template)).await.is_empty());

    let stranger = admin_of(&proxy, STRANGER_ID);
    match stranger.creds(template).await {
        Err(AdminClientError::Api { status: 403, .. }) => {}
        other => panic!("a stranger gets 403, got {other:?}"),
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admin_identities_may_use_admin_endpoints() {
    let template = "l_authz";
    let proxy = TestProxy::start(admin_options(&[template])).await;
    let outsider = admin_of(&proxy, BILLING_ID);
    let id = uuid::Uuid::new_v4();
    let results: Vec<(&str, Result<(), AdminClientError>)> = vec![
        (
            "list",
            outsider
                .list_leases(&LeaseFilter::default())
                .await
                .map(drop),
        ),
        ("show", outsider.show_lease(id).await.map(drop)),
        ("renew", outsider.renew_lease(id, None).await.map(drop)),
        ("revoke lease", outsider.revoke_lease(id).await.map(drop)),
        (
            "revoke",
            outsider
                .revoke(RevokeRequest {
                    template: Some(template.into()),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        ("metrics", outsider.metrics().await.map(drop)),
    ];
    for (endpoint, result) in results {
        match result {
            Err(AdminClientError::Api {
                status: 403,
                message,
            }) => {
                assert!(message.contains(BILLING_ID), "{endpoint}: {message}")
            }
            other => panic!("{endpoint}: a non-admin SVID gets 403, got {other:?}"),
        }
    }
    outsider
        .health()
        .await
        .expect("healthz is open to any verified SVID");

    // Without a client certificate, TLS itself fails: no HTTP answer.
    let addr = proxy.admin_addr.expect("admin");
    let tls = common::tls_client_config(proxy.files.server_ca.cert_pem(), None);
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let outcome = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = connector
            .connect("localhost".try_into().expect("name"), tcp)
            .await?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        Ok::<Vec<u8>, std::io::Error>(buf)
    }
    .await;
    match outcome {
        Err(_) => {}
        Ok(bytes) => assert!(bytes.is_empty(), "no HTTP response without a certificate"),
    }

    // The admin can read metrics with the counters documented in telemetry.
    let client = proxy
        .connect(Some(&proxy.svid(BILLING_ID)), template, DATABASE)
        .await
        .expect("connects");
    client.simple_query("SELECT 1").await.expect("query");
    let _ = proxy
        .connect(Some(&proxy.svid(STRANGER_ID)), template, DATABASE)
        .await;
    let text = admin_of(&proxy, ADMIN_ID).metrics().await.expect("metrics");
    for name in [
        "ephemera_sessions_active",
        "ephemera_leases_issued_total",
        "ephemera_denials_total",
        "ephemera_handshake_seconds_bucket",
        "ephemera_role_creation_seconds_bucket",
        "ephemera_revocations_pending",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    drop(client);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_policy_ends_leases_at_their_next_renewal() {
    let template = "l_reload";
    let mut options = ProxyOptions::templates(&[template]);
    options.template_extra = "ttl = \"2s\"\nmax_ttl = \"1h\"".into();
    let proxy = TestProxy::start(options).await;
    let client = proxy
        .connect(Some(&proxy.svid(BILLING_ID)), template, DATABASE)
        .await
        .expect("connects");

    // The DBA takes the template away from the identity and reloads.
    let config = std::fs::read_to_string(&proxy.files.config_path).expect("config");
    let without = config.replace(
        &format!("spiffe_id = \"{BILLING_ID}\""),
        &format!("spiffe_id = \"{STRANGER_ID}\""),
    );
    assert_ne!(config, without);
    std::fs::write(&proxy.files.config_path, without).expect("write config");
    proxy
        .reloader
        .reload()
        .expect("the new configuration is valid");

    assert!(
        wait_until_no_roles(&role_prefix(template), Duration::from_secs(5)).await,
        "the lease ends at its next renewal (ttl/2 = 1 s)"
    );
    assert!(client.simple_query("SELECT 1").await.is_err());
    let audit = proxy.files.audit_events();
    assert!(
        audit
            .iter()
            .any(|e| e["event"] == "revoked" && e["reason"] == "policy_changed"),
        "{audit:?}"
    );
    // New sessions are refused by the new policy.
    assert!(proxy
        .connect(Some(&proxy.svid(BILLING_ID)), template, DATABASE)
        .await
        .is_err());
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_cannot_be_dropped_is_retried_and_reported_until_it_can() {
    let template = "l_stuck";
    let proxy = TestProxy::start(ProxyOptions::templates(&[template])).await;
    let client = proxy
        .connect(Some(&proxy.svid(BILLING_ID)), template, DATABASE)
        .await
        .expect("connects");
    let role: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("query")
        .get(0);
    // The role owns a database: no DROP OWNED removes that, so DROP ROLE
    // fails.
    cluster()
        .exec_sql(
            "postgres",
            &format!("CREATE DATABASE l_stuck_blocker OWNER \"{role}\""),
        )
        .await;
    drop(client);

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let failures = proxy
            .files
            .audit_events()
            .iter()
            .filter(|e| e["event"] == "revoke_failed" && e["role"] == role.as_str())
            .count();
        if failures >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "failed revocations are retried and audited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        roles_with_prefix(&role_prefix(template)).await,
        vec![role.clone()]
    );

    cluster()
        .exec_sql("postgres", "DROP DATABASE l_stuck_blocker")
        .await;
    assert!(
        wait_until_no_roles(&role_prefix(template), Duration::from_secs(10)).await,
        "once the blocker is gone, a retry drops the role"
    );
    proxy.shutdown().await;
}
