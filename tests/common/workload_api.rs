//! A SPIFFE Workload API of the tests' own, on a Unix socket in a temp dir,
//! speaking the published protocol (`proto/workload.proto`, stubs from
//! `tests/workload-api`): `FetchX509SVID` and `FetchX509Bundles` stream the
//! material the test set, and every [`TestWorkloadApi::push`] sends an update
//! down every open stream; `FetchJWTBundles` streams the JWKS the test set.
//! As SPIRE's agent does, every call without the `workload.spiffe.io: true`
//! metadata header is refused with `InvalidArgument`, and a workload with
//! no SVID gets `PermissionDenied` ("no identity issued").
//!
//! [`TestWorkloadApi::stop`] takes the agent away (streams end, socket
//! gone) and [`TestWorkloadApi::resume`] brings it back on the same path.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ephemera_test_workload_api::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use ephemera_test_workload_api::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest,
    X509svidResponse,
};
use rustls::pki_types::CertificateDer;
use tokio::sync::{oneshot, watch};
use tokio_stream::wrappers::WatchStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::pki::TestCert;

/// What the agent hands out now.
#[derive(Clone, Debug, Default)]
pub struct WorkloadMaterial {
    /// The workload's SVID and its SPIFFE ID; `None`: no identity issued.
    pub svid: Option<(String, TestCert)>,
    /// Every trust domain's CAs (name without scheme, e.g. `example.org`);
    /// the SVID's own domain goes in the SVID's entry, the others in
    /// `federated_bundles`.
    pub bundles: BTreeMap<String, Vec<CertificateDer<'static>>>,
    /// JWKS documents by trust domain, for `FetchJWTBundles`.
    pub jwt_bundles: BTreeMap<String, Vec<u8>>,
}

impl WorkloadMaterial {
    /// An SVID for `spiffe_id` and the bundle of its trust domain.
    pub fn new(spiffe_id: &str, svid: TestCert, bundle: Vec<CertificateDer<'static>>) -> Self {
        let td = trust_domain_of(spiffe_id);
        WorkloadMaterial {
            svid: Some((spiffe_id.to_owned(), svid)),
            bundles: BTreeMap::from([(td, bundle)]),
            jwt_bundles: BTreeMap::new(),
        }
    }

    /// This material with `trust_domain`'s bundle set to `certs`.
    pub fn with_bundle(mut self, trust_domain: &str, certs: Vec<CertificateDer<'static>>) -> Self {
        self.bundles.insert(trust_domain.to_owned(), certs);
        self
    }
}

fn trust_domain_of(spiffe_id: &str) -> String {
    let rest = spiffe_id.strip_prefix("spiffe://").expect("a spiffe:// ID");
    rest.split('/').next().unwrap().to_owned()
}

