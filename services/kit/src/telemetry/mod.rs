//! Logging and OpenTelemetry.
//!
//! * Logs: filter with `LOADLAB_LOG` (or `RUST_LOG`), e.g. `LOADLAB_LOG=info,loadlab_feed=debug`.
//! * Traces: `tracing` spans become OpenTelemetry spans through `tracing-opentelemetry` when an
//!   OTLP endpoint is configured ([`OtelArgs`]); they are batch-exported over OTLP/gRPC. The
//!   hot-path spans of a sampled request — its server span and its Redis and gRPC client spans
//!   — are made with the SDK directly ([`server_span`], [`ClientSpan`]), without the `tracing`
//!   machinery, in the same traces. W3C trace context crosses every hop: HTTP headers, gRPC
//!   metadata, the fan-out queue and chat pub/sub.
//! * Metrics: each service gets a [`Telemetry`] handle whose [`Meter`] exports over OTLP/gRPC.
//!
//! Telemetry is off unless an endpoint is configured: then no exporter exists and nothing but
//! the (cheap) `tracing` spans runs on request paths. When it is on, export never blocks a
//! request: finished spans go into a bounded queue that a background thread drains, and spans
//! are dropped when the queue is full (an unreachable collector costs spans, not latency).
//!
//! Several services may share one process (`loadlab up`, tests). The trace pipeline is global
//! (the `tracing` subscriber is), so spans are attributed to a service by the task that started
//! them: every request handled by the kit's server and every background loop started through
//! [`in_service`] runs with its service's name in a task-local, and the exporter groups spans
//! by it into one OTLP resource per service.

mod client_span;
pub mod names;
mod otlp;
mod pipeline;
pub mod process;
pub mod propagation;

use std::time::Duration;

use clap::Args;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

pub use client_span::{ClientSpan, server_span};
pub use pipeline::{
    EDGE_SAMPLED_KEY, in_service, root_sample_ratio, service_scope, sync_in_service,
};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// OpenTelemetry flags shared by every binary. The standard `OTEL_*` variables are honoured too:
/// `OTEL_EXPORTER_OTLP_*` (endpoint, timeout, headers), `OTEL_TRACES_SAMPLER[_ARG]` (when
/// `--trace-sample-ratio` is not given), `OTEL_BSP_*` (batch queue), `OTEL_METRIC_EXPORT_INTERVAL`,
/// `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_SDK_DISABLED`.
#[derive(Debug, Clone, Default, Args)]
pub struct OtelArgs {
    /// OTLP/gRPC collector, e.g. `http://jaeger:4317`. Telemetry is off when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Fraction of new traces to sample (0..=1). Sampling is parent-based: a request that
    /// arrives with a `traceparent` follows its caller's decision. Default: the
    /// `OTEL_TRACES_SAMPLER` setting, else every trace.
    #[arg(long, env = "LOADLAB_TRACE_SAMPLE_RATIO")]
    pub trace_sample_ratio: Option<f64>,

    /// The load test run this deployment serves (resource attribute `loadtest.run`).
    #[arg(long, env = "LOADLAB_LOADTEST_RUN")]
    pub loadtest_run: Option<String>,
}

impl OtelArgs {
    /// Telemetry pointed at `endpoint`.
    pub fn with_endpoint(endpoint: impl Into<String>) -> Self {
        OtelArgs {
            otlp_endpoint: Some(endpoint.into()),
            ..OtelArgs::default()
        }
    }

    /// Whether anything is exported: an endpoint is configured and the SDK is not disabled.
    pub fn enabled(&self) -> bool {
        let disabled =
            std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
        !disabled
            && self
                .otlp_endpoint
                .as_deref()
                .is_some_and(|e| !e.trim().is_empty())
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        if let Some(r) = self.trace_sample_ratio
            && !(0.0..=1.0).contains(&r)
        {
            return Err(crate::config::ConfigError(format!(
                "--trace-sample-ratio / LOADLAB_TRACE_SAMPLE_RATIO must be within 0..=1 (got {r})"
            )));
        }
        if let Some(e) = &self.otlp_endpoint
            && !e.trim().is_empty()
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(crate::config::ConfigError(format!(
                "--otlp-endpoint / OTEL_EXPORTER_OTLP_ENDPOINT must be an http:// URL (got {e:?})"
            )));
        }
        Ok(())
    }
}

/// Telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter refused its configuration.
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// The span exporter's configuration (endpoint, `OTEL_EXPORTER_OTLP_*`) is invalid.
    #[error("OTLP span exporter: {0}")]
    Config(String),
}

fn log_filter() -> EnvFilter {
    let filter = std::env::var("LOADLAB_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_owned());
    EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("ignoring invalid log filter {filter:?}: {e}");
        EnvFilter::new("info")
    })
}

