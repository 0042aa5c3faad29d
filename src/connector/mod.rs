//! `ephemera connect`: a local connector for applications that know only
//! `host:port`. They connect to it with no password and no TLS; it opens a
//! mutual-TLS connection to Ephemera with the workload's X.509-SVID (or
//! sends its identity token as the password), forwards the startup packet
//! and relays. Ephemera sees the workload's identity exactly as if the
//! application had presented it.
//!
//! * `svid.rs`: where the SVID comes from (the [`SvidSource`] seam, files);
//! * `listen.rs`: loopback TCP and the Unix socket, `--allow-uid`;
//! * `client.rs`: one application connection, start to end;
//! * `dial.rs`: TLS to Ephemera, verify-full against `--ca`;
//! * `token.rs`: `--token-file`;
//! * `cancel.rs`: cancel requests passed on;
//! * `http.rs`, `metrics.rs`: `/healthz`, `/readyz`, `/metrics`;
//! * `shared.rs`: the credential and the state every connection shares.
//!
//! On shutdown the connector stops accepting, lets open sessions run for
//! the grace period, then ends them.

mod cancel;
mod client;
mod dial;
mod http;
mod listen;
mod metrics;
mod shared;
mod svid;
mod token;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use self::client::UNABLE_TO_CONNECT;
pub use self::dial::{DialError, DialSetupError, Dialer};
pub use self::listen::{socket_path, ListenError};
pub use self::metrics::ConnectorMetrics;
pub use self::shared::Credential;
use self::shared::Shared;
pub use self::svid::{workload_api_source, ClientSvid, FileSvid, SvidSource, SvidUnavailable};
pub use self::token::TokenFileError;

/// How long TCP and TLS to Ephemera may take for an application's session.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// The connector's options (the flags of `ephemera connect`).
#[derive(Debug, Clone)]
pub struct ConnectorOptions {
    /// Ephemera's `HOST:PORT`; HOST must be named by its certificate.
    pub to: String,
    /// The CA(s) of Ephemera's server certificate, PEM.
    pub ca: PathBuf,
    pub credential: Credential,
    /// Loopback only. Its port also names the Unix socket.
    pub listen: SocketAddr,
    /// Listen on TCP at all (`false`: the Unix socket only).
    pub tcp: bool,
    /// Also listen on `<dir>/.s.PGSQL.<port>`.
    pub socket_dir: Option<PathBuf>,
    /// Who may connect on the Unix socket (empty: our own uid).
    pub allow_uid: Vec<u32>,
    pub http: Option<SocketAddr>,
    /// How long open sessions may run after a shutdown signal.
    pub grace: Duration,
}

