//! Tracing of load requests: the generator decides per request whether it is sampled, sends a
//! W3C `traceparent` either way (flag `01` or `00`, so the services' parent-based samplers
//! follow the generator instead of sampling on their own), creates a client span for sampled
//! requests and exports it over OTLP, and keeps the slowest sampled requests of each interval
//! with their trace ids for the report.
//!
//! One run at a time per process installs its tracing ([`install`]); requests consult it through
//! [`active`] (the only process-wide state here, like the OpenTelemetry globals themselves).

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _, TracerProvider as _};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use rand::Rng as _;

use crate::metrics::EndpointId;
use crate::summary::TraceRef;

/// Slow sampled requests kept per one-second interval.
pub const SLOWEST_PER_INTERVAL: usize = 3;
/// Trace references kept in a summary at most.
pub const MAX_TRACE_REFS: usize = 300;

/// Settings of a run's request tracing.
#[derive(Debug, Clone, Default)]
pub struct TracingSettings {
    /// Fraction of requests sampled (0..=1).
    pub sample_ratio: f64,
    /// Where the client spans go (OTLP/gRPC); none: only `traceparent` is sent.
    pub otlp_endpoint: Option<String>,
    /// Jaeger UI base URL; trace references link to `<url>/trace/<id>`.
    pub jaeger_url: Option<String>,
}

#[derive(Debug, Clone)]
struct Slow {
    endpoint: EndpointId,
    duration: Duration,
    trace_id: u128,
}

/// A run's request tracing.
pub struct ClientTracing {
    settings: TracingSettings,
    provider: Option<SdkTracerProvider>,
    tracer: Option<SdkTracer>,
    started: Instant,
    /// Slowest sampled requests, per interval (index = whole seconds since `started`).
    slowest: Mutex<Vec<Vec<Slow>>>,
}

impl std::fmt::Debug for ClientTracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTracing")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

static ACTIVE: RwLock<Option<Arc<ClientTracing>>> = RwLock::new(None);

/// The tracing of the run in progress, if it traces.
pub fn active() -> Option<Arc<ClientTracing>> {
    ACTIVE
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
#[error("tracing: {0}")]
pub struct TracingError(String);

/// Starts tracing for a run (replacing any earlier run's). Call inside a Tokio runtime.
pub fn install(settings: TracingSettings) -> Result<Arc<ClientTracing>, TracingError> {
    let (provider, tracer) = match settings.otlp_endpoint.as_deref() {
        Some(endpoint) if !endpoint.trim().is_empty() => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint_and_timeout(endpoint)
                .build()
                .map_err(|e| TracingError(e.to_string()))?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name("loadlab")
                .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                .build();
            // The generator has already decided; every span it starts is kept. Batching keeps
            // export off the request path; a full queue drops spans.
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOn)
                .with_resource(resource)
                .build();
            let tracer = provider.tracer("loadlab");
            (Some(provider), Some(tracer))
        }
        _ => (None, None),
    };
    let tracing = Arc::new(ClientTracing {
        settings,
        provider,
        tracer,
        started: Instant::now(),
        slowest: Mutex::new(Vec::new()),
    });
    *ACTIVE
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tracing.clone());
    Ok(tracing)
}

trait EndpointAndTimeout {
    fn with_endpoint_and_timeout(self, endpoint: &str) -> Self;
}

impl<T: opentelemetry_otlp::WithExportConfig> EndpointAndTimeout for T {
    fn with_endpoint_and_timeout(self, endpoint: &str) -> Self {
        self.with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(3))
    }
}

/// An in-flight request's trace: its id and, when sampled, its client span.
pub struct RequestTrace {
    trace_id: u128,
    span: Option<opentelemetry_sdk::trace::Span>,
}

impl ClientTracing {
    /// Decides whether the request to `endpoint` is sampled and writes its `traceparent`.
    pub fn start(
        &self,
        endpoint: impl FnOnce() -> String,
        url: impl FnOnce() -> String,
        headers: &mut http::HeaderMap,
    ) -> RequestTrace {
        let mut rng = rand::rng();
        let sampled =
            self.settings.sample_ratio > 0.0 && rng.random::<f64>() < self.settings.sample_ratio;
        let (trace_id, span_id, span) = match (&self.tracer, sampled) {
            (Some(tracer), true) => {
                let endpoint = endpoint();
                let method = endpoint
                    .split_once(' ')
                    .map_or("GET", |(m, _)| m)
                    .to_owned();
                let span = tracer
                    .span_builder(endpoint.clone())
                    .with_kind(SpanKind::Client)
                    .with_attributes([
                        KeyValue::new("http.request.method", method),
                        KeyValue::new("url.full", url()),
                        KeyValue::new("loadlab.endpoint", endpoint),
                    ])
                    .start(tracer);
                let sc = span.span_context().clone();
                (
                    u128::from_be_bytes(sc.trace_id().to_bytes()),
                    u64::from_be_bytes(sc.span_id().to_bytes()),
                    Some(span),
                )
            }
            _ => (
                rng.random::<u128>().max(1),
                rng.random::<u64>().max(1),
                None,
            ),
        };
        let tp = loadlab_kit::telemetry::propagation::TraceParent {
            trace_id,
            span_id,
            sampled,
        };
        headers.insert("traceparent", tp.header_value());
        RequestTrace {
            trace_id: if sampled { trace_id } else { 0 },
            span,
        }
    }