/// Installs the global subscriber for logs only. Safe to call more than once (later calls are
/// no-ops), so that several services can share one process.
pub fn init_logging(format: LogFormat) {
    init(format, &OtelArgs::default());
}

/// Installs the global subscriber: logs, plus span export when `otel` names an endpoint (the
/// W3C propagator and the process-wide trace pipeline are set up then). Later calls are no-ops;
/// call it before starting services so their spans are exported.
pub fn init(format: LogFormat, otel: &OtelArgs) {
    let fmt = tracing_subscriber::fmt::layer().with_target(true);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    // The log filter applies to log output only; spans for export are chosen by the OTel
    // layer's own filter, so `LOADLAB_LOG=warn` does not switch tracing off.
    let fmt = tracing_subscriber::Layer::with_filter(fmt, log_filter());
    let otel_layer = if otel.enabled() {
        pipeline::tracer(otel).map(|tracer| {
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_location(false)
                .with_threads(false)
                .with_target(false)
                .with_tracked_inactivity(false);
            // Requests the edge chose not to sample run without spans (see
            // `propagation::unsampled`): whatever they start is not for export either.
            let filter = tracing_subscriber::filter::FilterExt::and(
                tracing_subscriber::filter::LevelFilter::INFO,
                // The hint keeps the global max level at INFO: without one, `And` has none
                // either, and every `debug!`/`trace!` in hyper, h2 and tonic stays live.
                tracing_subscriber::filter::filter_fn(|_| !propagation::in_unsampled())
                    .with_max_level_hint(tracing_subscriber::filter::LevelFilter::INFO),
            );
            tracing_subscriber::Layer::with_filter(layer, filter)
        })
    } else {
        None
    };
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel_layer)
        .try_init();
}

use tracing_subscriber::Layer as _;

/// A service's telemetry: its meter, and the exporters to flush at shutdown.
#[derive(Clone)]
pub struct Telemetry {
    service: &'static str,
    meter: Meter,
    meter_provider: Option<SdkMeterProvider>,
    tracing: bool,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("service", &self.service)
            .field("exporting", &self.meter_provider.is_some())
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Telemetry that exports nothing (instruments are no-ops).
    pub fn disabled(service: &'static str) -> Self {
        Telemetry {
            service,
            meter: opentelemetry::global::meter_provider().meter("loadlab"),
            meter_provider: None,
            tracing: false,
        }
    }

    /// Starts `service`'s telemetry: registers it with the process's trace pipeline (when the
    /// subscriber was installed by [`init`] with an endpoint) and builds its metrics pipeline.
    /// Must run inside a Tokio runtime (the gRPC exporters spawn their connection tasks).
    pub fn start(
        service: &'static str,
        version: &'static str,
        otel: &OtelArgs,
    ) -> Result<Self, TelemetryError> {
        if !otel.enabled() {
            return Ok(Telemetry::disabled(service));
        }
        let resource = resource(service, version, otel);
        let endpoint = otel.otlp_endpoint.clone().unwrap_or_default();
        let tracing = pipeline::register(service, &endpoint, &resource)?;
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint_from(&endpoint)
            .build()?;
        let mut reader = opentelemetry_sdk::metrics::PeriodicReader::builder(exporter);
        // Reports cover runs of tens of seconds; the SDK's default minute is too coarse.
        if std::env::var_os("OTEL_METRIC_EXPORT_INTERVAL").is_none() {
            reader = reader.with_interval(DEFAULT_METRIC_INTERVAL);
        }
        let provider = SdkMeterProvider::builder()
            .with_reader(reader.build())
            .with_resource(resource)
            .build();
        let meter = provider.meter("loadlab");
        process::register(&meter);
        tracing::info!(service, %endpoint, tracing, "exporting telemetry over OTLP/gRPC");
        Ok(Telemetry {
            service,
            meter,
            meter_provider: Some(provider),
            tracing,
        })
    }

    /// The service name.
    pub fn service(&self) -> &'static str {
        self.service
    }

    /// The service's meter (a no-op meter when telemetry is off).
    pub fn meter(&self) -> &Meter {
        &self.meter
    }

    /// Whether metrics are exported.
    pub fn exporting(&self) -> bool {
        self.meter_provider.is_some()
    }

    /// Flushes metrics and spans, waiting at most `limit`: an unreachable collector must not
    /// hold up shutdown. The SDK's flush blocks its thread, so it runs on the blocking pool.
    pub async fn shutdown(self, limit: Duration) {
        let tracing = self.tracing;
        let Some(provider) = self.meter_provider else {
            return;
        };
        let flush = tokio::task::spawn_blocking(move || {
            if tracing {
                pipeline::flush();
            }
            if let Err(e) = provider.shutdown() {
                tracing::debug!(error = %e, "metrics exporter shutdown");
            }
        });
        if tokio::time::timeout(limit, flush).await.is_err() {
            tracing::warn!(
                service = self.service,
                ?limit,
                "telemetry flush did not finish in time; dropping what is left"
            );
        }
    }
}

