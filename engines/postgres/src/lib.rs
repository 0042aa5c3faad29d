//! Ephemera's PostgreSQL engine: every lease is a fresh role.
//!
//! `issue` creates `eph_<template>_<random>` with `LOGIN`, membership in the
//! template's group roles, `CONNECTION LIMIT 1`, a password (as a SCRAM
//! verifier only) that expires after the login window, and the lease as JSON
//! in `COMMENT ON ROLE`, all in one transaction, in the template's database.
//!
//! `revoke` terminates the role's backends, runs the template's revocation
//! statements, hands objects the session created to the template's owner (or
//! drops them) and drops the role. It is idempotent.
//!
//! All SQL text is built with [`sql::quote_ident`] / [`sql::quote_literal`].

pub mod sql;
pub mod template;
pub mod tls;

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use ephemera_engine::{
    Engine, EngineError, IssueRequest, IssuedCredential, Lease, RevokeOutcome, ScramSecret,
};
use rand::Rng;
use time::OffsetDateTime;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::sql::{quote_ident, quote_literal, Quoted};
pub use crate::template::RoleTemplate;
use crate::template::{render_statement, RANDOM_SUFFIX_LEN, ROLE_PREFIX};
pub use crate::tls::{SslMode, UpstreamTls};

/// A password that prints as `<redacted>`.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    pub fn new(password: String) -> Self {
        Password(password)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

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
}

#[derive(Debug, Clone)]
pub struct PostgresEngineConfig {
    pub admin: AdminConnection,
    /// How long a minted role's password opens the door: `VALID UNTIL now() + login_window`.
    pub login_window: Duration,
    pub templates: Vec<RoleTemplate>,
}

pub struct PostgresEngine {
    templates: HashMap<String, RoleTemplate>,
    /// One admin pool per database that templates use: a role's statements
    /// (grants, `DROP OWNED`) only reach objects of the database they run in.
    pools: HashMap<String, Pool>,
    login_window: Duration,
}

