//! The attacks of the issue-12 security review, replayed against a running
//! proxy: each test does what the reviewer did and checks that the promise
//! (SECURITY.md) now holds. Findings 1 (reaper election) and 5 (admin API
//! exhaustion) have test binaries of their own.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use std::time::{Duration, Instant};

use common::cluster;
use common::proxy::{
    role_prefix, roles_with_prefix, wait_until_no_roles, ProxyOptions, TestProxy, BILLING_ID,
    DATABASE,
};
use common::raw::{message, query, read_messages};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The one-column text rows of a simple query's answer.
fn rows(messages: &[(u8, Vec<u8>)]) -> Vec<String> {
    messages
        .iter()
        .filter(|(kind, _)| *kind == b'D')
        .map(|(_, body)| {
            // i16 column count, i32 length, the value.
            let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]) as usize;
            String::from_utf8_lossy(&body[6..6 + len]).into_owned()
        })
        .collect()
}

fn errors(messages: &[(u8, Vec<u8>)]) -> Vec<String> {
    messages
        .iter()
        .filter(|(kind, _)| *kind == b'E')
        .map(|(_, body)| String::from_utf8_lossy(body).into_owned())
        .collect()
}

async fn events(proxy: &TestProxy, event: &str, role: &str) -> Vec<serde_json::Value> {
    // The role's `revoked` is its last event; the writer is off-thread.
    let revoked = |events: &[serde_json::Value]| {
        events
            .iter()
            .any(|e| e["event"] == "revoked" && e["role"] == role)
    };
    proxy
        .files
        .audit_events_when(revoked)
        .await
        .into_iter()
        .filter(|e| e["event"] == event && e["role"] == role)
        .collect()
}

/// A session of [`BILLING_ID`] through the proxy, and its role's name.
async fn session_as_billing(proxy: &TestProxy, template: &str) -> (tokio_postgres::Client, String) {
    let session = proxy
        .connect(Some(&proxy.svid(BILLING_ID)), template, DATABASE)
        .await
        .expect("a session");
    let role: String = session
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("current_user")
        .get(0);
    (session, role)
}

/// A role the tests log in as directly, with a password (as any role with
/// CONNECT could).
async fn direct_role(name: &str) -> &'static str {
    cluster()
        .exec_sql(
            "postgres",
            &format!("CREATE ROLE {name} LOGIN PASSWORD 'review-{name}-pw'"),
        )
        .await;
    Box::leak(format!("review-{name}-pw").into_boxed_str())
}

/// Finding 3: `ALTER ROLE current_user PASSWORD`, a protocol Terminate with
/// the TLS socket kept open, then a direct login within the login window.
/// Now the login window closes right after Ephemera's own login, and the
/// session (and its lease) end as soon as the backend does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cannot_open_a_direct_connection_with_a_password_it_set() {
    let template = "r_direct";
    let proxy = TestProxy::start(ProxyOptions::templates(&[template])).await;
    let cert = proxy.svid(BILLING_ID);
    let mut tls = common::raw::session(&proxy, &cert, template, "review-direct").await;
    tls.write_all(&query(
        "ALTER ROLE current_user PASSWORD 'Attack3r-chosen-pw'; SELECT current_user::text",
    ))
    .await
    .unwrap();
    let answer = read_messages(&mut tls).await;
    assert!(errors(&answer).is_empty(), "{:?}", errors(&answer));
    let role = rows(&answer).pop().expect("current_user");
    // Terminate: the backend exits and frees CONNECTION LIMIT 1; the
    // client keeps its socket open.
    tls.write_all(&message(b'X', &[])).await.unwrap();
    tls.flush().await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match cluster()
            .connect(&role, "Attack3r-chosen-pw", DATABASE)
            .await
        {
            Ok(direct) => {
                let who: String = direct
                    .query_one("SELECT current_user::text", &[])
                    .await
                    .map(|r| r.get(0))
                    .unwrap_or_default();
                panic!("a direct login as {role} succeeded (current_user {who})");
            }
            Err(e) => {
                let e = e
                    .as_db_error()
                    .map(|d| d.message().to_owned())
                    .unwrap_or_else(|| e.to_string());
                assert!(
                    e.contains("password authentication failed")
                        || e.contains("too many connections"),
                    "{e}"
                );
            }
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The proxy closed the client's connection, whatever the client did.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(_)) | Ok(Err(_))),
        "the session is still open"
    );
    assert!(wait_until_no_roles(&role, Duration::from_secs(10)).await);
    proxy.shutdown().await;
}

