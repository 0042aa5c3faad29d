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

pub mod election;
pub mod revoke;
pub mod sql;
pub mod template;
pub mod tls;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use ephemera_engine::{
    Engine, EngineError, IssueRequest, IssuedCredential, Lease, LeaseComment, LeaseKind, Password,
    ReaperElection, RevokeOutcome, ScramSecret,
};
use rand::Rng;
use time::OffsetDateTime;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::revoke::{Plan, RoleToRevoke};
use crate::sql::{quote_ident, quote_literal, Quoted};
pub use crate::template::RoleTemplate;
use crate::template::{render_statement, RANDOM_SUFFIX_LEN, ROLE_PREFIX};
pub use crate::tls::{SslMode, UpstreamTls};

/// Where the upstream is and how the engine logs in to administer roles.
#[derive(Debug, Clone)]
pub struct AdminConnection {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Password,
    pub tls: UpstreamTls,
    /// Connections per database pool.
    pub pool_size: usize,
    /// The database for housekeeping: listing the ledger, the reaper lock.
    pub database: String,
}

#[derive(Debug, Clone)]
pub struct PostgresEngineConfig {
    pub admin: AdminConnection,
    /// How long a minted role's password opens the door: `VALID UNTIL now() + login_window`.
    pub login_window: Duration,
    pub templates: Vec<RoleTemplate>,
}

pub struct PostgresEngine {
    /// Replaceable (SIGHUP), e.g. after the admin password was rotated.
    admin: RwLock<Arc<AdminConnection>>,
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
}

impl fmt::Debug for PostgresEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresEngine")
            .field("admin", &self.admin())
            .finish_non_exhaustive()
    }
}

impl PostgresEngine {
    /// Set up the engine. Pools connect lazily: nothing is dialled here.
    pub fn new(config: PostgresEngineConfig) -> Result<Self, EngineError> {
        let engine = PostgresEngine {
            admin: RwLock::new(Arc::new(config.admin)),
            templates: RwLock::new(HashMap::new()),
            pools: Mutex::new(HashMap::new()),
            login_window: config.login_window,
            reaper_lock: tokio::sync::Mutex::new(None),
            server_version: std::sync::atomic::AtomicI32::new(0),
        };
        engine.set_templates(config.templates)?;
        Ok(engine)
    }

    /// Replace the templates (configuration reload). Leases of templates that
    /// disappear are still revoked correctly: revocation falls back to
    /// dropping the role with `DROP OWNED`.
    pub fn set_templates(&self, templates: Vec<RoleTemplate>) -> Result<(), EngineError> {
        let mut map = HashMap::new();
        for template in templates {
            template::check_template_name(&template.name).map_err(|reason| {
                EngineError::InvalidTemplate {
                    template: template.name.clone(),
                    reason,
                }
            })?;
            map.insert(template.name.clone(), template);
        }
        *self.templates.write().unwrap_or_else(|p| p.into_inner()) = map;
        Ok(())
    }

