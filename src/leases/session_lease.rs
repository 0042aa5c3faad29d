//! The guard a session holds its lease through.

use std::sync::Arc;

use ephemera_engine::{Lease, UpstreamLogin};

use super::{EndReason, LeaseManager};

/// A lease bound to one session. Ends (is revoked) when dropped.
pub struct SessionLease {
    manager: Arc<LeaseManager>,
    lease: Lease,
    login: UpstreamLogin,
    end_reason: EndReason,
}

impl SessionLease {
    pub(super) fn new(manager: Arc<LeaseManager>, lease: Lease, login: UpstreamLogin) -> Self {
        SessionLease {
            manager,
            lease,
            login,
            end_reason: EndReason::SessionEnded,
        }
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// How Ephemera logs in upstream as the lease's credential.
    pub fn login(&self) -> &UpstreamLogin {
        &self.login
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
        self.manager.end(self.lease.id, self.end_reason.clone());
    }
}