fn concat(certs: &[CertificateDer<'static>]) -> Vec<u8> {
    certs.iter().flat_map(|c| c.as_ref().to_vec()).collect()
}

/// The state every stream follows: `None` while the agent is stopped.
type Shared = watch::Sender<Option<WorkloadMaterial>>;

struct Agent {
    state: Arc<Shared>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl Agent {
    /// The material as it changes, until the agent stops.
    fn follow(&self) -> impl Stream<Item = WorkloadMaterial> + Send + 'static {
        WatchStream::new(self.state.subscribe())
            .take_while(Option::is_some)
            .map(|m| m.unwrap())
    }
}

fn x509_response(m: &WorkloadMaterial) -> Result<X509svidResponse, Status> {
    let Some((spiffe_id, cert)) = &m.svid else {
        return Err(Status::permission_denied("no identity issued"));
    };
    let own = trust_domain_of(spiffe_id);
    let key = match cert.key_der() {
        rustls::pki_types::PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        _ => unreachable!("rcgen keys are PKCS#8"),
    };
    Ok(X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: spiffe_id.clone(),
            x509_svid: concat(&cert.chain_der()),
            x509_svid_key: key,
            bundle: concat(m.bundles.get(&own).map(Vec::as_slice).unwrap_or(&[])),
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: m
            .bundles
            .iter()
            .filter(|(td, _)| **td != own)
            .map(|(td, certs)| (format!("spiffe://{td}"), concat(certs)))
            .collect(),
    })
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for Agent {
    type FetchX509SVIDStream = BoxStream<X509svidResponse>;
    type FetchX509BundlesStream = BoxStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = BoxStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        _request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let mut failed = false;
        let stream = self
            .follow()
            .map(|m| x509_response(&m))
            .take_while(move |r| {
                // One error ends the stream, as the agent does.
                let go = !failed;
                failed |= r.is_err();
                go
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_x509_bundles(
        &self,
        _request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let stream = self.follow().map(|m| {
            Ok(X509BundlesResponse {
                crl: Vec::new(),
                bundles: m
                    .bundles
                    .iter()
                    .map(|(td, certs)| (format!("spiffe://{td}"), concat(certs)))
                    .collect(),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_jwtsvid(
        &self,
        _request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        Err(Status::unimplemented("the test agent issues no JWT-SVIDs"))
    }

    async fn fetch_jwt_bundles(
        &self,
        _request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let stream = self.follow().map(|m| {
            Ok(JwtBundlesResponse {
                bundles: m
                    .jwt_bundles
                    .iter()
                    .map(|(td, jwks)| (format!("spiffe://{td}"), jwks.clone()))
                    .collect(),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn validate_jwtsvid(
        &self,
        _request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented(
            "the test agent validates no JWT-SVIDs",
        ))
    }
}

/// A running test agent.
pub struct TestWorkloadApi {
    dir: tempfile::TempDir,
    state: Arc<Shared>,
    /// Calls refused for a missing `workload.spiffe.io` header.
    pub refused_without_header: Arc<AtomicUsize>,
    /// Calls that carried the header.
    pub calls: Arc<AtomicUsize>,
    server: Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
}

impl TestWorkloadApi {
    /// Serve `material` on a new socket.
    pub async fn start(material: WorkloadMaterial) -> TestWorkloadApi {
        let (tx, _) = watch::channel(Some(material));
        let mut api = TestWorkloadApi {
            dir: tempfile::tempdir().expect("a temp dir for the agent socket"),
            state: Arc::new(tx),
            refused_without_header: Arc::new(AtomicUsize::new(0)),
            calls: Arc::new(AtomicUsize::new(0)),
            server: None,
        };
        api.listen();
        api
    }

    pub fn socket_path(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    /// `unix:///…/agent.sock`, as `[tls] workload_api` takes it.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket_path().display())
    }

    /// Send `material` down every open stream (and to every new one).
    pub fn push(&self, material: WorkloadMaterial) {
        self.state.send_replace(Some(material));
    }

    /// The agent goes away: open streams end and the socket is removed.
    pub async fn stop(&mut self) {
        let last = self.state.send_replace(None);
        if let Some((tx, task)) = self.server.take() {
            let _ = tx.send(());
            let _ = task.await;
        }
        let _ = std::fs::remove_file(self.socket_path());
        self.state.send_replace(last);
    }

    /// Serve again on the same socket (after [`TestWorkloadApi::stop`]).
    pub fn resume(&mut self) {
        if self.server.is_none() {
            self.listen();
        }
    }

    fn listen(&mut self) {
        let path = self.socket_path();
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).expect("binding the agent socket");
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let (refused, calls) = (self.refused_without_header.clone(), self.calls.clone());
        let check = move |request: Request<()>| -> Result<Request<()>, Status> {
            match request.metadata().get("workload.spiffe.io") {
                Some(v) if v == "true" => {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Ok(request)
                }
                _ => {
                    refused.fetch_add(1, Ordering::SeqCst);
                    Err(Status::invalid_argument(
                        "security header missing from request",
                    ))
                }
            }
        };
        let service = SpiffeWorkloadApiServer::with_interceptor(
            Agent {
                state: self.state.clone(),
            },
            check,
        );
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = rx.await;
                })
                .await;
        });
        self.server = Some((tx, task));
    }
}

impl Drop for TestWorkloadApi {
    fn drop(&mut self) {
        self.state.send_replace(None);
        if let Some((tx, task)) = self.server.take() {
            let _ = tx.send(());
            task.abort();
        }
    }
}
