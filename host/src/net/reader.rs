//! Reads checked frames from a socket, many per read syscall.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::frame::{Frame, FrameDecoder, FrameError};

/// Room asked of each read when the buffer holds no partial frame: large enough
/// that a burst of small pipelined frames comes in with one syscall.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Why reading stopped.
#[derive(Debug)]
pub(crate) enum ReadError {
    Io(std::io::Error),
    Frame(FrameError),
    /// The peer closed the connection in the middle of a frame.
    Truncated {
        buffered_bytes: usize,
    },
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Io(error) => write!(f, "{error}"),
            ReadError::Frame(error) => write!(f, "{error}"),
            ReadError::Truncated { buffered_bytes } => {
                write!(
                    f,
                    "connection closed inside a frame ({buffered_bytes} bytes of it read)"
                )
            }
        }
    }
}

pub(crate) struct FrameReader<R> {
    source: R,
    decoder: FrameDecoder,
    buffer: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(source: R, frame_bytes_max: u32) -> FrameReader<R> {
        FrameReader {
            source,
            decoder: FrameDecoder::new(frame_bytes_max),
            buffer: BytesMut::new(),
        }
    }

    /// The next frame, or `None` when the peer closed the connection cleanly
    /// between frames. Cancel safe: bytes already read stay in the buffer.
    pub async fn next(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some(frame) = self
                .decoder
                .decode(&mut self.buffer)
                .map_err(ReadError::Frame)?
            {
                return Ok(Some(frame));
            }
            // The decoder reserved the rest of a partial frame whose header it
            // checked; otherwise make room for a chunk. Never more than that:
            // the claimed length of an unchecked header is not trusted.
            if self.buffer.capacity() - self.buffer.len() < READ_CHUNK_BYTES / 4 {
                self.buffer.reserve(READ_CHUNK_BYTES);
            }
            let read_bytes = self
                .source
                .read_buf(&mut self.buffer)
                .await
                .map_err(ReadError::Io)?;
            if read_bytes == 0 {
                if self.buffer.is_empty() {
                    return Ok(None);
                }
                return Err(ReadError::Truncated {
                    buffered_bytes: self.buffer.len(),
                });
            }
        }
    }

    /// Changes the largest payload accepted from now on: the handshake reads
    /// with the hello's size as the limit, so an unauthenticated connection
    /// cannot make this node buffer a `frame_bytes_max` frame.
    pub fn set_frame_bytes_max(&mut self, frame_bytes_max: u32) {
        self.decoder = FrameDecoder::new(frame_bytes_max);
    }

    /// Bytes read but not yet returned as frames.
    pub fn buffered_bytes(&self) -> usize {
        self.buffer.len()
    }
}
