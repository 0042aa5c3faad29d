//! The admin API: HTTP/JSON over mutual TLS.
//!
//! The TLS layer requires a client certificate chaining to the SPIFFE trust
//! bundle; the X.509-SVID rules are then checked per connection, and each
//! request is authorised by the caller's SPIFFE ID. With `[[tokens.issuer]]`
//! configured, a client may come without a certificate and send
//! `Authorization: Bearer <token>` with every request instead ([`bearer`]);
//! without either it gets 401.
//!
//! * `/healthz`: any verified SVID or token;
//! * `/v1/creds/{template}`: any SVID or token the policy allows that template;
//! * renewing or revoking a standalone lease: admins, and the identity that
//!   holds it (`ephemera exec` renews and gives back its own lease), by SVID
//!   or token;
//! * everything else: only identities matching `[admin] identities`, by
//!   their SVID; others get 403 (401 for a token) with a JSON error.
//!
//! The JSON shapes are in [`api`]; the OpenAPI document is `docs/admin-api.yaml`.

pub mod api;
mod bearer;
pub mod client;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use ephemera_engine::{LeaseId, LeaseKind};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use rustls::pki_types::UnixTime;
use tokio::net::TcpListener;

use self::api::{
    ApiError, Credentials, Health, LeaseFilter, LeaseList, LeaseView, RenewRequest, RevokeRequest,
    RevokeResponse,
};
use crate::config::Rules;
use crate::config::{AdminSettings, UpstreamSettings};
use crate::identity::SpiffeId;
use crate::leases::{LeaseError, LeaseManager};
use crate::ops::limits::RateLimiter;
use crate::policy::IdPattern;
use crate::tls::SharedTls;

/// How long a client has to finish the TLS handshake.
const TLS_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client has to send a request's headers, and how long an idle
/// keep-alive connection is kept waiting for the next request.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Admin API connections open at once. At the cap, the oldest connection
/// is closed to make room: a flood of idle connections (from anyone who can
/// reach the port) cannot lock out an operator, and uses no more than this
/// many file descriptors.
pub const MAX_CONNECTIONS: usize = 256;

/// The largest request body read (the bodies are a few bytes of JSON; this is
/// axum's default, made explicit so the error can say it). Past it: 413.
const MAX_REQUEST_BODY: usize = 2 * 1024 * 1024;

/// What the handlers work with.
pub struct AdminState {
    pub leases: Arc<LeaseManager>,
    /// Role creation per identity (`[lease] issue_rate_per_identity`),
    /// shared with the PostgreSQL port: `/v1/creds` counts against it.
    pub issue_limiter: Arc<RateLimiter>,
    /// Where standalone credentials log in (returned by `/v1/creds`).
    pub upstream: UpstreamSettings,
    pub metrics: PrometheusHandle,
}

impl AdminState {
    /// The policy and token issuers in force (bearer tokens are verified
    /// as at the PostgreSQL door).
    fn rules(&self) -> Arc<Rules> {
        self.leases.rules()
    }
}

struct Shared {
    state: AdminState,
    admins: Vec<IdPattern>,
    /// Lease lookups by identities that are not admins (renewing or
    /// revoking what may be their own lease): each can read the ledger, so
    /// a stranger cannot make Ephemera scan `pg_roles` in a loop.
    holder_lookups: RateLimiter,
}

/// A holder renews at half its ttl; this is far above any honest use.
const HOLDER_LOOKUPS_PER_SECOND: f64 = 5.0;
const HOLDER_LOOKUPS_BURST: u32 = 20;

/// Who is calling, as established for the whole connection.
#[derive(Clone, Debug)]
enum Caller {
    Verified(SpiffeId),
    /// The certificate chains to the bundle but is not a valid X.509-SVID.
    Invalid(String),
    /// No client certificate (allowed only with token issuers configured):
    /// each request needs a bearer token.
    Anonymous,
}

pub struct AdminServer {
    listener: TcpListener,
    /// The admin acceptor and the SVID verifier in force (reloadable).
    tls: SharedTls,
    shared: Arc<Shared>,
}

