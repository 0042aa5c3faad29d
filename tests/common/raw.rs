//! The PostgreSQL protocol by hand, for tests that must send what no driver
//! would (a `Terminate` with the socket kept open, a cut-off COPY).

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::proxy::{TestProxy, DATABASE};
use super::{tls_client_config, TestCert};

/// Connect like libpq (SSLRequest, TLS with the SVID, StartupMessage) and
/// read up to the first ReadyForQuery.
pub async fn session(
    proxy: &TestProxy,
    cert: &TestCert,
    template: &str,
    application_name: &str,
) -> TlsStream<TcpStream> {
    session_with_greeting(proxy, cert, template, application_name)
        .await
        .0
}

/// [`session`], also returning the messages up to the first ReadyForQuery
/// (AuthenticationOk, ParameterStatus…, BackendKeyData).
pub async fn session_with_greeting(
    proxy: &TestProxy,
    cert: &TestCert,
    template: &str,
    application_name: &str,
) -> (TlsStream<TcpStream>, Vec<(u8, Vec<u8>)>) {
    let mut tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .expect("SSLRequest");
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.expect("SSL answer");
    assert_eq!(&answer, b"S");
    let config = tls_client_config(proxy.files.server_ca.cert_pem(), Some(cert));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("TLS");
    let mut body = Vec::new();
    body.extend_from_slice(&196608u32.to_be_bytes());
    for (k, v) in [
        ("user", template),
        ("database", DATABASE),
        ("application_name", application_name),
    ] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut startup = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    startup.extend_from_slice(&body);
    tls.write_all(&startup).await.expect("StartupMessage");
    let greeting = read_messages(&mut tls).await;
    (tls, greeting)
}

/// Read messages until one of type `wanted`; panics on an ErrorResponse.
pub async fn read_until(tls: &mut TlsStream<TcpStream>, wanted: u8) {
    loop {
        let (kind, body) = read_message(tls).await;
        match kind {
            b'E' => panic!("server error: {}", String::from_utf8_lossy(&body)),
            t if t == wanted => return,
            _ => {}
        }
    }
}

/// One backend message: its type and body.
pub async fn read_message(tls: &mut TlsStream<TcpStream>) -> (u8, Vec<u8>) {
    let mut header = [0u8; 5];
    tls.read_exact(&mut header).await.expect("a message");
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    tls.read_exact(&mut body).await.expect("a message body");
    (header[0], body)
}

pub fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

pub fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    message(b'Q', &body)
}

/// Read messages until ReadyForQuery; returns each message's type and body.
pub async fn read_messages(tls: &mut TlsStream<TcpStream>) -> Vec<(u8, Vec<u8>)> {
    let mut messages = Vec::new();
    loop {
        let (kind, body) = read_message(tls).await;
        messages.push((kind, body));
        if kind == b'Z' {
            return messages;
        }
    }
}
