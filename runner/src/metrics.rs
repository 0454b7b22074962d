//! The load engine's metrics: k6's names, exact HdrHistograms, recorded by VUs into sharded
//! interval buffers that a collector drains once per interval into a time series and run totals.
//!
//! Recording is a short uncontended lock on the VU's shard; histograms count microseconds with
//! three significant digits (what k6 and wrk report is derived from the same data). Per-request
//! latency is tagged by endpoint (route template, not raw URL) and status; the request phases
//! (blocked, connecting, …) are kept untagged, as k6 reports them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hdrhistogram::Histogram;

/// Largest duration a histogram tracks (longer samples are clamped): 1 hour in µs.
pub const MAX_MICROS: u64 = 3_600_000_000;

/// A new histogram of microseconds, 1 µs – 1 h, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("constant, valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, MAX_MICROS)
}

/// An interned endpoint (route template such as `GET /v1/users/{id}/timeline`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(pub u16);

/// Transport error kinds, recorded as pseudo status codes 1–99 (never real HTTP statuses) so a
/// failed request stays in its endpoint's series; `status:0` in a threshold filter matches them
/// all, as in k6.
pub const ERROR_KINDS: [&str; 9] = [
    "dns",
    "connect_refused",
    "connect_timeout",
    "connect",
    "tls",
    "timeout",
    "reset",
    "protocol",
    "invalid_request",
];

/// The pseudo status code of a transport error kind.
pub fn error_status(kind: &str) -> u16 {
    ERROR_KINDS
        .iter()
        .position(|k| *k == kind)
        .map_or(99, |i| i as u16 + 1)
}

/// A status code as shown in reports: the number, or the error kind for pseudo codes.
pub fn status_label(status: u16) -> String {
    match status {
        0 => "error".to_owned(),
        1..=99 => ERROR_KINDS
            .get(status as usize - 1)
            .map_or_else(|| "error".to_owned(), |k| (*k).to_owned()),
        s => s.to_string(),
    }
}

/// One HTTP request's measurements.
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpSample {
    /// Which endpoint.
    pub endpoint: EndpointId,
    /// Status code; an [`error_status`] pseudo code when the request failed before a response.
    pub status: u16,
    /// Counted in `http_req_failed`.
    pub failed: bool,
    /// Time the request waited before it could be sent (arrival-rate executors: the delay of
    /// its iteration behind schedule). Added to `http_req_duration`, not to the service time.
    pub queued: Duration,
    /// k6 `http_req_blocked`.
    pub blocked: Duration,
    /// k6 `http_req_connecting`.
    pub connecting: Duration,
    /// k6 `http_req_tls_handshaking`.
    pub tls_handshaking: Duration,
    /// k6 `http_req_sending`.
    pub sending: Duration,
    /// k6 `http_req_waiting`.
    pub waiting: Duration,
    /// k6 `http_req_receiving`.
    pub receiving: Duration,
    /// Sending + waiting + receiving: the service time.
    pub service: Duration,
    /// Bytes written.
    pub sent: u64,
    /// Bytes read.
    pub received: u64,
}

/// Per (endpoint, status) series of one interval.
#[derive(Clone)]
pub struct HttpSeries {
    /// Requests.
    pub count: u64,
    /// Failed requests.
    pub failed: u64,
    /// Latency from the intended start (`http_req_duration`).
    pub duration: Histogram<u64>,
    /// Raw service time (`http_req_service_duration`).
    pub service: Histogram<u64>,
}

impl HttpSeries {
    fn new() -> Self {
        HttpSeries {
            count: 0,
            failed: 0,
            duration: new_histogram(),
            service: new_histogram(),
        }
    }

    fn add(&mut self, other: &HttpSeries) {
        self.count += other.count;
        self.failed += other.failed;
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.duration.add(&other.duration);
        let _ = self.service.add(&other.service);
    }
}

