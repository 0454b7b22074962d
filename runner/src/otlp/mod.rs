//! The embedded OTLP receiver of local runs: a real OTLP/gRPC server (the `TraceService` and
//! `MetricsService` of opentelemetry-proto) on loopback that the embedded services export to.
//! It keeps what it receives in memory, bounded, and turns it into the report's per-service
//! span breakdown and server CPU/memory/network ([`report`]).

pub mod report;

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
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use tokio::net::TcpListener;

/// Spans kept at most; beyond it new spans are counted as dropped (a long run at full
/// sampling must not grow the runner without bound).
pub const MAX_SPANS: usize = 500_000;
/// Metric points kept at most.
pub const MAX_POINTS: usize = 200_000;

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

#[derive(Default)]
struct Store {
    spans: Vec<ReceivedSpan>,
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
        self.lock().spans.clone()
    }

    /// The spans of one trace.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.lock()
            .spans
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
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
            if done(&self.lock().spans) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn add_spans(&self, request: ExportTraceServiceRequest) {
        let mut store = self.lock();
        for rs in request.resource_spans {
            let service = service_name(rs.resource.as_ref().map(|r| r.attributes.as_slice()));
            for ss in rs.scope_spans {
                for span in ss.spans {
                    if store.spans.len() >= MAX_SPANS {
                        store.dropped_spans += 1;
                        continue;
                    }
                    store.spans.push(ReceivedSpan {
                        service: service.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        name: span.name,
                        kind: span.kind,
                        start_unix_nano: span.start_time_unix_nano,
                        end_unix_nano: span.end_time_unix_nano,
                        attributes: span
                            .attributes
                            .into_iter()
                            .map(|kv| (kv.key, render_owned(kv.value)))
                            .collect(),
                        links: span
                            .links
                            .iter()
                            .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                            .collect(),
                        status: span.status.map_or(0, |s| s.code),
                    });
                }
            }
        }
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

/// [`render`], moving a string value instead of copying it.
fn render_owned(value: Option<AnyValue>) -> String {
    match value.and_then(|v| v.value) {
        Some(any_value::Value::StringValue(s)) => s,
        other => render_value(other.as_ref()),
    }
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
        self.0.add_spans(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
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

    #[test]
    fn ids_render_as_lower_case_hex() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        let id = 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736_u128;
        assert_eq!(hex(&id.to_be_bytes()), format!("{id:032x}"));
    }
}
