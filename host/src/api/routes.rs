//! Routing and the mapping between HTTP and the [`NodeApi`] contract: each handler
//! checks the request (method, token, query string, headers, body limit), calls the
//! node once, and maps its plain result onto a status code, headers and a body.

// Checks return the finished error response as their `Err`, so handlers can use `?`;
// it is moved at most once per request, where boxing would only add an allocation.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, ALLOW, AUTHORIZATION, CONNECTION, CONTENT_LENGTH,
    CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response, StatusCode};

use super::client::Pool;
use super::metrics::HttpMetrics;
use super::{
    json, ApiConfig, HEADER_APPLIED_INDEX, HEADER_FORWARDED_BY, HEADER_FORWARDED_TO,
    HEADER_IDEMPOTENCY_KEY, HEADER_INDEX,
};
use crate::node::handle::{
    CommandError, CommandRequest, Consistency, DeployError, FlipError, LeaderHint, MemberChange,
    MemberError, NodeApi, QueryError,
};

/// `Retry-After` when no module is deployed yet: a deploy takes a round trip or two.
const NO_MODULE_RETRY_AFTER_SECS: u64 = 1;
/// `Retry-After` of a 507 (this replica's disk is nearly full): space comes back when an
/// operator frees it, not within a second.
const STORAGE_LOW_RETRY_AFTER_SECS: u64 = 5;
/// `Retry-After` when a query cannot be forwarded (no leader known, leader unreachable,
/// or the request was already forwarded once): about one election.
const NO_LEADER_RETRY_AFTER_SECS: u64 = 1;

const CONTENT_TYPE_JSON: &str = "application/json";
const CONTENT_TYPE_BYTES: &str = "application/octet-stream";
const CONTENT_TYPE_TEXT: &str = "text/plain; charset=utf-8";
const CONTENT_TYPE_PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

pub(super) type Body = Full<Bytes>;

/// What every connection of one server shares.
pub struct Shared<N> {
    node: N,
    pub(super) config: ApiConfig,
    pub(super) metrics: HttpMetrics,
    forward_pool: Pool,
}

impl<N: NodeApi> Shared<N> {
    pub fn new(node: N, config: ApiConfig) -> Self {
        let forward_pool = Pool::new(
            config.forward_idle_connections_max,
            config.forward_response_bytes_max,
        );
        Self {
            node,
            config,
            metrics: HttpMetrics::new(),
            forward_pool,
        }
    }
}

/// The routes of the API; also the bounded `route` label of the HTTP metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Commands,
    Queries,
    App,
    Status,
    Cluster,
    Livez,
    Readyz,
    Metrics,
    Unmatched,
    /// Test hook, served only by a node started with `--test-hooks` (else 404).
    DebugFlipByte,
    /// Test hook (as above): `POST /v1/debug/disk-free?bytes=N|measured`.
    DebugDiskFree,
    /// `POST /v1/cluster/members`: add a learner.
    Members,
    /// `DELETE /v1/cluster/members/{id}`.
    Member,
    /// `POST /v1/cluster/members/{id}/promote`.
    MemberPromote,
    /// `PUT /v1/cluster/voters`: any set change of the voters in one joint-consensus step.
    Voters,
}

impl Route {
    pub const ALL: [Route; 15] = [
        Route::Commands,
        Route::Queries,
        Route::App,
        Route::Status,
        Route::Cluster,
        Route::Livez,
        Route::Readyz,
        Route::Metrics,
        Route::Unmatched,
        Route::DebugFlipByte,
        Route::DebugDiskFree,
        Route::Members,
        Route::Member,
        Route::MemberPromote,
        Route::Voters,
    ];

    fn of(path: &str) -> Route {
        match path {
            "/v1/commands" => Route::Commands,
            "/v1/queries" => Route::Queries,
            "/v1/app" => Route::App,
            "/v1/status" => Route::Status,
            "/v1/cluster" => Route::Cluster,
            "/livez" => Route::Livez,
            "/readyz" => Route::Readyz,
            "/metrics" => Route::Metrics,
            "/v1/debug/flip-byte" => Route::DebugFlipByte,
            "/v1/debug/disk-free" => Route::DebugDiskFree,
            "/v1/cluster/members" => Route::Members,
            "/v1/cluster/voters" => Route::Voters,
            _ => match member_path(path) {
                Some((_, false)) => Route::Member,
                Some((_, true)) => Route::MemberPromote,
                None => Route::Unmatched,
            },
        }
    }

    pub fn index(self) -> usize {
        Route::ALL
            .iter()
            .position(|route| *route == self)
            .expect("ALL lists every route")
    }

