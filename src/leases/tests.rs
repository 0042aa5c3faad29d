//! The lease manager against an in-memory engine: what it asks the engine
//! for, and what it keeps.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use ephemera_engine::{
    checked_add, AdminLogin, Engine, EngineError, IssueRequest, IssuedCredential, Lease, LeaseId,
    LeaseKind, LeaseState, Password, ReaperElection, RevokeOutcome, ScramSecret, Template,
    UpstreamLogin,
};
use time::OffsetDateTime;

use super::view::RevokeSelector;
use super::{whole_seconds, EndReason, LeaseError, LeaseManager, SharedRules};
use crate::config::{Rules, TemplateSettings};
use crate::identity::{Principal, SpiffeId};
use crate::leases::Bound;
use crate::ops::audit::AuditLog;
use crate::policy::{IdPattern, Policy, PolicyRule};

/// The identity the test template is for (shared with the clock's tests).
pub(super) const APP: &str = "spiffe://example.org/app";
const ADMIN: &str = "spiffe://example.org/admin";
pub(super) const TTL: Duration = Duration::from_secs(60);
pub(super) const MAX_TTL: Duration = Duration::from_secs(300);
/// Long enough for any revocation of the fake engine.
const WAIT: Duration = Duration::from_secs(10);

/// What the fake engine's credentials are.
#[derive(Clone, Copy)]
enum Credential {
    /// A password for Ephemera and one for the client.
    ClientPassword,
    /// A password for Ephemera only (the client may use it too).
    UpstreamPassword,
    /// SCRAM keys only: nothing a client could log in with.
    ScramOnly,
}

/// An engine whose ledger is a map; it counts what it is asked to do.
struct FakeEngine {
    credential: Credential,
    ledger: Mutex<HashMap<LeaseId, Lease>>,
    issued: Mutex<usize>,
    revokes: Mutex<HashMap<LeaseId, usize>>,
    renewals: Mutex<Vec<Lease>>,
}

impl FakeEngine {
    fn new(credential: Credential) -> Arc<Self> {
        Arc::new(FakeEngine {
            credential,
            ledger: Mutex::default(),
            issued: Mutex::default(),
            revokes: Mutex::default(),
            renewals: Mutex::default(),
        })
    }

    fn revokes_of(&self, id: LeaseId) -> usize {
        self.revokes
            .lock()
            .expect("not poisoned")
            .get(&id)
            .copied()
            .unwrap_or(0)
    }

    fn issued(&self) -> usize {
        *self.issued.lock().expect("not poisoned")
    }

    fn renewals(&self) -> Vec<Lease> {
        self.renewals.lock().expect("not poisoned").clone()
    }

    /// A lease in the ledger that this manager never issued (another
    /// replica's).
    fn add_foreign(&self, identity: &str) -> Lease {
        let now = whole_seconds(OffsetDateTime::now_utc());
        let id = uuid::Uuid::new_v4();
        let lease = Lease {
            id,
            engine: "fake",
            kind: LeaseKind::Standalone,
            template: "t".into(),
            role: format!("fake_{}", id.simple()),
            identity: identity.into(),
            subject: None,
            database: "db".into(),
            client_addr: None,
            issued_at: now,
            expires_at: now + TTL,
            max_expires_at: now + MAX_TTL,
        };
        self.ledger
            .lock()
            .expect("not poisoned")
            .insert(id, lease.clone());
        lease
    }
}

