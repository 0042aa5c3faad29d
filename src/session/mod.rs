//! Session: an admitted client's life, from the policy decision to the end.
//!
//! policy → mint a role (lease) → log in upstream as it → greet the client →
//! relay → revoke. The lease is revoked however this ends (normal close,
//! error, panic), because [`SessionLease`] revokes itself when dropped.

pub mod cancel;
pub mod front_door;
pub mod handoff;
pub mod pool;
pub mod protocol;
pub mod quiet_socket;
pub mod refusal;
pub mod relay;
pub mod services;
pub mod statements;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::config::{Rules, TemplateSettings};
use crate::identity::Principal;
use crate::leases::{Bound, EndReason, SessionLease};
use crate::ops::audit::AuditEvent;
use crate::policy::Decision;
use crate::session::front_door::{refuse, refuse_and_audit, Admitted, ClientStream};
use crate::session::protocol::{
    authentication_ok, backend_key_data, negotiate_protocol_version, CancelKey, StartupRequest,
};
use crate::session::refusal::Refusal;
use crate::session::services::Services;
use crate::session::statements::StatementWatch;

/// Startup parameters Ephemera decides itself; everything else is passed on.
const OWNED_PARAMETERS: [&str; 3] = ["user", "database", "replication"];

/// What the startup packet asks for, once the policy has allowed it.
pub struct Request {
    template: String,
    database: String,
    settings: TemplateSettings,
    /// Parameters to pass to the upstream (application_name, options, …).
    forwarded: Vec<(String, String)>,
    /// `_pq_.` protocol options we do not support, to report to the client.
    unsupported_options: Vec<String>,
    minor_version: u16,
}

/// One admitted client's session, step by step. Each step either hands the
/// next one what it needs or says why the client is turned away.
pub async fn run(services: Arc<Services>, admitted: Admitted, peer: SocketAddr) {
    let Admitted {
        stream,
        startup,
        principal: identity,
        bound,
    } = admitted;

    let Ok(_session_permit) = services.sessions.clone().try_acquire_owned() else {
        let refusal = Refusal::TooManyConnections {
            limit: services.max_connections,
        };
        return refuse(stream, refusal, peer).await;
    };
    let request = match allow(&services, &identity, startup) {
        Ok(request) => request,
        Err((refusal, template)) => {
            let who = Some(identity.to_string());
            return refuse_and_audit(&services, stream, refusal, peer, who, template).await;
        }
    };
    if let Err(refusal) = claim_single_use(&services, &identity, &request).await {
        let who = Some(identity.to_string());
        let template = Some(request.template.clone());
        return refuse_and_audit(&services, stream, refusal, peer, who, template).await;
    }
    if let Some(pool) = request.settings.pool.clone() {
        let request = (request, pool);
        return pool::run_pooled(services, identity, request, stream, peer, bound).await;
    }
    let mut lease = match mint(&services, &identity, &request, peer, bound).await {
        Ok(lease) => lease,
        Err(refusal) => return refuse(stream, refusal, peer).await,
    };
    let session = match log_in(&services, &mut lease, &request).await {
        Ok(session) => session,
        Err(refusal) => return refuse(stream, refusal, peer).await,
    };
    let cancel = services.cancels.register(session.backend_key);
    let hello = greeting(
        &session.greeting,
        &session.ready_for_query,
        &request,
        cancel.client_key(),
    );
    log_session(&lease, peer, "session started");
    services.leases.logged_in(lease.lease(), lease.login());
    let _active = ActiveSession::start();
    let watch = statement_watch(&services, &request, lease.lease());
    let result = greet_and_relay(&services, stream, session.stream, hello, watch).await;
    match result {
        Ok(relayed) => tracing::info!(
            lease_id = %lease.lease().id, role = %lease.lease().role,
            bytes_to_upstream = relayed.to_upstream, bytes_to_client = relayed.to_client,
            "session ended"
        ),
        Err(error) => tracing::info!(
            lease_id = %lease.lease().id, role = %lease.lease().role, %error,
            "session ended with a connection error"
        ),
    }
    drop(cancel);
    drop(lease);
}

