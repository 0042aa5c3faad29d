//! Leases: issuing credentials through the engine, keeping them alive while
//! they are wanted, and making sure every one of them ends.
//!
//! * A **session** lease is held by its session through a [`SessionLease`];
//!   when that is dropped (the session ended, failed half-way, or its task
//!   panicked) the lease is revoked. While the session lives, the lease
//!   [clock](LeaseManager::run_clock) renews it every `ttl/2`, re-checking
//!   the (reloadable) policy, and ends it at `max_ttl` or the client
//!   certificate's expiry.
//! * A **standalone** lease (admin API `POST /v1/creds/…`) lives until its
//!   `expires_at` unless renewed, or until revoked.
//! * The database is the ledger: each role's comment holds its lease. The
//!   [reaper](LeaseManager::run_reaper) (one replica at a time, elected with
//!   an advisory lock) drops every role whose lease has expired, including
//!   those left behind by a process that died.
//!
//! Ending a lease revokes it through the engine, which terminates the role's
//! backends (the client sees FATAL 57P01) and drops the role. A revoke that
//! fails is retried with backoff, never given up.

mod clock;
mod reaper;
mod revoke;
mod session_lease;
#[cfg(test)]
mod tests;
pub mod view;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ephemera_engine::{
    checked_add, Engine, EngineError, IssueRequest, Lease, LeaseId, LeaseKind, LeaseState,
    Password, UpstreamLogin,
};
use time::OffsetDateTime;
use tokio_util::task::TaskTracker;

pub use self::session_lease::SessionLease;
use self::view::{view, LeaseView};
use crate::config::{Rules, TemplateSettings, MAX_DURATION};
use crate::identity::Principal;
use crate::ops::audit::{AuditEvent, AuditKind, AuditLog};
use crate::ops::telemetry;
use crate::policy::Decision;

/// How many ended leases are remembered for the admin API.
const ENDED_HISTORY: usize = 1000;

/// The reloadable templates and policy, shared with the proxy.
pub type SharedRules = Arc<RwLock<Arc<Rules>>>;

/// Why a lease ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The client or server closed the session.
    SessionEnded,
    /// The upstream login as the minted role failed.
    LoginFailed,
    /// Ephemera is shutting down.
    Shutdown,
    /// An admin (SPIFFE ID) revoked it.
    Revoked { by: String },
    /// Its TTL passed without renewal (standalone leases).
    Expired,
    /// Its max TTL passed.
    MaxTtl,
    /// The client certificate it was bound to expired.
    SvidExpired,
    /// The token it was bound to expired (`bind_to_expiry`).
    TokenExpired,
    /// The reloaded policy no longer lets the identity use the template.
    PolicyChanged,
    /// The reaper found it expired in the ledger.
    Reaped,
    /// Its role vanished from the database (dropped by someone else).
    RoleVanished,
    /// A standalone lease whose engine gave no credential a client can use.
    NoClientCredential,
}

