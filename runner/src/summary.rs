//! The end-of-test summary: `summary.json` (schema `loadlab.summary/v1`).
//!
//! `metrics` follows the layout of k6's end-of-test summary export — `metrics.<name>.{type,
//! contains, values}` with `avg`, `min`, `med`, `max`, `p(90)`, `p(95)`, `p(99)`, `count`, `rate`,
//! `passes`, `fails`, durations in milliseconds; tagged sub-metrics appear under keys like
//! `http_req_duration{scenario:feed-read}` — so k6 tooling reads it. loadlab adds `run`,
//! `thresholds`, `endpoints`, `timeseries`, `server` and `traces`. Fields are only ever added
//! within a schema version; removing or changing one bumps it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The schema identifier written to every summary.
pub const SCHEMA: &str = "loadlab.summary/v1";

/// A finished (or live) run's summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Always [`SCHEMA`].
    pub schema: String,
    /// What ran, when, and the verdict.
    pub run: RunInfo,
    /// k6-style metrics, by name (and `name{tag:value,…}` for sub-metrics).
    pub metrics: BTreeMap<String, Metric>,
    /// Every threshold with its outcome.
    pub thresholds: Vec<ThresholdResult>,
    /// Per endpoint (route template) figures.
    pub endpoints: Vec<EndpointStats>,
    /// One point per interval.
    pub timeseries: Timeseries,
    /// Server-side figures of the system under test, per service.
    pub server: ServerStats,
    /// Slowest sampled requests with their trace ids (when tracing is on).
    pub traces: Vec<TraceRef>,
}

/// A summary's RFC 3339 time (`run.started_at`, `run.ended_at`).
pub fn parse_time(rfc3339: &str) -> Option<SystemTime> {
    let t = chrono::DateTime::parse_from_rfc3339(rfc3339).ok()?;
    let nanos = u64::try_from(t.timestamp_nanos_opt()?).ok()?;
    Some(UNIX_EPOCH + Duration::from_nanos(nanos))
}

impl RunInfo {
    /// The load phase: it ends at `ended_at` and lasted `duration_s` (`None` when `ended_at`
    /// does not parse).
    pub fn load_window(&self) -> Option<(SystemTime, SystemTime)> {
        let end = parse_time(&self.ended_at)?;
        let start = end
            .checked_sub(Duration::from_secs_f64(self.duration_s.max(0.0)))
            .unwrap_or(UNIX_EPOCH);
        Some((start, end))
    }
}

/// Run identity, timing and verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// Run id.
    pub id: String,
    /// Scenario name.
    pub scenario: String,
    /// Executor type.
    pub executor: String,
    /// Target URLs by role.
    pub target: BTreeMap<String, String>,
    /// RFC 3339 start.
    pub started_at: String,
    /// RFC 3339 end.
    pub ended_at: String,
    /// Measured seconds (start of load to last iteration).
    pub duration_s: f64,
    /// Load generator processes.
    pub workers: u32,
    /// Iterations still running when `gracefulStop` ran out, and were cut off.
    #[serde(default)]
    pub interrupted_iterations: u64,
    /// Whether the load generator saturated, which makes the figures describe the generator.
    pub generator: GeneratorHealth,
    /// `pass` or `fail`.
    pub verdict: Verdict,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// loadlab version.
    pub version: String,
    /// A worker was lost and the run went on without it (`onWorkerLoss: continue`): the figures
    /// cover less load than planned.
    #[serde(default)]
    pub degraded: bool,
    /// How a distributed run went (absent for single-process runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distributed: Option<Distribution>,
}

/// A distributed run: its synchronized start, its workers, and the ones it lost.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    /// RFC 3339 instant the start was scheduled for (coordinator clock); absent when the run
    /// never started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_start: Option<String>,
    /// Latest minus earliest actual start among the workers, ms (each worker corrects its clock
    /// by its estimated offset from the coordinator's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_skew_ms: Option<f64>,
    /// The policy: `fail` or `continue`.
    pub on_worker_loss: String,
    /// Every worker, by index.
    pub workers: Vec<WorkerRecord>,
    /// Workers lost mid-run.
    #[serde(default)]
    pub lost_workers: Vec<LostWorker>,
    /// Interval reports merged.
    pub reports: u64,
    /// CPU the coordinator process used over the run, seconds.
    pub coordinator_cpu_s: f64,
}

/// One worker of a distributed run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Shard index.
    pub index: u32,
    /// Where it registered from (host or pod name and address).
    pub host: String,
    /// Its actual start minus the scheduled start, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_offset_ms: Option<f64>,
    /// Interval reports it sent.
    pub reports: u64,
    /// Requests it reported.
    pub requests: u64,
    /// Iterations it reported.
    pub iterations: u64,
    /// It was lost.
    pub lost: bool,
}

/// A worker lost mid-run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LostWorker {
    /// Shard index.
    pub index: u32,
    /// Seconds after the start.
    pub at_s: f64,
    /// Why it counts as lost (stream ended, silent, process exited, …).
    pub reason: String,
}

/// Pass or fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Every threshold held.
    Pass,
    /// A threshold failed, or the run could not complete.
    Fail,
}

