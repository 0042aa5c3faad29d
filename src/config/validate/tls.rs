//! `[tls]`: Ephemera's own certificate towards clients, and the SPIFFE
//! trust bundles (the home trust domains' and each federated one's).

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;

use super::files::{clone_identity, load_certs, load_key, ServerIdentity};
use crate::config::problems::Problems;
use crate::config::schema::{
    FileConfig, ALPN_POSTGRESQL, CLIENT_RECORD_PLAINTEXT, TLS_RECORD_HEADER,
};
use crate::identity::{AcceptAnyClientCert, SvidVerifier};

/// What `[tls]` yields; `None` where a problem was recorded.
pub(super) struct FrontDoorTls {
    pub server_tls: Option<Arc<rustls::ServerConfig>>,
    pub svid_verifier: Option<Arc<SvidVerifier>>,
    /// Every bundle's CAs (the admin API's TLS layer accepts them all).
    pub bundle: Option<Vec<CertificateDer<'static>>>,
    pub server_identity: Option<ServerIdentity>,
}

pub(super) fn front_door(
    file: &FileConfig,
    base: &Path,
    provider: &Arc<CryptoProvider>,
    problems: &mut Problems,
) -> FrontDoorTls {
    let (bundle, svid_verifier) = trust(file, base, provider, problems);
    let svid_verifier = svid_verifier.map(Arc::new);
    let cert_chain = load_certs(&base.join(&file.tls.cert), "tls.cert", problems);
    let key = load_key(&base.join(&file.tls.key), "tls.key", problems);
    let server_identity = cert_chain.zip(key);
    let server_tls = match (&svid_verifier, clone_identity(&server_identity)) {
        (Some(verifier), Some((chain, key))) => {
            match rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map(|b| {
                    b.with_client_cert_verifier(Arc::new(AcceptAnyClientCert::new(
                        verifier.clone(),
                    )))
                })
                .and_then(|b| b.with_single_cert(chain, key))
            {
                Ok(mut config) => {
                    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
                    // What PostgreSQL sends: records of at most 8 KiB of
                    // plaintext. libpq in non-blocking mode can leave a
                    // bigger record's decrypted bytes buffered where its
                    // socket wait never sees them, and async clients
                    // hang (SECURITY.md, review findings).
                    config.max_fragment_size = Some(CLIENT_RECORD_PLAINTEXT + TLS_RECORD_HEADER);
                    Some(Arc::new(config))
                }
                Err(e) => {
                    problems.add(
                        "tls.key",
                        format!("the key does not fit the certificate in tls.cert ({e})"),
                    );
                    None
                }
            }
        }
        _ => None,
    };

    FrontDoorTls {
        server_tls,
        svid_verifier,
        bundle,
        server_identity,
    }
}

/// The trust domains and their bundles, as one verifier.
fn trust(
    file: &FileConfig,
    base: &Path,
    provider: &Arc<CryptoProvider>,
    problems: &mut Problems,
) -> (Option<Vec<CertificateDer<'static>>>, Option<SvidVerifier>) {
    // -- TLS towards clients, and the SPIFFE trust bundle --
    let mut trust_domains = Vec::new();
    if file.tls.trust_domains.is_empty() {
        problems.add(
            "tls.trust_domains",
            "list at least one SPIFFE trust domain whose SVIDs are accepted, e.g. [\"example.org\"]",
        );
    }
    for (i, domain) in file.tls.trust_domains.iter().enumerate() {
        match crate::identity::SpiffeId::parse(&format!("spiffe://{domain}")) {
            Ok(id) if id.segments().next().is_none() => trust_domains.push(domain.clone()),
            _ => problems.add(
                format!("tls.trust_domains[{i}]"),
                format!("{domain:?} is not a trust domain name (lower-case letters, digits, '.', '-', '_'; no scheme or path)"),
            ),
        }
    }
    let mut bundle = load_certs(
        &base.join(&file.tls.trust_bundle),
        "tls.trust_bundle",
        problems,
    );
    let mut svid_verifier = bundle.as_ref().and_then(|bundle| {
        match SvidVerifier::new(bundle, trust_domains.clone(), provider.clone()) {
            Ok(v) => Some(v),
            Err(e) => {
                problems.add(
                    "tls.trust_bundle",
                    format!(
                        "{e}; it must hold the PEM CA certificate(s) of your SPIFFE trust domain"
                    ),
                );
                None
            }
        }
    });
    for (domain, path) in &file.tls.federation {
        let key = format!("tls.federation.{domain}");
        match crate::identity::SpiffeId::parse(&format!("spiffe://{domain}")) {
            Ok(id) if id.segments().next().is_none() => {}
            _ => {
                problems.add(key, format!("{domain:?} is not a trust domain name"));
                continue;
            }
        }
        if trust_domains.contains(domain) {
            problems.add(
                key,
                format!("{domain:?} is also in tls.trust_domains; a trust domain has one bundle: list it in one place"),
            );
            continue;
        }
        let Some(certs) = load_certs(&base.join(path), &key, problems) else {
            continue;
        };
        svid_verifier = match svid_verifier.map(|v| v.with_federated(domain.clone(), &certs)) {
            Some(Ok(v)) => Some(v),
            Some(Err(e)) => {
                problems.add(
                    key,
                    format!("{e}; it must hold the PEM CA certificate(s) of trust domain {domain}"),
                );
                None
            }
            None => None,
        };
        // The admin API's TLS layer accepts every bundle's CAs; the
        // verifier then holds each SVID to its own domain's bundle.
        if let Some(all) = bundle.as_mut() {
            all.extend(certs);
        }
    }
    (bundle, svid_verifier)
}