/// How often metrics are exported unless `OTEL_METRIC_EXPORT_INTERVAL` says otherwise.
pub const DEFAULT_METRIC_INTERVAL: Duration = Duration::from_secs(5);

/// Upper bound of a telemetry flush at shutdown.
pub const FLUSH_LIMIT: Duration = Duration::from_secs(5);

trait EndpointFrom {
    fn with_endpoint_from(self, endpoint: &str) -> Self;
}

impl<T: opentelemetry_otlp::WithExportConfig> EndpointFrom for T {
    fn with_endpoint_from(self, endpoint: &str) -> Self {
        self.with_endpoint(endpoint).with_timeout(EXPORT_TIMEOUT)
    }
}

/// Deadline of one export call, unless `OTEL_EXPORTER_OTLP_TIMEOUT` overrides it. Exports run
/// off the request path, so this bounds only how long a dead collector holds the export thread.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

/// The resource of a service: `service.name` (unless `OTEL_SERVICE_NAME` overrides it),
/// `service.version`, `service.instance.id`, `k8s.pod.name` / `k8s.namespace.name` from the
/// downward API (`POD_NAME`, `POD_NAMESPACE`), and `loadtest.run` when set.
pub fn resource(service: &'static str, version: &'static str, otel: &OtelArgs) -> Resource {
    let host = std::env::var("HOSTNAME")
        .or_else(|_| std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_owned()))
        .unwrap_or_else(|_| "localhost".to_owned());
    let mut attributes = vec![
        KeyValue::new("service.version", version),
        KeyValue::new(
            "service.instance.id",
            format!("{host}:{}:{service}", std::process::id()),
        ),
    ];
    if let Ok(pod) = std::env::var("POD_NAME") {
        attributes.push(KeyValue::new("k8s.pod.name", pod));
    }
    if let Ok(ns) = std::env::var("POD_NAMESPACE") {
        attributes.push(KeyValue::new("k8s.namespace.name", ns));
    }
    if let Some(run) = &otel.loadtest_run {
        attributes.push(KeyValue::new("loadtest.run", run.clone()));
    }
    let mut builder = Resource::builder().with_attributes(attributes);
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        builder = builder.with_service_name(service);
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_without_an_endpoint_and_values_are_checked() {
        assert!(!OtelArgs::default().enabled());
        assert!(!OtelArgs::with_endpoint("  ").enabled());
        assert!(
            OtelArgs::with_endpoint("http://127.0.0.1:4317")
                .validate()
                .is_ok()
        );
        assert!(
            OtelArgs::with_endpoint("127.0.0.1:4317")
                .validate()
                .is_err()
        );
        let ratio = OtelArgs {
            trace_sample_ratio: Some(1.5),
            ..OtelArgs::default()
        };
        let err = ratio.validate().expect_err("out of range");
        assert!(err.to_string().contains("LOADLAB_TRACE_SAMPLE_RATIO"));
    }

    #[tokio::test]
    async fn a_service_without_an_endpoint_gets_no_exporter() {
        let t = Telemetry::start("feed", "0.1.0", &OtelArgs::default()).expect("start");
        assert!(!t.exporting());
        assert_eq!(t.service(), "feed");
        // Recording on the no-op meter is allowed and does nothing.
        t.meter().u64_counter("x").build().add(1, &[]);
        tokio::time::timeout(Duration::from_secs(1), t.shutdown(FLUSH_LIMIT))
            .await
            .expect("no flush to wait for");
    }

    #[test]
    fn the_resource_names_the_service_and_its_pod() {
        let r = resource(
            "timeline",
            "9.9.9",
            &OtelArgs {
                loadtest_run: Some("feed-mixed-2k".into()),
                ..OtelArgs::default()
            },
        );
        let get = |k: &'static str| r.get(&opentelemetry::Key::from_static_str(k));
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            assert_eq!(
                get("service.name").map(|v| v.to_string()).as_deref(),
                Some("timeline")
            );
        }
        assert_eq!(
            get("service.version").map(|v| v.to_string()).as_deref(),
            Some("9.9.9")
        );
        assert_eq!(
            get("loadtest.run").map(|v| v.to_string()).as_deref(),
            Some("feed-mixed-2k")
        );
        assert!(get("service.instance.id").is_some_and(|v| v.to_string().ends_with(":timeline")));
    }
}
