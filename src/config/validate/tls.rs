//! `[tls]`: Ephemera's own certificate towards clients, and the SPIFFE
//! trust bundles (the home trust domains' and each federated one's).

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;

use super::files::{clone_identity, load_certs, load_key, ServerIdentity};
use crate::config::problems::Problems;
use crate::config::schema::FileConfig;
use crate::identity::SvidVerifier;
use crate::tls::server_config::front_door_config;

/// What `[tls]` yields; `None` where a problem was recorded.
pub(super) struct FrontDoorTls {
    pub server_tls: Option<Arc<rustls::ServerConfig>>,
    pub svid_verifier: Option<Arc<SvidVerifier>>,
    /// Every bundle's CAs (the admin API's TLS layer accepts them all).
    pub bundle: Option<Vec<CertificateDer<'static>>>,
    pub server_identity: Option<ServerIdentity>,
    /// `tls.workload_api`, checked: the other fields are then `None`.
    pub workload_api: Option<String>,
}

pub(super) fn front_door(
    file: &FileConfig,
    base: &Path,
    provider: &Arc<CryptoProvider>,
    problems: &mut Problems,
) -> FrontDoorTls {
    if let Some(endpoint) = &file.tls.workload_api {
        return workload_api(file, endpoint, problems);
    }
    let required = |path: &Option<std::path::PathBuf>, key: &str, problems: &mut Problems| {
        if path.is_none() {
            problems.add(
                format!("tls.{key}"),
                "missing: set tls.cert, tls.key and tls.trust_bundle (files), or tls.workload_api (the SPIFFE Workload API)",
            );
        }
        path.as_ref().map(|p| base.join(p))
    };
    let cert_path = required(&file.tls.cert, "cert", problems);
    let key_path = required(&file.tls.key, "key", problems);
    let bundle_path = required(&file.tls.trust_bundle, "trust_bundle", problems);
    let (bundle, svid_verifier) = match bundle_path {
        Some(path) => trust(file, &path, base, provider, problems),
        None => (None, None),
    };
    let svid_verifier = svid_verifier.map(Arc::new);
    let cert_chain = cert_path.and_then(|p| load_certs(&p, "tls.cert", problems));
    let key = key_path.and_then(|p| load_key(&p, "tls.key", problems));
    let server_identity = cert_chain.zip(key);
    let server_tls = match (&svid_verifier, clone_identity(&server_identity)) {
        (Some(verifier), Some((chain, key))) => {
            match front_door_config(verifier.clone(), chain, key, provider.clone()) {
                Ok(config) => Some(config),
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
        workload_api: None,
    }
}

/// `tls.workload_api`: the one form or the other, never a mix.
fn workload_api(file: &FileConfig, endpoint: &str, problems: &mut Problems) -> FrontDoorTls {
    let tls = &file.tls;
    let mixed = [
        ("tls.cert", tls.cert.is_some()),
        ("tls.key", tls.key.is_some()),
        ("tls.trust_bundle", tls.trust_bundle.is_some()),
        ("tls.trust_domains", !tls.trust_domains.is_empty()),
        ("tls.federation", !tls.federation.is_empty()),
    ];
    for (key, set) in mixed {
        if set {
            problems.add(
                key,
                "tls.workload_api is set: the certificate, key and every trust bundle (own and federated trust domains) come from the SPIFFE Workload API; remove this key, or remove tls.workload_api to use files",
            );
        }
    }
    let checked = match crate::identity::workload_api::parse_endpoint(endpoint) {
        Ok(()) => Some(endpoint.to_owned()),
        Err(e) => {
            problems.add("tls.workload_api", e.to_string());
            None
        }
    };
    FrontDoorTls {
        server_tls: None,
        svid_verifier: None,
        bundle: None,
        server_identity: None,
        workload_api: checked,
    }
}

/// The trust domains and their bundles, as one verifier.
fn trust(
    file: &FileConfig,
    bundle_path: &Path,
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
    let mut bundle = load_certs(bundle_path, "tls.trust_bundle", problems);
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
