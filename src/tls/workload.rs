//! `[tls] workload_api`: Ephemera's certificate is its own X.509-SVID and
//! the bundles it verifies clients with (its trust domain's and every
//! federated one's) come from the SPIFFE Workload API stream. Each update
//! becomes a new [`TlsMaterial`] for the connections accepted after it;
//! established ones keep theirs. No file, no signal.

use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;

use super::server_config::{admin_config, front_door_config, AdminClients};
use super::{SharedTls, TlsMaterial};
use crate::identity::workload_api::{EndpointError, SvidUnavailable, WorkloadApi, X509Material};
use crate::identity::{SvidVerifier, TrustBundleError};

/// How long `ephemera serve` waits for the first SVID before it gives up.
pub const FIRST_UPDATE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why TLS material could not be had from the Workload API.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadTlsError {
    #[error("tls.workload_api: {0}")]
    Endpoint(#[from] EndpointError),
    #[error("tls.workload_api: {0}")]
    Unavailable(#[from] SvidUnavailable),
    #[error("tls.workload_api: the bundle of trust domain {trust_domain} is not usable: {source}")]
    Bundle {
        trust_domain: String,
        source: TrustBundleError,
    },
    #[error(
        "tls.workload_api: the X.509-SVID of {spiffe_id} and its key cannot serve TLS: {reason}"
    )]
    Certificate { spiffe_id: String, reason: String },
}

impl WorkloadTlsError {
    /// A server that cannot get its certificate cannot accept connections
    /// (08001 for the agent, F0000 for what the configuration names).
    pub fn sqlstate(&self) -> &'static str {
        match self {
            WorkloadTlsError::Endpoint(e) => e.sqlstate(),
            WorkloadTlsError::Unavailable(e) => e.sqlstate(),
            WorkloadTlsError::Bundle { .. } | WorkloadTlsError::Certificate { .. } => "08001",
        }
    }
}

/// The SVID verifier for one update: the SVID's own trust domain with its
/// bundle, and each federated domain with its own (an empty federated
/// bundle trusts nothing and is left out).
pub fn verifier(
    x509: &X509Material,
    provider: &Arc<CryptoProvider>,
) -> Result<SvidVerifier, WorkloadTlsError> {
    let own = x509.trust_domain().to_owned();
    let bundle_error = |trust_domain: &str| {
        let trust_domain = trust_domain.to_owned();
        move |source| WorkloadTlsError::Bundle {
            trust_domain,
            source,
        }
    };
    let own_bundle = x509.bundle(&own).unwrap_or(&[]);
    let mut verifier = SvidVerifier::new(own_bundle, [own.clone()], provider.clone())
        .map_err(bundle_error(&own))?;
    for (trust_domain, certs) in x509.federated() {
        if certs.is_empty() {
            continue;
        }
        verifier = verifier
            .with_federated(trust_domain.to_owned(), certs)
            .map_err(bundle_error(trust_domain))?;
    }
    Ok(verifier)
}

/// The listeners' TLS for one update (the admin API's too if `admin` says
/// who its clients are).
pub fn material(
    x509: &X509Material,
    admin: Option<AdminClients>,
    provider: &Arc<CryptoProvider>,
) -> Result<TlsMaterial, WorkloadTlsError> {
    let svid_verifier = Arc::new(verifier(x509, provider)?);
    let svid = &x509.svid;
    let cert_error = |reason: String| WorkloadTlsError::Certificate {
        spiffe_id: svid.spiffe_id.as_str().to_owned(),
        reason,
    };
    let server = front_door_config(
        svid_verifier.clone(),
        svid.chain.clone(),
        svid.key.clone_key(),
        provider.clone(),
    )
    .map_err(|e| cert_error(e.to_string()))?;
    let admin_acceptor = if let Some(clients) = admin {
        let every_ca: Vec<CertificateDer<'static>> =
            x509.bundles.values().flatten().cloned().collect();
        let config = admin_config(
            &every_ca,
            svid.chain.clone(),
            svid.key.clone_key(),
            clients,
            provider.clone(),
        )
        .map_err(cert_error)?;
        Some(tokio_rustls::TlsAcceptor::from(config))
    } else {
        None
    };
    Ok(TlsMaterial {
        acceptor: tokio_rustls::TlsAcceptor::from(server),
        admin_acceptor,
        svid_verifier,
    })
}

/// The Workload API feeding a [`SharedTls`]: dropping it stops both the
/// client and the task that swaps material in.
pub struct WorkloadTls {
    pub api: Arc<WorkloadApi>,
    pub tls: SharedTls,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WorkloadTls {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WorkloadTls {
    /// Connect to `endpoint`, wait (at most `timeout`) for a valid SVID,
    /// build the first material, and follow every update after it.
    pub async fn start(
        endpoint: &str,
        admin: Option<AdminClients>,
        timeout: Duration,
    ) -> Result<WorkloadTls, WorkloadTlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let api = Arc::new(WorkloadApi::start(endpoint)?);
        let first = api.ready(timeout).await?;
        let tls = SharedTls::new(material(&first, admin, &provider)?);
        tracing::info!(endpoint, spiffe_id = %first.svid.spiffe_id,
            trust_domains = ?first.bundles.keys().collect::<Vec<_>>(),
            "TLS material from the SPIFFE Workload API");
        let task = tokio::spawn(follow(
            api.clone(),
            tls.clone(),
            admin,
            provider,
            first.generation,
        ));
        Ok(WorkloadTls { api, tls, task })
    }
}

/// Swap in the material of every update; one that cannot be used is logged
/// and the previous material stays.
async fn follow(
    api: Arc<WorkloadApi>,
    tls: SharedTls,
    admin: Option<AdminClients>,
    provider: Arc<CryptoProvider>,
    mut generation: u64,
) {
    let mut updates = api.subscribe();
    while updates.changed().await {
        let Some(x509) = api.material() else {
            continue;
        };
        if x509.generation <= generation {
            continue;
        }
        generation = x509.generation;
        match material(&x509, admin, &provider) {
            Ok(material) => {
                tls.replace(material);
                tracing::info!(spiffe_id = %x509.svid.spiffe_id,
                    trust_domains = ?x509.bundles.keys().collect::<Vec<_>>(),
                    "new SVID and bundles from the SPIFFE Workload API in force for new connections");
            }
            Err(error) => tracing::error!(%error,
                "SPIFFE Workload API update not applied; the previous certificate and bundles stay in force"),
        }
    }
}
