//! `paxwasm bench`: closed-loop write load against a running cluster.
//!
//! Each client sends its next command as soon as its previous one is answered. By
//! default each client owns one keep-alive connection; with `--connections N` the
//! clients share N connections and pipeline their requests on them. One task per
//! connection speaks HTTP/1.1 itself ([`BenchConnection`]: one write for all requests
//! ready to go, responses parsed in that task), so the load generator, which shares the
//! machine with the replicas it measures, spends as little CPU per request as it can. Commands are valid for the kv example:
//! `put k<client>-<n> <value>`, with the value padded so the whole command is `--size`
//! bytes. A progress line goes to stderr each second; the summary goes to stdout.

use std::collections::{BTreeMap, VecDeque};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::client::EndpointArgs;

/// Pause of a client after a failed request, so an unavailable cluster is not spun on.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// Largest response head (status line and headers) a bench client accepts.
const RESPONSE_HEAD_BYTES_MAX: usize = 16 << 10;
/// Largest response body a bench client accepts (kv answers `OK`; errors are short).
const RESPONSE_BODY_BYTES_MAX: usize = 1 << 20;
/// Headers parsed per response; the API sends fewer than ten.
const RESPONSE_HEADERS_MAX: usize = 32;
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Closed-loop write load (kv `put` commands); prints throughput, latency and errors.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Concurrent clients, one keep-alive connection each.
    #[arg(long, default_value_t = 1)]
    pub clients: u32,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Size of each command in bytes (the value is padded to reach it).
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// Distinct keys per client: command n writes key `k<client>-<n mod keys>`, so the
    /// replicated state stays bounded over long runs.
    #[arg(long, default_value_t = 1000)]
    pub keys: u64,
    /// Connections the clients share (default: one per client). With fewer connections
    /// than clients, the clients of one connection pipeline their requests (HTTP/1.1);
    /// each client still sends its next command only once its previous one is answered.
    /// At most 64 clients per connection (a server's default `pipeline_depth_max`).
    #[arg(long)]
    pub connections: Option<u32>,
    #[command(flatten)]
    pub endpoint: EndpointArgs,
}

/// The command of client `client`'s `n`-th request, padded to `size` bytes when the
/// key leaves room (never shorter than a one-byte value).
pub fn command(client: u32, n: u64, size: usize) -> Vec<u8> {
    let mut command = format!("put k{client}-{n} ").into_bytes();
    let value_bytes = size.saturating_sub(command.len()).max(1);
    // Vary the value with n so consecutive writes are not byte-identical.
    let fill = b'a' + (n % 26) as u8;
    command.resize(command.len() + value_bytes, fill);
    command
}

/// Shared by the clients and the progress line.
struct Counters {
    ok: AtomicU64,
    errors: AtomicU64,
    /// Latencies of the current progress interval, emptied by each progress line.
    interval: LatencyBuckets,
}

/// Buckets of latencies in microseconds: four per power of two, so a quantile read back
/// is within 25% of the true value (exact quantiles come from the full samples at the
/// end; this is for the progress line, and costs one atomic add per request).
struct LatencyBuckets {
    counts: [AtomicU64; LATENCY_BUCKETS],
}

/// Enough four-per-octave buckets for any `u32` number of microseconds.
const LATENCY_BUCKETS: usize = 128;

impl LatencyBuckets {
    fn new() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn bucket_of(us: u32) -> usize {
        if us < 4 {
            return us as usize;
        }
        let octave = 31 - us.leading_zeros() as usize;
        let quarter = ((us >> (octave - 2)) & 3) as usize;
        4 * (octave - 1) + quarter
    }

    /// The largest latency that falls in `bucket`.
    fn upper_us(bucket: usize) -> u64 {
        if bucket < 4 {
            return bucket as u64;
        }
        let octave = bucket / 4 + 1;
        let quarter = (bucket % 4) as u64;
        let width = 1u64 << (octave - 2);
        (4 + quarter) * width + width - 1
    }

    fn record(&self, us: u32) {
        self.counts[Self::bucket_of(us)].fetch_add(1, Ordering::Relaxed);
    }