#[async_trait]
impl Engine for FakeEngine {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn issue(&self, request: IssueRequest) -> Result<IssuedCredential, EngineError> {
        *self.issued.lock().expect("not poisoned") += 1;
        let now = whole_seconds(OffsetDateTime::now_utc());
        let expires_at = checked_add(now, request.ttl)
            .ok_or_else(|| EngineError::TimeOutOfRange("now + ttl".into()))?
            .min(request.max_expires_at);
        let lease = Lease {
            id: request.lease_id,
            engine: "fake",
            kind: request.kind,
            template: request.template,
            role: format!("fake_{}", request.lease_id.simple()),
            identity: request.identity,
            subject: request.subject,
            database: "db".into(),
            client_addr: request.client_addr,
            issued_at: now,
            expires_at,
            max_expires_at: request.max_expires_at,
        };
        self.ledger
            .lock()
            .expect("not poisoned")
            .insert(lease.id, lease.clone());
        let upstream = || UpstreamLogin::Password(Password::new("upstream-secret".into()));
        let (login, client_password) = match self.credential {
            Credential::ClientPassword => (upstream(), Some(Password::new("client-secret".into()))),
            Credential::UpstreamPassword => (upstream(), None),
            Credential::ScramOnly => (UpstreamLogin::Scram(ScramSecret::generate()), None),
        };
        Ok(IssuedCredential {
            lease,
            login,
            client_password,
        })
    }

    fn reload(&self, _templates: Vec<Template>, _admin: AdminLogin) -> Result<(), EngineError> {
        Ok(())
    }

    async fn renew(&self, lease: &Lease) -> Result<(), EngineError> {
        self.renewals
            .lock()
            .expect("not poisoned")
            .push(lease.clone());
        match self.ledger.lock().expect("not poisoned").get_mut(&lease.id) {
            Some(recorded) => {
                recorded.expires_at = lease.expires_at;
                Ok(())
            }
            None => Err(EngineError::Gone(lease.role.clone())),
        }
    }

    async fn revoke(&self, lease: &Lease) -> Result<RevokeOutcome, EngineError> {
        *self
            .revokes
            .lock()
            .expect("not poisoned")
            .entry(lease.id)
            .or_default() += 1;
        match self.ledger.lock().expect("not poisoned").remove(&lease.id) {
            Some(_) => Ok(RevokeOutcome::revoked()),
            None => Ok(RevokeOutcome::AlreadyGone),
        }
    }

    async fn list(&self) -> Result<Vec<Lease>, EngineError> {
        Ok(self
            .ledger
            .lock()
            .expect("not poisoned")
            .values()
            .cloned()
            .collect())
    }

    async fn lead_reaper(&self) -> Result<ReaperElection, EngineError> {
        Ok(ReaperElection::Leader)
    }
}

/// Template `t` (ttl 60 s, max_ttl 300 s), which only [`APP`] may use.
pub(super) fn rules() -> Rules {
    let templates = BTreeMap::from([(
        "t".to_owned(),
        TemplateSettings {
            database: "db".into(),
            ttl: TTL,
            max_ttl: MAX_TTL,
            statement_audit: None,
            pool: None,
        },
    )]);
    let rule = PolicyRule {
        matcher: IdPattern::parse(APP).expect("a valid pattern").into(),
        templates: vec!["t".into()],
    };
    Rules {
        templates,
        policy: Policy::new(vec![rule]),
        tokens: Default::default(),
    }
}

/// A manager over `engine` with [`rules`].
fn manager(engine: &Arc<FakeEngine>, bind_to_svid: bool) -> Arc<LeaseManager> {
    let rules: SharedRules = Arc::new(RwLock::new(Arc::new(rules())));
    LeaseManager::new(
        engine.clone(),
        rules,
        Arc::new(AuditLog::log_only()),
        bind_to_svid,
    )
}

fn app() -> SpiffeId {
    SpiffeId::parse(APP).expect("a valid SPIFFE ID")
}

fn client() -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 7], 40000))
}

fn settings() -> TemplateSettings {
    TemplateSettings {
        database: "db".into(),
        ttl: TTL,
        max_ttl: MAX_TTL,
        statement_audit: None,
        pool: None,
    }
}

#[tokio::test]
async fn a_standalone_lease_is_issued_with_the_client_password() {
    let engine = FakeEngine::new(Credential::ClientPassword);
    let manager = manager(&engine, false);
    let before = whole_seconds(OffsetDateTime::now_utc());
    let (lease, password) = manager
        .issue_standalone(&Principal::from(app().clone()), "t", None, None)
        .await
        .expect("issued");
    assert_eq!(password.expose(), "client-secret");
    assert_eq!(lease.kind, LeaseKind::Standalone);
    assert_eq!(lease.identity, APP);
    assert!(lease.max_expires_at >= before + MAX_TTL);
    assert!(lease.max_expires_at <= whole_seconds(OffsetDateTime::now_utc()) + MAX_TTL);
    assert_eq!(manager.active_count(), 1);
    let view = manager.get(lease.id).await.expect("known");
    assert_eq!(view.state, LeaseState::Active);
    assert_eq!(engine.revokes_of(lease.id), 0);
}

