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
//!
//! The parts: `error` (what can go wrong, and the messages), `tls` (the
//! rustls set-up and PEM files), `connection` (the URL, and one request on
//! a fresh connection).

mod connection;
mod error;
mod tls;

use std::fmt;
use std::path::Path;
use std::time::Duration;

use hyper::body::Bytes;
use hyper::Method;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_rustls::TlsConnector;

use self::connection::Endpoint;
use self::error::api_error;
pub use self::error::AdminClientError;
use self::tls::{describe_pem_error, read_certificates};
use crate::admin::api::{
    Credentials, Health, LeaseFilter, LeaseList, LeaseView, RenewRequest, RevokeRequest,
    RevokeResponse,
};
use crate::identity::token::BearerToken;
use ephemera_engine::{LeaseId, LeaseState};

/// How long one request (connect, handshake, request and answer) may take
/// unless [`AdminClient::with_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A client of one Ephemera admin API, authenticating with one X.509-SVID.
///
/// Cheap to clone; each request uses its own connection.
#[derive(Clone)]
pub struct AdminClient {
    endpoint: Endpoint,
    tls: TlsConnector,
    timeout: Duration,
    /// Sent as `Authorization: Bearer` instead of a client certificate.
    bearer: Option<BearerToken>,
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

        let tls = tls::connector(cert_chain, key, server_ca)?;
        Ok(AdminClient {
            endpoint,
            tls,
            timeout: DEFAULT_TIMEOUT,
            bearer: None,
        })
    }

    /// A client that authenticates with an identity token (`Authorization:
    /// Bearer`) instead of a client certificate; the admin API accepts it
    /// for `/v1/creds` and for renewing or revoking the caller's own
    /// standalone lease.
    pub fn with_token(
        url: &str,
        token: BearerToken,
        server_ca: Vec<CertificateDer<'static>>,
    ) -> Result<AdminClient, AdminClientError> {
        let endpoint = Endpoint::parse(url)?;
        let tls = tls::connector_without_cert(server_ca)?;
        Ok(AdminClient {
            endpoint,
            tls,
            timeout: DEFAULT_TIMEOUT,
            bearer: Some(token),
        })
    }

    /// Like [`AdminClient::with_token`], reading the server's CA from `ca_path`.
    pub fn with_token_and_ca_file(
        url: &str,
        token: BearerToken,
        ca_path: &Path,
    ) -> Result<AdminClient, AdminClientError> {
        Endpoint::parse(url)?;
        let server_ca = read_certificates(ca_path).map_err(|reason| AdminClientError::ReadCa {
            path: ca_path.to_owned(),
            reason,
        })?;
        AdminClient::with_token(url, token, server_ca)
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
        let exchange = connection::exchange(
            &self.endpoint,
            &self.tls,
            method,
            path,
            body,
            self.bearer.as_ref(),
        );
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

/// Everything but RFC 3986's unreserved characters (`A-Z a-z 0-9 - . _ ~`).
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes everything but RFC 3986's unreserved characters, so the
/// result is safe in a path segment or a query value (`spiffe://a/b` becomes
/// `spiffe%3A%2F%2Fa%2Fb`).
fn encode_component(value: &str) -> String {
    utf8_percent_encode(value, COMPONENT).to_string()
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("the admin API request types always serialise")
}

#[cfg(test)]
mod tests;