    /// Empties the buckets and returns the upper bound of quantile `q` of what they
    /// held, or `None` if they were empty.
    fn take_quantile_us(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|count| count.swap(0, Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (bucket, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(Self::upper_us(bucket));
            }
        }
        unreachable!("rank is at most the total")
    }
}

/// What one client measured.
#[derive(Default)]
struct ClientReport {
    latencies_us: Vec<u32>,
    /// `"503 Service Unavailable"`, `"connection: …"` → count.
    errors: BTreeMap<String, u64>,
}

pub fn bench(args: BenchArgs) -> ExitCode {
    if args.clients == 0 || args.duration == 0 || args.keys == 0 || args.connections == Some(0) {
        eprintln!("error: --clients, --connections, --duration and --keys must be positive");
        return ExitCode::from(2);
    }
    let connections = args.connections.unwrap_or(args.clients).min(args.clients);
    let depth_max = crate::api::ApiConfig::default().pipeline_depth_max;
    if args.clients.div_ceil(connections) as usize > depth_max {
        eprintln!(
            "error: at most {depth_max} clients per connection (a server's default pipeline depth); use more --connections"
        );
        return ExitCode::from(2);
    }
    if let Err(error) = args.endpoint.connect() {
        eprintln!("error: {error}");
        return ExitCode::from(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime starts");
    runtime.block_on(run(args))
}

async fn run(args: BenchArgs) -> ExitCode {
    let duration = Duration::from_secs(args.duration);
    let connections = args.connections.unwrap_or(args.clients).min(args.clients);
    let shared = if connections < args.clients {
        format!(" over {connections} connections (pipelined)")
    } else {
        String::new()
    };
    println!(
        "bench: {} clients{shared}, {} s, {}-byte commands against {}",
        args.clients, args.duration, args.size, args.endpoint.endpoint
    );
    let counters = Arc::new(Counters {
        ok: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        interval: LatencyBuckets::new(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let authority = args
        .endpoint
        .connect()
        .expect("checked in bench()")
        .authority()
        .to_owned();
    let clients: Vec<_> = (0..connections)
        .map(|connection| {
            let clients = (connection..args.clients)
                .step_by(connections as usize)
                .collect();
            tokio::spawn(connection_loop(
                clients,
                authority.clone(),
                args.size,
                args.keys,
                counters.clone(),
                stop.clone(),
            ))
        })
        .collect();

    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + PROGRESS_INTERVAL,
        PROGRESS_INTERVAL,
    );
    let (mut ok_before, mut errors_before) = (0, 0);
    while started.elapsed() < duration {
        ticker.tick().await;
        let ok = counters.ok.load(Ordering::Relaxed);
        let errors = counters.errors.load(Ordering::Relaxed);
        let p99 = match counters.interval.take_quantile_us(0.99) {
            Some(us) => format!("{:.1} ms", us as f64 / 1000.0),
            None => "-".to_owned(),
        };
        eprintln!(
            "[{:>4.0}s] {:>9} ok {:>9.0}/s  p99 {:>9}  {:>6} errors (+{})",
            started.elapsed().as_secs_f64(),
            ok,
            (ok - ok_before) as f64 / PROGRESS_INTERVAL.as_secs_f64(),
            p99,
            errors,
            errors - errors_before
        );
        (ok_before, errors_before) = (ok, errors);
    }
    stop.store(true, Ordering::Relaxed);

    let mut latencies_us = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for client in clients {
        let report = client.await.expect("a bench client does not panic");
        latencies_us.extend(report.latencies_us);
        for (kind, count) in report.errors {
            *errors.entry(kind).or_insert(0) += count;
        }
    }
    let elapsed = started.elapsed();
    print!("{}", summary(&mut latencies_us, &errors, elapsed));
    if latencies_us.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The clients of one connection: each sends its next command as soon as its previous
/// one is answered. With one client this is a plain keep-alive exchange; with several,
/// their requests are pipelined and the answers come back in request order.
async fn connection_loop(
    clients: Vec<u32>,
    authority: String,
    size: usize,
    keys: u64,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) -> ClientReport {
    let mut report = ClientReport::default();
    let mut connection = BenchConnection::new(authority);
    let mut sent_count = vec![0u64; clients.len()];
    // Clients (by position in `clients`) ready to send, and those backing off after an
    // error until the instant given.
    let mut ready: Vec<usize> = (0..clients.len()).collect();
    let mut backing_off: Vec<(Instant, usize)> = Vec::new();
    let failed = |report: &mut ClientReport,
                  backing_off: &mut Vec<(Instant, usize)>,
                  who: usize,
                  failure: String| {
        counters.errors.fetch_add(1, Ordering::Relaxed);
        *report.errors.entry(failure).or_insert(0) += 1;
        backing_off.push((Instant::now() + ERROR_BACKOFF, who));
    };
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        backing_off.retain(|&(until, who)| {
            let due = until <= now;
            if due {
                ready.push(who);
            }
            !due
        });
        for who in ready.drain(..) {
            let n = sent_count[who];
            sent_count[who] += 1;
            connection.queue("/v1/commands", &command(clients[who], n % keys, size), who);
        }
        if connection.in_flight.is_empty() {
            let until = backing_off.iter().map(|&(until, _)| until).min();
            tokio::time::sleep_until(until.unwrap_or(now + ERROR_BACKOFF).into()).await;
            continue;
        }
        let (answers, failure) = connection.exchange().await;
        for (who, sent, status) in answers {
            if status == 200 {
                let micros = u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX);
                report.latencies_us.push(micros);
                counters.interval.record(micros);
                counters.ok.fetch_add(1, Ordering::Relaxed);
                ready.push(who);
            } else {
                let failure = match hyper::StatusCode::from_u16(status) {
                    Ok(status) => status.to_string(),
                    Err(_) => format!("status {status}"),
                };
                failed(&mut report, &mut backing_off, who, failure);
            }
        }
        if let Some((error, unanswered)) = failure {
            for who in unanswered {
                failed(&mut report, &mut backing_off, who, error.clone());
            }
        }
    }
    report
}

/// One keep-alive HTTP/1.1 connection of the bench: `POST`s with a `Content-Length`
/// body, responses with a `Content-Length` body (what the API sends), in order.
/// Reconnects on the next request after any error or a `Connection: close`; never
/// resends a request.
struct BenchConnection {
    authority: String,
    stream: Option<TcpStream>,
    /// Requests queued and not yet written.
    requests: Vec<u8>,
    /// Who sent each request not yet answered, and when, oldest first.
    in_flight: VecDeque<(usize, Instant)>,
    /// Bytes read and not yet consumed (a response, or part of one).
    buffer: Vec<u8>,
}

impl BenchConnection {
    fn new(authority: String) -> BenchConnection {
        BenchConnection {
            authority,
            stream: None,
            requests: Vec::new(),
            in_flight: VecDeque::new(),
            buffer: Vec::new(),
        }
    }

    /// Queues a request of client `who`; [`BenchConnection::exchange`] sends it.
    fn queue(&mut self, path: &str, body: &[u8], who: usize) {
        self.requests.extend_from_slice(
            format!(
                "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\n\r\n",
                self.authority,
                body.len()
            )
            .as_bytes(),
        );
        self.requests.extend_from_slice(body);
        self.in_flight.push_back((who, Instant::now()));
    }

    /// Writes the queued requests in one write, then reads until at least one response
    /// is whole. Returns every whole response as `(who, sent, status)` and, when the
    /// connection failed or the server closes it, the error with the clients whose
    /// requests are left unanswered (the connection is then dropped).
    async fn exchange(&mut self) -> (Vec<(usize, Instant, u16)>, Option<(String, Vec<usize>)>) {
        let mut answers = Vec::new();
        let failure = match self.try_exchange(&mut answers).await {
            Ok(true) => return (answers, None),
            Ok(false) => "connection: closed by the server".to_owned(),
            Err(error) => error,
        };
        self.stream = None;
        self.buffer.clear();
        self.requests.clear();
        let unanswered: Vec<usize> = self.in_flight.drain(..).map(|(who, _)| who).collect();
        let failure = (!unanswered.is_empty()).then_some((failure, unanswered));
        (answers, failure)
    }

    /// As `exchange`; `Ok(false)` when the server closes the connection after the
    /// answers read.
    async fn try_exchange(
        &mut self,
        answers: &mut Vec<(usize, Instant, u16)>,
    ) -> Result<bool, String> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(&self.authority)
                .await
                .map_err(|e| format!("connection: {e}"))?;
            stream
                .set_nodelay(true)
                .map_err(|e| format!("connection: {e}"))?;
            self.stream = Some(stream);
        }
        let stream = self.stream.as_mut().expect("connected above");
        if !self.requests.is_empty() {
            stream
                .write_all(&self.requests)
                .await
                .map_err(|e| format!("connection: {e}"))?;
            self.requests.clear();
        }
        loop {
            let mut consumed = 0;
            while let Some((status, head_bytes, body_bytes, keep_alive)) =
                parse_response_head(&self.buffer[consumed..])?
            {
                let total = head_bytes + body_bytes;
                if self.buffer.len() - consumed < total {
                    break;
                }
                consumed += total;
                let (who, sent) = self
                    .in_flight
                    .pop_front()
                    .ok_or("malformed response: an answer to no request")?;
                answers.push((who, sent, status));
                if !keep_alive {
                    return Ok(false);
                }
            }
            self.buffer.drain(..consumed);
            if !answers.is_empty() {
                return Ok(true);
            }
            if self.buffer.len() > RESPONSE_HEAD_BYTES_MAX + RESPONSE_BODY_BYTES_MAX {
                return Err("response too large".to_owned());
            }
            read_more(stream, &mut self.buffer).await?;
        }
    }
}

/// Appends what the stream has (at least one byte) to `buffer`.
async fn read_more(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Result<(), String> {
    buffer.reserve(4096);
    match stream.read_buf(buffer).await {
        Ok(0) => Err("connection: closed by the server".to_owned()),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("connection: {e}")),
    }
}

/// `(status, head bytes, body bytes, keep-alive)` once `bytes` hold a whole response
/// head, `None` before.
fn parse_response_head(bytes: &[u8]) -> Result<Option<(u16, usize, usize, bool)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; RESPONSE_HEADERS_MAX];
    let mut response = httparse::Response::new(&mut headers);
    let head_bytes = match response.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed response: {e}")),
    };
    let status = response.code.expect("a complete response has a status");
    let mut body_bytes = None;
    let mut keep_alive = response.version == Some(1);
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let length = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or("malformed response: bad content-length")?;
            if body_bytes.is_some_and(|earlier| earlier != length) {
                return Err("malformed response: conflicting content-length".to_owned());
            }
            body_bytes = Some(length);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("unsupported response: transfer-encoding".to_owned());
        } else if header.name.eq_ignore_ascii_case("connection") {
            let close = header
                .value
                .split(|&b| b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
            keep_alive = !close;
        }
    }
    let body_bytes = body_bytes.ok_or("unsupported response: no content-length")?;
    if body_bytes > RESPONSE_BODY_BYTES_MAX {
        return Err("response body too large".to_owned());
    }
    Ok(Some((status, head_bytes, body_bytes, keep_alive)))
}

