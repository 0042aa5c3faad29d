//! Ephemera's postgres-static engine: a lease checks out an existing role.
//!
//! For applications that must be a fixed role (objects it owns, row-level
//! security written against its name, grants made to it by hand). A lease
//! takes the role's *turn* (see [`ledger`]), records itself in the ledger,
//! sets a verifier of fresh random SCRAM keys with a login window, and hands
//! the proxy the keys; once the proxy's login succeeded, `close_login`
//! records the new backend's pid with the lease and closes the role again
//! (with `rotate = "per_lease"`, to a verifier nobody holds). Leases of the
//! same role may overlap: an established session does not care about later
//! password changes.
//!
//! Revoking a lease terminates only its own backend. Whenever a revocation
//! leaves the role without leases (or ends a standalone lease, whose holder
//! had a password), the role gets a verifier nobody holds and `VALID UNTIL`
//! in the past. The role, its objects and its grants are never touched.
//!
//! A clear password exists only for standalone leases (`ephemera creds`,
//! `exec`): it is handed to the client and never stored or logged.

#![forbid(unsafe_code)]

mod kind;
mod lease_sql;
pub mod ledger;
mod preflight;
pub mod role;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::Pool;
use ephemera_engine::{
    checked_add, AdminLogin, Engine, EngineError, EngineSetup, IssueRequest, IssuedCredential,
    Lease, LeaseId, LeaseKind, Password, ReaperElection, RevokeOutcome, ScramSecret, Template,
    Upstream, UpstreamLogin,
};
use ephemera_engine_postgres::admin::{self, db_error};
use ephemera_engine_postgres::election;
use time::OffsetDateTime;

pub use crate::kind::{parse_template, Rotate, StaticKind, StaticTemplate};
use crate::ledger::Turn;

/// `engine = "postgres-static"` in a template.
pub const NAME: &str = "postgres-static";

pub struct StaticEngine {
    upstream: Upstream,
    admin: RwLock<Arc<AdminLogin>>,
    templates: RwLock<HashMap<String, StaticTemplate>>,
    /// Admin connections to the admin database, where the ledger is; a
    /// role's `ALTER ROLE` works from any database.
    pool: Mutex<Option<Pool>>,
    login_window: Duration,
    /// The ledger's tables exist.
    prepared: tokio::sync::OnceCell<()>,
    /// Logins in progress: each holds its role's turn until `close_login`
    /// (or the lease's revocation) gives it back.
    turns: Mutex<HashMap<LeaseId, Turn>>,
    /// `rotate = "interval"`: the keys in use for each role, since when.
    keys: Mutex<HashMap<String, (ScramSecret, Instant)>>,
    /// The connection holding the reaper election, while we lead.
    reaper_lock: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

impl fmt::Debug for StaticEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticEngine")
            .field("upstream", &self.upstream)
            .field("admin", &self.admin())
            .finish_non_exhaustive()
    }
}

fn static_templates(
    templates: &[Template],
) -> Result<HashMap<String, StaticTemplate>, EngineError> {
    templates
        .iter()
        .map(|t| match t.spec.get::<StaticTemplate>() {
            Some(spec) => Ok((t.name.clone(), spec.clone())),
            None => Err(EngineError::InvalidTemplate {
                template: t.name.clone(),
                reason: "it is not a postgres-static template".into(),
            }),
        })
        .collect()
}

/// Only one lease at a time may hold a role's password in the clear.
const OBJECT_IN_USE: &str = "55006";

impl StaticEngine {
    pub fn new(setup: EngineSetup) -> Result<Self, EngineError> {
        Ok(StaticEngine {
            upstream: setup.upstream,
            admin: RwLock::new(Arc::new(setup.admin)),
            templates: RwLock::new(static_templates(&setup.templates)?),
            pool: Mutex::new(None),
            login_window: setup.login_window,
            prepared: tokio::sync::OnceCell::new(),
            turns: Mutex::new(HashMap::new()),
            keys: Mutex::new(HashMap::new()),
            reaper_lock: tokio::sync::Mutex::new(None),
        })
    }

    fn admin(&self) -> Arc<AdminLogin> {
        self.admin.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn template(&self, name: &str) -> Result<StaticTemplate, EngineError> {
        self.templates
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::UnknownTemplate(name.to_owned()))
    }

