//! Leases: issuing credentials through the engine and making sure every one
//! of them is revoked.
//!
//! A [`SessionLease`] is held by the session it was issued for; when it is
//! dropped (the session ended, failed half-way, or its task panicked) the
//! lease is revoked in the background. A revoke that fails is retried with
//! exponential backoff, never given up: a role that stays behind is a
//! standing credential, which is what Ephemera exists to prevent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ephemera_engine::{
    Engine, EngineError, IssueRequest, Lease, LeaseId, RevokeOutcome, ScramSecret,
};
use tokio_util::task::TaskTracker;

use crate::identity::SpiffeId;

/// First and longest wait between attempts to revoke a lease.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);

pub struct LeaseManager {
    engine: Arc<dyn Engine>,
    active: Mutex<HashMap<LeaseId, Lease>>,
    revocations: TaskTracker,
}

impl std::fmt::Debug for LeaseManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseManager")
            .field("engine", &self.engine.name())
            .field("active", &self.active_count())
            .finish()
    }
}

/// Why a lease ended, for the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    SessionEnded,
    LoginFailed,
    Shutdown,
}

impl LeaseManager {
    pub fn new(engine: Arc<dyn Engine>) -> Arc<Self> {
        Arc::new(LeaseManager {
            engine,
            active: Mutex::new(HashMap::new()),
            revocations: TaskTracker::new(),
        })
    }

    /// Issue a session-bound lease.
    pub async fn issue(
        self: &Arc<Self>,
        identity: &SpiffeId,
        template: &str,
        ttl: Duration,
        client_addr: SocketAddr,
    ) -> Result<SessionLease, EngineError> {
        let request = IssueRequest {
            lease_id: uuid::Uuid::new_v4(),
            identity: identity.to_string(),
            template: template.to_owned(),
            client_addr: Some(client_addr),
            ttl,
        };
        let credential = self.engine.issue(request).await?;
        let lease = credential.lease;
        tracing::info!(
            lease_id = %lease.id, identity = %lease.identity, template = %lease.template,
            role = %lease.role, database = %lease.database, client_addr = %client_addr,
            expires_at = %lease.expires_at, "lease issued"
        );
        self.lock_active().insert(lease.id, lease.clone());
        Ok(SessionLease {
            manager: self.clone(),
            lease,
            secret: credential.secret,
            end_reason: EndReason::SessionEnded,
        })
    }

    pub fn active_count(&self) -> usize {
        self.lock_active().len()
    }

    /// End a lease: forget it and revoke it in the background until done.
    fn end(&self, id: LeaseId, reason: EndReason) {
        if let Some(lease) = self.lock_active().remove(&id) {
            self.spawn_revoke(lease, reason);
        }
    }

    /// Revoke every active lease (their sessions are terminated by the
    /// engine) and wait up to `deadline` for all revocations to finish.
    /// Returns how many were still pending at the deadline.
    pub async fn revoke_all_and_wait(&self, deadline: Duration) -> usize {
        let leases: Vec<Lease> = self.lock_active().drain().map(|(_, lease)| lease).collect();
        for lease in leases {
            self.spawn_revoke(lease, EndReason::Shutdown);
        }
        self.revocations.close();
        if tokio::time::timeout(deadline, self.revocations.wait())
            .await
            .is_err()
        {
            self.revocations.len()
        } else {
            0
        }
    }

    fn spawn_revoke(&self, lease: Lease, reason: EndReason) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(lease_id = %lease.id, role = %lease.role,
                "no runtime left to revoke the lease; the role stays until a reaper drops it");
            return;
        };
        let engine = self.engine.clone();
        self.revocations
            .spawn_on(revoke_until_done(engine, lease, reason), &runtime);
    }

    fn lock_active(&self) -> std::sync::MutexGuard<'_, HashMap<LeaseId, Lease>> {
        self.active
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

async fn revoke_until_done(engine: Arc<dyn Engine>, lease: Lease, reason: EndReason) {
    let mut wait = RETRY_FIRST;
    let mut attempt = 1u32;
    loop {
        match engine.revoke(&lease).await {
            Ok(outcome) => {
                tracing::info!(
                    lease_id = %lease.id, identity = %lease.identity, template = %lease.template,
                    role = %lease.role, reason = ?reason, already_gone = (outcome == RevokeOutcome::AlreadyGone),
                    "lease revoked"
                );
                return;
            }
            Err(error) => {
                tracing::warn!(
                    lease_id = %lease.id, role = %lease.role, attempt, retry_in = ?wait,
                    %error, "revoking a lease failed; will retry"
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RETRY_MAX);
                attempt += 1;
            }
        }
    }
}

/// A lease bound to one session. Revoked when dropped.
pub struct SessionLease {
    manager: Arc<LeaseManager>,
    lease: Lease,
    secret: ScramSecret,
    end_reason: EndReason,
}

impl SessionLease {
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    pub fn secret(&self) -> &ScramSecret {
        &self.secret
    }

    /// Record why the lease is ending (defaults to the session ending).
    pub fn set_end_reason(&mut self, reason: EndReason) {
        self.end_reason = reason;
    }
}

impl std::fmt::Debug for SessionLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionLease")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl Drop for SessionLease {
    fn drop(&mut self) {
        self.manager.end(self.lease.id, self.end_reason);
    }
}