    pub fn label(self) -> &'static str {
        match self {
            Route::Commands => "/v1/commands",
            Route::Queries => "/v1/queries",
            Route::App => "/v1/app",
            Route::Status => "/v1/status",
            Route::Cluster => "/v1/cluster",
            Route::Livez => "/livez",
            Route::Readyz => "/readyz",
            Route::Metrics => "/metrics",
            Route::Unmatched => "unmatched",
            Route::DebugFlipByte => "/v1/debug/flip-byte",
            Route::DebugDiskFree => "/v1/debug/disk-free",
            Route::Members => "/v1/cluster/members",
            Route::Member => "/v1/cluster/members/{id}",
            Route::MemberPromote => "/v1/cluster/members/{id}/promote",
            Route::Voters => "/v1/cluster/voters",
        }
    }

    /// The `Allow` header of a 405 on this route.
    fn allow(self) -> &'static str {
        match self {
            Route::Commands
            | Route::Queries
            | Route::DebugFlipByte
            | Route::DebugDiskFree
            | Route::Members
            | Route::MemberPromote => "POST",
            Route::Member => "DELETE",
            Route::Voters => "PUT",
            Route::App => "GET, PUT",
            Route::Status | Route::Cluster | Route::Livez | Route::Readyz | Route::Metrics => "GET",
            Route::Unmatched => unreachable!("an unmatched path answers 404, never 405"),
        }
    }
}

/// The service function of every connection. Never fails: every problem becomes a
/// response.
pub async fn handle<N: NodeApi>(
    shared: Arc<Shared<N>>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let route = Route::of(request.uri().path());
    let method = request.method().clone();
    let response = match dispatch(&shared, route, request).await {
        Ok(response) | Err(response) => response,
    };
    shared
        .metrics
        .observe(route, &method, response.status(), started.elapsed());
    Ok(response)
}

/// `Err` carries an error response, so that checks can use `?`.
pub(super) type Handled = Result<Response<Body>, Response<Body>>;

async fn dispatch<N: NodeApi>(
    shared: &Shared<N>,
    route: Route,
    request: Request<Incoming>,
) -> Handled {
    let method = request.method().clone();
    // No GET route takes parameters; checked here so that no handler can forget it.
    let is_get_route =
        method == Method::GET && route != Route::Unmatched && route.allow().contains("GET");
    if is_get_route {
        no_query_string(&request)?;
    }
    match (route, method) {
        (Route::Unmatched, _) => Err(error(
            StatusCode::NOT_FOUND,
            &format!("no route for {}", request.uri().path()),
        )),
        (Route::Commands, Method::POST) => commands(shared, request).await,
        // Without test hooks the route does not exist, for any method.
        (Route::DebugFlipByte | Route::DebugDiskFree, _) if !shared.node.test_hooks_enabled() => {
            Err(error(
                StatusCode::NOT_FOUND,
                &format!("no route for {}", request.uri().path()),
            ))
        }
        (Route::DebugFlipByte, Method::POST) => debug_flip_byte(shared, request).await,
        (Route::DebugDiskFree, Method::POST) => debug_disk_free(shared, request).await,
        (Route::Queries, Method::POST) => queries(shared, request).await,
        (Route::Members, Method::POST)
        | (Route::MemberPromote, Method::POST)
        | (Route::Member, Method::DELETE)
        | (Route::Voters, Method::PUT) => members(shared, route, request).await,
        (Route::App, Method::PUT) => deploy(shared, request).await,
        (Route::App, Method::GET) => Ok(json_response(
            StatusCode::OK,
            &json::app(&shared.node.app()),
        )),
        (Route::Status, Method::GET) => Ok(json_response(
            StatusCode::OK,
            &json::status(&shared.node.status()),
        )),
        (Route::Cluster, Method::GET) => Ok(json_response(
            StatusCode::OK,
            &json::cluster(&shared.node.cluster()),
        )),
        (Route::Livez, Method::GET) => Ok(text_response(StatusCode::OK, "ok\n")),
        (Route::Readyz, Method::GET) => {
            let readiness = shared.node.readiness();
            if readiness.ready {
                Ok(text_response(StatusCode::OK, "ready\n"))
            } else {
                let reason = readiness.reason.as_deref().unwrap_or("reason unknown");
                Err(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("not ready: {reason}"),
                ))
            }
        }
        (Route::Metrics, Method::GET) => {
            let mut text = shared.node.metrics();
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            shared.metrics.render(&mut text);
            Ok(response(
                StatusCode::OK,
                CONTENT_TYPE_PROMETHEUS,
                text.into(),
            ))
        }
        (route, method) => {
            let mut response = error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!(
                    "method {method} is not allowed on {}; allowed: {}",
                    route.label(),
                    route.allow()
                ),
            );
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static(route.allow()));
            Err(response)
        }
    }
}

async fn commands<N: NodeApi>(shared: &Shared<N>, request: Request<Incoming>) -> Handled {
    no_query_string(&request)?;
    let idempotency_key = idempotency_key(request.headers(), &shared.config)?;
    let payload = read_small_body(request, &shared.config).await?;
    if payload.is_empty() {
        return Err(error(StatusCode::BAD_REQUEST, "the command body is empty"));
    }
    submit_command(
        shared,
        CommandRequest {
            payload: payload.to_vec(),
            idempotency_key,
        },
    )
    .await
}

