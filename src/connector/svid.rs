//! Where the connector's X.509-SVID comes from: the [`SvidSource`] seam,
//! [`FileSvid`], an SVID in PEM files that is re-read when they change,
//! and the SPIFFE Workload API ([`workload_api_source`]), whose stream of
//! updates the client in `identity::workload_api` follows in the background.
//!
//! A source is asked for the current SVID once per connection (and by
//! `/readyz`), so a rotation takes effect for the next connection with no
//! restart and no signal; sessions already open keep the TLS connection
//! they made with the SVID of their time.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::identity::workload_api::{self, EndpointError, WorkloadApi};
use crate::identity::SpiffeId;

/// An X.509-SVID the connector presents to Ephemera: the chain (leaf
/// first), its private key, who it names and until when it is valid.
/// `Debug` never shows the key.
pub struct ClientSvid {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub spiffe_id: SpiffeId,
    pub not_after: OffsetDateTime,
}

impl Clone for ClientSvid {
    fn clone(&self) -> Self {
        ClientSvid {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            spiffe_id: self.spiffe_id.clone(),
            not_after: self.not_after,
        }
    }
}

impl fmt::Debug for ClientSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSvid")
            .field("spiffe_id", &self.spiffe_id.as_str())
            .field("not_after", &self.not_after)
            .field("chain_len", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Why there is no SVID to present. The message is what the application
/// sees in its `FATAL` (SQLSTATE 08001) and what `/readyz` answers, so it
/// names the cause and what to check; it never quotes a file's contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidUnavailable {
    /// From the SPIFFE Workload API: the agent is unreachable, has sent
    /// nothing yet or nothing usable, or its last SVID has expired.
    #[error(transparent)]
    WorkloadApi(#[from] workload_api::SvidUnavailable),
    #[error("the connector's X.509-SVID expired at {not_after}; it has not been rotated")]
    Expired { not_after: String },
    #[error("the connector's X.509-SVID is not valid before {not_before}")]
    NotYetValid { not_before: String },
    #[error("cannot use the X.509-SVID file {path}: {reason}")]
    Files { path: PathBuf, reason: String },
    #[error("the X.509-SVID in {path} is not usable: {reason}")]
    NotAnSvid { path: PathBuf, reason: String },
}

impl SvidUnavailable {
    /// A short label for metrics (`ephemera_connector_errors_total{cause}`).
    pub fn label(&self) -> &'static str {
        match self {
            SvidUnavailable::WorkloadApi(from_agent) => match from_agent {
                workload_api::SvidUnavailable::AgentUnreachable { .. } => "svid_agent_unreachable",
                workload_api::SvidUnavailable::NotYetReceived { .. } => "svid_not_yet_received",
                workload_api::SvidUnavailable::Rejected { .. } => "svid_rejected",
                workload_api::SvidUnavailable::Expired { .. } => "svid_expired",
            },
            SvidUnavailable::Expired { .. } => "svid_expired",
            SvidUnavailable::NotYetValid { .. } => "svid_not_yet_valid",
            SvidUnavailable::Files { .. } | SvidUnavailable::NotAnSvid { .. } => "svid_files",
        }
    }
}

/// The source of the SVID the connector presents, asked once per connection.
pub trait SvidSource: Send + Sync {
    /// The SVID to use now, or why there is none. A source returns an
    /// expired SVID as [`SvidUnavailable::Expired`], never the SVID.
    fn current(&self) -> Result<ClientSvid, SvidUnavailable>;
}

/// The source for `--workload-api ADDR`: a Workload API client that
/// follows the agent's stream in the background (it must be called on a
/// tokio runtime). It returns at once: while the agent has sent nothing,
/// connections are refused saying so, and `/readyz` is 503. Only a
/// malformed address fails here.
pub fn workload_api_source(endpoint: &str) -> Result<Arc<dyn SvidSource>, EndpointError> {
    Ok(Arc::new(WorkloadApiSvid {
        api: WorkloadApi::start(endpoint)?,
    }))
}

/// The latest X.509-SVID the SPIFFE Workload API has pushed; an update
/// replaces it for the next connection.
#[derive(Debug)]
struct WorkloadApiSvid {
    api: WorkloadApi,
}

impl SvidSource for WorkloadApiSvid {
    fn current(&self) -> Result<ClientSvid, SvidUnavailable> {
        let svid = self.api.svid()?;
        Ok(ClientSvid {
            chain: svid.chain.clone(),
            key: svid.key.clone_key(),
            spiffe_id: svid.spiffe_id.clone(),
            not_after: OffsetDateTime::from(svid.not_after),
        })
    }
}

/// What identifies the files' contents: a SHA-256 over both. Reading two
/// small files per connection costs microseconds, and unlike an mtime it
/// sees a rewrite within the same clock tick.
type Stamp = [u8; 32];

