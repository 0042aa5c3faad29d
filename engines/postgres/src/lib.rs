//! Ephemera's PostgreSQL engine: every lease is a fresh role.
//!
//! `issue` creates `eph_<template>_<random>` with `LOGIN`, membership in the
//! template's group roles, `CONNECTION LIMIT 1`, a password (as a SCRAM
//! verifier only) that expires after the login window, and the lease as JSON
//! in `COMMENT ON ROLE`, all in one transaction, in the template's database.
//!
//! `revoke` (see [`revoke`]) terminates the role's backends, resolves what
//! the session left behind (prepared transactions, grants in other
//! databases, objects that would run with the owner's rights), runs the
//! template's revocation statements, hands objects the session created to
//! the template's owner (or drops them) and drops the role. It is idempotent.
//!
//! All SQL text is built with [`sql::quote_ident`] / [`sql::quote_literal`].

#![forbid(unsafe_code)]

pub mod admin;
mod create;
pub mod election;
mod kind;
mod login_probe;
mod preflight;
pub mod revoke;
pub mod template;
pub mod token_uses;

/// The quoting helpers, shared by every engine (`ephemera_engine::sql`).
pub use ephemera_engine::sql;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Pool;
use ephemera_engine::{
    AdminLogin, Engine, EngineError, EngineSetup, IssueRequest, IssuedCredential, Lease,
    LeaseComment, LeaseKind, Password, ReaperElection, RevokeOutcome, ScramSecret, Template,
    Upstream, UpstreamLogin, UpstreamLoginMethod,
};
use time::OffsetDateTime;

use crate::admin::{db_error, unquotable};
use crate::create::{create_role_sql, rfc3339, role_name};
pub use crate::kind::PostgresKind;
use crate::revoke::run::{is_role_gone, RevokeError};
use crate::revoke::RoleToRevoke;
use crate::sql::{quote_ident, quote_literal};
pub use crate::template::RoleTemplate;
use crate::template::ROLE_PREFIX;

/// The engine's name: `engine = "postgres"` in a template, the default.
pub const NAME: &str = "postgres";

pub struct PostgresEngine {
    upstream: Upstream,
    /// Replaceable (SIGHUP), e.g. after the admin password was rotated.
    admin: RwLock<Arc<AdminLogin>>,
    /// Reloadable (SIGHUP): the proxy swaps in new templates.
    templates: RwLock<HashMap<String, RoleTemplate>>,
    /// One admin pool per database, made on first use: a role's statements
    /// (grants, `DROP OWNED`) only reach objects of the database they run in.
    pools: Mutex<HashMap<String, Pool>>,
    login_window: Duration,
    /// The connection holding the reaper election's row lock, while we
    /// lead; `None` also before the election table was checked.
    reaper_lock: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    /// The upstream's `server_version_num`, once known (0: not yet).
    server_version: std::sync::atomic::AtomicI32,
    /// `ephemera.token_uses` has been created (or found).
    token_uses_ready: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for PostgresEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresEngine")
            .field("upstream", &self.upstream)
            .field("admin", &self.admin())
            .finish_non_exhaustive()
    }
}

/// This engine's templates among `templates` (each validated by
/// [`PostgresKind`], so each is a [`RoleTemplate`]).
fn role_templates(templates: &[Template]) -> Result<HashMap<String, RoleTemplate>, EngineError> {
    templates
        .iter()
        .map(|t| match t.spec.get::<RoleTemplate>() {
            Some(role) => Ok((t.name.clone(), role.clone())),
            None => Err(EngineError::InvalidTemplate {
                template: t.name.clone(),
                reason: "it is not a postgres template".into(),
            }),
        })
        .collect()
}

