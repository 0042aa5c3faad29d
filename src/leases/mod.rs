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

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ephemera_engine::{
    checked_add, checked_sub, Engine, EngineError, IssueRequest, Lease, LeaseId, LeaseKind,
    LeaseState, Password, ReaperElection, RevokeOutcome, UpstreamLogin,
};
use time::OffsetDateTime;
use tokio_util::task::TaskTracker;

use crate::admin::api::{LeaseFilter, LeaseView, RevokeRequest};
use crate::config::{Rules, TemplateSettings, MAX_DURATION};
use crate::identity::SpiffeId;
use crate::ops::audit::{AuditEvent, AuditKind, AuditLog};
use crate::ops::telemetry;
use crate::policy::Decision;

/// First and longest wait between attempts to revoke a lease.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How often the clock looks at renewals and expiries.
const CLOCK_TICK: Duration = Duration::from_millis(250);
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
            EndReason::PolicyChanged => "policy_changed",
            EndReason::Reaped => "reaped",
            EndReason::RoleVanished => "role_vanished",
            EndReason::NoClientCredential => "no_client_credential",
        }
    }

    fn state(&self) -> LeaseState {
        match self {
            EndReason::Expired | EndReason::MaxTtl | EndReason::SvidExpired | EndReason::Reaped => {
                LeaseState::Expired
            }
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

struct Entry {
    lease: Lease,
    ttl: Duration,
    /// `max_expires_at` was lowered to the client certificate's expiry.
    svid_capped: bool,
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

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    fn rules(&self) -> Arc<Rules> {
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
        identity: &SpiffeId,
        template: &str,
        settings: &TemplateSettings,
        client_addr: Option<SocketAddr>,
        svid_not_after: Option<OffsetDateTime>,
    ) -> Result<(Lease, UpstreamLogin, Option<Password>), EngineError> {
        let now = whole_seconds(OffsetDateTime::now_utc());
        let mut max_expires_at = checked_add(now, settings.max_ttl).ok_or_else(|| {
            EngineError::TimeOutOfRange(format!("now + the max_ttl of template {template:?}"))
        })?;
        let mut svid_capped = false;
        if let (true, Some(not_after)) = (self.bind_to_svid, svid_not_after) {
            if not_after < max_expires_at {
                max_expires_at = whole_seconds(not_after);
                svid_capped = true;
            }
        }
        let request = IssueRequest {
            lease_id: uuid::Uuid::new_v4(),
            kind,
            identity: identity.to_string(),
            template: template.to_owned(),
            client_addr,
            ttl: settings.ttl,
            max_expires_at,
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
                ttl: settings.ttl,
                svid_capped,
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
        identity: &SpiffeId,
        template: &str,
        settings: &TemplateSettings,
        client_addr: SocketAddr,
        svid_not_after: Option<OffsetDateTime>,
    ) -> Result<SessionLease, EngineError> {
        let (lease, login, _) = self
            .issue(
                LeaseKind::Session,
                identity,
                template,
                settings,
                Some(client_addr),
                svid_not_after,
            )
            .await?;
        Ok(SessionLease {
            manager: self.clone(),
            lease,
            login,
            end_reason: EndReason::SessionEnded,
        })
    }

    /// Issue a standalone lease (a password for direct logins) to `identity`,
    /// if the policy allows it `template`.
    pub async fn issue_standalone(
        &self,
        identity: &SpiffeId,
        template: &str,
        client_addr: Option<SocketAddr>,
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
                None,
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

    /// Ephemera's own login as a session lease's role has succeeded: nobody
    /// may log in as it again (see [`Engine::close_login`]).
    pub async fn close_login(&self, lease: &Lease) -> Result<(), EngineError> {
        self.engine.close_login(lease).await
    }

    /// Record a successful login as the lease's role (for the audit trail).
    pub fn logged_in(&self, lease: &Lease) {
        self.audit
            .record(AuditEvent::lease(AuditKind::Login, lease));
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

    fn spawn_revoke(&self, lease: Lease, reason: EndReason) {
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

    fn pending(&self, delta: i64) {
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

    fn finished(&self, lease: &Lease, reason: &EndReason, outcome: RevokeOutcome) {
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

    fn revoke_failed(&self, lease: &Lease, error: &EngineError) {
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

    // ----- the admin API's view -------------------------------------------

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
    async fn find_active(&self, id: LeaseId) -> Result<Lease, LeaseError> {
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

    /// Revoke every active lease (here and in the ledger) matching exactly
    /// one selector; returns how many were revoked.
    pub async fn revoke_matching(
        &self,
        selector: &RevokeRequest,
        actor: &str,
    ) -> Result<usize, LeaseError> {
        let matches: Box<dyn Fn(&Lease) -> bool + Send> = match selector {
            RevokeRequest {
                identity: Some(id),
                identity_prefix: None,
                template: None,
            } => {
                let id = id.clone();
                Box::new(move |l| l.identity == id)
            }
            RevokeRequest {
                identity: None,
                identity_prefix: Some(p),
                template: None,
            } if !p.is_empty() => {
                let p = p.clone();
                Box::new(move |l| l.identity.starts_with(&p))
            }
            RevokeRequest {
                identity: None,
                identity_prefix: None,
                template: Some(t),
            } => {
                let t = t.clone();
                Box::new(move |l| l.template == t)
            }
            _ => return Err(LeaseError::BadSelector),
        };
        let mut targets: HashMap<LeaseId, Lease> = self
            .engine
            .list()
            .await?
            .into_iter()
            .filter(|l| matches(l))
            .map(|l| (l.id, l))
            .collect();
        for entry in self.lock().active.values() {
            if matches(&entry.lease) {
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

    // ----- background tasks ----------------------------------------------

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

fn view(lease: &Lease, state: LeaseState, ended: Option<&Ended>) -> LeaseView {
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

/// A lease bound to one session. Ends (is revoked) when dropped.
pub struct SessionLease {
    manager: Arc<LeaseManager>,
    lease: Lease,
    login: UpstreamLogin,
    end_reason: EndReason,
}

impl SessionLease {
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
