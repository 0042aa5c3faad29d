//! The cancel map: which upstream backend a client's cancel key stands for.
//!
//! Each relayed session gets a cancel key of Ephemera's own in
//! `BackendKeyData`; the upstream's real key never leaves the proxy. A
//! `CancelRequest` (which libpq sends on a fresh, often plaintext,
//! certificate-less connection) is looked up here by key alone and forwarded
//! with the upstream's key. A wrong key does nothing and the client is told
//! nothing, exactly as PostgreSQL behaves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::Rng;
use subtle::ConstantTimeEq;

use crate::protocol::CancelKey;

#[derive(Debug, Default)]
pub struct CancelMap {
    /// Keyed by the pid we issued; the value holds our secret and the
    /// upstream's key.
    entries: Mutex<HashMap<i32, (i32, CancelKey)>>,
}

impl CancelMap {
    pub fn new() -> Arc<Self> {
        Arc::new(CancelMap::default())
    }

    /// Issue a fresh client key standing for `upstream`. The key is valid
    /// until the returned registration is dropped.
    pub fn register(self: &Arc<Self>, upstream: CancelKey) -> CancelRegistration {
        let mut rng = rand::rngs::OsRng;
        let mut entries = self.entries.lock().expect("cancel map lock poisoned");
        let key = loop {
            // Positive pids, like PostgreSQL's; the secret is the real guard.
            let pid = rng.gen_range(1..=i32::MAX);
            if !entries.contains_key(&pid) {
                break CancelKey {
                    pid,
                    secret: rng.gen(),
                };
            }
        };
        entries.insert(key.pid, (key.secret, upstream));
        CancelRegistration {
            map: self.clone(),
            key,
        }
    }

    /// The upstream key for a client key, if the client's secret is right.
    pub fn lookup(&self, key: CancelKey) -> Option<CancelKey> {
        let entries = self.entries.lock().expect("cancel map lock poisoned");
        let (secret, upstream) = entries.get(&key.pid)?;
        bool::from(secret.to_be_bytes().ct_eq(&key.secret.to_be_bytes())).then_some(*upstream)
    }

    pub fn len(&self) -> usize {
        self.entries.lock().expect("cancel map lock poisoned").len()
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
        if let Ok(mut entries) = self.map.entries.lock() {
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
        assert_ne!(key, upstream);
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
}