/// Finding 2: with `owner`, a session plants a SECURITY DEFINER function, a
/// view, a materialized view, a rule, an expression index and a large
/// object; after the handover none of them runs with the owner's rights
/// (and each is named in the audit log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_a_session_leaves_runs_with_the_owners_rights_after_the_handover() {
    let template = "r_owner";
    common::proxy::upstream().await;
    cluster()
        .exec_sql(
            DATABASE,
            "CREATE TABLE owner_secret (x text);
             INSERT INTO owner_secret VALUES ('the owner''s secret');
             ALTER TABLE owner_secret OWNER TO billing_owner;
             GRANT CREATE ON SCHEMA public TO billing_owner;",
        )
        .await;
    let stranger_pw = direct_role("review_stranger").await;
    let mut options = ProxyOptions::templates(&[template]);
    options.template_extra = "owner = \"billing_owner\"\n".into();
    let proxy = TestProxy::start(options).await;
    let (session, role) = session_as_billing(&proxy, template).await;
    session
        .batch_execute(
            "CREATE FUNCTION public.grab_secret() RETURNS text LANGUAGE sql SECURITY DEFINER
                 AS $$ SELECT x FROM public.owner_secret $$;
             CREATE VIEW public.peek_secret AS SELECT x FROM public.owner_secret;
             GRANT SELECT ON public.peek_secret TO PUBLIC;
             CREATE MATERIALIZED VIEW public.mat_secret AS SELECT 1 AS one WITH NO DATA;
             GRANT SELECT ON public.mat_secret TO PUBLIC;
             CREATE TABLE public.trap (x text);
             CREATE RULE trap_rule AS ON INSERT TO public.trap DO ALSO
                 UPDATE public.owner_secret SET x = 'changed by a rule';
             CREATE FUNCTION public.idx_fn(integer) RETURNS integer LANGUAGE sql IMMUTABLE
                 AS 'SELECT $1';
             CREATE TABLE public.indexed (a integer);
             CREATE INDEX indexed_expr ON public.indexed ((public.idx_fn(a)));",
        )
        .await
        .expect("the session plants its objects");
    let lo: u32 = session
        .query_one("SELECT pg_catalog.lo_create(0)::oid", &[])
        .await
        .unwrap()
        .get(0);
    drop(session);
    assert!(
        wait_until_no_roles(&role, Duration::from_secs(15)).await,
        "{:?}",
        proxy.files.audit_events().last()
    );

    let stranger = cluster()
        .connect("review_stranger", stranger_pw, DATABASE)
        .await
        .expect("the stranger logs in");
    let grabbed = stranger.query_one("SELECT public.grab_secret()", &[]).await;
    assert!(
        grabbed.is_err(),
        "the function ran as the owner: {:?}",
        grabbed.map(|r| r.get::<_, String>(0))
    );
    let peeked = stranger
        .query("SELECT x FROM public.peek_secret", &[])
        .await;
    assert!(peeked.is_err(), "the view read with the owner's rights");

    let admin = cluster().superuser(DATABASE).await;
    let count = |sql: &'static str| {
        let admin = &admin;
        async move { admin.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(
        count("SELECT count(*) FROM pg_class WHERE relname IN ('mat_secret', 'indexed_expr')")
            .await,
        0,
        "the materialized view and the expression index are gone"
    );
    assert_eq!(
        count("SELECT count(*) FROM pg_rewrite WHERE rulename = 'trap_rule'").await,
        0
    );
    let los: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_largeobject_metadata WHERE oid = $1",
            &[&lo],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(los, 0, "the large object was not handed over");
    // The handover itself happened: the table is the owner's.
    let owner: String = admin
        .query_one(
            "SELECT pg_get_userbyid(relowner)::text FROM pg_class WHERE relname = 'trap'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, "billing_owner");

    let neutralised = events(&proxy, "object_neutralised", &role).await;
    let dropped = events(&proxy, "object_dropped", &role).await;
    let reasons: Vec<String> = neutralised
        .iter()
        .chain(&dropped)
        .map(|e| e["reason"].as_str().unwrap_or_default().to_owned())
        .collect();
    for name in [
        "grab_secret",
        "peek_secret",
        "mat_secret",
        "trap_rule",
        "indexed_expr",
        &format!("large object {lo}"),
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(name)),
            "no audit event names {name}: {reasons:?}"
        );
    }
    proxy.shutdown().await;
}

