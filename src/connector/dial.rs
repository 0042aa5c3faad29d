//! The connection to Ephemera: TCP to `--to`, `SSLRequest`, then TLS with
//! verify-full against `--ca` (the certificate must chain to it and name
//! the host of `--to`), presenting the current SVID if there is one.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::svid::ClientSvid;
use crate::config::ALPN_POSTGRESQL;

/// The `SSLRequest` packet: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Why Ephemera could not be reached. The application sees it in a
/// `FATAL` with SQLSTATE 08001, so it names the address.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("Ephemera at {to} is unreachable: {reason}")]
    Unreachable { to: String, reason: String },
    #[error("Ephemera at {to} did not answer within {timeout:?}")]
    Timeout { to: String, timeout: Duration },
    #[error("Ephemera at {to} refused TLS (answered {answer:?} to SSLRequest)")]
    NoTls { to: String, answer: char },
    #[error("TLS with Ephemera at {to} failed: {reason}")]
    Tls { to: String, reason: String },
    #[error("the client certificate and key cannot be used together: {0}")]
    ClientCert(String),
}

impl DialError {
    pub fn label(&self) -> &'static str {
        match self {
            DialError::Unreachable { .. } | DialError::Timeout { .. } => "ephemera_unreachable",
            DialError::NoTls { .. } | DialError::Tls { .. } => "ephemera_tls",
            DialError::ClientCert(_) => "svid_files",
        }
    }
}

/// Why `--to` or `--ca` cannot be used (found at start).
#[derive(Debug, thiserror::Error)]
pub enum DialSetupError {
    #[error("--to {0:?} is not HOST:PORT")]
    BadAddress(String),
    #[error("--to {0:?}: the host is not a valid DNS name or IP address")]
    BadServerName(String),
    #[error("--ca {path}: {reason}")]
    Ca { path: String, reason: String },
}

/// Where Ephemera is and how to check its certificate.
#[derive(Clone)]
pub struct Dialer {
    to: String,
    server_name: ServerName<'static>,
    roots: Arc<RootCertStore>,
    timeout: Duration,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer").field("to", &self.to).finish()
    }
}

impl Dialer {
    /// `to` is `HOST:PORT`; `ca_path` the PEM file of the CA(s) that issued
    /// Ephemera's server certificate.
    pub fn new(
        to: &str,
        ca_path: &std::path::Path,
        timeout: Duration,
    ) -> Result<Self, DialSetupError> {
        let (host, port) = to
            .rsplit_once(':')
            .ok_or_else(|| DialSetupError::BadAddress(to.to_owned()))?;
        port.parse::<u16>()
            .map_err(|_| DialSetupError::BadAddress(to.to_owned()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|_| DialSetupError::BadServerName(to.to_owned()))?;
        let ca_error = |reason: String| DialSetupError::Ca {
            path: ca_path.display().to_string(),
            reason,
        };
        use rustls::pki_types::pem::PemObject;
        let certs = CertificateDer::pem_file_iter(ca_path)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|e| ca_error(super::svid::pem_reason(&e, "CERTIFICATE")))?;
        let mut roots = RootCertStore::empty();
        let (_, ignored) = roots.add_parsable_certificates(certs);
        if roots.is_empty() {
            return Err(ca_error(format!(
                "no usable CA certificate ({ignored} could not be parsed)"
            )));
        }
        Ok(Dialer {
            to: to.to_owned(),
            server_name,
            roots: Arc::new(roots),
            timeout,
        })
    }

    /// The same dialer, waiting at most `timeout` for TCP and TLS.
    pub fn with_timeout(&self, timeout: Duration) -> Dialer {
        Dialer {
            timeout,
            ..self.clone()
        }
    }

    /// `HOST:PORT` as given.
    pub fn to(&self) -> &str {
        &self.to
    }

    /// A TLS connection to Ephemera presenting `svid` (or no certificate).
    pub async fn dial(&self, svid: Option<&ClientSvid>) -> Result<TlsStream<TcpStream>, DialError> {
        let connector = self.connector(svid)?;
        match tokio::time::timeout(self.timeout, self.handshake(connector)).await {
            Ok(result) => result,
            Err(_) => Err(DialError::Timeout {
                to: self.to.clone(),
                timeout: self.timeout,
            }),
        }
    }

    fn connector(&self, svid: Option<&ClientSvid>) -> Result<TlsConnector, DialError> {
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| DialError::ClientCert(e.to_string()))?
        .with_root_certificates(self.roots.clone());
        let mut config = match svid {
            Some(svid) => builder
                .with_client_auth_cert(svid.chain.clone(), svid.key.clone_key())
                .map_err(|e| DialError::ClientCert(e.to_string()))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        Ok(TlsConnector::from(Arc::new(config)))
    }

    async fn handshake(&self, connector: TlsConnector) -> Result<TlsStream<TcpStream>, DialError> {
        let unreachable = |e: std::io::Error| DialError::Unreachable {
            to: self.to.clone(),
            reason: e.to_string(),
        };
        let mut tcp = TcpStream::connect(&self.to).await.map_err(unreachable)?;
        let _ = tcp.set_nodelay(true);
        tcp.write_all(&SSL_REQUEST).await.map_err(unreachable)?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.map_err(unreachable)?;
        if answer[0] != b'S' {
            return Err(DialError::NoTls {
                to: self.to.clone(),
                answer: char::from(answer[0]),
            });
        }
        connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| DialError::Tls {
                to: self.to.clone(),
                reason: e.to_string(),
            })
    }
}
