//! The admin API's error answers: whatever a client sends, it gets the
//! documented `{"error": "…"}` body (`ApiError`, docs/admin-api.yaml) with
//! a 4xx status, never a panic (empty reply) or axum's plain text, and the
//! server goes on serving.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use std::sync::Arc;

use common::proxy::{admin_client, ProxyOptions, TestProxy, ADMIN_ID, BILLING_ID};
use common::{tls_client_config, TestCert};
use ephemera::admin::api::ApiError;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn admin_options(templates: &[&str]) -> ProxyOptions {
    let mut options = ProxyOptions::templates(templates);
    options.admin_listen = Some("127.0.0.1:0".into());
    options
}

/// How long an answer (and the server closing the connection) may take.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// An HTTP answer as it came over the wire.
#[derive(Debug)]
struct RawAnswer {
    status: u16,
    content_type: Option<String>,
    body: Vec<u8>,
}

impl RawAnswer {
    /// The body as the documented `ApiError`; panics if it is anything else.
    fn api_error(&self) -> ApiError {
        assert_eq!(
            self.content_type.as_deref(),
            Some("application/json"),
            "an error answer is JSON: {self:?} {}",
            String::from_utf8_lossy(&self.body)
        );
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "the body is not an ApiError ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Send `head` (request line and headers, without the blank line that ends
/// them) and `body` to the admin API as `cert`, on a connection of its own
/// (`Connection: close`), and read the whole answer. Written by hand so the
/// test sees exactly what the server sends (status, content type, body).
async fn raw_request(proxy: &TestProxy, cert: &TestCert, head: &str, body: &[u8]) -> RawAnswer {
    let addr = proxy.admin_addr.expect("the admin API is configured");
    let config = tls_client_config(proxy.files.server_ca.cert_pem(), Some(cert));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the admin API");
    let mut tls = connector
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .expect("TLS handshake with the admin API");
    let mut request = format!("{head}\r\nHost: {addr}\r\nConnection: close\r\n\r\n").into_bytes();
    request.extend_from_slice(body);
    tls.write_all(&request).await.expect("send the request");
    tls.flush().await.expect("flush");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(ANSWER_TIMEOUT, tls.read_to_end(&mut answer)).await;
    match read {
        Ok(Ok(_)) => {}
        // A peer that closes without close_notify: keep what arrived.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Ok(Err(e)) => panic!("reading the answer: {e}"),
        Err(_) => panic!(
            "the connection was not closed within {ANSWER_TIMEOUT:?}; received: {:?}",
            String::from_utf8_lossy(&answer)
        ),
    }
    let text_end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "no HTTP answer (the connection closed after {} bytes: {:?})",
                answer.len(),
                String::from_utf8_lossy(&answer)
            )
        });
    let head = String::from_utf8_lossy(&answer[..text_end]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let content_type = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("content-type")
            .then(|| value.trim().to_owned())
    });
    RawAnswer {
        status,
        content_type,
        body: answer[text_end + 4..].to_vec(),
    }
}

/// POST `body` (JSON) to `path`.
async fn post_json(proxy: &TestProxy, cert: &TestCert, path: &str, body: &str) -> RawAnswer {
    let head = format!(
        "POST {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}",
        body.len()
    );
    raw_request(proxy, cert, &head, body.as_bytes()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_ttl_too_long_to_compute_is_a_json_400_and_the_server_goes_on() {
    let template = "ae_ttl";
    let proxy = TestProxy::start(admin_options(&[template])).await;
    let addr = proxy.admin_addr.expect("the admin API is configured");
    let creds = admin_client(&proxy.files, addr, &proxy.svid(BILLING_ID))
        .creds(template)
        .await
        .expect("a standalone lease to renew");
    let admin_cert = proxy.svid(ADMIN_ID);
    let path = format!("/v1/leases/{}/renew", creds.lease_id);

    // Past the year 9999: `now + ttl` cannot be represented (it panicked).
    let answer = post_json(&proxy, &admin_cert, &path, r#"{"ttl":"100000years"}"#).await;
    assert_eq!(answer.status, 400, "{answer:?}");
    let error = answer.api_error();
    assert!(error.error.contains("ttl"), "{error:?}");
    assert!(error.error.contains("10 years"), "{error:?}");

    // Representable, but past the documented maximum.
    let answer = post_json(&proxy, &admin_cert, &path, r#"{"ttl":"11y"}"#).await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(answer.api_error().error.contains("10 years"));

    // The server is still serving, and the lease can still be renewed.
    let admin = admin_client(&proxy.files, addr, &admin_cert);
    admin.health().await.expect("the admin API still answers");
    let renewed = admin
        .renew_lease(creds.lease_id, Some(std::time::Duration::from_secs(60)))
        .await
        .expect("a sensible renewal still works");
    assert_eq!(renewed.id, creds.lease_id);
    admin.revoke_lease(creds.lease_id).await.expect("revoke");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_size_limit_is_a_json_413() {
    let proxy = TestProxy::start(admin_options(&["ae_body"])).await;
    let admin_cert = proxy.svid(ADMIN_ID);
    // One byte over the limit: the server reads all of it before it answers,
    // so nothing unread is left to reset the connection.
    let too_long = vec![b' '; 2 * 1024 * 1024 + 1];
    for path in [
        "/v1/revoke".to_owned(),
        format!("/v1/leases/{}/renew", uuid::Uuid::new_v4()),
    ] {
        let head = format!(
            "POST {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}",
            too_long.len()
        );
        let answer = raw_request(&proxy, &admin_cert, &head, &too_long).await;
        assert_eq!(answer.status, 413, "{path}: {answer:?}");
        let error = answer.api_error();
        assert!(
            error.error.contains("larger than 2097152 bytes"),
            "{path}: {error:?}"
        );
    }
    let addr = proxy.admin_addr.expect("the admin API is configured");
    admin_client(&proxy.files, addr, &admin_cert)
        .health()
        .await
        .expect("the admin API still answers");
    proxy.shutdown().await;
}
