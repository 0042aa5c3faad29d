//! The TLS material the listeners use: Ephemera's own certificate and the
//! SPIFFE trust bundle. SPIRE rotates both (server SVIDs live about an
//! hour, CAs a day), so they are swapped in place: from files on reload
//! (SIGHUP), or from the SPIFFE Workload API on every update it streams
//! (`workload.rs`). Connections accepted afterwards use the new material,
//! established ones keep theirs.

pub mod server_config;
pub mod upstream;
pub mod workload;

use std::sync::{Arc, RwLock};

use tokio_rustls::TlsAcceptor;

use crate::identity::SvidVerifier;

/// One consistent set: the acceptors were built from the same certificate,
/// key and bundle as the verifier.
pub struct TlsMaterial {
    /// The PostgreSQL listener's TLS.
    pub acceptor: TlsAcceptor,
    /// The admin API's TLS (client certificates checked during the
    /// handshake), if `[admin]` is configured.
    pub admin_acceptor: Option<TlsAcceptor>,
    /// The X.509-SVID rules, applied after each handshake.
    pub svid_verifier: Arc<SvidVerifier>,
}

/// The material in force now; [`SharedTls::replace`] swaps it.
#[derive(Clone)]
pub struct SharedTls(Arc<RwLock<Arc<TlsMaterial>>>);

impl SharedTls {
    pub fn new(material: TlsMaterial) -> Self {
        SharedTls(Arc::new(RwLock::new(Arc::new(material))))
    }

    /// The material in force now (cheap: an `Arc` clone).
    pub fn current(&self) -> Arc<TlsMaterial> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Use `material` for connections accepted from now on. The admin
    /// listener cannot be added or removed without a restart, so if the new
    /// configuration has no `[admin]`, the admin API keeps its old TLS.
    pub fn replace(&self, mut material: TlsMaterial) {
        let mut slot = self.0.write().unwrap_or_else(|p| p.into_inner());
        if material.admin_acceptor.is_none() {
            material.admin_acceptor = slot.admin_acceptor.clone();
        }
        *slot = Arc::new(material);
    }
}
