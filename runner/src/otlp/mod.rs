//! The embedded OTLP receiver of local runs: a real OTLP/gRPC server (the `TraceService` and
//! `MetricsService` of opentelemetry-proto) on loopback that the embedded services export to.
//! It keeps what it receives in memory, bounded, and turns it into the report's per-service
//! span breakdown and server CPU/memory/network ([`report`]).

pub mod report;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use loadlab_kit::Shutdown;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use tokio::net::TcpListener;

/// Spans kept at most; beyond it new spans are counted as dropped (a long run at full
/// sampling must not grow the runner without bound).
pub const MAX_SPANS: usize = 500_000;
/// Metric points kept at most.
pub const MAX_POINTS: usize = 200_000;
/// Distinct strings (names, attribute keys and values) shared between stored spans at most;
/// beyond it new strings are stored unshared.
const MAX_INTERNED: usize = 100_000;

/// A received span, flattened.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    /// `service.name` of its resource.
    pub service: String,
    /// Trace id, 32 hex digits.
    pub trace_id: String,
    /// Span id, 16 hex digits.
    pub span_id: String,
    /// Parent span id (empty for a root).
    pub parent_span_id: String,
    /// Span name.
    pub name: String,
    /// OTLP span kind (1 internal, 2 server, 3 client, 4 producer, 5 consumer).
    pub kind: i32,
    /// Start, Unix nanoseconds.
    pub start_unix_nano: u64,
    /// End, Unix nanoseconds.
    pub end_unix_nano: u64,
    /// Attributes rendered as strings.
    pub attributes: Vec<(String, String)>,
    /// Links: (trace id, span id), hex.
    pub links: Vec<(String, String)>,
    /// Status code (0 unset, 1 ok, 2 error).
    pub status: i32,
}

impl ReceivedSpan {
    /// Duration in milliseconds.
    pub fn duration_ms(&self) -> f64 {
        self.end_unix_nano.saturating_sub(self.start_unix_nano) as f64 / 1e6
    }

    /// An attribute's value.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Which process metric a point belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessMetric {
    /// `process.cpu.time`, cumulative seconds.
    CpuSeconds,
    /// `process.memory.usage`, bytes.
    MemoryBytes,
    /// `process.network.io` receive, cumulative bytes.
    NetRxBytes,
    /// `process.network.io` transmit, cumulative bytes.
    NetTxBytes,
}

/// One process-metric observation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricPoint {
    /// Observation time, Unix nanoseconds.
    pub time_unix_nano: u64,
    /// Value.
    pub value: f64,
}

/// A span as stored: ids as bytes, and every string shared with the other spans that carry it
/// (service, name, attribute keys and most values repeat). At full sampling a run keeps up to
/// [`MAX_SPANS`] of these; in this form a span takes about a third of a [`ReceivedSpan`], and it
/// keeps no allocation of the decoded request alive, so the decoder's memory is reused instead
/// of the store growing into fresh pages.
struct StoredSpan {
    service: Arc<str>,
    name: Arc<str>,
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent_span_id: Option<[u8; 8]>,
    kind: i32,
    status: i32,
    start_unix_nano: u64,
    end_unix_nano: u64,
    attributes: Box<[(Arc<str>, Arc<str>)]>,
    links: Box<[([u8; 16], [u8; 8])]>,
}

impl StoredSpan {
    fn to_received(&self) -> ReceivedSpan {
        ReceivedSpan {
            service: self.service.to_string(),
            trace_id: hex(&self.trace_id),
            span_id: hex(&self.span_id),
            parent_span_id: self.parent_span_id.map(|p| hex(&p)).unwrap_or_default(),
            name: self.name.to_string(),
            kind: self.kind,
            start_unix_nano: self.start_unix_nano,
            end_unix_nano: self.end_unix_nano,
            attributes: self
                .attributes
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            links: self.links.iter().map(|(t, s)| (hex(t), hex(s))).collect(),
            status: self.status,
        }
    }
}

/// Shared strings, bounded by [`MAX_INTERNED`].
#[derive(Default)]
struct Interner(HashSet<Arc<str>>);