/// Everything recorded in one interval (or, summed, over the run).
#[derive(Clone)]
pub struct Buffer {
    /// Per (endpoint, status).
    pub http: HashMap<(EndpointId, u16), HttpSeries>,
    /// Untagged phase histograms: blocked, connecting, tls, sending, waiting, receiving.
    pub phases: [Histogram<u64>; 6],
    /// Completed iterations.
    pub iterations: u64,
    /// Iteration durations.
    pub iteration_duration: Histogram<u64>,
    /// Iterations that could not start (no free VU).
    pub dropped: u64,
    /// Checks that passed.
    pub checks_passed: u64,
    /// Checks that failed.
    pub checks_failed: u64,
    /// Bytes sent.
    pub data_sent: u64,
    /// Bytes received.
    pub data_received: u64,
    /// Transport errors by kind (`timeout`, `connect_refused`, …).
    pub errors: BTreeMap<&'static str, u64>,
    /// WebSocket sessions started.
    pub ws_sessions: u64,
    /// WebSocket sessions that failed (connect, join or mid-session).
    pub ws_session_failures: u64,
    /// WebSocket handshake durations.
    pub ws_connecting: Histogram<u64>,
    /// Chat messages sent.
    pub ws_msgs_sent: u64,
    /// Chat messages received.
    pub ws_msgs_received: u64,
    /// Sender's send → receiver's frame, for messages of other clients.
    pub ws_delivery_latency: Histogram<u64>,
}

/// The phase names, in [`Buffer::phases`] order.
pub const PHASES: [&str; 6] = [
    "http_req_blocked",
    "http_req_connecting",
    "http_req_tls_handshaking",
    "http_req_sending",
    "http_req_waiting",
    "http_req_receiving",
];

impl Default for Buffer {
    fn default() -> Self {
        Buffer {
            http: HashMap::new(),
            phases: std::array::from_fn(|_| new_histogram()),
            iterations: 0,
            iteration_duration: new_histogram(),
            dropped: 0,
            checks_passed: 0,
            checks_failed: 0,
            data_sent: 0,
            data_received: 0,
            errors: BTreeMap::new(),
            ws_sessions: 0,
            ws_session_failures: 0,
            ws_connecting: new_histogram(),
            ws_msgs_sent: 0,
            ws_msgs_received: 0,
            ws_delivery_latency: new_histogram(),
        }
    }
}

impl Buffer {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Buffer) {
        for (key, series) in &other.http {
            self.http
                .entry(*key)
                .or_insert_with(HttpSeries::new)
                .add(series);
        }
        for (mine, theirs) in self.phases.iter_mut().zip(&other.phases) {
            let _ = mine.add(theirs);
        }
        self.iterations += other.iterations;
        let _ = self.iteration_duration.add(&other.iteration_duration);
        self.dropped += other.dropped;
        self.checks_passed += other.checks_passed;
        self.checks_failed += other.checks_failed;
        self.data_sent += other.data_sent;
        self.data_received += other.data_received;
        for (kind, n) in &other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
        self.ws_sessions += other.ws_sessions;
        self.ws_session_failures += other.ws_session_failures;
        let _ = self.ws_connecting.add(&other.ws_connecting);
        self.ws_msgs_sent += other.ws_msgs_sent;
        self.ws_msgs_received += other.ws_msgs_received;
        let _ = self.ws_delivery_latency.add(&other.ws_delivery_latency);
    }

    /// Empties the buffer, keeping its allocations.
    pub fn reset(&mut self) {
        for series in self.http.values_mut() {
            series.count = 0;
            series.failed = 0;
            series.duration.reset();
            series.service.reset();
        }
        for h in &mut self.phases {
            h.reset();
        }
        self.iterations = 0;
        self.iteration_duration.reset();
        self.dropped = 0;
        self.checks_passed = 0;
        self.checks_failed = 0;
        self.data_sent = 0;
        self.data_received = 0;
        self.errors.clear();
        self.ws_sessions = 0;
        self.ws_session_failures = 0;
        self.ws_connecting.reset();
        self.ws_msgs_sent = 0;
        self.ws_msgs_received = 0;
        self.ws_delivery_latency.reset();
    }

    /// Total requests.
    pub fn requests(&self) -> u64 {
        self.http.values().map(|s| s.count).sum()
    }

    /// Total failed requests.
    pub fn failures(&self) -> u64 {
        self.http.values().map(|s| s.failed).sum()
    }

    /// `http_req_duration` over every endpoint and status.
    pub fn duration_all(&self) -> Histogram<u64> {
        let mut h = new_histogram();
        for s in self.http.values() {
            let _ = h.add(&s.duration);
        }
        h
    }

    fn record_http(&mut self, s: &HttpSample) {
        let series = self
            .http
            .entry((s.endpoint, s.status))
            .or_insert_with(HttpSeries::new);
        series.count += 1;
        if s.failed {
            series.failed += 1;
        }
        let _ = series
            .duration
            .record(micros(s.queued + s.blocked + s.service));
        let _ = series.service.record(micros(s.service));
        for (h, d) in self.phases.iter_mut().zip([
            s.blocked,
            s.connecting,
            s.tls_handshaking,
            s.sending,
            s.waiting,
            s.receiving,
        ]) {
            let _ = h.record(micros(d));
        }
        self.data_sent += s.sent;
        self.data_received += s.received;
    }
}

