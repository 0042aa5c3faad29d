//! `[[tokens.issuer]]`: the identity-token issuers, their keys read (files)
//! or their fetching set up (URLs, OIDC discovery).

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};

use super::files::load_certs;
use crate::config::problems::Problems;
use crate::config::schema::{FileConfig, IssuerSection};
use crate::identity::token::{Issuer, IssuerConfig, KeySource, TokenIssuers};
use crate::identity::SpiffeId;

pub(super) fn tokens(
    file: &FileConfig,
    base: &Path,
    provider: &Arc<CryptoProvider>,
    problems: &mut Problems,
) -> TokenIssuers {
    let mut issuers = Vec::new();
    for (i, section) in file.tokens.issuer.iter().enumerate() {
        let key = format!("tokens.issuer[{i}]");
        let before = problems.0.len();
        check_names(file, i, section, &key, problems);
        let workload_api = file.tls.workload_api.as_deref();
        let keys = keys(section, workload_api, base, provider, &key, problems);
        if let (Some(keys), true) = (keys, problems.0.len() == before) {
            let config = IssuerConfig {
                name: section.name.clone(),
                issuer: section.issuer.clone(),
                audience: section.audience.clone(),
                bind_to_expiry: section.bind_to_expiry,
                single_use: section.single_use,
                spiffe_trust_domain: section.spiffe_trust_domain.clone(),
            };
            issuers.push(Issuer::new(config, keys));
        }
    }
    TokenIssuers::new(issuers)
}

fn check_names(
    file: &FileConfig,
    i: usize,
    section: &IssuerSection,
    key: &str,
    problems: &mut Problems,
) {
    let name_ok = !section.name.is_empty()
        && section.name.len() <= 40
        && section
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !name_ok {
        problems.add(
            format!("{key}.name"),
            "must be 1 to 40 letters, digits, '_' or '-', e.g. \"github\"",
        );
    }
    if file.tokens.issuer[..i]
        .iter()
        .any(|o| o.name == section.name)
    {
        problems.add(
            format!("{key}.name"),
            format!("another issuer is already named {:?}", section.name),
        );
    }
    if section.audience.is_empty() {
        problems.add(
            format!("{key}.audience"),
            "must name the audience Ephemera's tokens are minted for, e.g. \"ephemera\"",
        );
    }
    match (&section.issuer, &section.spiffe_trust_domain) {
        (None, None) => problems.add(
            format!("{key}.issuer"),
            "give the issuer's URL (the tokens' iss), or spiffe_trust_domain for JWT-SVIDs",
        ),
        (Some(iss), _) if iss.is_empty() => {
            problems.add(format!("{key}.issuer"), "must not be empty")
        }
        _ => {}
    }
    if let Some(domain) = &section.spiffe_trust_domain {
        if SpiffeId::parse(&format!("spiffe://{domain}")).is_err() {
            problems.add(
                format!("{key}.spiffe_trust_domain"),
                format!("{domain:?} is not a SPIFFE trust domain name, e.g. \"example.org\""),
            );
        }
    }
}

fn keys(
    section: &IssuerSection,
    workload_api: Option<&str>,
    base: &Path,
    provider: &Arc<CryptoProvider>,
    key: &str,
    problems: &mut Problems,
) -> Option<KeySource> {
    // A JWT-SVID issuer with neither key: its trust domain's JWT bundle
    // from the Workload API Ephemera already takes its X.509-SVID from.
    if let (None, None, Some(domain), Some(endpoint)) = (
        &section.jwks_file,
        &section.jwks_url,
        &section.spiffe_trust_domain,
        workload_api,
    ) {
        return Some(KeySource::WorkloadApi {
            endpoint: endpoint.to_owned(),
            trust_domain: domain.clone(),
        });
    }
    match (&section.jwks_file, &section.jwks_url) {
        (Some(_), Some(_)) => {
            problems.add(
                format!("{key}.jwks_file"),
                "give jwks_file or jwks_url, not both",
            );
            None
        }
        (Some(path), None) => match KeySource::file(&base.join(path)) {
            Ok(source) => Some(source),
            Err(e) => {
                problems.add(format!("{key}.jwks_file"), e.to_string());
                None
            }
        },
        (None, url) => {
            let tls = client_tls(section, base, provider, key, problems)?;
            match (url, &section.issuer) {
                (Some(url), _) if !url.starts_with("https://") => {
                    problems.add(
                        format!("{key}.jwks_url"),
                        format!("{url:?} must be an https:// URL"),
                    );
                    None
                }
                (Some(url), _) => Some(KeySource::Url {
                    url: url.clone(),
                    tls,
                }),
                (None, Some(issuer)) if issuer.starts_with("https://") => {
                    Some(KeySource::Discovery {
                        issuer: issuer.clone(),
                        tls,
                    })
                }
                (None, _) => {
                    problems.add(
                        format!("{key}.jwks_url"),
                        "give jwks_file or jwks_url (OIDC discovery needs an https:// issuer; a spiffe_trust_domain issuer takes its JWT bundle from [tls] workload_api when that is set)",
                    );
                    None
                }
            }
        }
    }
}

/// The TLS client configuration for fetching this issuer's keys: its
/// `jwks_ca`, or the system's roots.
fn client_tls(
    section: &IssuerSection,
    base: &Path,
    provider: &Arc<CryptoProvider>,
    key: &str,
    problems: &mut Problems,
) -> Option<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    match &section.jwks_ca {
        Some(path) => {
            for cert in load_certs(&base.join(path), &format!("{key}.jwks_ca"), problems)? {
                if let Err(e) = roots.add(cert) {
                    problems.add(
                        format!("{key}.jwks_ca"),
                        format!("unusable CA certificate: {e}"),
                    );
                    return None;
                }
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                problems.add(
                    format!("{key}.jwks_ca"),
                    "the system has no CA certificates to check the JWKS server with; set jwks_ca",
                );
                return None;
            }
        }
    }
    match ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
    {
        Ok(builder) => Some(Arc::new(
            builder.with_root_certificates(roots).with_no_client_auth(),
        )),
        Err(e) => {
            problems.add(format!("{key}.jwks_ca"), e.to_string());
            None
        }
    }
}
