//! One application connection: answer `SSLRequest`/`GSSENCRequest` with
//! `N`, read the startup packet, open TLS to Ephemera with the current
//! credential, forward the packet exactly as it came, and relay.
//!
//! Every failure before the relay is a `FATAL` `ErrorResponse` naming its
//! cause, never a hang: no usable SVID or token, or Ephemera unreachable,
//! is SQLSTATE 08001 (`sqlclient_unable_to_establish_sqlconnection`: the
//! connector is the client side here); a uid `--allow-uid` does not list is
//! 28000.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::shared::{Credential, Shared};
use super::{cancel, token};
use crate::session::protocol::{
    decode_first_packet, fatal, sqlstate, FirstPacket, ProtocolError, MAX_STARTUP_PACKET_LEN,
};

/// `sqlclient_unable_to_establish_sqlconnection`.
pub const UNABLE_TO_CONNECT: &str = "08001";
/// How long an application may take to send its startup packet.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// SSLRequest/GSSENCRequest answered before the startup packet must come.
const MAX_NEGOTIATIONS: usize = 2;

/// What came first from the application, once negotiation is done.
enum Opening {
    Startup(BytesMut),
    Cancel(crate::session::protocol::CancelKey),
}

/// Serve one application connection to its end. `refusal` is set when the
/// peer may not use the connector (`--allow-uid`): it is told so after its
/// startup packet, where every client reads the answer.
pub async fn serve<S>(shared: Arc<Shared>, mut app: S, refusal: Option<String>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    shared.metrics.connections.increment(1);
    let opening = match tokio::time::timeout(STARTUP_TIMEOUT, negotiate(&mut app)).await {
        Ok(Ok(opening)) => opening,
        Ok(Err(ProtocolError::Closed)) => return,
        Ok(Err(error)) => {
            shared.metrics.error("protocol");
            let message = format!("ephemera connect: {error}");
            return refuse(app, sqlstate::PROTOCOL_VIOLATION, &message).await;
        }
        Err(_) => return shared.metrics.error("startup_timeout"),
    };
    if let Some(reason) = refusal {
        shared.metrics.error("uid_refused");
        tracing::info!(%reason, "connection refused");
        return refuse(app, sqlstate::INVALID_AUTHORIZATION, &reason).await;
    }
    let startup = match opening {
        Opening::Cancel(key) => {
            let svid = match &shared.credential {
                Credential::Svid(source) => source.current().ok(),
                Credential::TokenFile(_) => None,
            };
            cancel::forward(&shared.dialer, svid.as_ref(), key).await;
            return;
        }
        Opening::Startup(startup) => startup,
    };
    match connect(&shared, &startup).await {
        Ok((server, first)) => relay(&shared, app, server, first).await,
        Err((cause, message)) => {
            shared.metrics.error(cause);
            tracing::warn!(cause, reason = %message, "cannot connect the application");
            refuse(
                app,
                UNABLE_TO_CONNECT,
                &format!("ephemera connect: {message}"),
            )
            .await;
        }
    }
}

type Server = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// TLS to Ephemera with the current credential; the startup packet sent.
/// With a token, Ephemera's password request is answered here; its first
/// other message (if one was read) goes to the application.
async fn connect(
    shared: &Shared,
    startup: &[u8],
) -> Result<(Server, Option<Vec<u8>>), (&'static str, String)> {
    let (svid, token) = match &shared.credential {
        Credential::Svid(source) => {
            let svid = source.current().map_err(|e| (e.label(), e.to_string()))?;
            shared.saw_svid(&svid);
            (Some(svid), None)
        }
        Credential::TokenFile(path) => {
            let token = token::read(path).map_err(|e| ("token_file", e.to_string()))?;
            (None, Some(token))
        }
    };
    let mut server = shared
        .dialer
        .dial(svid.as_ref())
        .await
        .map_err(|e| (e.label(), e.to_string()))?;
    let unreachable = |e: std::io::Error| {
        (
            "ephemera_unreachable",
            format!(
                "Ephemera at {} closed the connection: {e}",
                shared.dialer.to()
            ),
        )
    };
    server.write_all(startup).await.map_err(unreachable)?;
    server.flush().await.map_err(unreachable)?;
    let first = match token {
        Some(token) => token::answer_password_request(&mut server, &token)
            .await
            .map_err(|e| ("token_exchange", e.to_string()))?,
        None => None,
    };
    Ok((server, first))
}

async fn relay<S>(shared: &Shared, mut app: S, mut server: Server, first: Option<Vec<u8>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let Some(message) = first {
        if app.write_all(&message).await.is_err() {
            return;
        }
    }
    shared.metrics.sessions_active.increment(1.0);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut app, &mut server) => {}
        () = shared.stop.cancelled() => {
            let _ = app
                .write_all(&fatal(
                    sqlstate::ADMIN_SHUTDOWN,
                    "ephemera connect is shutting down",
                    None,
                ))
                .await;
        }
    }
    shared.metrics.sessions_active.decrement(1.0);
    let _ = server.shutdown().await;
    let _ = app.shutdown().await;
}

/// Answer encryption requests with `N` until the startup packet or a
/// cancel request comes.
async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    app: &mut S,
) -> Result<Opening, ProtocolError> {
    for _ in 0..=MAX_NEGOTIATIONS {
        let raw = read_raw_first_packet(app).await?;
        match decode_first_packet(raw.clone())? {
            FirstPacket::SslRequest | FirstPacket::GssEncRequest => {
                app.write_all(b"N").await?;
                app.flush().await?;
            }
            FirstPacket::Cancel(key) => return Ok(Opening::Cancel(key)),
            FirstPacket::Startup(_) => return Ok(Opening::Startup(raw)),
        }
    }
    Err(ProtocolError::Unexpected("a third encryption request"))
}

/// One first packet, exactly as sent (length prefix included).
async fn read_raw_first_packet<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<BytesMut, ProtocolError> {
    let mut header = [0u8; 4];
    reader.read_exact(&mut header).await?;
    let len = u32::from_be_bytes(header) as usize;
    if !(8..=MAX_STARTUP_PACKET_LEN).contains(&len) {
        return Err(ProtocolError::BadLength(len));
    }
    let mut packet = BytesMut::zeroed(len);
    packet[..4].copy_from_slice(&header);
    reader.read_exact(&mut packet[4..]).await?;
    Ok(packet)
}

async fn refuse<S: AsyncWrite + Unpin>(mut app: S, code: &str, message: &str) {
    let _ = app.write_all(&fatal(code, message, None)).await;
    let _ = app.flush().await;
    let _ = app.shutdown().await;
}
