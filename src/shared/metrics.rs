//! Prometheus metrics: what a server or a mount counts (operations, bytes, errors, latency,
//! repairs) and the gauges its role publishes (blocks held, rebuild and scrub progress, Raft role
//! and positions), served in the OpenMetrics text format on `--metrics ADDR`.
//!
//! Recording is a few atomic adds and costs nothing measurable when nobody scrapes; the registry
//! is one per process, because each process plays one role.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    op: &'static str,
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

struct Metrics {
    registry: Mutex<Registry>,
    ops: Family<OpLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    bytes: Family<OpLabels, Counter>,
    latency: Family<OpLabels, Histogram>,
    repairs: Counter,
    /// Gauges are registered by the role that sets them, so that a mount shows no Raft term.
    gauges: Mutex<HashMap<&'static str, Gauge>>,
    states: Mutex<HashMap<&'static str, Family<StateLabels, Gauge>>>,
}

/// From 50 µs to about 13 s, ×4 a bucket: a cached lookup to a write waiting out a failover.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(50e-6, 4.0, 10))
}

fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let mut registry = Registry::default();
        let ops = Family::<OpLabels, Counter>::default();
        registry.register("dfs_operations", "Operations served, by kind", ops.clone());
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register("dfs_operation_errors", "Operations that failed, by kind and error", errors.clone());
        let bytes = Family::<OpLabels, Counter>::default();
        registry.register("dfs_bytes", "Bytes of file data moved, by kind of operation", bytes.clone());
        let latency = Family::<OpLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register("dfs_operation_seconds", "How long operations took, by kind", latency.clone());
        let repairs = Counter::default();
        registry.register(
            "dfs_repairs",
            "Block copies rewritten because they were missing, stale or corrupt",
            repairs.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            ops,
            errors,
            bytes,
            latency,
            repairs,
            gauges: Mutex::default(),
            states: Mutex::default(),
        }
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

static SERVING: AtomicBool = AtomicBool::new(false);

/// Whether `--metrics` was given: roles publish their gauges only then.
pub fn enabled() -> bool {
    SERVING.load(Ordering::Relaxed)
}

/// One operation being timed: counted, with its latency, when dropped; as an error unless
/// [`Op::ok`] was called first (an early `?` return is a failure).
#[must_use = "the operation is recorded when the guard is dropped"]
pub struct Op {
    op: &'static str,
    started: Instant,
    error: Option<&'static str>,
}

/// Starts timing an operation of kind `op`.
pub fn op(op: &'static str) -> Op {
    Op { op, started: Instant::now(), error: Some("failed") }
}

impl Op {
    /// The operation succeeded, moving `bytes` of file data.
    pub fn ok(&mut self, bytes: usize) {
        self.error = None;
        if bytes > 0 {
            metrics().bytes.get_or_create(&OpLabels { op: self.op }).inc_by(bytes as u64);
        }
    }

    /// The operation ended with this error (a short name such as `ENOENT`).
    pub fn failed(&mut self, error: &'static str) {
        self.error = Some(error);
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        let m = metrics();
        let l = OpLabels { op: self.op };
        m.ops.get_or_create(&l).inc();
        m.latency.get_or_create(&l).observe(self.started.elapsed().as_secs_f64());
        if let Some(error) = self.error {
            m.errors.get_or_create(&ErrorLabels { op: self.op, error }).inc();
        }
    }
}

/// `n` bytes of file data moved by an operation of kind `op` (counted apart from its timing).
pub fn bytes(op: &'static str, n: usize) {
    metrics().bytes.get_or_create(&OpLabels { op }).inc_by(n as u64);
}

/// `n` block copies were rewritten on their servers (read repair, scrub, rebuild).
pub fn repaired(n: u64) {
    metrics().repairs.inc_by(n);
}

/// Sets gauge `name` (registered with `help` on first use).
pub fn set(name: &'static str, help: &'static str, value: i64) {
    let m = metrics();
    let mut gauges = lock(&m.gauges);
    let g = gauges.entry(name).or_insert_with(|| {
        let g = Gauge::default();
        lock(&m.registry).register(name, help, g.clone());
        g
    });
    g.set(value);
}

