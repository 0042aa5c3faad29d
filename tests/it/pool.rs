//! Pooled leases (`pool = "session"`, issue 17): one role per identity,
//! backends reused across its connections and never across identities or
//! templates, nothing of one client's session reaching the next, and the
//! role gone at revocation or once the pool has idled out.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use std::time::{Duration, Instant};

use common::pki::{make_tls_connect, TestCert};
use common::proxy::{
    admin_client, role_prefix, roles_with_prefix, start_proxy_with_extra_config, ProxyOptions,
    TestProxy, ADMIN_ID, DATABASE,
};
use ephemera::admin::api::RevokeRequest;

/// Identities of this module's own: revoking by identity acts on the whole
/// ledger, and other tests hold leases of theirs.
const SHARE_A: &str = "spiffe://example.org/ns/pool/sa/share-a";
const SHARE_B: &str = "spiffe://example.org/ns/pool/sa/share-b";
const STATE_ID: &str = "spiffe://example.org/ns/pool/sa/state";
const REVOKE_ID: &str = "spiffe://example.org/ns/pool/sa/revoke";
const IDLE_ID: &str = "spiffe://example.org/ns/pool/sa/idle";
const BUSY_ID: &str = "spiffe://example.org/ns/pool/sa/busy";
const CANCEL_ID: &str = "spiffe://example.org/ns/pool/sa/cancel";
const EXPIRY_ID: &str = "spiffe://example.org/ns/pool/sa/expiry";
const AUDITED_ID: &str = "spiffe://example.org/ns/pool/sa/audited";
const DEAD_ID: &str = "spiffe://example.org/ns/pool/sa/dead";
const VANISH_ID: &str = "spiffe://example.org/ns/pool/sa/vanish";

const POOLED: &str = "pool = \"session\"\npool_size = 3\npool_idle_timeout = \"60s\"";

/// A proxy whose templates are all pooled, `ids` allowed all of them.
async fn pooled_proxy(templates: &[&str], ids: &[&str], admin: bool, extra: &str) -> TestProxy {
    let mut options = ProxyOptions::templates(templates);
    options.template_extra = POOLED.into();
    // Two session threads, handed sessions in turn: consecutive sessions
    // run on different threads, and still share idle backends.
    options.listen_extra = "workers = 2".into();
    if admin {
        options.admin_listen = Some("127.0.0.1:0".into());
    }
    let all: Vec<String> = templates.iter().map(|t| format!("\"{t}\"")).collect();
    let mut toml = String::from(extra);
    for id in ids {
        toml.push_str(&format!(
            "\n[[policy]]\nspiffe_id = \"{id}\"\ntemplates = [{}]\n",
            all.join(", ")
        ));
    }
    start_proxy_with_extra_config(options, &toml).await
}

/// A session through the proxy whose connection task the test holds (to
/// cut the connection without a `Terminate`).
struct Session {
    client: tokio_postgres::Client,
    connection: tokio::task::JoinHandle<()>,
}

async fn open(proxy: &TestProxy, cert: &TestCert, template: &str) -> Session {
    let tls = make_tls_connect(proxy.files.server_ca.cert_pem(), Some(cert));
    let (client, connection) = proxy
        .pg_config(template, DATABASE)
        .connect(tls)
        .await
        .unwrap_or_else(|e| panic!("{template} connects: {e}"));
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    Session { client, connection }
}

impl Session {
    async fn text(&self, sql: &str) -> String {
        let rows = self.client.simple_query(sql).await.unwrap();
        rows.iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => {
                    Some(row.get(0).unwrap_or("").to_owned())
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("{sql} returns a row"))
    }

    /// (`pg_backend_pid()`, `current_user`)
    async fn who(&self) -> (String, String) {
        let pid = self.text("SELECT pg_backend_pid()").await;
        (pid, self.text("SELECT current_user").await)
    }

    /// Leave with a `Terminate`, as a driver closing politely does.
    async fn close(self) {
        drop(self.client);
        let _ = self.connection.await;
    }

    /// Vanish without a `Terminate` (a crash, a killed process).
    async fn cut(self) {
        self.connection.abort();
        let _ = self.connection.await;
        drop(self.client);
    }
}