impl PostgresEngine {
    /// Set up the engine. Pools connect lazily: nothing is dialled here.
    pub fn new(setup: EngineSetup) -> Result<Self, EngineError> {
        Ok(PostgresEngine {
            upstream: setup.upstream,
            admin: RwLock::new(Arc::new(setup.admin)),
            templates: RwLock::new(role_templates(&setup.templates)?),
            pools: Mutex::new(HashMap::new()),
            login_window: setup.login_window,
            reaper_lock: tokio::sync::Mutex::new(None),
            server_version: std::sync::atomic::AtomicI32::new(0),
            token_uses_ready: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn template(&self, name: &str) -> Option<RoleTemplate> {
        self.templates
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    fn admin(&self) -> Arc<AdminLogin> {
        self.admin.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn pool(&self, database: &str) -> Result<Pool, EngineError> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pool) = pools.get(database) {
            return Ok(pool.clone());
        }
        let pool = admin::pool(&self.upstream, &self.admin(), database)?;
        pools.insert(database.to_owned(), pool.clone());
        Ok(pool)
    }

    async fn client(
        &self,
        database: &str,
        action: &'static str,
    ) -> Result<deadpool_postgres::Object, EngineError> {
        self.pool(database)?
            .get()
            .await
            .map_err(|e| EngineError::Unavailable {
                action,
                source: Box::new(e),
            })
    }
}

/// How many roles the reaper drops in one transaction. Measured on a fresh
/// cluster (BENCHMARKS.md): 10 000 roles in 0.76 s at 100 per transaction,
/// against 4.4 s one per transaction.
pub const REVOKE_BATCH: usize = 100;

pub(crate) const UNDEFINED_OBJECT: &str = "42704";

#[async_trait]
impl Engine for PostgresEngine {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Leases of templates that disappear are still revoked correctly:
    /// revocation falls back to dropping the role with `DROP OWNED`. A
    /// rotated admin password applies to new admin connections from now on:
    /// the pools are rebuilt on next use, to the same server as before, and
    /// connections already lent out finish their work.
    fn reload(&self, templates: Vec<Template>, admin: AdminLogin) -> Result<(), EngineError> {
        let templates = role_templates(&templates)?;
        *self.templates.write().unwrap_or_else(|p| p.into_inner()) = templates;
        *self.admin.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(admin);
        self.pools.lock().unwrap_or_else(|p| p.into_inner()).clear();
        Ok(())
    }

    async fn issue(&self, request: IssueRequest) -> Result<IssuedCredential, EngineError> {
        let template = self
            .template(&request.template)
            .ok_or_else(|| EngineError::UnknownTemplate(request.template.clone()))?;
        let role_name = role_name(&template.name);
        let role = quote_ident(&role_name).map_err(unquotable)?;
        let issued_at = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .expect("0 ns is valid");
        let expires_at = ephemera_engine::checked_add(issued_at, request.ttl)
            .ok_or_else(|| EngineError::TimeOutOfRange("issue time + ttl".into()))?
            .min(request.max_expires_at);
        let (login, password, valid_until) =
            self.credential(request.kind, issued_at, expires_at, &role_name)?;
        let connection_limit = request.connection_limit;
        let lease = Lease {
            id: request.lease_id,
            engine: self.name(),
            kind: request.kind,
            template: template.name.clone(),
            role: role_name,
            identity: request.identity,
            subject: request.subject,
            database: template.database.clone(),
            client_addr: request.client_addr,
            issued_at,
            expires_at,
            max_expires_at: request.max_expires_at,
        };
        let verifier = match &login {
            UpstreamLogin::Scram(secret) => Some(secret),
            _ => None,
        };
        let sql = create_role_sql(
            &template,
            &role,
            verifier,
            &lease,
            valid_until,
            connection_limit,
        )
        .map_err(unquotable)?;
        let client = self.client(&template.database, "create a role").await?;
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| db_error("create a role", e))?;
        Ok(IssuedCredential {
            lease,
            login,
            client_password: password,
        })
    }

    async fn renew(&self, lease: &Lease) -> Result<(), EngineError> {
        let action = "renew a role's lease";
        let role = quote_ident(&lease.role).map_err(unquotable)?;
        let mut sql = format!(
            "COMMENT ON ROLE {role} IS {};\n",
            quote_literal(&lease.comment().to_json()).map_err(unquotable)?
        );
        if lease.kind == LeaseKind::Standalone {
            sql.push_str(&format!(
                "ALTER ROLE {role} VALID UNTIL {};\n",
                quote_literal(&rfc3339(lease.expires_at)).map_err(unquotable)?
            ));
        }
        let client = self.client(&lease.database, action).await?;
        match client.batch_execute(&sql).await {
            Ok(()) => Ok(()),
            Err(e) if e.code().map(|c| c.code()) == Some(UNDEFINED_OBJECT) => {
                Err(EngineError::Gone(lease.role.clone()))
            }
            Err(e) => Err(db_error(action, e)),
        }
    }

    async fn list(&self) -> Result<Vec<Lease>, EngineError> {
        let action = "list the roles in the ledger";
        let client = self.client(&self.admin().database, action).await?;
        let rows = client
            .query(
                "SELECT rolname::text, pg_catalog.shobj_description(oid, 'pg_authid')
                 FROM pg_catalog.pg_roles WHERE rolname LIKE $1 ORDER BY rolname",
                &[&format!("{}%", ROLE_PREFIX.replace('_', "\\_"))],
            )
            .await
            .map_err(|e| db_error(action, e))?;
        let mut leases = Vec::with_capacity(rows.len());
        for row in rows {
            let role: String = row.get(0);
            let comment: Option<String> = row.get(1);
            match comment.as_deref().map(LeaseComment::from_json) {
                Some(Ok(comment)) => leases.push(Lease::from_comment(self.name(), role, comment)),
                _ => tracing::warn!(
                    role,
                    "a role with Ephemera's reserved prefix has no lease comment; left alone"
                ),
            }
        }
        Ok(leases)
    }

    async fn claim_token_use(
        &self,
        _template: &str,
        key: &str,
        expires_at: OffsetDateTime,
    ) -> Result<bool, EngineError> {
        use std::sync::atomic::Ordering;
        let database = self.admin().database.clone();
        let client = self.client(&database, "record a single_use token").await?;
        if !self.token_uses_ready.load(Ordering::Acquire) {
            token_uses::prepare(&client, &database).await?;
            self.token_uses_ready.store(true, Ordering::Release);
        }
        token_uses::claim(&client, key, expires_at).await
    }

    async fn lead_reaper(&self) -> Result<ReaperElection, EngineError> {
        election::lead(&self.reaper_lock, &self.upstream, &self.admin()).await
    }

    async fn close_login(&self, lease: &Lease) -> Result<(), EngineError> {
        let action = "close a session role's login window";
        let role = quote_ident(&lease.role).map_err(unquotable)?;
        // The role can change its own password but not its VALID UNTIL:
        // with it in the past, nobody logs in as the role again.
        let sql = format!(
            "SELECT pg_catalog.set_config('synchronous_commit', 'off', true);\n\
             ALTER ROLE {role} VALID UNTIL '1970-01-01T00:00:00Z';\n"
        );
        let client = self.client(&lease.database, action).await?;
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| db_error(action, e))
    }

    /// A new backend of a pooled lease: a fresh verifier (or none, for a
    /// certificate login) replaces whatever password a session gave the
    /// role, and the window opens for the login window only.
    async fn reopen_login(&self, lease: &Lease) -> Result<UpstreamLogin, EngineError> {
        let action = "open a pooled role's login window";
        let role = quote_ident(&lease.role).map_err(unquotable)?;
        let now = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .expect("0 ns is valid");
        let (login, _, valid_until) =
            self.credential(LeaseKind::Session, now, lease.expires_at, &lease.role)?;
        let password = match &login {
            UpstreamLogin::Scram(secret) => quote_literal(&secret.verifier())
                .map_err(unquotable)?
                .to_string(),
            _ => "NULL".to_owned(),
        };
        let sql = format!(
            "SELECT pg_catalog.set_config('synchronous_commit', 'off', true);\n\
             ALTER ROLE {role} PASSWORD {password} VALID UNTIL {};\n",
            quote_literal(&rfc3339(valid_until)).map_err(unquotable)?
        );
        let client = self.client(&lease.database, action).await?;
        match client.batch_execute(&sql).await {
            Ok(()) => Ok(login),
            Err(e) if e.code().map(|c| c.code()) == Some(UNDEFINED_OBJECT) => {
                Err(EngineError::Gone(lease.role.clone()))
            }
            Err(e) => Err(db_error(action, e)),
        }
    }

    async fn revoke(&self, lease: &Lease) -> Result<RevokeOutcome, EngineError> {
        let template = self.template(&lease.template);
        let roles = [RoleToRevoke {
            role: &lease.role,
            template: template.as_ref(),
        }];
        match self.revoke_roles(&lease.database, &roles).await {
            Ok(plan) => Ok(RevokeOutcome::Revoked {
                cleanup: plan.cleanup_for(&lease.role),
            }),
            Err(RevokeError::Gone(client)) if is_role_gone(&client, &lease.role).await => {
                Ok(RevokeOutcome::AlreadyGone)
            }
            Err(RevokeError::Gone(_)) => Err(EngineError::refused(
                "revoke a role",
                None,
                format!(
                    "the role {:?} could not be granted to the admin role",
                    lease.role
                ),
            )),
            Err(RevokeError::Failed(e)) => Err(e),
        }
    }

    /// Batches of [`REVOKE_BATCH`] roles per database, one transaction each.
    /// A batch fails as a whole (a role already dropped elsewhere, a
    /// revocation statement's error); its roles are then revoked one by
    /// one, so each gets its own outcome.
    async fn revoke_many(&self, leases: &[Lease]) -> Vec<Result<RevokeOutcome, EngineError>> {
        let mut by_database: HashMap<&str, Vec<usize>> = HashMap::new();
        for (index, lease) in leases.iter().enumerate() {
            by_database.entry(&lease.database).or_default().push(index);
        }
        let mut results: Vec<Option<Result<RevokeOutcome, EngineError>>> =
            leases.iter().map(|_| None).collect();
        for (database, indexes) in by_database {
            for chunk in indexes.chunks(REVOKE_BATCH) {
                let batch: Vec<&Lease> = chunk.iter().map(|&i| &leases[i]).collect();
                match self.revoke_batch(database, &batch).await {
                    Ok(plan) => {
                        for &i in chunk {
                            results[i] = Some(Ok(RevokeOutcome::Revoked {
                                cleanup: plan.cleanup_for(&leases[i].role),
                            }));
                        }
                    }
                    Err(error) => {
                        let error = match error {
                            RevokeError::Gone(_) => "a role of the batch is gone".to_owned(),
                            RevokeError::Failed(e) => e.to_string(),
                        };
                        tracing::debug!(%error, roles = chunk.len(),
                            "batched revoke failed; revoking these roles one by one");
                        for &i in chunk {
                            results[i] = Some(self.revoke(&leases[i]).await);
                        }
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|result| result.expect("every lease is in one chunk"))
            .collect()
    }
}

impl PostgresEngine {
    /// How the role `role` will be logged in as, the password for a
    /// standalone lease's client, and until when the role's `VALID UNTIL`
    /// lets logins in.
    fn credential(
        &self,
        kind: LeaseKind,
        issued_at: OffsetDateTime,
        expires_at: OffsetDateTime,
        role: &str,
    ) -> Result<(UpstreamLogin, Option<Password>, OffsetDateTime), EngineError> {
        let login_window_end = || {
            ephemera_engine::checked_add(issued_at, self.login_window).ok_or_else(|| {
                EngineError::TimeOutOfRange("issue time + lease.login_window".into())
            })
        };
        match (kind, &self.upstream.login) {
            // Ephemera logs in itself, once, right away.
            (LeaseKind::Session, UpstreamLoginMethod::Scram) => Ok((
                UpstreamLogin::Scram(ScramSecret::generate()),
                None,
                login_window_end()?,
            )),
            // A certificate for this one login, valid for the login window;
            // the role has no password at all.
            (LeaseKind::Session, UpstreamLoginMethod::Certificate(ca)) => Ok((
                UpstreamLogin::Certificate(ca.issue(role, self.login_window)?),
                None,
                login_window_end()?,
            )),
            // The client logs in with a password for as long as the lease lives.
            (LeaseKind::Standalone, UpstreamLoginMethod::Scram) => {
                let password = Password::generate();
                let secret = ScramSecret::from_password(
                    password.expose(),
                    ScramSecret::CLIENT_PASSWORD_ITERATIONS,
                );
                Ok((UpstreamLogin::Scram(secret), Some(password), expires_at))
            }
            // Refused before anything is created: a password would be a
            // verifier in pg_authid, which certificate logins promise not
            // to leave (docs/engines/postgres.md).
            (LeaseKind::Standalone, UpstreamLoginMethod::Certificate(_)) => {
                Err(EngineError::Unsupported {
                    engine: NAME,
                    what: "hand out standalone credentials (ephemera creds/exec) while \
                           upstream.login = \"certificate\": minted roles have no password; \
                           connect through the proxy instead",
                })
            }
        }
    }

    async fn server_version(&self, client: &tokio_postgres::Client) -> Result<i32, EngineError> {
        use std::sync::atomic::Ordering;
        let known = self.server_version.load(Ordering::Relaxed);
        if known != 0 {
            return Ok(known);
        }
        let version: i32 = client
            .query_one(
                "SELECT pg_catalog.current_setting('server_version_num')::integer",
                &[],
            )
            .await
            .map_err(|e| db_error("read the server version", e))?
            .get(0);
        self.server_version.store(version, Ordering::Relaxed);
        Ok(version)
    }
}
