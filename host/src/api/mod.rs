//! The HTTP API of one replica (hyper 1.x, HTTP/1.1 with keep-alive).
//!
//! `api` owns HTTP and JSON and nothing else: it maps requests onto the [`NodeApi`]
//! contract in `node::handle` and the plain results back onto status codes, headers and
//! JSON bodies. It never knows about ballots beyond what `StatusView` shows, never touches
//! storage, the log or the Wasm machine, and is the only module that speaks JSON.
//!
//! The contract that scripts rely on (routes, codes, headers, JSON shapes) is written
//! down in `docs/notes/api.md`; `tests/api_http.rs` checks it over real sockets.
//!
//! Every error response has the same shape: status code plus a one-line JSON body
//! `{"error":"<sentence>"}` with `Content-Type: application/json`.

pub mod client;
mod json;
mod linger;
mod metrics;
mod pipeline;
mod routes;
mod write_timeout;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::node::handle::NodeApi;
use linger::Linger;
use write_timeout::WriteTimeout;

/// Request header naming the replica that forwarded a query; a replica never forwards a
/// request that carries it again (the loop guard: one hop at most).
pub const HEADER_FORWARDED_BY: &str = "paxwasm-forwarded-by";
/// Response header on a forwarded query: the id of the leader that answered it.
pub const HEADER_FORWARDED_TO: &str = "paxwasm-forwarded-to";
/// Response header: the slot a command was decided in.
pub const HEADER_INDEX: &str = "paxwasm-index";
/// Response header: the applied index of the state a query ran against.
pub const HEADER_APPLIED_INDEX: &str = "paxwasm-applied-index";
/// Request header: retries carrying the same key return the first result.
pub const HEADER_IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Limits and settings of one replica's HTTP API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiConfig {
    /// Largest request body of `POST /v1/commands` and `POST /v1/queries` (413 above).
    pub body_bytes_max: usize,
    /// Largest Wasm upload on `PUT /v1/app` (413 above).
    pub module_bytes_max: usize,
    /// Bearer token that admin routes (`PUT /v1/app`) require; `None` leaves them open.
    pub admin_token: Option<String>,
    /// Longest accepted `Idempotency-Key` (400 above).
    pub idempotency_key_bytes_max: usize,
    /// Connections served at once; further clients wait in the listen backlog.
    pub connections_max: usize,
    /// Pipelined commands of one connection in flight at once (`api::pipeline`); the
    /// connection is not read further until the oldest is answered.
    pub pipeline_depth_max: usize,
    /// Command bytes of one connection in flight above which it takes no more (one
    /// command of up to `body_bytes_max` is still taken below it).
    pub pipeline_bytes_max: usize,
    /// A client must send its request headers within this time, or the connection is
    /// closed (slow-loris guard).
    pub header_read_timeout_ms: u64,
    /// Once a request's head has arrived, its body must bring `body_progress_bytes_min`
    /// bytes, or its end, within every window of this length (restarted each time it
    /// did; time the server does not read is not counted), or the server answers 408 and
    /// closes the connection: a slow-loris guard for bodies that never cuts an upload
    /// faster than the minimum per window.
    pub body_read_timeout_ms: u64,
    /// See `body_read_timeout_ms`. 0: any bytes restart the window.
    pub body_progress_bytes_min: usize,
    /// Safety net over the runtime's own timeouts: a command, query or deploy with no
    /// answer after this long is answered 504 (outcome unknown).
    pub request_timeout_ms: u64,
    /// How long a forwarded query may take, connect included.
    pub forward_timeout_ms: u64,
    /// Largest response body accepted from the leader for a forwarded query.
    pub forward_response_bytes_max: usize,
    /// Idle keep-alive connections kept per leader address for forwarding.
    pub forward_idle_connections_max: usize,
    /// On shutdown, how long open requests may take to finish before connections close.
    pub shutdown_grace_ms: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            body_bytes_max: 1024 * 1024,
            module_bytes_max: 32 * 1024 * 1024,
            admin_token: None,
            idempotency_key_bytes_max: 256,
            connections_max: 4096,
            pipeline_depth_max: 64,
            pipeline_bytes_max: 4 << 20,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 10_000,
            body_progress_bytes_min: 1024,
            request_timeout_ms: 30_000,
            forward_timeout_ms: 10_000,
            forward_response_bytes_max: 16 * 1024 * 1024,
            forward_idle_connections_max: 64,
            shutdown_grace_ms: 5_000,
        }
    }
}

