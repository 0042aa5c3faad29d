//! The lease clock: renews session leases while they are wanted and ends
//! leases at their expiry, max TTL or SVID expiry.

use std::sync::Arc;
use std::time::Duration;

use ephemera_engine::{checked_add, checked_sub, EngineError, LeaseKind};
use time::OffsetDateTime;

use super::{whole_seconds, EndReason, LeaseManager};
use crate::identity::SpiffeId;
use crate::ops::audit::{AuditEvent, AuditKind};
use crate::policy::Decision;

/// How often the clock looks at renewals and expiries.
const CLOCK_TICK: Duration = Duration::from_millis(250);

impl LeaseManager {
    /// Renew session leases every `ttl/2` (re-checking the policy), and end
    /// leases at their expiry, max TTL or SVID expiry. Runs until the
    /// process ends.
    pub async fn run_clock(self: Arc<Self>) {
        let mut tick = tokio::time::interval(CLOCK_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.clock_tick().await;
        }
    }

    async fn clock_tick(&self) {
        let now = OffsetDateTime::now_utc();
        let rules = self.rules();
        let mut ending = Vec::new();
        let mut renewing = Vec::new();
        let mut due = Vec::new();
        for entry in self.lock().active.values() {
            let lease = &entry.lease;
            if now >= lease.max_expires_at {
                let reason = if entry.svid_capped {
                    EndReason::SvidExpired
                } else {
                    EndReason::MaxTtl
                };
                ending.push((lease.id, reason));
            } else if now >= lease.expires_at && lease.kind == LeaseKind::Standalone {
                // Another replica may have renewed it: the ledger decides.
                due.push(lease.id);
            } else if now >= lease.expires_at {
                ending.push((lease.id, EndReason::Expired));
            } else if lease.kind == LeaseKind::Session
                && checked_sub(lease.expires_at, entry.ttl / 2).is_none_or(|half| now >= half)
                && now >= entry.renew_not_before
                && lease.expires_at < lease.max_expires_at
            {
                let allowed = SpiffeId::parse(&lease.identity)
                    .map(|id| rules.policy.decide(&id, &lease.template) == Decision::Allowed)
                    .unwrap_or(false);
                match rules.templates.get(&lease.template) {
                    Some(template) if allowed => {
                        let mut renewed = lease.clone();
                        // Past the representable range is past max_expires_at.
                        renewed.expires_at = checked_add(now, template.ttl)
                            .map_or(lease.max_expires_at, whole_seconds)
                            .min(lease.max_expires_at);
                        renewing.push(renewed);
                    }
                    _ => ending.push((lease.id, EndReason::PolicyChanged)),
                }
            }
        }
        if !due.is_empty() {
            match self.engine.list().await {
                Ok(ledger) => {
                    for id in due {
                        let renewed = ledger.iter().find(|l| l.id == id && l.expires_at > now);
                        match (renewed, self.lock().active.get_mut(&id)) {
                            (Some(l), Some(entry)) => entry.lease.expires_at = l.expires_at,
                            _ => ending.push((id, EndReason::Expired)),
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot read the ledger to expire standalone leases; retrying")
                }
            }
        }
        for (id, reason) in ending {
            self.end(id, reason);
        }
        for lease in renewing {
            match self.engine.renew(&lease).await {
                Ok(()) => {
                    if let Some(entry) = self.lock().active.get_mut(&lease.id) {
                        entry.lease.expires_at = lease.expires_at;
                    }
                    self.audit
                        .record(AuditEvent::lease(AuditKind::Renewed, &lease).actor("ephemera"));
                }
                Err(EngineError::Gone(_)) => self.end(lease.id, EndReason::RoleVanished),
                Err(error) => {
                    tracing::warn!(lease_id = %lease.id, %error, "renewing a lease failed; retrying in 1 s");
                    if let Some(entry) = self.lock().active.get_mut(&lease.id) {
                        entry.renew_not_before =
                            checked_add(now, Duration::from_secs(1)).unwrap_or(now);
                    }
                }
            }
        }
    }
}
