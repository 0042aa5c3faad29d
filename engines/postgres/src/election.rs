//! Reaper election: which replica drops expired roles.
//!
//! The leader holds a row lock (`FOR UPDATE`) on the one row of
//! `ephemera.reaper_election` in the admin database, in a transaction it
//! keeps open on a connection of its own. The schema and table belong to the
//! admin role and `PUBLIC` has no rights on either, so no other role can take
//! or queue for that lock (taking a row lock needs `UPDATE` on the table).
//! An advisory lock, which this replaces, could be taken by any role that
//! can connect: a squatter who got it when Ephemera restarted switched the
//! reaper off for good.
//!
//! Should the lock still be held by a backend of another role (a superuser,
//! say), the election reports it as [`ReaperElection::Squatted`] and the
//! caller reaps anyway: revocation is idempotent, so two reapers only cost
//! some duplicated work.

use ephemera_engine::{AdminLogin, EngineError, ReaperElection, Upstream};
use tokio_postgres::Client;

use crate::sql::{quote_ident, Unquotable};

/// The schema Ephemera keeps its own state in, in the admin database.
pub const SCHEMA: &str = "ephemera";
/// The election table (one row).
pub const TABLE: &str = "reaper_election";

const LOCK_NOT_AVAILABLE: &str = "55P03";
const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// Create the schema and table if they are missing, and check that both
/// are the admin role's and closed to `PUBLIC`.
pub async fn prepare(client: &Client, database: &str) -> Result<(), EngineError> {
    let action = "prepare the reaper election";
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1",
            &[&SCHEMA],
        )
        .await
        .map_err(|e| crate::admin::db_error(action, e))?
        .is_some();
    if !exists {
        let schema = quote_ident(SCHEMA).map_err(crate::admin::unquotable)?;
        let sql = format!(
            "CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION CURRENT_USER;\n\
             REVOKE ALL ON SCHEMA {schema} FROM PUBLIC;\n"
        );
        if let Err(e) = client.batch_execute(&sql).await {
            if e.code().map(|c| c.code()) == Some(INSUFFICIENT_PRIVILEGE) {
                return Err(EngineError::refused(
                    action,
                    ephemera_engine::SqlState::new(INSUFFICIENT_PRIVILEGE),
                    format!(
                        "the admin role may not create the schema {SCHEMA:?} in database \
                         {database:?}: GRANT CREATE ON DATABASE {database} to it, or have a \
                         superuser run CREATE SCHEMA {SCHEMA} AUTHORIZATION <admin role>"
                    ),
                ));
            }
            return Err(crate::admin::db_error(action, e));
        }
    }
    let sql = table_sql().map_err(crate::admin::unquotable)?;
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| crate::admin::db_error(action, e))?;
    check_ownership(client, database).await
}

fn table_sql() -> Result<String, Unquotable> {
    let table = format!("{}.{}", quote_ident(SCHEMA)?, quote_ident(TABLE)?);
    Ok(format!(
        "CREATE TABLE IF NOT EXISTS {table} (id integer PRIMARY KEY CHECK (id = 1));\n\
         REVOKE ALL ON {table} FROM PUBLIC;\n\
         INSERT INTO {table} (id) VALUES (1) ON CONFLICT DO NOTHING;\n"
    ))
}

/// Someone who could create the schema before us (a role with CREATE on
/// the database) could hand out rights on it: refuse to elect through
/// anything that is not entirely ours.
async fn check_ownership(client: &Client, database: &str) -> Result<(), EngineError> {
    let action = "check the reaper election's owner";
    let row = client
        .query_one(
            "SELECT pg_catalog.pg_get_userbyid(n.nspowner)::text,
                    pg_catalog.pg_get_userbyid(c.relowner)::text,
                    n.nspacl IS NULL OR NOT EXISTS (
                        SELECT 1 FROM pg_catalog.aclexplode(n.nspacl) a
                         WHERE a.grantee <> n.nspowner),
                    c.relacl IS NULL OR NOT EXISTS (
                        SELECT 1 FROM pg_catalog.aclexplode(c.relacl) a
                         WHERE a.grantee <> c.relowner),
                    current_user::text
               FROM pg_catalog.pg_namespace n
               JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = $2
              WHERE n.nspname = $1",
            &[&SCHEMA, &TABLE],
        )
        .await
        .map_err(|e| crate::admin::db_error(action, e))?;
    let (schema_owner, table_owner): (String, String) = (row.get(0), row.get(1));
    let (schema_closed, table_closed): (bool, bool) = (row.get(2), row.get(3));
    let me: String = row.get(4);
    if schema_owner != me || table_owner != me || !schema_closed || !table_closed {
        return Err(EngineError::refused(
            action,
            None,
            format!(
                "{SCHEMA}.{TABLE} in database {database:?} must belong to the admin role {me:?} \
                 with no rights for anyone else (schema owner {schema_owner:?}, table owner \
                 {table_owner:?}); another role could hold the reaper election. Drop the schema, \
                 or make it the admin role's and REVOKE ALL ON it FROM PUBLIC"
            ),
        ));
    }
    Ok(())
}

