//! `ephemera dev`: everything needed to try Ephemera on one machine.
//!
//! A throwaway PostgreSQL cluster (or an existing one, `--upstream`), a
//! development CA with SVIDs for three demo identities, a dev token issuer
//! (`tokens.rs`), a configuration with templates and policy for them, and
//! the ready-to-paste commands to try.
//! A second run on the same directory reuses the CA, secrets and cluster.

pub mod cluster;
mod config;
mod options;
pub mod pki;
mod setup;
pub mod tokens;
mod upstream;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use self::cluster::{ClusterError, Running};
use self::options::read;
pub use self::options::{DevError, DevOptions, DEMO_DATABASE, DEMO_TABLE};
use self::pki::{DevCerts, ADMIN, APP, JOB, TRUST_DOMAIN};
use self::upstream::Upstream;

/// A prepared environment; stops the cluster it started when dropped.
#[derive(Debug)]
pub struct DevEnvironment {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub certs: DevCerts,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// The dev issuer's JWKS and its ready token (redacted in `Debug`).
    pub issuer: tokens::DevIssuer,
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
            "\nConnect with the dev token instead of a certificate (identity dev:{}, good for {} min):",
            tokens::DEV_SUBJECT,
            tokens::TOKEN_LIFETIME.whole_minutes()
        );
        let _ = writeln!(
            text,
            "  PGPASSWORD={} psql \"host={} port={} dbname={DEMO_DATABASE} user=app_rw sslmode=verify-full sslrootcert={}\" -c 'select current_user, message from {DEMO_TABLE}'",
            self.issuer.token.expose(),
            self.listen.ip(),
            self.listen.port(),
            ca.display()
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
        self.connector_instructions(&mut text, &exe.to_string());
        let _ = writeln!(
            text,
            "\nPress Ctrl-C to stop: every lease is revoked and the cluster is stopped."
        );
        text
    }

    /// The connector line (as the app, with its SVID files) and the psql
    /// line without any credential that goes with it.
    fn connector_instructions(&self, text: &mut String, exe: &str) {
        let (web_cert, web_key) = self.certs.svid(APP);
        let mut to = self.listen;
        if to.ip().is_unspecified() {
            to.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let port = connector_port(self.listen.port());
        let _ = writeln!(
            text,
            "\nOr connect with no credentials at all: run a local connector for {} (another terminal),",
            APP.spiffe_id
        );
        let _ = writeln!(
            text,
            "  {exe} connect --to {to} --ca {} --cert {} --key {} --listen 127.0.0.1:{port}",
            self.certs.ca().display(),
            web_cert.display(),
            web_key.display()
        );
        let _ = writeln!(
            text,
            "and connect to it with host, port, dbname and user only:"
        );
        let _ = writeln!(
            text,
            "  psql \"host=127.0.0.1 port={port} dbname={DEMO_DATABASE} user=app_rw\" -c 'select current_user, message from {DEMO_TABLE}'"
        );
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

    let upstream = match &options.upstream {
        None => Upstream::throwaway(&dir, &certs, &ca_pem, progress).await?,
        Some(url) => Upstream::existing(url, &secrets, &ca_pem, progress).await?,
    };

    progress(&format!(
        "dev token issuer: a new key, its JWKS in {}",
        dir.join("tokens").display()
    ));
    let issuer = match tokens::ensure(&dir.join("tokens")) {
        Ok(issuer) => issuer,
        Err(e) => {
            upstream.stop();
            return Err(e);
        }
    };

    let config_path = dir.join("config.toml");
    progress(&format!("writing {}", config_path.display()));
    let config = config::config_toml(options, &upstream);
    if let Err(source) = std::fs::write(&config_path, config) {
        upstream.stop();
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
        issuer,
        upstream: upstream.description,
        cluster: upstream.running,
    })
}

/// The connector's port in the printed lines: clear of the proxy's and of
/// a PostgreSQL already on 5432 (6432 gives 16432).
fn connector_port(proxy_port: u16) -> u16 {
    proxy_port
        .checked_add(10_000)
        .unwrap_or_else(|| proxy_port.saturating_sub(10_000))
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_connector_port_stays_clear_of_the_proxys() {
        assert_eq!(super::connector_port(6432), 16432);
        assert_eq!(super::connector_port(60000), 50000);
    }
}
