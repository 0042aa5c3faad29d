//! A throwaway PostgreSQL cluster for `ephemera dev` (and the integration
//! tests' harness), from the PostgreSQL binaries already on the machine:
//! `initdb` with SCRAM-SHA-256 everywhere and TLS on, a postmaster on
//! 127.0.0.1, readiness and shutdown.
//!
//! PostgreSQL refuses to run as root; when we are root, `initdb` and
//! `postgres` run as the `postgres` system user, which owns the data
//! directory. For `ephemera dev` the postmaster gets its own process group,
//! so a Ctrl-C in the terminal reaches only `ephemera dev`, which revokes
//! every lease before it stops the cluster ([`StartOptions`]).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{Pid, Uid, User};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("no PostgreSQL server binaries found (looked at `pg_config --bindir` and /usr/lib/postgresql/*/bin); install them, e.g. `apt-get install postgresql`, or use --upstream URL")]
    NoBinaries,
    #[error("running as root, but there is no `postgres` system user to run PostgreSQL as; create it (installing the postgresql package does) or run as another user")]
    NoServerUser,
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("PostgreSQL did not become ready within {0:?}; see {1}")]
    NotReady(Duration, PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The OS account PostgreSQL runs as (None: the current user).
#[derive(Debug, Clone, Copy)]
pub struct ServerUser {
    pub uid: u32,
    pub gid: u32,
}

/// `postgres` when we are root, else nobody in particular (ourselves).
///
/// `getpwnam_r` through nix, not `getpwnam`: the latter returns static
/// storage that another thread of the runtime could overwrite under us.
pub fn server_user() -> Result<Option<ServerUser>, ClusterError> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    let entry = User::from_name("postgres").map_err(|errno| ClusterError::Command {
        what: "looking up the `postgres` system user".into(),
        detail: errno.desc().into(),
    })?;
    let entry = entry.ok_or(ClusterError::NoServerUser)?;
    Ok(Some(ServerUser {
        uid: entry.uid.as_raw(),
        gid: entry.gid.as_raw(),
    }))
}

/// The directory with `initdb` and `postgres`: `pg_config --bindir` if it
/// has them, else the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bin_dir() -> Result<PathBuf, ClusterError> {
    let usable = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if output.status.success() && usable(&dir) {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            usable(&bin).then_some((version, bin))
        })
        .collect();
    candidates.sort();
    candidates
        .pop()
        .map(|(_, dir)| dir)
        .ok_or(ClusterError::NoBinaries)
}

/// Make `path` belong to the server user (no-op when not root).
pub fn give_to(user: Option<ServerUser>, path: &Path) -> Result<(), ClusterError> {
    if let Some(user) = user {
        std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid)).map_err(io(path))?;
    }
    Ok(())
}

fn command(bin: &Path, user: Option<ServerUser>) -> Command {
    let mut command = Command::new(bin);
    command
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("LC_ALL", "C");
    if let Some(user) = user {
        command.uid(user.uid).gid(user.gid);
    }
    command
}

/// A cluster's files: data directory and where its server log goes.
#[derive(Debug, Clone)]
pub struct LocalCluster {
    pub bin_dir: PathBuf,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    pub user: Option<ServerUser>,
}

/// How [`LocalCluster::init_with`] sets up a new cluster. Whatever the
/// options: SCRAM-SHA-256 for every connection (no `trust`), TLS on with
/// the given certificate, TCP on 127.0.0.1 only, 200 connections.
#[derive(Debug, Clone, Copy, Default)]
pub struct InitOptions<'a> {
    /// The password of the bootstrap superuser `postgres`.
    pub superuser_password: &'a str,
    /// The server's certificate (chain) and key, PEM; copied into the data
    /// directory.
    pub server_cert: &'a str,
    pub server_key: &'a str,
    /// Where the Unix socket goes (None: the data directory).
    pub socket_dir: Option<&'a Path>,
    /// `initdb --no-sync`: for clusters that never outlive their use.
    pub no_sync: bool,
    /// More `postgresql.conf` lines, appended after ours (later lines win).
    pub extra_conf: &'a str,
}

/// How [`LocalCluster::start_with`] starts the postmaster.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartOptions {
    /// In its own process group, so that a Ctrl-C in the terminal reaches
    /// only us (and we decide when the cluster stops).
    pub own_process_group: bool,
    /// Adjusts the postmaster's command before it is spawned. The test
    /// harness uses it to have the kernel stop the postmaster when the test
    /// process dies (`PR_SET_PDEATHSIG` in `pre_exec`, which needs `unsafe`:
    /// it lives in the harness, not here).
    pub before_spawn: Option<fn(&mut Command)>,
}

/// A running postmaster started by us. A thread of ours waits for it, so
/// its exit is seen (and it is reaped) as soon as it happens.
#[derive(Debug)]
pub struct Running {
    pid: i32,
    pub port: u16,
    exit: Arc<ExitSignal>,
}

