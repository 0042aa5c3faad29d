//! Everyone who should be turned away is, with SQLSTATE 28000 (or the right
//! code) and a message that says what to do; nothing is created upstream;
//! and the next good client still gets in.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use std::time::Duration;

use common::proxy::{
    role_prefix, roles_with_prefix, ProxyOptions, TestProxy, BILLING_ID, DATABASE, STRANGER_ID,
};
use common::{TestCa, TestCert};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Connect and expect a refusal; returns (SQLSTATE, message, hint).
async fn refused(
    proxy: &TestProxy,
    cert: Option<&TestCert>,
    template: &str,
    database: &str,
) -> (String, String, String) {
    match proxy.connect(cert, template, database).await {
        Ok(_) => panic!("connection as {template}/{database} was accepted"),
        Err(error) => {
            let db = error
                .as_db_error()
                .unwrap_or_else(|| panic!("expected an ErrorResponse, got {error:?}"));
            (
                db.code().code().to_owned(),
                db.message().to_owned(),
                db.hint().unwrap_or_default().to_owned(),
            )
        }
    }
}

async fn assert_good_client_gets_in(proxy: &TestProxy, template: &str) {
    let client = proxy
        .connect(Some(&proxy.svid(BILLING_ID)), template, DATABASE)
        .await
        .expect("the next good client is served");
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("query")
        .get(0);
    assert!(user.starts_with(&role_prefix(template)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_identities_are_refused_with_28000_and_create_nothing() {
    let template = "r_identity";
    let proxy = TestProxy::start(ProxyOptions::templates(&[template])).await;
    let ca = &proxy.files.svid_ca;
    let other_ca = TestCa::new("other-ca");
    let cases: Vec<(&str, Option<TestCert>, &str)> = vec![
        ("no certificate", None, "no client certificate"),
        (
            "another CA",
            Some(other_ca.svid(BILLING_ID)),
            "not signed by a CA",
        ),
        ("expired", Some(ca.svid_expired(BILLING_ID)), "expired"),
        (
            "not yet valid",
            Some(ca.svid_not_yet_valid(BILLING_ID)),
            "not valid yet",
        ),
        (
            "two URI SANs",
            Some(ca.svid_two_uris(BILLING_ID, "spiffe://example.org/other")),
            "2 URI SANs",
        ),
        (
            "CA certificate as leaf",
            Some(ca.ca_as_leaf(BILLING_ID)),
            "CA certificate",
        ),
        ("no URI SAN", Some(ca.leaf_without_uri_san()), "no URI SAN"),
        (
            "https URI",
            Some(ca.svid_https_uri("https://example.org/ns/prod/sa/billing")),
            "not a valid SPIFFE ID",
        ),
        (
            "other trust domain",
            Some(ca.svid("spiffe://evil.example/ns/prod/sa/billing")),
            "trust domain \"evil.example\" is not accepted",
        ),
        (
            "upper-case trust domain",
            Some(ca.svid_https_uri("spiffe://Example.org/ns/prod/sa/billing")),
            "not a valid SPIFFE ID",
        ),
        (
            "dot-dot segment",
            Some(ca.svid_https_uri("spiffe://example.org/ns/../sa/billing")),
            "not a valid SPIFFE ID",
        ),
        (
            "percent-encoding",
            Some(ca.svid_https_uri("spiffe://example.org/ns/prod%2Fsa/billing")),
            "not a valid SPIFFE ID",
        ),
        (
            "empty path segment",
            Some(ca.svid_https_uri("spiffe://example.org/ns//billing")),
            "not a valid SPIFFE ID",
        ),
        (
            "2 048-byte path",
            Some(ca.svid_https_uri(&format!("spiffe://example.org/{}", "a".repeat(2048)))),
            "not a valid SPIFFE ID",
        ),
        (
            "self-signed",
            Some(common::pki::self_signed_svid(BILLING_ID)),
            "not signed by a CA",
        ),
    ];
    for (case, cert, expected) in cases {
        let (code, message, hint) = refused(&proxy, cert.as_ref(), template, DATABASE).await;
        assert_eq!(code, "28000", "{case}: {message}");
        assert!(
            message.contains(expected),
            "{case}: {message:?} lacks {expected:?}"
        );
        assert!(!hint.is_empty(), "{case}: a hint says what to do");
    }
    assert!(roles_with_prefix(&role_prefix(template)).await.is_empty());
    assert_good_client_gets_in(&proxy, template).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_refusals_name_the_identity_and_the_alternatives() {
    let template = "r_policy";
    let proxy = TestProxy::start(ProxyOptions::templates(&[template, "r_policy_other"])).await;

    let (code, message, hint) =
        refused(&proxy, Some(&proxy.svid(STRANGER_ID)), template, DATABASE).await;
    assert_eq!(code, "28000");
    assert!(
        message.contains(STRANGER_ID) && message.contains(template),
        "{message}"
    );
    assert!(hint.contains("[[policy]]"), "{hint}");

    let (code, message, hint) = refused(
        &proxy,
        Some(&proxy.svid(BILLING_ID)),
        "no_such_template",
        DATABASE,
    )
    .await;
    assert_eq!(code, "28000");
    assert!(message.contains("no_such_template"), "{message}");
    assert!(hint.contains("r_policy, r_policy_other"), "{hint}");

    // A template name crafted to inject SQL is just an unknown template.
    let injection = "x\"; DROP ROLE postgres; --";
    let (code, message, _) =
        refused(&proxy, Some(&proxy.svid(BILLING_ID)), injection, DATABASE).await;
    assert_eq!(code, "28000");
    assert!(message.contains("no role template named"), "{message}");
    let still_there: i64 = common::cluster()
        .superuser("postgres")
        .await
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname = 'postgres'",
            &[],
        )
        .await
        .expect("query")
        .get(0);
    assert_eq!(still_there, 1);

    let (code, message, hint) =
        refused(&proxy, Some(&proxy.svid(BILLING_ID)), template, "postgres").await;
    assert_eq!(code, "28000");
    assert!(message.contains("\"billing\""), "{message}");
    assert_eq!(hint, "Connect with dbname=billing.");

    assert!(roles_with_prefix(&role_prefix(template)).await.is_empty());
    assert_good_client_gets_in(&proxy, template).await;
    proxy.shutdown().await;
}

/// Send raw bytes, return the first backend message (type, SQLSTATE, message).
async fn raw_exchange(proxy: &TestProxy, bytes: &[u8]) -> (u8, String, String) {
    let mut socket = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    socket.write_all(bytes).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut response))
        .await
        .expect("the proxy answers and closes")
        .expect("read");
    assert!(response.len() > 5, "an ErrorResponse, got {response:?}");
    let (code, message) = ephemera::session::protocol::error_fields(&response[5..]);
    (response[0], code, message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_gssenc_and_garbage_get_clear_errors() {
    let template = "r_wire";
    let proxy = TestProxy::start(ProxyOptions::templates(&[template])).await;

    let startup =
        ephemera::session::protocol::encode_startup(&[("user", template), ("database", DATABASE)]);
    let (kind, code, message) = raw_exchange(&proxy, &startup).await;
    assert_eq!((kind, code.as_str()), (b'E', "28000"), "{message}");
    assert!(message.contains("TLS"), "{message}");

    let gssenc = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
    let (kind, code, message) = raw_exchange(&proxy, &gssenc).await;
    assert_eq!((kind, code.as_str()), (b'E', "28000"), "{message}");
    assert!(message.contains("GSSAPI"), "{message}");

    let (kind, code, message) = raw_exchange(&proxy, &[0, 0, 0, 3, 1, 2, 3, 4]).await;
    assert_eq!((kind, code.as_str()), (b'E', "08P01"), "{message}");

    let (kind, code, message) = raw_exchange(&proxy, &[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0]).await;
    assert_eq!((kind, code.as_str()), (b'E', "08P01"), "{message}");

    let (kind, code, message) = raw_exchange(&proxy, &[0, 0, 0, 9, 0, 2, 0, 0, 0]).await;
    assert_eq!((kind, code.as_str()), (b'E', "0A000"), "{message}");

    assert_good_client_gets_in(&proxy, template).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_08006_naming_it_and_the_proxy_survives() {
    let template = "r_down";
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        listener.local_addr().expect("addr").port()
    };
    let mut options = ProxyOptions::templates(&[template]);
    options.upstream_port = Some(closed_port);
    let proxy = TestProxy::start(options).await;
    for _ in 0..2 {
        let (code, message, _) =
            refused(&proxy, Some(&proxy.svid(BILLING_ID)), template, DATABASE).await;
        assert_eq!(code, "08006", "{message}");
        assert!(
            message.contains(&format!("127.0.0.1:{closed_port}")),
            "{message}"
        );
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_at_the_handshake_timeout() {
    let template = "r_slow";
    let mut options = ProxyOptions::templates(&[template]);
    options.handshake_timeout = "500ms";
    let proxy = TestProxy::start(options).await;
    let mut silent = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    // Half a packet, then nothing.
    silent.write_all(&[0, 0, 0]).await.expect("write");
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the proxy closes a connection that stalls its handshake"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "closed by the timeout, not at once"
    );
    assert_good_client_gets_in(&proxy, template).await;
    proxy.shutdown().await;
}
