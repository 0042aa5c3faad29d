//! What the admin API sees of leases: the listing, one lease, and the
//! lookups behind renewing and revoking by id.

use std::collections::HashSet;

use ephemera_engine::{EngineError, Lease, LeaseId, LeaseState};

use super::{Ended, LeaseError, LeaseManager};
use crate::admin::api::{LeaseFilter, LeaseView};

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
        views.retain(|v| {
            filter.identity.as_ref().is_none_or(|i| &v.identity == i)
                && filter.template.as_ref().is_none_or(|t| &v.template == t)
                && filter.state.is_none_or(|s| v.state == s)
        });
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
