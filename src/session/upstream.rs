//! Upstream: connecting to PostgreSQL and logging in as the minted role.
//!
//! tokio-postgres cannot hand over its socket after login, so the login is a
//! small loop of our own over `postgres-protocol` messages and Ephemera's
//! sans-IO SCRAM client. What it returns is the raw stream, ready to relay,
//! plus what the client must be told: the server's `ParameterStatus`
//! messages (passed on verbatim) and the backend's cancel key (kept here).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::tls::upstream::SslMode;
use bytes::BytesMut;
use ephemera_engine::scram::{ScramClient, ScramError};
use ephemera_engine::UpstreamLogin;
use postgres_protocol::message::{backend, frontend};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::UpstreamSettings;
use crate::session::handoff::{MovableTcp, Rebind};
use crate::session::protocol::{error_fields, CancelKey};
use crate::session::quiet_socket::QuietUnixStream;

/// The largest message accepted from the upstream during login.
const MAX_LOGIN_MESSAGE_LEN: usize = 64 * 1024;

/// A connection to the upstream, with or without TLS.
pub enum UpstreamStream {
    Plain(MovableTcp),
    Tls(Box<TlsStream<MovableTcp>>),
    /// A Unix-domain socket on the same host (no TLS there), registered
    /// for the readiness the relay waits on only.
    Unix(QuietUnixStream),
}

