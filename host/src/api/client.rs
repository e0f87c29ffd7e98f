//! A small HTTP/1.1 client over hyper's connection API: one keep-alive connection per
//! [`Connection`], and a [`Pool`] of idle connections per address for forwarding.
//!
//! It serves the replica's query forwarding and the command-line clients (`deploy`,
//! `submit`, `query`, `status`, `bench`). Plain `http://host:port` only: Paxwasm's API
//! has no TLS of its own.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A complete response: status, headers and the whole body.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The header's value as text, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// The `error` field of a JSON error body, or the body as text when it is not one.
    pub fn error_message(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        match serde_json::from_slice::<serde_json::Value>(&self.body) {
            Ok(value) => match value.get("error").and_then(|e| e.as_str()) {
                Some(message) => message.to_owned(),
                None => text.trim().to_owned(),
            },
            Err(_) => text.trim().to_owned(),
        }
    }
}

#[derive(Debug)]
pub enum ClientError {
    Connect(std::io::Error),
    Http(hyper::Error),
    /// The response body was larger than the caller accepts.
    ResponseTooLarge {
        limit_bytes: usize,
    },
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Connect(error) => write!(f, "cannot connect: {error}"),
            ClientError::Http(error) => write!(f, "HTTP error: {error}"),
            ClientError::ResponseTooLarge { limit_bytes } => {
                write!(f, "response body larger than {limit_bytes} bytes")
            }
        }
    }
}

impl std::error::Error for ClientError {}

/// Splits `http://host:port[/]` into `host:port`. Only plain HTTP is supported.
pub fn authority_of(endpoint: &str) -> Result<String, String> {
    let rest = endpoint
        .strip_prefix("http://")
        .ok_or_else(|| format!("endpoint {endpoint:?} must start with http://"))?;
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err(format!(
            "endpoint {endpoint:?} must be http://host:port with no path"
        ));
    }
    Ok(authority.to_owned())
}

/// Opens one HTTP/1.1 connection to `authority` (`host:port`).
async fn connect(authority: &str) -> Result<SendRequest<Full<Bytes>>, ClientError> {
    let stream = TcpStream::connect(authority)
        .await
        .map_err(ClientError::Connect)?;
    // Requests are small and latency-bound: do not wait for Nagle.
    stream.set_nodelay(true).map_err(ClientError::Connect)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(ClientError::Http)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "http client: connection ended with an error");
        }
    });
    Ok(sender)
}

fn build_request(
    authority: &str,
    method: Method,
    path_and_query: &str,
    headers: &[(HeaderName, HeaderValue)],
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut request = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(HOST, authority)
        .header(CONTENT_LENGTH, body.len())
        .body(Full::new(body))
        .expect("method, path and headers come from typed values");
    for (name, value) in headers {
        request.headers_mut().append(name.clone(), value.clone());
    }
    request
}

async fn send_on(
    sender: &mut SendRequest<Full<Bytes>>,
    request: Request<Full<Bytes>>,
    response_bytes_max: usize,
) -> Result<Reply, ClientError> {
    sender.ready().await.map_err(ClientError::Http)?;
    let response = sender
        .send_request(request)
        .await
        .map_err(ClientError::Http)?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, response_bytes_max)
        .collect()
        .await
        .map_err(|error| match error.downcast::<hyper::Error>() {
            Ok(error) => ClientError::Http(*error),
            Err(_) => ClientError::ResponseTooLarge {
                limit_bytes: response_bytes_max,
            },
        })?
        .to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// One keep-alive connection to one endpoint, reopened when the server closed it.
pub struct Connection {
    authority: String,
    sender: Option<SendRequest<Full<Bytes>>>,
    response_bytes_max: usize,
}

impl Connection {
    /// `endpoint` is `http://host:port`; nothing is opened until the first request.
    pub fn new(endpoint: &str, response_bytes_max: usize) -> Result<Self, String> {
        Ok(Self {
            authority: authority_of(endpoint)?,
            sender: None,
            response_bytes_max,
        })
    }

    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// Sends one request and reads the whole response. A request is never resent: on an
    /// error the caller decides (a command may have been applied).
    pub async fn request(
        &mut self,
        method: Method,
        path_and_query: &str,
        headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
    ) -> Result<Reply, ClientError> {
        let mut sender = match self.sender.take() {
            Some(sender) if !sender.is_closed() => sender,
            _ => connect(&self.authority).await?,
        };
        let request = build_request(&self.authority, method, path_and_query, headers, body);
        let reply = send_on(&mut sender, request, self.response_bytes_max).await?;
        self.sender = Some(sender);
        Ok(reply)
    }
}

/// Idle keep-alive connections per `host:port`, for requests that are safe to retry
/// once on a fresh connection (queries): a pooled connection may have been closed by
/// the server just as it was taken.
pub struct Pool {
    idle: Mutex<HashMap<String, Vec<SendRequest<Full<Bytes>>>>>,
    idle_per_authority_max: usize,
    response_bytes_max: usize,
}

impl Pool {
    pub fn new(idle_per_authority_max: usize, response_bytes_max: usize) -> Self {
        Self {
            idle: Mutex::new(HashMap::new()),
            idle_per_authority_max,
            response_bytes_max,
        }
    }

    fn take_idle(&self, authority: &str) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().expect("pool lock poisoned");
        let senders = idle.get_mut(authority)?;
        while let Some(sender) = senders.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn put_idle(&self, authority: &str, sender: SendRequest<Full<Bytes>>) {
        let mut idle = self.idle.lock().expect("pool lock poisoned");
        let senders = idle.entry(authority.to_owned()).or_default();
        if senders.len() < self.idle_per_authority_max {
            senders.push(sender);
        }
    }

    /// Sends a retry-safe request to `authority`, reusing an idle connection if one is
    /// open; a failure on a reused connection is retried once on a new one.
    pub async fn request(
        &self,
        authority: &str,
        method: Method,
        path_and_query: &str,
        headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
    ) -> Result<Reply, ClientError> {
        if let Some(mut sender) = self.take_idle(authority) {
            let request = build_request(
                authority,
                method.clone(),
                path_and_query,
                headers,
                body.clone(),
            );
            if let Ok(reply) = send_on(&mut sender, request, self.response_bytes_max).await {
                self.put_idle(authority, sender);
                return Ok(reply);
            }
        }
        let mut sender = connect(authority).await?;
        let request = build_request(authority, method, path_and_query, headers, body);
        let reply = send_on(&mut sender, request, self.response_bytes_max).await?;
        self.put_idle(authority, sender);
        Ok(reply)
    }
}
