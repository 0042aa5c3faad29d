//! The SPIFFE Workload API, as a client: this process's own X.509-SVID and
//! the X.509 trust bundles (its trust domain's and every federated one's),
//! streamed by the agent (SPIRE) over a Unix socket and kept up to date.
//!
//! [`WorkloadApi::start`] runs one background task that connects, follows
//! the `FetchX509SVID` stream and publishes every update as an
//! [`X509Material`] snapshot in a `watch` channel: reading the current
//! material is an `Arc` clone, and [`WorkloadApi::subscribe`] wakes on each
//! update. When the agent goes away the task reconnects with back-off
//! (250 ms doubling to 30 s) and the last good material stays in force;
//! [`WorkloadApi::svid`] then says why nothing better is available.
//!
//! The gRPC client, the `workload.spiffe.io: true` metadata header and the
//! parsing of the agent's DER are the `spiffe` crate's.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use tokio_stream::StreamExt;

use super::spiffe_id::SpiffeId;

/// The first retry after a failure; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// The longest wait between two attempts to reach the agent.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// One X.509-SVID: the chain (leaf first), its private key, whose it is and
/// until when. `Debug` leaves the key out.
pub struct Svid {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub spiffe_id: SpiffeId,
    pub not_after: SystemTime,
}

impl Clone for Svid {
    fn clone(&self) -> Self {
        Svid {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            spiffe_id: self.spiffe_id.clone(),
            not_after: self.not_after,
        }
    }
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("spiffe_id", &self.spiffe_id.as_str())
            .field("chain_len", &self.chain.len())
            .field(
                "not_after",
                &humantime::format_rfc3339_seconds(self.not_after),
            )
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Svid {
    /// Whether `now` is past the SVID's `notAfter`.
    pub fn expired_at(&self, now: SystemTime) -> bool {
        now > self.not_after
    }
}

/// One update from the agent: the default SVID and every X.509 bundle it
/// sent, keyed by trust domain name (`example.org`).
#[derive(Debug, Clone)]
pub struct X509Material {
    pub svid: Arc<Svid>,
    pub bundles: BTreeMap<String, Vec<CertificateDer<'static>>>,
    /// Counts updates from 1, so that a reader can tell a new one.
    pub generation: u64,
}

impl X509Material {
    /// The SVID's own trust domain.
    pub fn trust_domain(&self) -> &str {
        self.svid.spiffe_id.trust_domain()
    }

    /// The CAs of `trust_domain`, if the agent sent its bundle.
    pub fn bundle(&self, trust_domain: &str) -> Option<&[CertificateDer<'static>]> {
        self.bundles.get(trust_domain).map(Vec::as_slice)
    }

    /// The bundles of every trust domain but our own.
    pub fn federated(&self) -> impl Iterator<Item = (&str, &[CertificateDer<'static>])> {
        let own = self.trust_domain().to_owned();
        self.bundles
            .iter()
            .filter(move |(td, _)| **td != own)
            .map(|(td, certs)| (td.as_str(), certs.as_slice()))
    }
}

/// Why no valid SVID is available now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidUnavailable {
    /// The agent cannot be reached, or broke off the stream.
    #[error("the SPIFFE Workload API at {endpoint} is unreachable: {reason}")]
    AgentUnreachable { endpoint: String, reason: String },
    /// Connected (or still trying) but no SVID has arrived yet.
    #[error("no X.509-SVID has been received yet from the SPIFFE Workload API at {endpoint}")]
    NotYetReceived { endpoint: String },
    /// The agent answered but gave nothing usable (no identity for this
    /// workload, or material that does not parse).
    #[error("the SPIFFE Workload API at {endpoint} sent no usable X.509-SVID: {reason}")]
    Rejected { endpoint: String, reason: String },
    /// The last SVID received is past its `notAfter` (the agent has not
    /// sent a newer one).
    #[error("the X.509-SVID of {spiffe_id} expired at {not_after}; the SPIFFE Workload API at {endpoint} has sent no newer one")]
    Expired {
        endpoint: String,
        spiffe_id: String,
        not_after: String,
    },
}

impl SvidUnavailable {
    /// The SQLSTATE a client is refused with: the connection cannot be
    /// established (08001), as when a server cannot be reached.
    pub fn sqlstate(&self) -> &'static str {
        "08001"
    }
}