/// Serves the HTTP API on `listener` until `shutdown` completes, then stops accepting,
/// lets open requests finish for up to `shutdown_grace_ms` and returns.
///
/// Errors of single connections (malformed HTTP, resets, slow clients) are logged and
/// never end the server; accept errors (e.g. out of file descriptors) are retried.
pub async fn serve<N: NodeApi>(
    listener: TcpListener,
    node: N,
    config: ApiConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    assert!(
        config.connections_max > 0,
        "connections_max must be positive"
    );
    assert!(
        config.pipeline_depth_max > 0 && config.pipeline_bytes_max > 0,
        "pipeline_depth_max and pipeline_bytes_max must be positive"
    );
    assert!(
        config.body_read_timeout_ms > 0 && config.request_timeout_ms > 0,
        "body_read_timeout_ms and request_timeout_ms must be positive"
    );
    let header_read_timeout = Duration::from_millis(config.header_read_timeout_ms);
    let shutdown_grace = Duration::from_millis(config.shutdown_grace_ms);
    // As `pipeline::serve` does for the connections it serves.
    let write_timeout = Duration::from_millis(config.request_timeout_ms);
    let connection_permits = Arc::new(Semaphore::new(config.connections_max));
    let shared = Arc::new(routes::Shared::new(node, config));
    let graceful = GracefulShutdown::new();
    // Tells connections still in `pipeline` to stop taking commands. Waiting for them
    // needs nothing more: each connection task holds a `graceful` watcher to its end.
    let (pipeline_shutdown, pipeline_watch) = watch::channel(false);
    tokio::pin!(shutdown);

    loop {
        // Take a connection slot before accepting, so a full server leaves new clients
        // in the kernel's backlog instead of accepting and dropping them.
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = connection_permits.clone().acquire_owned() => {
                permit.expect("the connection semaphore is never closed")
            }
        };
        let (mut stream, remote) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "api: accept failed; retrying");
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, %remote, "api: set_nodelay failed");
        }
        let shared = shared.clone();
        let watcher = graceful.watcher();
        let mut pipeline_watch = pipeline_watch.clone();
        tokio::spawn(async move {
            // Commands first (pipelined ones concurrently); the first other request
            // hands the connection to hyper.
            let ended = pipeline::serve(
                &mut stream,
                &shared,
                header_read_timeout,
                &mut pipeline_watch,
            )
            .await;
            if let pipeline::Ended::HandOver(read) = ended {
                let service = service_fn(move |request| routes::handle(shared.clone(), request));
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_read_timeout)
                    .keep_alive(true)
                    .serve_connection(
                        // hyper shuts the stream down when it ends a connection (a 408 or
                        // 413 with `connection: close`, a client's close, shutdown; not
                        // on its header-read timeout or I/O errors, with no answer
                        // pending): `Linger` makes that a lingering close, as
                        // `pipeline::close` is.
                        TokioIo::new(Linger::new(WriteTimeout::new(
                            pipeline::Rewind::new(read, stream),
                            write_timeout,
                        ))),
                        service,
                    );
                if let Err(error) = watcher.watch(connection).await {
                    tracing::debug!(%error, %remote, "api: connection ended with an error");
                }
            } else {
                pipeline::close(&mut stream).await;
            }
            drop(permit);
        });
    }

    drop(listener);
    let _ = pipeline_shutdown.send(true);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(shutdown_grace) => {
            tracing::warn!(?shutdown_grace, "api: requests still open after the grace period; closing");
        }
    }
    Ok(())
}

/// Pause after a failed `accept` before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