/// Sets gauge family `name` to 1 for `state` and 0 for the others of `all` (a Raft role).
pub fn set_state(name: &'static str, help: &'static str, all: &[&'static str], state: &'static str) {
    let m = metrics();
    let mut states = lock(&m.states);
    let f = states.entry(name).or_insert_with(|| {
        let f = Family::<StateLabels, Gauge>::default();
        lock(&m.registry).register(name, help, f.clone());
        f
    });
    for s in all {
        f.get_or_create(&StateLabels { state: s }).set(i64::from(*s == state));
    }
}

/// The metrics now, in the OpenMetrics text format.
pub fn render() -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &lock(&metrics().registry));
    out
}

/// How long a scraper may take to send its request or read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// A request line and headers larger than this are refused.
const MAX_REQUEST: usize = 16 << 10;

/// Serves the metrics on `addr` (`HOST:PORT`, or a port on 127.0.0.1) from a thread of its own:
/// `GET /metrics`. Fails if the address cannot be bound.
pub fn serve(addr: &str) -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    SERVING.store(true, Ordering::Relaxed);
    metrics();
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for conn in listener.incoming() {
            match conn {
                // One scrape at a time: each is bounded by the timeouts, and scrapers are few.
                Ok(s) => {
                    if let Err(e) = answer(s) {
                        tracing::debug!("metrics request: {e}");
                    }
                }
                Err(e) => tracing::debug!("metrics listener: {e}"),
            }
        }
    })?;
    tracing::info!(addr = %local, "metrics served at http://{local}/metrics");
    Ok(local)
}

fn answer(mut s: TcpStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 2048];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && !req.windows(2).any(|w| w == b"\n\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
        if req.len() > MAX_REQUEST {
            respond(&mut s, "431 Request Header Fields Too Large", "text/plain", "request too large\n")?;
            // Read what the client still sends (bounded by the timeout): closing a socket with
            // unread input resets the connection, and the client would lose the answer.
            s.shutdown(std::net::Shutdown::Write)?;
            let _ = std::io::copy(&mut (&mut s).take(1 << 20), &mut std::io::sink());
            return Ok(());
        }
    }
    let line = req.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => {
            respond(&mut s, "200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", &render())
        }
        ("GET", "/") => respond(&mut s, "200 OK", "text/plain", "DFS metrics: GET /metrics\n"),
        ("GET", _) => respond(&mut s, "404 Not Found", "text/plain", "not found: GET /metrics\n"),
        _ => respond(&mut s, "405 Method Not Allowed", "text/plain", "only GET\n"),
    }
}

fn respond(s: &mut TcpStream, status: &str, kind: &str, body: &str) -> std::io::Result<()> {
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body.as_bytes())?;
    s.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(request.as_bytes()).expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out
    }

    #[test]
    fn counts_operations_bytes_errors_and_gauges_and_serves_them() {
        let addr = serve("127.0.0.1:0").expect("bind");
        {
            let mut o = op("unit_write");
            o.ok(4096);
        }
        drop(op("unit_write"));
        {
            let mut o = op("unit_lookup");
            o.failed("ENOENT");
        }
        set("dfs_unit_gauge", "a gauge of the unit test", 42);
        set_state("dfs_unit_role", "a state of the unit test", &["leader", "follower"], "follower");
        let r = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("dfs_operations_total{op=\"unit_write\"} 2\n"), "{r}");
        assert!(r.contains("dfs_bytes_total{op=\"unit_write\"} 4096\n"), "{r}");
        assert!(r.contains("dfs_operation_errors_total{op=\"unit_write\",error=\"failed\"} 1\n"), "{r}");
        assert!(r.contains("dfs_operation_errors_total{op=\"unit_lookup\",error=\"ENOENT\"} 1\n"), "{r}");
        assert!(r.contains("dfs_operation_seconds_count{op=\"unit_write\"} 2\n"), "{r}");
        assert!(r.contains("dfs_unit_gauge 42\n"), "{r}");
        assert!(r.contains("dfs_unit_role{state=\"follower\"} 1\n"), "{r}");
        assert!(r.contains("dfs_unit_role{state=\"leader\"} 0\n"), "{r}");
        assert!(r.trim_end().ends_with("# EOF"), "{r}");
    }

    #[test]
    fn bad_requests_get_an_error_status_not_a_panic() {
        let addr = serve("127.0.0.1:0").expect("bind");
        assert!(get(addr, "POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        assert!(get(addr, "GET /nothing HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get(addr, "\r\n\r\n").starts_with("HTTP/1.1 405"));
        let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_REQUEST + 10));
        assert!(get(addr, &huge).starts_with("HTTP/1.1 431"));
        // The server still answers after all that.
        assert!(get(addr, "GET /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.1 200"));
    }
}
