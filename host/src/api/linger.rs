//! The lingering close of every API connection: the pipelined reader's and hyper's.
//!
//! A server that closes a socket whose input it has not read all of makes the kernel
//! answer with a reset. The client then loses what it had not read yet (the answer that
//! explains the close: a 408, a 413, the last pipelined answers at shutdown), and a
//! client still sending its body gets a write error before it ever reads that answer.
//! So a server ends a connection by sending FIN after its answers, then reading and
//! dropping what the client still sends until the client closes too, for at most
//! [`LINGER`], as Apache's and nginx's lingering close do.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// How long a closing connection goes on reading what the client still sends.
pub const LINGER: Duration = Duration::from_secs(1);

/// Bytes read and dropped per read while lingering.
const DISCARD_CHUNK_BYTES: usize = 8 << 10;

/// A stream whose `poll_shutdown` is a lingering close: FIN, then reads dropped until
/// the peer's end of input, a read error or [`LINGER`], whichever comes first. Reads
/// and writes pass through.
pub struct Linger<S> {
    inner: S,
    state: State,
}

enum State {
    Open,
    /// FIN sent; reading until the deadline.
    Draining(Pin<Box<Sleep>>),
    Closed,
}

impl<S> Linger<S> {
    pub fn new(inner: S) -> Linger<S> {
        Linger {
            inner,
            state: State::Open,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Linger<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Linger<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Open => {
                    // Only a FIN that went out makes lingering worth it.
                    ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
                    this.state = State::Draining(Box::pin(tokio::time::sleep(LINGER)));
                }
                State::Draining(deadline) => {
                    // Checked before every read, not only when a read waits: a client
                    // that keeps the socket full would otherwise keep it lingering, as
                    // tokio's cooperative budget then makes the read and the timer both
                    // answer `Pending` in every poll, even past the deadline.
                    if tokio::time::Instant::now() >= deadline.deadline() {
                        this.state = State::Closed;
                        continue;
                    }
                    let mut discard = [0u8; DISCARD_CHUNK_BYTES];
                    let mut buf = ReadBuf::new(&mut discard);
                    match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                        // More of what the client sent: dropped, read on.
                        Poll::Ready(Ok(())) if !buf.filled().is_empty() => continue,
                        // Its end of input, or an error: nothing more to wait for.
                        Poll::Ready(_) => this.state = State::Closed,
                        Poll::Pending => {
                            if deadline.as_mut().poll(cx).is_pending() {
                                return Poll::Pending;
                            }
                            this.state = State::Closed;
                        }
                    }
                }
                State::Closed => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn shutdown_reads_until_the_peer_closes() {
        let (server, mut client) = tokio::io::duplex(64);
        let mut server = Linger::new(server);
        let closing = tokio::spawn(async move { server.shutdown().await });
        let mut end = Vec::new();
        client.read_to_end(&mut end).await.unwrap();
        assert!(end.is_empty(), "the server's FIN comes first");
        // The client's late bytes are taken (the duplex holds only 64), not refused.
        client.write_all(&[7u8; 1000]).await.unwrap();
        assert!(!closing.is_finished());
        drop(client);
        closing.await.unwrap().unwrap();
    }

    /// A client that never stops sending, fast enough that every poll finds data, is
    /// cut at the deadline all the same (real time: a paused clock never advances
    /// while the writer is busy).
    #[tokio::test]
    async fn shutdown_stops_at_the_deadline_while_the_client_still_floods() {
        let (server, mut client) = tokio::io::duplex(4 << 20);
        let mut server = Linger::new(server);
        let flood = tokio::spawn(async move {
            let chunk = vec![1u8; 1 << 20];
            while client.write_all(&chunk).await.is_ok() {}
        });
        let started = tokio::time::Instant::now();
        tokio::time::timeout(LINGER * 5, server.shutdown())
            .await
            .expect("the lingering close ends")
            .unwrap();
        assert!(started.elapsed() >= LINGER);
        drop(server);
        flood.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_gives_up_after_the_linger_time() {
        let (server, client) = tokio::io::duplex(64);
        let mut server = Linger::new(server);
        let started = tokio::time::Instant::now();
        server.shutdown().await.unwrap();
        assert_eq!(started.elapsed(), LINGER);
        drop(client);
    }
}