#[tokio::test]
async fn a_standalone_lease_needs_a_password_a_client_can_use() {
    let engine = FakeEngine::new(Credential::UpstreamPassword);
    let (_, password) = manager(&engine, false)
        .issue_standalone(&Principal::from(app().clone()), "t", None, None)
        .await
        .expect("issued");
    assert_eq!(password.expose(), "upstream-secret");

    // SCRAM keys only: refused, and the credential made is given back.
    let engine = FakeEngine::new(Credential::ScramOnly);
    let manager = manager(&engine, false);
    let refused = manager
        .issue_standalone(&Principal::from(app().clone()), "t", None, None)
        .await;
    assert!(
        matches!(
            refused,
            Err(LeaseError::Engine(EngineError::Unsupported { .. }))
        ),
        "{refused:?}"
    );
    assert_eq!(manager.revoke_all_and_wait(WAIT, true).await, 0);
    let ledger = engine.list().await.expect("listed");
    assert!(ledger.is_empty(), "{ledger:?}");
    assert_eq!(manager.active_count(), 0);
    let views = manager.list(&Default::default()).await.expect("listed");
    assert_eq!(views.len(), 1);
    assert_eq!(engine.revokes_of(views[0].id), 1);
    assert_eq!(views[0].end_reason.as_deref(), Some("no_client_credential"));
}

#[tokio::test]
async fn a_lease_the_policy_does_not_allow_is_never_issued() {
    let engine = FakeEngine::new(Credential::ClientPassword);
    let manager = manager(&engine, false);
    let stranger = SpiffeId::parse("spiffe://example.org/stranger").expect("valid");
    let denied = manager
        .issue_standalone(&Principal::from(stranger.clone()), "t", None, None)
        .await;
    assert!(
        matches!(denied, Err(LeaseError::Denied { .. })),
        "{denied:?}"
    );
    let unknown = manager
        .issue_standalone(&Principal::from(app().clone()), "nope", None, None)
        .await;
    assert!(
        matches!(unknown, Err(LeaseError::UnknownTemplate(_))),
        "{unknown:?}"
    );
    assert_eq!(engine.issued(), 0);
    assert_eq!(manager.active_count(), 0);
}

#[tokio::test]
async fn ending_a_lease_revokes_it_once() {
    let engine = FakeEngine::new(Credential::ClientPassword);
    let manager = manager(&engine, false);
    let (lease, _) = manager
        .issue_standalone(&Principal::from(app().clone()), "t", None, None)
        .await
        .expect("issued");
    let by_admin = EndReason::Revoked { by: ADMIN.into() };
    manager.end(lease.id, by_admin.clone());
    manager.end(lease.id, by_admin);
    manager.end(lease.id, EndReason::Expired);
    let again = manager.revoke(lease.id, ADMIN).await;
    assert!(matches!(again, Err(LeaseError::Ended(_))), "{again:?}");
    assert_eq!(manager.revoke_all_and_wait(WAIT, true).await, 0);
    assert_eq!(engine.revokes_of(lease.id), 1);
    assert_eq!(manager.active_count(), 0);
    let view = manager.get(lease.id).await.expect("remembered");
    assert_eq!(view.state, LeaseState::Revoked);
    assert_eq!(
        view.end_reason.as_deref(),
        Some("revoked by spiffe://example.org/admin")
    );
}

