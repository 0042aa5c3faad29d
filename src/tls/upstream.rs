//! TLS towards the upstream PostgreSQL (`upstream.sslmode`, `upstream.ca`):
//! the proxy's setting, used by the per-session logins and handed to the
//! engines for their admin connections.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// How to protect the connection to the upstream, as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP. Only for a database on the same host or a trusted network.
    Disable,
    /// TLS, but the server's certificate is not checked (encryption against
    /// passive listeners only).
    Require,
    /// TLS, the certificate must chain to the configured CA and name the host.
    VerifyFull,
}

/// The TLS settings for upstream connections: the mode and, unless disabled,
/// the rustls configuration that implements it.
#[derive(Clone)]
pub struct UpstreamTls {
    pub mode: SslMode,
    config: Arc<ClientConfig>,
    /// How the server is checked, for configurations that also present a
    /// client certificate ([`UpstreamTls::with_client_cert`]).
    server: ServerCheck,
}

#[derive(Clone)]
enum ServerCheck {
    Roots(Arc<RootCertStore>),
    EncryptOnly(Arc<rustls::crypto::CryptoProvider>),
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("mode", &self.mode)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("sslmode = \"verify-full\" needs a CA certificate (upstream.ca)")]
    MissingCa,
    #[error("the upstream CA certificate could not be used: {0}")]
    BadCa(rustls::Error),
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

impl UpstreamTls {
    /// Build the client TLS configuration for `mode`. `ca` is required for
    /// `VerifyFull` and ignored otherwise.
    pub fn new(mode: SslMode, ca: &[CertificateDer<'static>]) -> Result<Self, TlsSetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = match mode {
            SslMode::VerifyFull => {
                if ca.is_empty() {
                    return Err(TlsSetupError::MissingCa);
                }
                let mut roots = RootCertStore::empty();
                for cert in ca {
                    roots.add(cert.clone()).map_err(TlsSetupError::BadCa)?;
                }
                ServerCheck::Roots(Arc::new(roots))
            }
            SslMode::Require | SslMode::Disable => ServerCheck::EncryptOnly(provider),
        };
        let config = Self::builder(&server)?.with_no_client_auth();
        Ok(UpstreamTls {
            mode,
            config: Arc::new(config),
            server,
        })
    }

    /// A builder that checks the server as `server` says, up to the client
    /// authentication step.
    fn builder(
        server: &ServerCheck,
    ) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, TlsSetupError>
    {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder =
            ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()?;
        Ok(match server {
            ServerCheck::Roots(roots) => builder.with_root_certificates(roots.clone()),
            ServerCheck::EncryptOnly(provider) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(EncryptOnly {
                    provider: provider.clone(),
                })),
        })
    }

    /// The same server check, presenting `chain` and `key` as the client
    /// certificate (a certificate login, `upstream.login = "certificate"`).
    pub fn with_client_cert(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
    ) -> Result<Arc<ClientConfig>, TlsSetupError> {
        let config = Self::builder(&self.server)?.with_client_auth_cert(chain, key)?;
        Ok(Arc::new(config))
    }

    /// The rustls configuration (meaningless when `mode` is `Disable`).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    /// What engines get for their admin connections: the client
    /// configuration, or `None` for plain connections.
    pub fn engine_config(&self) -> Option<Arc<ClientConfig>> {
        (self.mode != SslMode::Disable).then(|| self.config.clone())
    }
}

/// `sslmode = require`: accept any server certificate, but still check the
/// handshake signatures so the session keys are really the server's.
#[derive(Debug)]
struct EncryptOnly {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
