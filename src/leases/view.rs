//! How leases are shown and picked out: [`LeaseView`] (one lease, active or
//! ended), [`LeaseFilter`] (which to list), [`RevokeSelector`] (which to
//! revoke), and the lookups behind them.
//!
//! The admin API serves [`LeaseView`] and [`LeaseFilter`] as they are (its
//! `api` module re-exports them; their JSON is documented in
//! `docs/admin-api.yaml`), and turns its revoke body into a
//! [`RevokeSelector`].

use std::collections::HashSet;

use ephemera_engine::{EngineError, Lease, LeaseId, LeaseKind, LeaseState};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{Ended, LeaseError, LeaseManager};

/// One lease as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseView {
    pub id: LeaseId,
    pub engine: String,
    pub kind: LeaseKind,
    pub template: String,
    pub role: String,
    pub identity: String,
    /// The person an agent acts for (`on_behalf_of`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub database: String,
    pub client_addr: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub max_expires_at: OffsetDateTime,
    pub state: LeaseState,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub ended_at: Option<OffsetDateTime>,
    /// Why it ended (`session_ended`, `revoked`, `expired`, …) and, for
    /// revocations, by whom.
    pub end_reason: Option<String>,
}

/// Which leases [`LeaseManager::list`] shows (the query of
/// `GET /v1/leases`); every filter is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<LeaseState>,
}

impl LeaseFilter {
    /// Whether `view` passes every filter that is set.
    pub fn matches(&self, view: &LeaseView) -> bool {
        self.identity.as_ref().is_none_or(|i| &view.identity == i)
            && self.template.as_ref().is_none_or(|t| &view.template == t)
            && self.state.is_none_or(|s| view.state == s)
    }
}

/// Which leases [`LeaseManager::revoke_matching`] revokes: exactly one
/// criterion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeSelector {
    /// Leases held by exactly this SPIFFE ID.
    Identity(String),
    /// Leases held by SPIFFE IDs starting with this (never empty).
    IdentityPrefix(String),
    /// Leases of this role template.
    Template(String),
}

impl RevokeSelector {
    /// The selector from its three optional parts: exactly one must be
    /// given, and a prefix must not be empty (it would select everything).
    pub fn exactly_one(
        identity: Option<&str>,
        identity_prefix: Option<&str>,
        template: Option<&str>,
    ) -> Result<Self, LeaseError> {
        match (identity, identity_prefix, template) {
            (Some(id), None, None) => Ok(RevokeSelector::Identity(id.to_owned())),
            (None, Some(p), None) if !p.is_empty() => {
                Ok(RevokeSelector::IdentityPrefix(p.to_owned()))
            }
            (None, None, Some(t)) => Ok(RevokeSelector::Template(t.to_owned())),
            _ => Err(LeaseError::BadSelector),
        }
    }

    pub fn matches(&self, lease: &Lease) -> bool {
        match self {
            RevokeSelector::Identity(id) => lease.identity == *id,
            RevokeSelector::IdentityPrefix(p) => lease.identity.starts_with(p.as_str()),
            RevokeSelector::Template(t) => lease.template == *t,
        }
    }
}

impl LeaseManager {
    /// Leases known here (active and recently ended) and in the ledger
    /// (active leases of other replicas, standalone leases from before a
    /// restart), filtered.
    pub async fn list(&self, filter: &LeaseFilter) -> Result<Vec<LeaseView>, EngineError> {
        let ledger = self.engine.list().await?;
        let mut views: Vec<LeaseView> = {
            let registry = self.lock();
            let mut views: Vec<LeaseView> = registry
                .active
                .values()
                .map(|e| view(&e.lease, LeaseState::Active, None))
                .collect();
            // A lease being revoked is still in the ledger; show it once, as ended.
            let known: HashSet<LeaseId> = views
                .iter()
                .map(|v| v.id)
                .chain(registry.ended.iter().map(|e| e.lease.id))
                .collect();
            views.extend(
                ledger
                    .iter()
                    .filter(|l| !known.contains(&l.id))
                    .map(|l| view(l, LeaseState::Active, None)),
            );
            views.extend(
                registry
                    .ended
                    .iter()
                    .map(|e| view(&e.lease, e.state, Some(e))),
            );
            views
        };
        views.retain(|v| filter.matches(v));
        Ok(views)
    }

    pub async fn get(&self, id: LeaseId) -> Result<LeaseView, LeaseError> {
        {
            let registry = self.lock();
            if let Some(entry) = registry.active.get(&id) {
                return Ok(view(&entry.lease, LeaseState::Active, None));
            }
            if let Some(ended) = registry.ended.iter().find(|e| e.lease.id == id) {
                return Ok(view(&ended.lease, ended.state, Some(ended)));
            }
        }
        let ledger = self.engine.list().await?;
        ledger
            .iter()
            .find(|l| l.id == id)
            .map(|l| view(l, LeaseState::Active, None))
            .ok_or(LeaseError::NotFound(id))
    }

