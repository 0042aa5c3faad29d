//! `ephemera dev`: everything needed to try Ephemera on one machine.
//!
//! A throwaway PostgreSQL cluster (or an existing one, `--upstream`), a
//! development CA with SVIDs for three demo identities, a configuration with
//! templates and policy for them, and the ready-to-paste commands to try.
//! A second run on the same directory reuses the CA, secrets and cluster.

pub mod cluster;
pub mod pki;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::engines::postgres::sql::{quote_ident, quote_literal};
use crate::tls::upstream::{SslMode, UpstreamTls};
use ephemera_engine::Password;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use self::cluster::{ClusterError, LocalCluster, Running};
use self::pki::{DevCerts, ADMIN, APP, JOB, TRUST_DOMAIN};

/// The demo database and its table.
pub const DEMO_DATABASE: &str = "app";
pub const DEMO_TABLE: &str = "greetings";
const ADMIN_USER: &str = "ephemera_admin";

#[derive(Debug, Clone)]
pub struct DevOptions {
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// `postgres://admin:password@host:port/db?sslmode=…` of an existing
    /// server to use instead of a throwaway cluster.
    pub upstream: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("{address} is already in use; pick another with {flag} 127.0.0.1:<port>")]
    PortTaken {
        address: SocketAddr,
        flag: &'static str,
    },
    #[error("--upstream {0}")]
    BadUpstream(String),
    #[error("setting up the demo objects in PostgreSQL failed: {0}")]
    Setup(String),
}

/// A prepared environment; stops the cluster it started when dropped.
#[derive(Debug)]
pub struct DevEnvironment {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub certs: DevCerts,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// `host:port` of the upstream, and what it is.
    pub upstream: String,
    cluster: Option<Running>,
}

impl DevEnvironment {
    /// Stop the cluster (if we started one).
    pub fn stop(mut self) {
        if let Some(running) = self.cluster.take() {
            running.stop(Duration::from_secs(15));
        }
    }

    /// What to paste: a psql line as the app, the leases list as the admin,
    /// and a batch job through `ephemera exec`.
    pub fn instructions(&self, exe: &Path) -> String {
        let ca = self.certs.ca();
        let (web_cert, web_key) = self.certs.svid(APP);
        let (job_cert, job_key) = self.certs.svid(JOB);
        let (admin_cert, admin_key) = self.certs.svid(ADMIN);
        let admin_url = format!("https://{}", self.admin_listen);
        let exe = exe.display();
        let mut text = String::new();
        let _ = writeln!(text, "\nEphemera dev is running.");
        let _ = writeln!(
            text,
            "  proxy      {} (PostgreSQL protocol; X.509-SVIDs of {TRUST_DOMAIN})",
            self.listen
        );
        let _ = writeln!(text, "  admin API  {admin_url}");
        let _ = writeln!(text, "  upstream   {}", self.upstream);
        let _ = writeln!(text, "  files      {}", self.dir.display());
        let _ = writeln!(text, "\nConnect as the app ({}):", APP.spiffe_id);
        let _ = writeln!(
            text,
            "  psql \"host={} port={} dbname={DEMO_DATABASE} user=app_rw sslmode=verify-full sslrootcert={} sslcert={} sslkey={}\" -c 'select current_user, message from {DEMO_TABLE}'",
            self.listen.ip(),
            self.listen.port(),
            ca.display(),
            web_cert.display(),
            web_key.display()
        );
        let _ = writeln!(
            text,
            "\nList the leases as the admin ({}):",
            ADMIN.spiffe_id
        );
        let _ = writeln!(
            text,
            "  {exe} leases list --admin {admin_url} --cert {} --key {} --ca {}",
            admin_cert.display(),
            admin_key.display(),
            ca.display()
        );
        let _ = writeln!(
            text,
            "\nRun a batch job as {} (one lease for the whole job):",
            JOB.spiffe_id
        );
        let _ = writeln!(
            text,
            "  {exe} exec --template nightly --admin {admin_url} --cert {} --key {} --ca {} --sslmode verify-full --sslrootcert {} -- psql -c 'select current_user'",
            job_cert.display(),
            job_key.display(),
            ca.display(),
            ca.display()
        );
        let _ = writeln!(
            text,
            "\nPress Ctrl-C to stop: every lease is revoked and the cluster is stopped."
        );
        text
    }
}

impl Drop for DevEnvironment {
    fn drop(&mut self) {
        if let Some(running) = self.cluster.take() {
            running.stop(Duration::from_secs(15));
        }
    }
}