#[tokio::test]
async fn dropping_a_session_lease_revokes_it_once() {
    let engine = FakeEngine::new(Credential::ClientPassword);
    let manager = manager(&engine, false);
    let session = manager
        .issue_session(&Principal::from(app()), "t", &settings(), client(), None)
        .await
        .expect("issued");
    let id = session.lease().id;
    assert_eq!(session.lease().kind, LeaseKind::Session);
    assert!(matches!(session.login(), UpstreamLogin::Password(_)));
    drop(session);
    assert_eq!(manager.revoke_all_and_wait(WAIT, true).await, 0);
    assert_eq!(engine.revokes_of(id), 1);
    let view = manager.get(id).await.expect("remembered");
    assert_eq!(view.state, LeaseState::Revoked);
    assert_eq!(view.end_reason.as_deref(), Some("session_ended"));
}

#[tokio::test]
async fn a_session_lease_is_capped_at_the_svid_when_bound_to_it() {
    let engine = FakeEngine::new(Credential::ClientPassword);
    let not_after = OffsetDateTime::now_utc() + Duration::from_secs(100);
    let bound_manager = manager(&engine, true);
    let bound = bound_manager
        .issue_session(
            &Principal::from(app()),
            "t",
            &settings(),
            client(),
            Some(Bound::Svid(not_after)),
        )
        .await
        .expect("issued");
    assert_eq!(bound.lease().max_expires_at, whole_seconds(not_after));
    assert!(bound_manager.lock().active[&bound.lease().id].svid_capped);

    // Not bound, or the certificate outlives max_ttl: max_ttl decides.
    let unbound_manager = manager(&engine, false);
    let unbound = unbound_manager
        .issue_session(
            &Principal::from(app()),
            "t",
            &settings(),
            client(),
            Some(Bound::Svid(not_after)),
        )
        .await
        .expect("issued");
    assert!(unbound.lease().max_expires_at > whole_seconds(not_after));
    assert!(!unbound_manager.lock().active[&unbound.lease().id].svid_capped);
    let far = OffsetDateTime::now_utc() + Duration::from_secs(3600);
    let outlived = bound_manager
        .issue_session(
            &Principal::from(app()),
            "t",
            &settings(),
            client(),
            Some(Bound::Svid(far)),
        )
        .await
        .expect("issued");
    assert!(outlived.lease().max_expires_at < whole_seconds(far));
    assert!(!bound_manager.lock().active[&outlived.lease().id].svid_capped);
}

#[tokio::test]
async fn renew_moves_expires_at_but_never_past_max_expires_at() {
    let engine = FakeEngine::new(Credential::ClientPassword);
    let manager = manager(&engine, false);
    let (lease, _) = manager
        .issue_standalone(&Principal::from(app().clone()), "t", None, None)
        .await
        .expect("issued");

    let before = whole_seconds(OffsetDateTime::now_utc());
    let view = manager
        .renew(lease.id, Some(Duration::from_secs(10)), ADMIN)
        .await
        .expect("renewed");
    let after = whole_seconds(OffsetDateTime::now_utc());
    let ten = Duration::from_secs(10);
    assert!(view.expires_at >= before + ten && view.expires_at <= after + ten);
    assert_eq!(view.max_expires_at, lease.max_expires_at);

    let view = manager
        .renew(lease.id, Some(Duration::from_secs(3600)), ADMIN)
        .await
        .expect("renewed");
    assert_eq!(view.expires_at, lease.max_expires_at);
    let renewed = engine.renewals();
    assert_eq!(renewed.len(), 2);
    assert_eq!(
        renewed.last().map(|l| l.expires_at),
        Some(lease.max_expires_at)
    );
    let kept = manager.lock().active[&lease.id].lease.expires_at;
    assert_eq!(kept, lease.max_expires_at);

    // Longer than any representable lease: refused before the engine.
    let absurd = Duration::from_secs(11 * 31_557_600);
    let refused = manager.renew(lease.id, Some(absurd), ADMIN).await;
    assert!(
        matches!(refused, Err(LeaseError::TtlTooLong(_))),
        "{refused:?}"
    );
    assert_eq!(engine.renewals().len(), 2);
}

