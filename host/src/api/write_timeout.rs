//! A write timeout for every API connection: the pipelined reader's and hyper's.
//!
//! hyper's HTTP/1.1 server has a timeout for request heads but none for writes: a client
//! that sends requests and never reads the answers fills the socket buffers, the write
//! stays pending, and the connection (one of `connections_max`) is held for good.
//! [`WriteTimeout`] fails a write, and so ends the connection, once the socket has taken
//! no byte for the given time. It counts from the last progress, so a slow reader is
//! never cut; a socket with room, the common case, never starts a timer.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

pub struct WriteTimeout<S> {
    inner: S,
    timeout: Duration,
    /// The deadline of the write side: armed at the first write, flush or shutdown that
    /// could not proceed, disarmed by any that did. hyper flushes only once its buffered
    /// writes are done, so a finished flush never hides a write still stuck.
    deadline: Pin<Box<Sleep>>,
    armed: bool,
}

impl<S> WriteTimeout<S> {
    pub fn new(inner: S, timeout: Duration) -> WriteTimeout<S> {
        WriteTimeout {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            armed: false,
        }
    }

    /// The wrapped stream, for calls that are not writes.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// What a write attempt `polled` means once the timer is taken into account.
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(result) => {
                self.armed = false;
                Poll::Ready(result)
            }
            Poll::Pending => {
                let timeout = self.timeout;
                if !self.armed {
                    self.armed = true;
                    self.deadline
                        .as_mut()
                        .reset(tokio::time::Instant::now() + timeout);
                }
                ready!(self.deadline.as_mut().poll(cx));
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the client took no answer bytes for request_timeout_ms ({} ms)",
                        timeout.as_millis()
                    ),
                )))
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_takes_fails_after_the_timeout() {
        let (near, _far) = tokio::io::duplex(64);
        let mut stream = WriteTimeout::new(near, Duration::from_secs(30));
        let started = tokio::time::Instant::now();
        let written = tokio::time::timeout(Duration::from_secs(60), stream.write_all(&[0u8; 1024]));
        let error = written.await.expect("fails before 60 s").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_taking_bytes_is_never_cut() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut stream = WriteTimeout::new(near, Duration::from_secs(30));
        let reader = tokio::spawn(async move {
            let mut taken = 0;
            let mut chunk = [0u8; 64];
            // 64 bytes every 20 s: far slower than the writer, never 30 s without progress.
            while taken < 1024 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                taken += far.read(&mut chunk).await.unwrap();
            }
            taken
        });
        stream.write_all(&[0u8; 1024]).await.unwrap();
        drop(stream);
        assert_eq!(reader.await.unwrap(), 1024);
    }
}