/// Shared state: sharded buffers plus live gauges.
pub struct Registry {
    shards: Vec<Mutex<Buffer>>,
    endpoints: Mutex<Vec<String>>,
    /// VUs currently running an iteration or waiting for one.
    pub vus: AtomicU64,
    /// VUs allocated so far (arrival-rate executors grow towards maxVUs).
    pub vus_max: AtomicU64,
    /// Highest `vus` since the collector last read it.
    pub vus_peak: AtomicU64,
}

fn lock(m: &Mutex<Buffer>) -> MutexGuard<'_, Buffer> {
    // A panic in a VU while recording leaves at worst one half-recorded sample.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Registry {
    /// A registry with enough shards that VUs rarely contend.
    pub fn new() -> Arc<Registry> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Arc::new(Registry {
            shards: (0..(cores * 4).max(8))
                .map(|_| Mutex::new(Buffer::default()))
                .collect(),
            endpoints: Mutex::new(Vec::new()),
            vus: AtomicU64::new(0),
            vus_max: AtomicU64::new(0),
            vus_peak: AtomicU64::new(0),
        })
    }

    /// One more VU is active; tracks the peak for the interval.
    pub fn busy(&self) {
        let now = self.vus.fetch_add(1, Ordering::Relaxed) + 1;
        self.vus_peak.fetch_max(now, Ordering::Relaxed);
    }

    /// The peak of active VUs since the last call (at least the current count).
    pub fn take_vus_peak(&self) -> u64 {
        let current = self.vus.load(Ordering::Relaxed);
        self.vus_peak.swap(current, Ordering::Relaxed).max(current)
    }

    /// Interns an endpoint name.
    pub fn endpoint(&self, name: &str) -> EndpointId {
        let mut names = self
            .endpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(i) = names.iter().position(|n| n == name) {
            return EndpointId(i as u16);
        }
        names.push(name.to_owned());
        EndpointId((names.len() - 1).min(u16::MAX as usize) as u16)
    }

    /// The name of one endpoint (empty if unknown).
    pub fn endpoint_name(&self, id: EndpointId) -> String {
        self.endpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(usize::from(id.0))
            .cloned()
            .unwrap_or_default()
    }

    /// The endpoint names, indexed by [`EndpointId`].
    pub fn endpoint_names(&self) -> Vec<String> {
        self.endpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A recorder for VU `vu`.
    pub fn recorder(self: &Arc<Self>, vu: u64) -> Recorder {
        Recorder {
            registry: Arc::clone(self),
            shard: (vu as usize) % self.shards.len(),
        }
    }

    /// Moves everything recorded since the last drain into `into`.
    pub fn drain_into(&self, into: &mut Buffer) {
        for shard in &self.shards {
            let mut b = lock(shard);
            into.add(&b);
            b.reset();
        }
    }
}

/// A VU's handle for recording.
#[derive(Clone)]
pub struct Recorder {
    registry: Arc<Registry>,
    shard: usize,
}