/// Submits a checked command and maps its outcome onto the response; shared by hyper's
/// connections and the pipelined ones of `api::pipeline`.
pub(super) async fn submit_command<N: NodeApi>(
    shared: &Shared<N>,
    request: CommandRequest,
) -> Handled {
    let submitted = shared.node.submit(request);
    let outcome = tokio::time::timeout(request_timeout(&shared.config), submitted)
        .await
        .map_err(|_| timeout_unknown(&shared.config, "the command"))?;
    match outcome {
        Ok(ok) => {
            let mut response = response(StatusCode::OK, CONTENT_TYPE_BYTES, ok.output.into());
            set_index(&mut response, HEADER_INDEX, ok.index);
            Ok(response)
        }
        Err(CommandError::Rejected {
            index,
            error: reason,
        }) => {
            let mut response = error(StatusCode::UNPROCESSABLE_ENTITY, &reason);
            set_index(&mut response, HEADER_INDEX, index);
            Err(response)
        }
        Err(CommandError::Unavailable {
            reason,
            retry_after_ms,
        }) => Err(unavailable(&reason, retry_after_secs(retry_after_ms))),
        Err(CommandError::Unknown { reason }) => Err(outcome_unknown("the command", &reason)),
        Err(CommandError::TooLarge { limit_bytes }) => Err(too_large_for_node(limit_bytes)),
        Err(CommandError::NoModule) => Err(no_module()),
        Err(CommandError::StorageLow { reason }) => Err(storage_low(&reason)),
    }
}

async fn queries<N: NodeApi>(shared: &Shared<N>, request: Request<Incoming>) -> Handled {
    let mut consistency = Consistency::Linearizable;
    for (name, value) in query_pairs(&request)? {
        match (name, value) {
            ("consistency", "linearizable") => consistency = Consistency::Linearizable,
            ("consistency", "lease") => consistency = Consistency::Lease,
            ("consistency", "stale") => consistency = Consistency::Stale,
            ("consistency", other) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    &format!("consistency must be linearizable, lease or stale, not {other:?}"),
                ))
            }
            (other, _) => return Err(unknown_parameter(other, "consistency")),
        }
    }
    let forwarded_by = request
        .headers()
        .get(HEADER_FORWARDED_BY)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    let raw_query = request.uri().query().map(str::to_owned);
    let payload = read_small_body(request, &shared.config).await?;

    let queried = shared.node.query(payload.to_vec(), consistency);
    let outcome = tokio::time::timeout(request_timeout(&shared.config), queried)
        .await
        .map_err(|_| {
            error(
                StatusCode::GATEWAY_TIMEOUT,
                &format!(
                    "the query had no answer within request_timeout_ms ({} ms)",
                    shared.config.request_timeout_ms
                ),
            )
        })?;
    match outcome {
        Ok(ok) => {
            let mut response = response(StatusCode::OK, CONTENT_TYPE_BYTES, ok.output.into());
            set_index(&mut response, HEADER_APPLIED_INDEX, ok.applied_index);
            Ok(response)
        }
        Err(QueryError::NotLeader { leader }) => match (forwarded_by, leader) {
            (Some(by), _) => Err(unavailable(
                &format!(
                    "this replica is not the leader and the query was already forwarded once (by node {by}); retry"
                ),
                NO_LEADER_RETRY_AFTER_SECS,
            )),
            (None, None) => Err(unavailable(
                "this replica is not the leader and knows no leader; retry",
                NO_LEADER_RETRY_AFTER_SECS,
            )),
            (None, Some(leader)) => forward_query(shared, &leader, raw_query, payload).await,
        },
        Err(QueryError::Rejected { error: reason }) => {
            Err(error(StatusCode::UNPROCESSABLE_ENTITY, &reason))
        }
        Err(QueryError::Unavailable {
            reason,
            retry_after_ms,
        }) => Err(unavailable(&reason, retry_after_secs(retry_after_ms))),
        Err(QueryError::NoModule) => Err(no_module()),
    }
}

/// `POST /v1/debug/flip-byte?offset=N`: flips one byte of this replica's machine memory
/// (a test hook). Without test hooks the route does not exist (404).
async fn debug_flip_byte<N: NodeApi>(shared: &Shared<N>, request: Request<Incoming>) -> Handled {
    let not_found = || {
        error(
            StatusCode::NOT_FOUND,
            &format!("no route for {}", Route::DebugFlipByte.label()),
        )
    };
    if !shared.node.test_hooks_enabled() {
        return Err(not_found());
    }
    let mut offset = None;
    for (name, value) in query_pairs(&request)? {
        match name {
            "offset" => {
                offset = Some(value.parse::<u64>().map_err(|_| {
                    error(
                        StatusCode::BAD_REQUEST,
                        &format!("offset must be an unsigned integer, not {value:?}"),
                    )
                })?)
            }
            other => return Err(unknown_parameter(other, "offset")),
        }
    }
    let offset =
        offset.ok_or_else(|| error(StatusCode::BAD_REQUEST, "the offset parameter is required"))?;
    match shared.node.debug_flip_byte(offset).await {
        Ok(ok) => Ok(json_response(StatusCode::OK, &json::flip_ok(&ok))),
        Err(FlipError::Disabled) => Err(not_found()),
        Err(FlipError::Refused { reason }) => Err(error(StatusCode::BAD_REQUEST, &reason)),
        Err(FlipError::Unavailable { reason }) => {
            Err(unavailable(&reason, NO_LEADER_RETRY_AFTER_SECS))
        }
    }
}

