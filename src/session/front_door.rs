//! Front door: from TCP accept to a verified identity and its startup packet.
//!
//! 1. Plain `SSLRequest` → `S` → TLS, or a TLS ClientHello straight away
//!    ("direct TLS", PostgreSQL 17's `sslnegotiation=direct`, ALPN required).
//! 2. Inside TLS: the `StartupMessage` (or a `CancelRequest`).
//! 3. The client certificate must be a valid X.509-SVID: that is the identity.
//!    A client without one, where token issuers are configured, is asked for
//!    a password (only ever inside TLS) and sends its identity token there.
//!
//! Plaintext startup, `GSSENCRequest` and a missing or bad certificate are
//! refused with a FATAL `ErrorResponse` saying how to connect. A
//! `CancelRequest` is honoured in plaintext or TLS, without a certificate.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::UnixTime;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::config::ALPN_POSTGRESQL;
use crate::identity::token::{BearerToken, TokenError, MAX_TOKEN_BYTES};
use crate::identity::{Actor, IdentityError, OnBehalf, Principal};
use crate::leases::Bound;
use crate::ops::audit::AuditEvent;
use crate::session::handoff::MovableTcp;
use crate::session::protocol::{
    authentication_cleartext_password, read_first_packet, read_password, FirstPacket,
    PasswordAnswer, ProtocolError, StartupRequest,
};
use crate::session::refusal::Refusal;
use crate::session::services::Services;

/// The first byte of a TLS handshake record: a client starting TLS directly.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// How much of a string an unauthenticated client sent is kept in logs and
/// audit events (template names are at most 40 characters).
const UNTRUSTED_MAX_CHARS: usize = 64;

/// The client's connection once TLS is up.
/// Its socket can move to a session thread (`handoff.rs`).
pub type ClientStream = TlsStream<MovableTcp>;

/// A client that got through the front door.
pub struct Admitted {
    pub stream: ClientStream,
    pub startup: StartupRequest,
    pub principal: Principal,
    /// When the credential it proved itself with expires.
    pub bound: Option<Bound>,
}

/// Run the front door for one connection. `None` means the connection has
/// been dealt with (refused, closed, or it was a cancel request).
pub async fn admit(services: &Services, mut tcp: TcpStream, peer: SocketAddr) -> Option<Admitted> {
    let mut first = [0u8; 1];
    let direct_tls = match tcp.peek(&mut first).await {
        Ok(1) => first[0] == TLS_HANDSHAKE_RECORD,
        _ => return None,
    };

    let mut tls = if direct_tls {
        let tls = accept_tls(services, tcp, peer).await?;
        if tls.get_ref().1.alpn_protocol() != Some(ALPN_POSTGRESQL) {
            refuse(tls, Refusal::DirectTlsWithoutAlpn, peer).await;
            return None;
        }
        tls
    } else {
        match read_first_packet(&mut tcp).await {
            Ok(FirstPacket::SslRequest) => {
                tcp.write_all(b"S").await.ok()?;
                accept_tls(services, tcp, peer).await?
            }
            Ok(FirstPacket::Cancel(key)) => {
                services.cancel(key, peer).await;
                return None;
            }
            Ok(FirstPacket::GssEncRequest) => {
                refuse(tcp, Refusal::GssEncryption, peer).await;
                return None;
            }
            Ok(FirstPacket::Startup(_)) => {
                refuse(tcp, Refusal::TlsRequired, peer).await;
                return None;
            }
            Err(ProtocolError::Closed) => return None,
            Err(e) => {
                refuse(tcp, Refusal::Protocol(e), peer).await;
                return None;
            }
        }
    };

    let startup = match read_first_packet(&mut tls).await {
        Ok(FirstPacket::Startup(startup)) => startup,
        Ok(FirstPacket::Cancel(key)) => {
            services.cancel(key, peer).await;
            // End TLS properly (close_notify): libpq 17+ sends cancels over
            // TLS and OpenSSL reports a bare TCP close as an error.
            let _ = tls.shutdown().await;
            return None;
        }
        Ok(FirstPacket::SslRequest) | Ok(FirstPacket::GssEncRequest) => {
            let e = ProtocolError::Unexpected("an encryption request inside TLS");
            refuse(tls, Refusal::Protocol(e), peer).await;
            return None;
        }
        Err(ProtocolError::Closed) => return None,
        Err(e) => {
            refuse(tls, Refusal::Protocol(e), peer).await;
            return None;
        }
    };

    let template = startup.parameters.get("user").map(String::as_str);
    let verified = identify(services, &mut tls, template).await;
    match verified {
        Ok((principal, bound)) => Some(Admitted {
            stream: tls,
            startup,
            principal,
            bound,
        }),
        Err(Refusal::Protocol(ProtocolError::Closed)) => None,
        Err(refusal) => {
            // Not authenticated: what it claims is cut and escaped before
            // it reaches a log or the audit trail.
            let template = startup
                .parameters
                .get("user")
                .map(|user| crate::ops::limits::untrusted_text(user, UNTRUSTED_MAX_CHARS));
            refuse_and_audit(services, tls, refusal, peer, None, template).await;
            None
        }
    }
}