/// Greet the client and relay, on the next session thread (`workers.rs`):
/// the sockets move to its reactor (`handoff.rs`) and the session's
/// wake-ups stay on that one core. This task waits for the end, holding
/// the lease, the cancel key and the connection permit.
async fn greet_and_relay(
    services: &Services,
    mut client: ClientStream,
    upstream: upstream::UpstreamStream,
    hello: BytesMut,
    watch: Option<StatementWatch>,
) -> std::io::Result<crate::session::relay::Relayed> {
    use crate::session::handoff::Rebind;
    use crate::session::relay::{relay, relay_watched};
    let relay = services.relay_threads.spawn(move |_| async move {
        client.rebind()?;
        let mut upstream = upstream.rebind()?;
        client.write_all(&hello).await?;
        client.flush().await?;
        match watch {
            None => relay(&mut client, &mut upstream).await,
            Some(mut watch) => relay_watched(&mut client, &mut upstream, &mut watch).await,
        }
    });
    relay.await.unwrap_or_else(|join| {
        // Only if the relay panicked or its thread stopped (shutdown).
        Err(std::io::Error::other(join))
    })
}

/// The statement audit's watch, for templates with `audit_statements`.
fn statement_watch(
    services: &Services,
    request: &Request,
    lease: &ephemera_engine::Lease,
) -> Option<StatementWatch> {
    let settings = request.settings.statement_audit.as_ref()?;
    let queue = services.leases.audit().statement_queue()?;
    let base = AuditEvent::lease(crate::ops::audit::AuditKind::Statement, lease);
    Some(StatementWatch::new(settings, base, queue))
}

/// The policy and the identity's issue rate: may this session have a
/// credential? A refusal comes with the template asked for, for the audit.
fn allow(
    services: &Services,
    identity: &Principal,
    startup: StartupRequest,
) -> Result<Request, (Refusal, Option<String>)> {
    let requested_template = startup.parameters.get("user").cloned();
    let request =
        decide(&services.rules(), identity, startup).map_err(|r| (r, requested_template))?;
    // A pooled template's client mints only when its pool has no lease
    // (`pool/session.rs` takes the token then).
    if request.settings.pool.is_none() {
        if let Err(refusal) = take_issue_token(services, identity, &request.template) {
            return Err((refusal, Some(request.template)));
        }
    }
    Ok(request)
}

/// One credential's worth of the identity's issue rate.
fn take_issue_token(
    services: &Services,
    identity: &Principal,
    _template: &str,
) -> Result<(), Refusal> {
    if services.issue_limiter.try_take(identity.as_str()) {
        return Ok(());
    }
    Err(Refusal::RateLimited {
        identity: identity.to_string(),
        rate: services.issue_limiter.rate(),
        burst: services.issue_limiter.burst(),
    })
}

/// A `single_use` issuer's token opens one lease, across replicas: its
/// use is recorded in the database before anything is minted.
async fn claim_single_use(
    services: &Services,
    identity: &Principal,
    request: &Request,
) -> Result<(), Refusal> {
    let Some(token) = identity.token() else {
        return Ok(());
    };
    let Some(key) = &token.single_use_key else {
        return Ok(());
    };
    match services
        .leases
        .claim_token_use(&request.template, key, token.expires_at)
        .await
    {
        Ok(true) => Ok(()),
        Ok(false) => Err(Refusal::Token(
            crate::identity::token::TokenError::Replayed(token.issuer.clone()),
        )),
        Err(source) => Err(Refusal::Mint {
            upstream: services.upstream.address(),
            source,
        }),
    }
}

/// Have the engine make the session's credential (its lease).
async fn mint(
    services: &Arc<Services>,
    identity: &Principal,
    request: &Request,
    peer: SocketAddr,
    bound: Option<Bound>,
) -> Result<SessionLease, Refusal> {
    let issued = services
        .leases
        .issue_session(identity, &request.template, &request.settings, peer, bound)
        .await;
    issued.map_err(|source| {
        services.leases.audit().record(AuditEvent::issue_failed(
            identity.to_string(),
            request.template.clone(),
            peer,
            source.to_string(),
        ));
        let upstream = services.upstream.address();
        Refusal::Mint { upstream, source }
    })
}