/// `POST /v1/debug/disk-free?bytes=N` makes this replica act as if its data disk had N
/// bytes free; `?bytes=measured` ends that (a test hook, else 404).
async fn debug_disk_free<N: NodeApi>(shared: &Shared<N>, request: Request<Incoming>) -> Handled {
    let mut free_bytes = None;
    for (name, value) in query_pairs(&request)? {
        match (name, value) {
            ("bytes", "measured") => free_bytes = Some(None),
            ("bytes", value) => {
                free_bytes = Some(Some(value.parse::<u64>().map_err(|_| {
                    error(
                        StatusCode::BAD_REQUEST,
                        &format!("bytes must be an unsigned integer or measured, not {value:?}"),
                    )
                })?))
            }
            (other, _) => return Err(unknown_parameter(other, "bytes")),
        }
    }
    let free_bytes = free_bytes
        .ok_or_else(|| error(StatusCode::BAD_REQUEST, "the bytes parameter is required"))?;
    match shared.node.debug_disk_free(free_bytes).await {
        Ok(()) => Ok(json_response(
            StatusCode::OK,
            &json::status(&shared.node.status()),
        )),
        Err(FlipError::Disabled) => Err(error(
            StatusCode::NOT_FOUND,
            &format!("no route for {}", Route::DebugDiskFree.label()),
        )),
        Err(FlipError::Refused { reason }) => Err(error(StatusCode::BAD_REQUEST, &reason)),
        Err(FlipError::Unavailable { reason }) => {
            Err(unavailable(&reason, NO_LEADER_RETRY_AFTER_SECS))
        }
    }
}

/// Forwards a query to the leader (one hop: the request carries the loop guard header)
/// and relays its answer: status, body and the API's own headers.
async fn forward_query<N: NodeApi>(
    shared: &Shared<N>,
    leader: &LeaderHint,
    raw_query: Option<String>,
    payload: Bytes,
) -> Handled {
    let path = match raw_query {
        Some(query) => format!("/v1/queries?{query}"),
        None => "/v1/queries".to_owned(),
    };
    let this_node = shared.node.id();
    let headers = [(
        HeaderName::from_static(HEADER_FORWARDED_BY),
        HeaderValue::from(this_node),
    )];
    let forwarded =
        shared
            .forward_pool
            .request(&leader.http, Method::POST, &path, &headers, payload);
    let timeout = Duration::from_millis(shared.config.forward_timeout_ms);
    let reply = match tokio::time::timeout(timeout, forwarded).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(failure)) => {
            return Err(unavailable(
                &format!(
                    "cannot forward the query to the leader (node {} at {}): {failure}",
                    leader.id, leader.http
                ),
                NO_LEADER_RETRY_AFTER_SECS,
            ))
        }
        Err(_) => {
            return Err(unavailable(
                &format!(
                    "the leader (node {} at {}) did not answer the forwarded query within forward_timeout_ms ({} ms)",
                    leader.id, leader.http, shared.config.forward_timeout_ms
                ),
                NO_LEADER_RETRY_AFTER_SECS,
            ))
        }
    };
    let mut response = Response::new(Full::new(reply.body));
    *response.status_mut() = reply.status;
    for name in [CONTENT_TYPE, RETRY_AFTER]
        .into_iter()
        .chain([HeaderName::from_static(HEADER_APPLIED_INDEX)])
    {
        if let Some(value) = reply.headers.get(&name) {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response.headers_mut().insert(
        HeaderName::from_static(HEADER_FORWARDED_TO),
        HeaderValue::from(leader.id),
    );
    Ok(response)
}

async fn deploy<N: NodeApi>(shared: &Shared<N>, request: Request<Incoming>) -> Handled {
    authorize(request.headers(), &shared.config)?;
    let mut migrate = false;
    for (name, value) in query_pairs(&request)? {
        match (name, value) {
            ("migrate", "true") => migrate = true,
            ("migrate", "false") => migrate = false,
            ("migrate", other) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    &format!("migrate must be true or false, not {other:?}"),
                ))
            }
            (other, _) => return Err(unknown_parameter(other, "migrate")),
        }
    }
    let module = read_body(
        request,
        shared.config.module_bytes_max,
        "module_bytes_max",
        &shared.config,
    )
    .await?;
    let deployed = shared.node.deploy(module.to_vec(), migrate);
    let outcome = tokio::time::timeout(request_timeout(&shared.config), deployed)
        .await
        .map_err(|_| timeout_unknown(&shared.config, "the deploy"))?;
    match outcome {
        Ok(ok) => Ok(json_response(StatusCode::OK, &json::deploy_ok(&ok))),
        Err(DeployError::Invalid { reason }) => Err(error(
            StatusCode::BAD_REQUEST,
            &format!("invalid module: {reason}"),
        )),
        Err(DeployError::MigrationFailed { index, reason }) => {
            let mut response = error(
                StatusCode::CONFLICT,
                &format!(
                    "migration failed at index {index}, the previous module is kept: {reason}"
                ),
            );
            set_index(&mut response, HEADER_INDEX, index);
            Err(response)
        }
        Err(DeployError::Unavailable {
            reason,
            retry_after_ms,
        }) => Err(unavailable(&reason, retry_after_secs(retry_after_ms))),
        Err(DeployError::Unknown { reason }) => Err(outcome_unknown("the deploy", &reason)),
        Err(DeployError::TooLarge { limit_bytes }) => Err(too_large_for_node(limit_bytes)),
        Err(DeployError::StorageLow { reason }) => Err(storage_low(&reason)),
    }
}

