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
//! The binaries come from `$EPHEMERA_PG_BINDIR`, else `pg_config --bindir` (if it
//! contains `initdb`), else `/usr/lib/postgresql/15/bin`.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use rand::distributions::Alphanumeric;
use rand::Rng;
use tokio_postgres::config::SslMode;

use super::pki::{self, TestCa};

/// Where Debian/Ubuntu install PostgreSQL 15.
const FALLBACK_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
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

static CLUSTER: OnceLock<Result<TestCluster, String>> = OnceLock::new();

/// The cluster shared by all tests of this test binary, started on first call.
///
/// Safe to call from any thread and from inside a tokio runtime: the start-up work
/// (initdb, spawning, waiting) runs on a separate std thread; callers block until it
/// is done (about a second). If start-up fails, every call panics with the reason.
pub fn cluster() -> &'static TestCluster {
    let result = CLUSTER.get_or_init(|| {
        let outcome = std::thread::Builder::new()
            .name("test-pg-setup".into())
            .spawn(TestCluster::start)
            .expect("spawning the cluster setup thread")
            .join()
            .unwrap_or_else(|panic| Err(format!("cluster setup panicked: {panic:?}")));
        if outcome.is_ok() {
            // SAFETY: registers a plain `extern "C"` function with no arguments.
            unsafe { libc::atexit(stop_cluster_at_exit) };
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
    bin_dir: PathBuf,
    /// The temporary directory holding everything below (owned by the server's OS user).
    base_dir: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    ca: TestCa,
    ca_pem_path: PathBuf,
    port: u16,
    superuser_password: String,
    postmaster: Postmaster,
}

impl std::fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCluster")
            .field("port", &self.port)
            .field("base_dir", &self.base_dir)
            .field("postmaster_pid", &self.postmaster.pid)
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
        &self.data_dir
    }

    /// Directory with `psql`, `pg_isready`, ... of the server's version.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
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
        &self.log_path
    }

    /// The whole server log so far.
    pub fn server_log(&self) -> String {
        self.server_log_since(0)
    }

    /// The current size of the log; pass it to [`TestCluster::server_log_since`] later
    /// to see only what was logged in between.
    pub fn log_len(&self) -> u64 {
        fs::metadata(&self.log_path).map(|m| m.len()).unwrap_or(0)
    }

    /// The server log from byte `offset` on (invalid UTF-8 is replaced).
    pub fn server_log_since(&self, offset: u64) -> String {
        read_from(&self.log_path, offset)
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
    fn start() -> Result<TestCluster, String> {
        let bin_dir = find_bin_dir()?;
        let server_user = server_os_user()?;
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

        let result = Self::start_in(bin_dir, base_dir.clone(), server_user);
        if result.is_err() && std::env::var_os("EPHEMERA_KEEP_TEST_PG").is_none() {
            let _ = fs::remove_dir_all(&base_dir);
        }
        result
    }

    fn start_in(
        bin_dir: PathBuf,
        base_dir: PathBuf,
        server_user: Option<OsUser>,
    ) -> Result<TestCluster, String> {
        let data_dir = base_dir.join("data");
        let log_path = base_dir.join("postgres.log");
        let give_to_server = |path: &Path| -> Result<(), String> {
            match server_user {
                Some(user) => chown(path, Some(user.uid), Some(user.gid))
                    .map_err(|e| format!("chown {} to the postgres user: {e}", path.display())),
                None => Ok(()),
            }
        };
        give_to_server(&base_dir)?;

        // --- initdb, with the superuser password read from a temporary file.
        let superuser_password: String = rand::thread_rng()
            .sample_iter(&Alphanumeric)
            .take(32)
            .map(char::from)
            .collect();
        let pwfile = base_dir.join("pwfile");
        pki::write_private(&pwfile, format!("{superuser_password}\n").as_bytes());
        give_to_server(&pwfile)?;
        let output = server_command(&bin_dir.join("initdb"), &base_dir, server_user)
            .arg("--pgdata")
            .arg(&data_dir)
            .args(["--username", SUPERUSER])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["--auth=scram-sha-256", "--encoding=UTF8", "--no-locale"])
            .args(["--no-sync", "--no-instructions"])
            .output()
            .map_err(|e| format!("running initdb: {e}"))?;
        let _ = fs::remove_file(&pwfile);
        if !output.status.success() {
            return Err(format!(
                "initdb failed ({}):\n{}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }

        // --- TLS material: a harness CA and a server certificate it issued.
        let ca = TestCa::new("ephemera test postgres CA");
        let ca_pem_path = ca.write_pem(&base_dir);
        let server = ca.server_cert(&["localhost"], &[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        let (cert_path, key_path) = server.write(&base_dir, "server");
        give_to_server(&cert_path)?;
        give_to_server(&key_path)?;

        // --- configuration. Writing over existing files keeps their owner.
        fs::write(
            data_dir.join("pg_hba.conf"),
            "# Written by the Ephemera test harness: passwords everywhere, no trust.\n\
             # TYPE  DATABASE  USER  ADDRESS       METHOD\n\
             local   all       all                 scram-sha-256\n\
             host    all       all   127.0.0.1/32  scram-sha-256\n\
             host    all       all   ::1/128       scram-sha-256\n",
        )
        .map_err(|e| format!("writing pg_hba.conf: {e}"))?;
        let settings = format!(
            "\n# ----- Ephemera test harness -----\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = {socket_dir}\n\
             max_connections = 200\n\
             max_prepared_transactions = 20\n\
             shared_buffers = 32MB\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             password_encryption = 'scram-sha-256'\n\
             ssl = on\n\
             ssl_cert_file = {cert}\n\
             ssl_key_file = {key}\n\
             logging_collector = off\n\
             log_destination = 'stderr'\n\
             log_statement = 'all'\n\
             log_connections = on\n\
             log_disconnections = on\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n",
            socket_dir = conf_quote(&base_dir),
            cert = conf_quote(&cert_path),
            key = conf_quote(&key_path),
        );
        OpenOptions::new()
            .append(true)
            .open(data_dir.join("postgresql.conf"))
            .and_then(|mut f| f.write_all(settings.as_bytes()))
            .map_err(|e| format!("appending to postgresql.conf: {e}"))?;

        // --- start, retrying with another port if the chosen one got taken meanwhile.
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port()?;
            let log_offset = fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
            let postmaster =
                Postmaster::spawn(&bin_dir, &base_dir, &data_dir, port, log, server_user)?;
            match wait_until_ready(&bin_dir, port, &postmaster) {
                Ok(()) => {
                    return Ok(TestCluster {
                        bin_dir,
                        base_dir,
                        data_dir,
                        log_path,
                        ca,
                        ca_pem_path,
                        port,
                        superuser_password,
                        postmaster,
                    });
                }
                Err(reason) => {
                    postmaster.stop();
                    let log = read_from(&log_path, log_offset);
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

/// Polls `pg_isready` until the server accepts connections, the postmaster exits, or
/// the start-up deadline passes.
fn wait_until_ready(bin_dir: &Path, port: u16, postmaster: &Postmaster) -> Result<(), String> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Some(status) = postmaster.exit_status() {
            return Err(format!("postmaster exited during start-up ({status})"));
        }
        // Exit codes: 0 accepting, 1 rejecting (still starting), 2 no response.
        let status = clean_env(Command::new(bin_dir.join("pg_isready")))
            .args([
                "--quiet",
                "--host",
                HOST,
                "--dbname",
                "postgres",
                "--timeout",
                "2",
            ])
            .args(["--port", &port.to_string()])
            .stdin(Stdio::null())
            .status()
            .map_err(|e| format!("running pg_isready: {e}"))?;
        if status.success() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("not ready after {STARTUP_TIMEOUT:?}"));
        }
        // Poll interval; returns early if the postmaster exits.
        postmaster.wait_exit(Duration::from_millis(25));
    }
}

// ----- the postmaster process ----------------------------------------------------

/// The running postmaster and a way to learn when it has exited.
struct Postmaster {
    pid: libc::pid_t,
    exit: Arc<ExitSignal>,
}

/// Set once by the guardian thread when the postmaster has been reaped.
#[derive(Default)]
struct ExitSignal {
    status: Mutex<Option<ExitStatus>>,
    changed: Condvar,
}

impl ExitSignal {
    fn lock(&self) -> MutexGuard<'_, Option<ExitStatus>> {
        // Never panic here (this runs in the atexit hook): ignore poisoning.
        self.status
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Postmaster {
    /// Spawns `postgres -D data_dir -p port` with stdout/stderr going to `log`.
    ///
    /// The child is spawned from a dedicated thread that stays alive while the
    /// postmaster runs: Linux delivers PR_SET_PDEATHSIG when the *thread* that forked
    /// the child exits, so spawning from a short-lived thread would kill the server
    /// early. When the whole test process dies (even SIGKILL), the postmaster gets
    /// SIGQUIT, PostgreSQL's "immediate shutdown", which also ends its backends.
    fn spawn(
        bin_dir: &Path,
        base_dir: &Path,
        data_dir: &Path,
        port: u16,
        log: File,
        server_user: Option<OsUser>,
    ) -> Result<Postmaster, String> {
        let stdout = log
            .try_clone()
            .map_err(|e| format!("duplicating log handle: {e}"))?;
        let mut command = server_command(&bin_dir.join("postgres"), base_dir, server_user);
        command
            .arg("-D")
            .arg(data_dir)
            .args(["-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log);
        let parent_pid = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (no allocation, no locks). std applies the
        // uid/gid change before running it, so the death signal is not reset by it.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // If the test process died between fork and prctl, nobody will signal us.
                if libc::getppid() as u32 != parent_pid {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            })
        };

        let exit = Arc::new(ExitSignal::default());
        let exit_for_guardian = Arc::clone(&exit);
        let (pid_tx, pid_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("test-pg-postmaster".into())
            .spawn(move || match command.spawn() {
                Err(e) => {
                    let _ = pid_tx.send(Err(format!("spawning postgres: {e}")));
                }
                Ok(mut child) => {
                    let _ = pid_tx.send(Ok(child.id()));
                    // Blocks for as long as the postmaster runs (normally until the
                    // process exits). Once it has been reaped this thread may end.
                    let status = child.wait();
                    let mut slot = exit_for_guardian.lock();
                    *slot = Some(status.unwrap_or_else(|_| {
                        // wait() only fails for an invalid child; report "exited".
                        std::os::unix::process::ExitStatusExt::from_raw(0)
                    }));
                    exit_for_guardian.changed.notify_all();
                }
            })
            .map_err(|e| format!("spawning the postmaster thread: {e}"))?;
        let pid = pid_rx
            .recv()
            .map_err(|_| "the postmaster thread ended without reporting".to_owned())??;
        Ok(Postmaster {
            pid: libc::pid_t::try_from(pid).map_err(|_| format!("pid {pid} out of range"))?,
            exit,
        })
    }

    /// The exit status, if the postmaster has exited.
    fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.lock()
    }

    /// Waits up to `timeout` for the postmaster to exit; returns its status if it has.
    fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let guard = self.exit.lock();
        let (guard, _) = self
            .exit
            .changed
            .wait_timeout_while(guard, timeout, |status| status.is_none())
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *guard
    }

    /// Immediate shutdown (SIGQUIT) and wait for the postmaster to exit. Never panics.
    fn stop(&self) {
        if self.exit_status().is_none() {
            // SAFETY: plain kill(2). The pid cannot have been reused: the guardian
            // thread has not reaped it yet (exit_status is None).
            unsafe { libc::kill(self.pid, libc::SIGQUIT) };
        }
        if self.wait_exit(SHUTDOWN_TIMEOUT).is_none() {
            eprintln!(
                "test-pg: postmaster {} did not exit within {SHUTDOWN_TIMEOUT:?}",
                self.pid
            );
        }
    }
}

/// Registered with `atexit` once the cluster is up: stop it and delete its directory.
extern "C" fn stop_cluster_at_exit() {
    if let Some(Ok(cluster)) = CLUSTER.get() {
        cluster.postmaster.stop();
        if std::env::var_os("EPHEMERA_KEEP_TEST_PG").is_some() {
            eprintln!(
                "test-pg: keeping {} (log: {})",
                cluster.base_dir.display(),
                cluster.log_path.display()
            );
        } else {
            let _ = fs::remove_dir_all(&cluster.base_dir);
        }
    }
}

// ----- helpers -------------------------------------------------------------------

/// The OS account the server runs as, when different from ours.
#[derive(Clone, Copy, Debug)]
struct OsUser {
    uid: u32,
    gid: u32,
}

/// `None` when we are not root (run as ourselves), else the `postgres` account.
fn server_os_user() -> Result<Option<OsUser>, String> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    lookup_user("postgres").map(Some).ok_or_else(|| {
        "running as root, but there is no `postgres` system user to run PostgreSQL as \
         (PostgreSQL refuses to run as root)"
            .to_owned()
    })
}

/// uid/gid of the account `name`, via the thread-safe getpwnam_r.
fn lookup_user(name: &str) -> Option<OsUser> {
    let name = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: `passwd` is plain old data; getpwnam_r fills it in, pointing into `buf`,
    // which outlives every use of `entry`.
    unsafe {
        let mut passwd: libc::passwd = std::mem::zeroed();
        let mut entry: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            name.as_ptr(),
            &mut passwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut entry,
        );
        if rc != 0 || entry.is_null() {
            return None;
        }
        Some(OsUser {
            uid: (*entry).pw_uid,
            gid: (*entry).pw_gid,
        })
    }
}

/// A command for a server-side binary: runs as `user` (if given) in `cwd`, without
/// PG* environment variables from the developer's shell.
fn server_command(program: &Path, cwd: &Path, user: Option<OsUser>) -> Command {
    let mut command = clean_env(Command::new(program));
    command.current_dir(cwd);
    if let Some(user) = user {
        // std also drops supplementary groups when switching away from root.
        command.uid(user.uid).gid(user.gid);
    }
    command
}

/// Removes PG* variables (PGHOST, PGSSLMODE, ...) that could change what a tool does.
fn clean_env(mut command: Command) -> Command {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            command.env_remove(key);
        }
    }
    command
}

