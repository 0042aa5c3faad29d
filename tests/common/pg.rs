//! A throw-away PostgreSQL 15 cluster, started lazily once per test binary.
//!
//! ```ignore
//! let pg = common::cluster();               // starts the cluster on first use
//! let client = pg.superuser("postgres").await; // TLS (verify-full) as `postgres`
//! pg.exec_sql("postgres", "create role app login").await;
//! assert!(pg.server_log().contains("create role app login"));
//! ```
//!
//! What you get:
//! * a fresh `initdb` in a temporary directory (`$TMPDIR/ephemera-pg-XXXXXX/`), with
//!   password (SCRAM-SHA-256) authentication everywhere: no `trust` lines;
//! * superuser `postgres` with a random password ([`TestCluster::superuser_password`]);
//! * TCP on 127.0.0.1 at a random free port, with TLS using a certificate issued by a
//!   harness CA ([`TestCluster::ca`], [`TestCluster::ca_pem_path`]) for `localhost` and
//!   `127.0.0.1`, so clients can use `sslmode=verify-full`;
//! * a Unix socket in the same temporary directory ([`TestCluster::socket_dir`]);
//! * `log_statement = 'all'` plus connection logging, in [`TestCluster::log_path`].
//!
//! Lifetime: the postmaster is spawned from a dedicated thread with
//! `PR_SET_PDEATHSIG = SIGQUIT`, so it dies with the test process even on `kill -9`.
//! On a normal exit an `atexit` hook stops it and deletes the directory; directories
//! left behind by killed test processes are removed by the next run. Set
//! `EPHEMERA_KEEP_TEST_PG=1` to keep the directory (and log) for inspection.
//!
//! Running as root (as in CI containers): PostgreSQL refuses to run as root, so
//! `initdb` and `postgres` run as the `postgres` system user, which owns the directory.
//!
//! The binaries come from `$EPHEMERA_PG_BINDIR`, else from where `ephemera dev` finds
//! them (`pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`).
//!
//! initdb, the configuration both share, start-up and shutdown are the library's
//! ([`ephemera::dev::cluster`]); this module adds what only tests need: the harness CA,
//! fast and chatty settings, a cluster per test binary and its clean-up, and clients.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ephemera::dev::cluster::{self, InitOptions, LocalCluster, Running, StartOptions};
use rand::distributions::Alphanumeric;
use rand::Rng;
use tokio_postgres::config::SslMode;

use super::pki::{self, TestCa};

/// The bootstrap superuser created by initdb.
pub const SUPERUSER: &str = "postgres";
/// The address the cluster listens on (and the host name to connect to).
pub const HOST: &str = "127.0.0.1";
/// How long the cluster may take to accept connections.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the postmaster to exit at shutdown.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Prefix of the temporary directories (used to find stale ones).
const DIR_PREFIX: &str = "ephemera-pg-";
/// The port is chosen by binding port 0 and releasing it, which can race with another
/// process; if the postmaster then fails to start we try again with a new port.
const START_ATTEMPTS: usize = 3;
/// What tests want on top of the library's configuration: speed over durability,
/// every statement and connection in the log, and prepared transactions.
const TEST_SETTINGS: &str = "\n# ----- Ephemera test harness -----\n\
     max_prepared_transactions = 20\n\
     shared_buffers = 32MB\n\
     fsync = off\n\
     synchronous_commit = off\n\
     full_page_writes = off\n\
     logging_collector = off\n\
     log_destination = 'stderr'\n\
     log_statement = 'all'\n\
     log_connections = on\n\
     log_disconnections = on\n\
     log_line_prefix = '%m [%p] %q%u@%d '\n";

static CLUSTER: OnceLock<Result<TestCluster, String>> = OnceLock::new();
static CERT_CLUSTER: OnceLock<Result<TestCluster, String>> = OnceLock::new();

/// The users that keep SCRAM on the [`cert_cluster`]: the superuser and the
/// proxy fixture's admin role (`proxy::ADMIN_USER`), so admin connections
/// work; every other role must log in with a client certificate.
const CERT_CLUSTER_SCRAM_USERS: &[&str] = &[SUPERUSER, "ephemera_admin"];