impl EndReason {
    pub fn label(&self) -> &'static str {
        match self {
            EndReason::SessionEnded => "session_ended",
            EndReason::LoginFailed => "login_failed",
            EndReason::Shutdown => "shutdown",
            EndReason::Revoked { .. } => "revoked",
            EndReason::Expired => "expired",
            EndReason::MaxTtl => "max_ttl",
            EndReason::SvidExpired => "svid_expired",
            EndReason::TokenExpired => "token_expired",
            EndReason::PolicyChanged => "policy_changed",
            EndReason::Reaped => "reaped",
            EndReason::RoleVanished => "role_vanished",
            EndReason::NoClientCredential => "no_client_credential",
        }
    }

    fn state(&self) -> LeaseState {
        match self {
            EndReason::Expired
            | EndReason::MaxTtl
            | EndReason::SvidExpired
            | EndReason::TokenExpired
            | EndReason::Reaped => LeaseState::Expired,
            _ => LeaseState::Revoked,
        }
    }

    fn audit_kind(&self) -> AuditKind {
        match self {
            EndReason::Reaped => AuditKind::Reaped,
            _ if self.state() == LeaseState::Expired => AuditKind::Expired,
            _ => AuditKind::Revoked,
        }
    }

    fn actor(&self) -> String {
        match self {
            EndReason::Revoked { by } => by.clone(),
            EndReason::Reaped => "reaper".into(),
            EndReason::PolicyChanged => "policy".into(),
            EndReason::SessionEnded | EndReason::LoginFailed => "session".into(),
            _ => "ephemera".into(),
        }
    }

    fn describe(&self) -> String {
        match self {
            EndReason::Revoked { by } => format!("revoked by {by}"),
            other => other.label().to_owned(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("no lease {0}")]
    NotFound(LeaseId),
    #[error("lease {0} has already ended")]
    Ended(LeaseId),
    #[error("no role template named {0:?}")]
    UnknownTemplate(String),
    #[error("identity {identity} may not use role template {template:?}")]
    Denied { identity: String, template: String },
    #[error("give exactly one of identity, identity_prefix or template")]
    BadSelector,
    #[error("ttl {0} is too long: at most 10 years (\"10y\"); a lease never lives past its max_expires_at anyway")]
    TtlTooLong(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// What a session's credential expires with: its client certificate, or
/// its token (when the issuer has `bind_to_expiry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Svid(OffsetDateTime),
    Token(OffsetDateTime),
}

struct Entry {
    lease: Lease,
    /// Whom it was issued to, for the policy at each renewal.
    principal: Principal,
    ttl: Duration,
    /// `max_expires_at` was lowered to the client certificate's expiry.
    svid_capped: bool,
    /// `max_expires_at` was lowered to the token's `exp`.
    token_capped: bool,
    /// Do not try to renew before this (backoff after a failure).
    renew_not_before: OffsetDateTime,
}

struct Ended {
    lease: Lease,
    state: LeaseState,
    at: OffsetDateTime,
    reason: String,
}

#[derive(Default)]
struct Registry {
    active: HashMap<LeaseId, Entry>,
    ended: VecDeque<Ended>,
    /// Roles the reaper is revoking now, so a scan does not start twice.
    reaping: HashSet<String>,
}

pub struct LeaseManager {
    engine: Arc<dyn Engine>,
    rules: SharedRules,
    audit: Arc<AuditLog>,
    bind_to_svid: bool,
    registry: Mutex<Registry>,
    revocations: TaskTracker,
    pending: AtomicI64,
    me: std::sync::Weak<LeaseManager>,
}

impl std::fmt::Debug for LeaseManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseManager")
            .field("engine", &self.engine.name())
            .field("active", &self.active_count())
            .finish()
    }
}

impl LeaseManager {
    /// Build the manager. Its gauges start at zero so they show in
    /// `/metrics` before anything happens.
    pub fn new(
        engine: Arc<dyn Engine>,
        rules: SharedRules,
        audit: Arc<AuditLog>,
        bind_to_svid: bool,
    ) -> Arc<Self> {
        metrics::gauge!(telemetry::REVOCATIONS_PENDING).set(0.0);
        metrics::gauge!(telemetry::LEASES_ACTIVE).set(0.0);
        metrics::gauge!(telemetry::REAPER_LAG_SECONDS).set(0.0);
        metrics::gauge!(telemetry::SESSIONS_ACTIVE).increment(0.0);
        Arc::new_cyclic(|me| LeaseManager {
            engine,
            rules,
            audit,
            bind_to_svid,
            registry: Mutex::new(Registry::default()),
            revocations: TaskTracker::new(),
            pending: AtomicI64::new(0),
            me: me.clone(),
        })
    }

