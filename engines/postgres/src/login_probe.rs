//! `check-config --connect` with `upstream.login = "certificate"`: does the
//! upstream request and accept a client certificate from the login CA for
//! a minted role?
//!
//! A probe role is minted the way sessions' roles are (no password, the
//! reserved prefix, a lease comment that expires with the login window, so
//! the reaper drops it should this check die half-way), a certificate is
//! issued for it, and it logs in to each template database over TLS with
//! that certificate. Then the probe role is dropped. If PostgreSQL refuses,
//! the problem names the `pg_hba.conf` line and `ssl_ca_file` it needs.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use ephemera_engine::{
    ClientCertificate, EngineSetup, KeyProblem, Lease, LeaseKind, LoginCa, UpstreamLoginMethod,
};
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::create::role_name;
use crate::sql::{quote_ident, quote_literal};
use crate::{admin, RoleTemplate, NAME};

/// The template part of probe roles' names (`eph_preflight_<random>`).
const PROBE_TEMPLATE: &str = "preflight";
/// How long the probe's certificate and role live.
const PROBE_LIFETIME: Duration = Duration::from_secs(60);

/// The problems found (none: every template database accepted the
/// certificate, or the login is SCRAM).
pub(crate) async fn check(setup: &EngineSetup, templates: &[RoleTemplate]) -> Vec<KeyProblem> {
    let UpstreamLoginMethod::Certificate(ca) = &setup.upstream.login else {
        return Vec::new();
    };
    let Some(tls) = setup.upstream.tls.clone() else {
        return vec![KeyProblem::new(
            "upstream.login",
            "\"certificate\" needs TLS towards the upstream (upstream.sslmode)",
        )];
    };
    let databases: BTreeSet<&str> = templates.iter().map(|t| t.database.as_str()).collect();
    if databases.is_empty() {
        return Vec::new();
    }
    let admin_login = &setup.admin;
    // The admin login itself is checked (and reported) by the preflight.
    let Ok(client) = admin::connect(
        &setup.upstream,
        admin_login,
        &admin_login.database,
        "log in as the admin role",
    )
    .await
    else {
        return Vec::new();
    };
    let role = role_name(PROBE_TEMPLATE);
    let created = create_probe(&client, &role, &admin_login.database, databases.len()).await;
    if let Err(problem) = created {
        return vec![problem];
    }
    let mut problems = Vec::new();
    for database in databases {
        if let Err(what) = probe_login(setup, &tls, ca, &role, database).await {
            problems.push(KeyProblem::new(
                "upstream.login",
                refusal_message(database, &setup.upstream.address(), &what),
            ));
        }
    }
    let drop = match quote_ident(&role) {
        Ok(quoted) => client.batch_execute(&format!("DROP ROLE {quoted}")).await,
        Err(_) => Ok(()),
    };
    if let Err(e) = drop {
        tracing::warn!(role, error = %e, "could not drop the preflight's probe role; the reaper will");
    }
    problems
}

/// What to tell the DBA when `database` did not take the certificate.
fn refusal_message(database: &str, address: &str, what: &str) -> String {
    format!(
        "PostgreSQL at {address} did not log in a probe role with a client certificate from \
         upstream.login_ca_cert in database {database:?} ({what}); pg_hba.conf needs, before any \
         other line that matches minted roles: `hostssl {database} all <Ephemera's address>/32 \
         cert clientcert=verify-full` (then SELECT pg_reload_conf()), and ssl_ca_file must be \
         the login CA (upstream.login_ca_cert)"
    )
}

/// Mint the probe role: like a session's, without a password, its lease
/// in the comment so the reaper drops it if we do not.
async fn create_probe(
    client: &tokio_postgres::Client,
    role: &str,
    admin_database: &str,
    connections: usize,
) -> Result<(), KeyProblem> {
    let problem = |e: String| {
        KeyProblem::new(
            "upstream.login",
            format!("cannot create a probe role to try a certificate login: {e}"),
        )
    };
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .map_err(|e| problem(e.to_string()))?;
    let until = ephemera_engine::checked_add(now, PROBE_LIFETIME)
        .ok_or_else(|| problem("the probe's expiry is out of range".into()))?;
    let lease = Lease {
        id: uuid::Uuid::new_v4(),
        engine: NAME,
        kind: LeaseKind::Session,
        template: PROBE_TEMPLATE.into(),
        role: role.to_owned(),
        identity: "check-config --connect".into(),
        subject: None,
        // Where the reaper revokes it (a role is the cluster's, not a database's).
        database: admin_database.to_owned(),
        client_addr: None,
        issued_at: now,
        expires_at: until,
        max_expires_at: until,
    };
    let quoted = quote_ident(role).map_err(|e| problem(e.to_string()))?;
    let comment = quote_literal(&lease.comment().to_json()).map_err(|e| problem(e.to_string()))?;
    let valid_until =
        quote_literal(&crate::create::rfc3339(until)).map_err(|e| problem(e.to_string()))?;
    let sql = format!(
        "CREATE ROLE {quoted} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION \
         CONNECTION LIMIT {connections} VALID UNTIL {valid_until};\n\
         COMMENT ON ROLE {quoted} IS {comment};\n"
    );
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| problem(db_message(&e)))
}

/// Log in to `database` as `role` with a fresh certificate; `Err`: why
/// not, as the server or the handshake said.
async fn probe_login(
    setup: &EngineSetup,
    tls: &Arc<rustls::ClientConfig>,
    ca: &LoginCa,
    role: &str,
    database: &str,
) -> Result<(), String> {
    let cert = ca.issue(role, PROBE_LIFETIME).map_err(|e| e.to_string())?;
    let mut config = (**tls).clone();
    config.client_auth_cert_resolver = Arc::new(OneCertificate::new(&cert)?);
    let mut pg = tokio_postgres::Config::new();
    pg.host(&setup.upstream.host)
        .port(setup.upstream.port)
        .user(role)
        .dbname(database)
        .application_name("ephemera check-config")
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect_timeout(setup.upstream.connect_timeout);
    match pg.connect(MakeRustlsConnect::new(config)).await {
        Ok((client, connection)) => {
            drop(client);
            let _ = connection.await;
            Ok(())
        }
        // Logged in, but the role may not CONNECT to the database: the
        // certificate was accepted (the template's grants are another check).
        Err(e) if e.code().map(|c| c.code()) == Some("42501") => Ok(()),
        // tokio-postgres: "invalid configuration", its source "password missing".
        Err(e) if db_message(&e).contains("password missing") => {
            Err("it asked for a password instead of taking the certificate".into())
        }
        Err(e) => Err(db_message(&e)),
    }
}

fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

/// Presents one certificate whenever the server asks for one.
#[derive(Debug)]
struct OneCertificate(Arc<CertifiedKey>);

impl OneCertificate {
    fn new(cert: &ClientCertificate) -> Result<Self, String> {
        let (chain, key) = cert.for_handshake();
        let key = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| format!("the probe's key cannot sign: {e}"))?;
        Ok(OneCertificate(Arc::new(CertifiedKey::new(chain, key))))
    }
}

impl ResolvesClientCert for OneCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
