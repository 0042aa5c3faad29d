//! The server: the listening socket, the shared state every connection
//! uses ([`Services`]), the background tasks, the accept loop, reloads and
//! an orderly shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::RwLock;
use std::time::Duration;

use ephemera_engine::Engine;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::admin::{AdminServer, AdminState};
use crate::config::{AdminSettings, ConfigErrors, FrontTls, Settings};
use crate::engines::{EngineRegistry, Engines};
use crate::leases::{LeaseManager, SharedRules};
use crate::ops::audit::AuditLog;
use crate::session::cancel::CancelMap;
use crate::session::services::Services;
use crate::session::{self, front_door};
use crate::tls::server_config::AdminClients;
use crate::tls::workload::{WorkloadTls, WorkloadTlsError, FIRST_UPDATE_TIMEOUT};
use crate::tls::{SharedTls, TlsMaterial};
use crate::workers::{WorkerLoad, Workers};

/// How long shutdown waits for leases to be revoked.
const SHUTDOWN_REVOKE_DEADLINE: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set up the engine: {0}")]
    Engine(#[from] ephemera_engine::EngineError),
    #[error("cannot start the session threads: {0}")]
    Workers(std::io::Error),
    #[error("cannot get Ephemera's certificate and trust bundles: {0}")]
    WorkloadApi(#[from] WorkloadTlsError),
    #[error("cannot open the audit log {path}: {source}")]
    Audit {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct Server {
    listener: TcpListener,
    services: Arc<Services>,
    admin: Option<AdminServer>,
    reaper_interval: Duration,
    reloader: Reloader,
    revoke_standalone_on_shutdown: bool,
}

/// Reloads templates, policy, the upstream admin credentials, Ephemera's
/// certificate and the SPIFFE trust bundle from the configuration file
/// (SIGHUP). Listen addresses, limits and the upstream address are not
/// reloaded: restart for those.
#[derive(Clone)]
pub struct Reloader {
    source: Option<PathBuf>,
    rules: SharedRules,
    engines: Arc<Engines>,
    /// The engine kinds the configuration was loaded with.
    registry: EngineRegistry,
    tls: SharedTls,
    /// With `[tls] workload_api`: the stream that feeds `tls` (kept alive
    /// here; a reload leaves the TLS material to it).
    workload: Option<Arc<WorkloadTls>>,
}

impl Reloader {
    pub fn reload(&self) -> Result<(), ConfigErrors> {
        let Some(path) = &self.source else {
            return Ok(());
        };
        let settings = Settings::load_with(path, self.registry.clone())?;
        // The one step that can still fail comes first, so that a refused
        // reload changes nothing. A rotated admin password applies to new
        // admin connections from now on (the server address is not
        // reloaded).
        self.engines
            .reload(&settings.engines)
            .map_err(|e| ConfigErrors {
                path: path.clone(),
                problems: vec![crate::config::ConfigProblem {
                    key: "templates".into(),
                    message: e.to_string(),
                }],
            })?;
        *self.rules.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(settings.rules);
        match (settings.front_tls, &self.workload) {
            (
                FrontTls::Files {
                    server_tls,
                    svid_verifier,
                },
                None,
            ) => {
                self.tls.replace(TlsMaterial {
                    acceptor: TlsAcceptor::from(server_tls),
                    admin_acceptor: settings
                        .admin
                        .and_then(|admin| admin.tls)
                        .map(TlsAcceptor::from),
                    svid_verifier,
                });
                tracing::info!(path = %path.display(),
                    "templates, policy, admin credentials, certificate and trust bundle reloaded");
            }
            (FrontTls::WorkloadApi { endpoint }, Some(workload))
                if endpoint == workload.api.endpoint() =>
            {
                tracing::info!(path = %path.display(),
                    "templates, policy and admin credentials reloaded; certificate and trust bundles follow the SPIFFE Workload API");
            }
            _ => tracing::warn!(path = %path.display(),
                "templates, policy and admin credentials reloaded; [tls] changed between files and tls.workload_api (or its endpoint): restart for that"),
        }
        Ok(())
    }
}

/// The listeners' TLS: from the files as loaded, or from the Workload API
/// (waiting for its first SVID, then following it).
async fn front_tls(
    front: FrontTls,
    admin: Option<&AdminSettings>,
    admin_clients: AdminClients,
) -> Result<(SharedTls, Option<Arc<WorkloadTls>>), WorkloadTlsError> {
    match front {
        FrontTls::Files {
            server_tls,
            svid_verifier,
        } => Ok((
            SharedTls::new(TlsMaterial {
                acceptor: TlsAcceptor::from(server_tls),
                admin_acceptor: admin
                    .and_then(|admin| admin.tls.clone())
                    .map(TlsAcceptor::from),
                svid_verifier,
            }),
            None,
        )),
        FrontTls::WorkloadApi { endpoint } => {
            let workload = WorkloadTls::start(
                &endpoint,
                admin.map(|_| admin_clients),
                FIRST_UPDATE_TIMEOUT,
            )
            .await?;
            Ok((workload.tls.clone(), Some(Arc::new(workload))))
        }
    }
}

/// The audit log of `[audit]`: its file, or the process log only.
fn open_audit(settings: &Settings) -> Result<AuditLog, ServeError> {
    match &settings.audit_path {
        Some(path) => AuditLog::open(path, settings.audit_statement_queue).map_err(|source| {
            ServeError::Audit {
                path: path.clone(),
                source,
            }
        }),
        None => Ok(AuditLog::log_only()),
    }
}

impl Server {
    /// Bind the listening socket and build the shared state. Nothing is
    /// accepted until [`Server::serve`].
    pub async fn bind(settings: Settings) -> Result<Server, ServeError> {
        // The connection caps, not a default soft limit of 1 024, should be
        // what bounds us (SECURITY.md, finding 5).
        match crate::ops::limits::raise_file_limit() {
            Ok(limit) => tracing::debug!(limit, "open file limit"),
            Err(error) => tracing::warn!(%error, "cannot raise the open file limit"),
        }
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| ServeError::Bind {
                    address: settings.listen,
                    source,
                })?;
        let admin_listener =
            match &settings.admin {
                Some(admin) => Some(TcpListener::bind(admin.listen).await.map_err(|source| {
                    ServeError::Bind {
                        address: admin.listen,
                        source,
                    }
                })?),
                None => None,
            };
        let audit = open_audit(&settings)?;
        let engines = Engines::start(&settings.engines)?;
        let engine: Arc<dyn Engine> = engines.clone();
        let admin_clients = AdminClients::for_tokens(!settings.rules.tokens.is_empty());
        let rules: SharedRules = Arc::new(RwLock::new(Arc::new(settings.rules)));
        let leases = LeaseManager::new(
            engine,
            rules.clone(),
            Arc::new(audit),
            settings.lease.bind_to_svid,
        );
        let metrics = crate::ops::telemetry::prometheus();
        let issue_limiter = Arc::new(crate::ops::limits::RateLimiter::new(
            settings.lease.issue_rate_per_identity,
            settings.lease.issue_burst_per_identity,
        ));
        let (tls, workload) =
            front_tls(settings.front_tls, settings.admin.as_ref(), admin_clients).await?;
        let services = Arc::new(Services {
            handshake_timeout: settings.handshake_timeout,
            tls: tls.clone(),
            rules: rules.clone(),
            upstream: settings.upstream.clone(),
            leases: leases.clone(),
            cancels: CancelMap::new(),
            sessions: Arc::new(tokio::sync::Semaphore::new(settings.max_connections)),
            max_connections: settings.max_connections,
            issue_limiter: issue_limiter.clone(),
            refusal_events: crate::ops::limits::RefusalEvents::default(),
            relay_threads: Workers::start(WorkerLoad::new(settings.workers))
                .map_err(ServeError::Workers)?,
            pools: Arc::default(),
        });
        let admin = match (settings.admin, admin_listener) {
            (Some(admin), Some(listener)) => Some(AdminServer::new(
                listener,
                admin,
                tls.clone(),
                AdminState {
                    leases,
                    issue_limiter,
                    upstream: settings.upstream,
                    metrics,
                },
            )),
            _ => None,
        };
        Ok(Server {
            listener,
            services,
            admin,
            reaper_interval: settings.lease.reap_interval,
            reloader: Reloader {
                source: settings.source,
                rules,
                engines,
                registry: settings.engines.registry.clone(),
                tls,
                workload,
            },
            revoke_standalone_on_shutdown: false,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has an address")
    }

    pub fn services(&self) -> Arc<Services> {
        self.services.clone()
    }

    /// The admin API's address, if it is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminServer::local_addr)
    }

    /// Also revoke standalone leases at shutdown (`ephemera dev`); by
    /// default they outlive a restart and expire on their own.
    pub fn revoke_standalone_on_shutdown(mut self) -> Self {
        self.revoke_standalone_on_shutdown = true;
        self
    }

    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// Accept connections until `shutdown` completes; then stop accepting,
    /// revoke every lease (which terminates the sessions' backends) and
    /// wait for the revocations.
    ///
    /// This future's runtime runs the accept loop, the handshakes, the
    /// admin API, the lease clock and the reaper; established sessions are
    /// relayed on the session threads ([`Workers`]).
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Server {
            listener,
            services,
            admin,
            reaper_interval,
            reloader,
            revoke_standalone_on_shutdown,
        } = self;
        let connections = TaskTracker::new();
        let mut background = tokio::task::JoinSet::new();
        let leases = services.leases.clone();
        background.spawn(supervise("lease clock", move || leases.clone().run_clock()));
        let leases = services.leases.clone();
        background.spawn(supervise("reaper", move || {
            leases.clone().run_reaper(reaper_interval)
        }));
        let (pools, leases) = (services.pools.clone(), services.leases.clone());
        background.spawn(supervise("pool sweeper", move || {
            pools.clone().run_sweeper(leases.clone())
        }));
        if let Some(admin) = admin {
            let admin = Arc::new(admin);
            background.spawn(supervise("admin API", move || admin.clone().serve()));
        }
        let mut backoff = crate::ops::limits::AcceptBackoff::default();
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .expect("installing a SIGHUP handler cannot fail on Unix");
        tokio::pin!(shutdown);
        tracing::info!(address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "ephemera is listening");
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = hangup.recv() => {
                    if let Err(errors) = reloader.reload() {
                        tracing::error!("configuration not reloaded; still using the old one:\n{errors}");
                    }
                }
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        backoff.reset();
                        connections.spawn(handle_connection(services.clone(), tcp, peer));
                    }
                    Err(error) => {
                        // Typically out of file descriptors: back off, keep serving.
                        tracing::warn!(%error, "accept failed");
                        backoff.wait().await;
                    }
                }
            }
        }
        drop(listener);
        // The clock, the reaper and the admin API stop here, so nothing
        // renews or issues while leases are revoked.
        background.abort_all();
        tracing::info!(
            active_leases = services.leases.active_count(),
            "shutting down: revoking every lease"
        );
        let pending = services
            .leases
            .revoke_all_and_wait(SHUTDOWN_REVOKE_DEADLINE, revoke_standalone_on_shutdown)
            .await;
        if pending > 0 {
            tracing::error!(pending, "some leases could not be revoked before shutdown; their roles expire and are reaped later");
        }
        connections.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), connections.wait()).await;
        services.relay_threads.stop().await;
        tracing::info!("ephemera stopped");
    }
}

