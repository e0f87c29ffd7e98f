//! HTTP/1.1 connections whose pipelined commands are served concurrently.
//!
//! hyper's HTTP/1.1 server answers the requests of one connection one after another, so a
//! client that pipelines N commands on a connection would wait N commit latencies, and
//! each request would still cost its own read, write and wake-up. Every connection
//! therefore starts here: each `POST /v1/commands` is submitted to the node as soon as it
//! has been read, up to `pipeline_depth_max` per connection, and the answers go back in
//! request order (HTTP/1.1 allows no other), as many as are ready in one write.
//!
//! Only plain commands are taken here. The first request of any other kind (another
//! route or method, a query string, a chunked body, `Expect`, a `Connection` other than
//! `keep-alive`, HTTP/1.0, an invalid `Idempotency-Key`, too large, malformed) hands the connection, with the bytes
//! already read, to hyper once the commands before it are answered; hyper serves it from
//! then on. So every other route, every refusal and every error of the HTTP layer stays
//! hyper's and `routes`', and a command answered here gets the answer `routes` gives (the
//! same submission, timeout and outcome mapping, through [`routes::submit_command`]).

use std::io::{self, Write as _};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::future::Either;
use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;
use http_body_util::BodyExt;
use hyper::{Method, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::linger::Linger;
use super::routes::{self, Body, BodyWindow, Route, Shared};
use super::write_timeout::WriteTimeout;
use super::{ApiConfig, HEADER_IDEMPOTENCY_KEY};
use crate::node::handle::{CommandRequest, NodeApi};

/// Answers are gathered into one write up to about this many bytes.
const WRITE_BYTES_MAX: usize = 256 << 10;
/// Headers of a command request taken here; a request with more goes to hyper.
const REQUEST_HEADERS_MAX: usize = 32;
/// A request head longer than this goes to hyper, which applies its own limits.
const REQUEST_HEAD_BYTES_MAX: usize = 16 << 10;
/// Room reserved in the input buffer before each read.
const READ_CHUNK_BYTES: usize = 16 << 10;

/// How a connection left this module.
pub enum Ended {
    /// Closed (by the client, an I/O error, shutdown or the header timeout).
    Closed,
    /// A request for hyper is next: serve the connection with these bytes read first.
    HandOver(Bytes),
}

/// What the front of the input buffer holds.
enum Next {
    /// A whole command request of `bytes` bytes.
    Command {
        bytes: usize,
        request: CommandRequest,
    },
    /// The start of a request that may become a command: read more. `head_complete`
    /// once only its body is missing.
    Partial { head_complete: bool },
    /// A request this module does not take.
    Other,
}

/// Serves `stream` until it closes or a request for hyper comes next.
pub async fn serve<N: NodeApi>(
    stream: &mut TcpStream,
    shared: &Arc<Shared<N>>,
    header_read_timeout: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Ended {
    // A client that pipelines and stops reading its answers is cut once a write has
    // made no progress for `request_timeout_ms`, as on hyper's connections.
    let write_timeout = Duration::from_millis(shared.config.request_timeout_ms);
    let mut stream = WriteTimeout::new(stream, write_timeout);
    let mut input = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let mut output = Vec::new();
    let mut answers = FuturesOrdered::new();
    // Payload bytes of the commands in `answers`.
    let mut answers_bytes = 0usize;
    let mut dates = DateCache::default();
    let mut other_next = false;
    let mut end_of_input = false;
    // The server is shutting down, or this connection must end (a body came too
    // slowly): take no more requests, answer those taken, then close.
    let mut shutting_down = *shutdown.borrow();
    // Since when the connection has waited for a request head with nothing in flight:
    // as in hyper, an idle keep-alive connection and a slow head share one timeout.
    let mut idle_since: Option<Instant> = None;
    // The body window restarts when a pending body makes its progress (or bytes come
    // while none is pending), and after the server itself held things up (not reading a
    // full pipeline, writing answers).
    let mut body_window = BodyWindow::new(&shared.config);
    loop {
        let mut body_pending = false;
        let mut consumed = false;
        while !other_next
            && !shutting_down
            && has_room(&shared.config, answers.len(), answers_bytes)
        {
            match next_request(&input, &shared.config) {
                Next::Command { bytes, request } => {
                    consumed = true;
                    input.advance(bytes);
                    answers_bytes += request.payload.len();
                    answers.push_back(Either::Left(answer(shared.clone(), request)));
                }
                Next::Partial { head_complete } => {
                    // As in hyper, the header timeout does not cover the body.
                    body_pending = head_complete;
                    break;
                }
                Next::Other => other_next = true,
            }
        }
        if consumed && body_pending {
            // A body completed and the next one starts: it gets a window of its own.
            body_window.restart();
        }
        if answers.is_empty() {
            if other_next {
                return if shutting_down {
                    Ended::Closed
                } else {
                    Ended::HandOver(input.freeze())
                };
            }
            if end_of_input || shutting_down {
                return Ended::Closed;
            }
        }
        if answers.is_empty() && !body_pending {
            idle_since.get_or_insert_with(Instant::now);
        } else {
            idle_since = None;
        }
        let head_deadline = idle_since.map(|since| since + header_read_timeout);
        let may_read = !other_next
            && !end_of_input
            && !shutting_down
            && has_room(&shared.config, answers.len(), answers_bytes);
        let body_deadline = (body_pending && may_read).then(|| body_window.deadline());
        input.reserve(READ_CHUNK_BYTES);
        tokio::select! {
            read = stream.read_buf(&mut input), if may_read => match read {
                Ok(0) => end_of_input = true,
                Ok(read) => {
                    body_window.note(read, body_pending);
                }
                Err(error) => {
                    tracing::debug!(%error, "api: read failed");
                    return Ended::Closed;
                }
            },
            Some((first, bytes)) = answers.next(), if !answers.is_empty() => {
                // What is answered by now goes in one write, up to a bound.
                let now = dates.now();
                answers_bytes -= bytes;
                let mut last_head_end = encode(first, now, &mut output);
                while output.len() < WRITE_BYTES_MAX {
                    let Some(Some((next, bytes))) = answers.next().now_or_never() else {
                        break;
                    };
                    answers_bytes -= bytes;
                    last_head_end = encode(next, now, &mut output);
                }
                if shutting_down && answers.is_empty() {
                    // The last answer on this connection says so, as hyper's would.
                    output.splice(
                        last_head_end..last_head_end,
                        b"connection: close\r\n".iter().copied(),
                    );
                }
                if let Err(error) = stream.write_all(&output).await {
                    tracing::debug!(%error, "api: write failed");
                    return Ended::Closed;
                }
                body_window.restart();
                output.clear();
                if output.capacity() > WRITE_BYTES_MAX * 4 {
                    output = Vec::new();
                }
            }
            () = sleep_until_some(head_deadline) => {
                tracing::debug!("api: no whole request head within header_read_timeout; closing");
                return Ended::Closed;
            }
            () = sleep_until_some(body_deadline) => {
                // Bytes that arrived just as the deadline passed still count, if they
                // complete the body or make the progress a window needs.
                let read = match stream.get_mut().try_read_buf(&mut input) {
                    Ok(0) => {
                        end_of_input = true;
                        0
                    }
                    Ok(read) => read,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(error) => {
                        tracing::debug!(%error, "api: read failed");
                        return Ended::Closed;
                    }
                };
                let restarted = body_window.note(read, true);
                let completed = !matches!(
                    next_request(&input, &shared.config),
                    Next::Partial { head_complete: true }
                );
                if !restarted && !completed {
                    // As hyper's path does (`routes::body_timeout`): 408 in its place
                    // among the answers, then close, since the rest of that body could
                    // not be told from a next request. The last answer gets
                    // `connection: close` below.
                    tracing::debug!("api: a command body made too little progress; answering 408 and closing");
                    let response = routes::body_timeout(&shared.config);
                    shared.metrics.observe(
                        Route::Commands,
                        &Method::POST,
                        response.status(),
                        body_window.length(),
                    );
                    answers.push_back(Either::Right(std::future::ready((response, 0))));
                    shutting_down = true;
                }
            }
            changed = shutdown.changed(), if !shutting_down => {
                // A dropped sender means the server is gone: stop as for a shutdown.
                shutting_down = changed.is_err() || *shutdown.borrow();
            }
        }
        if !may_read {
            // The time the server did not read (a full pipeline) is not the client's.
            body_window.restart();
        }
    }
}

/// Whether another command may be taken with `count` commands of `bytes` payload bytes
/// in flight.
fn has_room(config: &ApiConfig, count: usize, bytes: usize) -> bool {
    count < config.pipeline_depth_max && bytes < config.pipeline_bytes_max
}

/// Ends a connection this module served with a lingering close (see [`Linger`]): a
/// pipelining client at shutdown, or one still sending the body that got a 408, reads
/// every answer instead of a reset.
pub async fn close(stream: &mut TcpStream) {
    let _ = Linger::new(stream).shutdown().await;
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Submits one command and waits for its response; also returns the command's size.
async fn answer<N: NodeApi>(
    shared: Arc<Shared<N>>,
    request: CommandRequest,
) -> (Response<Body>, usize) {
    let bytes = request.payload.len();
    let started = Instant::now();
    let response = match routes::submit_command(&shared, request).await {
        Ok(response) | Err(response) => response,
    };
    shared.metrics.observe(
        Route::Commands,
        &Method::POST,
        response.status(),
        started.elapsed(),
    );
    (response, bytes)
}

/// Classifies the request at the front of `input`.
fn next_request(input: &[u8], config: &ApiConfig) -> Next {
    if input.is_empty() {
        return Next::Partial {
            head_complete: false,
        };
    }
    let mut headers = [httparse::EMPTY_HEADER; REQUEST_HEADERS_MAX];
    let mut request = httparse::Request::new(&mut headers);
    let head_bytes = match request.parse(input) {
        Ok(httparse::Status::Complete(bytes)) => bytes,
        Ok(httparse::Status::Partial) if input.len() <= REQUEST_HEAD_BYTES_MAX => {
            // Decide as early as the request line allows, so a request for hyper is
            // handed over without waiting for more of it.
            let not_a_command = request.method.is_some_and(|method| method != "POST")
                || request.path.is_some_and(|path| path != "/v1/commands");
            return if not_a_command {
                Next::Other
            } else {
                Next::Partial {
                    head_complete: false,
                }
            };
        }
        Ok(httparse::Status::Partial) | Err(_) => return Next::Other,
    };
    if request.method != Some("POST")
        || request.path != Some("/v1/commands")
        || request.version != Some(1)
    {
        return Next::Other;
    }
    let mut body_bytes = None;
    let mut idempotency_key = None;
    for header in request.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            if body_bytes.is_some() {
                return Next::Other;
            }
            match content_length(header.value) {
                Some(length) if (1..=config.body_bytes_max).contains(&length) => {
                    body_bytes = Some(length);
                }
                _ => return Next::Other,
            }
        } else if name.eq_ignore_ascii_case(HEADER_IDEMPOTENCY_KEY) {
            if idempotency_key.is_some() {
                return Next::Other;
            }
            match routes::checked_idempotency_key(header.value, config) {
                Ok(key) => idempotency_key = Some(key),
                Err(_) => return Next::Other,
            }
        } else if name.eq_ignore_ascii_case("connection") {
            // `keep-alive` (which some clients send) is HTTP/1.1's default; anything
            // else (`close`, `upgrade`, hop-by-hop names) is hyper's to handle.
            let keep_alive_only = header
                .value
                .split(|&byte| byte == b',')
                .all(|token| token.trim_ascii().eq_ignore_ascii_case(b"keep-alive"));
            if !keep_alive_only {
                return Next::Other;
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return Next::Other;
        }
    }
    let Some(body_bytes) = body_bytes else {
        return Next::Other;
    };
    let bytes = head_bytes + body_bytes;
    if input.len() < bytes {
        return Next::Partial {
            head_complete: true,
        };
    }
    Next::Command {
        bytes,
        request: CommandRequest {
            payload: input[head_bytes..bytes].to_vec(),
            idempotency_key,
        },
    }
}

/// A `Content-Length` value: decimal digits only (hyper's rule), no overflow.
fn content_length(value: &[u8]) -> Option<usize> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Appends `response` in HTTP/1.1 form, with the headers hyper would add; returns the
/// offset in `output` where one more header line would go (before the empty line).
fn encode(response: Response<Body>, date: &str, output: &mut Vec<u8>) -> usize {
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .now_or_never()
        .expect("a Full body is ready at once")
        .unwrap_or_else(|never| match never {})
        .to_bytes();
    let status = parts.status;
    output.extend_from_slice(b"HTTP/1.1 ");
    output.extend_from_slice(status.as_str().as_bytes());
    output.push(b' ');
    output.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    output.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        output.extend_from_slice(name.as_str().as_bytes());
        output.extend_from_slice(b": ");
        output.extend_from_slice(value.as_bytes());
        output.extend_from_slice(b"\r\n");
    }
    write!(output, "content-length: {}", body.len()).expect("writing to a Vec never fails");
    output.extend_from_slice(b"\r\ndate: ");
    output.extend_from_slice(date.as_bytes());
    output.extend_from_slice(b"\r\n");
    let head_end = output.len();
    output.extend_from_slice(b"\r\n");
    output.extend_from_slice(&body);
    head_end
}

/// The `Date` header value, formatted once per second.
#[derive(Default)]
struct DateCache {
    second: u64,
    text: String,
}

impl DateCache {
    fn now(&mut self) -> &str {
        let now = SystemTime::now();
        let second = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        if self.text.is_empty() || second != self.second {
            self.second = second;
            self.text = httpdate::fmt_http_date(now);
        }
        &self.text
    }
}

/// A stream that yields `prefix` before the bytes of `inner`: hands hyper a connection
/// together with what was already read from it.
pub struct Rewind {
    prefix: Bytes,
    inner: TcpStream,
}

impl Rewind {
    pub fn new(prefix: Bytes, inner: TcpStream) -> Rewind {
        Rewind { prefix, inner }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let bytes = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..bytes]);
            self.prefix.advance(bytes);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
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
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(input: &[u8]) -> &'static str {
        match next_request(input, &ApiConfig::default()) {
            Next::Command { bytes, .. } if bytes == input.len() => "command",
            Next::Command { .. } => "command with more after it",
            Next::Partial {
                head_complete: false,
            } => "partial",
            Next::Partial {
                head_complete: true,
            } => "partial body",
            Next::Other => "other",
        }
    }

    #[test]
    fn plain_commands_are_taken_and_everything_else_goes_to_hyper() {
        let command = b"POST /v1/commands HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc";
        assert_eq!(classify(command), "command");
        for end in [1, 10, 30, command.len() - 4] {
            assert_eq!(classify(&command[..end]), "partial", "{end} bytes");
        }
        for end in [command.len() - 3, command.len() - 1] {
            assert_eq!(classify(&command[..end]), "partial body", "{end} bytes");
        }
        let mut two = command.to_vec();
        two.extend_from_slice(command);
        assert_eq!(classify(&two), "command with more after it");
        let kept =
            b"POST /v1/commands HTTP/1.1\r\nConnection: Keep-Alive\r\ncontent-length: 1\r\n\r\nx";
        assert_eq!(classify(kept), "command");
        let keyed =
            b"POST /v1/commands HTTP/1.1\r\nIdempotency-Key: k1\r\nContent-Length: 1\r\n\r\nx";
        match next_request(keyed, &ApiConfig::default()) {
            Next::Command { request, .. } => {
                assert_eq!(request.payload, b"x");
                assert_eq!(request.idempotency_key.as_deref(), Some("k1"));
            }
            _ => panic!("a keyed command is taken"),
        }
        for other in [
            &b"GET /v1/status HTTP/1.1\r\n\r\n"[..],
            b"GET /v1/sta",
            b"POST /v1/queries HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc",
            b"POST /v1/commands?x=1 HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc",
            b"POST /v1/commands HTTP/1.0\r\ncontent-length: 3\r\n\r\nabc",
            b"POST /v1/commands HTTP/1.1\r\n\r\n",
            b"POST /v1/commands HTTP/1.1\r\ncontent-length: 0\r\n\r\n",
            b"POST /v1/commands HTTP/1.1\r\ncontent-length: +3\r\n\r\nabc",
            b"POST /v1/commands HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabc",
            b"POST /v1/commands HTTP/1.1\r\ncontent-length: 9999999\r\n\r\n",
            b"POST /v1/commands HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            b"POST /v1/commands HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 3\r\n\r\n",
            b"POST /v1/commands HTTP/1.1\r\nconnection: close\r\ncontent-length: 3\r\n\r\nabc",
            b"POST /v1/commands HTTP/1.1\r\nconnection: keep-alive, upgrade\r\ncontent-length: 3\r\n\r\nabc",
            b"POST /v1/commands HTTP/1.1\r\nidempotency-key: a b\r\ncontent-length: 3\r\n\r\nabc",
            b"POST /v1/commands HTTP/1.1\r\nidempotency-key: a\r\nidempotency-key: a\r\ncontent-length: 3\r\n\r\nabc",
            b"POST /v1/commands HTTP/1.1\r\nbad header\r\n\r\n",
            b"\x16\x03\x01 tls",
        ] {
            assert_eq!(
                classify(other),
                "other",
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
        let mut long_head = b"POST /v1/commands HTTP/1.1\r\nx: ".to_vec();
        long_head.resize(REQUEST_HEAD_BYTES_MAX + 1, b'a');
        assert_eq!(classify(&long_head), "other");
    }

    #[test]
    fn responses_are_encoded_as_hyper_would() {
        let mut response = Response::new(Body::new(Bytes::from_static(b"OK")));
        response.headers_mut().insert(
            "content-type",
            hyper::header::HeaderValue::from_static("application/octet-stream"),
        );
        response.headers_mut().insert(
            "paxwasm-index",
            hyper::header::HeaderValue::from_static("7"),
        );
        let mut output = b"earlier answers".to_vec();
        let head_end = encode(response, "Fri, 27 Nov 2026 17:00:00 GMT", &mut output);
        assert_eq!(&output[head_end..head_end + 4], b"\r\nOK");
        let output = output.split_off(b"earlier answers".len());
        assert_eq!(
            String::from_utf8(output).unwrap(),
            "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\npaxwasm-index: 7\r\n\
             content-length: 2\r\ndate: Fri, 27 Nov 2026 17:00:00 GMT\r\n\r\nOK"
        );
    }
}