/// The endpoint given is not one the Workload API can be reached at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{endpoint:?} is not a SPIFFE Workload API endpoint ({reason}); use \"unix:///path/to/agent.sock\"")]
pub struct EndpointError {
    pub endpoint: String,
    pub reason: String,
}

impl EndpointError {
    /// A configuration error (F0000, `config_file_error`).
    pub fn sqlstate(&self) -> &'static str {
        "F0000"
    }
}

/// Check the form of an endpoint (`unix:///path` or `tcp://ip:port`)
/// without connecting.
pub fn parse_endpoint(endpoint: &str) -> Result<(), EndpointError> {
    spiffe::transport::Endpoint::parse(endpoint)
        .map(|_| ())
        .map_err(|e| EndpointError {
            endpoint: endpoint.to_owned(),
            reason: e.to_string(),
        })
}

/// What the background task last saw.
#[derive(Debug, Clone)]
struct State {
    material: Option<Arc<X509Material>>,
    /// The last failure since the last good update, if any.
    problem: Option<SvidUnavailable>,
}

/// A running Workload API client. Dropping it stops the background task.
#[derive(Debug)]
pub struct WorkloadApi {
    endpoint: String,
    state: watch::Receiver<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WorkloadApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WorkloadApi {
    /// Start following the Workload API at `endpoint` (on the current tokio
    /// runtime). Returns at once; see [`WorkloadApi::ready`].
    pub fn start(endpoint: &str) -> Result<WorkloadApi, EndpointError> {
        parse_endpoint(endpoint)?;
        let (tx, rx) = watch::channel(State {
            material: None,
            problem: None,
        });
        let task = tokio::spawn(follow(endpoint.to_owned(), tx));
        Ok(WorkloadApi {
            endpoint: endpoint.to_owned(),
            state: rx,
            task,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The last material received, even if its SVID has expired since.
    pub fn material(&self) -> Option<Arc<X509Material>> {
        self.state.borrow().material.clone()
    }

    /// The current SVID if there is one still valid.
    pub fn current_svid(&self) -> Option<Arc<Svid>> {
        self.svid().ok()
    }

    /// The current SVID, or why there is none that is valid now.
    pub fn svid(&self) -> Result<Arc<Svid>, SvidUnavailable> {
        let state = self.state.borrow();
        usable(&self.endpoint, &state, SystemTime::now()).map(|m| m.svid.clone())
    }

    /// The CAs of `trust_domain` from the last update.
    pub fn bundle(&self, trust_domain: &str) -> Option<Vec<CertificateDer<'static>>> {
        let state = self.state.borrow();
        state
            .material
            .as_ref()?
            .bundle(trust_domain)
            .map(<[_]>::to_vec)
    }

    /// Every bundle from the last update (own trust domain and federated).
    pub fn bundles(&self) -> BTreeMap<String, Vec<CertificateDer<'static>>> {
        let state = self.state.borrow();
        state
            .material
            .as_ref()
            .map(|m| m.bundles.clone())
            .unwrap_or_default()
    }

    /// Wakes on every update (and every failure); [`WorkloadApi::material`]
    /// and [`WorkloadApi::svid`] read what it announced.
    pub fn subscribe(&self) -> Updates {
        Updates(self.state.clone())
    }

    /// Wait for material with a valid SVID, at most `timeout`; on timeout,
    /// the reason there is none.
    pub async fn ready(&self, timeout: Duration) -> Result<Arc<X509Material>, SvidUnavailable> {
        let mut rx = self.state.clone();
        let ok = |state: &State| usable(&self.endpoint, state, SystemTime::now()).is_ok();
        // On timeout (or a stopped task), the state says why.
        let _ = tokio::time::timeout(timeout, rx.wait_for(ok)).await;
        let state = self.state.borrow();
        usable(&self.endpoint, &state, SystemTime::now())
    }

    /// Wait for the next update after `generation` (material newer than
    /// the one a caller has), at most `timeout`.
    pub async fn next_after(
        &self,
        generation: u64,
        timeout: Duration,
    ) -> Option<Arc<X509Material>> {
        let mut rx = self.state.clone();
        let newer = |s: &State| {
            s.material
                .as_ref()
                .is_some_and(|m| m.generation > generation)
        };
        let state = tokio::time::timeout(timeout, rx.wait_for(newer))
            .await
            .ok()?
            .ok()?;
        state.material.clone()
    }
}

/// See [`WorkloadApi::subscribe`].
#[derive(Debug)]
pub struct Updates(watch::Receiver<State>);

impl Updates {
    /// Wait for the next change; `false` once the client has stopped.
    pub async fn changed(&mut self) -> bool {
        self.0.changed().await.is_ok()
    }
}

/// Connect once, take the first update, and disconnect (for
/// `check-config --connect`).
pub async fn fetch_once(
    endpoint: &str,
    timeout: Duration,
) -> Result<Arc<X509Material>, FetchOnceError> {
    let api = WorkloadApi::start(endpoint).map_err(FetchOnceError::Endpoint)?;
    api.ready(timeout)
        .await
        .map_err(FetchOnceError::Unavailable)
}

/// The JWT bundle of `trust_domain` (a JWKS document: `{"keys": [...]}`),
/// asked of the Workload API once (`FetchJWTBundles`), at most `timeout`.
/// The token issuers' key cache calls it as it would fetch a JWKS URL.
pub async fn fetch_jwt_bundle(
    endpoint: &str,
    trust_domain: &str,
    timeout: Duration,
) -> Result<serde_json::Value, String> {
    let fetch = async {
        let client = spiffe::WorkloadApiClient::connect_to(endpoint)
            .await
            .map_err(|e| format!("the SPIFFE Workload API at {endpoint} is unreachable: {e}"))?;
        let set = client.fetch_jwt_bundles().await.map_err(|e| {
            format!("the SPIFFE Workload API at {endpoint} sent no JWT bundles: {e}")
        })?;
        let domain = spiffe::TrustDomain::new(trust_domain)
            .map_err(|e| format!("{trust_domain:?} is not a trust domain: {e}"))?;
        let bundle = set.get(&domain).ok_or_else(|| {
            format!("the SPIFFE Workload API at {endpoint} has no JWT bundle for {trust_domain}")
        })?;
        let keys = bundle
            .jwt_authorities()
            .map(|authority| serde_json::from_slice(authority.jwk_json()))
            .collect::<Result<Vec<serde_json::Value>, _>>()
            .map_err(|e| format!("a JWT authority of {trust_domain} is not JSON: {e}"))?;
        Ok(serde_json::json!({ "keys": keys }))
    };
    tokio::time::timeout(timeout, fetch).await.map_err(|_| {
        format!("the SPIFFE Workload API at {endpoint} did not send JWT bundles within {timeout:?}")
    })?
}

/// Why [`fetch_once`] got nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchOnceError {
    #[error(transparent)]
    Endpoint(EndpointError),
    #[error(transparent)]
    Unavailable(SvidUnavailable),
}

impl FetchOnceError {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            FetchOnceError::Endpoint(e) => e.sqlstate(),
            FetchOnceError::Unavailable(e) => e.sqlstate(),
        }
    }
}

