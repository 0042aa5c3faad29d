//! A client for Ephemera's admin API (HTTP/1.1 + JSON over mutual TLS), used
//! by the `ephemera leases|revoke|creds` commands.
//!
//! The JSON shapes are the ones in [`crate::admin::api`]; the endpoints are
//! listed there and described in `docs/admin-api.yaml`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ephemera::admin::client::AdminClientError> {
//! use ephemera::admin::api::LeaseFilter;
//! use ephemera::admin::client::AdminClient;
//!
//! let client = AdminClient::from_files(
//!     "https://127.0.0.1:8443",
//!     "svid.pem".as_ref(),
//!     "svid-key.pem".as_ref(),
//!     "ca.pem".as_ref(),
//! )?;
//! for lease in client.list_leases(&LeaseFilter::default()).await? {
//!     println!("{} {}", lease.id, lease.role);
//! }
//! # Ok(()) }
//! ```
//!
//! How a request travels: [`AdminClient`] opens a fresh TCP connection for
//! every request, does the TLS handshake presenting the caller's X.509-SVID
//! (client certificate) and checking the server's certificate against the
//! given CA, then sends one HTTP/1.1 request with hyper's low-level client
//! connection API and reads the whole answer. Admin commands are rare, so the
//! simplicity is worth more than connection reuse.
//!
//! Secrets: the private key is handed to rustls and never printed, and
//! [`Credentials`]' `Debug` redacts the password. Error messages name files
//! and addresses, never file contents.

use std::error::Error as StdError;
use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{header, Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::admin::api::{
    ApiError, Credentials, Health, LeaseFilter, LeaseList, LeaseView, RenewRequest, RevokeRequest,
    RevokeResponse,
};
use ephemera_engine::{LeaseId, LeaseState};

/// How long one request (connect, handshake, request and answer) may take
/// unless [`AdminClient::with_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest answer body read (the `/metrics` text is the biggest answer;
/// a lease list of tens of thousands of leases stays far below this).
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// How much of a non-JSON error body is quoted in an error message.
const MAX_ERROR_TEXT: usize = 1000;

/// Everything that can go wrong talking to the admin API. Each message says
/// what failed and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    /// The admin URL is not `https://HOST[:PORT]`.
    #[error(
        "invalid admin API URL {url:?}: {reason}; expected something like https://127.0.0.1:8443"
    )]
    BadUrl { url: String, reason: String },

    /// The client certificate (chain) file could not be read or parsed.
    #[error("cannot read the client certificate {}: {reason}; pass your X.509-SVID (PEM, leaf first) with --cert or EPHEMERA_CERT", path.display())]
    ReadCert { path: PathBuf, reason: String },

    /// The private key file could not be read or parsed. `reason` never
    /// contains any of the file's contents.
    #[error("cannot read the private key {}: {reason}; pass the SVID's private key (PEM: PKCS#8, PKCS#1 or SEC1) with --key or EPHEMERA_KEY", path.display())]
    ReadKey { path: PathBuf, reason: String },

    /// The CA bundle file could not be read or parsed.
    #[error("cannot read the CA bundle {}: {reason}; pass the CA certificate(s) that issued the admin API's server certificate (PEM) with --ca or EPHEMERA_CA", path.display())]
    ReadCa { path: PathBuf, reason: String },

    /// rustls refused the certificates or key (e.g. the key does not match
    /// the certificate, or no CA certificate was usable).
    #[error("cannot set up TLS for the admin API: {0}")]
    TlsConfig(String),

    /// The TCP connection could not be opened.
    #[error("cannot connect to the admin API at {addr}: {reason}; is `ephemera serve` running with its admin API listening there?")]
    Connect { addr: String, reason: String },

    /// The TLS handshake failed (server certificate not trusted, wrong name,
    /// or the server refused the client certificate).
    #[error("TLS handshake with the admin API at {addr} failed: {reason}; check that --ca holds the CA that issued the server's certificate, that the certificate names the URL's host, and that --cert is an SVID the server trusts")]
    Tls { addr: String, reason: String },

    /// The connection broke during the HTTP exchange. With TLS 1.3 this is
    /// also how a server's refusal of the client certificate shows up.
    #[error("the exchange with the admin API at {addr} failed: {reason}; if the server refused the client certificate, check that --cert/--key are a current X.509-SVID from a trust domain the server accepts")]
    Http { addr: String, reason: String },

    /// The request did not finish in time.
    #[error("the admin API at {addr} did not answer within {}; check that the address is the admin listener (not the PostgreSQL port)", humantime::format_duration(*timeout))]
    Timeout { addr: String, timeout: Duration },

    /// The server answered with an error status. `message` is the server's
    /// [`ApiError`] text (or the body text if the body was not an `ApiError`).
    #[error("{}", api_error_text(*status, message))]
    Api { status: u16, message: String },

    /// A success answer whose body was not what the API promises.
    #[error("unexpected answer from the admin API to {request}: {reason}; are client and server the same Ephemera version?")]
    Decode { request: String, reason: String },
}