/// Set once, by the thread waiting for the postmaster, when it has exited.
#[derive(Debug, Default)]
struct ExitSignal {
    status: Mutex<Option<ExitStatus>>,
    changed: Condvar,
}

impl ExitSignal {
    fn lock(&self) -> MutexGuard<'_, Option<ExitStatus>> {
        // Never panic here (this may run in an atexit hook): ignore poisoning.
        self.status
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl LocalCluster {
    pub fn exists(&self) -> bool {
        self.data_dir.join("PG_VERSION").is_file()
    }

    /// A command for a server binary: as the server user, with a clean
    /// environment, in the data directory's parent (which the server user
    /// can reach, unlike perhaps our own working directory).
    fn command(&self, program: &str) -> Command {
        let mut command = command(&self.bin_dir.join(program), self.user);
        if let Some(parent) = self.data_dir.parent() {
            command.current_dir(parent);
        }
        command
    }

    /// `initdb` with SCRAM everywhere and TLS on (`server_cert`/`server_key`
    /// PEM are copied into the data directory).
    pub fn init(
        &self,
        superuser_password: &str,
        server_cert: &str,
        server_key: &str,
    ) -> Result<(), ClusterError> {
        self.init_with(&InitOptions {
            superuser_password,
            server_cert,
            server_key,
            ..InitOptions::default()
        })
    }

    /// `initdb` and the configuration described by `options`.
    pub fn init_with(&self, options: &InitOptions<'_>) -> Result<(), ClusterError> {
        let parent = self.data_dir.parent().expect("the data dir has a parent");
        fs::create_dir_all(parent).map_err(io(parent))?;
        fs::create_dir_all(&self.data_dir).map_err(io(&self.data_dir))?;
        fs::set_permissions(&self.data_dir, fs::Permissions::from_mode(0o700))
            .map_err(io(&self.data_dir))?;
        give_to(self.user, &self.data_dir)?;
        self.initdb(parent, options)?;
        let cert = self.data_dir.join("server.crt");
        let key = self.data_dir.join("server.key");
        fs::write(&cert, options.server_cert).map_err(io(&cert))?;
        write_private(&key, options.server_key.as_bytes())?;
        give_to(self.user, &cert)?;
        give_to(self.user, &key)?;
        // Writing over the files initdb made keeps their owner.
        let hba = self.data_dir.join("pg_hba.conf");
        fs::write(
            &hba,
            "# Written by Ephemera: passwords (SCRAM) everywhere, never trust\n\
             local all all scram-sha-256\n\
             host all all 127.0.0.1/32 scram-sha-256\n\
             host all all ::1/128 scram-sha-256\n",
        )
        .map_err(io(&hba))?;
        let conf = self.data_dir.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).map_err(io(&conf))?;
        text.push_str(&format!(
            "\n# Ephemera\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = {}\n\
             ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
             password_encryption = 'scram-sha-256'\nmax_connections = 200\n",
            conf_quote(options.socket_dir.unwrap_or(&self.data_dir))
        ));
        if !options.extra_conf.is_empty() {
            text.push_str(options.extra_conf);
            if !text.ends_with('\n') {
                text.push('\n');
            }
        }
        fs::write(&conf, text).map_err(io(&conf))?;
        Ok(())
    }

    /// `initdb` itself, the superuser password passed in a file in `parent`
    /// that is removed again.
    fn initdb(&self, parent: &Path, options: &InitOptions<'_>) -> Result<(), ClusterError> {
        let pwfile = parent.join(".initdb-pwfile");
        write_private(&pwfile, options.superuser_password.as_bytes())?;
        give_to(self.user, &pwfile)?;
        let mut initdb = self.command("initdb");
        initdb
            .arg("-D")
            .arg(&self.data_dir)
            .args([
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--no-locale",
            ])
            .arg(format!("--pwfile={}", pwfile.display()));
        if options.no_sync {
            initdb.arg("--no-sync");
        }
        let output = initdb.output().map_err(io(&self.bin_dir.join("initdb")));
        let _ = fs::remove_file(&pwfile);
        let output = output?;
        if !output.status.success() {
            return Err(ClusterError::Command {
                what: "initdb".into(),
                detail: format!(
                    "{}\n{}{}",
                    output.status,
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ),
            });
        }
        Ok(())
    }

