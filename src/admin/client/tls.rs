//! The client's TLS set-up: the rustls configuration that presents the
//! caller's X.509-SVID and trusts the server's CA, and reading both from
//! PEM files without ever quoting a file's contents.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsConnector;

use super::error::AdminClientError;

/// A connector that presents `cert_chain` (leaf first) with `key`, and
/// trusts a server certificate that chains to one of `server_ca`. Speaks
/// HTTP/1.1 only (ALPN).
pub(super) fn connector(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    server_ca: Vec<CertificateDer<'static>>,
) -> Result<TlsConnector, AdminClientError> {
    configured(Some((cert_chain, key)), server_ca)
}

/// A connector without a client certificate (the caller sends a bearer
/// token with each request instead).
pub(super) fn connector_without_cert(
    server_ca: Vec<CertificateDer<'static>>,
) -> Result<TlsConnector, AdminClientError> {
    configured(None, server_ca)
}

fn configured(
    client_auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    server_ca: Vec<CertificateDer<'static>>,
) -> Result<TlsConnector, AdminClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let (_added, ignored) = roots.add_parsable_certificates(server_ca);
    if roots.is_empty() {
        return Err(AdminClientError::TlsConfig(format!(
            "no usable CA certificate for the server ({ignored} could not be parsed); \
             --ca must hold the CA certificate(s) that issued the admin API's certificate"
        )));
    }
    if client_auth
        .as_ref()
        .is_some_and(|(chain, _)| chain.is_empty())
    {
        return Err(AdminClientError::TlsConfig(
            "the client certificate chain is empty; --cert must hold your X.509-SVID".into(),
        ));
    }

    // The ring provider explicitly: never depend on a process-wide default.
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| AdminClientError::TlsConfig(e.to_string()))?
    .with_root_certificates(roots);
    let mut config = match client_auth {
        None => builder.with_no_client_auth(),
        Some((cert_chain, key)) => builder
            .with_client_auth_cert(cert_chain, key)
            .map_err(|e| {
                AdminClientError::TlsConfig(format!(
                    "the client certificate and key are not usable together ({e}); \
                 check that --key is the private key of --cert"
                ))
            })?,
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Reads every `CERTIFICATE` block of a PEM file; at least one is required.
pub(super) fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| describe_pem_error(&e, "CERTIFICATE"))?;
    if certs.is_empty() {
        return Err(describe_pem_error(&pem::Error::NoItemsFound, "CERTIFICATE"));
    }
    Ok(certs)
}

/// Describes a PEM error without quoting the file (which may be a key).
pub(super) fn describe_pem_error(error: &pem::Error, expected: &str) -> String {
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