/// `$EPHEMERA_PG_BINDIR`, else `pg_config --bindir` if it has initdb, else the default.
fn find_bin_dir() -> Result<PathBuf, String> {
    let has_initdb = |dir: &Path| dir.join("initdb").is_file();
    if let Some(dir) = std::env::var_os("EPHEMERA_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        return if has_initdb(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "EPHEMERA_PG_BINDIR={} has no initdb",
                dir.display()
            ))
        };
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if output.status.success() && has_initdb(&dir) {
            return Ok(dir);
        }
    }
    let dir = PathBuf::from(FALLBACK_BIN_DIR);
    if has_initdb(&dir) {
        Ok(dir)
    } else {
        Err(format!(
            "no PostgreSQL server binaries found (tried $EPHEMERA_PG_BINDIR, pg_config --bindir, {FALLBACK_BIN_DIR})"
        ))
    }
}

/// Where to create the cluster directory: the temp dir, unless the server user could
/// not reach it or the socket path would be too long (max 107 bytes), then `/tmp`.
fn parent_dir() -> PathBuf {
    let tmp = std::env::temp_dir();
    let world_searchable = fs::metadata(&tmp)
        .map(|m| m.permissions().mode() & 0o001 != 0)
        .unwrap_or(false);
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
    // SAFETY: signal 0 only checks whether the process exists.
    let exists = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
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

/// A currently free TCP port on 127.0.0.1 (free when we looked, anyway).
fn free_port() -> Result<u16, String> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| format!("finding a free port: {e}"))
}

/// A path as a postgresql.conf string literal.
fn conf_quote(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', "''"))
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
