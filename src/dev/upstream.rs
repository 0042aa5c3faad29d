//! The PostgreSQL behind `ephemera dev`: a throwaway cluster it starts (and
//! reuses on the next run), or an existing server (`--upstream URL`), with
//! the demo objects made in it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::tls::upstream::SslMode;
use ephemera_engine::Password;

use super::cluster::{self, ClusterError, LocalCluster, Running};
use super::options::{read, DevError, ADMIN_USER};
use super::pki::DevCerts;
use super::setup::Server;

/// The PostgreSQL the proxy goes to, ready for the demo.
#[derive(Debug)]
pub(super) struct Upstream {
    /// What it is and where, for the banner.
    pub description: String,
    pub host: String,
    pub port: u16,
    /// The role Ephemera logs in as to make and drop roles.
    pub admin_user: String,
    /// For the configuration's `upstream.sslmode`.
    pub sslmode: &'static str,
    /// The cluster we started (None for `--upstream`).
    pub running: Option<Running>,
}

impl Upstream {
    /// Start (making it first if need be) the throwaway cluster for `dir`,
    /// with the admin role and the demo objects.
    pub async fn throwaway(
        dir: &Path,
        certs: &DevCerts,
        ca_pem: &str,
        progress: &dyn Fn(&str),
    ) -> Result<Upstream, DevError> {
        let secrets = dir.join("secrets");
        let superuser_password = secret(&secrets.join("superuser-password"))?;
        let admin_password = secret(&secrets.join("admin-password"))?;
        let local = init_or_reuse(dir, certs, &superuser_password, progress)?;
        local.stop_leftover();
        let port = cluster::free_port()?;
        progress(&format!(
            "starting PostgreSQL on 127.0.0.1:{port} (log: {})",
            local.log_path.display()
        ));
        let running = local.start(port)?;
        let data_dir = local.data_dir.clone();
        let (running, ready) = tokio::task::spawn_blocking(move || {
            let result = local.wait_ready(&running, Duration::from_secs(60));
            (running, result)
        })
        .await
        .expect("the readiness check does not panic");
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
            ca_pem,
        };
        if let Err(e) = server.setup(Some(&admin_password), ADMIN_USER).await {
            running.stop(Duration::from_secs(5));
            return Err(e);
        }
        let path = secrets.join("admin-password");
        std::fs::write(&path, admin_password.expose())
            .map_err(|source| ClusterError::Io { path, source })?;
        Ok(Upstream {
            description: format!(
                "PostgreSQL at 127.0.0.1:{port} (throwaway cluster, data in {})",
                data_dir.display()
            ),
            host: "127.0.0.1".to_owned(),
            port,
            admin_user: ADMIN_USER.to_owned(),
            sslmode: "verify-full",
            running: Some(running),
        })
    }

    /// The server of `url` (`postgres://admin:password@host:port/db`), with
    /// the demo objects; its admin role's password goes to `secrets`.
    pub async fn existing(
        url: &str,
        secrets: &Path,
        ca_pem: &str,
        progress: &dyn Fn(&str),
    ) -> Result<Upstream, DevError> {
        let login = Login::parse(url)?;
        let Login {
            host,
            port,
            user,
            password,
            mode,
        } = &login;
        progress(&format!(
            "creating the demo database and template group roles on {host}:{port} as {user}"
        ));
        let server = Server {
            host,
            port: *port,
            user,
            password,
            mode: *mode,
            ca_pem,
        };
        server.setup(None, user).await?;
        cluster::write_private(&secrets.join("admin-password"), password.as_bytes())?;
        Ok(Upstream {
            description: format!("PostgreSQL at {host}:{port} (--upstream)"),
            sslmode: if *mode == SslMode::Disable {
                "disable"
            } else {
                "require"
            },
            host: login.host,
            port: login.port,
            admin_user: login.user,
            running: None,
        })
    }

    /// Stop the cluster, if we started one.
    pub fn stop(self) {
        if let Some(running) = self.running {
            running.stop(Duration::from_secs(5));
        }
    }
}

/// The local cluster for `dir`, made now unless an earlier run made it.
fn init_or_reuse(
    dir: &Path,
    certs: &DevCerts,
    superuser_password: &Password,
    progress: &dyn Fn(&str),
) -> Result<LocalCluster, ClusterError> {
    let bin_dir = cluster::find_bin_dir()?;
    let user = cluster::server_user()?;
    let local = LocalCluster {
        bin_dir,
        data_dir: data_dir_for(dir, user.is_some()),
        log_path: dir.join("postgres.log"),
        user,
    };
    if local.exists() {
        progress(&format!(
            "reusing the PostgreSQL cluster in {}",
            local.data_dir.display()
        ));
    } else {
        progress(&format!(
            "initdb: a PostgreSQL cluster in {} (binaries from {})",
            local.data_dir.display(),
            local.bin_dir.display()
        ));
        let cert = read(&certs.server_cert())?;
        let key = read(&certs.server_key())?;
        local.init(superuser_password.expose(), &cert, &key)?;
    }
    Ok(local)
}

/// What `--upstream URL` says about logging in.
struct Login {
    host: String,
    port: u16,
    user: String,
    password: String,
    mode: SslMode,
}

impl Login {
    fn parse(url: &str) -> Result<Login, DevError> {
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
                    "needs a user (the admin role), e.g. postgres://admin:pw@host/postgres".into(),
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
        Ok(Login {
            host,
            port,
            user,
            password,
            mode,
        })
    }
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
