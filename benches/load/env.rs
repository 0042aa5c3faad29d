//! The bench's world, all on loopback and all its own: a throwaway
//! PostgreSQL cluster (scram-sha-256, TLS on, defaults except
//! max_connections), the `ephemera serve` binary as a separate process, and
//! PgBouncer in session mode (installed with apt-get when missing and root).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ephemera::dev::cluster::{
    self, find_bin_dir, server_user, InitOptions, LocalCluster, Running, ServerUser,
};
use ephemera::dev::pki::{DevCerts, ADMIN, APP};
use rand::distributions::{Alphanumeric, DistString};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_postgres_rustls::MakeRustlsConnect;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The database every scenario uses, the role template Ephemera mints
/// from, the group that holds the privileges, and the password user for
/// direct connections (a member of the same group).
pub const DATABASE: &str = "bench";
pub const TEMPLATE: &str = "bench";
/// The same template with statement audit (issue 19).
pub const TEMPLATE_AUDITED: &str = "bench_audited";
/// A pooled template (`pool = "session"`), for the `pooled` scenario.
pub const TEMPLATE_POOLED: &str = "bench_pooled";
pub const GROUP: &str = "bench_rw";
pub const DIRECT_USER: &str = "bench_user";
pub const ADMIN_USER: &str = "ephemera_admin";
/// `max_connections` of the cluster: 1 000 idle relayed sessions plus the
/// admin pool, the reaper's lock and the bench's own connections.
pub const PG_MAX_CONNECTIONS: u32 = 1200;

pub fn random(n: usize) -> String {
    Alphanumeric.sample_string(&mut rand::thread_rng(), n)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

fn wait_listening(port: u16, timeout: Duration, mut alive: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        if !alive() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Raise the soft open-files limit to the hard one (inherited by children:
/// 1 000 relayed sessions need 2 000+ descriptors in Ephemera).
pub fn raise_nofile() -> u64 {
    // SAFETY: plain getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            return limit.rlim_cur;
        }
    }
    0
}

fn chown(user: Option<ServerUser>, path: &Path) -> Result<(), Error> {
    cluster::give_to(user, path)?;
    Ok(())
}

fn client_tls(ca: &Path, client_cert: Option<(&Path, &Path)>) -> Result<MakeRustlsConnect, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_file(key)?;
            builder.with_client_auth_cert(chain, key)?
        }
    };
    Ok(MakeRustlsConnect::new(config))
}

/// How the in-process client connects: TLS configurations and base
/// `tokio_postgres` configurations for each path.
#[derive(Clone)]
pub struct Clients {
    pub direct_tls: MakeRustlsConnect,
    pub svid_tls: MakeRustlsConnect,
    /// As `bench_user` with its password, straight to PostgreSQL.
    pub direct: tokio_postgres::Config,
    /// As template `bench` with the SVID, through Ephemera.
    pub ephemera: tokio_postgres::Config,
    /// The same, through the second Ephemera (Unix-socket upstream).
    pub ephemera_unix: tokio_postgres::Config,
    /// As the pooled template `bench_pooled` with the SVID, through Ephemera.
    pub ephemera_pooled: tokio_postgres::Config,
    /// The superuser, for setup and for looking at `pg_roles`.
    pub superuser: tokio_postgres::Config,
    /// Ephemera's admin role (CREATEROLE), for the Vault-style flow.
    pub admin: tokio_postgres::Config,
}

impl Clients {
    pub async fn connect(
        &self,
        config: &tokio_postgres::Config,
        tls: &MakeRustlsConnect,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) = config.connect(tls.clone()).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    pub async fn superuser(&self, database: &str) -> Result<tokio_postgres::Client, Error> {
        let mut config = self.superuser.clone();
        config.dbname(database);
        Ok(self.connect(&config, &self.direct_tls).await?)
    }