/// Admin routes: 401 without a bearer token, 403 with a wrong one (when one is set).
fn authorize(headers: &HeaderMap, config: &ApiConfig) -> Result<(), Response<Body>> {
    let Some(expected) = config.admin_token.as_deref() else {
        return Ok(());
    };
    let presented = headers
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        // The scheme name is case-insensitive (RFC 9110 §11.1); the token is not.
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token);
    match presented {
        None => {
            let mut response = error(
                StatusCode::UNAUTHORIZED,
                "this admin route requires the header Authorization: Bearer <token>",
            );
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"paxwasm\""),
            );
            Err(response)
        }
        Some(token) if equal_in_constant_time(token.trim().as_bytes(), expected.as_bytes()) => {
            Ok(())
        }
        Some(_) => Err(error(StatusCode::FORBIDDEN, "the bearer token is wrong")),
    }
}

/// Compares without an early exit on the first differing byte, so the time taken does
/// not tell how much of a guessed token was right (the length may still show).
fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn idempotency_key(
    headers: &HeaderMap,
    config: &ApiConfig,
) -> Result<Option<String>, Response<Body>> {
    let mut values = headers.get_all(HEADER_IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "more than one Idempotency-Key header",
        ));
    }
    checked_idempotency_key(value.as_bytes(), config).map(Some)
}

/// The key of one `Idempotency-Key` header value, or the 400 that refuses it.
pub(super) fn checked_idempotency_key(
    value: &[u8],
    config: &ApiConfig,
) -> Result<String, Response<Body>> {
    let key = std::str::from_utf8(value)
        .ok()
        .filter(|key| key.bytes().all(|byte| byte.is_ascii_graphic()))
        .ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "Idempotency-Key must be visible ASCII without spaces",
            )
        })?;
    if key.is_empty() || key.len() > config.idempotency_key_bytes_max {
        return Err(error(
            StatusCode::BAD_REQUEST,
            &format!(
                "Idempotency-Key must be 1 to {} bytes long",
                config.idempotency_key_bytes_max
            ),
        ));
    }
    Ok(key.to_owned())
}

/// Reads the whole body, refusing (413) a declared or actual length above `limit_bytes`
/// before buffering more than the limit, and (408) a body that brings less than
/// `body_progress_bytes_min` bytes in a `body_read_timeout_ms` window.
async fn read_body(
    request: Request<Incoming>,
    limit_bytes: usize,
    limit_name: &str,
    config: &ApiConfig,
) -> Result<Bytes, Response<Body>> {
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the request body is larger than {limit_name} ({limit_bytes} bytes)"),
        )
    };
    if let Some(length) = request.headers().get(CONTENT_LENGTH) {
        // hyper has already refused a malformed Content-Length; this only compares.
        let length = length
            .to_str()
            .ok()
            .and_then(|text| text.parse::<u64>().ok())
            .ok_or_else(|| error(StatusCode::BAD_REQUEST, "malformed Content-Length"))?;
        if length > limit_bytes as u64 {
            return Err(too_large());
        }
    }
    let mut body = Limited::new(request.into_body(), limit_bytes);
    let mut collected = BytesMut::new();
    let mut window = BodyWindow::new(config);
    loop {
        let frame = match tokio::time::timeout_at(window.deadline(), body.frame()).await {
            Ok(frame) => frame,
            Err(_) => {
                let mut response = body_timeout(config);
                // The rest of that body would be read as the next request.
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
                return Err(response);
            }
        };
        match frame {
            None => return Ok(collected.freeze()),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    collected.extend_from_slice(&data);
                    window.note(data.len(), true);
                }
            }
            Some(Err(failure)) => {
                return Err(match failure.downcast::<hyper::Error>() {
                    Ok(failure) => error(
                        StatusCode::BAD_REQUEST,
                        &format!("cannot read the request body: {failure}"),
                    ),
                    Err(_) => too_large(),
                })
            }
        }
    }
}

/// `read_body` with the limit of commands, queries and the other small bodies.
async fn read_small_body(
    request: Request<Incoming>,
    config: &ApiConfig,
) -> Result<Bytes, Response<Body>> {
    read_body(request, config.body_bytes_max, "body_bytes_max", config).await
}