/// Prepare everything; `progress` is told what is happening, step by step.
pub async fn prepare(
    options: &DevOptions,
    progress: &dyn Fn(&str),
) -> Result<DevEnvironment, DevError> {
    for (address, flag) in [
        (options.listen, "--listen"),
        (options.admin_listen, "--admin-listen"),
    ] {
        if std::net::TcpListener::bind(address).is_err() {
            return Err(DevError::PortTaken { address, flag });
        }
    }
    let dir = absolute(&options.dir)?;
    let secrets = dir.join("secrets");
    for d in [&dir, &secrets] {
        std::fs::create_dir_all(d).map_err(|source| ClusterError::Io {
            path: d.clone(),
            source,
        })?;
    }

    progress(&format!(
        "development CA and SVIDs for trust domain {TRUST_DOMAIN} in {}",
        dir.join("certs").display()
    ));
    let (certs, made) = DevCerts::ensure(&dir.join("certs"))?;
    if !made {
        progress("  (reusing the existing CA and SVIDs)");
    }
    let ca_pem = read(&certs.ca())?;

    let (upstream, host, port, admin_user, sslmode, running) = match &options.upstream {
        None => {
            let superuser_password = secret(&secrets.join("superuser-password"))?;
            let admin_password = secret(&secrets.join("admin-password"))?;
            let bin_dir = cluster::find_bin_dir()?;
            let user = cluster::server_user()?;
            let data_dir = data_dir_for(&dir, user.is_some());
            let local = LocalCluster {
                bin_dir: bin_dir.clone(),
                data_dir: data_dir.clone(),
                log_path: dir.join("postgres.log"),
                user,
            };
            if local.exists() {
                progress(&format!(
                    "reusing the PostgreSQL cluster in {}",
                    data_dir.display()
                ));
            } else {
                progress(&format!(
                    "initdb: a PostgreSQL cluster in {} (binaries from {})",
                    data_dir.display(),
                    bin_dir.display()
                ));
                let cert = read(&certs.server_cert())?;
                let key = read(&certs.server_key())?;
                local.init(superuser_password.expose(), &cert, &key)?;
            }
            local.stop_leftover();
            let port = free_port()?;
            progress(&format!(
                "starting PostgreSQL on 127.0.0.1:{port} (log: {})",
                local.log_path.display()
            ));
            let running = local.start(port)?;
            let waited = tokio::task::spawn_blocking(move || {
                let result = local.wait_ready(&running, Duration::from_secs(60));
                (running, result)
            })
            .await
            .expect("the readiness check does not panic");
            let (running, ready) = waited;
            if let Err(e) = ready {
                running.stop(Duration::from_secs(5));
                return Err(e.into());
            }
            progress("creating the admin role, the demo database and the template group roles");
            let server = Server {
                host: "127.0.0.1",
                port,
                user: "postgres",
                password: superuser_password.expose(),
                mode: SslMode::VerifyFull,
                ca_pem: &ca_pem,
            };
            if let Err(e) = server.setup(Some(&admin_password), ADMIN_USER).await {
                running.stop(Duration::from_secs(5));
                return Err(e);
            }
            std::fs::write(secrets.join("admin-password"), admin_password.expose()).map_err(
                |source| ClusterError::Io {
                    path: secrets.join("admin-password"),
                    source,
                },
            )?;
            (
                format!(
                    "PostgreSQL at 127.0.0.1:{port} (throwaway cluster, data in {})",
                    data_dir.display()
                ),
                "127.0.0.1".to_owned(),
                port,
                ADMIN_USER.to_owned(),
                "verify-full",
                Some(running),
            )
        }
        Some(url) => {
            let config: tokio_postgres::Config = url
                .parse()
                .map_err(|e| DevError::BadUpstream(format!("is not a PostgreSQL URL: {e}")))?;
            let host = match config.get_hosts().first() {
                Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                _ => {
                    return Err(DevError::BadUpstream(
                        "needs a TCP host, e.g. postgres://admin:pw@127.0.0.1:5432/postgres".into(),
                    ))
                }
            };
            let port = config.get_ports().first().copied().unwrap_or(5432);
            let user = config
                .get_user()
                .ok_or_else(|| {
                    DevError::BadUpstream(
                        "needs a user (the admin role), e.g. postgres://admin:pw@host/postgres"
                            .into(),
                    )
                })?
                .to_owned();
            let password = config
                .get_password()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .ok_or_else(|| {
                    DevError::BadUpstream("needs the admin role's password in the URL".into())
                })?;
            let mode = match config.get_ssl_mode() {
                tokio_postgres::config::SslMode::Disable => SslMode::Disable,
                _ => SslMode::Require,
            };
            progress(&format!(
                "creating the demo database and template group roles on {host}:{port} as {user}"
            ));
            let server = Server {
                host: &host,
                port,
                user: &user,
                password: &password,
                mode,
                ca_pem: &ca_pem,
            };
            server.setup(None, &user).await?;
            let path = secrets.join("admin-password");
            cluster::write_private(&path, password.as_bytes())?;
            let sslmode = if mode == SslMode::Disable {
                "disable"
            } else {
                "require"
            };
            (
                format!("PostgreSQL at {host}:{port} (--upstream)"),
                host,
                port,
                user,
                sslmode,
                None,
            )
        }
    };

    let config_path = dir.join("config.toml");
    progress(&format!("writing {}", config_path.display()));
    let config = config_toml(options, &host, port, &admin_user, sslmode);
    if let Err(source) = std::fs::write(&config_path, config) {
        if let Some(running) = running {
            running.stop(Duration::from_secs(5));
        }
        return Err(ClusterError::Io {
            path: config_path,
            source,
        }
        .into());
    }
    Ok(DevEnvironment {
        dir,
        config_path,
        certs,
        listen: options.listen,
        admin_listen: options.admin_listen,
        upstream,
        cluster: running,
    })
}

