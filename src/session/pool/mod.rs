//! Pooled leases (`pool = "session"`): one lease, one role and up to
//! `pool_size` upstream backends per identity (and token subject),
//! template and database, shared by that identity's connections.
//!
//! * [`Pools`] finds a client's pool, or mints its lease (`session.rs`).
//! * A [`Pool`] lends a client an idle backend with the same startup
//!   parameters (a hit: no mint, no login; it must answer an empty query
//!   first), or a slot to log in a new one (a miss), or makes it wait up
//!   to `pool_wait`.
//! * `relay.rs` relays a pooled client, framed (type and length only), and
//!   says at its end whether the backend may be reset (`backend.rs`) and
//!   given back.
//! * [`Pools::run_sweeper`] closes backends idle past `pool_idle_timeout`
//!   and lets a pool go (its lease ends, the role is dropped) once it has
//!   neither clients nor backends, or at once when its lease has ended
//!   (revoked, expired, policy): the engine terminated its backends.
//!
//! Session threads: an idle backend is a socket that moves (`handoff.rs`):
//! it joins the reactor of whichever session thread its next client was
//! handed to, so a client accepted on any thread gets any idle backend of
//! its pool; nothing is routed to the thread that opened it.

mod backend;
mod relay;
pub mod session;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

pub use self::backend::Backend;
use crate::config::PoolSettings;
use crate::leases::{LeaseManager, SessionLease};
use crate::ops::telemetry;

/// How often the sweeper looks at the pools.
const SWEEP_TICK: Duration = Duration::from_millis(250);

/// What makes two connections share a pool: never a backend across any
/// of these.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// How the identity was proven ([`PoolKey::proof`]): an SVID and a
    /// token that print as the same string are not the same client.
    pub proof: String,
    pub identity: String,
    pub subject: Option<String>,
    pub template: String,
    pub database: String,
}

impl PoolKey {
    /// How `principal` proved who it is: its SVID, a token of an issuer,
    /// or an agent (by SVID or `act` claim) for a token of an issuer.
    pub fn proof(principal: &crate::identity::Principal) -> String {
        use crate::identity::{Actor, Principal};
        match principal {
            Principal::Svid(_) => "svid".into(),
            Principal::Token(token) => format!("token:{}", token.issuer),
            Principal::OnBehalf(on_behalf) => {
                let actor = match on_behalf.actor {
                    Actor::Svid(_) => "svid",
                    Actor::Act(_) => "act",
                };
                format!("{actor}-for-token:{}", on_behalf.subject.issuer)
            }
        }
    }
}

/// Every pool of this process.
#[derive(Default)]
pub struct Pools {
    slots: Mutex<HashMap<PoolKey, Arc<Slot>>>,
}

/// Where a key's pool lives; its lock is held while the pool's lease is
/// minted, so concurrent first clients share one lease.
#[derive(Default)]
struct Slot {
    pool: tokio::sync::Mutex<Option<Arc<Pool>>>,
}

impl Pools {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, key: &PoolKey) -> Arc<Slot> {
        self.lock().entry(key.clone()).or_default().clone()
    }

    /// Close idle backends past their pool's `pool_idle_timeout`, and let
    /// empty pools and pools whose lease ended go. Runs until aborted.
    pub async fn run_sweeper(self: Arc<Self>, leases: Arc<LeaseManager>) {
        let mut tick = tokio::time::interval(SWEEP_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sweep(&leases);
        }
    }

    fn sweep(&self, leases: &LeaseManager) {
        let slots: Vec<(PoolKey, Arc<Slot>)> = self
            .lock()
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        let now = Instant::now();
        for (key, slot) in slots {
            // A slot being minted for is busy, not idle.
            let Ok(mut guard) = slot.pool.try_lock() else {
                continue;
            };
            if let Some(pool) = guard.as_ref() {
                let alive = leases.is_active(pool.lease.lease().id);
                if pool.sweep(now, alive) {
                    *guard = None;
                }
            }
            let empty = guard.is_none();
            drop(guard);
            let mut slots = self.lock();
            // Only this loop's clone and the map's: nobody is about to use it.
            if empty && Arc::strong_count(&slot) == 2 {
                slots.remove(&key);
            }
        }
    }
}

/// One pool: its lease (ended when the pool is dropped), its idle
/// backends and how many exist.
pub struct Pool {
    lease: SessionLease,
    settings: PoolSettings,
    template: String,
    state: Mutex<State>,
    /// A backend went idle or a slot came free.
    freed: Notify,
    /// One login at a time (a login window is opened for one login);
    /// `true` while the lease's own first login is still unused.
    opening: tokio::sync::Mutex<bool>,
}

#[derive(Default)]
struct State {
    idle: Vec<Backend>,
    /// Backends that exist: idle, lent to a client, or logging in.
    open: u32,
    /// Clients holding the pool (a [`Member`]).
    clients: u32,
}

/// What a client is lent.
pub enum Lent {
    /// An idle backend with the client's startup parameters.
    Idle(Backend),
    /// A slot for a new backend: log one in ([`Pool::slot_freed`] if that
    /// fails).
    New,
}