impl AdminServer {
    /// `tls` must hold an admin acceptor (built from `settings.tls`).
    pub fn new(
        listener: TcpListener,
        settings: AdminSettings,
        tls: SharedTls,
        state: AdminState,
    ) -> Self {
        AdminServer {
            listener,
            tls,
            shared: Arc::new(Shared {
                state,
                admins: settings.identities,
                holder_lookups: RateLimiter::new(HOLDER_LOOKUPS_PER_SECOND, HOLDER_LOOKUPS_BURST),
            }),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has an address")
    }

    /// Serve until the task is dropped.
    pub async fn serve(self: Arc<Self>) {
        let router = router(self.shared.clone());
        tracing::info!(address = %self.local_addr(), "admin API is listening");
        let open = Arc::new(crate::ops::limits::OpenConnections::new(MAX_CONNECTIONS));
        let mut backoff = crate::ops::limits::AcceptBackoff::default();
        loop {
            let (tcp, peer) = match self.listener.accept().await {
                Ok(accepted) => {
                    backoff.reset();
                    accepted
                }
                Err(error) => {
                    tracing::warn!(%error, "admin API accept failed");
                    backoff.wait().await;
                    continue;
                }
            };
            let slot = open.admit();
            let material = self.tls.current();
            let Some(tls) = material.admin_acceptor.clone() else {
                tracing::error!("admin API has no TLS configuration; closing the connection");
                continue;
            };
            let router = router.clone();
            tokio::spawn(slot.run(async move {
                let stream = match tokio::time::timeout(TLS_TIMEOUT, tls.accept(tcp)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        tracing::info!(client_addr = %peer, %error, "admin API TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let caller = match stream.get_ref().1.peer_certificates() {
                    Some(chain) if !chain.is_empty() => match material.svid_verifier.verify(chain, UnixTime::now()) {
                        Ok(svid) => Caller::Verified(svid.id),
                        Err(e) => Caller::Invalid(e.to_string()),
                    },
                    // The TLS layer lets this through only with token
                    // issuers configured.
                    _ => Caller::Anonymous,
                };
                let service = TowerToHyperService::new(router.layer(Extension(caller)));
                if let Err(error) = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(client_addr = %peer, %error, "admin API connection error");
                }
            }));
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/leases", get(list_leases))
        .route("/v1/leases/{id}", get(show_lease))
        .route("/v1/leases/{id}/renew", post(renew_lease))
        .route("/v1/leases/{id}/revoke", post(revoke_lease))
        .route("/v1/revoke", post(revoke_matching))
        .route("/v1/creds/{template}", post(creds))
        .fallback(|| async {
            failure(
                StatusCode::NOT_FOUND,
                "no such endpoint; see docs/admin-api.yaml",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY))
        .with_state(shared)
}

/// An error answer: status and `{"error": "…"}`.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

fn failure(status: StatusCode, message: impl Into<String>) -> Failure {
    Failure(status, message.into())
}

impl From<LeaseError> for Failure {
    fn from(error: LeaseError) -> Self {
        let status = match &error {
            LeaseError::NotFound(_) | LeaseError::UnknownTemplate(_) => StatusCode::NOT_FOUND,
            LeaseError::Ended(_) => StatusCode::CONFLICT,
            LeaseError::Denied { .. } => StatusCode::FORBIDDEN,
            LeaseError::BadSelector | LeaseError::TtlTooLong(_) => StatusCode::BAD_REQUEST,
            LeaseError::Engine(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        failure(status, error.to_string())
    }
}

impl From<ephemera_engine::EngineError> for Failure {
    fn from(error: ephemera_engine::EngineError) -> Self {
        LeaseError::from(error).into()
    }
}

/// The `{id}` of a lease path, or a JSON 400.
fn lease_id(id: Result<Path<LeaseId>, PathRejection>) -> Result<LeaseId, Failure> {
    id.map(|Path(id)| id).map_err(|e| {
        failure(
            StatusCode::BAD_REQUEST,
            format!("{}; a lease id is a UUID", e.body_text()),
        )
    })
}

/// The request body, or the JSON error (413 past [`MAX_REQUEST_BODY`])
/// instead of axum's plain-text rejection.
fn request_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, Failure> {
    body.map_err(|e| {
        let status = e.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("the request body is larger than {MAX_REQUEST_BODY} bytes; the admin API's bodies are small JSON objects")
        } else {
            format!("cannot read the request body: {}", e.body_text())
        };
        failure(status, message)
    })
}

/// Any caller with a valid SVID.
fn verified(caller: &Caller) -> Result<&SpiffeId, Failure> {
    match caller {
        Caller::Verified(id) => Ok(id),
        Caller::Invalid(reason) => Err(failure(
            StatusCode::FORBIDDEN,
            format!("the client certificate is not a valid X.509-SVID: {reason}"),
        )),
        Caller::Anonymous => Err(bearer::unauthorized(
            "this endpoint needs the client certificate (X.509-SVID) of an admin identity; \
             a bearer token may only ask for credentials and renew or revoke its own lease"
                .to_owned(),
        )),
    }
}

/// Only callers listed in `[admin] identities`.
fn admin<'a>(shared: &Shared, caller: &'a Caller) -> Result<&'a SpiffeId, Failure> {
    let id = verified(caller)?;
    if shared.admins.iter().any(|p| p.matches(id)) {
        Ok(id)
    } else {
        Err(failure(
            StatusCode::FORBIDDEN,
            format!(
                "{id} is not an admin identity; admin identities are listed in [admin] identities"
            ),
        ))
    }
}

/// Admins, or the identity holding standalone lease `id` (so a batch job can
/// renew and give back its own credentials). Anyone else gets the same 403
/// whether or not the lease exists.
async fn admin_or_holder(
    shared: &Shared,
    caller: &Caller,
    headers: &HeaderMap,
    id: LeaseId,
) -> Result<String, Failure> {
    let refusal = match admin(shared, caller) {
        Ok(admin) => return Ok(admin.to_string()),
        Err(_) if matches!(caller, Caller::Anonymous) => failure(
            StatusCode::FORBIDDEN,
            "a token may renew or revoke only its own standalone lease",
        ),
        Err(refusal) => refusal,
    };
    let (caller, _) = bearer::principal(shared, caller, headers).await?;
    if !shared.holder_lookups.try_take(caller.as_str()) {
        return Err(failure(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{caller} looks up leases too fast: at most {HOLDER_LOOKUPS_BURST} at once and \
                 {HOLDER_LOOKUPS_PER_SECOND} per second for identities that are not admins; retry later"
            ),
        ));
    }
    match shared.state.leases.get(id).await {
        Ok(lease) if lease.kind == LeaseKind::Standalone && lease.identity == caller.as_str() => {
            Ok(caller.to_string())
        }
        _ => Err(refusal),
    }
}

async fn health(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
) -> Result<Json<Health>, Failure> {
    bearer::principal(&shared, &caller, &headers).await?;
    Ok(Json(Health {
        status: "ok".into(),
    }))
}

async fn metrics(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, Failure> {
    admin(&shared, &caller)?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared.state.metrics.render(),
    )
        .into_response())
}

async fn list_leases(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    filter: Result<Query<LeaseFilter>, QueryRejection>,
) -> Result<Json<LeaseList>, Failure> {
    admin(&shared, &caller)?;
    let Query(filter) = filter.map_err(|e| {
        failure(
            StatusCode::BAD_REQUEST,
            format!(
                "{}; filters are identity, template and state (active, revoked, expired)",
                e.body_text()
            ),
        )
    })?;
    let leases = shared.state.leases.list(&filter).await?;
    Ok(Json(LeaseList { leases }))
}

async fn show_lease(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<LeaseId>, PathRejection>,
) -> Result<Json<LeaseView>, Failure> {
    admin(&shared, &caller)?;
    let id = lease_id(id)?;
    Ok(Json(shared.state.leases.get(id).await?))
}

async fn renew_lease(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    id: Result<Path<LeaseId>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<LeaseView>, Failure> {
    let id = lease_id(id)?;
    let actor = admin_or_holder(&shared, &caller, &headers, id).await?;
    let body = request_body(body)?;
    let request: RenewRequest = if body.is_empty() {
        RenewRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            failure(
                StatusCode::BAD_REQUEST,
                format!("invalid body: {e}; send {{\"ttl\": \"10m\"}} or nothing"),
            )
        })?
    };
    Ok(Json(
        shared.state.leases.renew(id, request.ttl, &actor).await?,
    ))
}