/// How a cluster authenticates TCP connections.
#[derive(Clone, Copy)]
enum Auth {
    /// SCRAM-SHA-256 for everyone (the shared [`cluster`]).
    Scram,
    /// `ssl_ca_file` = a login CA of its own ([`TestCluster::login_ca`]);
    /// these users keep SCRAM, everyone else needs a client certificate
    /// from that CA whose CN is the role (`hostssl all all … cert`).
    Certificate {
        scram_users: &'static [&'static str],
    },
}

/// The cluster shared by all tests of this test binary, started on first call.
///
/// Safe to call from any thread and from inside a tokio runtime: the start-up work
/// (initdb, spawning, waiting) runs on a separate std thread; callers block until it
/// is done (about a second). If start-up fails, every call panics with the reason.
pub fn cluster() -> &'static TestCluster {
    started(&CLUSTER, Auth::Scram)
}

/// A second cluster, started on first call, configured for certificate
/// logins: `ssl_ca_file` is [`TestCluster::login_ca`], `pg_hba.conf` has
/// `hostssl all all 127.0.0.1/32 cert` after SCRAM lines for the superuser
/// and `ephemera_admin` (first match wins, so those two keep passwords).
pub fn cert_cluster() -> &'static TestCluster {
    started(
        &CERT_CLUSTER,
        Auth::Certificate {
            scram_users: CERT_CLUSTER_SCRAM_USERS,
        },
    )
}

fn started(
    cell: &'static OnceLock<Result<TestCluster, String>>,
    auth: Auth,
) -> &'static TestCluster {
    let result = cell.get_or_init(|| {
        let outcome = std::thread::Builder::new()
            .name("test-pg-setup".into())
            .spawn(move || TestCluster::start(auth))
            .expect("spawning the cluster setup thread")
            .join()
            .unwrap_or_else(|panic| Err(format!("cluster setup panicked: {panic:?}")));
        if outcome.is_ok() {
            // One hook stops every cluster this binary started.
            static AT_EXIT: std::sync::Once = std::sync::Once::new();
            AT_EXIT.call_once(|| super::os::at_exit(stop_cluster_at_exit));
        }
        outcome
    });
    match result {
        Ok(cluster) => cluster,
        Err(reason) => panic!("the test PostgreSQL cluster could not be started:\n{reason}"),
    }
}

/// Runs `sql` (one or more statements, no parameters) in `database` as the superuser;
/// panics with the error if it fails. Shorthand for `cluster().exec_sql(...)`.
pub async fn exec_sql(database: &str, sql: &str) {
    cluster().exec_sql(database, sql).await
}

/// A running PostgreSQL cluster. Get the shared one with [`cluster()`].
pub struct TestCluster {
    /// The temporary directory holding everything below (owned by the server's OS user).
    base_dir: PathBuf,
    /// Binaries, data directory (`base_dir/data`) and log (`base_dir/postgres.log`).
    local: LocalCluster,
    ca: TestCa,
    ca_pem_path: PathBuf,
    port: u16,
    superuser_password: String,
    postmaster: Running,
    /// The CA in `ssl_ca_file` ([`cert_cluster`] only).
    login_ca: Option<TestCa>,
}

impl std::fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCluster")
            .field("port", &self.port)
            .field("base_dir", &self.base_dir)
            .field("postmaster_pid", &self.postmaster.pid())
            .finish_non_exhaustive()
    }
}

impl TestCluster {
    // ----- connection details ------------------------------------------------

    /// Always `"127.0.0.1"` (the server certificate also covers `localhost`).
    pub fn host(&self) -> &str {
        HOST
    }

    /// The TCP port the cluster listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's name, `postgres`.
    pub fn superuser_name(&self) -> &str {
        SUPERUSER
    }

    /// The (random) password of the `postgres` superuser.
    pub fn superuser_password(&self) -> &str {
        &self.superuser_password
    }

    /// The CA that issued the server certificate; tests may issue more certs with it.
    pub fn ca(&self) -> &TestCa {
        &self.ca
    }

    /// The CA certificate, PEM (trust this to verify the server).
    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// The CA PostgreSQL trusts for client certificates (`ssl_ca_file`), on
    /// the [`cert_cluster`]; `None` on the shared one.
    pub fn login_ca(&self) -> Option<&TestCa> {
        self.login_ca.as_ref()
    }

    /// Path of the CA certificate PEM, for `sslrootcert=`.
    pub fn ca_pem_path(&self) -> &Path {
        &self.ca_pem_path
    }

