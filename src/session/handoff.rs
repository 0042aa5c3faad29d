//! Handing an established session from the thread that ran its handshake
//! to the session thread that relays it.
//!
//! A tokio socket belongs to the reactor of the runtime it was registered
//! with. Handshakes (TLS, SVID checks, minting, the upstream login) cost
//! around a millisecond of CPU each, and on a session thread they would
//! make every relay sharing that thread wait for them (BENCHMARKS.md,
//! issue 14: the c=1 round trip tripled during a connect storm). So they
//! run on the multi-threaded runtime, and once a session is established
//! its sockets leave that reactor and join the session thread's
//! ([`Rebind::rebind`], called on the session thread). TLS state lives in
//! the rustls connection, not in the socket, and moves with it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Register again with the reactor of the runtime this is called on.
pub trait Rebind {
    fn rebind(&mut self) -> io::Result<()>;
}

/// A TCP socket that can move to another runtime's reactor.
pub struct MovableTcp(Option<TcpStream>);

impl MovableTcp {
    pub fn new(tcp: TcpStream) -> Self {
        MovableTcp(Some(tcp))
    }

    fn stream(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        match &mut self.0 {
            Some(tcp) => Ok(Pin::new(tcp)),
            // Only if a rebind failed half-way; the session is over then.
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl Rebind for MovableTcp {
    fn rebind(&mut self) -> io::Result<()> {
        let Some(tcp) = self.0.take() else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        // Leaves the old reactor (still non-blocking), joins this one.
        self.0 = Some(TcpStream::from_std(tcp.into_std()?)?);
        Ok(())
    }
}

impl Rebind for tokio_rustls::server::TlsStream<MovableTcp> {
    fn rebind(&mut self) -> io::Result<()> {
        self.get_mut().0.rebind()
    }
}

impl Rebind for tokio_rustls::client::TlsStream<MovableTcp> {
    fn rebind(&mut self) -> io::Result<()> {
        self.get_mut().0.rebind()
    }
}

impl AsyncRead for MovableTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().stream() {
            Ok(tcp) => tcp.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for MovableTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().stream() {
            Ok(tcp) => tcp.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().stream() {
            Ok(tcp) => tcp.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().stream() {
            Ok(tcp) => tcp.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().stream() {
            Ok(tcp) => tcp.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A socket moved to another runtime keeps its bytes, including ones
    /// that arrived before the move.
    #[tokio::test]
    async fn a_socket_moved_to_another_runtime_keeps_working() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let mut ours = MovableTcp::new(accepted);
        peer.write_all(b"before").await.unwrap();
        let other = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let moved = std::thread::spawn(move || {
            other.block_on(async move {
                ours.rebind().unwrap();
                let mut got = [0u8; 6];
                ours.read_exact(&mut got).await.unwrap();
                assert_eq!(&got, b"before");
                ours.write_all(b"after").await.unwrap();
                let mut more = [0u8; 4];
                ours.read_exact(&mut more).await.unwrap();
                assert_eq!(&more, b"more");
            })
        });
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"after");
        peer.write_all(b"more").await.unwrap();
        tokio::task::spawn_blocking(move || moved.join().unwrap())
            .await
            .unwrap();
    }
}
