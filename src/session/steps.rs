//! The steps every session takes before it is relayed, pooled or not:
//! what the startup packet asks for and whether the policy allows it
//! (`decide`, `allow`), the identity's issue rate, minting the lease, the
//! statement audit's watch and the greeting.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;

use crate::config::{Rules, TemplateSettings};
use crate::identity::Principal;
use crate::leases::{Bound, SessionLease};
use crate::ops::audit::AuditEvent;
use crate::policy::Decision;
use crate::session::protocol::{
    authentication_ok, backend_key_data, negotiate_protocol_version, CancelKey, StartupRequest,
};
use crate::session::refusal::Refusal;
use crate::session::services::Services;
use crate::session::statements::StatementWatch;

/// Startup parameters Ephemera decides itself; everything else is passed on.
const OWNED_PARAMETERS: [&str; 3] = ["user", "database", "replication"];

/// What the startup packet asks for, once the policy has allowed it.
pub(crate) struct Request {
    pub(crate) template: String,
    pub(crate) database: String,
    pub(crate) settings: TemplateSettings,
    /// Parameters to pass to the upstream (application_name, options, …).
    pub(crate) forwarded: Vec<(String, String)>,
    /// `_pq_.` protocol options we do not support, to report to the client.
    pub(crate) unsupported_options: Vec<String>,
    pub(crate) minor_version: u16,
}

/// The statement audit's watch, for templates with `audit_statements`.
pub(crate) fn statement_watch(
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
pub(crate) fn allow(
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
pub(crate) fn take_issue_token(
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

/// Have the engine make the session's credential (its lease).
pub(crate) async fn mint(
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

/// What tells the client it is in: what PostgreSQL said at login, with our
/// own cancel key in place of the backend's.
pub(crate) fn greeting(
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

/// Apply the policy to what the startup packet asks for.
pub(crate) fn decide(
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

/// Counts a relayed session in `ephemera_sessions_active` while it lives.
pub(crate) struct ActiveSession;

impl ActiveSession {
    pub(crate) fn start() -> Self {
        metrics::gauge!(crate::ops::telemetry::SESSIONS_ACTIVE).increment(1.0);
        ActiveSession
    }
}

impl Drop for ActiveSession {
    fn drop(&mut self) {
        metrics::gauge!(crate::ops::telemetry::SESSIONS_ACTIVE).decrement(1.0);
    }
}