#[tokio::test]
async fn revoke_matching_revokes_leases_here_and_in_the_ledger() {
    let engine = FakeEngine::new(Credential::ClientPassword);
    let manager = manager(&engine, false);
    let (here, _) = manager
        .issue_standalone(&Principal::from(app().clone()), "t", None, None)
        .await
        .expect("issued");
    let elsewhere = engine.add_foreign(APP);
    let other = engine.add_foreign("spiffe://example.org/other");
    let selector = RevokeSelector::Identity(APP.into());
    let revoked = manager
        .revoke_matching(&selector, ADMIN)
        .await
        .expect("revoked");
    assert_eq!(revoked, 2);
    assert_eq!(manager.revoke_all_and_wait(WAIT, true).await, 0);
    assert_eq!(engine.revokes_of(here.id), 1);
    assert_eq!(engine.revokes_of(elsewhere.id), 1);
    assert_eq!(engine.revokes_of(other.id), 0);
}

#[tokio::test]
async fn shutdown_leaves_standalone_leases_to_the_ledger_unless_asked() {
    let engine = FakeEngine::new(Credential::ClientPassword);
    let manager = manager(&engine, false);
    let session = manager
        .issue_session(&Principal::from(app()), "t", &settings(), client(), None)
        .await
        .expect("issued");
    let (standalone, _) = manager
        .issue_standalone(&Principal::from(app().clone()), "t", None, None)
        .await
        .expect("issued");
    let session_id = session.lease().id;
    assert_eq!(manager.revoke_all_and_wait(WAIT, false).await, 0);
    assert_eq!(engine.revokes_of(session_id), 1);
    assert_eq!(engine.revokes_of(standalone.id), 0);
    // The session's guard ending later does not revoke it again.
    drop(session);
    assert_eq!(engine.revokes_of(session_id), 1);
}

#[tokio::test]
async fn a_clock_tick_renews_expires_and_asks_the_ledger() {
    let engine = FakeEngine::new(Credential::ClientPassword);
    let manager = manager(&engine, false);
    let session = manager
        .issue_session(&Principal::from(app()), "t", &settings(), client(), None)
        .await
        .expect("issued");
    let (expired, _) = manager
        .issue_standalone(&Principal::from(app().clone()), "t", None, None)
        .await
        .expect("issued");
    let (renewed_elsewhere, _) = manager
        .issue_standalone(&Principal::from(app().clone()), "t", None, None)
        .await
        .expect("issued");
    let now = whole_seconds(OffsetDateTime::now_utc());
    {
        let mut registry = manager.lock();
        // Past half its ttl: due for renewal.
        let entry = registry.active.get_mut(&session.lease().id).expect("held");
        entry.lease.expires_at = now + Duration::from_secs(10);
        for id in [expired.id, renewed_elsewhere.id] {
            let entry = registry.active.get_mut(&id).expect("held");
            entry.lease.expires_at = now - Duration::from_secs(1);
        }
    }
    // Only the ledger says the first standalone lease has expired.
    engine
        .ledger
        .lock()
        .expect("not poisoned")
        .get_mut(&expired.id)
        .expect("recorded")
        .expires_at = now - Duration::from_secs(1);

    manager.clock_tick().await;

    let renewals = engine.renewals();
    assert_eq!(renewals.len(), 1);
    assert_eq!(renewals[0].id, session.lease().id);
    assert!(renewals[0].expires_at >= now + TTL);
    assert!(renewals[0].expires_at <= session.lease().max_expires_at);
    let registry_expiry = |id| manager.lock().active.get(&id).map(|e| e.lease.expires_at);
    assert_eq!(
        registry_expiry(session.lease().id),
        Some(renewals[0].expires_at)
    );
    assert_eq!(registry_expiry(expired.id), None);
    assert_eq!(
        registry_expiry(renewed_elsewhere.id),
        Some(renewed_elsewhere.expires_at)
    );
    assert_eq!(manager.revoke_all_and_wait(WAIT, false).await, 0);
    assert_eq!(engine.revokes_of(expired.id), 1);
    assert_eq!(engine.revokes_of(renewed_elsewhere.id), 0);
    let view = manager.get(expired.id).await.expect("remembered");
    assert_eq!(view.state, LeaseState::Expired);
    assert_eq!(view.end_reason.as_deref(), Some("expired"));
}