impl Interner {
    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(shared) = self.0.get(s) {
            return shared.clone();
        }
        let shared: Arc<str> = Arc::from(s);
        if self.0.len() < MAX_INTERNED {
            self.0.insert(shared.clone());
        }
        shared
    }

    fn value(&mut self, value: Option<&AnyValue>) -> Arc<str> {
        match value.and_then(|v| v.value.as_ref()) {
            Some(any_value::Value::StringValue(s)) => self.get(s),
            other => self.get(&render_value(other)),
        }
    }
}

/// Why a span of an export request was rejected: OTLP requires 16-byte trace ids and 8-byte
/// span ids (and an empty or 8-byte parent).
#[derive(Debug, PartialEq)]
enum BadIds {
    Trace(usize),
    Span(usize),
    Parent(usize),
    Link,
}

impl std::fmt::Display for BadIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadIds::Trace(n) => write!(f, "trace_id has {n} bytes, not 16"),
            BadIds::Span(n) => write!(f, "span_id has {n} bytes, not 8"),
            BadIds::Parent(n) => write!(f, "parent_span_id has {n} bytes, not 0 or 8"),
            BadIds::Link => f.write_str("a link's ids are not 16 and 8 bytes"),
        }
    }
}

#[derive(Default)]
struct Store {
    spans: Vec<StoredSpan>,
    strings: Interner,
    dropped_spans: u64,
    /// (service, metric, point), in arrival order.
    points: Vec<(String, ProcessMetric, MetricPoint)>,
    /// Names of every metric received, per service (for tests and diagnostics).
    metric_names: Vec<(String, String)>,
    /// The process each service runs in (from `service.instance.id`), in first-seen order.
    processes: Vec<(String, String)>,
}

/// The received telemetry, shared between the gRPC services and readers.
#[derive(Clone, Default)]
pub struct Received(Arc<Mutex<Store>>);

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received").finish_non_exhaustive()
    }
}