/// Why the connector cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("nowhere to listen: TCP is off and there is no --socket-dir")]
    NoListener,
    #[error("the Unix socket needs a port for its name (.s.PGSQL.<port>); --listen port 0 is only for TCP")]
    NoSocketPort,
    #[error(transparent)]
    Dial(#[from] DialSetupError),
    #[error("{0}")]
    Svid(#[from] SvidUnavailable),
}

/// A bound connector, ready to serve.
pub struct Connector {
    shared: Arc<Shared>,
    tcp: Option<TcpListener>,
    unix: Option<(UnixListener, PathBuf, listen::UidGate)>,
    http: Option<TcpListener>,
    grace: Duration,
}

impl Connector {
    /// Check the options and bind every listener.
    pub async fn bind(options: ConnectorOptions) -> Result<Connector, ConnectorError> {
        // The listen address first: a non-loopback one is the mistake that
        // matters most.
        let tcp = match (options.tcp, &options.socket_dir) {
            (true, _) => Some(listen::tcp(options.listen).await?),
            (false, Some(_)) if options.listen.port() == 0 => {
                return Err(ConnectorError::NoSocketPort)
            }
            (false, Some(_)) => None,
            (false, None) => return Err(ConnectorError::NoListener),
        };
        let dialer = Dialer::new(&options.to, &options.ca, DIAL_TIMEOUT)?;
        let port = tcp
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map_or(options.listen.port(), |a| a.port());
        let unix = match &options.socket_dir {
            Some(dir) => {
                let path = socket_path(dir, port);
                let listener = listen::unix(&path, !options.allow_uid.is_empty())?;
                Some((listener, path, listen::UidGate::new(&options.allow_uid)))
            }
            None => None,
        };
        let http = match options.http {
            Some(address) => {
                Some(
                    TcpListener::bind(address)
                        .await
                        .map_err(|source| ListenError::Bind {
                            address: address.to_string(),
                            source,
                        })?,
                )
            }
            None => None,
        };
        let shared = Arc::new(Shared::new(dialer, options.credential));
        shared.update_expiry_gauge();
        Ok(Connector {
            shared,
            tcp,
            unix,
            http,
            grace: options.grace,
        })
    }

    /// Where applications connect over TCP.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The Unix socket's path, if there is one.
    pub fn socket_path(&self) -> Option<PathBuf> {
        self.unix.as_ref().map(|(_, path, _)| path.clone())
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serve until `shutdown` completes; then stop accepting, give open
    /// sessions the grace period, end the rest.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Connector {
            shared,
            tcp,
            unix,
            http,
            grace,
        } = self;
        let sessions = TaskTracker::new();
        let stop_http = CancellationToken::new();
        if let Some(listener) = http {
            let stop = stop_http.clone();
            let router = http::router(shared.clone());
            tokio::spawn(async move {
                let server = axum::serve(listener, router)
                    .with_graceful_shutdown(async move { stop.cancelled().await });
                if let Err(error) = server.await {
                    tracing::error!(%error, "the connector's HTTP server stopped");
                }
            });
        }
        let socket = unix.as_ref().map(|(_, path, _)| path.clone());
        tokio::select! {
            () = accept(&shared, &sessions, tcp.as_ref(), unix.as_ref()) => {}
            () = shutdown => {}
        }
        drop((tcp, unix));
        if let Some(path) = socket {
            let _ = std::fs::remove_file(path);
        }
        sessions.close();
        tracing::info!(
            open = sessions.len(),
            ?grace,
            "shutting down: no new connections; open sessions have the grace period"
        );
        if tokio::time::timeout(grace, sessions.wait()).await.is_err() {
            tracing::info!(
                open = sessions.len(),
                "grace period over; ending open sessions"
            );
            shared.stop.cancel();
            sessions.wait().await;
        }
        stop_http.cancel();
    }
}

/// Accept on TCP and the Unix socket until an accept fails for good.
async fn accept(
    shared: &Arc<Shared>,
    sessions: &TaskTracker,
    tcp: Option<&TcpListener>,
    unix: Option<&(UnixListener, PathBuf, listen::UidGate)>,
) {
    loop {
        tokio::select! {
            accepted = async {
                match tcp {
                    Some(listener) => listener.accept().await,
                    None => std::future::pending().await,
                }
            } => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    sessions.spawn(bounded(shared.clone(), client::serve(shared.clone(), stream, None)));
                }
                Err(error) => accept_failed(error).await,
            },
            accepted = async {
                match unix {
                    Some((listener, _, _)) => listener.accept().await,
                    None => std::future::pending().await,
                }
            } => match (accepted, unix) {
                (Ok((stream, _)), Some((_, _, gate))) => {
                    let refusal = match gate.check(&stream) {
                        Ok(_) => None,
                        Err(Some(uid)) => Some(format!("uid {uid} may not use this connector (--allow-uid)")),
                        Err(None) => Some("the peer's uid is unknown (SO_PEERCRED); refused".to_owned()),
                    };
                    sessions.spawn(bounded(shared.clone(), client::serve(shared.clone(), stream, refusal)));
                }
                (Err(error), _) => accept_failed(error).await,
                (Ok(_), None) => {}
            },
        }
    }
}

/// `connection`, ended at the latest a second after the grace period is
/// over (a relayed session ends itself then, with a `FATAL 57P01`; one
/// still in its handshake is dropped).
async fn bounded(shared: Arc<Shared>, connection: impl Future<Output = ()>) {
    tokio::select! {
        biased;
        () = connection => {}
        () = async {
            shared.stop.cancelled().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        } => {}
    }
}

/// Out of file descriptors and the like: say so and back off briefly.
async fn accept_failed(error: std::io::Error) {
    tracing::warn!(%error, "accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}