/// The user-facing text of [`AdminClientError::Api`]: the server's message
/// plus a hint depending on the status.
fn api_error_text(status: u16, message: &str) -> String {
    match status {
        400 => format!("the admin API rejected the request (400): {message}; check the arguments"),
        401 | 403 => {
            // The server's own refusal may already say where admins are listed.
            let hint = if message.contains("[admin] identities") {
                ""
            } else {
                "; use an SVID listed in [admin] identities (for `creds`: one that a \
                 [[policy]] rule gives the template)"
            };
            format!("the admin API refused this identity ({status}): {message}{hint}")
        }
        404 => format!("not found (404): {message}"),
        409 => format!("the admin API cannot do that now (409): {message}"),
        429 => format!("the admin API is limiting this identity (429): {message}"),
        503 => format!(
            "the admin API is unavailable (503): {message}; try again shortly or check the server's log"
        ),
        _ => format!("the admin API answered {status}: {message}"),
    }
}

/// Where the admin API is: the parts of an `https://HOST[:PORT]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    /// Host to connect to, without IPv6 brackets (`127.0.0.1`, `::1`, `admin.example`).
    host: String,
    port: u16,
    /// `HOST:PORT` as written in the URL (IPv6 in brackets): the `Host`
    /// header and how errors name the server.
    authority: String,
    /// The name the server certificate must carry (an IP or DNS SAN).
    server_name: ServerName<'static>,
}