    /// Whether session leases end with their client certificate
    /// (`lease.bind_to_svid`).
    pub fn binds_svid(&self) -> bool {
        self.bind_to_svid
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The templates, policy and token issuers in force.
    pub(crate) fn rules(&self) -> Arc<Rules> {
        self.rules.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn active_count(&self) -> usize {
        self.lock().active.len()
    }

    async fn issue(
        &self,
        kind: LeaseKind,
        identity: &Principal,
        template: &str,
        settings: &TemplateSettings,
        client_addr: Option<SocketAddr>,
        bound: Option<Bound>,
    ) -> Result<(Lease, UpstreamLogin, Option<Password>), EngineError> {
        let now = whole_seconds(OffsetDateTime::now_utc());
        let mut max_expires_at = checked_add(now, settings.max_ttl).ok_or_else(|| {
            EngineError::TimeOutOfRange(format!("now + the max_ttl of template {template:?}"))
        })?;
        let (mut svid_capped, mut token_capped) = (false, false);
        let cap = match bound {
            Some(Bound::Svid(at)) if self.bind_to_svid => Some((at, &mut svid_capped)),
            Some(Bound::Token(at)) => Some((at, &mut token_capped)),
            _ => None,
        };
        if let Some((not_after, capped)) = cap {
            if not_after < max_expires_at {
                max_expires_at = whole_seconds(not_after);
                *capped = true;
            }
        }
        let request = IssueRequest {
            lease_id: uuid::Uuid::new_v4(),
            kind,
            identity: identity.to_string(),
            subject: identity.subject().map(str::to_owned),
            template: template.to_owned(),
            client_addr,
            ttl: settings.ttl,
            max_expires_at,
            connection_limit: settings.pool.as_ref().map(|pool| pool.size),
        };
        let started = std::time::Instant::now();
        let credential = self.engine.issue(request).await?;
        metrics::histogram!(telemetry::ROLE_CREATION_SECONDS)
            .record(started.elapsed().as_secs_f64());
        let lease = credential.lease;
        metrics::counter!(telemetry::LEASES_ISSUED, "template" => lease.template.clone(), "kind" => kind_label(kind)).increment(1);
        self.audit
            .record(AuditEvent::lease(AuditKind::LeaseIssued, &lease).reason(kind_label(kind)));
        let mut registry = self.lock();
        registry.active.insert(
            lease.id,
            Entry {
                lease: lease.clone(),
                principal: identity.clone(),
                ttl: settings.ttl,
                svid_capped,
                token_capped,
                renew_not_before: now,
            },
        );
        metrics::gauge!(telemetry::LEASES_ACTIVE).set(registry.active.len() as f64);
        Ok((lease, credential.login, credential.client_password))
    }

    /// Issue a lease for a proxied session; it ends when the returned guard
    /// is dropped, if nothing ended it before.
    pub async fn issue_session(
        self: &Arc<Self>,
        identity: &Principal,
        template: &str,
        settings: &TemplateSettings,
        client_addr: SocketAddr,
        bound: Option<Bound>,
    ) -> Result<SessionLease, EngineError> {
        let (lease, login, _) = self
            .issue(
                LeaseKind::Session,
                identity,
                template,
                settings,
                Some(client_addr),
                bound,
            )
            .await?;
        Ok(SessionLease::new(self.clone(), lease, login))
    }

    /// Issue a standalone lease (a password for direct logins) to `identity`,
    /// if the policy allows it `template`.
    pub async fn issue_standalone(
        &self,
        identity: &Principal,
        template: &str,
        client_addr: Option<SocketAddr>,
        bound: Option<Bound>,
    ) -> Result<(Lease, Password), LeaseError> {
        let rules = self.rules();
        let settings = rules
            .templates
            .get(template)
            .ok_or_else(|| LeaseError::UnknownTemplate(template.to_owned()))?;
        if let Decision::Denied { .. } = rules.policy.decide(identity, template) {
            return Err(LeaseError::Denied {
                identity: identity.to_string(),
                template: template.to_owned(),
            });
        }
        let (lease, login, password) = self
            .issue(
                LeaseKind::Standalone,
                identity,
                template,
                settings,
                client_addr,
                bound,
            )
            .await?;
        // The client logs in directly: it needs a password. An engine whose
        // credential is something else cannot serve standalone leases; the
        // credential it made is given back at once.
        let password = match (password, login) {
            (Some(password), _) | (None, UpstreamLogin::Password(password)) => password,
            (None, _) => {
                let engine = lease.engine;
                self.end(lease.id, EndReason::NoClientCredential);
                return Err(LeaseError::Engine(EngineError::Unsupported {
                    engine,
                    what: "hand out a password for a standalone lease",
                }));
            }
        };
        Ok((lease, password))
    }

    /// Record that a `single_use` token (its key) has been used, in the
    /// database of `template`'s engine, shared by every replica. `false`:
    /// it was used before.
    pub async fn claim_token_use(
        &self,
        template: &str,
        key: &str,
        expires_at: OffsetDateTime,
    ) -> Result<bool, EngineError> {
        self.engine.claim_token_use(template, key, expires_at).await
    }

    /// Ephemera's own login as a session lease's role has succeeded: nobody
    /// may log in as it again (see [`Engine::close_login`]).
    pub async fn close_login(&self, lease: &Lease) -> Result<(), EngineError> {
        self.engine.close_login(lease).await
    }

    /// A pooled lease needs another backend: open its login window again
    /// for one login (see [`Engine::reopen_login`]).
    pub async fn reopen_login(&self, lease: &Lease) -> Result<UpstreamLogin, EngineError> {
        self.engine.reopen_login(lease).await
    }

    /// Whether the lease is still live here (not ended by revocation,
    /// expiry or policy).
    pub fn is_active(&self, id: LeaseId) -> bool {
        self.lock().active.contains_key(&id)
    }

    /// Record a successful login as the lease's role (for the audit trail),
    /// with the client certificate it used, if any.
    pub fn logged_in(&self, lease: &Lease, login: &UpstreamLogin) {
        let mut event = AuditEvent::lease(AuditKind::Login, lease);
        if let UpstreamLogin::Certificate(cert) = login {
            event = event.client_cert(cert);
        }
        self.audit.record(event);
    }

    /// End a lease: forget it and revoke it in the background until done.
    /// Does nothing if it has already ended.
    pub fn end(&self, id: LeaseId, reason: EndReason) {
        let entry = self.lock().active.remove(&id);
        if let Some(entry) = entry {
            self.record_ended(&entry.lease, &reason);
            self.spawn_revoke(entry.lease, reason);
        }
    }

    /// Remember an ended lease for the admin API (from the moment it ends,
    /// not once its revocation has finished).
    fn record_ended(&self, lease: &Lease, reason: &EndReason) {
        let mut registry = self.lock();
        if registry.ended.iter().any(|e| e.lease.id == lease.id) {
            return;
        }
        registry.ended.push_front(Ended {
            lease: lease.clone(),
            state: reason.state(),
            at: OffsetDateTime::now_utc(),
            reason: reason.describe(),
        });
        registry.ended.truncate(ENDED_HISTORY);
        metrics::gauge!(telemetry::LEASES_ACTIVE).set(registry.active.len() as f64);
    }

    /// Extend a lease to `now + ttl` (default: the template's), never past
    /// its `max_expires_at`.
    pub async fn renew(
        &self,
        id: LeaseId,
        ttl: Option<Duration>,
        actor: &str,
    ) -> Result<LeaseView, LeaseError> {
        let too_long =
            |ttl: Duration| LeaseError::TtlTooLong(humantime::format_duration(ttl).to_string());
        if let Some(ttl) = ttl.filter(|ttl| *ttl > MAX_DURATION) {
            return Err(too_long(ttl));
        }
        let mut lease = self.find_active(id).await?;
        let template_ttl = self.rules().templates.get(&lease.template).map(|t| t.ttl);
        let ttl = ttl.or(template_ttl).unwrap_or(Duration::from_secs(15 * 60));
        let until = checked_add(OffsetDateTime::now_utc(), ttl).ok_or_else(|| too_long(ttl))?;
        lease.expires_at = whole_seconds(until).min(lease.max_expires_at);
        self.engine.renew(&lease).await?;
        if let Some(entry) = self.lock().active.get_mut(&id) {
            entry.lease.expires_at = lease.expires_at;
        }
        self.audit
            .record(AuditEvent::lease(AuditKind::Renewed, &lease).actor(actor));
        Ok(view(&lease, LeaseState::Active, None))
    }

    /// An `Arc` to self for spawned tasks (the manager only exists inside
    /// the `Arc` that [`LeaseManager::new`] builds).
    fn self_handle(&self) -> Arc<LeaseManager> {
        self.me
            .upgrade()
            .expect("the manager is alive while its methods run")
    }
}

/// Lease times are kept to the second, as the ledger's RFC 3339 comments and
/// `VALID UNTIL` show them, so "renewed up to max_expires_at" compares equal.
fn whole_seconds(at: OffsetDateTime) -> OffsetDateTime {
    at.replace_nanosecond(0).expect("0 ns is always valid")
}

fn kind_label(kind: LeaseKind) -> &'static str {
    match kind {
        LeaseKind::Session => "session",
        LeaseKind::Standalone => "standalone",
    }
}
