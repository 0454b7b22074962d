//! Prometheus metrics, scraped at `GET /metrics`: RED metrics per route for every service, plus
//! whatever each service registers (fan-out lag, queue backlog, …).

use std::sync::{Arc, RwLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};

/// Labels of the per-route HTTP metrics. `route` is the route template, never the raw path.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// HTTP method.
    pub method: String,
    /// Route template, e.g. `/v1/users/{id}/timeline`.
    pub route: String,
    /// Response status code.
    pub status: u16,
}

/// Latency buckets from 0.5 ms to ~33 s.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0005, 2.0, 17)
}

/// A service's metric registry: Prometheus for `/metrics`, and the same RED figures over OTLP
/// when telemetry is on (service metrics take the [`Metrics::meter`] for their OTLP twins).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<RwLock<Registry>>,
    requests: Family<RouteLabels, Counter>,
    durations: Family<RouteLabels, Histogram>,
    meter: opentelemetry::metrics::Meter,
    otel_durations: opentelemetry::metrics::Histogram<f64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A registry whose metrics are prefixed `loadlab_`, exporting nothing over OTLP.
    pub fn new() -> Self {
        Self::with_meter(opentelemetry::global::meter_provider().meter("loadlab"))
    }

    /// A registry whose RED metrics also go to `telemetry`'s OTLP exporter.
    pub fn with_telemetry(telemetry: &crate::telemetry::Telemetry) -> Self {
        Self::with_meter(telemetry.meter().clone())
    }

    fn with_meter(meter: opentelemetry::metrics::Meter) -> Self {
        let mut registry = Registry::with_prefix("loadlab");
        let requests = Family::<RouteLabels, Counter>::default();
        let durations = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        registry.register(
            "http_requests",
            "HTTP and gRPC requests served",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to the response head",
            durations.clone(),
        );
        // OpenTelemetry's HTTP/RPC semantic conventions: one histogram gives rate (count),
        // errors (by status) and duration.
        let otel_durations = meter
            .f64_histogram("http.server.request.duration")
            .with_unit("s")
            .with_description("Time to the response head, HTTP and gRPC")
            .with_boundaries(latency_buckets().collect())
            .build();
        Metrics {
            registry: Arc::new(RwLock::new(registry)),
            requests,
            durations,
            meter,
            otel_durations,
        }
    }

    /// The OTLP meter for service metrics (a no-op meter when telemetry is off).
    pub fn meter(&self) -> &opentelemetry::metrics::Meter {
        &self.meter
    }

    /// Registers a service metric.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .register(name, help, metric);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self
            .registry
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Middleware recording the RED metrics of every request.
pub async fn track(State(metrics): State<Metrics>, request: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = request.method().as_str().to_owned();
    let grpc = request
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    // gRPC services are mounted as `/<service>/{*rest}`: the method is the path itself.
    let route = if grpc {
        request.uri().path().to_owned()
    } else {
        request
            .extensions()
            .get::<MatchedPath>()
            .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned())
    };
    let response = next.run(request).await;
    let labels = RouteLabels {
        method,
        route,
        status: response.status().as_u16(),
    };
    let elapsed = start.elapsed().as_secs_f64();
    metrics.requests.get_or_create(&labels).inc();
    metrics.durations.get_or_create(&labels).observe(elapsed);
    metrics.otel_durations.record(
        elapsed,
        &[
            opentelemetry::KeyValue::new("http.request.method", labels.method),
            opentelemetry::KeyValue::new("http.route", labels.route),
            opentelemetry::KeyValue::new("http.response.status_code", i64::from(labels.status)),
        ],
    );
    response
}

/// `GET /metrics`.
pub async fn exposition(State(metrics): State<Metrics>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
}
