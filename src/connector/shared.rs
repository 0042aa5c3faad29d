//! What the connector presents to Ephemera ([`Credential`]) and the state
//! every application connection shares ([`Shared`]).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::dial::Dialer;
use super::metrics::ConnectorMetrics;
use super::svid::{ClientSvid, SvidSource};

/// What the connector presents to Ephemera.
#[derive(Clone)]
pub enum Credential {
    /// An X.509-SVID, asked for once per connection.
    Svid(Arc<dyn SvidSource>),
    /// An identity token, read from this file for every connection.
    TokenFile(PathBuf),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Svid(_) => f.write_str("Credential::Svid"),
            Credential::TokenFile(path) => {
                f.debug_tuple("Credential::TokenFile").field(path).finish()
            }
        }
    }
}

/// What every connection shares.
pub struct Shared {
    pub(super) dialer: Dialer,
    pub(super) credential: Credential,
    pub(super) metrics: ConnectorMetrics,
    /// Cancelled when the grace period is over: open sessions end.
    pub(super) stop: CancellationToken,
    /// The expiry of the last SVID handed out, for the metrics.
    last_not_after: Mutex<Option<OffsetDateTime>>,
}

impl Shared {
    pub(super) fn new(dialer: Dialer, credential: Credential) -> Shared {
        Shared {
            dialer,
            credential,
            metrics: ConnectorMetrics::new(),
            stop: CancellationToken::new(),
            last_not_after: Mutex::new(None),
        }
    }

    pub(super) fn saw_svid(&self, svid: &ClientSvid) {
        *self
            .last_not_after
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(svid.not_after);
        self.update_expiry_gauge();
    }

    pub(super) fn update_expiry_gauge(&self) {
        if let Credential::Svid(source) = &self.credential {
            if let Ok(svid) = source.current() {
                *self
                    .last_not_after
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(svid.not_after);
            }
        }
        let last = *self
            .last_not_after
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(not_after) = last {
            let left = (not_after - OffsetDateTime::now_utc()).as_seconds_f64();
            self.metrics.svid_expiry.set(left);
        }
    }
}