    /// The `traceparent` of one message sent over an open connection (a chat `send` frame):
    /// sampled per message like requests; a sampled one gets a producer span of its own.
    pub fn message_traceparent(&self, name: &'static str) -> String {
        let mut rng = rand::rng();
        let sampled =
            self.settings.sample_ratio > 0.0 && rng.random::<f64>() < self.settings.sample_ratio;
        let (trace_id, span_id) = match (&self.tracer, sampled) {
            (Some(tracer), true) => {
                let mut span = tracer
                    .span_builder(name)
                    .with_kind(SpanKind::Producer)
                    .start(tracer);
                let sc = span.span_context().clone();
                span.end();
                (
                    u128::from_be_bytes(sc.trace_id().to_bytes()),
                    u64::from_be_bytes(sc.span_id().to_bytes()),
                )
            }
            _ => (rng.random::<u128>().max(1), rng.random::<u64>().max(1)),
        };
        loadlab_kit::telemetry::propagation::TraceParent {
            trace_id,
            span_id,
            sampled,
        }
        .to_string()
    }

    /// Ends a request's trace: closes its span with the outcome and keeps it among the
    /// interval's slowest when it was sampled.
    pub fn finish(
        &self,
        trace: RequestTrace,
        endpoint: EndpointId,
        status: u16,
        duration: Duration,
    ) {
        if let Some(mut span) = trace.span {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
            if !(200..400).contains(&status) {
                span.set_status(Status::error(format!("status {status}")));
            }
            span.end();
        }
        if trace.trace_id == 0 {
            return;
        }
        let interval = self.started.elapsed().as_secs() as usize;
        let mut slowest = self
            .slowest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slowest.len() <= interval {
            slowest.resize_with(interval + 1, Vec::new);
        }
        let Some(bucket) = slowest.get_mut(interval) else {
            return;
        };
        bucket.push(Slow {
            endpoint,
            duration,
            trace_id: trace.trace_id,
        });
        bucket.sort_by_key(|s| std::cmp::Reverse(s.duration));
        bucket.truncate(SLOWEST_PER_INTERVAL);
    }

    /// The kept slow requests, oldest interval first, with Jaeger links when a Jaeger URL is
    /// configured (capped like any merge, see [`merge_refs`]). `names` resolves endpoint ids.
    pub fn slowest(&self, names: &[String]) -> Vec<TraceRef> {
        let slowest = self
            .slowest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let refs = slowest.iter().enumerate().flat_map(|(i, bucket)| {
            bucket.iter().map(move |s| TraceRef {
                t: i as f64,
                endpoint: names
                    .get(usize::from(s.endpoint.0))
                    .cloned()
                    .unwrap_or_default(),
                duration_ms: s.duration.as_secs_f64() * 1e3,
                trace_id: format!("{:032x}", s.trace_id),
                url: None,
            })
        });
        merge_refs(refs, self.settings.jaeger_url.as_deref())
    }

    /// When tracing started (wall clock).
    pub fn started_at(&self) -> SystemTime {
        SystemTime::now() - self.started.elapsed()
    }

    /// Exports what is queued and stops exporting (blocks up to a few seconds; the SDK's flush
    /// is synchronous, so it runs on the blocking pool).
    pub async fn flush(&self) {
        let Some(provider) = self.provider.clone() else {
            return;
        };
        let flush = tokio::task::spawn_blocking(move || provider.force_flush());
        let _ = tokio::time::timeout(Duration::from_secs(5), flush).await;
    }

    /// Stops being the active tracing.
    pub fn uninstall(self: &Arc<Self>) {
        let mut active = ACTIVE
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if active.as_ref().is_some_and(|a| Arc::ptr_eq(a, self)) {
            *active = None;
        }
    }
}

/// Starts the request tracing `spec.tracing` asks for, if any (a failure to set up the exporter
/// is logged and the run goes on untraced: tracing must not cost a load test).
pub fn for_run(spec: &crate::spec::LoadTestSpec) -> Option<Arc<ClientTracing>> {
    let t = spec.tracing.as_ref()?;
    let settings = TracingSettings {
        sample_ratio: t.sample_ratio.clamp(0.0, 1.0),
        otlp_endpoint: t.otlp_endpoint.clone(),
        jaeger_url: t.jaeger_url.clone(),
    };
    match install(settings) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(error = %e, "request tracing is off for this run");
            None
        }
    }
}