    /// Directory holding the Unix socket (`.s.PGSQL.<port>`); usable as libpq `host=`.
    pub fn socket_dir(&self) -> &Path {
        &self.base_dir
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.local.data_dir
    }

    /// Directory with `psql`, `pg_isready`, ... of the server's version.
    pub fn bin_dir(&self) -> &Path {
        &self.local.bin_dir
    }

    /// A libpq URL, e.g. for `psql`:
    /// `postgresql://user:pw@127.0.0.1:PORT/db?sslmode=verify-full&sslrootcert=...`.
    pub fn psql_url(&self, user: &str, password: &str, database: &str) -> String {
        format!(
            "postgresql://{}:{}@{HOST}:{}/{}?sslmode=verify-full&sslrootcert={}",
            percent_encode(user),
            percent_encode(password),
            self.port,
            percent_encode(database),
            percent_encode(&self.ca_pem_path.to_string_lossy()),
        )
    }

    /// [`TestCluster::psql_url`] for the superuser.
    pub fn superuser_url(&self, database: &str) -> String {
        self.psql_url(SUPERUSER, &self.superuser_password, database)
    }

    // ----- clients -----------------------------------------------------------

    /// A tokio-postgres config for TCP + TLS to this cluster. TLS is required and,
    /// with the connector of [`TestCluster::connect`], verified against the harness CA.
    pub fn config(&self, user: &str, password: &str, database: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(HOST)
            .port(self.port)
            .user(user)
            .password(password)
            .dbname(database)
            .application_name("ephemera-tests")
            .ssl_mode(SslMode::Require)
            .connect_timeout(Duration::from_secs(10));
        config
    }