/// Finding 4: a grant to the victim's role in another database (here on a
/// large object, which any role can create) blocked DROP ROLE for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_from_another_database_does_not_make_a_role_undroppable() {
    let template = "r_xdb";
    let attacker_pw = direct_role("review_attacker").await;
    let proxy = TestProxy::start(ProxyOptions::templates(&[template])).await;
    let (victim, role) = session_as_billing(&proxy, template).await;
    let attacker = cluster()
        .connect("review_attacker", attacker_pw, "postgres")
        .await
        .expect("the attacker logs in to another database");
    attacker
        .batch_execute(&format!(
            "SELECT lo_create(424242); GRANT SELECT ON LARGE OBJECT 424242 TO \"{role}\";"
        ))
        .await
        .expect("any role can do this");
    drop(victim);
    assert!(
        wait_until_no_roles(&role, Duration::from_secs(15)).await,
        "the victim's role was dropped: {:?}",
        proxy.files.audit_events().last()
    );
    assert!(events(&proxy, "revoked", &role).await.len() == 1);
    proxy.shutdown().await;
}

/// A session that runs PREPARE TRANSACTION and ends: the prepared
/// transaction is rolled back (as the role) before the role is dropped,
/// instead of staying behind ownerless with its locks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_transaction_does_not_outlive_its_role() {
    let template = "r_twophase";
    let gid = "review-gid-'1'";
    let proxy = TestProxy::start(ProxyOptions::templates(&[template])).await;
    let (session, role) = session_as_billing(&proxy, template).await;
    session
        .batch_execute(
            "BEGIN; INSERT INTO invoices VALUES (4711, 1.00); PREPARE TRANSACTION 'review-gid-''1''';",
        )
        .await
        .expect("PREPARE TRANSACTION");
    drop(session);
    assert!(wait_until_no_roles(&role, Duration::from_secs(15)).await);
    let admin = cluster().superuser(DATABASE).await;
    let left: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_prepared_xacts WHERE gid = $1",
            &[&gid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the prepared transaction is gone");
    let rolled_back = events(&proxy, "prepared_transaction_rolled_back", &role).await;
    assert_eq!(rolled_back.len(), 1, "{rolled_back:?}");
    assert!(rolled_back[0]["reason"]
        .as_str()
        .unwrap_or_default()
        .contains("review-gid-'1'"));
    let inserted: i64 = admin
        .query_one("SELECT count(*) FROM invoices WHERE id = 4711", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(inserted, 0, "rolled back, not committed");
    proxy.shutdown().await;
}

/// The client is told the real backend pid (with Ephemera's own secret):
/// `pg_backend_pid()` agrees with BackendKeyData.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_key_data_carries_the_real_pid() {
    let template = "r_pid";
    let proxy = TestProxy::start(ProxyOptions::templates(&[template])).await;
    let cert = proxy.svid(BILLING_ID);
    let (mut tls, greeting) =
        common::raw::session_with_greeting(&proxy, &cert, template, "review-pid").await;
    let (_, key) = greeting
        .iter()
        .find(|(kind, _)| *kind == b'K')
        .expect("BackendKeyData");
    let told = i32::from_be_bytes([key[0], key[1], key[2], key[3]]);
    tls.write_all(&query("SELECT pg_backend_pid()::text"))
        .await
        .unwrap();
    let answer = read_messages(&mut tls).await;
    assert_eq!(rows(&answer), vec![told.to_string()]);
    // And the secret is not the server's: the server log has no way to
    // tell, but the cancel path needs ours (tests/it/cancel.rs).
    drop(tls);
    assert!(wait_until_no_roles(&role_prefix(template), Duration::from_secs(10)).await);
    assert!(roles_with_prefix(&role_prefix(template)).await.is_empty());
    proxy.shutdown().await;
}

/// Finding 6: a client without a certificate put ~10 KB in its startup
/// `user`, and every connection wrote it to the audit log and the process
/// log (300 connections, 3 MB). Now it is cut and escaped, and refusal
/// events are rate-limited per peer, with a count of what was left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_client_cannot_flood_the_audit_log() {
    let template = "r_flood";
    let proxy = TestProxy::start(ProxyOptions::templates(&[template])).await;
    let huge = format!("{}\u{1b}[2J", "u".repeat(9_000));
    for _ in 0..300 {
        let mut config = proxy.pg_config(&huge, DATABASE);
        config.connect_timeout(Duration::from_secs(10));
        let tls = common::make_tls_connect(proxy.files.server_ca.cert_pem(), None);
        let refused = config.connect(tls).await;
        assert!(refused.is_err(), "no certificate, no session");
    }
    let audit =
        std::fs::read_to_string(proxy.files.dir.path().join("audit.jsonl")).unwrap_or_default();
    let denied: Vec<serde_json::Value> = proxy
        .files
        .audit_events()
        .into_iter()
        .filter(|e| e["event"] == "denied")
        .collect();
    assert!(!denied.is_empty(), "refusals are still audited");
    assert!(
        denied.len() < 60,
        "{} refusal events for 300 refusals of one peer",
        denied.len()
    );
    assert!(
        audit.len() < 60_000,
        "the audit log grew by {} bytes",
        audit.len()
    );
    for event in &denied {
        let template = event["template"].as_str().unwrap_or_default();
        assert!(
            template.len() <= 100,
            "untruncated: {} bytes",
            template.len()
        );
        assert!(!template.contains('\u{1b}'), "control characters pass");
    }
    assert!(
        denied
            .iter()
            .any(|e| e["suppressed"].as_u64().unwrap_or(0) > 0),
        "a later event says how many were left out"
    );
    proxy.shutdown().await;
}