impl Received {
    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.lock()
            .spans
            .iter()
            .map(StoredSpan::to_received)
            .collect()
    }

    /// The spans of one trace (`trace_id` in hex; none when it is not a trace id).
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        let Some(id) = parse_trace_id(trace_id) else {
            return Vec::new();
        };
        self.lock()
            .spans
            .iter()
            .filter(|s| s.trace_id == id)
            .map(StoredSpan::to_received)
            .collect()
    }

    /// Spans not kept because the store was full.
    pub fn dropped_spans(&self) -> u64 {
        self.lock().dropped_spans
    }

    /// Process-metric points of `service`.
    pub fn points(&self, service: &str, metric: ProcessMetric) -> Vec<MetricPoint> {
        self.lock()
            .points
            .iter()
            .filter(|(s, m, _)| s == service && *m == metric)
            .map(|(_, _, p)| *p)
            .collect()
    }

    /// Services that sent process metrics, in first-seen order.
    pub fn metric_services(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (s, _, _) in &self.lock().points {
            if !out.contains(s) {
                out.push(s.clone());
            }
        }
        out
    }

    /// The process `service` runs in: its `service.instance.id` without the trailing
    /// `:<service>` the kit appends (services of one process share it); the service name
    /// itself when unknown.
    pub fn process_of(&self, service: &str) -> String {
        self.lock()
            .processes
            .iter()
            .find(|(s, _)| s == service)
            .map_or_else(|| service.to_owned(), |(_, p)| p.clone())
    }

    /// Whether `service` has sent a metric named `name`.
    pub fn has_metric(&self, service: &str, name: &str) -> bool {
        self.lock()
            .metric_names
            .iter()
            .any(|(s, n)| s == service && n == name)
    }

    /// Waits until `done` holds for the received spans, or `timeout` passes; returns whether
    /// it held.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if done(&self.spans()) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stores the spans of `request`; returns how many were rejected for malformed ids, and
    /// the first reason.
    fn add_spans(&self, request: &ExportTraceServiceRequest) -> (i64, Option<BadIds>) {
        let mut guard = self.lock();
        let store = &mut *guard;
        let (mut rejected, mut reason) = (0i64, None);
        for rs in &request.resource_spans {
            let service = store.strings.get(&service_name(
                rs.resource.as_ref().map(|r| r.attributes.as_slice()),
            ));
            for span in rs.scope_spans.iter().flat_map(|ss| &ss.spans) {
                let ids = match span_ids(span) {
                    Ok(ids) => ids,
                    Err(why) => {
                        rejected += 1;
                        reason.get_or_insert(why);
                        continue;
                    }
                };
                if store.spans.len() >= MAX_SPANS {
                    store.dropped_spans += 1;
                    continue;
                }
                let (trace_id, span_id, parent_span_id, links) = ids;
                let attributes = span
                    .attributes
                    .iter()
                    .map(|kv| {
                        (
                            store.strings.get(&kv.key),
                            store.strings.value(kv.value.as_ref()),
                        )
                    })
                    .collect();
                store.spans.push(StoredSpan {
                    service: service.clone(),
                    name: store.strings.get(&span.name),
                    trace_id,
                    span_id,
                    parent_span_id,
                    kind: span.kind,
                    status: span.status.as_ref().map_or(0, |s| s.code),
                    start_unix_nano: span.start_time_unix_nano,
                    end_unix_nano: span.end_time_unix_nano,
                    attributes,
                    links,
                });
            }
        }
        (rejected, reason)
    }

    fn add_metrics(&self, request: ExportMetricsServiceRequest) {
        let mut store = self.lock();
        for rm in request.resource_metrics {
            let attributes = rm.resource.as_ref().map(|r| r.attributes.as_slice());
            let service = service_name(attributes);
            if !store.processes.iter().any(|(s, _)| *s == service) {
                let instance = attributes
                    .unwrap_or_default()
                    .iter()
                    .find(|kv| kv.key == "service.instance.id")
                    .map(|kv| render(kv.value.as_ref()));
                let process = match instance {
                    Some(i) => i
                        .strip_suffix(&format!(":{service}"))
                        .map_or(i.clone(), str::to_owned),
                    None => service.clone(),
                };
                store.processes.push((service.clone(), process));
            }
            for sm in rm.scope_metrics {
                for m in sm.metrics {
                    if !store
                        .metric_names
                        .iter()
                        .any(|(s, n)| *s == service && *n == m.name)
                    {
                        store.metric_names.push((service.clone(), m.name.clone()));
                    }
                    let points = match m.data {
                        Some(metric::Data::Sum(s)) => s.data_points,
                        Some(metric::Data::Gauge(g)) => g.data_points,
                        _ => continue,
                    };
                    for p in points {
                        let which = match m.name.as_str() {
                            "process.cpu.time" => ProcessMetric::CpuSeconds,
                            "process.memory.usage" => ProcessMetric::MemoryBytes,
                            "process.network.io" => {
                                let direction = p
                                    .attributes
                                    .iter()
                                    .find(|kv| kv.key == "network.io.direction")
                                    .map(|kv| render(kv.value.as_ref()));
                                match direction.as_deref() {
                                    Some("receive") => ProcessMetric::NetRxBytes,
                                    Some("transmit") => ProcessMetric::NetTxBytes,
                                    _ => continue,
                                }
                            }
                            _ => continue,
                        };
                        let value = match p.value {
                            Some(number_data_point::Value::AsDouble(v)) => v,
                            Some(number_data_point::Value::AsInt(v)) => v as f64,
                            None => continue,
                        };
                        if store.points.len() < MAX_POINTS {
                            store.points.push((
                                service.clone(),
                                which,
                                MetricPoint {
                                    time_unix_nano: p.time_unix_nano,
                                    value,
                                },
                            ));
                        }
                    }
                }
            }
        }
    }
}

/// Lower-case hex of an id (ids arrive by the hundred thousand: no formatting machinery).
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

fn render(value: Option<&AnyValue>) -> String {
    render_value(value.and_then(|v| v.value.as_ref()))
}

type SpanIds = (
    [u8; 16],
    [u8; 8],
    Option<[u8; 8]>,
    Box<[([u8; 16], [u8; 8])]>,
);