impl ClientTracing {
    /// Ends the run's tracing: flushes the client spans, stops being active, and returns the
    /// slowest sampled requests per interval.
    pub async fn complete(self: Arc<Self>, names: &[String]) -> Vec<TraceRef> {
        self.uninstall();
        self.flush().await;
        self.slowest(names)
    }
}

/// Merges slow-request references of several sources (the workers of a distributed run, or a
/// run's own and Jaeger's): one per trace id (the longest duration seen wins), the
/// [`SLOWEST_PER_INTERVAL`] slowest of each whole second, at most [`MAX_TRACE_REFS`] of the
/// slowest overall, in time order; each linked to `jaeger_url` when one is given (an existing
/// link is kept otherwise).
pub fn merge_refs(
    refs: impl IntoIterator<Item = TraceRef>,
    jaeger_url: Option<&str>,
) -> Vec<TraceRef> {
    let mut by_id: std::collections::HashMap<String, TraceRef> = std::collections::HashMap::new();
    for r in refs {
        if r.trace_id.is_empty() || !r.duration_ms.is_finite() || !r.t.is_finite() {
            continue;
        }
        match by_id.get_mut(&r.trace_id) {
            Some(kept) if kept.duration_ms >= r.duration_ms => {
                if kept.url.is_none() {
                    kept.url = r.url;
                }
            }
            Some(kept) => {
                let url = kept.url.take();
                *kept = r;
                if kept.url.is_none() {
                    kept.url = url;
                }
            }
            None => {
                by_id.insert(r.trace_id.clone(), r);
            }
        }
    }
    let mut per_second: std::collections::BTreeMap<u64, Vec<TraceRef>> =
        std::collections::BTreeMap::new();
    for r in by_id.into_values() {
        per_second
            .entry(r.t.max(0.0).floor() as u64)
            .or_default()
            .push(r);
    }
    let mut out: Vec<TraceRef> = Vec::new();
    for mut bucket in per_second.into_values() {
        bucket.sort_by(|a, b| {
            b.duration_ms
                .total_cmp(&a.duration_ms)
                .then_with(|| a.trace_id.cmp(&b.trace_id))
        });
        bucket.truncate(SLOWEST_PER_INTERVAL);
        out.append(&mut bucket);
    }
    if out.len() > MAX_TRACE_REFS {
        out.sort_by(|a, b| b.duration_ms.total_cmp(&a.duration_ms));
        out.truncate(MAX_TRACE_REFS);
    }
    out.sort_by(|a, b| {
        a.t.total_cmp(&b.t)
            .then_with(|| b.duration_ms.total_cmp(&a.duration_ms))
    });
    if let Some(base) = jaeger_url {
        for r in &mut out {
            r.url = Some(jaeger_link(base, &r.trace_id));
        }
    }
    out
}

/// `<jaegerUrl>/trace/<id>`.
pub fn jaeger_link(base: &str, trace_id: &str) -> String {
    format!("{}/trace/{trace_id}", base.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(t: f64, ms: f64, id: &str) -> TraceRef {
        TraceRef {
            t,
            endpoint: "GET /x".into(),
            duration_ms: ms,
            trace_id: id.into(),
            url: None,
        }
    }

    #[test]
    fn merged_refs_keep_the_slowest_per_second_once_each_in_time_order_and_linked() {
        let refs = vec![
            r(0.2, 5.0, "a"),
            r(0.9, 50.0, "b"),
            r(0.5, 20.0, "c"),
            r(0.1, 1.0, "d"),
            r(1.5, 7.0, "e"),
            // The same trace from a second source: the longer one wins.
            r(1.6, 9.0, "e"),
            r(2.0, f64::NAN, "f"),
            r(2.0, 3.0, ""),
        ];
        let out = merge_refs(refs, Some("http://jaeger:16686/"));
        let ids: Vec<&str> = out.iter().map(|r| r.trace_id.as_str()).collect();
        // "d" was the fourth of second 0; time order within the second.
        assert_eq!(ids, ["a", "c", "b", "e"], "{out:?}");
        assert_eq!(out[3].duration_ms, 9.0);
        assert_eq!(
            out[2].url.as_deref(),
            Some("http://jaeger:16686/trace/b"),
            "linked"
        );
    }

    #[test]
    fn merged_refs_are_capped_to_the_slowest_overall() {
        let refs = (0..(MAX_TRACE_REFS + 50))
            .map(|i| r(i as f64, i as f64, &format!("{i:032x}")))
            .collect::<Vec<_>>();
        let out = merge_refs(refs, None);
        assert_eq!(out.len(), MAX_TRACE_REFS);
        assert_eq!(out[0].duration_ms, 50.0, "the fastest 50 went");
        assert!(out.windows(2).all(|w| w[0].t <= w[1].t), "time order");
        assert!(out.iter().all(|r| r.url.is_none()));
    }
}
