//! Where applications reach the connector: loopback TCP only, and a Unix
//! socket `.s.PGSQL.<port>` whose peers are checked by uid (`SO_PEERCRED`).
//!
//! Anything that can open the port acts as this workload, so TCP is never
//! bound to a non-loopback address. On the Unix socket:
//!
//! * without `--allow-uid`, the socket is mode 0600 and only the
//!   connector's own uid may connect;
//! * with `--allow-uid`, the socket is mode 0666 and exactly the listed
//!   uids may connect (the connector's own uid only if it is listed): the
//!   kernel-reported peer uid is the gate, not the file mode.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, UnixListener, UnixStream};

/// Why the connector cannot listen where it was asked to.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("--listen {0}: not a loopback address. The connector presents this workload's identity for anyone who can reach its port, so it listens on 127.0.0.1/::1 (or a Unix socket) only")]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: String,
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
}

/// Bind `--listen`, refusing anything but loopback.
pub async fn tcp(address: SocketAddr) -> Result<TcpListener, ListenError> {
    if !address.ip().is_loopback() {
        return Err(ListenError::NotLoopback(address));
    }
    TcpListener::bind(address)
        .await
        .map_err(|source| ListenError::Bind {
            address: address.to_string(),
            source,
        })
}

/// The socket's path for `port`, as libpq looks for it with `host=DIR`.
pub fn socket_path(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!(".s.PGSQL.{port}"))
}

/// Bind the Unix socket (replacing a stale socket left by a previous run)
/// and set its mode: 0600, or 0666 when `--allow-uid` decides who may connect.
pub fn unix(path: &Path, open_to_listed_uids: bool) -> Result<UnixListener, ListenError> {
    let bind_error = |source| ListenError::Bind {
        address: path.display().to_string(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(ListenError::NotASocket {
                    path: path.to_owned(),
                });
            }
            std::fs::remove_file(path).map_err(bind_error)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_error(e)),
    }
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    let mode = if open_to_listed_uids { 0o666 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(bind_error)?;
    Ok(listener)
}

/// Who may connect on the Unix socket.
#[derive(Debug, Clone)]
pub struct UidGate {
    allowed: Vec<u32>,
}

impl UidGate {
    /// `allow_uid` empty: only our own uid.
    pub fn new(allow_uid: &[u32]) -> UidGate {
        let allowed = if allow_uid.is_empty() {
            vec![nix::unistd::Uid::effective().as_raw()]
        } else {
            allow_uid.to_vec()
        };
        UidGate { allowed }
    }

    /// `Ok(uid)` if the peer may connect, `Err(Some(uid))` if not,
    /// `Err(None)` if the kernel did not say who it is.
    pub fn check(&self, stream: &UnixStream) -> Result<u32, Option<u32>> {
        let uid = stream.peer_cred().map_err(|_| None)?.uid();
        if self.allowed.contains(&uid) {
            Ok(uid)
        } else {
            Err(Some(uid))
        }
    }
}