/// A span's ids, checked: trace id, span id, parent (none for a root) and links.
fn span_ids(span: &opentelemetry_proto::tonic::trace::v1::Span) -> Result<SpanIds, BadIds> {
    let trace_id = <[u8; 16]>::try_from(span.trace_id.as_slice())
        .map_err(|_| BadIds::Trace(span.trace_id.len()))?;
    let span_id = <[u8; 8]>::try_from(span.span_id.as_slice())
        .map_err(|_| BadIds::Span(span.span_id.len()))?;
    let parent = match span.parent_span_id.len() {
        0 => None,
        _ => Some(
            <[u8; 8]>::try_from(span.parent_span_id.as_slice())
                .map_err(|_| BadIds::Parent(span.parent_span_id.len()))?,
        ),
    };
    let links = span
        .links
        .iter()
        .map(|l| {
            Ok((
                <[u8; 16]>::try_from(l.trace_id.as_slice()).map_err(|_| BadIds::Link)?,
                <[u8; 8]>::try_from(l.span_id.as_slice()).map_err(|_| BadIds::Link)?,
            ))
        })
        .collect::<Result<_, BadIds>>()?;
    Ok((trace_id, span_id, parent, links))
}

/// A trace id from its 32 hex digits.
fn parse_trace_id(hex: &str) -> Option<[u8; 16]> {
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(hex, 16).ok().map(u128::to_be_bytes)
}

fn render_value(value: Option<&any_value::Value>) -> String {
    match value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn service_name(attributes: Option<&[KeyValue]>) -> String {
    attributes
        .unwrap_or_default()
        .iter()
        .find(|kv| kv.key == "service.name")
        .map_or_else(|| "unknown".to_owned(), |kv| render(kv.value.as_ref()))
}

#[derive(Clone)]
struct Traces(Received);

#[tonic::async_trait]
impl TraceService for Traces {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        // OTLP's partial success: well-formed spans are kept, malformed ones are counted and
        // named back to the exporter (which logs it) instead of failing the whole batch.
        let (rejected, reason) = self.0.add_spans(request.get_ref());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: reason.map(|why| ExportTracePartialSuccess {
                rejected_spans: rejected,
                error_message: format!("{rejected} span(s) rejected: {why}"),
            }),
        }))
    }
}

#[derive(Clone)]
struct Metrics(Received);

