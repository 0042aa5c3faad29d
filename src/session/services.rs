//! What every session uses, shared by all of them: the TLS material, the
//! rules, the lease manager, the cancel map and the limits. The server
//! builds it; the front door and the session steps read it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Rules, UpstreamSettings};
use crate::leases::{LeaseManager, SharedRules};
use crate::ops::limits::{RateLimiter, RefusalEvents};
use crate::session::cancel::CancelMap;
use crate::session::pool::Pools;
use crate::session::protocol::CancelKey;
use crate::session::upstream;
use crate::tls::{SharedTls, TlsMaterial};
use crate::workers::Workers;

/// Everything a connection needs, shared by all of them.
pub struct Services {
    pub handshake_timeout: Duration,
    /// Certificate and trust bundle; replaced on reload.
    pub tls: SharedTls,
    /// Templates and policy; replaced on reload.
    pub rules: SharedRules,
    pub upstream: UpstreamSettings,
    pub leases: Arc<LeaseManager>,
    pub cancels: Arc<CancelMap>,
    /// One permit per relayed session (`listen.max_connections`).
    pub sessions: Arc<tokio::sync::Semaphore>,
    pub max_connections: usize,
    /// Role creation per identity, shared with the admin API's `/v1/creds`.
    pub issue_limiter: Arc<RateLimiter>,
    /// Refusal audit events per peer address (SECURITY.md, finding 6).
    pub refusal_events: RefusalEvents,
    /// The session threads established sessions are relayed on.
    pub relay_threads: Workers,
    /// Pooled templates' pools (`pool = "session"`).
    pub pools: Arc<Pools>,
}

impl Services {
    /// The templates and policy in force now.
    pub fn rules(&self) -> Arc<Rules> {
        self.rules.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The certificate and trust bundle in force now.
    pub fn tls(&self) -> Arc<TlsMaterial> {
        self.tls.current()
    }

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