/// Who the client is: its X.509-SVID, or (no certificate, token issuers
/// configured) the token it sends as the password. An SVID that may use
/// `template` only on behalf of a person must also send that person's token.
async fn identify(
    services: &Services,
    tls: &mut ClientStream,
    template: Option<&str>,
) -> Result<(Principal, Option<Bound>), Refusal> {
    let has_cert = !matches!(tls.get_ref().1.peer_certificates(), None | Some([]));
    let tokens = services.rules().tokens.clone();
    if !has_cert && !tokens.is_empty() {
        return token(tls, &tokens).await.map(|token| {
            let bound = token
                .bind_to_expiry
                .then_some(Bound::Token(token.expires_at));
            (Principal::from_token(token), bound)
        });
    }
    let svid = match tls.get_ref().1.peer_certificates() {
        None | Some([]) => return Err(Refusal::Identity(IdentityError::NoCertificate)),
        Some(chain) => services
            .tls()
            .svid_verifier
            .verify(chain, UnixTime::now())
            .map_err(Refusal::Identity)?,
    };
    let direct = Principal::Svid(svid.id.clone());
    let acts_for_someone = !tokens.is_empty()
        && template.is_some_and(|t| services.rules().policy.wants_subject(&direct, t));
    if !acts_for_someone {
        return Ok((direct, Some(Bound::Svid(svid.not_after))));
    }
    // An agent: the person's token comes as the password.
    let subject = token(tls, &tokens).await?;
    let bound = if subject.bind_to_expiry {
        Bound::Token(subject.expires_at.min(svid.not_after))
    } else {
        Bound::Svid(svid.not_after)
    };
    let on_behalf = OnBehalf {
        actor: Actor::Svid(svid.id),
        subject,
    };
    Ok((Principal::OnBehalf(Box::new(on_behalf)), Some(bound)))
}

/// Ask for the password (we are inside TLS) and verify it as a token.
async fn token(
    tls: &mut ClientStream,
    tokens: &crate::identity::token::TokenIssuers,
) -> Result<crate::identity::token::VerifiedToken, Refusal> {
    tls.write_all(&authentication_cleartext_password())
        .await
        .map_err(|e| Refusal::Protocol(e.into()))?;
    tls.flush().await.map_err(|e| Refusal::Protocol(e.into()))?;
    let answer = read_password(tls, MAX_TOKEN_BYTES)
        .await
        .map_err(Refusal::Protocol)?;
    let bytes = match answer {
        PasswordAnswer::TooLarge => return Err(Refusal::Token(TokenError::TooLarge)),
        PasswordAnswer::Password(bytes) => bytes,
    };
    let text = String::from_utf8(bytes).map_err(|_| Refusal::Token(TokenError::Malformed))?;
    let token = BearerToken::new(text).map_err(Refusal::Token)?;
    tokens.verify(&token).await.map_err(Refusal::Token)
}

async fn accept_tls(services: &Services, tcp: TcpStream, peer: SocketAddr) -> Option<ClientStream> {
    let acceptor = services.tls().acceptor.clone();
    match acceptor.accept(MovableTcp::new(tcp)).await {
        Ok(tls) => Some(tls),
        Err(error) => {
            tracing::info!(client_addr = %peer, %error, "TLS handshake failed");
            None
        }
    }
}

/// Send the refusal as a FATAL `ErrorResponse` and close.
pub async fn refuse<S: AsyncWrite + Unpin>(stream: S, refusal: Refusal, peer: SocketAddr) {
    tracing::info!(client_addr = %peer, sqlstate = refusal.sqlstate(), reason = %refusal, "connection refused");
    refuse_quietly(stream, refusal).await;
}

/// [`refuse`] without the log line (the peer is over its refusal event
/// rate; the refusal is still counted).
async fn refuse_quietly<S: AsyncWrite + Unpin>(mut stream: S, refusal: Refusal) {
    metrics::counter!(crate::ops::telemetry::DENIALS, "reason" => refusal.label()).increment(1);
    let _ = stream.write_all(&refusal.to_message()).await;
    let _ = stream.shutdown().await;
}

/// Refuse, and record the denial in the audit log and metrics.
pub async fn refuse_and_audit<S: AsyncWrite + Unpin>(
    services: &Services,
    stream: S,
    refusal: Refusal,
    peer: SocketAddr,
    identity: Option<String>,
    template: Option<String>,
) {
    match services.refusal_events.admit(peer.ip()) {
        Some(suppressed) => {
            let mut event = AuditEvent::denied(identity, template, peer, refusal.to_string());
            if suppressed > 0 {
                event = event.suppressed(suppressed);
            }
            services.leases.audit().record(event);
            refuse(stream, refusal, peer).await;
        }
        None => {
            metrics::counter!(crate::ops::telemetry::REFUSAL_EVENTS_SUPPRESSED).increment(1);
            refuse_quietly(stream, refusal).await;
        }
    }
}

/// Shared by the accept loop: run the front door under the handshake timeout.
pub async fn admit_within_timeout(
    services: &Arc<Services>,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<Admitted> {
    let started = std::time::Instant::now();
    match tokio::time::timeout(services.handshake_timeout, admit(services, tcp, peer)).await {
        Ok(admitted) => {
            if admitted.is_some() {
                metrics::histogram!(crate::ops::telemetry::HANDSHAKE_SECONDS)
                    .record(started.elapsed().as_secs_f64());
            }
            admitted
        }
        Err(_) => {
            tracing::info!(client_addr = %peer, timeout = ?services.handshake_timeout, "handshake timed out; connection closed");
            None
        }
    }
}
