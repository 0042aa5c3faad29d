//! [`AdminClientError`]: what can go wrong talking to the admin API, and how
//! an error answer becomes one.

use std::error::Error as StdError;
use std::path::PathBuf;
use std::time::Duration;

use hyper::StatusCode;

use crate::admin::api::ApiError;

/// How much of a non-JSON error body is quoted in an error message.
pub(super) const MAX_ERROR_TEXT: usize = 1000;

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

/// Builds [`AdminClientError::Api`] from an error answer: the `error` of an
/// [`ApiError`] body, else the body text, else the status' reason phrase.
pub(super) fn api_error(status: StatusCode, body: &[u8]) -> AdminClientError {
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

/// An error and its sources, `outer: inner: innermost` (hyper's and
/// tokio-rustls' errors keep the useful part in their sources).
pub(super) fn error_chain(error: &dyn StdError) -> String {
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