impl UpstreamStream {
    /// Join the current runtime's reactor (`handoff.rs`).
    pub fn rebind(self) -> io::Result<Self> {
        Ok(match self {
            UpstreamStream::Plain(mut tcp) => {
                tcp.rebind()?;
                UpstreamStream::Plain(tcp)
            }
            UpstreamStream::Tls(mut tls) => {
                tls.rebind()?;
                UpstreamStream::Tls(tls)
            }
            UpstreamStream::Unix(unix) => UpstreamStream::Unix(unix.rebind()?),
        })
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            UpstreamStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            UpstreamStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            UpstreamStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            UpstreamStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            UpstreamStream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
            UpstreamStream::Unix(s) => s.is_write_vectored(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not connect to the upstream PostgreSQL at {address}: {source}")]
    Connect { address: String, source: io::Error },
    #[error("timed out connecting to the upstream PostgreSQL at {address}")]
    ConnectTimeout { address: String },
    #[error(
        "the upstream PostgreSQL at {address} does not accept TLS (upstream.sslmode is {mode:?})"
    )]
    TlsRefused { address: String, mode: SslMode },
    #[error("TLS with the upstream PostgreSQL at {address} failed: {source}")]
    Tls { address: String, source: io::Error },
    #[error("lost the connection to the upstream PostgreSQL during login: {0}")]
    Io(#[from] io::Error),
    /// The server sent an `ErrorResponse`; `raw` is the whole message, to be
    /// passed on to the client as is.
    #[error("the upstream PostgreSQL refused the login: {message} (SQLSTATE {code})")]
    Refused {
        code: String,
        message: String,
        raw: BytesMut,
    },
    #[error("the upstream PostgreSQL asked for {0} authentication; minted roles need scram-sha-256 in its pg_hba.conf")]
    UnsupportedAuth(&'static str),
    #[error(
        "the upstream PostgreSQL asked for {0} authentication instead of taking the client \
         certificate (upstream.login = \"certificate\"): its pg_hba.conf needs a line \
         `hostssl <database> all <Ephemera's address> cert clientcert=verify-full` before any \
         other line matching minted roles, and ssl_ca_file must be upstream.login_ca_cert"
    )]
    CertificateNotAccepted(&'static str),
    #[error("upstream.login = \"certificate\" needs TLS, but {address} is reached without it")]
    CertificateNeedsTls { address: String },
    #[error("SCRAM authentication with the upstream failed: {0}")]
    Scram(#[from] ScramError),
    #[error("unexpected message {0:?} from the upstream during login")]
    Unexpected(char),
}

/// A logged-in upstream session, ready to relay.
pub struct UpstreamSession {
    pub stream: UpstreamStream,
    /// The backend's own cancel key; never shown to the client.
    pub backend_key: CancelKey,
    /// `ParameterStatus` and `NoticeResponse` messages, verbatim, for the client.
    pub greeting: BytesMut,
    /// The server's `ReadyForQuery`, verbatim.
    pub ready_for_query: BytesMut,
}

/// Open a connection to the upstream, negotiating TLS per `sslmode`.
pub async fn connect(settings: &UpstreamSettings) -> Result<UpstreamStream, UpstreamError> {
    connect_with(settings, None).await
}

/// [`connect`], with `client_tls` (a configuration presenting a client
/// certificate) in place of the upstream's own TLS configuration.
async fn connect_with(
    settings: &UpstreamSettings,
    client_tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<UpstreamStream, UpstreamError> {
    let address = settings.address();
    if let Some(path) = settings.unix_socket() {
        if client_tls.is_some() {
            return Err(UpstreamError::CertificateNeedsTls { address });
        }
        let unix = tokio::time::timeout(settings.connect_timeout, UnixStream::connect(path))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout {
                address: address.clone(),
            })?
            .and_then(QuietUnixStream::new)
            .map_err(|source| UpstreamError::Connect { address, source })?;
        return Ok(UpstreamStream::Unix(unix));
    }
    let tcp = tokio::time::timeout(
        settings.connect_timeout,
        TcpStream::connect((settings.host.as_str(), settings.port)),
    )
    .await
    .map_err(|_| UpstreamError::ConnectTimeout {
        address: address.clone(),
    })?
    .map_err(|source| UpstreamError::Connect {
        address: address.clone(),
        source,
    })?;
    tcp.set_nodelay(true)?;
    if settings.tls.mode == SslMode::Disable {
        if client_tls.is_some() {
            return Err(UpstreamError::CertificateNeedsTls { address });
        }
        return Ok(UpstreamStream::Plain(MovableTcp::new(tcp)));
    }
    let mut tcp = tcp;
    let mut request = BytesMut::with_capacity(8);
    frontend::ssl_request(&mut request);
    tcp.write_all(&request).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    if answer[0] != b'S' {
        return Err(UpstreamError::TlsRefused {
            address,
            mode: settings.tls.mode,
        });
    }
    let server_name =
        ServerName::try_from(settings.host.clone()).map_err(|e| UpstreamError::Tls {
            address: address.clone(),
            source: io::Error::new(io::ErrorKind::InvalidInput, e),
        })?;
    let config = client_tls.unwrap_or_else(|| settings.tls.client_config());
    let tls = TlsConnector::from(config)
        .connect(server_name, MovableTcp::new(tcp))
        .await
        .map_err(|source| UpstreamError::Tls { address, source })?;
    Ok(UpstreamStream::Tls(Box::new(tls)))
}

/// How the login proves the role: SCRAM (keys or a password), or the
/// client certificate presented in the TLS handshake, after which the
/// server must not ask for anything else.
enum Prover<'a> {
    Scram(ScramClient<'a>),
    Certificate,
}

/// Log in as `user` (the lease's role) with its credential: SCRAM keys
/// or a password, both spoken as SCRAM-SHA-256, or a client certificate.
pub async fn login(
    settings: &UpstreamSettings,
    user: &str,
    database: &str,
    client_parameters: &[(String, String)],
    credential: &UpstreamLogin,
) -> Result<UpstreamSession, UpstreamError> {
    let (mut prover, client_tls) = match credential {
        UpstreamLogin::Scram(secret) => (Prover::Scram(ScramClient::new(secret)), None),
        UpstreamLogin::Password(password) => {
            (Prover::Scram(ScramClient::with_password(password)), None)
        }
        UpstreamLogin::Certificate(cert) => {
            let (chain, key) = cert.for_handshake();
            let config =
                settings
                    .tls
                    .with_client_cert(chain, key)
                    .map_err(|e| UpstreamError::Tls {
                        address: settings.address(),
                        source: io::Error::other(e.to_string()),
                    })?;
            (Prover::Certificate, Some(config))
        }
    };
    let mut stream = connect_with(settings, client_tls).await?;
    let mut out = BytesMut::with_capacity(256);
    let parameters = [("user", user), ("database", database)].into_iter().chain(
        client_parameters
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    frontend::startup_message(parameters, &mut out)?;
    stream.write_all(&out).await?;

    let mut greeting = BytesMut::with_capacity(512);
    let mut backend_key = None;
    loop {
        let raw = read_message(&mut stream).await?;
        let tag = raw[0];
        let message = backend::Message::parse(&mut raw.clone())?
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "truncated message"))?;
        match message {
            backend::Message::ParameterStatus(_) | backend::Message::NoticeResponse(_) => {
                greeting.extend_from_slice(&raw);
            }
            backend::Message::BackendKeyData(body) => {
                backend_key = Some(CancelKey {
                    pid: body.process_id(),
                    secret: body.secret_key(),
                });
            }
            backend::Message::ReadyForQuery(_) => {
                let backend_key = backend_key.ok_or(UpstreamError::Unexpected('Z'))?;
                return Ok(UpstreamSession {
                    stream,
                    backend_key,
                    greeting,
                    ready_for_query: raw,
                });
            }
            backend::Message::ErrorResponse(_) => {
                let (code, message) = error_fields(&raw[5..]);
                return Err(UpstreamError::Refused { code, message, raw });
            }
            message => {
                if let Some(reply) = authenticate(&mut prover, message, &raw, tag)? {
                    stream.write_all(&reply).await?;
                }
            }
        }
    }
}

/// One authentication message from the server: what to answer, if
/// anything.
fn authenticate(
    prover: &mut Prover<'_>,
    message: backend::Message,
    raw: &[u8],
    tag: u8,
) -> Result<Option<BytesMut>, UpstreamError> {
    use backend::Message as M;
    let mut out = BytesMut::with_capacity(256);
    let asked = match (&mut *prover, message) {
        (_, M::AuthenticationOk) => return Ok(None),
        (Prover::Scram(scram), M::AuthenticationSasl(_)) => {
            if !sasl_mechanisms(raw).any(|m| m == ScramClient::MECHANISM.as_bytes()) {
                return Err(UpstreamError::UnsupportedAuth(
                    "a SASL mechanism other than SCRAM-SHA-256",
                ));
            }
            frontend::sasl_initial_response(
                ScramClient::MECHANISM,
                &scram.client_first(),
                &mut out,
            )?;
            return Ok(Some(out));
        }
        (Prover::Scram(scram), M::AuthenticationSaslContinue(body)) => {
            let reply = scram.client_final(body.data())?;
            frontend::sasl_response(&reply, &mut out)?;
            return Ok(Some(out));
        }
        (Prover::Scram(scram), M::AuthenticationSaslFinal(body)) => {
            scram.verify_server_final(body.data())?;
            return Ok(None);
        }
        (
            _,
            M::AuthenticationSasl(_)
            | M::AuthenticationSaslContinue(_)
            | M::AuthenticationSaslFinal(_),
        ) => "scram-sha-256",
        (_, M::AuthenticationCleartextPassword) => "password",
        (_, M::AuthenticationMd5Password(_)) => "md5",
        (
            _,
            M::AuthenticationKerberosV5
            | M::AuthenticationGss
            | M::AuthenticationGssContinue(_)
            | M::AuthenticationSspi
            | M::AuthenticationScmCredential,
        ) => "GSS/SSPI/Kerberos",
        _ => return Err(UpstreamError::Unexpected(tag as char)),
    };
    Err(match prover {
        Prover::Certificate => UpstreamError::CertificateNotAccepted(asked),
        Prover::Scram(_) => UpstreamError::UnsupportedAuth(asked),
    })
}

/// Read one backend message (type byte, length, body) by its exact length.
async fn read_message<S: AsyncRead + Unpin>(stream: &mut S) -> Result<BytesMut, UpstreamError> {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if !(4..=MAX_LOGIN_MESSAGE_LEN).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad message length from upstream",
        )
        .into());
    }
    let mut message = BytesMut::zeroed(len + 1);
    message[..5].copy_from_slice(&header);
    stream.read_exact(&mut message[5..]).await?;
    Ok(message)
}

