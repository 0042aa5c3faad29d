//! The lease clock: renews session leases while they are wanted and ends
//! leases at their expiry, max TTL or SVID expiry.
//!
//! What to do is decided by [`decide`], a pure function of a registry entry,
//! the rules in force and the time; a tick ([`LeaseManager::run_clock`])
//! only applies the decisions.

use std::sync::Arc;
use std::time::Duration;

use ephemera_engine::{checked_add, checked_sub, EngineError, Lease, LeaseId, LeaseKind};
use time::OffsetDateTime;

use super::{whole_seconds, EndReason, Entry, LeaseManager};
use crate::config::Rules;
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

    /// One look at every lease: decide under the lock, then act without it.
    pub(super) async fn clock_tick(&self) {
        let now = OffsetDateTime::now_utc();
        let rules = self.rules();
        let planned: Vec<(Lease, Tick)> = plan(self.lock().active.values(), now, &rules)
            .into_iter()
            .map(|(lease, tick)| (lease.clone(), tick))
            .collect();
        let mut ending = Vec::new();
        let mut renewing = Vec::new();
        let mut due = Vec::new();
        for (lease, tick) in planned {
            match tick {
                Tick::End(reason) => ending.push((lease.id, reason)),
                Tick::AskLedger => due.push(lease.id),
                Tick::Renew { expires_at } => renewing.push(Lease {
                    expires_at,
                    ..lease
                }),
            }
        }
        if !due.is_empty() {
            ending.extend(self.expire_unless_renewed_elsewhere(due, now).await);
        }
        for (id, reason) in ending {
            self.end(id, reason);
        }
        for lease in renewing {
            self.apply_renewal(lease, now).await;
        }
    }

    /// Standalone leases past their `expires_at` here: take the ledger's
    /// later `expires_at` where another replica renewed them; the others
    /// are returned to be ended. If the ledger cannot be read, nothing is
    /// ended (the next tick asks again).
    async fn expire_unless_renewed_elsewhere(
        &self,
        due: Vec<LeaseId>,
        now: OffsetDateTime,
    ) -> Vec<(LeaseId, EndReason)> {
        let ledger = match self.engine.list().await {
            Ok(ledger) => ledger,
            Err(error) => {
                tracing::warn!(%error, "cannot read the ledger to expire standalone leases; retrying");
                return Vec::new();
            }
        };
        let mut ending = Vec::new();
        for id in due {
            let renewed = renewed_elsewhere(&ledger, id, now);
            match (renewed, self.lock().active.get_mut(&id)) {
                (Some(expires_at), Some(entry)) => entry.lease.expires_at = expires_at,
                _ => ending.push((id, EndReason::Expired)),
            }
        }
        ending
    }

    /// Record `lease`'s new `expires_at` through the engine and here; on
    /// failure, end it if its role is gone, or retry in a second.
    async fn apply_renewal(&self, lease: Lease, now: OffsetDateTime) {
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

/// What the clock does about one lease at one tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Tick {
    /// Renew it: its `expires_at` becomes this (never past its
    /// `max_expires_at`).
    Renew { expires_at: OffsetDateTime },
    /// End it now.
    End(EndReason),
    /// A standalone lease past its `expires_at`: another replica may have
    /// renewed it, so the ledger decides ([`renewed_elsewhere`]).
    AskLedger,
}

/// The leases among `entries` that need something done at `now`, and what.
pub(super) fn plan<'a>(
    entries: impl IntoIterator<Item = &'a Entry>,
    now: OffsetDateTime,
    rules: &Rules,
) -> Vec<(&'a Lease, Tick)> {
    entries
        .into_iter()
        .filter_map(|entry| decide(entry, now, rules).map(|tick| (&entry.lease, tick)))
        .collect()
}