/// The slow-body rule of both paths (this one and `pipeline`): once a request's head has
/// arrived, its body must bring `body_progress_bytes_min` bytes, or its end, within every
/// window of `body_read_timeout_ms`. A slow upload that makes progress is never cut; a
/// client that stops, or trickles a byte now and then, is.
pub(super) struct BodyWindow {
    since: tokio::time::Instant,
    /// Bytes towards the current window's minimum.
    progress: usize,
    length: Duration,
    progress_min: usize,
}

impl BodyWindow {
    pub(super) fn new(config: &ApiConfig) -> BodyWindow {
        BodyWindow {
            since: tokio::time::Instant::now(),
            progress: 0,
            length: Duration::from_millis(config.body_read_timeout_ms),
            progress_min: config.body_progress_bytes_min,
        }
    }

    /// A fresh window from now.
    pub(super) fn restart(&mut self) {
        self.since = tokio::time::Instant::now();
        self.progress = 0;
    }

    /// Counts `read` new bytes. While a body is pending the window restarts only once
    /// `progress_min` bytes have come since it last did, otherwise at any bytes. Whether
    /// it restarted.
    pub(super) fn note(&mut self, read: usize, body_pending: bool) -> bool {
        if read == 0 {
            return false;
        }
        self.progress += read;
        if body_pending && self.progress < self.progress_min {
            return false;
        }
        self.restart();
        true
    }

    pub(super) fn deadline(&self) -> tokio::time::Instant {
        self.since + self.length
    }

    pub(super) fn length(&self) -> Duration {
        self.length
    }
}

/// 408 for a request whose body brought less than `body_progress_bytes_min` bytes in
/// `body_read_timeout_ms`; the caller closes the connection after it.
pub(super) fn body_timeout(config: &ApiConfig) -> Response<Body> {
    error(
        StatusCode::REQUEST_TIMEOUT,
        &format!(
            "the request body came too slowly: less than {} bytes, and not its end, within body_read_timeout_ms ({} ms)",
            config.body_progress_bytes_min, config.body_read_timeout_ms
        ),
    )
}

/// `name=value` pairs of the query string; a pair without `=` or a repeated name is 400.
/// Values are compared verbatim (the API's values never need percent-encoding).
fn query_pairs<B>(request: &Request<B>) -> Result<Vec<(&str, &str)>, Response<Body>> {
    let Some(query) = request.uri().query() else {
        return Ok(Vec::new());
    };
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (name, value) = pair.split_once('=').ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                &format!("query parameter {pair:?} has no value (expected name=value)"),
            )
        })?;
        if pairs.iter().any(|(seen, _)| *seen == name) {
            return Err(error(
                StatusCode::BAD_REQUEST,
                &format!("query parameter {name:?} is given more than once"),
            ));
        }
        pairs.push((name, value));
    }
    Ok(pairs)
}

fn no_query_string<B>(request: &Request<B>) -> Result<(), Response<Body>> {
    match query_pairs(request)?.first() {
        None => Ok(()),
        Some((name, _)) => Err(error(
            StatusCode::BAD_REQUEST,
            &format!("unknown query parameter {name:?}; this route takes none"),
        )),
    }
}

fn unknown_parameter(name: &str, known: &str) -> Response<Body> {
    error(
        StatusCode::BAD_REQUEST,
        &format!("unknown query parameter {name:?}; this route takes only {known:?}"),
    )
}

fn request_timeout(config: &ApiConfig) -> Duration {
    Duration::from_millis(config.request_timeout_ms)
}

/// Whole seconds for `Retry-After`, rounded up and at least one.
fn retry_after_secs(retry_after_ms: u64) -> u64 {
    retry_after_ms.div_ceil(1000).max(1)
}

fn unavailable(reason: &str, retry_after_secs: u64) -> Response<Body> {
    let mut response = error(StatusCode::SERVICE_UNAVAILABLE, reason);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
    response
}

/// 507: this replica's disk is nearly full; another replica may take the write.
fn storage_low(reason: &str) -> Response<Body> {
    let mut response = error(StatusCode::INSUFFICIENT_STORAGE, reason);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(STORAGE_LOW_RETRY_AFTER_SECS));
    response
}

fn no_module() -> Response<Body> {
    unavailable(
        "no module is deployed yet: deploy one with PUT /v1/app",
        NO_MODULE_RETRY_AFTER_SECS,
    )
}

fn outcome_unknown(what: &str, reason: &str) -> Response<Body> {
    error(
        StatusCode::GATEWAY_TIMEOUT,
        &format!(
            "outcome unknown: {what} may or may not be applied ({reason}); retry with the same Idempotency-Key"
        ),
    )
}

/// A membership change carries no Idempotency-Key: the way to an outcome is the cluster
/// as it is now, and the changes are safe to repeat once it is checked (a re-add with
/// the same addresses and a re-promote answer 200).
fn membership_unknown(reason: &str) -> Response<Body> {
    error(
        StatusCode::GATEWAY_TIMEOUT,
        &format!(
            "outcome unknown: the membership change may or may not take effect ({reason}); \
             GET /v1/cluster shows the members now: retry the change only if it is not there"
        ),
    )
}

