//! One pooled upstream backend: its socket (movable between session
//! threads, `session/handoff.rs`), its cancel key and what PostgreSQL
//! said at its login, and the reset that makes it fit for the next client.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::session::protocol::{error_fields, CancelKey};
use crate::session::upstream::{UpstreamSession, UpstreamStream};

/// Error and ReadyForQuery bodies read during a reset, at most; other
/// messages are skipped unread.
const MAX_READ: usize = 64 * 1024;

/// A logged-in backend of a pool.
pub struct Backend {
    pub stream: UpstreamStream,
    /// The backend's own cancel key (the pid is what clients are told).
    pub key: CancelKey,
    /// `ParameterStatus` and notices of its login, verbatim: after a reset
    /// the parameters are what they were at login, so each client is
    /// greeted with these.
    pub greeting: BytesMut,
    pub ready_for_query: BytesMut,
    /// The startup parameters it was opened with (application_name,
    /// options, …): only a client asking for the same ones gets it.
    pub parameters: Vec<(String, String)>,
    /// Since when it has been idle in the pool.
    pub idle_since: Instant,
}

/// Why a backend could not be reset (it is closed instead).
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("the reset query failed: {message} (SQLSTATE {code})")]
    Failed { code: String, message: String },
    #[error("the backend was not idle after the reset (status {0:?})")]
    NotIdle(char),
    #[error("a COPY started on the backend during its reset")]
    Copy,
    #[error("the reset took longer than {0:?}")]
    Timeout(Duration),
    #[error("bad message length from the backend during its reset")]
    Framing,
    #[error("the connection failed during the reset: {0}")]
    Io(#[from] std::io::Error),
}

impl Backend {
    pub fn new(session: UpstreamSession, parameters: Vec<(String, String)>) -> Backend {
        Backend {
            stream: session.stream,
            key: session.backend_key,
            greeting: session.greeting,
            ready_for_query: session.ready_for_query,
            parameters,
            idle_since: Instant::now(),
        }
    }

    /// Run `reset_query` and read until the backend is idle again: first
    /// the answers to the `pending` queries the last client left
    /// outstanding, then the reset's own. Any error of the reset, a COPY,
    /// or a status other than idle fails it.
    pub async fn reset(
        &mut self,
        reset_query: &str,
        pending: u32,
        timeout: Duration,
    ) -> Result<(), ResetError> {
        let mut out = BytesMut::with_capacity(reset_query.len() + 8);
        frontend::query(reset_query, &mut out)?;
        let stream = &mut self.stream;
        let work = async move {
            stream.write_all(&out).await?;
            stream.flush().await?;
            read_until_idle(stream, pending).await
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| ResetError::Timeout(timeout))?
    }

    /// Log out politely (a `Terminate`), within a second; on the runtime
    /// this is called on (the socket joins it first).
    pub async fn close(self) {
        let Ok(mut stream) = self.stream.rebind() else {
            return;
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), async move {
            stream.write_all(b"X\0\0\0\x04").await?;
            stream.shutdown().await
        })
        .await;
    }
}

/// Read messages until the `(pending + 1)`-th `ReadyForQuery`: the reset
/// query's. Errors before it belong to the last client's own queries.
async fn read_until_idle<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    pending: u32,
) -> Result<(), ResetError> {
    let mut ready = 0u32;
    let mut scratch = vec![0u8; 8192];
    loop {
        let mut header = [0u8; 5];
        stream.read_exact(&mut header).await?;
        let [kind, a, b, c, d] = header;
        let body = (u32::from_be_bytes([a, b, c, d]) as usize)
            .checked_sub(4)
            .ok_or(ResetError::Framing)?;
        match kind {
            b'Z' | b'E' if body <= MAX_READ => {
                let mut bytes = vec![0u8; body];
                stream.read_exact(&mut bytes).await?;
                if kind == b'E' && ready >= pending {
                    let (code, message) = error_fields(&bytes);
                    return Err(ResetError::Failed { code, message });
                }
                if kind == b'Z' {
                    ready += 1;
                    if ready > pending {
                        let status = bytes.first().copied().unwrap_or(0);
                        return match status {
                            b'I' => Ok(()),
                            other => Err(ResetError::NotIdle(other as char)),
                        };
                    }
                }
            }
            b'Z' | b'E' => return Err(ResetError::Framing),
            b'G' | b'H' | b'W' => return Err(ResetError::Copy),
            _ => {
                let mut left = body;
                while left > 0 {
                    let n = left.min(scratch.len());
                    stream.read_exact(&mut scratch[..n]).await?;
                    left -= n;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::session::protocol::test_message as message;

    async fn read_from(server: Vec<u8>, pending: u32) -> Result<(), ResetError> {
        let (mut ours, mut theirs) = tokio::io::duplex(1 << 16);
        theirs.write_all(&server).await.unwrap();
        read_until_idle(&mut ours, pending).await
    }

    #[tokio::test]
    async fn the_reset_reads_past_the_last_clients_answers() {
        let error = message(b'E', b"SERROR\0C42P01\0Mno such table\0\0");
        let answers = [
            error.clone(),
            message(b'Z', b"I"),
            message(b'C', b"DISCARD ALL\0"),
            message(b'Z', b"I"),
        ]
        .concat();
        read_from(answers, 1)
            .await
            .expect("the client's error is not the reset's");
        let failed = [error, message(b'Z', b"E")].concat();
        assert!(matches!(
            read_from(failed, 0).await,
            Err(ResetError::Failed { .. })
        ));
        let in_transaction = [message(b'C', b"BEGIN\0"), message(b'Z', b"T")].concat();
        assert!(matches!(
            read_from(in_transaction, 0).await,
            Err(ResetError::NotIdle('T'))
        ));
    }
}
