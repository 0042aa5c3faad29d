//! A pooled client's session: its pool (minting the pool's lease if there
//! is none), a backend (idle, or logged in now), the greeting, the framed
//! relay on a session thread, and the backend's reset and return.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::relay::{relay_pooled, Ended};
use super::{Backend, Lent, Member, Pool, PoolKey};
use crate::config::PoolSettings;
use crate::identity::Principal;
use crate::leases::Bound;
use crate::ops::audit::{AuditEvent, AuditKind};
use crate::session::front_door::{refuse, ClientStream};
use crate::session::protocol::fatal;
use crate::session::protocol::sqlstate::ADMIN_SHUTDOWN;
use crate::session::refusal::Refusal;
use crate::session::relay::{Relayed, Unwatched};
use crate::session::services::Services;
use crate::session::steps::{
    greeting, mint, statement_watch, take_issue_token, ActiveSession, Request,
};
use crate::session::upstream;

/// Serve one client of a pooled template, already allowed by the policy.
pub(crate) async fn run_pooled(
    services: Arc<Services>,
    identity: Principal,
    (request, settings): (Request, PoolSettings),
    stream: ClientStream,
    peer: SocketAddr,
    bound: Option<Bound>,
) {
    let joined = join_pool(&services, &identity, (&request, settings), peer, bound).await;
    let pool = match joined {
        Ok(pool) => pool,
        Err(refusal) => return refuse(stream, refusal, peer).await,
    };
    let backend = match backend(&services, &pool, &request).await {
        Ok(backend) => backend,
        Err(refusal) => return refuse(stream, refusal, peer).await,
    };
    let cancel = services.cancels.register(backend.key);
    let hello = greeting(
        &backend.greeting,
        &backend.ready_for_query,
        &request,
        cancel.client_key(),
    );
    let lease = pool.lease().lease();
    record(&services, AuditKind::SessionStart, lease, peer, None);
    tracing::info!(
        lease_id = %lease.id, identity = %lease.identity, template = %lease.template,
        role = %lease.role, upstream_pid = backend.key.pid, client_addr = %peer,
        "pooled session started"
    );
    let watch = statement_watch(&services, &request, lease);
    let reset = (
        pool.settings().reset_query.clone(),
        services.upstream.connect_timeout,
    );
    let until = client_deadline(&services, lease, bound);
    let _active = ActiveSession::start();
    let relayed = services
        .relay_threads
        .spawn(move |_| async move { serve(stream, backend, hello, watch, (reset, until)).await });
    let outcome = relayed
        .await
        .unwrap_or_else(|join| Err(std::io::Error::other(join)));
    drop(cancel);
    let reason = match outcome {
        Ok((relayed, kept)) => {
            let reason = if kept.is_some() {
                "backend_kept"
            } else {
                "backend_closed"
            };
            tracing::info!(
                lease_id = %lease.id, bytes_to_upstream = relayed.to_upstream,
                bytes_to_client = relayed.to_client, reason, "pooled session ended"
            );
            pool.give_back(kept);
            reason.to_owned()
        }
        Err(error) => {
            tracing::info!(lease_id = %lease.id, %error, "pooled session ended with a connection error");
            pool.give_back(None);
            "connection_error".to_owned()
        }
    };
    record(&services, AuditKind::SessionEnd, lease, peer, Some(reason));
}

/// When this client's own credential (its SVID, with `bind_to_svid`, or
/// its token, with `bind_to_expiry`) expires before the pool's lease: its
/// session ends then, though the pool's lease goes on.
fn client_deadline(
    services: &Services,
    lease: &ephemera_engine::Lease,
    bound: Option<Bound>,
) -> Option<std::time::Duration> {
    let at = match bound? {
        Bound::Svid(at) if services.leases.binds_svid() => at,
        Bound::Svid(_) => return None,
        Bound::Token(at) => at,
    };
    (at < lease.max_expires_at).then(|| {
        let left = at - time::OffsetDateTime::now_utc();
        left.try_into().unwrap_or_default()
    })
}

/// On the session thread: greet, relay until the client leaves (or its
/// own credential expires), then reset and keep the backend if it can be.
async fn serve(
    mut client: ClientStream,
    mut backend: Backend,
    hello: bytes::BytesMut,
    watch: Option<crate::session::statements::StatementWatch>,
    ((reset_query, timeout), until): ((String, Duration), Option<Duration>),
) -> std::io::Result<(Relayed, Option<Backend>)> {
    use crate::session::handoff::Rebind;
    client.rebind()?;
    backend.stream = backend.stream.rebind()?;
    client.write_all(&hello).await?;
    client.flush().await?;
    let relay = async {
        match watch {
            None => relay_pooled(&mut client, &mut backend.stream, &mut Unwatched).await,
            Some(mut w) => relay_pooled(&mut client, &mut backend.stream, &mut w).await,
        }
    };
    let relayed = match until {
        None => Ok(relay.await),
        Some(left) => tokio::time::timeout(left, relay).await,
    };
    let Ok(ended) = relayed else {
        let bye = fatal(
            ADMIN_SHUTDOWN,
            "terminating connection: the client certificate or token this session was opened with has expired",
            Some("Connect again with a current credential."),
        );
        let _ = client.write_all(&bye).await;
        let _ = client.shutdown().await;
        backend.close().await;
        return Ok((Relayed::default(), None));
    };
    let ended = ended?;
    let kept = keep(backend, &ended, &reset_query, timeout).await;
    let _ = client.shutdown().await;
    Ok((ended.relayed, kept))
}