impl Endpoint {
    fn parse(url: &str) -> Result<Endpoint, AdminClientError> {
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

/// A client of one Ephemera admin API, authenticating with one X.509-SVID.
///
/// Cheap to clone; each request uses its own connection.
#[derive(Clone)]
pub struct AdminClient {
    endpoint: Endpoint,
    tls: TlsConnector,
    timeout: Duration,
}

impl fmt::Debug for AdminClient {
    // Deliberately shows only where it connects: the TLS configuration holds
    // the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminClient")
            .field("url", &format_args!("https://{}", self.endpoint.authority))
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    /// A client for the admin API at `url` (`https://HOST[:PORT]`, port 443
    /// by default; HOST an IP address or DNS name) that presents
    /// `cert_chain` (the SVID, leaf first, then any intermediates) with `key`,
    /// and trusts a server certificate that chains to one of `server_ca` and
    /// names HOST.
    pub fn new(
        url: &str,
        cert_chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        server_ca: Vec<CertificateDer<'static>>,
    ) -> Result<AdminClient, AdminClientError> {
        let endpoint = Endpoint::parse(url)?;

        let mut roots = rustls::RootCertStore::empty();
        let (_added, ignored) = roots.add_parsable_certificates(server_ca);
        if roots.is_empty() {
            return Err(AdminClientError::TlsConfig(format!(
                "no usable CA certificate for the server ({ignored} could not be parsed); \
                 --ca must hold the CA certificate(s) that issued the admin API's certificate"
            )));
        }
        if cert_chain.is_empty() {
            return Err(AdminClientError::TlsConfig(
                "the client certificate chain is empty; --cert must hold your X.509-SVID".into(),
            ));
        }

        // The ring provider explicitly: never depend on a process-wide default.
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| AdminClientError::TlsConfig(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(cert_chain, key)
        .map_err(|e| {
            AdminClientError::TlsConfig(format!(
                "the client certificate and key are not usable together ({e}); \
                 check that --key is the private key of --cert"
            ))
        })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];

        Ok(AdminClient {
            endpoint,
            tls: TlsConnector::from(Arc::new(config)),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Like [`AdminClient::new`], reading PEM files: `cert_path` the SVID
    /// (leaf first, intermediates after it), `key_path` its private key,
    /// `ca_path` the CA certificate(s) for the server.
    pub fn from_files(
        url: &str,
        cert_path: &Path,
        key_path: &Path,
        ca_path: &Path,
    ) -> Result<AdminClient, AdminClientError> {
        // Check the URL first: a typo there is the cheapest mistake to report.
        Endpoint::parse(url)?;

        let cert_chain =
            read_certificates(cert_path).map_err(|reason| AdminClientError::ReadCert {
                path: cert_path.to_owned(),
                reason,
            })?;
        let key =
            PrivateKeyDer::from_pem_file(key_path).map_err(|e| AdminClientError::ReadKey {
                path: key_path.to_owned(),
                reason: describe_pem_error(&e, "PRIVATE KEY"),
            })?;
        let server_ca = read_certificates(ca_path).map_err(|reason| AdminClientError::ReadCa {
            path: ca_path.to_owned(),
            reason,
        })?;
        AdminClient::new(url, cert_chain, key, server_ca)
    }

    /// How long each request may take in all (default [`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> AdminClient {
        self.timeout = timeout;
        self
    }

    /// The admin API's base URL, normalised (`https://HOST:PORT`).
    pub fn url(&self) -> String {
        format!("https://{}", self.endpoint.authority)
    }

    // ----- the endpoints ----------------------------------------------------

    /// `GET /v1/leases`: the leases matching every filter given.
    pub async fn list_leases(
        &self,
        filter: &LeaseFilter,
    ) -> Result<Vec<LeaseView>, AdminClientError> {
        let path = format!("/v1/leases{}", lease_query(filter));
        let list: LeaseList = self.call_json(Method::GET, &path, None).await?;
        Ok(list.leases)
    }

    /// `GET /v1/leases/{id}`: one lease.
    pub async fn show_lease(&self, id: LeaseId) -> Result<LeaseView, AdminClientError> {
        self.call_json(Method::GET, &format!("/v1/leases/{id}"), None)
            .await
    }

    /// `POST /v1/leases/{id}/renew`: extend a lease to `ttl` from now (the
    /// template's `ttl` if `None`), never past its maximum.
    pub async fn renew_lease(
        &self,
        id: LeaseId,
        ttl: Option<Duration>,
    ) -> Result<LeaseView, AdminClientError> {
        let body = to_json(&RenewRequest { ttl });
        self.call_json(Method::POST, &format!("/v1/leases/{id}/renew"), Some(body))
            .await
    }

    /// `POST /v1/leases/{id}/revoke`: end one lease now.
    pub async fn revoke_lease(&self, id: LeaseId) -> Result<LeaseView, AdminClientError> {
        self.call_json(Method::POST, &format!("/v1/leases/{id}/revoke"), None)
            .await
    }

    /// `POST /v1/revoke`: end every lease of an identity, identity prefix or
    /// template (exactly one must be set).
    pub async fn revoke(&self, request: RevokeRequest) -> Result<RevokeResponse, AdminClientError> {
        self.call_json(Method::POST, "/v1/revoke", Some(to_json(&request)))
            .await
    }

    /// `POST /v1/creds/{template}`: a standalone lease with a password, for
    /// clients that log in to the database directly.
    pub async fn creds(&self, template: &str) -> Result<Credentials, AdminClientError> {
        let path = format!("/v1/creds/{}", encode_component(template));
        self.call_json(Method::POST, &path, None).await
    }

    /// `GET /healthz`.
    pub async fn health(&self) -> Result<Health, AdminClientError> {
        self.call_json(Method::GET, "/healthz", None).await
    }

    /// `GET /metrics`: the Prometheus text exposition.
    pub async fn metrics(&self) -> Result<String, AdminClientError> {
        let body = self.call(Method::GET, "/metrics", None).await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    // ----- plumbing -----------------------------------------------------------

    /// [`AdminClient::call`] and decode the JSON answer as `T`.
    async fn call_json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, AdminClientError> {
        let request = format!("{method} {path}");
        let bytes = self.call(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| AdminClientError::Decode {
            request,
            reason: e.to_string(),
        })
    }

    /// One request on a fresh connection, within the timeout. Returns the
    /// body of a 2xx answer; any other status becomes
    /// [`AdminClientError::Api`].
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, AdminClientError> {
        let exchange = self.exchange(method, path, body);
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| AdminClientError::Timeout {
                addr: self.endpoint.authority.clone(),
                timeout: self.timeout,
            })??;
        if status.is_success() {
            Ok(bytes)
        } else {
            Err(api_error(status, &bytes))
        }
    }

    /// Connect, handshake, send, and read the whole answer.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), AdminClientError> {
        let addr = &self.endpoint.authority;

        let tcp = TcpStream::connect((self.endpoint.host.as_str(), self.endpoint.port))
            .await
            .map_err(|e| AdminClientError::Connect {
                addr: addr.clone(),
                reason: error_chain(&e),
            })?;
        let tls = self
            .tls
            .connect(self.endpoint.server_name.clone(), tcp)
            .await
            .map_err(|e| AdminClientError::Tls {
                addr: addr.clone(),
                reason: error_chain(&e),
            })?;

        let http_error = |e: &dyn StdError| AdminClientError::Http {
            addr: addr.clone(),
            reason: error_chain(e),
        };

        // hyper's low-level client: `sender` sends requests, `connection`
        // does the I/O and must be polled, so it runs in its own task. It
        // finishes by itself once the answer is read and `sender` is dropped.
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| http_error(&e))?;
        let connection = tokio::spawn(connection);

        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, addr.as_str())
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("ephemera/", env!("CARGO_PKG_VERSION")),
            );
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| http_error(&e))?;

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
}

