//! Client subcommands over the HTTP API: `deploy`, `submit`, `query` and `status`.
//!
//! Output for scripts: a command's or query's output goes to stdout verbatim; errors go
//! to stderr as `error: <status>: <message>` and the exit code is 1 (2 for usage errors,
//! from clap).

use std::io::{Read, Write};
use std::process::ExitCode;

use bytes::Bytes;
use clap::{Args, ValueEnum};
use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION};
use hyper::{Method, StatusCode};
use serde_json::Value;

use crate::api::client::{Connection, Reply};
use crate::api::{HEADER_APPLIED_INDEX, HEADER_IDEMPOTENCY_KEY, HEADER_INDEX};

/// Where the client subcommands connect when no `--endpoint` is given (`paxwasm dev`
/// puts replica 1's HTTP API there).
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:7001";
/// Largest response the client subcommands read.
pub const RESPONSE_BYTES_MAX: usize = 64 * 1024 * 1024;

#[derive(Clone, Debug, Args)]
pub struct EndpointArgs {
    /// Base URL of a replica's HTTP API.
    #[arg(long, env = "PAXWASM_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// Bearer token for admin calls (deploy, members), if the cluster was started with one.
    #[arg(long, env = "PAXWASM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl EndpointArgs {
    pub fn connect(&self) -> Result<Connection, String> {
        Connection::new(&self.endpoint, RESPONSE_BYTES_MAX)
    }

    pub(super) fn authorization(&self) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
        match &self.token {
            None => Ok(Vec::new()),
            Some(token) => {
                let value = HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| "the token must be visible ASCII".to_owned())?;
                Ok(vec![(AUTHORIZATION, value)])
            }
        }
    }
}

/// Upload a Wasm module and replicate it (PUT /v1/app). Prints the JSON answer.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The module (.wasm) to deploy.
    pub file: std::path::PathBuf,
    /// Carry the state over from the current module (export_state/import_state).
    #[arg(long)]
    pub migrate: bool,
    #[command(flatten)]
    pub endpoint: EndpointArgs,
}

/// Submit one command (POST /v1/commands). Prints the module's output.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The command bytes; read from stdin when omitted or `-`.
    pub data: Option<String>,
    /// Retries with the same key return the first result and never apply twice.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Also print the slot the command was decided in, on stderr.
    #[arg(long, short)]
    pub verbose: bool,
    #[command(flatten)]
    pub endpoint: EndpointArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ConsistencyArg {
    Linearizable,
    Lease,
    Stale,
}

impl ConsistencyArg {
    fn as_str(self) -> &'static str {
        match self {
            ConsistencyArg::Linearizable => "linearizable",
            ConsistencyArg::Lease => "lease",
            ConsistencyArg::Stale => "stale",
        }
    }
}

/// Run a read-only query (POST /v1/queries). Prints the module's output.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// The query bytes; read from stdin when omitted or `-`.
    pub data: Option<String>,
    #[arg(long, value_enum, default_value_t = ConsistencyArg::Linearizable)]
    pub consistency: ConsistencyArg,
    /// Also print the applied index the query ran against, on stderr.
    #[arg(long, short)]
    pub verbose: bool,
    #[command(flatten)]
    pub endpoint: EndpointArgs,
}

/// Show a replica's status, or with --all a table across the cluster.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Every member of the cluster (read from /v1/cluster), one row each.
    #[arg(long)]
    pub all: bool,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub endpoint: EndpointArgs,
}

/// Runs `body` on a single-threaded runtime and turns an `Err` into `error: …`, exit 1.
pub(super) fn run(body: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime starts");
    match runtime.block_on(body) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// An error line for a non-2xx reply: `409 Conflict: migration failed …`.
pub(super) fn failed(reply: &Reply) -> String {
    format!("{}: {}", reply.status, reply.error_message())
}

fn payload(data: &Option<String>) -> Result<Bytes, String> {
    match data.as_deref() {
        Some(data) if data != "-" => Ok(Bytes::copy_from_slice(data.as_bytes())),
        _ => {
            let mut buffer = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buffer)
                .map_err(|error| format!("cannot read stdin: {error}"))?;
            Ok(buffer.into())
        }
    }
}

/// Writes a command's or query's output, with a final newline if it had none.
fn print_output(body: &[u8]) -> Result<(), String> {
    let mut stdout = std::io::stdout().lock();
    let written = stdout.write_all(body).and_then(|()| {
        if body.last() != Some(&b'\n') {
            stdout.write_all(b"\n")?;
        }
        stdout.flush()
    });
    written.map_err(|error| format!("cannot write to stdout: {error}"))
}