/// After the client left: reset the backend and keep it, if what the
/// relay saw allows; otherwise it is closed (dropped).
async fn keep(
    mut backend: Backend,
    ended: &Ended,
    reset_query: &str,
    timeout: Duration,
) -> Option<Backend> {
    if ended.server_closed || !ended.seen.reusable() {
        return None;
    }
    match backend
        .reset(reset_query, ended.seen.pending, timeout)
        .await
    {
        Ok(()) => Some(backend),
        Err(error) => {
            tracing::info!(%error, "a pooled backend could not be reset; closed");
            metrics::counter!(crate::ops::telemetry::POOL_RESETS_FAILED).increment(1);
            None
        }
    }
}

fn record(
    services: &Services,
    kind: AuditKind,
    lease: &ephemera_engine::Lease,
    peer: SocketAddr,
    reason: Option<String>,
) {
    let mut event = AuditEvent::lease(kind, lease);
    event.client_addr = Some(peer.to_string());
    if let Some(reason) = reason {
        event = event.reason(reason);
    }
    services.leases.audit().record(event);
}

/// The client's pool, live; its lease minted now if there is none (or the
/// last one ended). Concurrent first clients wait for one mint.
async fn join_pool(
    services: &Arc<Services>,
    identity: &Principal,
    (request, settings): (&Request, PoolSettings),
    peer: SocketAddr,
    bound: Option<Bound>,
) -> Result<Member, Refusal> {
    let key = PoolKey {
        proof: PoolKey::proof(identity),
        identity: identity.as_str().to_owned(),
        subject: identity.subject().map(str::to_owned),
        template: request.template.clone(),
        database: request.database.clone(),
    };
    let slot = services.pools.slot(&key);
    let mut guard = slot.pool.lock().await;
    if let Some(pool) = guard.as_ref() {
        if services.leases.is_active(pool.lease.lease().id) {
            return Ok(pool.join());
        }
        *guard = None;
    }
    take_issue_token(services, identity, &request.template)?;
    let lease = mint(services, identity, request, peer, bound).await?;
    let pool = Arc::new(Pool::new(lease, settings, request.template.clone()));
    let member = pool.join();
    *guard = Some(pool);
    Ok(member)
}

/// A backend for the client: an idle one that still answers, or one
/// logged in now.
async fn backend(
    services: &Services,
    pool: &Member,
    request: &Request,
) -> Result<Backend, Refusal> {
    loop {
        let Some(lent) = pool.lend(&request.forwarded).await else {
            return Err(Refusal::PoolExhausted {
                template: request.template.clone(),
                size: pool.settings().size,
                wait: humantime::format_duration(pool.settings().wait).to_string(),
            });
        };
        return match lent {
            Lent::Idle(backend) => {
                match answers(backend, services.upstream.connect_timeout).await {
                    Some(backend) => Ok(backend),
                    None => {
                        // PostgreSQL closed it while idle (a restart,
                        // idle_session_timeout, pg_terminate_backend).
                        pool.give_back(None);
                        continue;
                    }
                }
            }
            Lent::New => match log_in(services, pool, request).await {
                Ok(backend) => {
                    pool.opened();
                    Ok(backend)
                }
                Err(refusal) => {
                    pool.slot_freed();
                    Err(refusal)
                }
            },
        };
    }
}

/// An idle backend, if it still answers an empty query (one round trip;
/// it also reads away anything the server said while it was idle).
async fn answers(mut backend: Backend, timeout: Duration) -> Option<Backend> {
    backend.stream = backend.stream.rebind().ok()?;
    match backend.reset("", 0, timeout).await {
        Ok(()) => Some(backend),
        Err(error) => {
            tracing::info!(upstream_pid = backend.key.pid, %error, "an idle pooled backend no longer answers; closed");
            None
        }
    }
}

/// Log a new backend in as the pool's role: the lease's own login the
/// first time, then a login window opened again for each one; closed
/// again at once either way. One at a time per pool.
async fn log_in(services: &Services, pool: &Pool, request: &Request) -> Result<Backend, Refusal> {
    let mint_failed = |source| Refusal::Mint {
        upstream: services.upstream.address(),
        source,
    };
    let mut first = pool.opening.lock().await;
    let lease = pool.lease.lease();
    let reopened;
    let login = if *first {
        *first = false;
        pool.lease.login()
    } else {
        reopened = services
            .leases
            .reopen_login(lease)
            .await
            .map_err(mint_failed)?;
        &reopened
    };
    let session = upstream::login(
        &services.upstream,
        &lease.role,
        &request.database,
        &request.forwarded,
        login,
    )
    .await;
    let closed = services.leases.close_login(lease).await;
    let session = session.map_err(Refusal::Upstream)?;
    closed.map_err(mint_failed)?;
    services.leases.logged_in(lease, login);
    Ok(Backend::new(session, request.forwarded.clone()))
}