    /// An admin connection to the admin database, the ledger ready.
    async fn client(&self, action: &'static str) -> Result<deadpool_postgres::Object, EngineError> {
        let pool = {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            match pool.as_ref() {
                Some(pool) => pool.clone(),
                None => {
                    let admin = self.admin();
                    let made = admin::pool(&self.upstream, &admin, &admin.database)?;
                    *pool = Some(made.clone());
                    made
                }
            }
        };
        let client = pool.get().await.map_err(|e| EngineError::Unavailable {
            action,
            source: Box::new(e),
        })?;
        let database = self.admin().database.clone();
        self.prepared
            .get_or_try_init(|| ledger::prepare(&client, &database))
            .await?;
        Ok(client)
    }

    /// The keys a new lease of `template` logs in with.
    fn keys_for(&self, template: &StaticTemplate) -> ScramSecret {
        let Some(interval) = template
            .rotate_interval
            .filter(|_| template.rotate == Rotate::Interval)
        else {
            return ScramSecret::generate();
        };
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        match keys.get(&template.role) {
            Some((secret, since)) if since.elapsed() < interval => secret.clone(),
            _ => {
                let secret = ScramSecret::generate();
                keys.insert(template.role.clone(), (secret.clone(), Instant::now()));
                secret
            }
        }
    }

    /// Is `role` closed after every login (per-lease keys), or only when
    /// its keys are forgotten?
    fn rotates_per_lease(&self, role: &str) -> bool {
        !self
            .templates
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|t| t.role == role && t.rotate == Rotate::Interval)
    }

    fn forget_keys(&self, role: &str) {
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(role);
    }

    fn lease_for(
        &self,
        request: IssueRequest,
        template: &StaticTemplate,
    ) -> Result<Lease, EngineError> {
        let issued_at = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .expect("0 ns is valid");
        let expires_at = checked_add(issued_at, request.ttl)
            .ok_or_else(|| EngineError::TimeOutOfRange("issue time + ttl".into()))?
            .min(request.max_expires_at);
        Ok(Lease {
            id: request.lease_id,
            engine: NAME,
            kind: request.kind,
            template: template.name.clone(),
            role: template.role.clone(),
            identity: request.identity,
            subject: request.subject,
            database: template.database.clone(),
            client_addr: request.client_addr,
            issued_at,
            expires_at,
            max_expires_at: request.max_expires_at,
        })
    }
}

#[async_trait]
impl Engine for StaticEngine {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn issue(&self, request: IssueRequest) -> Result<IssuedCredential, EngineError> {
        let template = self.template(&request.template)?;
        let lease = self.lease_for(request, &template)?;
        // The ledger first (the turn's table lives there).
        drop(self.client("check out a static role").await?);
        let admin = self.admin();
        let idle_ms = u64::try_from(self.login_window.as_millis())
            .unwrap_or(u64::MAX / 2)
            .saturating_add(10_000);
        let turn = Turn::take(&self.upstream, &admin, &lease.role, idle_ms).await?;
        if let Some(holder) = lease_sql::standalone_holder(&turn.client, &lease).await? {
            return Err(EngineError::refused(
                "check out a static role",
                ephemera_engine::SqlState::new(OBJECT_IN_USE),
                format!(
                    "the role {:?} is checked out by a standalone lease (of {holder}) whose \
                     password must keep working until it ends; try again after it ends",
                    lease.role
                ),
            ));
        }
        let (secret, password, valid_until) = match lease.kind {
            LeaseKind::Session => {
                let window = checked_add(lease.issued_at, self.login_window).ok_or_else(|| {
                    EngineError::TimeOutOfRange("issue time + lease.login_window".into())
                })?;
                (self.keys_for(&template), None, window)
            }
            LeaseKind::Standalone => {
                let password = Password::generate();
                let secret = ScramSecret::from_password(
                    password.expose(),
                    ScramSecret::CLIENT_PASSWORD_ITERATIONS,
                );
                (secret, Some(password), lease.expires_at)
            }
        };
        let mut client = self.client("check out a static role").await?;
        lease_sql::record_and_open(&mut client, &lease, &secret, valid_until).await?;
        if lease.kind == LeaseKind::Session {
            self.turns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(lease.id, turn);
        }
        Ok(IssuedCredential {
            lease,
            login: UpstreamLogin::Scram(secret),
            client_password: password,
        })
    }

