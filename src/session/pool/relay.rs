//! The pooled relay: bytes both ways, untouched, framed (type and length
//! only) to know whether the backend can serve the pool's next client.
//!
//! Two things differ from `session/relay.rs`: the client's `Terminate` is
//! never passed on (the backend stays logged in), and when the client
//! leaves, what was seen decides whether its backend may be reset and kept
//! ([`Seen::reusable`]). Unpooled templates never come here.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Poll};

use tokio::io::{AsyncRead, AsyncWrite};

use crate::session::relay::{Direction, Relayed, Watch};

/// One direction cut into messages: where each one begins, its type and
/// the first byte of its body (`ReadyForQuery`'s status).
#[derive(Debug, Default)]
struct Frames {
    header: [u8; 5],
    have: usize,
    /// Body bytes of the current message still to come.
    remaining: usize,
    /// The current message's type, while inside it; its body's first byte
    /// is still to be read when `first_pending`.
    kind: u8,
    first_pending: bool,
    first: Option<u8>,
    /// A length below 4: the stream cannot be framed any more.
    lost: bool,
}

/// What [`Frames::feed`] reports.
enum Frame {
    /// A message's type byte, at this offset of the chunk (before its
    /// length is known).
    Kind { kind: u8, at: usize },
    /// A message's header is complete.
    Start { kind: u8 },
    /// A message is complete; `first`: its body's first byte, if any.
    End { kind: u8, first: Option<u8> },
}

impl Frames {
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining == 0 && !self.lost
    }

    /// Feed a chunk; `on` sees each frame event in order and may stop the
    /// feed (returns false), e.g. at the client's `Terminate`.
    fn feed(&mut self, bytes: &[u8], mut on: impl FnMut(Frame) -> bool) {
        let mut i = 0;
        while i < bytes.len() && !self.lost {
            if self.remaining > 0 {
                if self.first_pending {
                    self.first = Some(bytes[i]);
                    self.first_pending = false;
                }
                let n = self.remaining.min(bytes.len() - i);
                self.remaining -= n;
                i += n;
                let (kind, first) = (self.kind, self.first);
                if self.remaining == 0 && !on(Frame::End { kind, first }) {
                    return;
                }
                continue;
            }
            if self.have == 0
                && !on(Frame::Kind {
                    kind: bytes[i],
                    at: i,
                })
            {
                return;
            }
            let n = (5 - self.have).min(bytes.len() - i);
            self.header[self.have..self.have + n].copy_from_slice(&bytes[i..i + n]);
            self.have += n;
            i += n;
            if self.have < 5 {
                return;
            }
            self.have = 0;
            let [kind, a, b, c, d] = self.header;
            let Some(body) = (u32::from_be_bytes([a, b, c, d]) as usize).checked_sub(4) else {
                self.lost = true;
                return;
            };
            self.kind = kind;
            if !on(Frame::Start { kind }) {
                return;
            }
            self.first = None;
            self.remaining = body;
            self.first_pending = body > 0;
            if body == 0 && !on(Frame::End { kind, first: None }) {
                return;
            }
        }
    }
}

/// What the relay has seen of the session, for the decision at its end.
#[derive(Debug)]
pub struct Seen {
    client: Frames,
    server: Frames,
    /// `Query`, `Sync` and `FunctionCall` messages sent and not yet
    /// answered by a `ReadyForQuery`.
    pub pending: u32,
    /// No extended-protocol message since the last `Sync`.
    synced: bool,
    /// The status of the last `ReadyForQuery` (`I`: idle, `T`, `E`).
    status: u8,
    /// A COPY began after the last `ReadyForQuery`.
    copying: bool,
    /// The client sent `Terminate` (it was not passed on).
    pub terminated: bool,
}

impl Default for Seen {
    /// A backend just logged in or reset: idle, nothing outstanding.
    fn default() -> Self {
        Seen {
            client: Frames::default(),
            server: Frames::default(),
            pending: 0,
            synced: true,
            status: b'I',
            copying: false,
            terminated: false,
        }
    }
}

impl Seen {
    /// Client bytes about to go upstream: how many of them may (all but a
    /// `Terminate` and anything after it).
    fn client_bytes(&mut self, bytes: &[u8]) -> usize {
        let mut keep = bytes.len();
        let (pending, synced, terminated) =
            (&mut self.pending, &mut self.synced, &mut self.terminated);
        self.client.feed(bytes, |frame| match frame {
            Frame::Kind { kind: b'X', at } => {
                keep = at;
                *terminated = true;
                false
            }
            Frame::Kind { .. } | Frame::Start { .. } => true,
            Frame::End { kind, .. } => {
                match kind {
                    b'Q' | b'S' | b'F' => {
                        *pending += 1;
                        *synced = true;
                    }
                    b'P' | b'B' | b'E' | b'D' | b'C' | b'H' => *synced = false,
                    _ => {}
                }
                true
            }
        });
        keep
    }