/// What to do about one lease at `now`, under `rules`; `None` if nothing.
///
/// * At `max_expires_at`: end it (its SVID expired if that is what capped
///   it, else its max TTL).
/// * At `expires_at`: a session lease expired (its renewals failed); a
///   standalone lease is asked about in the ledger.
/// * A session lease from half its ttl before `expires_at` (and not before
///   `renew_not_before`, nor once renewed up to `max_expires_at`): renewed
///   to `now` + the template's ttl, capped at `max_expires_at`, if the
///   policy still allows it; ended if not, or if its template is gone.
pub(super) fn decide(entry: &Entry, now: OffsetDateTime, rules: &Rules) -> Option<Tick> {
    let lease = &entry.lease;
    if now >= lease.max_expires_at {
        let reason = if entry.svid_capped {
            EndReason::SvidExpired
        } else if entry.token_capped {
            EndReason::TokenExpired
        } else {
            EndReason::MaxTtl
        };
        return Some(Tick::End(reason));
    }
    if now >= lease.expires_at {
        return Some(match lease.kind {
            LeaseKind::Standalone => Tick::AskLedger,
            LeaseKind::Session => Tick::End(EndReason::Expired),
        });
    }
    let renewal_due = lease.kind == LeaseKind::Session
        && checked_sub(lease.expires_at, entry.ttl / 2).is_none_or(|half| now >= half)
        && now >= entry.renew_not_before
        && lease.expires_at < lease.max_expires_at;
    if !renewal_due {
        return None;
    }
    let allowed = rules.policy.decide(&entry.principal, &lease.template) == Decision::Allowed;
    match rules.templates.get(&lease.template) {
        Some(template) if allowed => Some(Tick::Renew {
            // Past the representable range is past max_expires_at.
            expires_at: checked_add(now, template.ttl)
                .map_or(lease.max_expires_at, whole_seconds)
                .min(lease.max_expires_at),
        }),
        _ => Some(Tick::End(EndReason::PolicyChanged)),
    }
}