fn absolute(dir: &Path) -> Result<PathBuf, ClusterError> {
    std::fs::create_dir_all(dir).map_err(|source| ClusterError::Io {
        path: dir.to_owned(),
        source,
    })?;
    dir.canonicalize().map_err(|source| ClusterError::Io {
        path: dir.to_owned(),
        source,
    })
}

/// `DIR/pg`, unless PostgreSQL's own user cannot reach DIR (e.g. under
/// /root): then a directory in /var/tmp named after DIR.
fn data_dir_for(dir: &Path, as_other_user: bool) -> PathBuf {
    if !as_other_user || cluster::reachable_by_others(&dir.join("pg")) {
        return dir.join("pg");
    }
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    dir.hash(&mut hasher);
    PathBuf::from(format!("/var/tmp/ephemera-dev-{:016x}/pg", hasher.finish()))
}

fn read(path: &Path) -> Result<String, ClusterError> {
    std::fs::read_to_string(path).map_err(|source| ClusterError::Io {
        path: path.to_owned(),
        source,
    })
}

/// The password in `path`, made (random, mode 0600) if missing.
fn secret(path: &Path) -> Result<Password, ClusterError> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let text = text.trim();
        if !text.is_empty() {
            return Ok(Password::new(text.to_owned()));
        }
    }
    let password = Password::generate();
    cluster::write_private(path, password.expose().as_bytes())?;
    Ok(password)
}

fn free_port() -> Result<u16, ClusterError> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| ClusterError::Io {
            path: PathBuf::from("127.0.0.1:0"),
            source,
        })?;
    Ok(listener.local_addr().expect("bound").port())
}

/// How `ephemera dev` logs in to set up the demo objects.
struct Server<'a> {
    host: &'a str,
    port: u16,
    user: &'a str,
    password: &'a str,
    mode: SslMode,
    ca_pem: &'a str,
}

impl Server<'_> {
    async fn setup(
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
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(port)
        .user(user)
        .password(password)
        .dbname(database)
        .application_name("ephemera dev")
        .ssl_mode(if mode == SslMode::Disable {
            tokio_postgres::config::SslMode::Disable
        } else {
            tokio_postgres::config::SslMode::Require
        })
        .connect_timeout(Duration::from_secs(10));
    let connector = tokio_postgres_rustls::MakeRustlsConnect::new((*tls.client_config()).clone());
    let (client, connection) = config.connect(connector).await.map_err(|e| {
        DevError::Setup(format!(
            "cannot connect to {host}:{port} as {user}: {}",
            describe(&e)
        ))
    })?;
    tokio::spawn(connection);
    Ok(client)
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

fn config_toml(
    options: &DevOptions,
    host: &str,
    port: u16,
    admin_user: &str,
    sslmode: &str,
) -> String {
    format!(
        r#"# Written by `ephemera dev` at every start; edit a copy for real use.
[listen]
address = "{listen}"

[tls]
cert = "certs/server.pem"
key = "certs/server-key.pem"
trust_bundle = "certs/ca.pem"
trust_domains = ["{TRUST_DOMAIN}"]

[upstream]
host = "{host}"
port = {port}
admin_database = "postgres"
admin_user = "{admin_user}"
admin_password_file = "secrets/admin-password"
sslmode = "{sslmode}"
ca = "{ca}"

[lease]
login_window = "60s"
reap_interval = "10s"

[admin]
listen = "{admin_listen}"
identities = ["spiffe://{TRUST_DOMAIN}/ops/**"]

[audit]
path = "audit.jsonl"

[templates.app_rw]
database = "{DEMO_DATABASE}"
member_of = ["app_rw"]
owner = "app_owner"
ttl = "15m"
max_ttl = "1h"

[templates.nightly]
database = "{DEMO_DATABASE}"
member_of = ["app_rw"]
ttl = "5m"
max_ttl = "2h"

[[policy]]
spiffe_id = "spiffe://{TRUST_DOMAIN}/app/*"
templates = ["app_rw"]

[[policy]]
spiffe_id = "{job}"
templates = ["nightly"]
"#,
        listen = options.listen,
        admin_listen = options.admin_listen,
        ca = if sslmode == "verify-full" {
            "certs/ca.pem"
        } else {
            ""
        },
        job = JOB.spiffe_id,
    )
}
