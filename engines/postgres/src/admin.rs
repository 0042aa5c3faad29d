//! The one way Ephemera logs in to the upstream as its admin role: the
//! engine's pools, the reaper election's connection, `check-config
//! --connect` and `ephemera dev` all connect through here.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use ephemera_engine::{AdminLogin, EngineError, SqlState, Upstream};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::sql;

/// How long an admin login may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The admin role's connection settings for `database`.
pub fn config(upstream: &Upstream, login: &AdminLogin, database: &str) -> tokio_postgres::Config {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&upstream.host)
        .port(upstream.port)
        .user(&login.user)
        .password(login.password.expose())
        .dbname(database)
        .application_name("ephemera")
        .ssl_mode(if upstream.tls.is_some() {
            tokio_postgres::config::SslMode::Require
        } else {
            tokio_postgres::config::SslMode::Disable
        })
        .connect_timeout(CONNECT_TIMEOUT);
    pg
}

/// The TLS connector for admin connections (a plain one when TLS is off:
/// tokio-postgres then never uses it).
fn connector(upstream: &Upstream) -> MakeRustlsConnect {
    let config = match &upstream.tls {
        Some(config) => (**config).clone(),
        None => rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth(),
    };
    MakeRustlsConnect::new(config)
}

/// One admin connection to `database`, its connection task spawned.
pub async fn connect(
    upstream: &Upstream,
    login: &AdminLogin,
    database: &str,
    action: &'static str,
) -> Result<tokio_postgres::Client, EngineError> {
    let (client, connection) = config(upstream, login, database)
        .connect(connector(upstream))
        .await
        .map_err(|e| db_error(action, e))?;
    tokio::spawn(connection);
    Ok(client)
}

/// A pool of admin connections to `database` (connecting lazily).
pub fn pool(upstream: &Upstream, login: &AdminLogin, database: &str) -> Result<Pool, EngineError> {
    let manager = Manager::from_config(
        config(upstream, login, database),
        connector(upstream),
        ManagerConfig {
            // Verified recycling: a pooled connection that the server killed
            // (admin password rotated, pg_terminate_backend, restart) is
            // noticed and replaced instead of failing the next session.
            recycling_method: RecyclingMethod::Verified,
        },
    );
    Pool::builder(manager)
        .max_size(login.pool_size.max(1))
        .build()
        .map_err(|e| EngineError::Unavailable {
            action: "build the admin connection pool",
            source: Box::new(e),
        })
}

pub(crate) fn unquotable(e: sql::Unquotable) -> EngineError {
    EngineError::refused("quote a name for SQL", None, e)
}

/// What went wrong, keeping what the server said and its SQLSTATE.
pub fn db_error(action: &'static str, error: tokio_postgres::Error) -> EngineError {
    if let Some(db) = error.as_db_error() {
        // tokio-postgres prints only "db error"; say what the server said.
        EngineError::refused(
            action,
            SqlState::new(db.code().code()),
            db.message().to_owned(),
        )
    } else {
        EngineError::Unavailable {
            action,
            source: Box::new(error),
        }
    }
}