/// The `expires_at` the ledger has for lease `id`, if it is later than `now`
/// (another replica renewed it).
pub(super) fn renewed_elsewhere(
    ledger: &[Lease],
    id: LeaseId,
    now: OffsetDateTime,
) -> Option<OffsetDateTime> {
    ledger
        .iter()
        .find(|l| l.id == id && l.expires_at > now)
        .map(|l| l.expires_at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leases::tests::{rules, APP, TTL};
    use crate::policy::Policy;

    fn t0() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("a valid timestamp")
    }

    fn at(seconds: i64) -> OffsetDateTime {
        t0() + time::Duration::seconds(seconds)
    }

    /// A lease of template `t` for [`APP`], issued at `t0()` and not
    /// renewed yet.
    fn entry(kind: LeaseKind) -> Entry {
        Entry {
            lease: Lease {
                id: uuid::Uuid::new_v4(),
                engine: "fake",
                kind,
                template: "t".into(),
                role: "eph_t_x".into(),
                identity: APP.into(),
                subject: None,
                database: "db".into(),
                client_addr: None,
                issued_at: t0(),
                expires_at: at(60),
                max_expires_at: at(300),
            },
            principal: crate::identity::Principal::from(
                crate::identity::SpiffeId::parse(APP).expect("a valid SPIFFE ID"),
            ),
            ttl: TTL,
            svid_capped: false,
            token_capped: false,
            renew_not_before: t0(),
        }
    }

    fn session() -> Entry {
        entry(LeaseKind::Session)
    }

    #[test]
    fn nothing_to_do_before_half_the_ttl() {
        let rules = rules();
        for now in [t0(), at(1), at(29)] {
            assert_eq!(decide(&session(), now, &rules), None, "at {now}");
        }
        let standalone = entry(LeaseKind::Standalone);
        // The clock never renews standalone leases (their holders do).
        for now in [t0(), at(30), at(59)] {
            assert_eq!(decide(&standalone, now, &rules), None, "at {now}");
        }
        assert!(plan([&session(), &standalone], at(10), &rules).is_empty());
    }

    #[test]
    fn a_session_lease_is_renewed_from_half_its_ttl_to_now_plus_ttl() {
        let rules = rules();
        assert_eq!(
            decide(&session(), at(30), &rules),
            Some(Tick::Renew { expires_at: at(90) })
        );
        // Renewal times are whole seconds, like the ledger's.
        let late = at(45) + time::Duration::milliseconds(700);
        assert_eq!(
            decide(&session(), late, &rules),
            Some(Tick::Renew {
                expires_at: at(105)
            })
        );
    }

    #[test]
    fn a_failed_renewal_waits_for_renew_not_before() {
        let rules = rules();
        let mut backing_off = session();
        backing_off.renew_not_before = at(41);
        assert_eq!(decide(&backing_off, at(40), &rules), None);
        assert_eq!(
            decide(&backing_off, at(41), &rules),
            Some(Tick::Renew {
                expires_at: at(101)
            })
        );
    }

    #[test]
    fn a_renewal_never_goes_past_max_expires_at() {
        let rules = rules();
        let mut near_max = session();
        near_max.lease.expires_at = at(280);
        assert_eq!(
            decide(&near_max, at(250), &rules),
            Some(Tick::Renew {
                expires_at: at(300)
            })
        );
        // Once renewed up to max_expires_at there is nothing left to renew:
        // the lease waits for its max TTL.
        near_max.lease.expires_at = at(300);
        assert_eq!(decide(&near_max, at(299), &rules), None);
    }

    #[test]
    fn at_max_expires_at_a_lease_ends_with_its_max_ttl() {
        let rules = rules();
        let mut renewed = session();
        renewed.lease.expires_at = at(300);
        for now in [at(300), at(301)] {
            assert_eq!(
                decide(&renewed, now, &rules),
                Some(Tick::End(EndReason::MaxTtl))
            );
        }
        // Max TTL wins over expiry, for either kind.
        let mut standalone = entry(LeaseKind::Standalone);
        standalone.lease.max_expires_at = at(60);
        assert_eq!(
            decide(&standalone, at(60), &rules),
            Some(Tick::End(EndReason::MaxTtl))
        );
    }

    #[test]
    fn a_lease_capped_at_its_svid_ends_with_the_svid() {
        let rules = rules();
        let mut capped = session();
        capped.svid_capped = true;
        capped.lease.max_expires_at = at(100);
        capped.lease.expires_at = at(100);
        assert_eq!(decide(&capped, at(99), &rules), None);
        assert_eq!(
            decide(&capped, at(100), &rules),
            Some(Tick::End(EndReason::SvidExpired))
        );
    }

    #[test]
    fn an_expired_session_lease_ends_and_a_standalone_one_asks_the_ledger() {
        let rules = rules();
        assert_eq!(
            decide(&session(), at(60), &rules),
            Some(Tick::End(EndReason::Expired))
        );
        let standalone = entry(LeaseKind::Standalone);
        assert_eq!(decide(&standalone, at(60), &rules), Some(Tick::AskLedger));
        let expired = session();
        let planned = plan([&expired, &standalone], at(61), &rules);
        let ids: Vec<LeaseId> = planned.iter().map(|(lease, _)| lease.id).collect();
        assert_eq!(ids, [expired.lease.id, standalone.lease.id]);
    }

    #[test]
    fn the_ledger_keeps_a_standalone_lease_only_if_renewed_past_now() {
        let standalone = entry(LeaseKind::Standalone).lease;
        let id = standalone.id;
        let renewed = Lease {
            expires_at: at(120),
            ..standalone.clone()
        };
        assert_eq!(renewed_elsewhere(&[renewed], id, at(61)), Some(at(120)));
        // Not renewed (the ledger has the same expiry), or gone: it expires.
        assert_eq!(
            renewed_elsewhere(std::slice::from_ref(&standalone), id, at(61)),
            None
        );
        assert_eq!(renewed_elsewhere(&[], id, at(61)), None);
        let other = Lease {
            id: uuid::Uuid::new_v4(),
            expires_at: at(120),
            ..standalone
        };
        assert_eq!(renewed_elsewhere(&[other], id, at(61)), None);
    }

    #[test]
    fn a_renewal_the_policy_no_longer_allows_ends_the_lease() {
        let mut rules = rules();
        rules.policy = Policy::default();
        assert_eq!(
            decide(&session(), at(30), &rules),
            Some(Tick::End(EndReason::PolicyChanged))
        );
        let mut rules = self::rules();
        rules.templates.clear();
        assert_eq!(
            decide(&session(), at(30), &rules),
            Some(Tick::End(EndReason::PolicyChanged))
        );
        // Before renewal is due, a policy change is not looked at.
        assert_eq!(decide(&session(), at(10), &rules), None);
    }
}
