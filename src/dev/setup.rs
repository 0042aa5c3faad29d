//! The demo objects `ephemera dev` makes in PostgreSQL: the admin role
//! (when it owns the cluster), the template group roles, the reaper
//! election's schema, the demo database and its table. Idempotent.

use std::fmt::Write as _;
use std::time::Duration;

use crate::engines::postgres::sql::{quote_ident, quote_literal};
use crate::tls::upstream::{SslMode, UpstreamTls};
use ephemera_engine::{AdminLogin, Password, Upstream};

use crate::engines::postgres::admin;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::options::{DevError, DEMO_DATABASE, DEMO_TABLE};

/// How `ephemera dev` logs in to set up the demo objects.
pub(super) struct Server<'a> {
    pub host: &'a str,
    pub port: u16,
    pub user: &'a str,
    pub password: &'a str,
    pub mode: SslMode,
    pub ca_pem: &'a str,
}

impl Server<'_> {
    /// Everything the demo needs; `admin_password`: make (or update) the
    /// admin role `admin_user` with it, as when we own the cluster.
    pub async fn setup(
        &self,
        admin_password: Option<&Password>,
        admin_user: &str,
    ) -> Result<(), DevError> {
        let client = self.connect("postgres").await?;
        setup_demo(&client, admin_password, admin_user).await?;
        let client = self.connect(DEMO_DATABASE).await?;
        setup_demo_table(&client).await
    }

    async fn connect(&self, database: &str) -> Result<tokio_postgres::Client, DevError> {
        connect(
            self.host,
            self.port,
            self.user,
            self.password,
            database,
            self.mode,
            self.ca_pem,
        )
        .await
    }
}

/// An admin connection through the engine's one builder
/// (`engines::postgres::admin`), as the proxy itself will connect.
async fn connect(
    host: &str,
    port: u16,
    user: &str,
    password: &str,
    database: &str,
    mode: SslMode,
    ca_pem: &str,
) -> Result<tokio_postgres::Client, DevError> {
    let ca: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| DevError::Setup(format!("the development CA does not parse: {e}")))?;
    let tls = UpstreamTls::new(mode, &ca).map_err(|e| DevError::Setup(e.to_string()))?;
    let upstream = Upstream {
        host: host.to_owned(),
        port,
        tls: tls.engine_config(),
        connect_timeout: Duration::from_secs(10),
        login: ephemera_engine::UpstreamLoginMethod::Scram,
    };
    let login = AdminLogin {
        user: user.to_owned(),
        password: Password::new(password.to_owned()),
        database: database.to_owned(),
        pool_size: 1,
    };
    admin::connect(&upstream, &login, database, "set up the demo")
        .await
        .map_err(|e| DevError::Setup(format!("cannot connect to {host}:{port} as {user}: {e}")))
}

fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

/// The admin role (when we own the cluster), the template groups, the demo
/// database and its table. Idempotent.
async fn setup_demo(
    client: &tokio_postgres::Client,
    admin_password: Option<&Password>,
    admin_user: &str,
) -> Result<(), DevError> {
    let q = |s: &str| quote_ident(s).map_err(|e| DevError::Setup(e.to_string()));
    let admin = q(admin_user)?;
    let mut sql = String::new();
    if let Some(password) = admin_password {
        let verifier = postgres_protocol::password::scram_sha_256(password.expose().as_bytes());
        let verifier = quote_literal(&verifier).map_err(|e| DevError::Setup(e.to_string()))?;
        let exists = client
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&admin_user])
            .await
            .map_err(|e| DevError::Setup(describe(&e)))?
            .is_some();
        if !exists {
            let _ = writeln!(sql, "CREATE ROLE {admin} LOGIN CREATEROLE;");
        }
        let _ = writeln!(sql, "ALTER ROLE {admin} PASSWORD {verifier};");
    }
    for group in ["app_rw", "app_owner"] {
        let exists = client
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&group])
            .await
            .map_err(|e| DevError::Setup(describe(&e)))?
            .is_some();
        if !exists {
            let _ = writeln!(sql, "CREATE ROLE {} NOLOGIN;", q(group)?);
        }
    }
    let _ = writeln!(sql, "GRANT {} TO {admin};", q("app_owner")?);
    // The reaper election's schema, the admin role's alone (SECURITY.md).
    let _ = writeln!(
        sql,
        "CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {admin};\n\
         REVOKE ALL ON SCHEMA {schema} FROM PUBLIC;",
        schema = q(crate::engines::postgres::election::SCHEMA)?
    );
    if !sql.is_empty() {
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| DevError::Setup(describe(&e)))?;
    }
    let has_db = client
        .query_opt(
            "SELECT 1 FROM pg_database WHERE datname = $1",
            &[&DEMO_DATABASE],
        )
        .await
        .map_err(|e| DevError::Setup(describe(&e)))?
        .is_some();
    if !has_db {
        client
            .batch_execute(&format!("CREATE DATABASE {}", q(DEMO_DATABASE)?))
            .await
            .map_err(|e| DevError::Setup(describe(&e)))?;
    }
    Ok(())
}

/// The demo table and the group's privileges, in the demo database.
async fn setup_demo_table(client: &tokio_postgres::Client) -> Result<(), DevError> {
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {DEMO_TABLE} (id serial PRIMARY KEY, message text NOT NULL);
             INSERT INTO {DEMO_TABLE} (message) SELECT 'hello from Ephemera' WHERE NOT EXISTS (SELECT 1 FROM {DEMO_TABLE});
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO app_rw;
             GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO app_rw;
             GRANT USAGE, CREATE ON SCHEMA public TO app_rw;"
        ))
        .await
        .map_err(|e| DevError::Setup(describe(&e)))
}