/// Try to take the lock on `client` (a connection of its own, kept while
/// we lead). `Leader` leaves the transaction open.
pub async fn elect(client: &Client) -> Result<ReaperElection, EngineError> {
    let action = "take the reaper lock";
    let table = format!(
        "{}.{}",
        quote_ident(SCHEMA).map_err(crate::admin::unquotable)?,
        quote_ident(TABLE).map_err(crate::admin::unquotable)?
    );
    client
        .batch_execute("BEGIN")
        .await
        .map_err(|e| crate::admin::db_error(action, e))?;
    let locked = client
        .batch_execute(&format!(
            "SELECT 1 FROM {table} WHERE id = 1 FOR UPDATE NOWAIT"
        ))
        .await;
    match locked {
        Ok(()) => Ok(ReaperElection::Leader),
        Err(e) if e.code().map(|c| c.code()) == Some(LOCK_NOT_AVAILABLE) => {
            client
                .batch_execute("ROLLBACK")
                .await
                .map_err(|e| crate::admin::db_error(action, e))?;
            let holders = strangers_holding(client).await?;
            if holders.is_empty() {
                Ok(ReaperElection::Follower)
            } else {
                Ok(ReaperElection::Squatted { holders })
            }
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(crate::admin::db_error(action, e))
        }
    }
}

/// Backends of roles other than ours holding a lock on the election table.
async fn strangers_holding(client: &Client) -> Result<Vec<String>, EngineError> {
    let action = "look up who holds the reaper lock";
    let rows = client
        .query(
            "SELECT coalesce(pg_catalog.pg_get_userbyid(a.usesysid)::text, '?') || ' (pid ' || l.pid || ')'
               FROM pg_catalog.pg_locks l
               JOIN pg_catalog.pg_stat_get_activity(NULL) a ON a.pid = l.pid
              WHERE l.locktype = 'relation'
                AND l.database = (SELECT oid FROM pg_catalog.pg_database
                                   WHERE datname = pg_catalog.current_database())
                AND l.relation = (SELECT c.oid FROM pg_catalog.pg_class c
                                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                                  WHERE n.nspname = $1 AND c.relname = $2)
                AND l.granted AND l.mode <> 'AccessShareLock'
                AND l.pid <> pg_catalog.pg_backend_pid()
                AND a.usesysid IS DISTINCT FROM
                    (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user)
              ORDER BY l.pid",
            &[&SCHEMA, &TABLE],
        )
        .await
        .map_err(|e| crate::admin::db_error(action, e))?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Lead, or keep leading, the election. `held` is the engine's connection
/// whose open transaction holds the lock, while it does; a lost connection
/// means a new election on a new one. Every engine that reaps shares this.
pub async fn lead(
    held: &tokio::sync::Mutex<Option<Client>>,
    upstream: &Upstream,
    admin: &AdminLogin,
) -> Result<ReaperElection, EngineError> {
    let action = "take the reaper lock";
    let mut held = held.lock().await;
    if let Some(client) = held.as_ref() {
        // Still ours while the transaction holding it lives.
        if !client.is_closed() && client.simple_query("").await.is_ok() {
            return Ok(ReaperElection::Leader);
        }
        *held = None;
    }
    let client = crate::admin::connect(upstream, admin, &admin.database, action).await?;
    prepare(&client, &admin.database).await?;
    let outcome = elect(&client).await?;
    if outcome == ReaperElection::Leader {
        *held = Some(client);
    }
    Ok(outcome)
}
