//! The ledger of static leases, and the turn a login takes on its role.
//!
//! A static role is not Ephemera's: its comment is the DBA's, and several
//! leases may hold it at once, so the role itself cannot carry the lease as
//! a minted role does. The ledger is two tables in the schema of the reaper
//! election (`ephemera`, in the admin database), which belongs to the admin
//! role with no rights for anyone else (checked by
//! [`election::prepare`] before anything is read or written):
//!
//! * `ephemera.static_leases`: one row per lease (its record as JSON, the
//!   role, and once Ephemera's login succeeded the backend's pid and start
//!   time), so that the reaper of any replica finds the leases a crashed
//!   one left, and revoking one lease terminates only its backend;
//! * `ephemera.static_roles`: one row per role ever checked out, whose row
//!   lock is the role's *turn*: held from setting a lease's verifier until
//!   its login is recorded and closed, and while a revocation decides
//!   whether it ended the role's last lease. A row lock needs `UPDATE` on
//!   the table, which no other role has (unlike an advisory lock). It is
//!   `FOR NO KEY UPDATE`, so the ledger's foreign key on the row (a
//!   `KEY SHARE` lock) never waits for it.

use ephemera_engine::{AdminLogin, EngineError, Lease, LeaseComment, Upstream};
use ephemera_engine_postgres::admin::{self, db_error};
use ephemera_engine_postgres::election;
use ephemera_engine_postgres::sql::{quote_ident, Unquotable};
use tokio_postgres::Client;

pub const LEASES: &str = "static_leases";
pub const ROLES: &str = "static_roles";

/// How long a turn may wait for another login or revocation of its role.
pub const TURN_WAIT: &str = "10s";

/// `"ephemera"."<table>"`.
pub fn table(name: &str) -> Result<String, Unquotable> {
    Ok(format!(
        "{}.{}",
        quote_ident(election::SCHEMA)?,
        quote_ident(name)?
    ))
}

pub(crate) fn unquotable(e: Unquotable) -> EngineError {
    EngineError::refused("quote a name for SQL", None, e)
}

/// Create the ledger's tables if they are missing (after the election's
/// schema has been checked to be the admin role's alone).
pub async fn prepare(client: &Client, database: &str) -> Result<(), EngineError> {
    election::prepare(client, database).await?;
    let (leases, roles) = (
        table(LEASES).map_err(unquotable)?,
        table(ROLES).map_err(unquotable)?,
    );
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {roles} (role text PRIMARY KEY);\n\
         CREATE TABLE IF NOT EXISTS {leases} (\n\
             lease_id text PRIMARY KEY,\n\
             role text NOT NULL REFERENCES {roles} (role),\n\
             lease text NOT NULL,\n\
             backend_pid integer,\n\
             backend_start timestamptz);\n\
         REVOKE ALL ON {roles}, {leases} FROM PUBLIC;\n"
    );
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| db_error("prepare the static leases' ledger", e))
}

/// The row a lease is recorded in (its JSON is the lease comment format).
pub fn lease_json(lease: &Lease) -> String {
    lease.comment().to_json()
}

/// Every lease in the ledger.
pub async fn list(client: &Client, engine: &'static str) -> Result<Vec<Lease>, EngineError> {
    let action = "list the static leases";
    let sql = format!(
        "SELECT role, lease FROM {} ORDER BY lease_id",
        table(LEASES).map_err(unquotable)?
    );
    let rows = client
        .query(&sql, &[])
        .await
        .map_err(|e| db_error(action, e))?;
    let mut leases = Vec::with_capacity(rows.len());
    for row in rows {
        let role: String = row.get(0);
        let json: String = row.get(1);
        match LeaseComment::from_json(&json) {
            Ok(comment) => leases.push(Lease::from_comment(engine, role, comment)),
            Err(error) => tracing::warn!(role, %error, "an unreadable static lease; left alone"),
        }
    }
    Ok(leases)
}

/// A role's turn: a transaction on a connection of its own holding the
/// row lock of the role in `static_roles`. Dropping it (the connection
/// closes) gives the turn back; so does the server, should we hang, after
/// `idle_in_transaction_session_timeout`.
pub struct Turn {
    pub client: Client,
}

impl std::fmt::Debug for Turn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Turn(..)")
    }
}

impl Turn {
    /// Wait (up to [`TURN_WAIT`]) for the turn of `role`.
    pub async fn take(
        upstream: &Upstream,
        login: &AdminLogin,
        role: &str,
        idle_timeout_ms: u64,
    ) -> Result<Turn, EngineError> {
        let action = "take a static role's turn";
        let client = admin::connect(upstream, login, &login.database, action).await?;
        let roles = table(ROLES).map_err(unquotable)?;
        client
            .execute(
                &format!("INSERT INTO {roles} (role) VALUES ($1) ON CONFLICT DO NOTHING"),
                &[&role],
            )
            .await
            .map_err(|e| db_error(action, e))?;
        client
            .batch_execute(&format!(
                "SET idle_in_transaction_session_timeout = {idle_timeout_ms};\n\
                 SET lock_timeout = '{TURN_WAIT}';\nBEGIN;"
            ))
            .await
            .map_err(|e| db_error(action, e))?;
        client
            .execute(
                &format!("SELECT 1 FROM {roles} WHERE role = $1 FOR NO KEY UPDATE"),
                &[&role],
            )
            .await
            .map_err(|e| db_error(action, e))?;
        Ok(Turn { client })
    }
}