impl fmt::Debug for PostgresEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresEngine")
            .field("templates", &self.templates.keys().collect::<Vec<_>>())
            .field("databases", &self.pools.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl PostgresEngine {
    /// Set up the engine. Pools connect lazily: nothing is dialled here.
    pub fn new(config: PostgresEngineConfig) -> Result<Self, EngineError> {
        let mut pools = HashMap::new();
        let mut templates = HashMap::new();
        for template in config.templates {
            template::check_template_name(&template.name).map_err(|reason| {
                EngineError::InvalidTemplate {
                    template: template.name.clone(),
                    reason,
                }
            })?;
            if !pools.contains_key(&template.database) {
                pools.insert(
                    template.database.clone(),
                    admin_pool(&config.admin, &template.database)?,
                );
            }
            templates.insert(template.name.clone(), template);
        }
        Ok(PostgresEngine {
            templates,
            pools,
            login_window: config.login_window,
        })
    }

    pub fn template(&self, name: &str) -> Option<&RoleTemplate> {
        self.templates.get(name)
    }

    async fn client(
        &self,
        database: &str,
        action: &'static str,
    ) -> Result<deadpool_postgres::Object, EngineError> {
        let pool = self
            .pools
            .get(database)
            .ok_or_else(|| EngineError::Unavailable {
                action,
                source: format!("no template uses database {database:?}").into(),
            })?;
        pool.get().await.map_err(|e| EngineError::Unavailable {
            action,
            source: Box::new(e),
        })
    }
}

fn admin_pool(admin: &AdminConnection, database: &str) -> Result<Pool, EngineError> {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&admin.host)
        .port(admin.port)
        .user(&admin.user)
        .password(admin.password.expose())
        .dbname(database)
        .application_name("ephemera")
        .ssl_mode(admin.tls.tokio_postgres_mode())
        .connect_timeout(Duration::from_secs(10));
    let tls = MakeRustlsConnect::new((*admin.tls.client_config()).clone());
    let manager = Manager::from_config(
        pg,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
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

fn unquotable(e: sql::Unquotable) -> EngineError {
    EngineError::Refused {
        action: "quote a name for SQL",
        source: Box::new(e),
    }
}

fn db_error(action: &'static str, error: tokio_postgres::Error) -> EngineError {
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
    sql.push_str(&format!(
        "CREATE ROLE {role} WITH LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION \
         CONNECTION LIMIT 1 VALID UNTIL {} PASSWORD {}",
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

/// Everything after the backends are terminated: revocation statements,
/// ownership, the role itself.
fn drop_role_sql(
    template: Option<&RoleTemplate>,
    role: &Quoted,
    database: &str,
) -> Result<String, sql::Unquotable> {
    let mut sql = String::with_capacity(512);
    if let Some(template) = template {
        for statement in &template.revocation_statements {
            sql.push_str(&render_statement(statement, role, database)?);
            sql.push_str(";\n");
        }
        if let Some(owner) = &template.owner {
            sql.push_str(&format!(
                "REASSIGN OWNED BY {role} TO {};\n",
                quote_ident(owner)?
            ));
        }
    }
    // Drops what is left and revokes privileges granted to the role directly,
    // which would otherwise block DROP ROLE.
    sql.push_str(&format!("DROP OWNED BY {role};\nDROP ROLE {role};\n"));
    Ok(sql)
}

const UNDEFINED_OBJECT: &str = "42704";

#[async_trait]
impl Engine for PostgresEngine {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn issue(&self, request: IssueRequest) -> Result<IssuedCredential, EngineError> {
        let template = self
            .templates
            .get(&request.template)
            .ok_or_else(|| EngineError::UnknownTemplate(request.template.clone()))?;
        let role_name = role_name(&template.name);
        let role = quote_ident(&role_name).map_err(unquotable)?;
        let secret = ScramSecret::generate();
        let issued_at = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .expect("0 ns is valid");
        let lease = Lease {
            id: request.lease_id,
            engine: self.name(),
            template: template.name.clone(),
            role: role_name,
            identity: request.identity,
            database: template.database.clone(),
            client_addr: request.client_addr,
            issued_at,
            expires_at: issued_at + request.ttl,
        };
        let sql = create_role_sql(
            template,
            &role,
            &secret,
            &lease,
            issued_at + self.login_window,
        )
        .map_err(unquotable)?;
        let client = self.client(&template.database, "create a role").await?;
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| db_error("create a role", e))?;
        Ok(IssuedCredential { lease, secret })
    }

    async fn revoke(&self, lease: &Lease) -> Result<RevokeOutcome, EngineError> {
        let action = "revoke a role";
        let role = quote_ident(&lease.role).map_err(unquotable)?;
        let client = self.client(&lease.database, action).await?;
        let exists = client
            .query_opt(
                "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1",
                &[&lease.role],
            )
            .await
            .map_err(|e| db_error(action, e))?;
        if exists.is_none() {
            return Ok(RevokeOutcome::AlreadyGone);
        }
        // Membership gives the admin role the rights on this role that
        // terminating its backends and DROP OWNED need (PostgreSQL 15 and
        // earlier do not grant the creator any); it vanishes with DROP ROLE.
        let mut sql = format!(
            "GRANT {role} TO CURRENT_USER;\n\
             SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity WHERE usename = {};\n",
            quote_literal(&lease.role).map_err(unquotable)?
        );
        sql.push_str(
            &drop_role_sql(self.templates.get(&lease.template), &role, &lease.database)
                .map_err(unquotable)?,
        );
        match client.batch_execute(&sql).await {
            Ok(()) => Ok(RevokeOutcome::Revoked),
            Err(e)
                if e.code().map(|c| c.code()) == Some(UNDEFINED_OBJECT)
                    && is_role_gone(&client, &lease.role).await =>
            {
                Ok(RevokeOutcome::AlreadyGone)
            }
            Err(e) => Err(db_error(action, e)),
        }
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
        };
        let secret = ScramSecret::generate();
        let now = OffsetDateTime::now_utc();
        let lease = Lease {
            id: uuid_for_test(),
            engine: "postgres",
            template: "billing_rw".into(),
            role: "eph_billing_rw_x".into(),
            identity: "spiffe://example.org/it's".into(),
            database: "billing".into(),
            client_addr: None,
            issued_at: now,
            expires_at: now,
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