    /// Connects as `user` over TLS (verify-full against the harness CA) and spawns the
    /// connection task on the current tokio runtime. Returns the error, e.g. for a
    /// wrong password, instead of panicking.
    pub async fn connect(
        &self,
        user: &str,
        password: &str,
        database: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let tls = pki::make_tls_connect(self.ca_pem(), None);
        let (client, connection) = self.config(user, password, database).connect(tls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("test-pg: connection closed with error: {e}");
            }
        });
        Ok(client)
    }

    /// A superuser connection to `database` over TLS (verify-full); panics on failure.
    pub async fn superuser(&self, database: &str) -> tokio_postgres::Client {
        self.connect(SUPERUSER, &self.superuser_password, database)
            .await
            .unwrap_or_else(|e| panic!("superuser connection to database {database:?} failed: {e}"))
    }

    /// Runs `sql` (one or more statements) in `database` as the superuser.
    pub async fn try_exec_sql(
        &self,
        database: &str,
        sql: &str,
    ) -> Result<(), tokio_postgres::Error> {
        self.superuser(database).await.batch_execute(sql).await
    }

    /// Like [`TestCluster::try_exec_sql`] but panics (showing the SQL) on error.
    pub async fn exec_sql(&self, database: &str, sql: &str) {
        if let Err(e) = self.try_exec_sql(database, sql).await {
            panic!("exec_sql in {database:?} failed: {e}\nSQL: {sql}");
        }
    }

    // ----- server log --------------------------------------------------------

    /// The server log file (the postmaster's stderr; every statement is logged).
    pub fn log_path(&self) -> &Path {
        &self.local.log_path
    }

    /// The whole server log so far.
    pub fn server_log(&self) -> String {
        self.server_log_since(0)
    }

    /// The current size of the log; pass it to [`TestCluster::server_log_since`] later
    /// to see only what was logged in between.
    pub fn log_len(&self) -> u64 {
        fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0)
    }

    /// The server log from byte `offset` on (invalid UTF-8 is replaced).
    pub fn server_log_since(&self, offset: u64) -> String {
        read_from(self.log_path(), offset)
    }

    /// Polls the log (from `offset`) until it contains `needle` or `timeout` passes.
    /// Useful for things a backend logs after the client is gone (disconnections).
    pub async fn wait_for_log(&self, offset: u64, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.server_log_since(offset).contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // ----- start-up ----------------------------------------------------------

    /// initdb + configure + start + wait until ready. Runs on the setup thread.
    fn start(auth: Auth) -> Result<TestCluster, String> {
        let bin_dir = find_bin_dir()?;
        let server_user = cluster::server_user().map_err(|e| e.to_string())?;
        remove_stale_dirs();

        let base_dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir_in(parent_dir())
            .map_err(|e| format!("creating the cluster directory: {e}"))?
            .keep();
        // Records which process owns the directory, so a later run can delete it if
        // this process dies without cleaning up.
        fs::write(base_dir.join("owner.pid"), std::process::id().to_string())
            .map_err(|e| format!("writing owner.pid: {e}"))?;

        let local = LocalCluster {
            bin_dir,
            data_dir: base_dir.join("data"),
            log_path: base_dir.join("postgres.log"),
            user: server_user,
        };
        let result = Self::start_in(base_dir.clone(), local, auth);
        if result.is_err() && std::env::var_os("EPHEMERA_KEEP_TEST_PG").is_none() {
            let _ = fs::remove_dir_all(&base_dir);
        }
        result
    }

    fn start_in(base_dir: PathBuf, local: LocalCluster, auth: Auth) -> Result<TestCluster, String> {
        cluster::give_to(local.user, &base_dir).map_err(|e| e.to_string())?;
        let superuser_password: String = rand::thread_rng()
            .sample_iter(&Alphanumeric)
            .take(32)
            .map(char::from)
            .collect();
        // TLS material: a harness CA and a server certificate it issued.
        let ca = TestCa::new("ephemera test postgres CA");
        let ca_pem_path = ca.write_pem(&base_dir);
        let server = ca.server_cert(&["localhost"], &[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        local
            .init_with(&InitOptions {
                superuser_password: &superuser_password,
                server_cert: &server.chain_pem,
                server_key: &server.key_pem,
                socket_dir: Some(&base_dir),
                no_sync: true,
                extra_conf: TEST_SETTINGS,
            })
            .map_err(|e| e.to_string())?;
        let login_ca = match auth {
            Auth::Scram => None,
            Auth::Certificate { scram_users } => Some(configure_cert_auth(&local, scram_users)?),
        };

        // Start, retrying with another port if the chosen one got taken meanwhile.
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let port = cluster::free_port().map_err(|e| e.to_string())?;
            let log_offset = fs::metadata(&local.log_path).map(|m| m.len()).unwrap_or(0);
            let options = StartOptions {
                own_process_group: false,
                before_spawn: Some(super::os::die_with_parent),
            };
            let postmaster = local.start_with(port, options).map_err(|e| e.to_string())?;
            match local.wait_ready(&postmaster, STARTUP_TIMEOUT) {
                Ok(()) => {
                    return Ok(TestCluster {
                        base_dir,
                        local,
                        ca,
                        ca_pem_path,
                        port,
                        superuser_password,
                        postmaster,
                        login_ca,
                    });
                }
                Err(reason) => {
                    stop(&postmaster);
                    let log = read_from(&local.log_path, log_offset);
                    let port_taken = log.contains("could not bind")
                        || log.contains("could not create any TCP/IP sockets");
                    failures.push(format!("port {port}: {reason}\nserver log:\n{log}"));
                    if !port_taken {
                        break;
                    }
                }
            }
        }
        Err(failures.join("\n\n"))
    }
}

/// After initdb: a login CA in `ssl_ca_file`, and `pg_hba.conf` with SCRAM
/// for `scram_users` first, then `cert` for everyone else over TLS.
fn configure_cert_auth(local: &LocalCluster, scram_users: &[&str]) -> Result<TestCa, String> {
    let ca = TestCa::new("ephemera test login CA");
    let data = &local.data_dir;
    let ca_file = data.join("login-ca.crt");
    fs::write(&ca_file, ca.cert_pem()).map_err(|e| format!("writing login-ca.crt: {e}"))?;
    cluster::give_to(local.user, &ca_file).map_err(|e| e.to_string())?;
    let mut hba = String::from(
        "# Ephemera test harness: certificate logins for every role but these\n\
         local all all scram-sha-256\n",
    );
    for user in scram_users {
        hba.push_str(&format!("hostssl all {user} 127.0.0.1/32 scram-sha-256\n"));
    }
    hba.push_str("hostssl all all 127.0.0.1/32 cert clientcert=verify-full\n");
    // Writing over the file initdb made keeps its owner.
    fs::write(data.join("pg_hba.conf"), hba).map_err(|e| format!("writing pg_hba.conf: {e}"))?;
    let conf = data.join("postgresql.conf");
    let mut text =
        fs::read_to_string(&conf).map_err(|e| format!("reading postgresql.conf: {e}"))?;
    text.push_str("ssl_ca_file = 'login-ca.crt'\n");
    fs::write(&conf, text).map_err(|e| format!("writing postgresql.conf: {e}"))?;
    Ok(ca)
}

/// Immediate shutdown, waiting for the exit. Never panics (runs in the atexit hook).
fn stop(postmaster: &Running) {
    if !postmaster.stop_immediately(SHUTDOWN_TIMEOUT) {
        eprintln!(
            "test-pg: postmaster {} did not exit within {SHUTDOWN_TIMEOUT:?}",
            postmaster.pid()
        );
    }
}

/// Registered with `atexit` once the cluster is up: stop it and delete its directory.
extern "C" fn stop_cluster_at_exit() {
    for cell in [&CLUSTER, &CERT_CLUSTER] {
        stop_and_remove(cell);
    }
}

fn stop_and_remove(cell: &OnceLock<Result<TestCluster, String>>) {
    if let Some(Ok(cluster)) = cell.get() {
        stop(&cluster.postmaster);
        if std::env::var_os("EPHEMERA_KEEP_TEST_PG").is_some() {
            eprintln!(
                "test-pg: keeping {} (log: {})",
                cluster.base_dir.display(),
                cluster.log_path().display()
            );
        } else {
            let _ = fs::remove_dir_all(&cluster.base_dir);
        }
    }
}

// ----- helpers -------------------------------------------------------------------

/// `$EPHEMERA_PG_BINDIR`, else where `ephemera dev` finds the binaries.
fn find_bin_dir() -> Result<PathBuf, String> {
    let Some(dir) = std::env::var_os("EPHEMERA_PG_BINDIR") else {
        return cluster::find_bin_dir().map_err(|e| e.to_string());
    };
    let dir = PathBuf::from(dir);
    if dir.join("initdb").is_file() {
        Ok(dir)
    } else {
        Err(format!(
            "EPHEMERA_PG_BINDIR={} has no initdb",
            dir.display()
        ))
    }
}

/// Where to create the cluster directory: the temp dir, unless the server user could
/// not reach it or the socket path would be too long (max 107 bytes), then `/tmp`.
fn parent_dir() -> PathBuf {
    let tmp = std::env::temp_dir();
    let world_searchable = cluster::reachable_by_others(&tmp.join(DIR_PREFIX));
    // "<tmp>/ephemera-pg-XXXXXX/.s.PGSQL.65535" must fit in sun_path.
    let short_enough = tmp.as_os_str().len() + 40 < 100;
    if world_searchable && short_enough {
        tmp
    } else {
        PathBuf::from("/tmp")
    }
}

/// Deletes cluster directories of earlier test processes that died without cleaning
/// up (their `owner.pid` process is gone and their postmaster is not running).
fn remove_stale_dirs() {
    let Ok(entries) = fs::read_dir(parent_dir()) else {
        return;
    };
    let alive = |pid_file: &Path| -> Option<bool> {
        let text = fs::read_to_string(pid_file).ok()?;
        let pid: libc::pid_t = text.lines().next()?.trim().parse().ok()?;
        Some(process_alive(pid))
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_ours = entry.file_name().to_string_lossy().starts_with(DIR_PREFIX);
        // A directory without owner.pid may be one another process is just creating.
        if !is_ours || alive(&path.join("owner.pid")) != Some(false) {
            continue;
        }
        if alive(&path.join("data/postmaster.pid")) == Some(true) {
            continue;
        }
        let _ = fs::remove_dir_all(&path);
    }
}

/// Whether process `pid` exists and is not a zombie (a killed postmaster whose new
/// parent does not reap it stays a zombie, e.g. in containers).
fn process_alive(pid: libc::pid_t) -> bool {
    // No signal: only checks whether the process exists.
    let exists = matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Ok(()) | Err(nix::errno::Errno::EPERM)
    );
    // /proc/<pid>/stat is "pid (comm) STATE ...".
    let zombie = fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false);
    exists && !zombie
}

/// Reads `path` from byte `offset` to the end, lossily as UTF-8 ("" if unreadable).
fn read_from(path: &Path, offset: u64) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut file) = File::open(path) {
        if file.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = file.read_to_end(&mut bytes);
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Percent-encodes everything but RFC 3986 unreserved characters (for URLs).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for byte in s.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