fn timeout_unknown(config: &ApiConfig, what: &str) -> Response<Body> {
    outcome_unknown(
        what,
        &format!(
            "no answer within request_timeout_ms ({} ms)",
            config.request_timeout_ms
        ),
    )
}

fn too_large_for_node(limit_bytes: usize) -> Response<Body> {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("the request body is larger than the node accepts ({limit_bytes} bytes)"),
    )
}

fn set_index(response: &mut Response<Body>, header: &'static str, index: u64) {
    response
        .headers_mut()
        .insert(HeaderName::from_static(header), HeaderValue::from(index));
}

fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn text_response(status: StatusCode, text: &'static str) -> Response<Body> {
    response(
        status,
        CONTENT_TYPE_TEXT,
        Bytes::from_static(text.as_bytes()),
    )
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut body = serde_json::to_vec(value).expect("a serde_json::Value always serializes");
    body.push(b'\n');
    response(status, CONTENT_TYPE_JSON, body.into())
}

/// The one error shape of the API: `{"error":"<sentence>"}` on one line.
fn error(status: StatusCode, message: &str) -> Response<Body> {
    json_response(status, &json::error(message))
}

// ---- membership changes (docs/notes/members.md) ---------------------------------------

/// `(id, promote)` of `/v1/cluster/members/{id}` and `/v1/cluster/members/{id}/promote`;
/// `id` is any path segment here (checked by the handler, so a bad one is a 400).
fn member_path(path: &str) -> Option<(&str, bool)> {
    let rest = path.strip_prefix("/v1/cluster/members/")?;
    let (id, promote) = match rest.strip_suffix("/promote") {
        Some(id) => (id, true),
        None => (rest, false),
    };
    (!id.is_empty() && !id.contains('/')).then_some((id, promote))
}

/// The body of `POST /v1/cluster/members`: exactly `{"id":N,"peer":"IP:PORT","http":"HOST:PORT"}`.
fn add_member_body(body: &[u8]) -> Result<MemberChange, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|failure| format!("malformed JSON: {failure}"))?;
    let object = value
        .as_object()
        .ok_or("malformed JSON: expected an object")?;
    if let Some(unknown) = object
        .keys()
        .find(|key| !matches!(key.as_str(), "id" | "peer" | "http"))
    {
        return Err(format!("malformed JSON: unknown field {unknown:?}"));
    }
    let id = object
        .get("id")
        .and_then(serde_json::Value::as_u64)
        .ok_or("malformed JSON: \"id\" must be an unsigned integer")?;
    let text = |field: &str| {
        object
            .get(field)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| format!("malformed JSON: \"{field}\" must be a string"))
    };
    if id == 0 {
        return Err("node id 0 is reserved; ids start at 1".to_string());
    }
    let (peer, http) = (text("peer")?, text("http")?);
    // The same check runs where the change is proposed; running it here too answers
    // 400 on any replica, before forwarding and whether or not a leader is known.
    crate::node::members::check_address(&peer, &http)?;
    Ok(MemberChange::Add { id, peer, http })
}

/// The body of `PUT /v1/cluster/voters`: `{"voters":[4,5,6]}`, a non-empty set of ids.
fn voters_body(body: &[u8]) -> Result<std::collections::BTreeSet<u64>, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|failure| format!("malformed JSON: {failure}"))?;
    let object = value
        .as_object()
        .ok_or("malformed JSON: expected an object")?;
    if let Some(unknown) = object.keys().find(|key| key.as_str() != "voters") {
        return Err(format!("malformed JSON: unknown field {unknown:?}"));
    }
    let ids = object
        .get("voters")
        .and_then(serde_json::Value::as_array)
        .ok_or("malformed JSON: \"voters\" must be an array of node ids")?;
    let mut voters = std::collections::BTreeSet::new();
    for id in ids {
        match id.as_u64() {
            Some(id) if id != 0 && voters.insert(id) => {}
            Some(0) => return Err("node id 0 is reserved; ids start at 1".into()),
            Some(id) => return Err(format!("node {id} is listed twice")),
            None => return Err("malformed JSON: \"voters\" must be an array of node ids".into()),
        }
    }
    if voters.is_empty() {
        return Err("the voters must not be empty".into());
    }
    Ok(voters)
}

