//! A throwaway PostgreSQL cluster for `ephemera dev`, from the PostgreSQL
//! binaries already on the machine.
//!
//! PostgreSQL refuses to run as root; when we are root, `initdb` and
//! `postgres` run as the `postgres` system user, which owns the data
//! directory. The postmaster gets its own process group, so a Ctrl-C in the
//! terminal reaches only `ephemera dev`, which revokes every lease before it
//! stops the cluster.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

/// A running postmaster started by us.
#[derive(Debug)]
pub struct Running {
    child: Child,
    pub port: u16,
}

impl LocalCluster {
    pub fn exists(&self) -> bool {
        self.data_dir.join("PG_VERSION").is_file()
    }

    /// `initdb` with SCRAM everywhere and TLS on (`server_cert`/`server_key`
    /// PEM are copied into the data directory).
    pub fn init(
        &self,
        superuser_password: &str,
        server_cert: &str,
        server_key: &str,
    ) -> Result<(), ClusterError> {
        let parent = self.data_dir.parent().expect("the data dir has a parent");
        fs::create_dir_all(parent).map_err(io(parent))?;
        let pwfile = parent.join(".initdb-pwfile");
        write_private(&pwfile, superuser_password.as_bytes())?;
        give_to(self.user, &pwfile)?;
        fs::create_dir_all(&self.data_dir).map_err(io(&self.data_dir))?;
        fs::set_permissions(&self.data_dir, fs::Permissions::from_mode(0o700))
            .map_err(io(&self.data_dir))?;
        give_to(self.user, &self.data_dir)?;
        let output = command(&self.bin_dir.join("initdb"), self.user)
            .arg("-D")
            .arg(&self.data_dir)
            .args([
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--no-locale",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .map_err(io(&self.bin_dir.join("initdb")));
        let _ = fs::remove_file(&pwfile);
        let output = output?;
        if !output.status.success() {
            return Err(ClusterError::Command {
                what: "initdb".into(),
                detail: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        let cert = self.data_dir.join("server.crt");
        let key = self.data_dir.join("server.key");
        fs::write(&cert, server_cert).map_err(io(&cert))?;
        write_private(&key, server_key.as_bytes())?;
        give_to(self.user, &cert)?;
        give_to(self.user, &key)?;
        let hba = self.data_dir.join("pg_hba.conf");
        fs::write(
            &hba,
            "# ephemera dev: passwords (SCRAM) everywhere, never trust\n\
             local all all scram-sha-256\n\
             host all all 127.0.0.1/32 scram-sha-256\n\
             host all all ::1/128 scram-sha-256\n",
        )
        .map_err(io(&hba))?;
        let conf = self.data_dir.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).map_err(io(&conf))?;
        text.push_str(&format!(
            "\n# ephemera dev\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
             password_encryption = 'scram-sha-256'\nmax_connections = 200\n",
            self.data_dir.display()
        ));
        fs::write(&conf, text).map_err(io(&conf))?;
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
            let _ = command(&self.bin_dir.join("pg_ctl"), self.user)
                .arg("stop")
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-m", "fast", "-w"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Start the postmaster on `port`, in its own process group.
    pub fn start(&self, port: u16) -> Result<Running, ClusterError> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(io(&self.log_path))?;
        let child = command(&self.bin_dir.join("postgres"), self.user)
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(io(&self.bin_dir.join("postgres")))?;
        Ok(Running { child, port })
    }

    /// Wait until the server accepts connections.
    pub fn wait_ready(&self, running: &mut Running, timeout: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = running.child.try_wait() {
                return Err(ClusterError::Command {
                    what: "postgres".into(),
                    detail: format!("exited with {status}; see {}", self.log_path.display()),
                });
            }
            let ready = command(&self.bin_dir.join("pg_isready"), self.user)
                .args(["-q", "-h", "127.0.0.1", "-p", &running.port.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::NotReady(timeout, self.log_path.clone()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Running {
    /// Fast shutdown (SIGINT): roll back, disconnect, stop. Escalates to an
    /// immediate shutdown if it takes longer than `timeout`.
    pub fn stop(mut self, timeout: Duration) {
        // Our own child, not reaped before `wait` below: the pid is its.
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGINT);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = kill(pid, Signal::SIGQUIT);
        let _ = self.child.wait();
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