    fn reload(&self, templates: Vec<Template>, admin: AdminLogin) -> Result<(), EngineError> {
        let templates = static_templates(&templates)?;
        *self.templates.write().unwrap_or_else(|p| p.into_inner()) = templates;
        *self.admin.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(admin);
        *self.pool.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }

    async fn renew(&self, lease: &Lease) -> Result<(), EngineError> {
        let mut client = self.client("renew a static lease").await?;
        lease_sql::renew(&mut client, lease).await
    }

    /// Record the backend Ephemera just logged in with, close the role and
    /// give the turn back.
    async fn close_login(&self, lease: &Lease) -> Result<(), EngineError> {
        let action = "record a static lease's backend";
        let turn = self
            .turns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&lease.id);
        let Some(turn) = turn else {
            return Err(EngineError::refused(
                action,
                None,
                "no login of this lease is in progress (its turn timed out)",
            ));
        };
        let rotate = self.rotates_per_lease(&lease.role);
        lease_sql::record_backend(&turn.client, lease, rotate).await
    }

    async fn revoke(&self, lease: &Lease) -> Result<RevokeOutcome, EngineError> {
        // A login that never reached close_login gives its turn back.
        drop(
            self.turns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&lease.id),
        );
        let mut client = self.client("revoke a static lease").await?;
        let per_lease = self.rotates_per_lease(&lease.role);
        let outcome = lease_sql::revoke(&mut client, lease, per_lease).await?;
        if let lease_sql::Revoked::Closed = outcome {
            self.forget_keys(&lease.role);
        }
        Ok(match outcome {
            lease_sql::Revoked::NotInLedger => RevokeOutcome::AlreadyGone,
            _ => RevokeOutcome::revoked(),
        })
    }

    async fn list(&self) -> Result<Vec<Lease>, EngineError> {
        let client = self.client("list the static leases").await?;
        ledger::list(&client, NAME).await
    }

    /// The same election as the postgres engine's (one row no other role
    /// may lock): in one process, whichever engine holds it makes the
    /// process the reaper of every engine's ledger.
    async fn lead_reaper(&self) -> Result<ReaperElection, EngineError> {
        election::lead(&self.reaper_lock, &self.upstream, &self.admin()).await
    }
}

/// What went wrong with a statement of `action`.
pub(crate) fn failed(action: &'static str) -> impl Fn(tokio_postgres::Error) -> EngineError {
    move |e| db_error(action, e)
}

pub(crate) use ledger::table;

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(keys: serde_json::Value) -> (StaticEngine, StaticTemplate) {
        let serde_json::Value::Object(keys) = keys else {
            unreachable!("an object")
        };
        let spec = parse_template("legacy", "billing", keys).expect("valid keys");
        let setup = EngineSetup {
            upstream: Upstream {
                host: "127.0.0.1".into(),
                port: 1,
                tls: None,
                connect_timeout: Duration::from_secs(1),
                login: ephemera_engine::UpstreamLoginMethod::Scram,
            },
            admin: AdminLogin {
                user: "admin".into(),
                password: Password::new("unused".into()),
                database: "postgres".into(),
                pool_size: 1,
            },
            login_window: Duration::from_secs(10),
            templates: vec![Template {
                name: "legacy".into(),
                database: "billing".into(),
                spec: ephemera_engine::TemplateSpec::new(spec.clone()),
            }],
        };
        (
            StaticEngine::new(setup).expect("starts without dialling"),
            spec,
        )
    }

    #[test]
    fn per_lease_draws_fresh_keys_and_interval_reuses_them_until_rotated() {
        let (per_lease, template) = engine(serde_json::json!({"role": "app"}));
        assert_ne!(
            per_lease.keys_for(&template).verifier(),
            per_lease.keys_for(&template).verifier()
        );
        assert!(per_lease.rotates_per_lease("app"));

        let (interval, template) = engine(
            serde_json::json!({"role": "app", "rotate": "interval", "rotate_interval": "1h"}),
        );
        let first = interval.keys_for(&template).verifier();
        assert_eq!(first, interval.keys_for(&template).verifier());
        assert!(!interval.rotates_per_lease("app"));
        interval.forget_keys("app");
        assert_ne!(first, interval.keys_for(&template).verifier());
    }
}
