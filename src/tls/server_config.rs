//! The two rustls server configurations Ephemera serves with, built the
//! same way whether the certificate and bundles come from files
//! (`config/validate/`) or from the SPIFFE Workload API (`workload.rs`).

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::identity::{AcceptAnyClientCert, SvidVerifier};

/// The ALPN protocol PostgreSQL 17 clients announce for direct TLS.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// The most plaintext a TLS record towards a PostgreSQL client carries, as
/// PostgreSQL itself sends (its SSL buffer is 8 KiB).
pub const CLIENT_RECORD_PLAINTEXT: usize = 8192;
/// rustls counts `max_fragment_size` with the record header (type, version,
/// length).
pub(crate) const TLS_RECORD_HEADER: usize = 5;

/// The PostgreSQL listener's TLS: our certificate, a client certificate
/// asked for (checked as an SVID after the handshake by `verifier`).
pub fn front_door_config(
    verifier: Arc<SvidVerifier>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(AcceptAnyClientCert::new(verifier)))
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    // What PostgreSQL sends: records of at most 8 KiB of plaintext. libpq
    // in non-blocking mode can leave a bigger record's decrypted bytes
    // buffered where its socket wait never sees them, and async clients
    // hang (SECURITY.md, review findings).
    config.max_fragment_size = Some(CLIENT_RECORD_PLAINTEXT + TLS_RECORD_HEADER);
    Ok(Arc::new(config))
}

/// Who may open a TLS connection to the admin API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminClients {
    /// A client certificate chaining to the bundle, always.
    CertificateRequired,
    /// With token issuers configured, a client may come without one
    /// (`ephemera exec --token-file`); every request of such a connection
    /// then needs a verified `Authorization: Bearer` token (`admin::bearer`),
    /// and admin-only endpoints stay closed to it.
    CertificateOrBearer,
}

impl AdminClients {
    pub fn for_tokens(tokens_configured: bool) -> Self {
        if tokens_configured {
            AdminClients::CertificateOrBearer
        } else {
            AdminClients::CertificateRequired
        }
    }
}

/// The admin API's TLS: a client certificate, when there is one, must chain
/// to one of `bundle`'s CAs before any HTTP is spoken.
pub fn admin_config(
    bundle: &[CertificateDer<'static>],
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    clients: AdminClients,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in bundle {
        roots.add(cert.clone()).map_err(|e| e.to_string())?;
    }
    let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    );
    let builder = match clients {
        AdminClients::CertificateRequired => builder,
        AdminClients::CertificateOrBearer => builder.allow_unauthenticated(),
    };
    let verifier = builder.build().map_err(|e| e.to_string())?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