    /// The active lease `id`, from here or the ledger.
    pub(super) async fn find_active(&self, id: LeaseId) -> Result<Lease, LeaseError> {
        {
            let registry = self.lock();
            if let Some(entry) = registry.active.get(&id) {
                return Ok(entry.lease.clone());
            }
            if registry.ended.iter().any(|e| e.lease.id == id) {
                return Err(LeaseError::Ended(id));
            }
        }
        let ledger = self.engine.list().await?;
        ledger
            .into_iter()
            .find(|l| l.id == id)
            .ok_or(LeaseError::NotFound(id))
    }
}

pub(super) fn view(lease: &Lease, state: LeaseState, ended: Option<&Ended>) -> LeaseView {
    LeaseView {
        id: lease.id,
        engine: lease.engine.to_owned(),
        kind: lease.kind,
        template: lease.template.clone(),
        role: lease.role.clone(),
        identity: lease.identity.clone(),
        subject: lease.subject.clone(),
        database: lease.database.clone(),
        client_addr: lease.client_addr.map(|a| a.to_string()),
        issued_at: lease.issued_at,
        expires_at: lease.expires_at,
        max_expires_at: lease.max_expires_at,
        state,
        ended_at: ended.map(|e| e.at),
        end_reason: ended.map(|e| e.reason.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(identity: &str, template: &str) -> Lease {
        let at = OffsetDateTime::UNIX_EPOCH;
        Lease {
            id: uuid::Uuid::new_v4(),
            engine: "fake",
            kind: LeaseKind::Standalone,
            template: template.into(),
            role: "eph_x".into(),
            identity: identity.into(),
            subject: None,
            database: "db".into(),
            client_addr: None,
            issued_at: at,
            expires_at: at,
            max_expires_at: at,
        }
    }

    #[test]
    fn a_revoke_selector_takes_exactly_one_criterion() {
        let one = |i, p, t| RevokeSelector::exactly_one(i, p, t);
        assert_eq!(
            one(Some("spiffe://e/a"), None, None).ok(),
            Some(RevokeSelector::Identity("spiffe://e/a".into()))
        );
        assert_eq!(
            one(None, Some("spiffe://e/"), None).ok(),
            Some(RevokeSelector::IdentityPrefix("spiffe://e/".into()))
        );
        assert_eq!(
            one(None, None, Some("t")).ok(),
            Some(RevokeSelector::Template("t".into()))
        );
        for bad in [
            one(None, None, None),
            one(Some("spiffe://e/a"), None, Some("t")),
            one(Some("a"), Some("b"), None),
            // An empty prefix would select every lease.
            one(None, Some(""), None),
        ] {
            assert!(matches!(bad, Err(LeaseError::BadSelector)), "{bad:?}");
        }
    }

    #[test]
    fn a_revoke_selector_matches_by_identity_prefix_or_template() {
        let l = lease("spiffe://e/ns/prod/sa/a", "billing");
        assert!(RevokeSelector::Identity("spiffe://e/ns/prod/sa/a".into()).matches(&l));
        assert!(!RevokeSelector::Identity("spiffe://e/ns/prod/sa".into()).matches(&l));
        assert!(RevokeSelector::IdentityPrefix("spiffe://e/ns/prod/".into()).matches(&l));
        assert!(!RevokeSelector::IdentityPrefix("spiffe://e/ns/dev/".into()).matches(&l));
        assert!(RevokeSelector::Template("billing".into()).matches(&l));
        assert!(!RevokeSelector::Template("bill".into()).matches(&l));
    }

    #[test]
    fn a_lease_filter_checks_only_what_is_set() {
        let v = view(&lease("spiffe://e/a", "t"), LeaseState::Active, None);
        assert!(LeaseFilter::default().matches(&v));
        let only = |f: LeaseFilter| f.matches(&v);
        assert!(only(LeaseFilter {
            identity: Some("spiffe://e/a".into()),
            template: Some("t".into()),
            state: Some(LeaseState::Active),
        }));
        assert!(!only(LeaseFilter {
            identity: Some("spiffe://e/b".into()),
            ..LeaseFilter::default()
        }));
        assert!(!only(LeaseFilter {
            template: Some("u".into()),
            ..LeaseFilter::default()
        }));
        assert!(!only(LeaseFilter {
            state: Some(LeaseState::Revoked),
            ..LeaseFilter::default()
        }));
    }
}