/// Run a background task for the life of the server: if it ever ends (a
/// panic, or a return that should not happen) that is logged at ERROR,
/// counted, and the task is started again after a pause. A dead lease
/// clock or reaper must never go unnoticed while roles keep being minted.
async fn supervise<F, Fut>(name: &'static str, start: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    const RESTART_PAUSE: Duration = Duration::from_secs(1);
    /// Aborting the supervisor (at shutdown) aborts the task too.
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    loop {
        let task = tokio::spawn(start());
        let _abort = AbortOnDrop(task.abort_handle());
        let outcome = task.await;
        metrics::counter!(crate::ops::telemetry::BACKGROUND_TASK_FAILURES, "task" => name)
            .increment(1);
        match outcome {
            Err(error) if error.is_panic() => {
                tracing::error!(task = name, "background task panicked; restarting it")
            }
            Err(error) => {
                tracing::error!(task = name, %error, "background task failed; restarting it")
            }
            Ok(()) => tracing::error!(task = name, "background task stopped; restarting it"),
        }
        tokio::time::sleep(RESTART_PAUSE).await;
    }
}

async fn handle_connection(services: Arc<Services>, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    if let Some(admitted) = front_door::admit_within_timeout(&services, tcp, peer).await {
        session::run(services, admitted, peer).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_background_task_that_panics_is_started_again() {
        let starts = Arc::new(AtomicUsize::new(0));
        let counted = starts.clone();
        let supervisor = tokio::spawn(supervise("test task", move || {
            let counted = counted.clone();
            async move {
                if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("the first run dies");
                }
                std::future::pending::<()>().await
            }
        }));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while starts.load(Ordering::SeqCst) < 2 {
            assert!(tokio::time::Instant::now() < deadline, "never restarted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        supervisor.abort();
    }
}
