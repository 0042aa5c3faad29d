//! Relay: bytes both ways, untouched, until either side closes.

use tokio::io::{AsyncRead, AsyncWrite};

/// How many bytes went each way.
#[derive(Debug, Clone, Copy, Default)]
pub struct Relayed {
    pub to_upstream: u64,
    pub to_client: u64,
}

/// Copy until both directions are done (or one fails). No message parsing
/// on this path: the session is the client's and the server's.
pub async fn relay<C, U>(client: &mut C, upstream: &mut U) -> std::io::Result<Relayed>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (to_upstream, to_client) = tokio::io::copy_bidirectional(client, upstream).await?;
    Ok(Relayed {
        to_upstream,
        to_client,
    })
}