/// The generator guard's findings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratorHealth {
    /// True when the generator was the bottleneck for part of the run.
    pub saturated: bool,
    /// Highest CPU use of the generator process, in cores.
    pub max_cpu_cores: f64,
    /// Highest scheduling lag observed (ms): how late timers fired.
    pub max_scheduling_lag_ms: f64,
    /// Human-readable explanation when saturated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// k6 metric kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricType {
    /// Cumulative count (`count`, `rate` per second).
    Counter,
    /// Last value (`value`, `min`, `max`).
    Gauge,
    /// Fraction of non-zero samples (`rate`, `passes`, `fails`).
    Rate,
    /// Distribution (`avg`, `min`, `med`, `max`, `p(N)`).
    Trend,
}

/// One metric in the k6 layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// Kind.
    #[serde(rename = "type")]
    pub kind: MetricType,
    /// `time` (ms), `data` (bytes) or `default`.
    pub contains: String,
    /// Aggregates: `avg`, `min`, `med`, `max`, `p(90)`, `p(95)`, `p(99)`, `count`, `rate`,
    /// `passes`, `fails`, `value`.
    pub values: BTreeMap<String, f64>,
}

/// A threshold and its outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThresholdResult {
    /// `metric` or `metric{tag:value}`.
    pub metric: String,
    /// The expression, e.g. `p(95)<200`.
    pub expr: String,
    /// Whether it held.
    pub ok: bool,
    /// The measured value it was compared with (absent when the metric had no samples).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual: Option<f64>,
}

/// Figures of one endpoint (route template) of one scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointStats {
    /// Scenario.
    pub scenario: String,
    /// Route template, e.g. `GET /v1/users/{id}/timeline`.
    pub endpoint: String,
    /// Requests sent.
    pub requests: u64,
    /// Failed requests (transport errors and unexpected statuses).
    pub failed: u64,
    /// Requests per second over the run.
    pub rps: f64,
    /// Latency percentiles and mean (ms, from the intended start).
    pub avg_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Maximum.
    pub max_ms: f64,
    /// Responses by status code; transport errors by kind (`timeout`, `connect_refused`, `dns`,
    /// `tls`, `reset`, …).
    pub statuses: BTreeMap<String, u64>,
}

/// Per-interval series.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timeseries {
    /// Interval length in seconds.
    pub interval_s: f64,
    /// Points, oldest first.
    pub points: Vec<Point>,
}

/// Client-side figures of one interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Seconds since the start of the run (end of the interval).
    pub t: f64,
    /// Requests per second.
    pub rps: f64,
    /// Failed requests per second.
    pub errors_per_s: f64,
    /// Latency percentiles of requests completed in the interval (ms).
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Most VUs active at once during the interval.
    pub vus: u64,
    /// Iterations dropped in the interval (arrival-rate executors).
    pub dropped: u64,
    /// Bytes sent per second.
    pub sent_bytes_per_s: f64,
    /// Bytes received per second.
    pub received_bytes_per_s: f64,
}

/// Server-side figures, per service of the system under test.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerStats {
    /// Where the figures came from (`proc` for local processes, `otlp` later).
    pub source: String,
    /// Services.
    pub services: Vec<ServiceStats>,
    /// Per-service span breakdown from traces (when tracing is on), slowest p99 first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spans: Vec<SpanStats>,
}

/// Latency of one span name of one service over the run's sampled traces.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SpanStats {
    /// Service (resource `service.name`).
    pub service: String,
    /// Span name, e.g. `GET /v1/users/{id}/timeline`.
    pub name: String,
    /// Spans seen.
    pub count: u64,
    /// Median duration, ms.
    pub p50_ms: f64,
    /// 95th percentile, ms.
    pub p95_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Longest, ms.
    pub max_ms: f64,
    /// Spans with error status.
    pub errors: u64,
}

/// One service's resource use over the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceStats {
    /// Service name (or process name).
    pub name: String,
    /// Average CPU in cores.
    pub avg_cpu_cores: f64,
    /// Peak CPU in cores.
    pub max_cpu_cores: f64,
    /// Peak resident memory in bytes.
    pub max_rss_bytes: u64,
    /// Bytes received over the run.
    pub net_rx_bytes: u64,
    /// Bytes sent over the run.
    pub net_tx_bytes: u64,
    /// One point per interval.
    pub points: Vec<ServicePoint>,
}

/// A service's resource use in one interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServicePoint {
    /// Seconds since the start of the run.
    pub t: f64,
    /// CPU in cores.
    pub cpu_cores: f64,
    /// Resident memory in bytes.
    pub rss_bytes: u64,
    /// Received bytes per second.
    pub net_rx_bytes_per_s: f64,
    /// Sent bytes per second.
    pub net_tx_bytes_per_s: f64,
}

/// A slow sampled request and its trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceRef {
    /// Seconds since the start of the run.
    pub t: f64,
    /// Endpoint.
    pub endpoint: String,
    /// Duration in ms.
    pub duration_ms: f64,
    /// W3C trace id (32 hex digits).
    pub trace_id: String,
    /// Link to the trace viewer, when one is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}
