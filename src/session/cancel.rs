//! The cancel map: which upstream backend a client's cancel key stands for.
//!
//! Each relayed session gets, in `BackendKeyData`, the upstream backend's
//! real process id (so `pg_backend_pid()`, `pg_stat_activity.pid` and a
//! notification's sender agree with what the driver was told) and a secret
//! of Ephemera's own: the upstream's secret never leaves the proxy. A
//! `CancelRequest` (which libpq sends on a fresh, often plaintext,
//! certificate-less connection) is looked up here by key alone and forwarded
//! with the upstream's key. A wrong key does nothing and the client is told
//! nothing, exactly as PostgreSQL behaves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::Rng;
use subtle::ConstantTimeEq;

use crate::session::protocol::CancelKey;

#[derive(Debug, Default)]
pub struct CancelMap {
    /// Keyed by the upstream backend's pid; the value holds our secret and
    /// the upstream's key.
    entries: Mutex<HashMap<i32, (i32, CancelKey)>>,
}

impl CancelMap {
    pub fn new() -> Arc<Self> {
        Arc::new(CancelMap::default())
    }

    /// Issue a client key standing for `upstream`: its pid, a fresh secret.
    /// The key is valid until the returned registration is dropped.
    pub fn register(self: &Arc<Self>, upstream: CancelKey) -> CancelRegistration {
        let key = CancelKey {
            pid: upstream.pid,
            secret: rand::rngs::OsRng.gen(),
        };
        // A pid is only reused after its backend exited, so an entry already
        // there belongs to a session whose end we have not yet noticed: the
        // newer session takes the pid over.
        self.entries().insert(key.pid, (key.secret, upstream));
        CancelRegistration {
            map: self.clone(),
            key,
        }
    }

    /// The upstream key for a client key, if the client's secret is right.
    pub fn lookup(&self, key: CancelKey) -> Option<CancelKey> {
        let entries = self.entries();
        let (secret, upstream) = entries.get(&key.pid)?;
        bool::from(secret.to_be_bytes().ct_eq(&key.secret.to_be_bytes())).then_some(*upstream)
    }

    pub fn len(&self) -> usize {
        self.entries().len()
    }

    /// The map stays consistent under any panic (each change is one
    /// `insert` or `remove`), so a poisoned lock is still usable.
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<i32, (i32, CancelKey)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A live entry in the cancel map; removed when dropped.
#[derive(Debug)]
pub struct CancelRegistration {
    map: Arc<CancelMap>,
    key: CancelKey,
}

impl CancelRegistration {
    /// The key to give the client in `BackendKeyData`.
    pub fn client_key(&self) -> CancelKey {
        self.key
    }
}

impl Drop for CancelRegistration {
    fn drop(&mut self) {
        let mut entries = self.map.entries();
        // Only our own entry: a newer session may have taken the pid over.
        if entries
            .get(&self.key.pid)
            .is_some_and(|(secret, _)| *secret == self.key.secret)
        {
            entries.remove(&self.key.pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_right_secret_finds_the_upstream_key() {
        let map = CancelMap::new();
        let upstream = CancelKey {
            pid: 1234,
            secret: 99,
        };
        let registration = map.register(upstream);
        let key = registration.client_key();
        assert_eq!(key.pid, upstream.pid, "the client is told the real pid");
        assert_ne!(key.secret, upstream.secret, "but never the real secret");
        assert_eq!(map.lookup(key), Some(upstream));
        assert_eq!(
            map.lookup(CancelKey {
                pid: key.pid,
                secret: key.secret.wrapping_add(1)
            }),
            None
        );
        drop(registration);
        assert_eq!(map.lookup(key), None);
        assert!(map.is_empty());
    }

    #[test]
    fn an_old_session_ending_late_leaves_the_pids_new_owner_alone() {
        let map = CancelMap::new();
        let old = map.register(CancelKey { pid: 7, secret: 1 });
        let new = map.register(CancelKey { pid: 7, secret: 2 });
        drop(old);
        assert_eq!(
            map.lookup(new.client_key()),
            Some(CancelKey { pid: 7, secret: 2 })
        );
    }
}