impl Pool {
    fn new(lease: SessionLease, settings: PoolSettings, template: String) -> Pool {
        Pool {
            lease,
            settings,
            template,
            state: Mutex::new(State::default()),
            freed: Notify::new(),
            opening: tokio::sync::Mutex::new(true),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn lease(&self) -> &SessionLease {
        &self.lease
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    fn gauge(&self, name: &'static str, delta: f64) {
        metrics::gauge!(name, "template" => self.template.clone()).increment(delta);
    }

    /// A client joins: the pool lives while it is a member.
    fn join(self: &Arc<Self>) -> Member {
        self.state().clients += 1;
        Member(self.clone())
    }

    /// An idle backend opened with `parameters`, or a slot for a new one,
    /// waiting up to `pool_wait` for either; `None` when none came free.
    pub async fn lend(&self, parameters: &[(String, String)]) -> Option<Lent> {
        let deadline = tokio::time::Instant::now() + self.settings.wait;
        let mut counted_wait = false;
        loop {
            let notified = self.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(lent) = self.try_lend(parameters) {
                return Some(lent);
            }
            if !counted_wait {
                counted_wait = true;
                metrics::counter!(telemetry::POOL_WAITS, "template" => self.template.clone())
                    .increment(1);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                metrics::counter!(telemetry::POOL_WAIT_TIMEOUTS, "template" => self.template.clone())
                    .increment(1);
                return None;
            }
        }
    }

    fn try_lend(&self, parameters: &[(String, String)]) -> Option<Lent> {
        let mut state = self.state();
        if let Some(i) = state.idle.iter().position(|b| b.parameters == parameters) {
            let backend = state.idle.swap_remove(i);
            drop(state);
            self.gauge(telemetry::POOL_BACKENDS_IDLE, -1.0);
            self.gauge(telemetry::POOL_BACKENDS_ACTIVE, 1.0);
            metrics::counter!(telemetry::POOL_HITS, "template" => self.template.clone())
                .increment(1);
            return Some(Lent::Idle(backend));
        }
        let lent = if state.open < self.settings.size {
            state.open += 1;
            Some(Lent::New)
        } else if let Some(other) = state.idle.pop() {
            // Full, but an idle backend was opened for other parameters:
            // it makes room for this client's.
            drop(state);
            self.gauge(telemetry::POOL_BACKENDS_IDLE, -1.0);
            tokio::spawn(other.close());
            Some(Lent::New)
        } else {
            None
        };
        if lent.is_some() {
            metrics::counter!(telemetry::POOL_MISSES, "template" => self.template.clone())
                .increment(1);
        }
        lent
    }

    /// A new backend is in use (logged in on a [`Lent::New`] slot).
    pub fn opened(&self) {
        self.gauge(telemetry::POOL_BACKENDS_ACTIVE, 1.0);
    }

    /// A slot lent for a new backend was not used (the login failed).
    pub fn slot_freed(&self) {
        let mut state = self.state();
        state.open = state.open.saturating_sub(1);
        drop(state);
        self.freed.notify_one();
    }

    /// A client is done with its backend: kept idle (it was reset), or
    /// closed (`None`).
    pub fn give_back(&self, backend: Option<Backend>) {
        self.gauge(telemetry::POOL_BACKENDS_ACTIVE, -1.0);
        let mut state = self.state();
        match backend {
            Some(mut backend) => {
                backend.idle_since = Instant::now();
                state.idle.push(backend);
                drop(state);
                self.gauge(telemetry::POOL_BACKENDS_IDLE, 1.0);
            }
            None => {
                state.open = state.open.saturating_sub(1);
                drop(state);
            }
        }
        self.freed.notify_one();
    }

    /// The sweeper's look: close backends idle too long (all of them if
    /// the lease has ended); `true` when the pool should go.
    fn sweep(&self, now: Instant, alive: bool) -> bool {
        let timeout = self.settings.idle_timeout;
        let mut state = self.state();
        let (stale, kept): (Vec<Backend>, Vec<Backend>) = std::mem::take(&mut state.idle)
            .into_iter()
            .partition(|b| !alive || now.duration_since(b.idle_since) >= timeout);
        state.idle = kept;
        state.open = state.open.saturating_sub(stale.len() as u32);
        let empty = state.clients == 0 && state.open == 0;
        drop(state);
        if !stale.is_empty() {
            self.gauge(telemetry::POOL_BACKENDS_IDLE, -(stale.len() as f64));
            self.freed.notify_waiters();
        }
        for backend in stale {
            tokio::spawn(backend.close());
        }
        !alive || empty
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let idle = std::mem::take(&mut self.state().idle);
        if !idle.is_empty() {
            self.gauge(telemetry::POOL_BACKENDS_IDLE, -(idle.len() as f64));
        }
        // The lease ends when `self.lease` drops, after this: the engine
        // terminates whatever backend is still open and drops the role.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            for backend in idle {
                handle.spawn(backend.close());
            }
        }
    }
}

/// A client's hold on its pool.
pub struct Member(Arc<Pool>);

impl std::ops::Deref for Member {
    type Target = Pool;
    fn deref(&self) -> &Pool {
        &self.0
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.clients = state.clients.saturating_sub(1);
    }
}
