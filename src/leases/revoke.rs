//! Ending leases: revoking until done (with backoff, never giving up), one
//! lease now, every lease matching a selector, everything at shutdown.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ephemera_engine::{EngineError, Lease, LeaseId, LeaseKind, LeaseState, RevokeOutcome};
use time::OffsetDateTime;

use super::view::{view, LeaseView, RevokeSelector};
use super::{EndReason, Ended, LeaseError, LeaseManager};
use crate::ops::audit::{AuditEvent, AuditKind};
use crate::ops::telemetry;

/// First and longest wait between attempts to revoke a lease.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);

impl LeaseManager {
    /// End a lease and wait for its revocation (first attempt). On failure
    /// the revocation goes on in the background and the error is returned.
    async fn end_now(&self, lease: Lease, reason: EndReason) -> Result<(), EngineError> {
        self.lock().active.remove(&lease.id);
        self.record_ended(&lease, &reason);
        match self.engine.revoke(&lease).await {
            Ok(outcome) => {
                self.finished(&lease, &reason, outcome);
                Ok(())
            }
            Err(error) => {
                self.revoke_failed(&lease, &error);
                self.spawn_revoke(lease, reason);
                Err(error)
            }
        }
    }

    pub(super) fn spawn_revoke(&self, lease: Lease, reason: EndReason) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(lease_id = %lease.id, role = %lease.role,
                "no runtime left to revoke the lease; the reaper will drop its role after it expires");
            return;
        };
        let manager = self.self_handle();
        self.revocations.spawn_on(
            async move {
                manager.pending(1);
                manager.revoke_until_done(lease, reason).await;
                manager.pending(-1);
            },
            &runtime,
        );
    }

    pub(super) fn pending(&self, delta: i64) {
        let now = self.pending.fetch_add(delta, Ordering::Relaxed) + delta;
        metrics::gauge!(telemetry::REVOCATIONS_PENDING).set(now as f64);
    }

    async fn revoke_until_done(&self, lease: Lease, reason: EndReason) {
        let mut wait = RETRY_FIRST;
        loop {
            match self.engine.revoke(&lease).await {
                Ok(outcome) => return self.finished(&lease, &reason, outcome),
                Err(error) => {
                    self.revoke_failed(&lease, &error);
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(RETRY_MAX);
                }
            }
        }
    }

    pub(super) fn finished(&self, lease: &Lease, reason: &EndReason, outcome: RevokeOutcome) {
        self.lock().reaping.remove(&lease.role);
        let counter = if reason.state() == LeaseState::Expired {
            telemetry::LEASES_EXPIRED
        } else {
            telemetry::LEASES_REVOKED
        };
        metrics::counter!(counter, "template" => lease.template.clone(), "reason" => reason.label()).increment(1);
        if let RevokeOutcome::Revoked { cleanup } = &outcome {
            for undone in cleanup {
                metrics::counter!(telemetry::REVOKE_CLEANUPS, "template" => lease.template.clone())
                    .increment(1);
                tracing::warn!(lease_id = %lease.id, role = %lease.role, ?undone,
                    "revocation undid something the session left behind");
                self.audit.record(AuditEvent::cleanup(lease, undone));
            }
        }
        let mut event = AuditEvent::lease(reason.audit_kind(), lease)
            .reason(reason.describe())
            .actor(reason.actor());
        if outcome == RevokeOutcome::AlreadyGone {
            event = event.reason(format!("{} (role was already gone)", reason.describe()));
        }
        self.audit.record(event);
    }

    pub(super) fn revoke_failed(&self, lease: &Lease, error: &EngineError) {
        metrics::counter!(telemetry::REVOKE_FAILURES, "template" => lease.template.clone())
            .increment(1);
        tracing::warn!(lease_id = %lease.id, role = %lease.role, %error, "revoking a lease failed; retrying");
        self.audit
            .record(AuditEvent::lease(AuditKind::RevokeFailed, lease).reason(error.to_string()));
    }

    /// Revoke every session lease this process holds (their sessions are
    /// terminated) and, if `standalone` is set, every standalone lease too,
    /// then wait up to `deadline` for the revocations. Standalone leases left
    /// alone live on in the ledger (a batch job keeps running across a
    /// rolling restart) and are reaped when they expire. Returns how many
    /// revocations were still pending at the deadline.
    pub async fn revoke_all_and_wait(&self, deadline: Duration, standalone: bool) -> usize {
        let leases: Vec<Lease> = self
            .lock()
            .active
            .drain()
            .map(|(_, e)| e.lease)
            .filter(|lease| standalone || lease.kind == LeaseKind::Session)
            .collect();
        for lease in leases {
            self.record_ended(&lease, &EndReason::Shutdown);
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

    /// Revoke one lease now (its session, if any, is terminated).
    pub async fn revoke(&self, id: LeaseId, actor: &str) -> Result<LeaseView, LeaseError> {
        let lease = self.find_active(id).await?;
        let reason = EndReason::Revoked {
            by: actor.to_owned(),
        };
        self.end_now(lease.clone(), reason.clone()).await?;
        let ended = Ended {
            lease: lease.clone(),
            state: reason.state(),
            at: OffsetDateTime::now_utc(),
            reason: reason.describe(),
        };
        Ok(view(&lease, ended.state, Some(&ended)))
    }

    /// Revoke every active lease (here and in the ledger) that `selector`
    /// matches; returns how many were revoked.
    pub async fn revoke_matching(
        &self,
        selector: &RevokeSelector,
        actor: &str,
    ) -> Result<usize, LeaseError> {
        let mut targets: HashMap<LeaseId, Lease> = self
            .engine
            .list()
            .await?
            .into_iter()
            .filter(|l| selector.matches(l))
            .map(|l| (l.id, l))
            .collect();
        for entry in self.lock().active.values() {
            if selector.matches(&entry.lease) {
                targets.insert(entry.lease.id, entry.lease.clone());
            }
        }
        let count = targets.len();
        let mut revocations = tokio::task::JoinSet::new();
        for lease in targets.into_values() {
            let manager = self.self_handle();
            let reason = EndReason::Revoked {
                by: actor.to_owned(),
            };
            revocations.spawn(async move { manager.end_now(lease, reason).await });
        }
        let mut first_error = None;
        while let Some(result) = revocations.join_next().await {
            if let Ok(Err(error)) = result {
                first_error.get_or_insert(error);
            }
        }
        match first_error {
            Some(error) => Err(error.into()),
            None => Ok(count),
        }
    }
}