/// Finding 11: every session can read the ledger (`shobj_description` on
/// `pg_roles`). It now carries what the reaper and revoke-by-identity need,
/// and no client address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_a_session_can_read_carries_no_client_address() {
    let template = "r_ledger";
    let proxy = TestProxy::start(ProxyOptions::templates(&[template])).await;
    let other = proxy
        .connect(Some(&proxy.svid(BILLING_ID)), template, DATABASE)
        .await
        .expect("another identity's session");
    let reader = proxy
        .connect(Some(&proxy.svid(BILLING_ID)), template, DATABASE)
        .await
        .expect("the reading session");
    let comments: Vec<String> = reader
        .query(
            "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles \
             WHERE rolname LIKE 'eph\\_r\\_ledger\\_%' AND rolname <> current_user",
            &[],
        )
        .await
        .expect("any session can read the ledger")
        .iter()
        .filter_map(|row| row.get::<_, Option<String>>(0))
        .collect();
    assert!(!comments.is_empty(), "the other session's lease is there");
    for comment in &comments {
        let json: serde_json::Value = serde_json::from_str(comment).unwrap();
        assert!(json.get("client_addr").is_none(), "{comment}");
        assert!(!comment.contains("127.0.0.1"), "{comment}");
        assert!(
            json.get("expires_at").is_some(),
            "the reaper still has what it needs"
        );
    }
    drop((other, reader));
    assert!(wait_until_no_roles(&role_prefix(template), Duration::from_secs(10)).await);
    proxy.shutdown().await;
}

/// Async libpq clients hung on TLS records bigger than PostgreSQL's 8 KiB
/// of plaintext. A tap between client and proxy reads the records' headers
/// (type, version, length) towards the client: none carries more than
/// 8 KiB of plaintext (plus the AEAD overhead), even for a 100 KB row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_towards_the_client_carry_at_most_8_kib_as_postgresql_sends() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let template = "r_records";
    let proxy = TestProxy::start(ProxyOptions::templates(&[template])).await;
    let tap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tap_port = tap.local_addr().unwrap().port();
    let largest = Arc::new(AtomicUsize::new(0));
    let seen = largest.clone();
    let target = proxy.addr;
    tokio::spawn(async move {
        let (client, _) = tap.accept().await.unwrap();
        let server = tokio::net::TcpStream::connect(target).await.unwrap();
        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = server.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
        });
        // The SSLRequest's answer ('S'), then TLS records.
        let mut stream = Vec::new();
        let mut at = 1;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if client_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
            stream.extend_from_slice(&buf[..n]);
            while stream.len() >= at + 5 {
                let len = u16::from_be_bytes([stream[at + 3], stream[at + 4]]) as usize;
                seen.fetch_max(len, Ordering::SeqCst);
                at += 5 + len;
            }
        }
    });
    let mut config = tokio_postgres::Config::new();
    config
        .host("localhost")
        .hostaddr(std::net::Ipv4Addr::LOCALHOST.into())
        .port(tap_port)
        .user(template)
        .dbname(DATABASE)
        .ssl_mode(tokio_postgres::config::SslMode::Require);
    let tls = common::make_tls_connect(
        proxy.files.server_ca.cert_pem(),
        Some(&proxy.svid(BILLING_ID)),
    );
    let (client, connection) = config
        .connect(tls)
        .await
        .expect("a session through the tap");
    tokio::spawn(connection);
    let wide: String = client
        .query_one("SELECT repeat('x', 100000)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(wide.len(), 100_000);
    // TLS 1.3: plaintext + content type (1) + AEAD tag (16).
    let largest = largest.load(Ordering::SeqCst);
    assert!(
        largest <= 8192 + 256,
        "a record of {largest} bytes went to the client"
    );
    assert!(
        largest > 8000,
        "the tap saw the wide row's records ({largest})"
    );
    drop(client);
    proxy.shutdown().await;
}