/// The mechanism names in a raw `AuthenticationSASL` message.
fn sasl_mechanisms(raw: &[u8]) -> impl Iterator<Item = &[u8]> {
    raw.get(9..)
        .unwrap_or_default()
        .split(|&b| b == 0)
        .take_while(|m| !m.is_empty())
}

/// Forward a cancel request for `key` to the upstream. Fire and forget:
/// PostgreSQL answers a cancel request by closing the connection.
pub async fn send_cancel(settings: &UpstreamSettings, key: CancelKey) -> Result<(), UpstreamError> {
    let mut stream = connect(settings).await?;
    let mut out = BytesMut::with_capacity(16);
    frontend::cancel_request(key.pid, key.secret, &mut out);
    stream.write_all(&out).await?;
    stream.flush().await?;
    // Wait for the server to close, so the cancel is processed before we
    // report it sent; bounded by the connect timeout.
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(settings.connect_timeout, stream.read(&mut sink)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    #[test]
    fn sasl_mechanisms_are_listed() {
        let mut raw = BytesMut::new();
        raw.put_u8(b'R');
        raw.put_u32(0);
        raw.put_u32(10);
        raw.put_slice(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        let list: Vec<&[u8]> = sasl_mechanisms(&raw).collect();
        assert_eq!(list, [&b"SCRAM-SHA-256-PLUS"[..], b"SCRAM-SHA-256"]);
    }
}