/// `POST /v1/cluster/members`, `POST /v1/cluster/members/{id}/promote`, `DELETE
/// /v1/cluster/members/{id}[?force=true]`, `PUT /v1/cluster/voters[?force=true]`: admin
/// routes (bearer token as for `PUT /v1/app`). A follower forwards the request to the leader once; the answer is the
/// cluster after the change is applied (for a voter change: after C(new)).
async fn members<N: NodeApi>(
    shared: &Shared<N>,
    route: Route,
    request: Request<Incoming>,
) -> Handled {
    authorize(request.headers(), &shared.config)?;
    let mut force = false;
    for (name, value) in query_pairs(&request)? {
        match (route, name, value) {
            (Route::Member | Route::Voters, "force", "true") => force = true,
            (Route::Member | Route::Voters, "force", "false") => force = false,
            (Route::Member | Route::Voters, "force", other) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    &format!("force must be true or false, not {other:?}"),
                ))
            }
            (Route::Member | Route::Voters, other, _) => {
                return Err(unknown_parameter(other, "force"))
            }
            (_, other, _) => return Err(unknown_parameter(other, "(none)")),
        }
    }
    let path_id = match member_path(request.uri().path()) {
        Some((id, _)) => Some(id.parse::<u64>().map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                &format!("the member id must be an unsigned integer, not {id:?}"),
            )
        })?),
        None => None,
    };
    let forwarded_by = request.headers().get(HEADER_FORWARDED_BY).cloned();
    let authorization = request.headers().get(AUTHORIZATION).cloned();
    let method = request.method().clone();
    let path_and_query = request.uri().path_and_query().map_or_else(
        || request.uri().path().to_owned(),
        |pq| pq.as_str().to_owned(),
    );
    let body = read_small_body(request, &shared.config).await?;
    let change = match (route, path_id) {
        (Route::Members, _) => add_member_body(&body).map_err(|reason| {
            error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "{reason}; expected {{\"id\":4,\"peer\":\"IP:PORT\",\"http\":\"HOST:PORT\"}}"
                ),
            )
        })?,
        (Route::MemberPromote, Some(id)) => MemberChange::Promote { id },
        (Route::Member, Some(id)) => MemberChange::Remove { id, force },
        (Route::Voters, _) => {
            let voters = voters_body(&body).map_err(|reason| {
                error(
                    StatusCode::BAD_REQUEST,
                    &format!("{reason}; expected {{\"voters\":[4,5,6]}}"),
                )
            })?;
            MemberChange::SetVoters { voters, force }
        }
        _ => unreachable!("dispatch sends only membership routes here"),
    };
    let changed = shared.node.change_members(change);
    let outcome = tokio::time::timeout(request_timeout(&shared.config), changed)
        .await
        .map_err(|_| {
            membership_unknown(&format!(
                "no answer within request_timeout_ms ({} ms)",
                shared.config.request_timeout_ms
            ))
        })?;
    match outcome {
        Ok(view) => Ok(json_response(StatusCode::OK, &json::cluster(&view))),
        Err(MemberError::Invalid { reason }) => Err(error(StatusCode::BAD_REQUEST, &reason)),
        Err(MemberError::Refused { reason }) => Err(error(StatusCode::CONFLICT, &reason)),
        Err(MemberError::Unavailable {
            reason,
            retry_after_ms,
        }) => Err(unavailable(&reason, retry_after_secs(retry_after_ms))),
        Err(MemberError::Unknown { reason }) => Err(membership_unknown(&reason)),
        Err(MemberError::StorageLow { reason }) => Err(storage_low(&reason)),
        Err(MemberError::NotLeader { leader }) => match (forwarded_by, leader) {
            (Some(_), _) | (None, None) => Err(unavailable(
                "this replica is not the leader (and the request was already forwarded, or no \
                 leader is known); retry",
                NO_LEADER_RETRY_AFTER_SECS,
            )),
            (None, Some(leader)) => {
                let this_node = shared.node.id();
                let mut headers = vec![(
                    HeaderName::from_static(HEADER_FORWARDED_BY),
                    HeaderValue::from(this_node),
                )];
                if let Some(authorization) = authorization {
                    headers.push((AUTHORIZATION, authorization));
                }
                forward(shared, &leader, method, &path_and_query, &headers, body).await
            }
        },
    }
}

/// Forwards an admin request to the leader (one hop) and relays its status and body.
async fn forward<N: NodeApi>(
    shared: &Shared<N>,
    leader: &LeaderHint,
    method: Method,
    path_and_query: &str,
    headers: &[(HeaderName, HeaderValue)],
    body: Bytes,
) -> Handled {
    let forwarded =
        shared
            .forward_pool
            .request(&leader.http, method, path_and_query, headers, body);
    // The leader waits up to its own request timeout for the change to apply.
    let timeout = request_timeout(&shared.config)
        .max(Duration::from_millis(shared.config.forward_timeout_ms));
    let reply = match tokio::time::timeout(timeout, forwarded).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(failure)) => {
            return Err(unavailable(
                &format!(
                    "cannot forward to the leader (node {} at {}): {failure}",
                    leader.id, leader.http
                ),
                NO_LEADER_RETRY_AFTER_SECS,
            ))
        }
        Err(_) => {
            return Err(membership_unknown(&format!(
                "the leader (node {} at {}) did not answer in time",
                leader.id, leader.http
            )))
        }
    };
    let mut response = Response::new(Full::new(reply.body));
    *response.status_mut() = reply.status;
    for name in [CONTENT_TYPE, RETRY_AFTER] {
        if let Some(value) = reply.headers.get(&name) {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response.headers_mut().insert(
        HeaderName::from_static(HEADER_FORWARDED_TO),
        HeaderValue::from(leader.id),
    );
    Ok(response)
}
