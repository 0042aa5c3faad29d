//! One HTTPS GET for a JSON document (a JWKS, an OIDC discovery document):
//! hyper's HTTP/1 client over tokio-rustls, with the ring provider the rest
//! of Ephemera uses. No redirects, a size limit and a deadline.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The largest document accepted.
const MAX_BODY_BYTES: usize = 1024 * 1024;
/// The whole request, connect to last byte.
const DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0:?} is not an https:// URL with a host")]
    BadUrl(String),
    #[error("could not connect: {0}")]
    Connect(std::io::Error),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("the server answered {0}")]
    Status(u16),
    #[error("the answer is not JSON: {0}")]
    Json(serde_json::Error),
    #[error("no answer within {DEADLINE:?}")]
    Timeout,
}

/// An `https://` URL's parts, checked.
pub fn parse_https(url: &str) -> Result<(Uri, String, u16), FetchError> {
    let bad = || FetchError::BadUrl(url.to_owned());
    let uri: Uri = url.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("https") {
        return Err(bad());
    }
    let host = uri.host().ok_or_else(bad)?.to_owned();
    let port = uri.port_u16().unwrap_or(443);
    Ok((uri, host, port))
}

/// GET `url` and parse the body as JSON.
pub async fn get_json(url: &str, tls: Arc<ClientConfig>) -> Result<serde_json::Value, FetchError> {
    tokio::time::timeout(DEADLINE, get(url, tls))
        .await
        .map_err(|_| FetchError::Timeout)?
}

async fn get(url: &str, tls: Arc<ClientConfig>) -> Result<serde_json::Value, FetchError> {
    let (uri, host, port) = parse_https(url)?;
    let bare_host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let server_name =
        ServerName::try_from(bare_host.clone()).map_err(|_| FetchError::BadUrl(url.to_owned()))?;
    let tcp = TcpStream::connect((bare_host.as_str(), port))
        .await
        .map_err(FetchError::Connect)?;
    let stream = TlsConnector::from(tls)
        .connect(server_name, tcp)
        .await
        .map_err(FetchError::Connect)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| FetchError::Http(e.to_string()))?;
    let driver = tokio::spawn(connection);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let authority = if port == 443 {
        host.clone()
    } else {
        format!("{host}:{port}")
    };
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::ACCEPT, "application/json")
        .header(hyper::header::USER_AGENT, "ephemera")
        .body(Empty::<Bytes>::new())
        .map_err(|e| FetchError::Http(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| FetchError::Http(e.to_string()))?;
    if !response.status().is_success() {
        driver.abort();
        return Err(FetchError::Status(response.status().as_u16()));
    }
    let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| FetchError::Http(e.to_string()))?
        .to_bytes();
    driver.abort();
    serde_json::from_slice(&body).map_err(FetchError::Json)
}
