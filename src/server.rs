//! The server: the listening socket, the shared state every connection
//! uses ([`Proxy`]), the accept loop, and an orderly shutdown.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ephemera_engine::Engine;
use ephemera_engine_postgres::PostgresEngine;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::cancel::CancelMap;
use crate::config::{Settings, TemplateSettings, UpstreamSettings};
use crate::identity::SvidVerifier;
use crate::leases::LeaseManager;
use crate::policy::Policy;
use crate::protocol::CancelKey;
use crate::{front_door, session, upstream};

/// How long shutdown waits for leases to be revoked.
const SHUTDOWN_REVOKE_DEADLINE: Duration = Duration::from_secs(15);

/// Everything a connection needs, shared by all of them.
pub struct Proxy {
    pub handshake_timeout: Duration,
    pub tls_acceptor: TlsAcceptor,
    pub svid_verifier: Arc<SvidVerifier>,
    pub policy: Policy,
    pub templates: BTreeMap<String, TemplateSettings>,
    pub upstream: UpstreamSettings,
    pub leases: Arc<LeaseManager>,
    pub cancels: Arc<CancelMap>,
}

impl Proxy {
    /// Forward a client's cancel request, if its key is one we issued.
    pub async fn cancel(&self, key: CancelKey, peer: SocketAddr) {
        let Some(upstream_key) = self.cancels.lookup(key) else {
            tracing::info!(client_addr = %peer, pid = key.pid, "cancel request with an unknown key ignored");
            return;
        };
        match upstream::send_cancel(&self.upstream, upstream_key).await {
            Ok(()) => {
                tracing::info!(client_addr = %peer, upstream_pid = upstream_key.pid, "cancel request forwarded")
            }
            Err(error) => {
                tracing::warn!(client_addr = %peer, %error, "could not forward a cancel request")
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set up the engine: {0}")]
    Engine(#[from] ephemera_engine::EngineError),
}

pub struct Server {
    listener: TcpListener,
    proxy: Arc<Proxy>,
}

impl Server {
    /// Bind the listening socket and build the shared state. Nothing is
    /// accepted until [`Server::serve`].
    pub async fn bind(settings: Settings) -> Result<Server, ServeError> {
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| ServeError::Bind {
                    address: settings.listen,
                    source,
                })?;
        let engine: Arc<dyn Engine> = Arc::new(PostgresEngine::new(settings.engine)?);
        let proxy = Proxy {
            handshake_timeout: settings.handshake_timeout,
            tls_acceptor: TlsAcceptor::from(settings.server_tls),
            svid_verifier: settings.svid_verifier,
            policy: settings.policy,
            templates: settings.templates,
            upstream: settings.upstream,
            leases: LeaseManager::new(engine),
            cancels: CancelMap::new(),
        };
        Ok(Server {
            listener,
            proxy: Arc::new(proxy),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has an address")
    }

    pub fn proxy(&self) -> Arc<Proxy> {
        self.proxy.clone()
    }

    /// Accept connections until `shutdown` completes; then stop accepting,
    /// revoke every lease (which terminates the sessions' backends) and
    /// wait for the revocations.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Server { listener, proxy } = self;
        let connections = TaskTracker::new();
        tokio::pin!(shutdown);
        tracing::info!(address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "ephemera is listening");
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        connections.spawn(handle_connection(proxy.clone(), tcp, peer));
                    }
                    Err(error) => {
                        // Typically out of file descriptors: back off, keep serving.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        drop(listener);
        tracing::info!(
            active_leases = proxy.leases.active_count(),
            "shutting down: revoking every lease"
        );
        let pending = proxy
            .leases
            .revoke_all_and_wait(SHUTDOWN_REVOKE_DEADLINE)
            .await;
        if pending > 0 {
            tracing::error!(pending, "some leases could not be revoked before shutdown; their roles expire and are reaped later");
        }
        connections.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), connections.wait()).await;
        tracing::info!("ephemera stopped");
    }
}

async fn handle_connection(proxy: Arc<Proxy>, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    if let Some(admitted) = front_door::admit_within_timeout(&proxy, tcp, peer).await {
        session::run(proxy, admitted, peer).await;
    }
}