pub fn deploy(args: DeployArgs) -> ExitCode {
    run(async move {
        let module = std::fs::read(&args.file)
            .map_err(|error| format!("cannot read {}: {error}", args.file.display()))?;
        let mut connection = args.endpoint.connect()?;
        let path = if args.migrate {
            "/v1/app?migrate=true"
        } else {
            "/v1/app"
        };
        let reply = connection
            .request(
                Method::PUT,
                path,
                &args.endpoint.authorization()?,
                module.into(),
            )
            .await
            .map_err(|error| format!("{}: {error}", args.endpoint.endpoint))?;
        if reply.status != StatusCode::OK {
            return Err(failed(&reply));
        }
        print_output(&reply.body)
    })
}

pub fn submit(args: SubmitArgs) -> ExitCode {
    run(async move {
        let payload = payload(&args.data)?;
        let mut headers = Vec::new();
        if let Some(key) = &args.idempotency_key {
            let value = HeaderValue::from_str(key)
                .map_err(|_| "the idempotency key must be visible ASCII".to_owned())?;
            headers.push((HeaderName::from_static(HEADER_IDEMPOTENCY_KEY), value));
        }
        let mut connection = args.endpoint.connect()?;
        let reply = connection
            .request(Method::POST, "/v1/commands", &headers, payload)
            .await
            .map_err(|error| {
                format!(
                    "{}: {error} (the command may or may not have been applied)",
                    args.endpoint.endpoint
                )
            })?;
        if reply.status != StatusCode::OK {
            return Err(failed(&reply));
        }
        if args.verbose {
            eprintln!("index {}", reply.header(HEADER_INDEX).unwrap_or("?"));
        }
        print_output(&reply.body)
    })
}

pub fn query(args: QueryArgs) -> ExitCode {
    run(async move {
        let payload = payload(&args.data)?;
        let mut connection = args.endpoint.connect()?;
        let path = format!("/v1/queries?consistency={}", args.consistency.as_str());
        let reply = connection
            .request(Method::POST, &path, &[], payload)
            .await
            .map_err(|error| format!("{}: {error}", args.endpoint.endpoint))?;
        if reply.status != StatusCode::OK {
            return Err(failed(&reply));
        }
        if args.verbose {
            eprintln!(
                "applied index {}",
                reply.header(HEADER_APPLIED_INDEX).unwrap_or("?")
            );
        }
        print_output(&reply.body)
    })
}

async fn get_json(connection: &mut Connection, path: &str) -> Result<Value, String> {
    let reply = connection
        .request(Method::GET, path, &[], Bytes::new())
        .await
        .map_err(|error| error.to_string())?;
    if reply.status != StatusCode::OK {
        return Err(failed(&reply));
    }
    serde_json::from_slice(&reply.body).map_err(|error| format!("{path}: not JSON: {error}"))
}

/// One row of `status --all`: a member's endpoint and its status or why there is none.
struct StatusRow {
    endpoint: String,
    status: Result<Value, String>,
}

pub fn status(args: StatusArgs) -> ExitCode {
    run(async move {
        let mut connection = args.endpoint.connect()?;
        if !args.all {
            let status = get_json(&mut connection, "/v1/status")
                .await
                .map_err(|error| format!("{}: {error}", args.endpoint.endpoint))?;
            let rows = [StatusRow {
                endpoint: args.endpoint.endpoint.clone(),
                status: Ok(status.clone()),
            }];
            return if args.json {
                print_output(pretty(&status).as_bytes())
            } else {
                print_output(status_table(&rows).as_bytes())
            };
        }
        let cluster = get_json(&mut connection, "/v1/cluster")
            .await
            .map_err(|error| format!("{}: {error}", args.endpoint.endpoint))?;
        let endpoints: Vec<String> = cluster["members"]
            .as_array()
            .ok_or("/v1/cluster: no members array")?
            .iter()
            .filter_map(|member| member["http"].as_str())
            .map(|http| format!("http://{http}"))
            .collect();
        let fetches = endpoints.into_iter().map(|endpoint| {
            tokio::spawn(async move {
                let status = match Connection::new(&endpoint, RESPONSE_BYTES_MAX) {
                    Ok(mut connection) => get_json(&mut connection, "/v1/status").await,
                    Err(error) => Err(error),
                };
                StatusRow { endpoint, status }
            })
        });
        let mut rows = Vec::new();
        for fetch in fetches.collect::<Vec<_>>() {
            rows.push(fetch.await.expect("a status fetch does not panic"));
        }
        if args.json {
            let array: Vec<Value> = rows
                .iter()
                .map(|row| match &row.status {
                    Ok(status) => serde_json::json!({ "endpoint": row.endpoint, "status": status, "error": null }),
                    Err(error) => serde_json::json!({ "endpoint": row.endpoint, "status": null, "error": error }),
                })
                .collect();
            print_output(pretty(&Value::Array(array)).as_bytes())
        } else {
            print_output(status_table(&rows).as_bytes())
        }
    })
}

pub(super) fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).expect("a serde_json::Value always serializes")
}