/// Log in upstream as the credential, then close its login window: a
/// session can change its role's password, and with the window closed that
/// password opens nothing (SECURITY.md, finding 3).
async fn log_in(
    services: &Services,
    lease: &mut SessionLease,
    request: &Request,
) -> Result<upstream::UpstreamSession, Refusal> {
    let session = upstream::login(
        &services.upstream,
        &lease.lease().role,
        &request.database,
        &request.forwarded,
        lease.login(),
    )
    .await
    .map_err(|e| {
        lease.set_end_reason(EndReason::LoginFailed);
        Refusal::Upstream(e)
    })?;
    if let Err(source) = services.leases.close_login(lease.lease()).await {
        lease.set_end_reason(EndReason::LoginFailed);
        let upstream = services.upstream.address();
        return Err(Refusal::Mint { upstream, source });
    }
    Ok(session)
}

/// What tells the client it is in: what PostgreSQL said at login, with our
/// own cancel key in place of the backend's.
fn greeting(
    server_greeting: &[u8],
    ready_for_query: &[u8],
    request: &Request,
    cancel_key: CancelKey,
) -> BytesMut {
    let mut hello = BytesMut::with_capacity(server_greeting.len() + 64);
    if request.minor_version != 0 || !request.unsupported_options.is_empty() {
        hello.extend_from_slice(&negotiate_protocol_version(
            request.unsupported_options.clone(),
        ));
    }
    hello.extend_from_slice(&authentication_ok());
    hello.extend_from_slice(server_greeting);
    hello.extend_from_slice(&backend_key_data(cancel_key));
    hello.extend_from_slice(ready_for_query);
    hello
}

/// Counts a relayed session in `ephemera_sessions_active` while it lives.
struct ActiveSession;

impl ActiveSession {
    fn start() -> Self {
        metrics::gauge!(crate::ops::telemetry::SESSIONS_ACTIVE).increment(1.0);
        ActiveSession
    }
}

impl Drop for ActiveSession {
    fn drop(&mut self) {
        metrics::gauge!(crate::ops::telemetry::SESSIONS_ACTIVE).decrement(1.0);
    }
}

fn log_session(lease: &SessionLease, peer: SocketAddr, what: &str) {
    let lease = lease.lease();
    tracing::info!(
        lease_id = %lease.id, identity = %lease.identity,
        subject = lease.subject.as_deref().unwrap_or("-"), template = %lease.template,
        role = %lease.role, database = %lease.database, client_addr = %peer, "{what}"
    );
}

/// Apply the policy to what the startup packet asks for.
fn decide(
    rules: &Rules,
    identity: &Principal,
    startup: StartupRequest,
) -> Result<Request, Refusal> {
    let mut parameters = startup.parameters;
    if let Some(replication) = parameters.get("replication") {
        if !matches!(replication.as_str(), "false" | "off" | "no" | "0") {
            return Err(Refusal::Replication);
        }
    }
    let template = parameters.remove("user").unwrap_or_default();
    if template.is_empty() {
        return Err(Refusal::NoTemplate {
            identity: identity.to_string(),
            allowed: rules.policy.templates_for(identity),
        });
    }
    let Some(settings) = rules.templates.get(&template) else {
        return Err(Refusal::UnknownTemplate {
            identity: identity.to_string(),
            template,
            allowed: rules.policy.templates_for(identity),
        });
    };
    if let Decision::Denied { allowed } = rules.policy.decide(identity, &template) {
        return Err(Refusal::Denied {
            identity: identity.to_string(),
            template,
            allowed,
        });
    }
    let database = match parameters.remove("database") {
        Some(db) if !db.is_empty() && db != settings.database => {
            return Err(Refusal::WrongDatabase {
                template,
                expected: settings.database.clone(),
                requested: db,
            })
        }
        _ => settings.database.clone(),
    };
    let (unsupported_options, forwarded) = parameters
        .into_iter()
        .filter(|(k, _)| !OWNED_PARAMETERS.contains(&k.as_str()))
        .partition::<Vec<_>, _>(|(k, _)| k.starts_with("_pq_."));
    Ok(Request {
        template,
        database,
        settings: settings.clone(),
        forwarded,
        unsupported_options: unsupported_options.into_iter().map(|(k, _)| k).collect(),
        minor_version: startup.minor_version,
    })
}