fn read_file(path: &Path) -> Result<Vec<u8>, SvidUnavailable> {
    std::fs::read(path).map_err(|e| SvidUnavailable::Files {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// An SVID in two PEM files (`--cert`: leaf first, then intermediates;
/// `--key`: its private key). Each call reads both files; they are parsed
/// again only when either changed.
pub struct FileSvid {
    cert: PathBuf,
    key: PathBuf,
    cached: Mutex<Option<(Stamp, ClientSvid)>>,
}

impl fmt::Debug for FileSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileSvid")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl FileSvid {
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> FileSvid {
        FileSvid {
            cert: cert.into(),
            key: key.into(),
            cached: Mutex::new(None),
        }
    }

    fn parse(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<ClientSvid, SvidUnavailable> {
        let files = |path: &Path, reason: String| SvidUnavailable::Files {
            path: path.to_owned(),
            reason,
        };
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| files(&self.cert, pem_reason(&e, "CERTIFICATE")))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| files(&self.key, pem_reason(&e, "PRIVATE KEY")))?;
        let leaf = chain
            .first()
            .ok_or_else(|| files(&self.cert, "no CERTIFICATE PEM block found".into()))?;
        let (spiffe_id, not_before, not_after) =
            leaf_facts(leaf).map_err(|reason| SvidUnavailable::NotAnSvid {
                path: self.cert.clone(),
                reason,
            })?;
        if not_before > OffsetDateTime::now_utc() {
            return Err(SvidUnavailable::NotYetValid {
                not_before: rfc3339(not_before),
            });
        }
        Ok(ClientSvid {
            chain,
            key,
            spiffe_id,
            not_after,
        })
    }
}

impl SvidSource for FileSvid {
    fn current(&self) -> Result<ClientSvid, SvidUnavailable> {
        use sha2::{Digest, Sha256};
        let (cert_pem, key_pem) = (read_file(&self.cert)?, read_file(&self.key)?);
        let mut digest = Sha256::new();
        digest.update((cert_pem.len() as u64).to_be_bytes());
        digest.update(&cert_pem);
        digest.update(&key_pem);
        let stamp: Stamp = digest.finalize().into();
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let svid = match cached.as_ref() {
            Some((seen, svid)) if *seen == stamp => svid.clone(),
            _ => {
                *cached = None;
                let svid = self.parse(&cert_pem, &key_pem)?;
                *cached = Some((stamp, svid.clone()));
                svid
            }
        };
        drop(cached);
        if svid.not_after <= OffsetDateTime::now_utc() {
            return Err(SvidUnavailable::Expired {
                not_after: rfc3339(svid.not_after),
            });
        }
        Ok(svid)
    }
}

/// The leaf's SPIFFE ID (exactly one `spiffe://` URI SAN) and validity.
fn leaf_facts(
    leaf: &CertificateDer<'_>,
) -> Result<(SpiffeId, OffsetDateTime, OffsetDateTime), String> {
    let (_, cert) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|_| "the first certificate cannot be parsed".to_owned())?;
    let mut uris = Vec::new();
    for extension in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = extension.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    uris.push(*uri);
                }
            }
        }
    }
    let id = match uris.as_slice() {
        [uri] => SpiffeId::parse(uri).map_err(|e| format!("its URI SAN: {e}"))?,
        other => {
            return Err(format!(
                "an X.509-SVID carries exactly one spiffe:// URI SAN; the first certificate has {}",
                other.len()
            ))
        }
    };
    let validity = cert.validity();
    Ok((
        id,
        validity.not_before.to_datetime(),
        validity.not_after.to_datetime(),
    ))
}

pub(crate) fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| at.to_string())
}

/// A PEM error, without quoting the file (it may be a key).
pub(crate) fn pem_reason(error: &rustls::pki_types::pem::Error, expected: &str) -> String {
    use rustls::pki_types::pem::Error;
    match error {
        Error::Io(e) => e.to_string(),
        Error::NoItemsFound => format!("no {expected} PEM block found"),
        _ => format!("the file is not valid PEM (expected {expected})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_named() {
        let source = FileSvid::new("/nonexistent/svid.pem", "/nonexistent/svid-key.pem");
        let error = source.current().unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent/svid.pem"),
            "{error}"
        );
        assert_eq!(error.label(), "svid_files");
    }

    #[test]
    fn a_malformed_workload_api_address_is_refused_at_start() {
        let error = workload_api_source("/run/spire/agent.sock").err().unwrap();
        assert!(error.to_string().contains("unix:///"), "{error}");
    }

    #[tokio::test]
    async fn an_unreachable_agent_is_named_with_its_address() {
        let source = workload_api_source("unix:///nonexistent/agent.sock").unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let error = loop {
            let error = source.current().err().unwrap();
            if error.label() != "svid_not_yet_received" || tokio::time::Instant::now() > deadline {
                break error;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert_eq!(error.label(), "svid_agent_unreachable", "{error}");
        assert!(
            error.to_string().contains("unix:///nonexistent/agent.sock"),
            "{error}"
        );
    }
}