/// `sha256:0123456789abcdef…` → `sha256:0123456789ab`.
fn short_hash(hash: &str) -> String {
    const SHOWN_HEX_CHARS: usize = 12;
    match hash.split_once(':') {
        Some((algorithm, hex)) => {
            format!("{algorithm}:{}", &hex[..hex.len().min(SHOWN_HEX_CHARS)])
        }
        None => hash.to_owned(),
    }
}

fn text_of(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// What an operator must act on, for the ERRORS column (like etcd's alarms).
fn alarms(status: &Value) -> String {
    const MIB: u64 = 1024 * 1024;
    if status["disk"]["low"] == true {
        let free_mib = status["disk"]["free_bytes"].as_u64().unwrap_or(0) / MIB;
        format!("disk nearly full: {free_mib} MiB free, writes refused")
    } else {
        String::new()
    }
}

/// The `etcdctl endpoint status -w table` look: a boxed table, one row per member.
fn status_table(rows: &[StatusRow]) -> String {
    const HEADERS: [&str; 10] = [
        "ENDPOINT",
        "ID",
        "ROLE",
        "LEADER",
        "BALLOT",
        "COMMIT INDEX",
        "APPLIED INDEX",
        "MODULE",
        "STATE HASH",
        "ERRORS",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| match &row.status {
            Ok(status) => vec![
                row.endpoint.clone(),
                text_of(&status["id"]),
                text_of(&status["role"]),
                text_of(&status["leader"]),
                format!(
                    "{}.{}",
                    text_of(&status["ballot"]["round"]),
                    text_of(&status["ballot"]["node"])
                ),
                text_of(&status["commit_index"]),
                text_of(&status["applied_index"]),
                status["module"].as_str().map_or("-".to_owned(), short_hash),
                match status["state_hash"]["hash"].as_str() {
                    Some(hash) => format!(
                        "{}@{}",
                        short_hash(hash),
                        text_of(&status["state_hash"]["index"])
                    ),
                    None => "-".to_owned(),
                },
                alarms(status),
            ],
            Err(error) => {
                let mut cells = vec![row.endpoint.clone()];
                cells.extend(std::iter::repeat_n(String::new(), HEADERS.len() - 2));
                cells.push(error.clone());
                cells
            }
        })
        .collect();
    let widths: Vec<usize> = (0..HEADERS.len())
        .map(|column| {
            cells
                .iter()
                .map(|row| row[column].chars().count())
                .chain([HEADERS[column].len()])
                .max()
                .expect("the header is always there")
        })
        .collect();
    let rule: String = widths
        .iter()
        .map(|width| format!("+{}", "-".repeat(width + 2)))
        .collect::<String>()
        + "+\n";
    let line = |row: &[String]| -> String {
        row.iter()
            .zip(&widths)
            .map(|(cell, width)| format!("| {cell:^width$} "))
            .collect::<String>()
            + "|\n"
    };
    let headers: Vec<String> = HEADERS.iter().map(|h| (*h).to_owned()).collect();
    let mut table = rule.clone() + &line(&headers) + &rule;
    for row in &cells {
        table += &line(row);
    }
    table + &rule
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table_has_a_row_per_member_and_shows_errors() {
        let status = serde_json::json!({
            "id": 1, "role": "leader", "leader": 1, "ballot": {"round": 3, "node": 1},
            "commit_index": 10, "applied_index": 9,
            "module": "sha256:00112233445566778899",
            "state_hash": {"index": 9, "hash": "sha256:aabbccddeeff0011"},
            "peers": [],
        });
        let rows = [
            StatusRow {
                endpoint: "http://127.0.0.1:7001".into(),
                status: Ok(status),
            },
            StatusRow {
                endpoint: "http://127.0.0.1:7002".into(),
                status: Err("cannot connect".into()),
            },
            StatusRow {
                endpoint: "http://127.0.0.1:7003".into(),
                status: Ok(serde_json::json!({
                    "id": 3, "role": "follower", "leader": 1,
                    "disk": {"free_bytes": 3u64 << 20, "free_bytes_min": 128u64 << 20, "low": true},
                })),
            },
        ];
        let table = status_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 7, "{table}");
        assert!(lines[1].contains("ENDPOINT") && lines[1].contains("STATE HASH"));
        assert!(lines[3].contains(" leader "), "{}", lines[3]);
        assert!(lines[3].contains("sha256:001122334455 "), "{}", lines[3]);
        assert!(lines[3].contains("sha256:aabbccddeeff@9"), "{}", lines[3]);
        assert!(lines[3].contains(" 3.1 "), "{}", lines[3]);
        assert!(lines[4].contains("cannot connect"), "{}", lines[4]);
        assert!(
            lines[5].contains("disk nearly full: 3 MiB free, writes refused"),
            "{}",
            lines[5]
        );
        assert!(!lines[3].contains("disk"), "{}", lines[3]);
        assert!(lines
            .iter()
            .all(|line| line.chars().count() == lines[0].chars().count()));
    }
}