/// The material if its SVID is valid at `now`, or why not.
fn usable(
    endpoint: &str,
    state: &State,
    now: SystemTime,
) -> Result<Arc<X509Material>, SvidUnavailable> {
    match &state.material {
        Some(m) if !m.svid.expired_at(now) => Ok(m.clone()),
        Some(m) => Err(SvidUnavailable::Expired {
            endpoint: endpoint.to_owned(),
            spiffe_id: m.svid.spiffe_id.as_str().to_owned(),
            not_after: humantime::format_rfc3339_seconds(m.svid.not_after).to_string(),
        }),
        None => Err(state
            .problem
            .clone()
            .unwrap_or_else(|| SvidUnavailable::NotYetReceived {
                endpoint: endpoint.to_owned(),
            })),
    }
}

/// The background task: connect, follow the stream, publish, and on any
/// failure keep the last good material and try again after a back-off.
async fn follow(endpoint: String, tx: watch::Sender<State>) {
    let mut backoff = FIRST_BACKOFF;
    let mut generation = 0u64;
    loop {
        let problem = match stream_once(&endpoint, &tx, &mut generation, &mut backoff).await {
            Ok(()) => SvidUnavailable::AgentUnreachable {
                endpoint: endpoint.clone(),
                reason: "the agent closed the stream".into(),
            },
            Err(problem) => problem,
        };
        tracing::warn!(endpoint = %endpoint, problem = %problem,
            retry_in_ms = backoff.as_millis() as u64,
            "SPIFFE Workload API: no update; keeping the last good SVID and bundles");
        tx.send_modify(|s| s.problem = Some(problem));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection: returns when the stream ends (`Ok`) or fails.
async fn stream_once(
    endpoint: &str,
    tx: &watch::Sender<State>,
    generation: &mut u64,
    backoff: &mut Duration,
) -> Result<(), SvidUnavailable> {
    let unreachable = |e: spiffe::WorkloadApiError| SvidUnavailable::AgentUnreachable {
        endpoint: endpoint.to_owned(),
        reason: e.to_string(),
    };
    let client = spiffe::WorkloadApiClient::connect_to(endpoint)
        .await
        .map_err(unreachable)?;
    let mut stream = client
        .stream_x509_contexts()
        .await
        .map_err(|e| classify(endpoint, e))?;
    while let Some(item) = stream.next().await {
        let context = item.map_err(|e| classify(endpoint, e))?;
        match convert(&context, *generation + 1) {
            Ok(material) => {
                *generation += 1;
                *backoff = FIRST_BACKOFF;
                tracing::info!(endpoint = %endpoint, spiffe_id = %material.svid.spiffe_id,
                    trust_domains = ?material.bundles.keys().collect::<Vec<_>>(),
                    not_after = %humantime::format_rfc3339_seconds(material.svid.not_after),
                    "SPIFFE Workload API: X.509-SVID and bundles updated");
                tx.send_replace(State {
                    material: Some(Arc::new(material)),
                    problem: None,
                });
            }
            Err(reason) => {
                let problem = SvidUnavailable::Rejected {
                    endpoint: endpoint.to_owned(),
                    reason,
                };
                tracing::warn!(problem = %problem, "SPIFFE Workload API: update ignored");
                tx.send_modify(|s| s.problem = Some(problem));
            }
        }
    }
    Ok(())
}

/// Transport failures are "unreachable"; the agent's own refusals (no
/// identity, a request it calls invalid) and unparsable answers are
/// "rejected".
fn classify(endpoint: &str, e: spiffe::WorkloadApiError) -> SvidUnavailable {
    let reason = e.to_string();
    let endpoint = endpoint.to_owned();
    if matches!(e, spiffe::WorkloadApiError::Transport(_)) && !e.is_invalid_argument() {
        SvidUnavailable::AgentUnreachable { endpoint, reason }
    } else {
        SvidUnavailable::Rejected { endpoint, reason }
    }
}

/// The spiffe crate's default SVID and bundles, in rustls' types.
fn convert(context: &spiffe::X509Context, generation: u64) -> Result<X509Material, String> {
    let svid = context
        .default_svid()
        .ok_or_else(|| "the update holds no X.509-SVID".to_owned())?;
    let chain: Vec<CertificateDer<'static>> = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let leaf = chain.first().ok_or("the X.509-SVID has no certificate")?;
    let not_after = not_after(leaf)?;
    let spiffe_id = SpiffeId::parse(&svid.spiffe_id().to_string())
        .map_err(|e| format!("the X.509-SVID's SPIFFE ID is not valid: {e}"))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        svid.private_key().as_bytes().to_vec(),
    ));
    let bundles = context
        .bundle_set()
        .iter()
        .map(|(td, bundle)| {
            let certs = bundle
                .authorities()
                .iter()
                .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
                .collect();
            (td.to_string(), certs)
        })
        .collect::<BTreeMap<_, _>>();
    if !bundles.contains_key(spiffe_id.trust_domain()) {
        return Err(format!(
            "the update holds no bundle for the SVID's own trust domain {}",
            spiffe_id.trust_domain()
        ));
    }
    Ok(X509Material {
        svid: Arc::new(Svid {
            chain,
            key,
            spiffe_id,
            not_after,
        }),
        bundles,
        generation,
    })
}

/// A certificate's `notAfter`.
fn not_after(cert: &CertificateDer<'_>) -> Result<SystemTime, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| format!("the X.509-SVID does not parse: {e}"))?;
    let secs = parsed.validity().not_after.timestamp();
    let secs = u64::try_from(secs).map_err(|_| "the X.509-SVID expired before 1970".to_owned())?;
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}
