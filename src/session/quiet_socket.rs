//! A Unix-domain socket that wakes the relay only for what it waits on.
//!
//! tokio registers a socket for readable *and* writable readiness. A Unix
//! stream socket signals "writable" every time its peer reads from it, so
//! with PostgreSQL on the other end every query PostgreSQL reads woke
//! Ephemera's thread for nothing (2.6–2.9 context switches per
//! transaction at one client instead of 2.0; BENCHMARKS.md, issue 14).
//! TCP does not do this: it signals "writable" only after a write has
//! found the send buffer full.
//!
//! So this socket is registered for readability only, and writes go
//! straight to the socket. Only when a write finds the buffer full (COPY
//! into a busy server) is a second descriptor of the same socket
//! registered for writability, and dropped again once a write goes
//! through: back-pressure still parks the relay, it just no longer pays for
//! readiness it never waits for.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

pub struct QuietUnixStream {
    /// Registered for readability only.
    reader: AsyncFd<UnixStream>,
    /// Registered for writability while a write is blocked, else `None`.
    blocked_writer: Option<AsyncFd<UnixStream>>,
}

impl QuietUnixStream {
    /// Take over a connected tokio socket (leaving its registration).
    pub fn new(stream: tokio::net::UnixStream) -> io::Result<Self> {
        let stream = stream.into_std()?;
        stream.set_nonblocking(true)?;
        Ok(QuietUnixStream {
            reader: register(stream, Interest::READABLE)?,
            blocked_writer: None,
        })
    }

    /// Leave the reactor this was registered with and join the current
    /// runtime's (a session handed to its session thread, `handoff.rs`).
    pub fn rebind(self) -> io::Result<Self> {
        // Dropping a registration leaves its reactor.
        drop(self.blocked_writer);
        Ok(QuietUnixStream {
            reader: register(self.reader.into_inner(), Interest::READABLE)?,
            blocked_writer: None,
        })
    }

    /// Write now if the socket takes it; else wait for writability on a
    /// descriptor registered for that alone.
    fn poll_write_with<T>(
        &mut self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&UnixStream) -> io::Result<T>,
    ) -> Poll<io::Result<T>> {
        loop {
            match &self.blocked_writer {
                None => match write(self.reader.get_ref()) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        let twin = self.reader.get_ref().try_clone()?;
                        self.blocked_writer = Some(register(twin, Interest::WRITABLE)?);
                        // Poll the new registration: the buffer may have
                        // drained between the write and the registration.
                    }
                    done => return Poll::Ready(done),
                },
                Some(writer) => {
                    let mut guard = ready!(writer.poll_write_ready(cx))?;
                    match guard.try_io(|fd| write(fd.get_ref())) {
                        Ok(done) => {
                            // Unblocked: stop listening for writability.
                            self.blocked_writer = None;
                            return Poll::Ready(done);
                        }
                        Err(_would_block) => continue,
                    }
                }
            }
        }
    }
}

/// Register `socket` with this thread's reactor for `interest` alone.
///
/// tokio 1.54 marks this registration `unsafe` (its safe form is
/// deprecated) because an arbitrary `AsRawFd` type could change or close
/// its descriptor while registered. A `std` `UnixStream` owns its
/// descriptor and never changes it, and the `AsyncFd` owns the stream, so
/// the condition holds; this crate forbids `unsafe`, hence the safe form.
#[allow(deprecated)]
fn register(socket: UnixStream, interest: Interest) -> io::Result<AsyncFd<UnixStream>> {
    AsyncFd::with_interest(socket, interest)
}

impl AsyncRead for QuietUnixStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.reader.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let room = unfilled.len();
            match guard.try_io(|fd| fd.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    if n > 0 && n < room {
                        // A short read emptied the socket: the next read
                        // would only say "would block". Wait for the next
                        // edge instead of paying that syscall (tokio's own
                        // sockets do the same).
                        // The guard's own event is cleared, so readiness
                        // that arrived since is kept.
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for QuietUnixStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |mut socket| socket.write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |mut socket| socket.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing is buffered here: every write went to the socket.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.reader.get_ref().shutdown(Shutdown::Write) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Back-pressure: once both socket buffers are full the writer is
    /// parked (registered for writability); when the peer reads, it
    /// resumes, and every byte arrives in order.
    #[tokio::test]
    async fn a_full_socket_parks_the_writer_until_the_peer_reads() {
        let (ours, mut theirs) = tokio::net::UnixStream::pair().unwrap();
        let mut ours = QuietUnixStream::new(ours).unwrap();
        let data: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let mut written = 0;
        while let Some(n) =
            std::future::poll_fn(
                |cx| match Pin::new(&mut ours).poll_write(cx, &data[written..]) {
                    Poll::Pending => Poll::Ready(None),
                    Poll::Ready(n) => Poll::Ready(Some(n.unwrap())),
                },
            )
            .await
        {
            written += n;
        }
        assert!(
            written < data.len(),
            "8 MiB cannot fit in the socket buffers"
        );
        assert!(ours.blocked_writer.is_some(), "parked on writability");
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            theirs.read_to_end(&mut got).await.unwrap();
            got
        });
        ours.write_all(&data[written..]).await.unwrap();
        assert!(
            ours.blocked_writer.is_none(),
            "writability is dropped again"
        );
        ours.shutdown().await.unwrap();
        let got = reader.await.unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "every byte, in order");
    }

    #[tokio::test]
    async fn reads_and_the_end_of_the_stream_arrive() {
        let (ours, mut theirs) = tokio::net::UnixStream::pair().unwrap();
        let mut ours = QuietUnixStream::new(ours).unwrap();
        theirs.write_all(b"hello").await.unwrap();
        drop(theirs);
        let mut got = Vec::new();
        ours.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
    }
}