/// Wait for the `n`-th `session_end` event of `identity` (1-based) and
/// return its reason: the backend kept or closed.
async fn session_end(proxy: &TestProxy, identity: &str, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ends: Vec<String> = proxy
            .files
            .audit_events()
            .into_iter()
            .filter(|e| e["event"] == "session_end" && e["identity"] == identity)
            .map(|e| e["reason"].as_str().unwrap_or_default().to_owned())
            .collect();
        if let Some(reason) = ends.get(n - 1) {
            return reason.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no session_end #{n} for {identity}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_reuses_its_backend_and_role_and_nobody_else_sees_them() {
    let (template, other_template) = ("p_share", "p_share_other");
    let proxy = pooled_proxy(&[template, other_template], &[SHARE_A, SHARE_B], false, "").await;
    let (a, b) = (proxy.svid(SHARE_A), proxy.svid(SHARE_B));

    let first = open(&proxy, &a, template).await;
    let (pid, role) = first.who().await;
    assert!(role.starts_with(&role_prefix(template)), "{role}");
    first.close().await;
    assert_eq!(session_end(&proxy, SHARE_A, 1).await, "backend_kept");

    let second = open(&proxy, &a, template).await;
    assert_eq!(
        second.who().await,
        (pid.clone(), role.clone()),
        "the next session of the same identity gets the same backend and role"
    );
    assert_eq!(
        proxy.workers.accepted(),
        vec![1, 1],
        "the two sessions ran on different session threads"
    );
    let limit = second
        .text(&format!(
            "SELECT rolconnlimit FROM pg_roles WHERE rolname = '{role}'"
        ))
        .await;
    assert_eq!(limit, "3", "CONNECTION LIMIT is the pool size");

    // While `second` holds that backend, and after it gave it back: other
    // identities and other templates get backends and roles of their own.
    let stranger = open(&proxy, &b, template).await;
    let (stranger_pid, stranger_role) = stranger.who().await;
    assert_ne!(stranger_role, role, "another identity never gets the role");
    assert_ne!(stranger_pid, pid);
    second.close().await;
    assert_eq!(session_end(&proxy, SHARE_A, 2).await, "backend_kept");
    stranger.close().await;
    for _ in 0..2 {
        let other = open(&proxy, &b, template).await;
        let (other_pid, other_role) = other.who().await;
        assert_ne!(other_pid, pid, "another identity never gets the backend");
        assert_ne!(other_role, role);
        other.close().await;
        let other = open(&proxy, &a, other_template).await;
        let (other_pid, other_role) = other.who().await;
        assert_ne!(other_pid, pid, "another template never gets the backend");
        assert_ne!(other_role, role);
        assert!(other_role.starts_with(&role_prefix(other_template)));
        other.close().await;
    }
    let again = open(&proxy, &a, template).await;
    assert_eq!(again.who().await, (pid, role.clone()));
    again.close().await;
    // Its session_end (the fifth of SHARE_A's, two of them on the other
    // template) is written after everything asserted below.
    session_end(&proxy, SHARE_A, 5).await;

    let events = proxy.files.audit_events();
    let issued = events
        .iter()
        .filter(|e| e["event"] == "lease_issued" && e["role"] == role.as_str())
        .count();
    assert_eq!(issued, 1, "one lease for the pool");
    let starts = events
        .iter()
        .filter(|e| e["event"] == "session_start" && e["role"] == role.as_str())
        .count();
    assert_eq!(starts, 3, "a session_start per client");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_session_state_reaches_the_next_client_and_unfinished_backends_are_closed() {
    let template = "p_state";
    let proxy = pooled_proxy(&[template], &[STATE_ID], false, "").await;
    let cert = proxy.svid(STATE_ID);

    let dirty = open(&proxy, &cert, template).await;
    let (pid, role) = dirty.who().await;
    dirty
        .client
        .batch_execute(
            "CREATE TEMP TABLE p_state_secret (x int);
             PREPARE p_state_stmt AS SELECT 1;
             SET statement_timeout = '12345s';
             SET search_path = pg_temp, public;
             LISTEN p_state_channel;
             SELECT pg_advisory_lock(4242);
             SET ROLE billing_rw;",
        )
        .await
        .unwrap();
    assert_eq!(dirty.text("SELECT current_user").await, "billing_rw");
    dirty.close().await;
    assert_eq!(session_end(&proxy, STATE_ID, 1).await, "backend_kept");

    let next = open(&proxy, &cert, template).await;
    assert_eq!(
        next.who().await,
        (pid.clone(), role.clone()),
        "the same backend"
    );
    let checks = [
        ("SELECT to_regclass('pg_temp.p_state_secret') IS NULL", "t"),
        ("SELECT count(*) FROM pg_prepared_statements", "0"),
        ("SHOW statement_timeout", "0"),
        (
            "SELECT current_setting('search_path') LIKE '%pg_temp, public%'",
            "f",
        ),
        ("SELECT count(*) FROM pg_listening_channels()", "0"),
        (
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
            "0",
        ),
        ("SELECT current_user = session_user", "t"),
    ];
    for (sql, expected) in checks {
        assert_eq!(next.text(sql).await, expected, "{sql}");
    }

    // Mid-transaction: the backend is closed, not given back.
    next.client.batch_execute("BEGIN; SELECT 1").await.unwrap();
    next.close().await;
    assert_eq!(session_end(&proxy, STATE_ID, 2).await, "backend_closed");
    let after_transaction = open(&proxy, &cert, template).await;
    let (pid_2, role_2) = after_transaction.who().await;
    assert_ne!(
        pid_2, pid,
        "a backend left inside a transaction is never reused"
    );
    // Closing that backend left the pool with no client and no backend, so
    // the sweeper may have ended its lease meanwhile (a pool that is empty
    // lets its role go): the role is the pool's, old or newly minted.
    assert!(role_2.starts_with(&role_prefix(template)), "{role_2}");

    // Mid-COPY, cut without a Terminate: closed too.
    after_transaction
        .client
        .batch_execute("CREATE TEMP TABLE p_state_copy (x int)")
        .await
        .unwrap();
    let sink = after_transaction
        .client
        .copy_in::<_, bytes::Bytes>("COPY p_state_copy FROM STDIN")
        .await
        .unwrap();
    after_transaction.cut().await;
    drop(sink);
    assert_ne!(session_end(&proxy, STATE_ID, 3).await, "backend_kept");
    let after_copy = open(&proxy, &cert, template).await;
    let (pid_3, _) = after_copy.who().await;
    assert_ne!(pid_3, pid_2, "a backend left inside COPY is never reused");
    assert_ne!(pid_3, pid);
    after_copy.close().await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_by_identity_ends_every_pooled_backend_at_once_and_drops_the_role() {
    let template = "p_revoke";
    let proxy = pooled_proxy(&[template], &[REVOKE_ID], true, "").await;
    let cert = proxy.svid(REVOKE_ID);
    let prefix = role_prefix(template);

    // One backend idle in the pool, one idle in a session, one busy.
    let idle = open(&proxy, &cert, template).await;
    let (idle_pid, role) = idle.who().await;
    idle.close().await;
    assert_eq!(session_end(&proxy, REVOKE_ID, 1).await, "backend_kept");
    let waiting = open(&proxy, &cert, template).await;
    assert_eq!(waiting.who().await.0, idle_pid);
    let busy = open(&proxy, &cert, template).await;
    let (_, busy_role) = busy.who().await;
    assert_eq!(busy_role, role);
    let spare = open(&proxy, &cert, template).await;
    spare.close().await;
    assert_eq!(session_end(&proxy, REVOKE_ID, 2).await, "backend_kept");
    let sleeper = tokio::spawn(async move {
        let result = busy.client.simple_query("SELECT pg_sleep(30)").await;
        (result, busy)
    });
    let superuser = common::cluster().superuser("postgres").await;
    let backends_of = |role: String| {
        let superuser = &superuser;
        async move {
            superuser
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                    &[&role],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while backends_of(role.clone()).await < 3 {
        assert!(Instant::now() < deadline, "three backends of {role}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let admin = admin_client(
        &proxy.files,
        proxy.admin_addr.unwrap(),
        &proxy.svid(ADMIN_ID),
    );
    let text = admin.metrics().await.expect("metrics");
    for line in [
        "ephemera_pool_hits_total{template=\"p_revoke\"}",
        "ephemera_pool_misses_total{template=\"p_revoke\"}",
        "ephemera_pool_backends_idle{template=\"p_revoke\"} 1",
        "ephemera_pool_backends_active{template=\"p_revoke\"} 2",
    ] {
        assert!(text.contains(line), "{line} missing from /metrics:\n{text}");
    }
    let started = Instant::now();
    let revoked = admin
        .revoke(RevokeRequest {
            identity: Some(REVOKE_ID.into()),
            ..Default::default()
        })
        .await
        .expect("revoke");
    assert_eq!(revoked.revoked, 1, "one lease for the whole pool");
    let (result, _busy) = tokio::time::timeout(Duration::from_secs(1), sleeper)
        .await
        .expect("the busy session ends within a second")
        .unwrap();
    let error = result.expect_err("the busy query was terminated");
    assert_eq!(error.code().map(|c| c.code()), Some("57P01"), "{error:?}");
    assert!(
        waiting.client.simple_query("SELECT 1").await.is_err(),
        "the idle session was terminated"
    );
    let deadline = started + Duration::from_secs(1);
    while backends_of(role.clone()).await > 0 {
        assert!(
            Instant::now() < deadline,
            "no backend of the role is left within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        roles_with_prefix(&prefix).await.is_empty(),
        "the role is dropped"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "all of it within a second ({:?})",
        started.elapsed()
    );

    // The next client mints anew.
    let fresh = open(&proxy, &cert, template).await;
    let (_, fresh_role) = fresh.who().await;
    assert_ne!(fresh_role, role, "a new lease, a new role");
    fresh.close().await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pool_drops_its_role_after_pool_idle_timeout() {
    let template = "p_idle";
    let mut options = ProxyOptions::templates(&[template]);
    options.template_extra = "pool = \"session\"\npool_size = 2\npool_idle_timeout = \"1s\"".into();
    let policy = format!("[[policy]]\nspiffe_id = \"{IDLE_ID}\"\ntemplates = [\"{template}\"]");
    let proxy = start_proxy_with_extra_config(options, &policy).await;
    let cert = proxy.svid(IDLE_ID);
    let session = open(&proxy, &cert, template).await;
    let (_, role) = session.who().await;
    session.close().await;
    assert_eq!(session_end(&proxy, IDLE_ID, 1).await, "backend_kept");
    let idle_since = Instant::now();
    assert_eq!(
        roles_with_prefix(&role_prefix(template)).await,
        vec![role.clone()]
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !roles_with_prefix(&role_prefix(template)).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the role is dropped once the pool idled out"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        idle_since.elapsed() >= Duration::from_millis(900),
        "not before pool_idle_timeout ({:?})",
        idle_since.elapsed()
    );
    let events = proxy.files.audit_events();
    assert!(events
        .iter()
        .any(|e| e["event"] == "revoked" && e["role"] == role.as_str()));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_makes_clients_wait_then_refuses_them_with_53300() {
    let template = "p_busy";
    let mut options = ProxyOptions::templates(&[template]);
    options.template_extra = "pool = \"session\"\npool_size = 1\npool_wait = \"1s\"".into();
    let policy = format!("[[policy]]\nspiffe_id = \"{BUSY_ID}\"\ntemplates = [\"{template}\"]");
    let proxy = start_proxy_with_extra_config(options, &policy).await;
    let cert = proxy.svid(BUSY_ID);
    let holder = open(&proxy, &cert, template).await;
    let (pid, _) = holder.who().await;
    let tls = make_tls_connect(proxy.files.server_ca.cert_pem(), Some(&cert));
    let refused = proxy
        .pg_config(template, DATABASE)
        .connect(tls)
        .await
        .err()
        .expect("no backend came free");
    assert_eq!(
        refused.code().map(|c| c.code()),
        Some("53300"),
        "{refused:?}"
    );
    let message = refused.as_db_error().unwrap().message();
    assert!(message.contains("pool_size"), "{message}");

    // A waiting client gets the backend its holder gives back.
    let waiter = {
        let tls = make_tls_connect(proxy.files.server_ca.cert_pem(), Some(&cert));
        let config = proxy.pg_config(template, DATABASE);
        tokio::spawn(async move { config.connect(tls).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    holder.close().await;
    let (client, connection) = waiter.await.unwrap().expect("the waiter gets in");
    tokio::spawn(connection);
    let rows = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap();
    assert_eq!(rows.get::<_, i32>(0).to_string(), pid);
    drop(client);
    proxy.shutdown().await;
}

#[test]
fn pool_keys_are_checked_under_their_names() {
    let errors = crate::config::refused(
        r#"
[listen]
address = "127.0.0.1:5432"
[tls]
cert = "missing.pem"
key = "missing-key.pem"
trust_bundle = "missing-ca.pem"
trust_domains = ["example.org"]
[upstream]
host = "127.0.0.1"
port = 5432
admin_user = "ephemera_admin"
admin_password_file = "missing-password"
[templates.zero]
database = "billing"
pool = "session"
pool_size = 0
reset_query = ""
[templates.bogus]
database = "billing"
pool = "transaction"
[templates.unpooled]
database = "billing"
pool_idle_timeout = "10s"
[[policy]]
spiffe_id = "spiffe://example.org/x"
templates = ["zero"]
"#,
    );
    let keys: Vec<&str> = errors.problems.iter().map(|p| p.key.as_str()).collect();
    for key in [
        "templates.zero.pool_size",
        "templates.zero.reset_query",
        "templates.bogus.pool",
        "templates.unpooled.pool_idle_timeout",
    ] {
        assert!(keys.contains(&key), "{key} not reported: {errors}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_clients_share_one_lease_and_cancel_keys_follow_the_backend() {
    let template = "p_cancel";
    let proxy = pooled_proxy(&[template], &[CANCEL_ID], false, "").await;
    let cert = proxy.svid(CANCEL_ID);

    // Three clients at once, the pool empty: one lease, three backends.
    let (one, two, three) = tokio::join!(
        open(&proxy, &cert, template),
        open(&proxy, &cert, template),
        open(&proxy, &cert, template)
    );
    let roles = [one.who().await.1, two.who().await.1, three.who().await.1];
    assert!(roles.iter().all(|r| *r == roles[0]), "{roles:?}");
    let issued = proxy
        .files
        .audit_events()
        .iter()
        .filter(|e| e["event"] == "lease_issued" && e["identity"] == CANCEL_ID)
        .count();
    assert_eq!(issued, 1, "one mint for concurrent first clients");
    let old_token = one.client.cancel_token();
    let (pid, _) = one.who().await;
    one.close().await;
    two.close().await;
    three.close().await;
    for n in 1..=3 {
        assert_eq!(session_end(&proxy, CANCEL_ID, n).await, "backend_kept");
    }

    // Whoever gets that backend next has a cancel key of its own; the old
    // client's key no longer reaches it.
    let mut next = open(&proxy, &cert, template).await;
    let mut tries = 0;
    while next.who().await.0 != pid {
        tries += 1;
        assert!(tries < 10, "the backend of pid {pid} is lent again");
        // Another of the three idle backends: keep this one busy, try again.
        let held = next;
        next = open(&proxy, &cert, template).await;
        drop(held);
    }
    let tls = || make_tls_connect(proxy.files.server_ca.cert_pem(), Some(&cert));
    let token = next.client.cancel_token();
    let sleeper = tokio::spawn(async move {
        let result = next.client.simple_query("SELECT pg_sleep(30)").await;
        (result, next)
    });
    let superuser = common::cluster().superuser("postgres").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let sleeping: i64 = superuser
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND query LIKE 'SELECT pg_sleep%'",
                &[&pid.parse::<i32>().unwrap()],
            )
            .await
            .unwrap()
            .get(0);
        if sleeping == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the sleep runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    old_token.cancel_query(tls()).await.unwrap();
    token.cancel_query(tls()).await.unwrap();
    let (result, _next) = tokio::time::timeout(Duration::from_secs(5), sleeper)
        .await
        .expect("cancelled")
        .unwrap();
    let error = result.expect_err("the sleep was cancelled");
    assert_eq!(error.code().map(|c| c.code()), Some("57014"), "{error:?}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_svid_expires_first_is_ended_then_and_the_pool_goes_on() {
    let template = "p_expiry";
    let proxy = pooled_proxy(&[template], &[EXPIRY_ID], false, "").await;
    let long = proxy.svid(EXPIRY_ID);
    let first = open(&proxy, &long, template).await;
    let (first_pid, role) = first.who().await;

    let mut params = common::pki::svid_params(EXPIRY_ID);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::seconds(3);
    let short = proxy
        .files
        .svid_ca
        .issue(format!("short svid {EXPIRY_ID}"), &params);
    let brief = open(&proxy, &short, template).await;
    let (brief_pid, brief_role) = brief.who().await;
    assert_eq!(brief_role, role, "the same pool");
    let started = Instant::now();
    let error = tokio::time::timeout(
        Duration::from_secs(10),
        brief.client.simple_query("SELECT pg_sleep(30)"),
    )
    .await
    .expect("the session ends when its SVID expires")
    .expect_err("terminated");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(error.code().map(|c| c.code()), Some("57P01"), "{error:?}");
    assert_eq!(
        first.who().await,
        (first_pid, role.clone()),
        "the pool goes on"
    );
    let after = open(&proxy, &long, template).await;
    let (after_pid, after_role) = after.who().await;
    assert_eq!(after_role, role);
    assert_ne!(
        after_pid, brief_pid,
        "the expired client's backend was not kept"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_sessions_are_audited_statement_by_statement() {
    let template = "p_audited";
    let mut options = ProxyOptions::templates(&[template]);
    options.template_extra = format!("{POOLED}\naudit_statements = true");
    let policy = format!("[[policy]]\nspiffe_id = \"{AUDITED_ID}\"\ntemplates = [\"{template}\"]");
    let proxy = start_proxy_with_extra_config(options, &policy).await;
    let cert = proxy.svid(AUDITED_ID);
    let first = open(&proxy, &cert, template).await;
    let (pid, _) = first.who().await;
    first
        .client
        .simple_query("SELECT 'first client'")
        .await
        .unwrap();
    first.close().await;
    assert_eq!(session_end(&proxy, AUDITED_ID, 1).await, "backend_kept");
    let second = open(&proxy, &cert, template).await;
    assert_eq!(second.who().await.0, pid);
    second
        .client
        .query("SELECT $1::text", &[&"second client"])
        .await
        .unwrap();
    second.close().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let statements: Vec<String> = proxy
            .files
            .audit_events()
            .into_iter()
            .filter(|e| e["event"] == "statement" && e["identity"] == AUDITED_ID)
            .filter_map(|e| e["statement"].as_str().map(str::to_owned))
            .collect();
        let wanted = ["SELECT 'first client'", "SELECT $1::text"];
        if wanted.iter().all(|w| statements.iter().any(|s| s == w)) {
            assert!(
                !statements.iter().any(|s| s.contains("DISCARD")),
                "the reset is Ephemera's, not a client's statement: {statements:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{statements:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_backend_postgresql_closed_is_never_lent() {
    let template = "p_dead";
    let proxy = pooled_proxy(&[template], &[DEAD_ID], false, "").await;
    let cert = proxy.svid(DEAD_ID);
    let first = open(&proxy, &cert, template).await;
    let (pid, role) = first.who().await;
    first.close().await;
    assert_eq!(session_end(&proxy, DEAD_ID, 1).await, "backend_kept");
    let superuser = common::cluster().superuser("postgres").await;
    let pid_number: i32 = pid.parse().unwrap();
    superuser
        .execute("SELECT pg_terminate_backend($1, 5000)", &[&pid_number])
        .await
        .unwrap();
    let next = open(&proxy, &cert, template).await;
    let (next_pid, next_role) = next.who().await;
    assert_ne!(next_pid, pid, "a new backend");
    assert_eq!(next_role, role, "of the same pool");
    next.close().await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_while_idle_gives_its_backend_back() {
    let template = "p_vanish";
    let proxy = pooled_proxy(&[template], &[VANISH_ID], false, "").await;
    let cert = proxy.svid(VANISH_ID);
    let crashing = open(&proxy, &cert, template).await;
    let (pid, role) = crashing.who().await;
    crashing
        .client
        .batch_execute("SET statement_timeout = '4242s'")
        .await
        .unwrap();
    // Its connection dies without a Terminate (a crash): the backend was
    // idle, so it is reset and kept all the same.
    crashing.cut().await;
    assert_eq!(session_end(&proxy, VANISH_ID, 1).await, "backend_kept");
    let next = open(&proxy, &cert, template).await;
    assert_eq!(next.who().await, (pid, role));
    assert_eq!(next.text("SHOW statement_timeout").await, "0");
    next.close().await;
    proxy.shutdown().await;
}
