//! The `single_use` token ledger: `ephemera.token_uses` in the admin
//! database, beside the reaper election and closed to everyone but the
//! admin role like it. A token's key is inserted once; a second insert
//! (a replay, through this replica or another) finds it there. Rows are
//! deleted once their token has long expired (and would be refused anyway).

use ephemera_engine::EngineError;
use time::OffsetDateTime;
use tokio_postgres::Client;

use crate::admin::{db_error, unquotable};
use crate::create::rfc3339;
use crate::election::SCHEMA;
use crate::sql::quote_ident;

/// The ledger table.
pub const TABLE: &str = "token_uses";

fn table() -> Result<String, EngineError> {
    Ok(format!(
        "{}.{}",
        quote_ident(SCHEMA).map_err(unquotable)?,
        quote_ident(TABLE).map_err(unquotable)?
    ))
}

/// Create the table if it is missing (the schema is the election's).
pub async fn prepare(client: &Client, database: &str) -> Result<(), EngineError> {
    crate::election::prepare(client, database).await?;
    let table = table()?;
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (key text PRIMARY KEY, expires_at timestamptz NOT NULL);\n\
             REVOKE ALL ON {table} FROM PUBLIC;\n"
        ))
        .await
        .map_err(|e| db_error("prepare the single_use token ledger", e))
}

/// Record `key`; `false` if it was recorded before.
pub async fn claim(
    client: &Client,
    key: &str,
    expires_at: OffsetDateTime,
) -> Result<bool, EngineError> {
    let action = "record a single_use token";
    let table = table()?;
    client
        .execute(
            &format!("DELETE FROM {table} WHERE expires_at < now() - interval '1 day'"),
            &[],
        )
        .await
        .map_err(|e| db_error(action, e))?;
    let inserted = client
        .execute(
            &format!(
                "INSERT INTO {table} (key, expires_at) VALUES ($1, ($2::text)::timestamptz) \
                 ON CONFLICT (key) DO NOTHING"
            ),
            &[&key, &rfc3339(expires_at)],
        )
        .await
        .map_err(|e| db_error(action, e))?;
    Ok(inserted == 1)
}
