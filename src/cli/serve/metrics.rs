//! `GET /metrics`: Prometheus text counters of the server (requests per route and status,
//! queue depth, batch sizes, tokens, request latency), lock-free.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds of the latency histogram, seconds.
const LATENCY_S: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Upper bounds of the batch-size histogram, texts per round.
const BATCH_TEXTS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// A cumulative histogram with fixed buckets.
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum: Mutex<f64>,
    total: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum: Mutex::new(0.0),
            total: AtomicU64::new(0),
        }
    }

    fn observe(&self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if v <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        *self.sum.lock().unwrap_or_else(|e| e.into_inner()) += v;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let total = self.total.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
        let sum = *self.sum.lock().unwrap_or_else(|e| e.into_inner());
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {total}");
    }
}

/// The server's counters.
pub struct Metrics {
    requests: Mutex<std::collections::BTreeMap<(String, u16), u64>>,
    queue: AtomicI64,
    texts: AtomicU64,
    tokens: AtomicU64,
    batches: Histogram,
    latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(Default::default()),
            queue: AtomicI64::new(0),
            texts: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            batches: Histogram::new(&BATCH_TEXTS),
            latency: Histogram::new(&LATENCY_S),
        }
    }
}

impl Metrics {
    /// A request to `route` finished with `status` after `seconds`.
    pub fn request(&self, route: &str, status: u16, seconds: f64) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((route.to_string(), status))
            .or_default() += 1;
        self.latency.observe(seconds);
    }

    /// `n` work items entered the queue.
    pub fn queued(&self, n: i64) {
        self.queue.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` work items left the queue.
    pub fn dequeued(&self, n: i64) {
        self.queue.fetch_sub(n, Ordering::Relaxed);
    }

    /// A round of `texts` texts and `tokens` tokens went to the model.
    pub fn batch(&self, texts: usize, tokens: usize) {
        self.texts.fetch_add(texts as u64, Ordering::Relaxed);
        self.tokens.fetch_add(tokens as u64, Ordering::Relaxed);
        self.batches.observe(texts as f64);
    }

    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP m3_requests_total Requests by route and HTTP status.\n");
        out.push_str("# TYPE m3_requests_total counter\n");
        for ((route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "m3_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP m3_queue_size Requests waiting for the model.\n");
        out.push_str("# TYPE m3_queue_size gauge\n");
        let _ = writeln!(out, "m3_queue_size {}", self.queue.load(Ordering::Relaxed));
        out.push_str("# HELP m3_texts_total Texts encoded.\n# TYPE m3_texts_total counter\n");
        let _ = writeln!(out, "m3_texts_total {}", self.texts.load(Ordering::Relaxed));
        out.push_str("# HELP m3_tokens_total Tokens encoded.\n# TYPE m3_tokens_total counter\n");
        let _ = writeln!(
            out,
            "m3_tokens_total {}",
            self.tokens.load(Ordering::Relaxed)
        );
        out.push_str("# HELP m3_batch_texts Texts per model round.\n");
        out.push_str("# TYPE m3_batch_texts histogram\n");
        self.batches.render(&mut out, "m3_batch_texts", "");
        out.push_str("# HELP m3_request_duration_seconds Request latency.\n");
        out.push_str("# TYPE m3_request_duration_seconds histogram\n");
        self.latency
            .render(&mut out, "m3_request_duration_seconds", "");
        out
    }
}
