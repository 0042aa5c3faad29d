//! Where the admin API is ([`Endpoint`], parsed from its URL), and one
//! request on a fresh TCP + TLS connection ([`exchange`]).

use std::error::Error as StdError;
use std::net::IpAddr;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{header, Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::error::{error_chain, AdminClientError};
use crate::identity::token::BearerToken;

/// The largest answer body read (the `/metrics` text is the biggest answer;
/// a lease list of tens of thousands of leases stays far below this).
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// Where the admin API is: the parts of an `https://HOST[:PORT]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Endpoint {
    /// Host to connect to, without IPv6 brackets (`127.0.0.1`, `::1`, `admin.example`).
    pub(super) host: String,
    pub(super) port: u16,
    /// `HOST:PORT` as written in the URL (IPv6 in brackets): the `Host`
    /// header and how errors name the server.
    pub(super) authority: String,
    /// The name the server certificate must carry (an IP or DNS SAN).
    pub(super) server_name: ServerName<'static>,
}

impl Endpoint {
    pub(super) fn parse(url: &str) -> Result<Endpoint, AdminClientError> {
        let bad = |reason: &str| AdminClientError::BadUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = url
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| bad(&format!("not a URL ({e})")))?;
        match uri.scheme_str() {
            Some("https") => {}
            Some(_) => {
                return Err(bad(
                    "only https:// is supported (the admin API requires mutual TLS)",
                ))
            }
            None => return Err(bad("missing the https:// scheme")),
        }
        let authority = uri.authority().ok_or_else(|| bad("missing the host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user information (user@) is not supported"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("give only scheme, host and port, no path or query"));
        }
        // `Uri::host` keeps the brackets of an IPv6 literal.
        let host = authority.host();
        let bare_host = host.trim_start_matches('[').trim_end_matches(']');
        if bare_host.is_empty() {
            return Err(bad("missing the host"));
        }
        let port = authority.port_u16().unwrap_or(443);
        let server_name = match bare_host.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(bare_host.to_owned())
                .map_err(|_| bad("the host is neither an IP address nor a valid DNS name"))?,
        };
        Ok(Endpoint {
            host: bare_host.to_owned(),
            port,
            authority: format!("{host}:{port}"),
            server_name,
        })
    }
}

/// Connect, handshake, send one request, and read the whole answer.
pub(super) async fn exchange(
    endpoint: &Endpoint,
    tls: &TlsConnector,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    bearer: Option<&BearerToken>,
) -> Result<(StatusCode, Bytes), AdminClientError> {
    let stream = connect(endpoint, tls).await?;
    let addr = &endpoint.authority;
    let http_error = |e: &dyn StdError| AdminClientError::Http {
        addr: addr.clone(),
        reason: error_chain(e),
    };

    // hyper's low-level client: `sender` sends requests, `connection`
    // does the I/O and must be polled, so it runs in its own task. It
    // finishes by itself once the answer is read and `sender` is dropped.
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http_error(&e))?;
    let connection = tokio::spawn(connection);

    let request = request(addr, method, path, body, bearer).map_err(|e| http_error(&e))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| http_error(&e))?;
    let status = response.status();
    let bytes = Limited::new(response.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| http_error(&*e))?
        .to_bytes();

    drop(sender);
    // The answer is complete; whatever the connection task reports now
    // (e.g. a missing TLS close_notify) does not matter.
    connection.abort();
    Ok((status, bytes))
}

/// A TCP connection to `endpoint` with the TLS handshake done.
async fn connect(
    endpoint: &Endpoint,
    tls: &TlsConnector,
) -> Result<TlsStream<TcpStream>, AdminClientError> {
    let addr = &endpoint.authority;
    let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|e| AdminClientError::Connect {
            addr: addr.clone(),
            reason: error_chain(&e),
        })?;
    tls.connect(endpoint.server_name.clone(), tcp)
        .await
        .map_err(|e| AdminClientError::Tls {
            addr: addr.clone(),
            reason: error_chain(&e),
        })
}

/// The HTTP/1.1 request for `method path` to the server at `addr`, with a
/// JSON `body` if there is one.
fn request(
    addr: &str,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    bearer: Option<&BearerToken>,
) -> Result<Request<Full<Bytes>>, hyper::http::Error> {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, addr)
        .header(header::ACCEPT, "application/json")
        .header(
            header::USER_AGENT,
            concat!("ephemera/", env!("CARGO_PKG_VERSION")),
        );
    if body.is_some() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    if let Some(token) = bearer {
        let mut value = hyper::header::HeaderValue::try_from(format!("Bearer {}", token.expose()))?;
        value.set_sensitive(true);
        request = request.header(header::AUTHORIZATION, value);
    }
    request.body(Full::new(Bytes::from(body.unwrap_or_default())))
}