    fn server_bytes(&mut self, bytes: &[u8]) {
        let (pending, status, copying) = (&mut self.pending, &mut self.status, &mut self.copying);
        self.server.feed(bytes, |frame| {
            match frame {
                Frame::End { kind: b'Z', first } => {
                    *pending = pending.saturating_sub(1);
                    *status = first.unwrap_or(0);
                    *copying = false;
                }
                Frame::Start {
                    kind: b'G' | b'H' | b'W',
                } => *copying = true,
                _ => {}
            }
            true
        });
    }

    /// The client has left: may its backend be reset for the next client?
    /// Both streams at a message boundary, no COPY, no half-sent extended
    /// query, and either idle (`ReadyForQuery` `I` answered everything) or
    /// only whole queries outstanding, whose answers the reset reads first
    /// (it then insists on ending idle).
    pub fn reusable(&self) -> bool {
        self.client.at_boundary()
            && self.server.at_boundary()
            && self.synced
            && !self.copying
            && (self.pending > 0 || self.status == b'I')
    }
}

/// How a pooled client's relay ended.
pub struct Ended {
    pub relayed: Relayed,
    /// The server closed (or failed): the backend is gone.
    pub server_closed: bool,
    pub seen: Seen,
}

/// Relay until the client leaves (`Terminate`, end of stream, or its
/// connection failing: the backend is kept open) or the server closes
/// (the client is closed). Errors are the server side's.
pub async fn relay_pooled<C, U, W>(
    client: &mut C,
    upstream: &mut U,
    watch: &mut W,
) -> io::Result<Ended>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
    W: Watch + ?Sized,
{
    let mut seen = Seen::default();
    let mut up = Direction::new();
    let mut down = Direction::new();
    let server_closed = poll_fn(|cx| {
        let server_side = down.poll_copy(cx, &mut *upstream, &mut *client, |b| {
            watch.server_bytes(b);
            seen.server_bytes(b);
            b.len()
        });
        let client_turn = watch.poll_client_turn(cx).is_ready();
        match server_side {
            Poll::Ready(Ok(())) => {
                ready!(Pin::new(&mut *client).poll_shutdown(cx)).ok();
                return Poll::Ready(Ok::<bool, io::Error>(true));
            }
            // Writing to the client failed: it is gone, not the server.
            Poll::Ready(Err(_)) if !down.read_failed => return Poll::Ready(Ok(false)),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        if client_turn {
            let client_side = up.poll_copy(cx, &mut *client, &mut *upstream, |b| {
                let keep = seen.client_bytes(b);
                watch.client_bytes(&b[..keep]);
                keep
            });
            match client_side {
                // The client left: `Terminate`, end of stream, or a
                // connection that failed (a crash, a reset).
                Poll::Ready(Ok(())) => return Poll::Ready(Ok(false)),
                Poll::Ready(Err(_)) if up.read_failed => return Poll::Ready(Ok(false)),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    })
    .await?;
    Ok(Ended {
        relayed: Relayed {
            to_upstream: up.total,
            to_client: down.total,
        },
        server_closed,
        seen,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::session::protocol::test_message as message;

    #[test]
    fn terminate_is_cut_wherever_the_stream_is_split() {
        let query = message(b'Q', b"select 1\0");
        let stream = [query.clone(), message(b'X', b""), message(b'Q', b"x\0")].concat();
        for cut in 1..stream.len() {
            let mut seen = Seen::default();
            let mut kept = Vec::new();
            for chunk in stream.chunks(cut) {
                let keep = seen.client_bytes(chunk);
                kept.extend_from_slice(&chunk[..keep]);
                if seen.terminated {
                    break;
                }
            }
            assert!(seen.terminated, "chunks of {cut}");
            assert_eq!(kept, query, "chunks of {cut}");
            assert_eq!(seen.pending, 1);
        }
    }

    #[test]
    fn only_an_idle_backend_at_a_boundary_is_reusable() {
        let mut seen = Seen::default();
        assert!(seen.reusable(), "a fresh backend");
        seen.client_bytes(&message(b'Q', b"begin\0"));
        seen.server_bytes(&[message(b'C', b"BEGIN\0"), message(b'Z', b"T")].concat());
        assert!(!seen.reusable(), "inside a transaction");
        seen.client_bytes(&message(b'Q', b"copy t from stdin\0"));
        seen.server_bytes(&message(b'G', &[0, 0, 0]));
        assert!(!seen.reusable(), "inside COPY");
        let mut seen = Seen::default();
        seen.client_bytes(&message(b'P', b"\0select 1\0\0\0"));
        assert!(!seen.reusable(), "a Parse without its Sync");
        seen.client_bytes(&message(b'S', b""));
        assert!(
            seen.reusable(),
            "a whole query outstanding: the reset reads its answer"
        );
        seen.server_bytes(&message(b'1', b""));
        seen.server_bytes(&message(b'Z', b"I")[..3]);
        assert!(!seen.reusable(), "half a message from the server");
        seen.server_bytes(&message(b'Z', b"I")[3..]);
        assert!(seen.reusable());
        assert_eq!(seen.pending, 0);
    }
}
