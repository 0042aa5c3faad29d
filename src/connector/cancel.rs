//! An application's `CancelRequest` (psql's Ctrl-C, a driver's statement
//! timeout), sent to the connector's port on a connection of its own, is
//! passed on to Ephemera over a new TLS connection. Ephemera finds the
//! session by the key alone (the key it issued in `BackendKeyData`, which
//! the connector relayed untouched), so the SVID is presented when there is
//! one but is not what makes the cancel work.

use tokio::io::AsyncWriteExt;

use super::dial::Dialer;
use super::svid::ClientSvid;
use crate::session::protocol::{encode_cancel, CancelKey};

/// Forward `key` to Ephemera; errors are logged, as PostgreSQL tells a
/// cancelling client nothing either.
pub async fn forward(dialer: &Dialer, svid: Option<&ClientSvid>, key: CancelKey) -> bool {
    let mut tls = match dialer.dial(svid).await {
        Ok(tls) => tls,
        Err(error) => {
            tracing::warn!(%error, "cannot forward a cancel request");
            return false;
        }
    };
    if let Err(error) = tls.write_all(&encode_cancel(key)).await {
        tracing::warn!(%error, "cannot forward a cancel request");
        return false;
    }
    // End TLS properly (close_notify) and wait for Ephemera to close.
    let _ = tls.flush().await;
    let _ = tls.shutdown().await;
    true
}