    /// Poll until no role starts with `prefix`; returns the time it took and
    /// how many are left at the deadline.
    pub async fn drain(&self, prefix: &str, timeout: Duration) -> Result<(Duration, i64), Error> {
        let start = Instant::now();
        let client = self.superuser("postgres").await?;
        loop {
            let left: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_catalog.pg_roles WHERE starts_with(rolname, $1)",
                    &[&prefix],
                )
                .await?
                .get(0);
            if left == 0 || start.elapsed() >= timeout {
                return Ok((start.elapsed(), left));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A process we started; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Process {
    pub name: &'static str,
    pub child: Child,
    pub grace: Duration,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "load: {} did not stop within {:?}; killing it",
            self.name, self.grace
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct Env {
    pub dir: PathBuf,
    pub keep: bool,
    pub certs: DevCerts,
    pub bin_dir: PathBuf,
    pub pg_port: u16,
    pub eph_port: u16,
    /// The second Ephemera: same configuration, but the upstream leg over
    /// PostgreSQL's Unix-domain socket (a same-host deployment).
    pub eph_unix_port: u16,
    pub admin_port: u16,
    pub bouncer_port: u16,
    pub superuser_password: String,
    pub direct_password: String,
    pub clients: Clients,
    pub ephemera: Option<Process>,
    pub ephemera_unix: Option<Process>,
    /// The floor relay (`floor.rs`): plain TCP in, PostgreSQL's Unix socket out.
    pub floor: Option<Process>,
    pub floor_port: u16,
    pub pgbouncer: Option<Process>,
    pub pgbouncer_version: Option<String>,
    pub pg_version: String,
    /// Why PgBouncer is not there, if it is not.
    pub pgbouncer_missing: Option<String>,
    user: Option<ServerUser>,
    local: LocalCluster,
    cluster: Option<Running>,
}

impl Env {
    pub fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.local.data_dir.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    pub fn pids(&self) -> crate::stats::Pids {
        crate::stats::Pids {
            postmaster: self.postmaster_pid(),
            ephemera: self.ephemera.as_ref().map(Process::pid),
            ephemera_unix: self.ephemera_unix.as_ref().map(Process::pid),
            pgbouncer: self.pgbouncer.as_ref().map(Process::pid),
            floor: self.floor.as_ref().map(Process::pid),
        }
    }

    pub fn ca(&self) -> PathBuf {
        self.certs.ca()
    }

    /// libpq conninfo straight to PostgreSQL (TLS, verify-full) as the
    /// password user; the password goes in `PGPASSWORD`.
    pub fn direct_conninfo(&self, sslmode: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={DIRECT_USER} dbname={DATABASE} sslmode={sslmode} sslrootcert={}",
            self.pg_port,
            self.ca().display()
        )
    }

    /// libpq conninfo through Ephemera with the app's SVID.
    pub fn ephemera_conninfo(&self) -> String {
        self.svid_conninfo(self.eph_port)
    }

    /// The audited template through the first Ephemera (TLS upstream).
    pub fn ephemera_audited_conninfo(&self) -> String {
        self.svid_conninfo(self.eph_port).replace(
            &format!("user={TEMPLATE} "),
            &format!("user={TEMPLATE_AUDITED} "),
        )
    }

    /// The pooled template through the first Ephemera (TLS upstream).
    pub fn ephemera_pooled_conninfo(&self) -> String {
        self.svid_conninfo(self.eph_port).replace(
            &format!("user={TEMPLATE} "),
            &format!("user={TEMPLATE_POOLED} "),
        )
    }

    /// The same through the second Ephemera (Unix-socket upstream).
    pub fn ephemera_unix_conninfo(&self) -> String {
        self.svid_conninfo(self.eph_unix_port)
    }

    fn svid_conninfo(&self, port: u16) -> String {
        let (cert, key) = self.certs.svid(APP);
        format!(
            "host=127.0.0.1 port={} user={TEMPLATE} dbname={DATABASE} sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
            port,
            self.ca().display(),
            cert.display(),
            key.display()
        )
    }

    /// libpq conninfo through the floor relay (plain TCP; the password
    /// login passes through it to PostgreSQL's Unix socket).
    pub fn floor_conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={DIRECT_USER} dbname={DATABASE} sslmode=disable",
            self.floor_port
        )
    }

    /// Start the floor relay: this very executable, in its floor mode.
    pub fn start_floor(&mut self) -> Result<(), Error> {
        let socket = self
            .local
            .data_dir
            .join(format!(".s.PGSQL.{}", self.pg_port));
        let child = Command::new(std::env::current_exe()?)
            .env(
                crate::floor::FLOOR_RELAY_ENV,
                format!("127.0.0.1:{}|{}", self.floor_port, socket.display()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut process = Process {
            name: "floor relay",
            child,
            grace: Duration::from_secs(5),
        };
        if !wait_listening(self.floor_port, Duration::from_secs(10), || {
            matches!(process.child.try_wait(), Ok(None))
        }) {
            process.stop();
            return Err("the floor relay did not start listening".into());
        }
        self.floor = Some(process);
        Ok(())
    }

    /// libpq conninfo to PgBouncer (session mode); `sslmode=disable` for
    /// plain TCP, `verify-full` for TLS to PgBouncer.
    pub fn pgbouncer_conninfo(&self, sslmode: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={DIRECT_USER} dbname={DATABASE} sslmode={sslmode} sslrootcert={}",
            self.bouncer_port,
            self.ca().display()
        )
    }

    pub fn admin_client(&self) -> Result<ephemera::admin::client::AdminClient, Error> {
        let (cert, key) = self.certs.svid(ADMIN);
        Ok(ephemera::admin::client::AdminClient::from_files(
            &format!("https://127.0.0.1:{}", self.admin_port),
            &cert,
            &key,
            &self.ca(),
        )?
        .with_timeout(Duration::from_secs(30)))
    }

    pub fn ephemera_log(&self) -> PathBuf {
        self.dir.join("ephemera").join("ephemera.log")
    }

    /// (Re)start `ephemera serve` with the bench configuration.
    pub fn start_ephemera(&mut self) -> Result<(), Error> {
        if let Some(mut old) = self.ephemera.take() {
            old.stop();
        }
        let process = self.spawn_ephemera("config.toml", &self.ephemera_log(), self.eph_port)?;
        if !wait_listening(self.admin_port, Duration::from_secs(10), || true) {
            return Err("ephemera's admin API did not start listening".into());
        }
        self.ephemera = Some(process);
        Ok(())
    }

    /// Start the second Ephemera (Unix-socket upstream, no admin API).
    pub fn start_ephemera_unix(&mut self) -> Result<(), Error> {
        let log = self.dir.join("ephemera").join("ephemera-unix.log");
        let process = self.spawn_ephemera("config-unix.toml", &log, self.eph_unix_port)?;
        self.ephemera_unix = Some(process);
        Ok(())
    }

    fn spawn_ephemera(&self, config: &str, log_path: &Path, port: u16) -> Result<Process, Error> {
        let dir = self.dir.join("ephemera");
        let config = dir.join(config);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)?;
        // Another build (e.g. a candidate fix) instead of this tree's binary.
        let binary = std::env::var("EPHEMERA_BENCH_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_ephemera").to_owned());
        let mut command = Command::new(&binary);
        // An experiment knob for builds before thread-per-core (issue 14),
        // whose work-stealing runtime honours TOKIO_WORKER_THREADS.
        if let Ok(workers) = std::env::var("EPHEMERA_BENCH_TOKIO_WORKERS") {
            command.env("TOKIO_WORKER_THREADS", workers);
        }
        let child = command
            .args(["serve", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut process = Process {
            name: "ephemera",
            child,
            grace: Duration::from_secs(30),
        };
        let up = wait_listening(port, Duration::from_secs(30), || {
            matches!(process.child.try_wait(), Ok(None))
        });
        if !up {
            process.stop();
            return Err(format!(
                "ephemera did not start listening; see {}",
                log_path.display()
            )
            .into());
        }
        Ok(process)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Ephemera first: it revokes its leases while PostgreSQL is still up.
        for mut p in [
            self.ephemera.take(),
            self.ephemera_unix.take(),
            self.floor.take(),
        ]
        .into_iter()
        .flatten()
        {
            p.stop();
        }
        if let Some(mut p) = self.pgbouncer.take() {
            p.stop();
        }
        if let Some(running) = self.cluster.take() {
            running.stop(Duration::from_secs(30));
        }
        if self.keep {
            eprintln!("load: kept {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn command_output(cmd: &mut Command) -> Result<String, Error> {
    let output = cmd.output()?;
    if !output.status.success() {
        return Err(format!(
            "{:?} failed: {}{}",
            cmd,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// PgBouncer's binary: installed from Debian's package if missing and we
/// are root (said on stderr). `Err` says why there is none.
fn ensure_pgbouncer() -> Result<PathBuf, String> {
    let candidates = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"];
    let found = || candidates.iter().map(PathBuf::from).find(|p| p.is_file());
    if let Some(path) = found() {
        return Ok(path);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("pgbouncer is not installed and we are not root to apt-get install it".into());
    }
    eprintln!("load: pgbouncer is missing; installing the Debian package with apt-get (as root)");
    let install = || {
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "pgbouncer",
            ])
            // No service is started by the package: we run our own instance.
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("RUNLEVEL", "1")
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !install() {
        eprintln!("load: apt-get install failed; running apt-get update and retrying");
        let _ = Command::new("apt-get")
            .args(["update", "-q"])
            .stdout(Stdio::null())
            .status();
        if !install() {
            return Err("apt-get install pgbouncer failed".into());
        }
    }
    found().ok_or_else(|| "pgbouncer installed but its binary is not in /usr/sbin".into())
}

/// Build everything. Blocking parts (initdb, pgbench -i) run here; the
/// async parts on `rt`.
pub fn prepare(rt: &tokio::runtime::Runtime, keep: bool) -> Result<Env, Error> {
    let nofile = raise_nofile();
    if nofile < 4096 {
        eprintln!("load: open-files limit is {nofile}; the memory scenario may run out");
    }
    let base = tempfile::Builder::new()
        .prefix("ephemera-load-")
        .tempdir_in("/var/tmp")?
        .keep();
    // PostgreSQL (and PgBouncer) run as the postgres user: let them in.
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755))?;
    eprintln!("load: working in {}", base.display());

    let (certs, _) = DevCerts::ensure(&base.join("certs"))?;
    let bin_dir = find_bin_dir()?;
    let user = server_user()?;
    let pg_version = command_output(Command::new(bin_dir.join("postgres")).arg("--version"))?;
    let local = LocalCluster {
        bin_dir: bin_dir.clone(),
        data_dir: base.join("pg").join("data"),
        log_path: base.join("postgres.log"),
        user,
    };
    let superuser_password = random(24);
    let direct_password = random(24);
    let admin_password = random(24);
    eprintln!("load: initdb ({})", bin_dir.display());
    // Defaults everywhere (fsync and synchronous_commit on: the CREATE ROLE
    // comparison must be fair), except room for 1 000 idle sessions.
    let server_cert = std::fs::read_to_string(certs.server_cert())?;
    let server_key = std::fs::read_to_string(certs.server_key())?;
    let extra_conf = format!("# ephemera load bench\nmax_connections = {PG_MAX_CONNECTIONS}\n");
    local.init_with(&InitOptions {
        superuser_password: &superuser_password,
        server_cert: &server_cert,
        server_key: &server_key,
        extra_conf: &extra_conf,
        ..InitOptions::default()
    })?;

    let pg_port = free_port();
    let running = local.start(pg_port)?;
    if let Err(e) = local.wait_ready(&running, Duration::from_secs(60)) {
        running.stop(Duration::from_secs(5));
        return Err(e.into());
    }

    let direct_tls = client_tls(&certs.ca(), None)?;
    let (app_cert, app_key) = certs.svid(APP);
    let svid_tls = client_tls(&certs.ca(), Some((&app_cert, &app_key)))?;
    let base_config = |port: u16, user: &str, password: Option<&str>| {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(port)
            .user(user)
            .dbname(DATABASE)
            .application_name("ephemera-load")
            .ssl_mode(tokio_postgres::config::SslMode::Require)
            .connect_timeout(Duration::from_secs(30));
        if let Some(p) = password {
            c.password(p);
        }
        c
    };
    let eph_port = free_port();
    let eph_unix_port = free_port();
    let admin_port = free_port();
    let mut superuser = base_config(pg_port, "postgres", Some(&superuser_password));
    superuser.dbname("postgres");
    let mut admin = base_config(pg_port, ADMIN_USER, Some(&admin_password));
    admin.dbname(DATABASE);
    let clients = Clients {
        direct_tls,
        svid_tls,
        direct: base_config(pg_port, DIRECT_USER, Some(&direct_password)),
        ephemera: base_config(eph_port, TEMPLATE, None),
        ephemera_unix: base_config(eph_unix_port, TEMPLATE, None),
        ephemera_pooled: base_config(eph_port, TEMPLATE_POOLED, None),
        superuser,
        admin,
    };

    let mut env = Env {
        dir: base.clone(),
        keep,
        certs,
        bin_dir,
        pg_port,
        eph_port,
        eph_unix_port,
        admin_port,
        bouncer_port: free_port(),
        superuser_password,
        direct_password,
        clients,
        ephemera: None,
        ephemera_unix: None,
        floor: None,
        floor_port: free_port(),
        pgbouncer: None,
        pgbouncer_version: None,
        pg_version,
        pgbouncer_missing: None,
        user,
        local,
        cluster: Some(running),
    };

    eprintln!("load: roles, database {DATABASE}, pgbench -i -s 10");
    rt.block_on(setup_sql(&env, &admin_password))?;
    let pgbench_init = Command::new(env.bin_dir.join("pgbench"))
        .args(["-i", "-s", "10", "-q"])
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname={DATABASE} sslmode=require",
            env.pg_port
        ))
        .env("PGPASSWORD", &env.superuser_password)
        .output()?;
    if !pgbench_init.status.success() {
        return Err(format!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&pgbench_init.stderr)
        )
        .into());
    }
    rt.block_on(async {
        let client = env.clients.superuser(DATABASE).await?;
        client
            .batch_execute(&format!(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {GROUP}"
            ))
            .await?;
        client.batch_execute("VACUUM ANALYZE").await?;
        Ok::<_, Error>(())
    })?;

    write_ephemera_config(&env, &admin_password)?;
    eprintln!(
        "load: starting ephemera ({})",
        env!("CARGO_BIN_EXE_ephemera")
    );
    env.start_ephemera()?;
    env.start_ephemera_unix()?;
    env.start_floor()?;

    match ensure_pgbouncer() {
        Ok(bin) => match start_pgbouncer(&env, &bin) {
            Ok((process, version)) => {
                env.pgbouncer = Some(process);
                env.pgbouncer_version = Some(version);
            }
            Err(e) => env.pgbouncer_missing = Some(format!("pgbouncer did not start: {e}")),
        },
        Err(why) => env.pgbouncer_missing = Some(why),
    }
    if let Some(why) = &env.pgbouncer_missing {
        eprintln!("load: no PgBouncer comparisons: {why}");
    }
    Ok(env)
}

async fn setup_sql(env: &Env, admin_password: &str) -> Result<(), Error> {
    let client = env.clients.superuser("postgres").await?;
    let admin_verifier = postgres_protocol::password::scram_sha_256(admin_password.as_bytes());
    let direct_verifier =
        postgres_protocol::password::scram_sha_256(env.direct_password.as_bytes());
    client
        .batch_execute(&format!(
            "CREATE ROLE {ADMIN_USER} LOGIN CREATEROLE PASSWORD '{admin_verifier}';
             CREATE ROLE {GROUP} NOLOGIN;
             CREATE ROLE {DIRECT_USER} LOGIN PASSWORD '{direct_verifier}' IN ROLE {GROUP};
             CREATE SCHEMA ephemera AUTHORIZATION {ADMIN_USER};
             REVOKE ALL ON SCHEMA ephemera FROM PUBLIC;"
        ))
        .await?;
    client
        .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
        .await?;
    Ok(())
}

fn write_ephemera_config(env: &Env, admin_password: &str) -> Result<(), Error> {
    let dir = env.dir.join("ephemera");
    std::fs::create_dir_all(&dir)?;
    cluster::write_private(&dir.join("admin-password"), admin_password.as_bytes())?;
    let ca = env.certs.ca();
    let tcp_upstream = format!(
        "host = \"127.0.0.1\"\nsslmode = \"{}\"\nca = \"{}\"",
        std::env::var("EPHEMERA_BENCH_UPSTREAM_SSLMODE").unwrap_or_else(|_| "verify-full".into()),
        ca.display()
    );
    let admin = format!(
        "[admin]\nlisten = \"127.0.0.1:{}\"\nidentities = [\"{}\"]",
        env.admin_port, ADMIN.spiffe_id
    );
    std::fs::write(
        dir.join("config.toml"),
        ephemera_config(env, env.eph_port, &tcp_upstream, &admin, "audit.jsonl"),
    )?;
    // PostgreSQL's socket directory is its data directory (LocalCluster).
    let unix_upstream = format!(
        "host = \"{}\"\nsslmode = \"disable\"",
        env.local.data_dir.display()
    );
    std::fs::write(
        dir.join("config-unix.toml"),
        ephemera_config(
            env,
            env.eph_unix_port,
            &unix_upstream,
            "",
            "audit-unix.jsonl",
        ),
    )?;
    Ok(())
}

fn ephemera_config(env: &Env, port: u16, upstream: &str, admin: &str, audit: &str) -> String {
    let certs = &env.certs;
    format!(
        r#"# Written by benches/load: the bench's Ephemera.
[listen]
address = "127.0.0.1:{port}"
handshake_timeout = "10s"
# 1 000 idle sessions for the memory scenario, plus headroom.
max_connections = 2000
{workers}

[tls]
cert = "{server_cert}"
key = "{server_key}"
trust_bundle = "{ca}"
trust_domains = ["ephemera.dev"]

[upstream]
{upstream}
port = {pg_port}
admin_database = "postgres"
admin_user = "{ADMIN_USER}"
admin_password_file = "admin-password"
pool_size = {pool_size}

[lease]
login_window = "60s"
# The reaper scans every second so its throughput, not its interval,
# dominates the reaper scenario.
reap_interval = "1s"
# The per-identity issue limit is a safety valve for production; the bench
# is one identity opening thousands of sessions on purpose.
issue_rate_per_identity = 1000000.0
issue_burst_per_identity = 1000000

{admin}

[audit]
path = "{audit}"

[templates.{TEMPLATE}]
database = "{DATABASE}"
member_of = ["{GROUP}"]

[templates.{TEMPLATE_AUDITED}]
database = "{DATABASE}"
member_of = ["{GROUP}"]
audit_statements = true

[templates.{TEMPLATE_POOLED}]
database = "{DATABASE}"
member_of = ["{GROUP}"]
pool = "session"
pool_size = {pooled_size}
pool_idle_timeout = "2s"

[[policy]]
spiffe_id = "{app_id}"
templates = ["{TEMPLATE}", "{TEMPLATE_AUDITED}", "{TEMPLATE_POOLED}"]
"#,
        pool_size = std::env::var("EPHEMERA_BENCH_POOL_SIZE").unwrap_or_else(|_| "4".into()),
        // The pooled template: a backend per storm loop.
        pooled_size = std::env::var("EPHEMERA_BENCH_POOLED_SIZE").unwrap_or_else(|_| "32".into()),
        // Session threads (default: one per core).
        workers = std::env::var("EPHEMERA_BENCH_WORKERS")
            .map(|n| format!("workers = {n}"))
            .unwrap_or_default(),
        pg_port = env.pg_port,
        server_cert = certs.server_cert().display(),
        server_key = certs.server_key().display(),
        ca = certs.ca().display(),
        app_id = APP.spiffe_id,
    )
}

fn start_pgbouncer(env: &Env, bin: &Path) -> Result<(Process, String), Error> {
    let version = command_output(Command::new(bin).arg("--version"))?
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    let dir = env.dir.join("pgbouncer");
    std::fs::create_dir_all(&dir)?;
    chown(env.user, &dir)?;
    let copy = |from: &Path, name: &str, private: bool| -> Result<PathBuf, Error> {
        let to = dir.join(name);
        let bytes = std::fs::read(from)?;
        if private {
            cluster::write_private(&to, &bytes)?;
        } else {
            std::fs::write(&to, &bytes)?;
        }
        chown(env.user, &to)?;
        Ok(to)
    };
    let ca = copy(&env.certs.ca(), "ca.pem", false)?;
    let cert = copy(&env.certs.server_cert(), "server.pem", false)?;
    let key = copy(&env.certs.server_key(), "server-key.pem", true)?;
    let userlist = dir.join("userlist.txt");
    cluster::write_private(
        &userlist,
        format!("\"{DIRECT_USER}\" \"{}\"\n", env.direct_password).as_bytes(),
    )?;
    chown(env.user, &userlist)?;
    let ini = dir.join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[databases]\n\
             {DATABASE} = host=127.0.0.1 port={pg_port} dbname={DATABASE}\n\
             \n[pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = scram-sha-256\n\
             auth_file = {userlist}\n\
             pool_mode = session\n\
             max_client_conn = 2000\n\
             default_pool_size = 100\n\
             server_tls_sslmode = verify-full\n\
             server_tls_ca_file = {ca}\n\
             client_tls_sslmode = allow\n\
             client_tls_cert_file = {cert}\n\
             client_tls_key_file = {key}\n\
             logfile = {log}\n\
             pidfile = {pid}\n",
            pg_port = env.pg_port,
            port = env.bouncer_port,
            userlist = userlist.display(),
            ca = ca.display(),
            cert = cert.display(),
            key = key.display(),
            log = dir.join("pgbouncer.log").display(),
            pid = dir.join("pgbouncer.pid").display(),
        ),
    )?;
    chown(env.user, &ini)?;
    let mut command = Command::new(bin);
    command
        .arg(&ini)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(user) = env.user {
        command.uid(user.uid).gid(user.gid);
    }
    let child = command.spawn()?;
    let mut process = Process {
        name: "pgbouncer",
        child,
        grace: Duration::from_secs(10),
    };
    if !wait_listening(env.bouncer_port, Duration::from_secs(15), || {
        matches!(process.child.try_wait(), Ok(None))
    }) {
        process.stop();
        return Err(format!("not listening; see {}", dir.join("pgbouncer.log").display()).into());
    }
    Ok((process, version))
}