    /// Stop a postmaster left running by an earlier `ephemera dev` that
    /// did not get to stop it (killed), so we can start cleanly.
    pub fn stop_leftover(&self) {
        let pid_file = self.data_dir.join("postmaster.pid");
        let Some(pid) = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
        else {
            return;
        };
        // No signal: only checks that the process exists.
        if kill(Pid::from_raw(pid), None).is_ok() {
            let _ = self
                .command("pg_ctl")
                .arg("stop")
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-m", "fast", "-w"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Start the postmaster on `port`, in its own process group (what
    /// `ephemera dev` wants).
    pub fn start(&self, port: u16) -> Result<Running, ClusterError> {
        self.start_with(
            port,
            StartOptions {
                own_process_group: true,
                before_spawn: None,
            },
        )
    }

    /// Start the postmaster on `port`; its stderr goes to the log.
    ///
    /// It is spawned from a thread that then waits for it: Linux delivers
    /// the parent-death signal when the *thread* that forked the child ends,
    /// so that thread has to live as long as the postmaster.
    pub fn start_with(&self, port: u16, options: StartOptions) -> Result<Running, ClusterError> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(io(&self.log_path))?;
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if options.own_process_group {
            command.process_group(0);
        }
        if let Some(adjust) = options.before_spawn {
            adjust(&mut command);
        }
        let program = self.bin_dir.join("postgres");
        let exit = Arc::new(ExitSignal::default());
        let exit_for_waiter = Arc::clone(&exit);
        let (pid_tx, pid_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("postmaster".into())
            .spawn(move || match command.spawn() {
                Err(e) => {
                    let _ = pid_tx.send(Err(e));
                }
                Ok(mut child) => {
                    let _ = pid_tx.send(Ok(child.id()));
                    // wait() only fails for a child that is not ours; say "exited".
                    let status = child
                        .wait()
                        .unwrap_or_else(|_| std::os::unix::process::ExitStatusExt::from_raw(0));
                    *exit_for_waiter.lock() = Some(status);
                    exit_for_waiter.changed.notify_all();
                }
            })
            .map_err(io(&program))?;
        let pid = pid_rx
            .recv()
            .map_err(|_| ClusterError::Command {
                what: "postgres".into(),
                detail: "the thread starting it ended without a word".into(),
            })?
            .map_err(io(&program))?;
        Ok(Running {
            pid: i32::try_from(pid).expect("pids fit in pid_t"),
            port,
            exit,
        })
    }

    /// Wait until the server accepts connections (or has exited, or
    /// `timeout` has passed).
    pub fn wait_ready(&self, running: &Running, timeout: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + timeout;
        let port = running.port.to_string();
        loop {
            if let Some(status) = running.exit_status() {
                return Err(ClusterError::Command {
                    what: "postgres".into(),
                    detail: format!("exited with {status}; see {}", self.log_path.display()),
                });
            }
            // Exit codes: 0 accepting, 1 rejecting (still starting), 2 no response.
            let ready = self
                .command("pg_isready")
                .args(["-q", "-h", "127.0.0.1", "-p", &port])
                .args(["-d", "postgres", "-t", "2"])
                .stdin(Stdio::null())
                .status()
                .map_err(io(&self.bin_dir.join("pg_isready")))?
                .success();
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::NotReady(timeout, self.log_path.clone()));
            }
            // The poll interval; returns at once if the postmaster exits.
            running.wait_exit(Duration::from_millis(25));
        }
    }
}

impl Running {
    /// The postmaster's process id.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// How the postmaster exited, if it has.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.lock()
    }

    /// Wait up to `timeout` for the postmaster to exit; its status if it has.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let guard = self.exit.lock();
        let (guard, _) = self
            .exit
            .changed
            .wait_timeout_while(guard, timeout, |status| status.is_none())
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *guard
    }

    /// Send `signal` unless the postmaster has exited (then its pid may
    /// already belong to another process).
    fn signal(&self, signal: Signal) {
        if self.exit_status().is_none() {
            // Our own child, not yet reaped: the pid is still its.
            let _ = kill(Pid::from_raw(self.pid), signal);
        }
    }

    /// Fast shutdown (SIGINT): roll back, disconnect, stop. Escalates to an
    /// immediate shutdown if it takes longer than `timeout`.
    pub fn stop(self, timeout: Duration) {
        self.signal(Signal::SIGINT);
        if self.wait_exit(timeout).is_some() {
            return;
        }
        self.signal(Signal::SIGQUIT);
        while self.wait_exit(Duration::from_secs(60)).is_none() {}
    }

    /// Immediate shutdown (SIGQUIT), waiting up to `timeout` for the exit.
    /// Whether the postmaster has exited. Never panics.
    pub fn stop_immediately(&self, timeout: Duration) -> bool {
        self.signal(Signal::SIGQUIT);
        self.wait_exit(timeout).is_some()
    }
}

/// Write a file readable only by its owner.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), ClusterError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    file.write_all(contents).map_err(io(path))
}

/// Can the server user reach `dir` (every ancestor searchable by others)?
/// When it cannot (e.g. under /root), the data directory goes elsewhere.
pub fn reachable_by_others(dir: &Path) -> bool {
    dir.ancestors().skip(1).all(|a| {
        fs::metadata(a)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    })
}

/// A TCP port on 127.0.0.1 that was free when we looked.
pub fn free_port() -> Result<u16, ClusterError> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| ClusterError::Io {
            path: PathBuf::from("127.0.0.1:0"),
            source,
        })?;
    Ok(listener.local_addr().expect("bound").port())
}

/// A path as a postgresql.conf string literal.
fn conf_quote(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', "''"))
}