#[tonic::async_trait]
impl MetricsService for Metrics {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.0.add_metrics(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

/// A running receiver.
#[derive(Debug)]
pub struct Receiver {
    addr: SocketAddr,
    received: Received,
    stop: Shutdown,
    task: tokio::task::JoinHandle<()>,
}

/// Largest accepted export request (the SDK's batches are far smaller).
const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

impl Receiver {
    /// Listens on `addr` (port 0 for any) and serves until [`Receiver::stop`].
    pub async fn start(addr: SocketAddr) -> std::io::Result<Receiver> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let received = Received::default();
        let stop = Shutdown::new();
        let routes = tonic::service::Routes::new(
            TraceServiceServer::new(Traces(received.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            MetricsServiceServer::new(Metrics(received.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        );
        let signal = stop.clone();
        let task = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let served = tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming, signal.wait())
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "OTLP receiver stopped");
            }
        });
        tracing::debug!(%addr, "OTLP receiver listening");
        Ok(Receiver {
            addr,
            received,
            stop,
            task,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The OTLP/gRPC endpoint URL to export to.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What was received.
    pub fn received(&self) -> &Received {
        &self.received
    }

    /// Stops serving.
    pub async fn stop(self) {
        self.stop.trigger();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, span};

    fn kv(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    fn span(trace: &[u8], id: &[u8], parent: &[u8], path: &str) -> Span {
        Span {
            trace_id: trace.to_vec(),
            span_id: id.to_vec(),
            parent_span_id: parent.to_vec(),
            name: "GET /v1/users/{id}/timeline".to_owned(),
            kind: 2,
            start_time_unix_nano: 1_000,
            end_time_unix_nano: 3_500_000,
            attributes: vec![
                kv("url.path", any_value::Value::StringValue(path.to_owned())),
                kv("http.response.status_code", any_value::Value::IntValue(200)),
                kv("edge", any_value::Value::BoolValue(true)),
            ],
            links: vec![span::Link {
                trace_id: vec![7; 16],
                span_id: vec![8; 8],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn request(spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv(
                        "service.name",
                        any_value::Value::StringValue("feed".to_owned()),
                    )],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn spans_round_trip_through_the_compact_store() {
        let received = Received::default();
        let trace = [0xab; 16];
        let got = received.add_spans(&request(vec![
            span(&trace, &[1; 8], &[], "/v1/users/1/timeline"),
            span(&trace, &[2; 8], &[1; 8], "/v1/users/2/timeline"),
        ]));
        assert_eq!(got, (0, None));
        let spans = received.spans();
        assert_eq!(spans.len(), 2);
        let root = &spans[0];
        assert_eq!(root.service, "feed");
        assert_eq!(root.trace_id, "ab".repeat(16));
        assert_eq!(root.span_id, "01".repeat(8));
        assert_eq!(root.parent_span_id, "");
        assert_eq!(spans[1].parent_span_id, "01".repeat(8));
        assert_eq!(root.name, "GET /v1/users/{id}/timeline");
        assert_eq!(root.kind, 2);
        assert!((root.duration_ms() - 3.499).abs() < 1e-9);
        assert_eq!(root.attribute("url.path"), Some("/v1/users/1/timeline"));
        assert_eq!(spans[1].attribute("url.path"), Some("/v1/users/2/timeline"));
        assert_eq!(root.attribute("http.response.status_code"), Some("200"));
        assert_eq!(root.attribute("edge"), Some("true"));
        assert_eq!(root.links, vec![("07".repeat(16), "08".repeat(8))]);
        assert_eq!(received.trace(&"ab".repeat(16)).len(), 2);
        assert_eq!(
            received.trace(&"AB".repeat(16)).len(),
            2,
            "hex is case-blind"
        );
        assert!(received.trace(&"cd".repeat(16)).is_empty());
        for junk in ["", "ab", "zz".repeat(16).as_str(), "+".repeat(32).as_str()] {
            assert!(received.trace(junk).is_empty(), "{junk:?}");
        }
        // Repeated strings are stored once.
        let store = received.lock();
        assert!(Arc::ptr_eq(&store.spans[0].name, &store.spans[1].name));
        assert!(Arc::ptr_eq(
            &store.spans[0].service,
            &store.spans[1].service
        ));
        assert!(Arc::ptr_eq(
            &store.spans[0].attributes[1].1,
            &store.spans[1].attributes[1].1
        ));
    }

    #[test]
    fn malformed_ids_are_rejected_alone_and_reported() {
        let received = Received::default();
        let good = span(&[1; 16], &[1; 8], &[], "/ok");
        let mut bad_link = span(&[1; 16], &[5; 8], &[], "/bad");
        bad_link.links[0].span_id = vec![1, 2];
        let got = received.add_spans(&request(vec![
            span(&[1; 15], &[2; 8], &[], "/bad"),
            good,
            span(&[1; 16], &[3; 9], &[], "/bad"),
            span(&[1; 16], &[4; 8], &[1; 4], "/bad"),
            bad_link,
        ]));
        assert_eq!(got, (4, Some(BadIds::Trace(15))));
        assert_eq!(
            BadIds::Trace(15).to_string(),
            "trace_id has 15 bytes, not 16"
        );
        assert_eq!(BadIds::Span(9).to_string(), "span_id has 9 bytes, not 8");
        assert_eq!(
            BadIds::Parent(4).to_string(),
            "parent_span_id has 4 bytes, not 0 or 8"
        );
        let spans = received.spans();
        assert_eq!(spans.len(), 1, "only the well-formed span is kept");
        assert_eq!(spans[0].attribute("url.path"), Some("/ok"));
        assert_eq!(received.dropped_spans(), 0);
    }

    #[test]
    fn the_interner_is_bounded() {
        let mut strings = Interner::default();
        for i in 0..MAX_INTERNED + 10 {
            strings.get(&i.to_string());
        }
        assert_eq!(strings.0.len(), MAX_INTERNED);
        let a = strings.get("beyond the bound");
        let b = strings.get("beyond the bound");
        assert_eq!(a, b);
        assert!(!Arc::ptr_eq(&a, &b), "not shared once full");
        let c = strings.get("0");
        assert!(
            Arc::ptr_eq(&c, &strings.get("0")),
            "earlier strings stay shared"
        );
    }

    #[test]
    fn ids_render_as_lower_case_hex() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        let id = 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736_u128;
        assert_eq!(hex(&id.to_be_bytes()), format!("{id:032x}"));
    }
}