async fn revoke_lease(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    id: Result<Path<LeaseId>, PathRejection>,
) -> Result<Json<LeaseView>, Failure> {
    let id = lease_id(id)?;
    let actor = admin_or_holder(&shared, &caller, &headers, id).await?;
    Ok(Json(shared.state.leases.revoke(id, &actor).await?))
}

async fn revoke_matching(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<RevokeResponse>, Failure> {
    let actor = admin(&shared, &caller)?.to_string();
    let body = request_body(body)?;
    let request: RevokeRequest = serde_json::from_slice(&body).map_err(|e| {
        failure(
            StatusCode::BAD_REQUEST,
            format!("invalid body: {e}; send one of {{\"identity\": …}}, {{\"identity_prefix\": …}}, {{\"template\": …}}"),
        )
    })?;
    let selector = request.selector()?;
    let revoked = shared
        .state
        .leases
        .revoke_matching(&selector, &actor)
        .await?;
    Ok(Json(RevokeResponse { revoked }))
}

async fn creds(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    Path(template): Path<String>,
) -> Result<Json<Credentials>, Failure> {
    let (identity, bound) = bearer::principal(&shared, &caller, &headers).await?;
    let limiter = &shared.state.issue_limiter;
    if !limiter.try_take(identity.as_str()) {
        return Err(failure(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "identity {identity} is creating credentials too fast: at most {} at once and {} \
                 per second, sessions included (lease.issue_rate_per_identity); retry later",
                limiter.burst(),
                limiter.rate()
            ),
        ));
    }
    if identity.token().is_some() {
        let rules = shared.state.rules();
        if rules.templates.contains_key(&template)
            && rules.policy.decide(&identity, &template) == crate::policy::Decision::Allowed
        {
            bearer::claim_single_use(&shared, &identity, &template).await?;
        }
    }
    let (lease, password) = shared
        .state
        .leases
        .issue_standalone(&identity, &template, None, bound)
        .await?;
    Ok(Json(Credentials {
        lease_id: lease.id,
        username: lease.role,
        password: password.expose().to_owned(),
        host: shared.state.upstream.host.clone(),
        port: shared.state.upstream.port,
        database: lease.database,
        expires_at: lease.expires_at,
    }))
}