/// Builds [`AdminClientError::Api`] from an error answer: the `error` of an
/// [`ApiError`] body, else the body text, else the status' reason phrase.
fn api_error(status: StatusCode, body: &[u8]) -> AdminClientError {
    let message = match serde_json::from_slice::<ApiError>(body) {
        Ok(api) => api.error,
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                status
                    .canonical_reason()
                    .unwrap_or("no details given")
                    .to_owned()
            } else if text.chars().count() > MAX_ERROR_TEXT {
                let cut: String = text.chars().take(MAX_ERROR_TEXT).collect();
                format!("{cut}…")
            } else {
                text.to_owned()
            }
        }
    };
    AdminClientError::Api {
        status: status.as_u16(),
        message,
    }
}

/// The query string (with its leading `?`, or empty) for a [`LeaseFilter`].
fn lease_query(filter: &LeaseFilter) -> String {
    let mut pairs: Vec<(&str, String)> = Vec::new();
    if let Some(identity) = &filter.identity {
        pairs.push(("identity", identity.clone()));
    }
    if let Some(template) = &filter.template {
        pairs.push(("template", template.clone()));
    }
    if let Some(state) = filter.state {
        pairs.push(("state", state_name(state)));
    }
    let mut query = String::new();
    for (i, (name, value)) in pairs.iter().enumerate() {
        query.push(if i == 0 { '?' } else { '&' });
        query.push_str(name);
        query.push('=');
        query.push_str(&encode_component(value));
    }
    query
}