/// The value at quantile `q` of sorted samples (nearest rank).
fn quantile(sorted: &[u32], q: f64) -> u32 {
    assert!(!sorted.is_empty() && (0.0..=1.0).contains(&q));
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn summary(latencies_us: &mut [u32], errors: &BTreeMap<String, u64>, elapsed: Duration) -> String {
    latencies_us.sort_unstable();
    let ok = latencies_us.len();
    let error_count: u64 = errors.values().sum();
    let mut text = format!(
        "requests    {ok} ok, {error_count} errors in {:.2} s\n",
        elapsed.as_secs_f64()
    );
    text += &format!(
        "throughput  {:.0} commands/s\n",
        ok as f64 / elapsed.as_secs_f64()
    );
    if ok > 0 {
        let ms = |us: u32| f64::from(us) / 1000.0;
        text += &format!(
            "latency     p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms\n",
            ms(quantile(latencies_us, 0.50)),
            ms(quantile(latencies_us, 0.99)),
            ms(quantile(latencies_us, 0.999)),
            ms(latencies_us[ok - 1]),
        );
    }
    if errors.is_empty() {
        text += "errors      none\n";
    } else {
        for (kind, count) in errors {
            text += &format!("errors      {count} × {kind}\n");
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_heads_are_parsed_once_complete() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\npaxwasm-index: 7\r\n\r\nOK";
        let head = ok.len() - 2;
        assert_eq!(parse_response_head(ok), Ok(Some((200, head, 2, true))));
        assert_eq!(parse_response_head(&ok[..head - 1]), Ok(None));
        // The body need not be there yet: the head says how much to read.
        assert_eq!(
            parse_response_head(&ok[..head]),
            Ok(Some((200, head, 2, true)))
        );
        let closing =
            b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            parse_response_head(closing),
            Ok(Some((503, closing.len(), 0, false)))
        );
        let listed =
            b"HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(
            parse_response_head(listed),
            Ok(Some((200, listed.len(), 0, false)))
        );
        let old = b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(
            parse_response_head(old),
            Ok(Some((200, old.len(), 0, false)))
        );
        for (bad, reason) in [
            (
                &b"HTTP/1.1 200 OK\r\n\r\n"[..],
                "unsupported response: no content-length",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                "unsupported response: transfer-encoding",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
                "malformed response: bad content-length",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 9999999999\r\n\r\n",
                "response body too large",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n",
                "malformed response: conflicting content-length",
            ),
        ] {
            assert_eq!(parse_response_head(bad), Err(reason.to_owned()));
        }
        assert!(parse_response_head(b"HTTX/1.1 200 OK\r\n\r\n").is_err());
    }

    #[test]
    fn commands_are_kv_puts_of_the_requested_size() {
        let command = command(7, 42, 128);
        assert_eq!(command.len(), 128);
        let text = String::from_utf8(command).unwrap();
        let words: Vec<&str> = text.split(' ').collect();
        assert_eq!(words[..2], ["put", "k7-42"]);
        assert_eq!(words.len(), 3);
        assert!(words[2].bytes().all(|byte| byte == b'a' + 42 % 26));
        // A size smaller than the key still gives a valid command.
        assert_eq!(super::command(7, 42, 4), b"put k7-42 q".to_vec());
    }

    #[test]
    fn latency_buckets_tile_the_u32_range() {
        let mut lower = 0u64;
        for bucket in 0..LATENCY_BUCKETS {
            let upper = LatencyBuckets::upper_us(bucket);
            if lower > u64::from(u32::MAX) {
                break;
            }
            assert_eq!(LatencyBuckets::bucket_of(lower as u32), bucket);
            assert_eq!(
                LatencyBuckets::bucket_of(upper.min(u64::from(u32::MAX)) as u32),
                bucket
            );
            // Four buckets per octave: each is at most a quarter of its lower bound wide.
            assert!(
                upper - lower <= lower / 4,
                "bucket {bucket}: {lower}..={upper}"
            );
            lower = upper + 1;
        }
        assert_eq!(LatencyBuckets::bucket_of(u32::MAX), 123);
    }

    #[test]
    fn progress_quantile_reads_and_empties_the_interval() {
        let buckets = LatencyBuckets::new();
        assert_eq!(buckets.take_quantile_us(0.99), None);
        for us in 1..=100 {
            buckets.record(us * 100);
        }
        // The 99th of 100 samples is 9,900 us, in the bucket 8,192..=10,239.
        assert_eq!(buckets.take_quantile_us(0.99), Some(10_239));
        assert_eq!(buckets.take_quantile_us(0.99), None);
    }

    #[test]
    fn quantiles_use_nearest_rank() {
        let samples: Vec<u32> = (1..=1000).collect();
        assert_eq!(quantile(&samples, 0.5), 500);
        assert_eq!(quantile(&samples, 0.99), 990);
        assert_eq!(quantile(&samples, 0.999), 999);
        assert_eq!(quantile(&[5], 0.999), 5);
    }

    #[test]
    fn summary_lists_errors_by_kind() {
        let mut latencies: Vec<u32> = vec![2000, 1000, 3000];
        let errors = BTreeMap::from([("503 Service Unavailable".to_owned(), 2)]);
        let text = summary(&mut latencies, &errors, Duration::from_secs(1));
        assert_eq!(
            text,
            "requests    3 ok, 2 errors in 1.00 s\n\
             throughput  3 commands/s\n\
             latency     p50 2.000 ms  p99 3.000 ms  p99.9 3.000 ms  max 3.000 ms\n\
             errors      2 × 503 Service Unavailable\n"
        );
    }
}
