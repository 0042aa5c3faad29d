//! The reaper: one replica at a time (elected through the engine) drops
//! every credential whose lease has expired in the ledger, including those
//! left behind by a process that died.

use std::sync::Arc;
use std::time::Duration;

use ephemera_engine::{EngineError, Lease, ReaperElection};
use time::OffsetDateTime;

use super::{EndReason, LeaseManager};
use crate::ops::telemetry;

impl LeaseManager {
    /// Every `interval` (and at once): if this replica holds the reaper lock,
    /// revoke every role in the ledger whose lease has expired.
    pub async fn run_reaper(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.engine.lead_reaper().await {
                Ok(ReaperElection::Leader) => {
                    if let Err(error) = self.reap_once().await {
                        tracing::warn!(%error, "reaper scan failed; retrying next interval");
                    }
                }
                Ok(ReaperElection::Follower) => tracing::debug!("another replica is the reaper"),
                Ok(ReaperElection::Squatted { holders }) => {
                    metrics::counter!(telemetry::REAPER_ELECTION_SQUATTED).increment(1);
                    tracing::error!(
                        ?holders,
                        "the reaper election is held by a role that is not Ephemera's admin role; \
                         reaping anyway (terminate those backends and find out who they are)"
                    );
                    if let Err(error) = self.reap_once().await {
                        tracing::warn!(%error, "reaper scan failed; retrying next interval");
                    }
                }
                Err(error) => {
                    // Expiry must not depend on the election: without one
                    // (not set up, or refused), every replica reaps;
                    // revocation is idempotent. A database that is down
                    // fails the scan too, which is then only a warning.
                    metrics::counter!(telemetry::REAPER_ELECTION_SQUATTED, "cause" => "unavailable")
                        .increment(1);
                    tracing::error!(%error,
                        "cannot hold the reaper election; reaping anyway (see docs/operating.md)");
                    if let Err(error) = self.reap_once().await {
                        tracing::warn!(%error, "reaper scan failed; retrying next interval");
                    }
                }
            }
        }
    }

    /// One reaper scan; returns how many expired leases it started revoking.
    pub async fn reap_once(&self) -> Result<usize, EngineError> {
        let now = OffsetDateTime::now_utc();
        let expired: Vec<Lease> = self
            .engine
            .list()
            .await?
            .into_iter()
            .filter(|l| l.expires_at <= now)
            .collect();
        let lag = expired
            .iter()
            .map(|l| (now - l.expires_at).as_seconds_f64())
            .fold(0.0, f64::max);
        metrics::gauge!(telemetry::REAPER_LAG_SECONDS).set(lag);
        let mut claimed = Vec::new();
        for lease in expired {
            let mut registry = self.lock();
            if registry.active.remove(&lease.id).is_some()
                || registry.reaping.insert(lease.role.clone())
            {
                registry.reaping.insert(lease.role.clone());
                drop(registry);
                self.record_ended(&lease, &EndReason::Reaped);
                claimed.push(lease);
            }
        }
        let started = claimed.len();
        if started > 0 {
            self.spawn_reap(claimed);
        }
        Ok(started)
    }

    /// Revoke what a scan found expired, in batches (the engine's
    /// `revoke_many`); a lease whose batch and own retry both failed goes on
    /// retrying alone, like any other revocation.
    fn spawn_reap(&self, leases: Vec<Lease>) {
        let manager = self.self_handle();
        self.revocations.spawn(async move {
            let count = leases.len() as i64;
            manager.pending(count);
            let outcomes = manager.engine.revoke_many(&leases).await;
            for (lease, outcome) in leases.into_iter().zip(outcomes) {
                match outcome {
                    Ok(outcome) => manager.finished(&lease, &EndReason::Reaped, outcome),
                    Err(error) => {
                        manager.revoke_failed(&lease, &error);
                        manager.spawn_revoke(lease, EndReason::Reaped);
                    }
                }
            }
            manager.pending(-count);
        });
    }
}
