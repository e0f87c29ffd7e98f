//! HTTP request counters and latency histograms, rendered in the Prometheus text format
//! after the node's own metrics on `GET /metrics`.
//!
//! Labels are bounded: the route is the matched route pattern (or `unmatched`), never the
//! raw path, so a client cannot grow the label set.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hyper::{Method, StatusCode};

use super::routes::Route;

/// Upper bounds of the latency buckets, in seconds (`le` labels).
const LATENCY_BUCKETS_SECONDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

struct Histogram {
    /// Non-cumulative counts per bucket; the last one is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS_SECONDS.len() + 1],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = LATENCY_BUCKETS_SECONDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS_SECONDS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(micros, Ordering::Relaxed);
    }
}

pub struct HttpMetrics {
    /// `(route, method, status) -> requests`.
    requests: Mutex<BTreeMap<(&'static str, &'static str, u16), u64>>,
    latency: Vec<Histogram>,
}

impl HttpMetrics {
    pub fn new() -> Self {
        Self {
            requests: Mutex::new(BTreeMap::new()),
            latency: Route::ALL.iter().map(|_| Histogram::new()).collect(),
        }
    }

    pub fn observe(&self, route: Route, method: &Method, status: StatusCode, elapsed: Duration) {
        *self
            .requests
            .lock()
            .expect("metrics lock poisoned")
            .entry((route.label(), method_label(method), status.as_u16()))
            .or_insert(0) += 1;
        self.latency[route.index()].observe(elapsed);
    }

    pub fn render(&self, out: &mut String) {
        out.push_str("# HELP paxwasm_http_requests_total HTTP requests answered, by route, method and status code.\n");
        out.push_str("# TYPE paxwasm_http_requests_total counter\n");
        for ((route, method, code), count) in
            self.requests.lock().expect("metrics lock poisoned").iter()
        {
            let _ = writeln!(
                out,
                "paxwasm_http_requests_total{{route=\"{route}\",method=\"{method}\",code=\"{code}\"}} {count}"
            );
        }
        out.push_str("# HELP paxwasm_http_request_duration_seconds Time from request head to response, by route.\n");
        out.push_str("# TYPE paxwasm_http_request_duration_seconds histogram\n");
        for route in Route::ALL {
            let histogram = &self.latency[route.index()];
            let count = histogram.count.load(Ordering::Relaxed);
            if count == 0 {
                continue;
            }
            let label = route.label();
            let mut cumulative = 0;
            for (bound, bucket) in LATENCY_BUCKETS_SECONDS.iter().zip(&histogram.buckets) {
                cumulative += bucket.load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "paxwasm_http_request_duration_seconds_bucket{{route=\"{label}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            cumulative += histogram.buckets[LATENCY_BUCKETS_SECONDS.len()].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "paxwasm_http_request_duration_seconds_bucket{{route=\"{label}\",le=\"+Inf\"}} {cumulative}"
            );
            let sum_seconds = histogram.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(
                out,
                "paxwasm_http_request_duration_seconds_sum{{route=\"{label}\"}} {sum_seconds}"
            );
            let _ = writeln!(
                out,
                "paxwasm_http_request_duration_seconds_count{{route=\"{label}\"}} {cumulative}"
            );
        }
    }
}

/// Methods outside the standard set share one label value, so the label set stays bounded.
fn method_label(method: &Method) -> &'static str {
    const STANDARD: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::HEAD, "HEAD"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::PATCH, "PATCH"),
        (Method::CONNECT, "CONNECT"),
        (Method::TRACE, "TRACE"),
    ];
    STANDARD
        .iter()
        .find(|(standard, _)| standard == method)
        .map_or("OTHER", |(_, label)| label)
}
