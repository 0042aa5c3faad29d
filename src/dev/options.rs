//! What `ephemera dev` is asked for, its names, and how it fails: shared by
//! every step of `dev` (the folder's other files look down on this one).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::cluster::ClusterError;

/// The demo database and its table.
pub const DEMO_DATABASE: &str = "app";
pub const DEMO_TABLE: &str = "greetings";
pub(super) const ADMIN_USER: &str = "ephemera_admin";

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

/// Read a file the cluster or the CA wrote.
pub(super) fn read(path: &Path) -> Result<String, ClusterError> {
    std::fs::read_to_string(path).map_err(|source| ClusterError::Io {
        path: path.to_owned(),
        source,
    })
}
