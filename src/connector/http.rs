//! `--http`: `/healthz` (the process runs), `/readyz` (a valid SVID, or a
//! readable token file, and Ephemera reachable: TCP and TLS within
//! [`READY_TIMEOUT`]) and `/metrics` (Prometheus text).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::io::AsyncWriteExt;

use super::shared::{Credential, Shared};
use super::token;

/// How long `/readyz` waits for Ephemera's TLS handshake.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

async fn readyz(State(shared): State<Arc<Shared>>) -> (StatusCode, String) {
    match ready(&shared).await {
        Ok(what) => (StatusCode::OK, format!("ready: {what}\n")),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

/// What is ready, or why not.
async fn ready(shared: &Shared) -> Result<String, String> {
    let (svid, what) = match &shared.credential {
        Credential::Svid(source) => {
            let svid = source.current().map_err(|e| e.to_string())?;
            shared.saw_svid(&svid);
            let what = format!(
                "X.509-SVID {} valid until {}",
                svid.spiffe_id.as_str(),
                super::svid::rfc3339(svid.not_after)
            );
            (Some(svid), what)
        }
        Credential::TokenFile(path) => {
            token::read(path).map_err(|e| e.to_string())?;
            (None, format!("token file {}", path.display()))
        }
    };
    let mut tls = shared
        .dialer
        .with_timeout(READY_TIMEOUT)
        .dial(svid.as_ref())
        .await
        .map_err(|e| e.to_string())?;
    let _ = tls.shutdown().await;
    Ok(format!(
        "{what}; Ephemera at {} reachable",
        shared.dialer.to()
    ))
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    shared.update_expiry_gauge();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared.metrics.render(),
    )
}