/// A lease state as the API spells it (`active`, `revoked`, `expired`).
fn state_name(state: LeaseState) -> String {
    match serde_json::to_value(state) {
        Ok(serde_json::Value::String(name)) => name,
        // Unreachable for a unit enum; keep something readable anyway.
        _ => format!("{state:?}").to_lowercase(),
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters, so the
/// result is safe in a path segment or a query value (`spiffe://a/b` becomes
/// `spiffe%3A%2F%2Fa%2Fb`).
fn encode_component(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("the admin API request types always serialise")
}

/// Reads every `CERTIFICATE` block of a PEM file; at least one is required.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| describe_pem_error(&e, "CERTIFICATE"))?;
    if certs.is_empty() {
        return Err(describe_pem_error(&pem::Error::NoItemsFound, "CERTIFICATE"));
    }
    Ok(certs)
}

/// Describes a PEM error without quoting the file (which may be a key).
fn describe_pem_error(error: &pem::Error, expected: &str) -> String {
    match error {
        pem::Error::Io(e) => e.to_string(),
        pem::Error::NoItemsFound => format!("no {expected} PEM block found"),
        pem::Error::MissingSectionEnd { .. } => "a PEM block has no END line".to_owned(),
        pem::Error::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed".to_owned(),
        pem::Error::Base64Decode(_) => "a PEM block is not valid base64".to_owned(),
        pem::Error::SectionTooLarge => "a PEM block is too large".to_owned(),
        _ => "the file is not valid PEM".to_owned(),
    }
}

/// An error and its sources, `outer: inner: innermost` (hyper's and
/// tokio-rustls' errors keep the useful part in their sources).
fn error_chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        // Some wrappers repeat their source's text; don't say it twice.
        if !text.ends_with(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    //! The client against a tiny hyper + tokio-rustls server that requires a
    //! client certificate, with certificates made by rcgen on the spot.

    use std::convert::Infallible;
    use std::net::{Ipv4Addr, SocketAddr};
    use std::sync::Mutex;

    use hyper::service::service_fn;
    use hyper::Response;
    use rcgen::string::Ia5String;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    use rustls::pki_types::PrivatePkcs8KeyDer;
    use rustls::server::WebPkiClientVerifier;
    use time::macros::datetime;
    use tokio::net::TcpListener;
    use tokio_rustls::TlsAcceptor;

    use ephemera_engine::LeaseKind;

    use super::*;

    const ADMIN_ID: &str = "spiffe://example.org/ns/ops/sa/admin";
    const LEASE_ID: &str = "6f1c2b1e-3c4d-4e5f-8a9b-0c1d2e3f4a5b";
    /// The lease ID the test server refuses with a 403 `ApiError`.
    const FORBIDDEN_ID: &str = "00000000-0000-4000-8000-000000000403";
    const FORBIDDEN_MESSAGE: &str = "spiffe://example.org/ns/ops/sa/admin is not an admin identity";

    // ----- a throwaway PKI ------------------------------------------------------

    struct Ca {
        cert: CertificateDer<'static>,
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    struct Leaf {
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        cert_pem: String,
        key_pem: String,
    }

    fn ca(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Ca {
            cert: cert.der().clone(),
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn leaf(ca: &Ca, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "test leaf");
        params.is_ca = IsCa::ExplicitNoCa;
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        Leaf {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A server certificate for 127.0.0.1 and `localhost`.
    fn server_cert(ca: &Ca) -> Leaf {
        let sans = vec![
            SanType::IpAddress(Ipv4Addr::LOCALHOST.into()),
            SanType::DnsName(Ia5String::try_from("localhost").unwrap()),
        ];
        leaf(ca, sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// An X.509-SVID (one `spiffe://` URI SAN).
    fn svid(ca: &Ca, spiffe_id: &str) -> Leaf {
        let sans = vec![SanType::URI(Ia5String::try_from(spiffe_id).unwrap())];
        leaf(ca, sans, ExtendedKeyUsagePurpose::ClientAuth)
    }

    // ----- the test server --------------------------------------------------------

    fn sample_lease() -> LeaseView {
        LeaseView {
            id: LEASE_ID.parse().unwrap(),
            engine: "postgres".into(),
            kind: LeaseKind::Session,
            template: "billing_rw".into(),
            role: "eph_billing_rw_a1b2c3".into(),
            identity: "spiffe://example.org/ns/prod/sa/api".into(),
            database: "billing".into(),
            client_addr: Some("127.0.0.1:51000".into()),
            issued_at: datetime!(2025-01-02 03:04:05 UTC),
            expires_at: datetime!(2025-01-02 03:14:05 UTC),
            max_expires_at: datetime!(2025-01-02 11:04:05 UTC),
            state: LeaseState::Active,
            ended_at: None,
            end_reason: None,
        }
    }

    fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())))
            .unwrap()
    }

    /// The routes: `GET /v1/leases` lists [`sample_lease`], the forbidden
    /// lease is a 403 `ApiError`, `/healthz` is fine, the rest a plain-text 404.
    fn route(method: &Method, path: &str) -> Response<Full<Bytes>> {
        match (method, path) {
            (&Method::GET, "/v1/leases") => json_response(
                StatusCode::OK,
                &LeaseList {
                    leases: vec![sample_lease()],
                },
            ),
            (&Method::GET, "/healthz") => json_response(
                StatusCode::OK,
                &Health {
                    status: "ok".into(),
                },
            ),
            (&Method::GET, p) if p == format!("/v1/leases/{FORBIDDEN_ID}") => json_response(
                StatusCode::FORBIDDEN,
                &ApiError {
                    error: FORBIDDEN_MESSAGE.into(),
                },
            ),
            _ => Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Full::new(Bytes::from_static(b"no such route\n")))
                .unwrap(),
        }
    }

    /// Serves [`route`] over TLS, requiring a client certificate from
    /// `client_ca`; records each request as `METHOD path?query`.
    async fn start_server(server: Leaf, client_ca: &Ca) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(client_ca.cert.clone()).unwrap();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(server.chain, server.key)
            .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));

        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            // Ends with the test's runtime.
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    // A refused handshake is part of some tests; ignore it.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                        let target = request
                            .uri()
                            .path_and_query()
                            .map(|pq| pq.as_str().to_owned())
                            .unwrap_or_default();
                        log.lock()
                            .unwrap()
                            .push(format!("{} {target}", request.method()));
                        let response = route(request.method(), request.uri().path());
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        (addr, seen)
    }

    /// A server (certificate from `server_ca`, trusting clients of `ca`) and
    /// a client for it whose SVID is issued by `ca` and which trusts `ca`.
    async fn setup() -> (AdminClient, Arc<Mutex<Vec<String>>>) {
        let ca = ca("test ca");
        let (addr, seen) = start_server(server_cert(&ca), &ca).await;
        let me = svid(&ca, ADMIN_ID);
        let client = AdminClient::new(&format!("https://{addr}"), me.chain, me.key, vec![ca.cert])
            .unwrap()
            .with_timeout(Duration::from_secs(10));
        (client, seen)
    }

    // ----- against the server -------------------------------------------------------

    #[tokio::test]
    async fn lists_leases_with_an_encoded_filter() {
        let (client, seen) = setup().await;
        let filter = LeaseFilter {
            identity: Some("spiffe://example.org/ns/prod/sa/api".into()),
            template: Some("billing_rw".into()),
            state: Some(LeaseState::Active),
        };
        let leases = client.list_leases(&filter).await.unwrap();
        assert_eq!(leases, vec![sample_lease()]);
        assert_eq!(
            seen.lock().unwrap().as_slice(),
            [
                "GET /v1/leases?identity=spiffe%3A%2F%2Fexample.org%2Fns%2Fprod%2Fsa%2Fapi\
              &template=billing_rw&state=active"
            ]
        );

        // No filter, no query string.
        client.list_leases(&LeaseFilter::default()).await.unwrap();
        assert_eq!(seen.lock().unwrap().last().unwrap(), "GET /v1/leases");
    }

    #[tokio::test]
    async fn a_403_api_error_becomes_an_api_error() {
        let (client, _) = setup().await;
        let error = client
            .show_lease(FORBIDDEN_ID.parse().unwrap())
            .await
            .unwrap_err();
        match &error {
            AdminClientError::Api { status, message } => {
                assert_eq!(*status, 403);
                assert_eq!(message, FORBIDDEN_MESSAGE);
            }
            other => panic!("expected AdminClientError::Api, got {other:?}"),
        }
        let text = error.to_string();
        assert!(text.contains("refused this identity (403)"), "{text}");
        assert!(text.contains("[admin] identities"), "{text}");
    }

    #[tokio::test]
    async fn a_non_json_error_body_is_quoted() {
        let (client, _) = setup().await;
        let error = client
            .revoke_lease(LEASE_ID.parse().unwrap())
            .await
            .unwrap_err();
        match error {
            AdminClientError::Api { status, message } => {
                assert_eq!(status, 404);
                assert_eq!(message, "no such route");
            }
            other => panic!("expected AdminClientError::Api, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn connects_by_dns_name_too() {
        let ca = ca("test ca");
        let (addr, _) = start_server(server_cert(&ca), &ca).await;
        let me = svid(&ca, ADMIN_ID);
        let url = format!("https://localhost:{}", addr.port());
        let client = AdminClient::new(&url, me.chain, me.key, vec![ca.cert]).unwrap();
        assert_eq!(client.health().await.unwrap().status, "ok");
    }

    #[tokio::test]
    async fn an_untrusted_server_is_a_tls_error_naming_the_address() {
        let server_ca = ca("server ca");
        let client_ca = ca("client ca");
        let (addr, _) = start_server(server_cert(&server_ca), &client_ca).await;
        let me = svid(&client_ca, ADMIN_ID);
        // The client trusts only its own CA, not the one that signed the server.
        let client = AdminClient::new(
            &format!("https://{addr}"),
            me.chain,
            me.key,
            vec![client_ca.cert],
        )
        .unwrap();
        let error = client.health().await.unwrap_err();
        assert!(matches!(error, AdminClientError::Tls { .. }), "{error:?}");
        let text = error.to_string();
        assert!(text.contains(&addr.to_string()), "{text}");
        assert!(text.contains("--ca"), "{text}");
    }

    #[tokio::test]
    async fn a_refused_client_certificate_is_an_error_naming_the_address() {
        let ca = ca("test ca");
        let (addr, _) = start_server(server_cert(&ca), &ca).await;
        // An SVID from a CA the server does not trust.
        let stranger = svid(&self::ca("stranger"), ADMIN_ID);
        let client = AdminClient::new(
            &format!("https://{addr}"),
            stranger.chain,
            stranger.key,
            vec![ca.cert],
        )
        .unwrap();
        let error = client.health().await.unwrap_err();
        // TLS 1.3 reports the refusal after the client's side of the
        // handshake, so it surfaces while exchanging the request.
        assert!(
            matches!(
                error,
                AdminClientError::Tls { .. } | AdminClientError::Http { .. }
            ),
            "{error:?}"
        );
        assert!(error.to_string().contains(&addr.to_string()), "{error}");
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        // Bind and drop to find a port nobody listens on.
        let port = {
            let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            listener.local_addr().unwrap().port()
        };
        let ca = ca("test ca");
        let me = svid(&ca, ADMIN_ID);
        let url = format!("https://127.0.0.1:{port}");
        let client = AdminClient::new(&url, me.chain, me.key, vec![ca.cert]).unwrap();
        let error = client.health().await.unwrap_err();
        assert!(
            matches!(error, AdminClientError::Connect { .. }),
            "{error:?}"
        );
        assert!(
            error.to_string().contains(&format!("127.0.0.1:{port}")),
            "{error}"
        );
    }

    // ----- files --------------------------------------------------------------------

    #[tokio::test]
    async fn from_files_reads_pem() {
        let ca = ca("test ca");
        let (addr, _) = start_server(server_cert(&ca), &ca).await;
        let me = svid(&ca, ADMIN_ID);
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, ca_path) = (
            dir.path().join("svid.pem"),
            dir.path().join("svid-key.pem"),
            dir.path().join("ca.pem"),
        );
        std::fs::write(&cert, &me.cert_pem).unwrap();
        std::fs::write(&key, &me.key_pem).unwrap();
        std::fs::write(&ca_path, &ca.pem).unwrap();
        let client =
            AdminClient::from_files(&format!("https://{addr}"), &cert, &key, &ca_path).unwrap();
        assert_eq!(client.health().await.unwrap().status, "ok");
    }

    #[test]
    fn file_errors_name_the_file_but_never_quote_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca("test ca");
        let me = svid(&ca, ADMIN_ID);
        let cert = dir.path().join("svid.pem");
        std::fs::write(&cert, &me.cert_pem).unwrap();
        let url = "https://127.0.0.1:8443";

        let missing = dir.path().join("missing.pem");
        let error = AdminClient::from_files(url, &missing, &missing, &missing).unwrap_err();
        assert!(
            matches!(error, AdminClientError::ReadCert { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("missing.pem"), "{error}");

        // A "key" that is not PEM, and one with a broken BEGIN line: the
        // message must not echo any of it.
        for (name, contents) in [
            ("raw-key.pem", "SECRET-KEY-MATERIAL\n".to_owned()),
            (
                "broken-key.pem",
                "-----BEGIN PRIVATE KEY SECRET-KEY-MATERIAL\nAAAA\n-----END PRIVATE KEY-----\n"
                    .to_owned(),
            ),
        ] {
            let key = dir.path().join(name);
            std::fs::write(&key, contents).unwrap();
            let error = AdminClient::from_files(url, &cert, &key, &cert).unwrap_err();
            assert!(
                matches!(error, AdminClientError::ReadKey { .. }),
                "{error:?}"
            );
            let text = format!("{error} {error:?}");
            assert!(text.contains(name), "{text}");
            assert!(!text.contains("SECRET"), "{text}");
        }

        // A key that does not belong to the certificate.
        let other_key = dir.path().join("other-key.pem");
        std::fs::write(&other_key, svid(&ca, ADMIN_ID).key_pem).unwrap();
        let error = AdminClient::from_files(url, &cert, &other_key, &cert).unwrap_err();
        assert!(matches!(error, AdminClientError::TlsConfig(_)), "{error:?}");

        // A CA file without certificates.
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let key = dir.path().join("svid-key.pem");
        std::fs::write(&key, &me.key_pem).unwrap();
        let error = AdminClient::from_files(url, &cert, &key, &empty).unwrap_err();
        assert!(
            matches!(error, AdminClientError::ReadCa { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("empty.pem"), "{error}");
    }

    #[test]
    fn debug_does_not_show_the_key() {
        let ca = ca("test ca");
        let me = svid(&ca, ADMIN_ID);
        let client =
            AdminClient::new("https://127.0.0.1:8443", me.chain, me.key, vec![ca.cert]).unwrap();
        assert_eq!(
            format!("{client:?}"),
            "AdminClient { url: https://127.0.0.1:8443, timeout: 30s, .. }"
        );
    }

    // ----- pure helpers -------------------------------------------------------------

    #[test]
    fn parses_urls() {
        let e = Endpoint::parse("https://127.0.0.1:8443").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 8443));
        assert_eq!(e.authority, "127.0.0.1:8443");
        assert!(matches!(e.server_name, ServerName::IpAddress(_)));

        let e = Endpoint::parse("https://[::1]:9000/").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 9000));
        assert_eq!(e.authority, "[::1]:9000");
        assert!(matches!(e.server_name, ServerName::IpAddress(_)));

        let e = Endpoint::parse("https://admin.ephemera.internal").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("admin.ephemera.internal", 443));
        assert_eq!(
            e.server_name,
            ServerName::try_from("admin.ephemera.internal").unwrap()
        );

        for bad in [
            "http://127.0.0.1:8443",
            "127.0.0.1:8443",
            "https://",
            "https://127.0.0.1:8443/v1",
            "https://127.0.0.1:8443?x=1",
            "https://user@127.0.0.1:8443",
            "https://bad_host!:8443",
            "not a url",
        ] {
            let error = Endpoint::parse(bad).unwrap_err();
            assert!(
                matches!(error, AdminClientError::BadUrl { .. }),
                "{bad}: {error:?}"
            );
            assert!(
                error.to_string().contains("https://127.0.0.1:8443"),
                "{error}"
            );
        }
    }

    #[test]
    fn encodes_components() {
        assert_eq!(encode_component("billing_rw-1.x~"), "billing_rw-1.x~");
        assert_eq!(
            encode_component("spiffe://example.org/a b&c=d+é"),
            "spiffe%3A%2F%2Fexample.org%2Fa%20b%26c%3Dd%2B%C3%A9"
        );
        let only_state = LeaseFilter {
            state: Some(LeaseState::Expired),
            ..LeaseFilter::default()
        };
        assert_eq!(lease_query(&only_state), "?state=expired");
        assert_eq!(lease_query(&LeaseFilter::default()), "");
    }

    #[test]
    fn api_errors_from_bodies() {
        let error = api_error(StatusCode::CONFLICT, br#"{"error":"lease is revoked"}"#);
        assert_eq!(
            error.to_string(),
            "the admin API cannot do that now (409): lease is revoked"
        );
        let error = api_error(
            StatusCode::FORBIDDEN,
            br#"{"error":"spiffe://x/y is not an admin identity; admin identities are listed in [admin] identities"}"#,
        );
        assert_eq!(
            error.to_string().matches("[admin] identities").count(),
            1,
            "{error}"
        );
        match api_error(StatusCode::SERVICE_UNAVAILABLE, b"") {
            AdminClientError::Api { status, message } => {
                assert_eq!((status, message.as_str()), (503, "Service Unavailable"));
            }
            other => panic!("{other:?}"),
        }
        match api_error(StatusCode::BAD_GATEWAY, "x".repeat(5000).as_bytes()) {
            AdminClientError::Api { message, .. } => {
                assert_eq!(message.chars().count(), MAX_ERROR_TEXT + 1);
            }
            other => panic!("{other:?}"),
        }
    }
}
