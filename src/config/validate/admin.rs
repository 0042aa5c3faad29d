//! `[admin]`: the admin API's listener, who may use it, and its TLS.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;

use super::files::{clone_identity, ServerIdentity};
use crate::config::problems::Problems;
use crate::config::schema::FileConfig;
use crate::config::AdminSettings;
use crate::policy::IdPattern;

pub(super) fn admin(
    file: &FileConfig,
    bundle: Option<&[CertificateDer<'static>]>,
    server_identity: &Option<ServerIdentity>,
    provider: &Arc<CryptoProvider>,
    problems: &mut Problems,
) -> Option<AdminSettings> {
    // -- admin API --
    let admin = file.admin.as_ref().and_then(|admin| {
        let listen = match admin.listen.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                problems.add(
                    "admin.listen",
                    format!(
                        "{:?} is not an IP address and port, e.g. \"127.0.0.1:8443\"",
                        admin.listen
                    ),
                );
                None
            }
        };
        if admin.identities.is_empty() {
            problems.add(
                "admin.identities",
                "list the SPIFFE IDs (patterns) allowed to administer leases",
            );
        }
        let mut identities = Vec::new();
        for (i, pattern) in admin.identities.iter().enumerate() {
            match IdPattern::parse(pattern) {
                Ok(p) => identities.push(p),
                Err(e) => problems.add(
                    format!("admin.identities[{i}]"),
                    format!("{pattern:?} is not a SPIFFE ID pattern: {e}"),
                ),
            }
        }
        let tokens = !file.tokens.issuer.is_empty();
        let tls = admin_tls(
            bundle?,
            clone_identity(server_identity)?,
            provider.clone(),
            tokens,
        )
        .map_err(|e| problems.add("admin", format!("cannot set up TLS for the admin API: {e}")))
        .ok()?;
        Some(AdminSettings {
            listen: listen?,
            identities,
            tls,
        })
    });

    admin
}

/// The admin API's TLS: a client certificate must chain to the trust bundle
/// before any HTTP is spoken. With token issuers configured, a client may
/// come without one (`ephemera exec --token-file`); every request of such a
/// connection then needs a verified `Authorization: Bearer` token
/// (`admin::bearer`), and admin-only endpoints stay closed to it.
fn admin_tls(
    bundle: &[CertificateDer<'static>],
    (chain, key): ServerIdentity,
    provider: Arc<rustls::crypto::CryptoProvider>,
    tokens: bool,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in bundle {
        roots.add(cert.clone()).map_err(|e| e.to_string())?;
    }
    let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    );
    let builder = if tokens {
        builder.allow_unauthenticated()
    } else {
        builder
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
