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
mod steps;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::identity::Principal;
use crate::leases::{EndReason, SessionLease};
use crate::session::front_door::{refuse, refuse_and_audit, Admitted, ClientStream};
use crate::session::refusal::Refusal;
use crate::session::services::Services;
use crate::session::statements::StatementWatch;
use crate::session::steps::{allow, greeting, mint, statement_watch, ActiveSession, Request};

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
        return pool::session::run_pooled(services, identity, request, stream, peer, bound).await;
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

fn log_session(lease: &SessionLease, peer: SocketAddr, what: &str) {
    let lease = lease.lease();
    tracing::info!(
        lease_id = %lease.id, identity = %lease.identity,
        subject = lease.subject.as_deref().unwrap_or("-"), template = %lease.template,
        role = %lease.role, database = %lease.database, client_addr = %peer, "{what}"
    );
}