impl Recorder {
    fn buffer(&self) -> MutexGuard<'_, Buffer> {
        lock(&self.registry.shards[self.shard])
    }

    /// Records one HTTP request; `error` names the transport error kind when there was one.
    pub fn http(&self, sample: &HttpSample, error: Option<&'static str>) {
        let mut b = self.buffer();
        b.record_http(sample);
        if let Some(kind) = error {
            *b.errors.entry(kind).or_default() += 1;
        }
    }

    /// Records a completed iteration.
    pub fn iteration(&self, duration: Duration) {
        let mut b = self.buffer();
        b.iterations += 1;
        let _ = b.iteration_duration.record(micros(duration));
    }

    /// Records a check.
    pub fn check(&self, passed: bool) {
        let mut b = self.buffer();
        if passed {
            b.checks_passed += 1;
        } else {
            b.checks_failed += 1;
        }
    }

    /// Records a WebSocket session start (`connecting` = handshake time) or a failure.
    pub fn ws_session(&self, connecting: Option<Duration>) {
        let mut b = self.buffer();
        b.ws_sessions += 1;
        match connecting {
            Some(d) => {
                let _ = b.ws_connecting.record(micros(d));
            }
            None => b.ws_session_failures += 1,
        }
    }

    /// Records a session that broke after it started.
    pub fn ws_failure(&self) {
        self.buffer().ws_session_failures += 1;
    }

    /// Records a chat message sent.
    pub fn ws_sent(&self) {
        self.buffer().ws_msgs_sent += 1;
    }

    /// Records a chat message received; `latency` when it came from another client.
    pub fn ws_received(&self, latency: Option<Duration>) {
        let mut b = self.buffer();
        b.ws_msgs_received += 1;
        if let Some(d) = latency {
            let _ = b.ws_delivery_latency.record(micros(d));
        }
    }

    /// Records iterations that could not start.
    pub fn dropped(&self, n: u64) {
        self.buffer().dropped += n;
    }

    /// The registry (for gauges and interning).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// Value of a histogram quantile in milliseconds (0 when empty).
pub fn quantile_ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        h.value_at_quantile(q) as f64 / 1_000.0
    }
}

/// Mean of a histogram in milliseconds (0 when empty).
pub fn mean_ms(h: &Histogram<u64>) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        h.mean() / 1_000.0
    }
}

/// Load the registry's VU gauges.
pub fn gauge(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_and_draining_is_exact() {
        let registry = Registry::new();
        let home = registry.endpoint("GET /home");
        assert_eq!(registry.endpoint("GET /home"), home);
        let post = registry.endpoint("POST /posts");
        for vu in 0..10u64 {
            let r = registry.recorder(vu);
            r.http(
                &HttpSample {
                    endpoint: if vu % 2 == 0 { home } else { post },
                    status: 200,
                    service: Duration::from_millis(10 * (vu + 1)),
                    queued: Duration::from_millis(5),
                    sent: 100,
                    received: 1_000,
                    ..HttpSample::default()
                },
                None,
            );
            r.iteration(Duration::from_millis(20));
        }
        registry.recorder(3).http(
            &HttpSample {
                endpoint: home,
                status: 0,
                failed: true,
                ..HttpSample::default()
            },
            Some("timeout"),
        );
        let mut interval = Buffer::default();
        registry.drain_into(&mut interval);
        assert_eq!(interval.requests(), 11);
        assert_eq!(interval.failures(), 1);
        assert_eq!(interval.iterations, 10);
        assert_eq!(interval.data_sent, 1_000);
        assert_eq!(interval.errors.get("timeout"), Some(&1));
        let all = interval.duration_all();
        // Intended-start latency includes the 5 ms queueing; the service time does not
        // (three significant digits: within 0.1%).
        let close = |a: f64, b: f64| (a - b).abs() <= b * 0.001;
        assert!(
            close(quantile_ms(&all, 1.0), 105.0),
            "{}",
            quantile_ms(&all, 1.0)
        );
        let home_200 = &interval.http[&(home, 200)];
        assert_eq!(home_200.count, 5);
        assert!(close(quantile_ms(&home_200.service, 1.0), 90.0));
        // Drained: the next interval starts empty.
        let mut next = Buffer::default();
        registry.drain_into(&mut next);
        assert_eq!(next.requests(), 0);
    }
}