    pub fn template(&self, name: &str) -> Option<RoleTemplate> {
        self.templates
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    fn admin(&self) -> Arc<AdminConnection> {
        self.admin.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Log in as `user` with `password` from now on (a rotated password):
    /// the pools are rebuilt on next use, to the same server as before.
    /// Connections already lent out finish their work.
    pub fn set_admin_credentials(&self, user: String, password: Password) {
        let mut admin = self.admin.write().unwrap_or_else(|p| p.into_inner());
        *admin = Arc::new(AdminConnection {
            user,
            password,
            ..AdminConnection::clone(&admin)
        });
        self.pools.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn pool(&self, database: &str) -> Result<Pool, EngineError> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pool) = pools.get(database) {
            return Ok(pool.clone());
        }
        let pool = admin_pool(&self.admin(), database)?;
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

fn admin_config(admin: &AdminConnection, database: &str) -> tokio_postgres::Config {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&admin.host)
        .port(admin.port)
        .user(&admin.user)
        .password(admin.password.expose())
        .dbname(database)
        .application_name("ephemera")
        .ssl_mode(admin.tls.tokio_postgres_mode())
        .connect_timeout(Duration::from_secs(10));
    pg
}

fn admin_pool(admin: &AdminConnection, database: &str) -> Result<Pool, EngineError> {
    let tls = MakeRustlsConnect::new((*admin.tls.client_config()).clone());
    let manager = Manager::from_config(
        admin_config(admin, database),
        tls,
        ManagerConfig {
            // Verified recycling: a pooled connection that the server killed
            // (admin password rotated, pg_terminate_backend, restart) is
            // noticed and replaced instead of failing the next session.
            recycling_method: RecyclingMethod::Verified,
        },
    );
    Pool::builder(manager)
        .max_size(admin.pool_size.max(1))
        .build()
        .map_err(|e| EngineError::Unavailable {
            action: "build the admin connection pool",
            source: Box::new(e),
        })
}

/// `eph_<template>_<18 random base-36 characters>`.
fn role_name(template: &str) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rngs::OsRng;
    let suffix: String = (0..RANDOM_SUFFIX_LEN)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{ROLE_PREFIX}{template}_{suffix}")
}

pub(crate) fn unquotable(e: sql::Unquotable) -> EngineError {
    EngineError::Refused {
        action: "quote a name for SQL",
        source: Box::new(e),
    }
}

pub(crate) fn db_error(action: &'static str, error: tokio_postgres::Error) -> EngineError {
    if let Some(db) = error.as_db_error() {
        // tokio-postgres prints only "db error"; say what the server said.
        EngineError::Refused {
            action,
            source: format!("{} (SQLSTATE {})", db.message(), db.code().code()).into(),
        }
    } else {
        EngineError::Unavailable {
            action,
            source: Box::new(error),
        }
    }
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .expect("a current timestamp formats as RFC 3339")
}

/// The one transaction that brings a role into the world.
fn create_role_sql(
    template: &RoleTemplate,
    role: &Quoted,
    secret: &ScramSecret,
    lease: &Lease,
    valid_until: OffsetDateTime,
) -> Result<String, sql::Unquotable> {
    let mut sql = String::with_capacity(1024);
    // Losing this commit in a crash loses only a role nobody has logged in
    // as yet; waiting for the WAL flush would cost every session.
    sql.push_str("SELECT set_config('synchronous_commit', 'off', true);\n");
    // A session role is for Ephemera's one login; a standalone lease's
    // holder may open several connections (a batch job's workers).
    let connection_limit = match lease.kind {
        LeaseKind::Session => 1,
        LeaseKind::Standalone => -1,
    };
    sql.push_str(&format!(
        "CREATE ROLE {role} WITH LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION \
         CONNECTION LIMIT {connection_limit} VALID UNTIL {} PASSWORD {}",
        quote_literal(&rfc3339(valid_until))?,
        quote_literal(&secret.verifier())?,
    ));
    if !template.member_of.is_empty() {
        let groups = template
            .member_of
            .iter()
            .map(|g| quote_ident(g).map(|q| q.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        sql.push_str(" IN ROLE ");
        sql.push_str(&groups.join(", "));
    }
    sql.push_str(";\n");
    sql.push_str(&format!(
        "COMMENT ON ROLE {role} IS {};\n",
        quote_literal(&lease.comment().to_json())?
    ));
    for statement in &template.creation_statements {
        sql.push_str(&render_statement(statement, role, &template.database)?);
        sql.push_str(";\n");
    }
    Ok(sql)
}

/// How many roles the reaper drops in one transaction. Measured on a fresh
/// cluster (BENCHMARKS.md): 10 000 roles in 0.76 s at 100 per transaction,
/// against 4.4 s one per transaction.
pub const REVOKE_BATCH: usize = 100;

const UNDEFINED_OBJECT: &str = "42704";

#[async_trait]
impl Engine for PostgresEngine {
    fn name(&self) -> &'static str {
        "postgres"
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
        let (secret, password, valid_until) = match request.kind {
            // Ephemera logs in itself, once, right away.
            LeaseKind::Session => (
                ScramSecret::generate(),
                None,
                ephemera_engine::checked_add(issued_at, self.login_window).ok_or_else(|| {
                    EngineError::TimeOutOfRange("issue time + lease.login_window".into())
                })?,
            ),
            // The client logs in with a password for as long as the lease lives.
            LeaseKind::Standalone => {
                let password = Password::generate();
                let secret = ScramSecret::from_password(
                    password.expose(),
                    ScramSecret::CLIENT_PASSWORD_ITERATIONS,
                );
                (secret, Some(password), expires_at)
            }
        };
        let lease = Lease {
            id: request.lease_id,
            engine: self.name(),
            kind: request.kind,
            template: template.name.clone(),
            role: role_name,
            identity: request.identity,
            database: template.database.clone(),
            client_addr: request.client_addr,
            issued_at,
            expires_at,
            max_expires_at: request.max_expires_at,
        };
        let sql =
            create_role_sql(&template, &role, &secret, &lease, valid_until).map_err(unquotable)?;
        let client = self.client(&template.database, "create a role").await?;
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| db_error("create a role", e))?;
        Ok(IssuedCredential {
            lease,
            secret,
            password,
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

    async fn lead_reaper(&self) -> Result<ReaperElection, EngineError> {
        let action = "take the reaper lock";
        let mut held = self.reaper_lock.lock().await;
        if let Some(client) = held.as_ref() {
            // Still ours while the transaction holding it lives.
            if !client.is_closed() && client.simple_query("").await.is_ok() {
                return Ok(ReaperElection::Leader);
            }
            *held = None;
        }
        let admin = self.admin();
        let tls = MakeRustlsConnect::new((*admin.tls.client_config()).clone());
        let (client, connection) = admin_config(&admin, &admin.database)
            .connect(tls)
            .await
            .map_err(|e| db_error(action, e))?;
        tokio::spawn(connection);
        election::prepare(&client, &admin.database).await?;
        let outcome = election::elect(&client).await?;
        if outcome == ReaperElection::Leader {
            *held = Some(client);
        }
        Ok(outcome)
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
            Err(RevokeError::Gone(_)) => Err(EngineError::Refused {
                action: "revoke a role",
                source: format!(
                    "the role {:?} could not be granted to the admin role",
                    lease.role
                )
                .into(),
            }),
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

/// Why [`PostgresEngine::revoke_roles`] stopped.
enum RevokeError {
    /// Granting a role to ourselves failed with `undefined_object`: a role
    /// may be gone already (the client, to check which).
    Gone(deadpool_postgres::Object),
    Failed(EngineError),
}

impl From<EngineError> for RevokeError {
    fn from(e: EngineError) -> Self {
        RevokeError::Failed(e)
    }
}

impl PostgresEngine {
    async fn revoke_batch(&self, database: &str, leases: &[&Lease]) -> Result<Plan, RevokeError> {
        // Cloned once per batch: the lock is not held across the awaits.
        let templates: HashMap<String, RoleTemplate> = {
            let all = self.templates.read().unwrap_or_else(|p| p.into_inner());
            leases
                .iter()
                .filter_map(|l| all.get(&l.template).map(|t| (t.name.clone(), t.clone())))
                .collect()
        };
        let roles: Vec<RoleToRevoke<'_>> = leases
            .iter()
            .map(|lease| RoleToRevoke {
                role: &lease.role,
                template: templates.get(&lease.template),
            })
            .collect();
        self.revoke_roles(database, &roles).await
    }

    /// The four steps of [`revoke`] for `roles`, all of `database`.
    async fn revoke_roles(
        &self,
        database: &str,
        roles: &[RoleToRevoke<'_>],
    ) -> Result<Plan, RevokeError> {
        let action = "revoke a role";
        let quoted = roles
            .iter()
            .map(|r| quote_ident(r.role))
            .collect::<Result<Vec<_>, _>>()
            .map_err(unquotable)?;
        let client = self.client(database, action).await?;
        // 1. and 2., one round trip: fence (membership, NOLOGIN), terminate
        // and wait, then read the plan with search_path empty so that its
        // names come out schema-qualified.
        let version = self.server_version(&client).await?;
        let mut sql = revoke::fence_sql(&quoted);
        sql.push_str(&revoke::terminate_sql(&quoted, revoke::Wait::ForExit).map_err(unquotable)?);
        sql.push_str("SET LOCAL search_path = '';\n");
        sql.push_str(&revoke::plan_sql(version, &revoke::plan_params(roles)).map_err(unquotable)?);
        let messages = match client.simple_query(&sql).await {
            Ok(messages) => messages,
            Err(e) if e.code().map(|c| c.code()) == Some(UNDEFINED_OBJECT) => {
                return Err(RevokeError::Gone(client));
            }
            Err(e) => return Err(db_error(action, e).into()),
        };
        let rows = messages.iter().filter_map(|message| match message {
            // The plan's rows have four columns; the terminations' one.
            tokio_postgres::SimpleQueryMessage::Row(row) if row.len() == 4 => Some([
                row.get(0).map(str::to_owned),
                row.get(1).map(str::to_owned),
                row.get(2).map(str::to_owned),
                row.get(3).map(str::to_owned),
            ]),
            _ => None,
        });
        let plan = Plan::from_rows(database, rows, version).map_err(unquotable)?;
        drop(client);
        // 3. Prepared transactions, then the other databases.
        for prepared in &plan.prepared {
            self.roll_back_prepared(prepared).await?;
        }
        for (other, roles) in &plan.other_databases {
            let sql =
                revoke::drop_elsewhere_sql(roles, plan.grantors.get(other)).map_err(unquotable)?;
            self.client(other, action)
                .await?
                .batch_execute(&sql)
                .await
                .map_err(|e| db_error("drop what a role owns in another database", e))?;
        }
        // 4. The handover and the drop, in one transaction.
        let sql = revoke::drop_sql(roles, &plan, database).map_err(unquotable)?;
        self.client(database, action)
            .await?
            .batch_execute(&sql)
            .await
            .map_err(|e| db_error(action, e))?;
        Ok(plan)
    }

    /// `ROLLBACK PREPARED` may only be run by the transaction's owner (or a
    /// superuser), outside a transaction block: as the role, one statement
    /// at a time, on a connection that is thrown away if anything fails.
    async fn roll_back_prepared(&self, prepared: &revoke::Prepared) -> Result<(), EngineError> {
        let action = "roll back a role's prepared transaction";
        let role = quote_ident(&prepared.role).map_err(unquotable)?;
        let gid = quote_literal(&prepared.gid).map_err(unquotable)?;
        let client = self.client(&prepared.database, action).await?;
        let result = async {
            client.batch_execute(&format!("SET ROLE {role}")).await?;
            let rolled_back = client
                .batch_execute(&format!("ROLLBACK PREPARED {gid}"))
                .await;
            client.batch_execute("RESET ROLE").await?;
            rolled_back
        }
        .await;
        match result {
            Ok(()) => Ok(()),
            // Finished by its 2PC manager in the meantime.
            Err(e) if e.code().map(|c| c.code()) == Some(UNDEFINED_OBJECT) => {
                let _ = client.batch_execute("RESET ROLE").await;
                Ok(())
            }
            Err(e) => {
                // Never lend out a connection that may still be the role.
                let _ = deadpool_postgres::Object::take(client);
                Err(db_error(action, e))
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

async fn is_role_gone(client: &tokio_postgres::Client, role: &str) -> bool {
    matches!(
        client
            .query_opt(
                "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1",
                &[&role]
            )
            .await,
        Ok(None)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_have_prefix_template_and_fit() {
        let name = role_name(&"t".repeat(template::MAX_TEMPLATE_NAME_LEN));
        assert_eq!(name.len(), 63);
        let name = role_name("billing_rw");
        assert!(name.starts_with("eph_billing_rw_"), "{name}");
        assert_ne!(role_name("x"), role_name("x"));
    }

    #[test]
    fn create_sql_never_contains_anything_but_a_verifier() {
        let template = RoleTemplate {
            name: "billing_rw".into(),
            database: "billing".into(),
            member_of: vec!["billing_rw".into(), "read\"ers".into()],
            owner: None,
            creation_statements: vec!["GRANT CONNECT ON DATABASE {{database}} TO {{name}}".into()],
            revocation_statements: vec![],
            keep_large_objects: false,
        };
        let secret = ScramSecret::generate();
        let now = OffsetDateTime::now_utc();
        let lease = Lease {
            id: uuid_for_test(),
            engine: "postgres",
            kind: LeaseKind::Session,
            template: "billing_rw".into(),
            role: "eph_billing_rw_x".into(),
            identity: "spiffe://example.org/it's".into(),
            database: "billing".into(),
            client_addr: None,
            issued_at: now,
            expires_at: now,
            max_expires_at: now,
        };
        let role = quote_ident("eph_billing_rw_x").unwrap();
        let sql = create_role_sql(&template, &role, &secret, &lease, now).unwrap();
        assert!(sql.contains("PASSWORD 'SCRAM-SHA-256$1:"), "{sql}");
        assert!(
            sql.contains("IN ROLE \"billing_rw\", \"read\"\"ers\";"),
            "{sql}"
        );
        assert!(sql.contains("it''s"), "{sql}");
        assert!(sql.contains("GRANT CONNECT ON DATABASE \"billing\" TO \"eph_billing_rw_x\";"));
    }

    fn uuid_for_test() -> ephemera_engine::LeaseId {
        "67e55044-10b1-426f-9247-bb680e5fe0c8".parse().unwrap()
    }
}
