//! The process-wide trace pipeline: one tracer provider whose spans are tagged with the service
//! that started them and exported, grouped by service, through one OTLP exporter per service
//! (each with that service's resource).

use std::future::Future;
use std::sync::{Arc, OnceLock, RwLock};

use opentelemetry::trace::{
    Link, Span as _, SpanKind, TraceContextExt as _, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, StringValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, Sampler, SamplingDecision, SamplingResult, SdkTracer, SdkTracerProvider,
    ShouldSample, Span, SpanData, SpanExporter, SpanProcessor,
};

use super::otlp::TraceExporter;
use super::{OtelArgs, TelemetryError};

/// Span attribute naming the service during export; removed before spans leave the process.
const SERVICE_KEY: &str = "loadlab.service";
/// Span attribute of a root span that the HTTP/gRPC edge already decided to sample (the
/// sampler must not draw again); removed before spans leave the process.
pub const EDGE_SAMPLED_KEY: &str = "loadlab.edge_sampled";

tokio::task_local! {
    static SERVICE: &'static str;
}

/// Runs `future` as part of `service`: spans it starts are attributed to that service.
pub fn in_service<F: Future>(service: &'static str, future: F) -> impl Future<Output = F::Output> {
    SERVICE.scope(service, future)
}

/// Runs `f` as part of `service` (for synchronous callbacks, e.g. pub/sub listeners).
pub fn sync_in_service<R>(service: &'static str, f: impl FnOnce() -> R) -> R {
    SERVICE.sync_scope(service, f)
}

/// The service of the current task, if any.
pub fn service_scope() -> Option<&'static str> {
    SERVICE.try_with(|s| *s).ok()
}

struct Pipeline {
    provider: SdkTracerProvider,
    /// The tracer of spans made without `tracing` ([`super::client_span`]).
    tracer: SdkTracer,
    services: Arc<Services>,
    /// The fraction of new traces (requests without a caller's context) that are sampled.
    root_ratio: f64,
}

/// The fraction of new traces the pipeline samples; `None` when spans are not exported (no
/// pipeline in this process). The edge uses it to decide before any span exists.
pub fn root_sample_ratio() -> Option<f64> {
    PIPELINE.get().map(|p| p.root_ratio)
}

static PIPELINE: OnceLock<Pipeline> = OnceLock::new();

/// The pipeline's tracer, when spans are exported from this process.
pub(super) fn active_tracer() -> Option<&'static SdkTracer> {
    PIPELINE.get().map(|p| &p.tracer)
}

/// Exporters per service, in registration order (the first is the default for spans started
/// outside any service's task).
#[derive(Debug, Default)]
struct Services(RwLock<Vec<(&'static str, Arc<TraceExporter>)>>);

impl Services {
    fn lookup(&self, service: Option<&str>) -> Option<Arc<TraceExporter>> {
        let all = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        service
            .and_then(|s| all.iter().find(|(name, _)| *name == s))
            .or_else(|| all.first())
            .map(|(_, e)| Arc::clone(e))
    }
}

/// The tracer of the process-wide pipeline, created on first use (`None` if it cannot be).
pub(super) fn tracer(otel: &OtelArgs) -> Option<SdkTracer> {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let pipeline = PIPELINE.get_or_init(|| {
        let services = Arc::new(Services::default());
        let processor = BatchSpanProcessor::builder(RoutingExporter {
            services: Arc::clone(&services),
        })
        .build();
        let (sampler, root_ratio) = sampler(otel);
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Tagger { processor })
            .with_sampler(LinkAware(sampler))
            .build();
        Pipeline {
            tracer: provider.tracer("loadlab"),
            provider,
            services,
            root_ratio,
        }
    });
    Some(pipeline.tracer.clone())
}

/// The configured sampler: `--trace-sample-ratio` as parent-based ratio sampling, else
/// `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG`, else parent-based always-on (the SDK's
/// default). Parent-based: a request that carries a `traceparent` follows its caller's
/// decision, so the load generator's per-request choice holds across services. Returned with
/// the fraction of new traces it samples.
fn sampler(otel: &OtelArgs) -> (Sampler, f64) {
    let fraction = |arg: Option<f64>| arg.unwrap_or(1.0).clamp(0.0, 1.0);
    let ratio = |arg: Option<f64>| Sampler::TraceIdRatioBased(fraction(arg));
    let parent_based = |root: Sampler| Sampler::ParentBased(Box::new(root));
    if let Some(r) = otel.trace_sample_ratio {
        return (parent_based(ratio(Some(r))), fraction(Some(r)));
    }
    let arg = std::env::var("OTEL_TRACES_SAMPLER_ARG")
        .ok()
        .and_then(|a| a.trim().parse::<f64>().ok());
    match std::env::var("OTEL_TRACES_SAMPLER")
        .as_deref()
        .map(str::trim)
    {
        Ok("always_on") => (Sampler::AlwaysOn, 1.0),
        Ok("always_off") => (Sampler::AlwaysOff, 0.0),
        Ok("traceidratio") => (ratio(arg), fraction(arg)),
        Ok("parentbased_always_off") => (parent_based(Sampler::AlwaysOff), 0.0),
        Ok("parentbased_traceidratio") => (parent_based(ratio(arg)), fraction(arg)),
        Ok("parentbased_always_on") | Err(_) => (parent_based(Sampler::AlwaysOn), 1.0),
        Ok(other) => {
            tracing::warn!(
                sampler = other,
                "unsupported OTEL_TRACES_SAMPLER; sampling every trace"
            );
            (parent_based(Sampler::AlwaysOn), 1.0)
        }
    }
}

/// Samples a new root span whose links point at a sampled trace (a fan-out batch of a sampled
/// post, a chat delivery of a sampled send), so the hand-off is visible whenever its cause is,
/// and a root the edge already decided to sample ([`EDGE_SAMPLED_KEY`]); everything else goes
/// to the configured sampler.
#[derive(Debug, Clone)]
struct LinkAware(Sampler);

impl ShouldSample for LinkAware {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        let has_parent = parent_context.is_some_and(|cx| cx.has_active_span());
        if !has_parent
            && (links.iter().any(|l| l.span_context.is_sampled())
                || attributes
                    .iter()
                    .any(|kv| kv.key.as_str() == EDGE_SAMPLED_KEY))
        {
            return SamplingResult {
                decision: SamplingDecision::RecordAndSample,
                attributes: Vec::new(),
                trace_state: TraceState::default(),
            };
        }
        self.0
            .should_sample(parent_context, trace_id, name, span_kind, attributes, links)
    }
}

/// Adds `service`'s exporter to the pipeline. Returns false when the process's subscriber was
/// installed without span export (spans of this service are then not exported).
pub(super) fn register(
    service: &'static str,
    endpoint: &str,
    resource: &Resource,
) -> Result<bool, TelemetryError> {
    let Some(pipeline) = PIPELINE.get() else {
        tracing::warn!(
            service,
            "span export is off: the process installed its log subscriber without an OTLP endpoint"
        );
        return Ok(false);
    };
    let exporter = TraceExporter::new(endpoint, super::EXPORT_TIMEOUT, resource)?;
    let mut all = pipeline
        .services
        .0
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // A service restarted in the same process (tests) replaces its exporter.
    all.retain(|(name, _)| *name != service);
    all.push((service, Arc::new(exporter)));
    Ok(true)
}

/// Exports what is queued (blocks; call from a blocking thread).
pub(super) fn flush() {
    if let Some(p) = PIPELINE.get()
        && let Err(e) = p.provider.force_flush()
    {
        tracing::debug!(error = %e, "span flush");
    }
}

/// Tags spans with the service of the task that starts them, then hands them to the batch
/// processor (a bounded queue drained by a background thread; full → dropped).
#[derive(Debug)]
struct Tagger {
    processor: BatchSpanProcessor,
}

impl SpanProcessor for Tagger {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        if let Some(service) = service_scope() {
            span.set_attribute(KeyValue::new(SERVICE_KEY, service));
        }
        self.processor.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        self.processor.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.processor.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.processor.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.processor.set_resource(resource);
    }
}

/// Sends each service's spans through that service's exporter.
#[derive(Debug)]
struct RoutingExporter {
    services: Arc<Services>,
}

fn take_service(span: &mut SpanData) -> Option<StringValue> {
    let i = span
        .attributes
        .iter()
        .position(|kv| kv.key.as_str() == SERVICE_KEY)?;
    match span.attributes.swap_remove(i).value {
        // The tag is a `&'static str`: taking it allocates nothing.
        Value::String(s) => Some(s),
        _ => None,
    }
}

impl SpanExporter for RoutingExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        // Batches are small (≤ 512) and a process runs a handful of services: a linear scan
        // beats hashing here.
        let mut batch = batch;
        let tags: Vec<Option<StringValue>> = batch
            .iter_mut()
            .map(|span| {
                let service = take_service(span);
                span.attributes
                    .retain(|kv| kv.key.as_str() != EDGE_SAMPLED_KEY);
                service
            })
            .collect();
        // One service per process is the common case: its batch goes out as it came, without
        // moving every span into a group.
        let groups: Vec<(Option<StringValue>, Vec<SpanData>)> =
            if tags.windows(2).all(|w| w[0] == w[1]) {
                vec![(tags.into_iter().next().flatten(), batch)]
            } else {
                let mut groups: Vec<(Option<StringValue>, Vec<SpanData>)> = Vec::new();
                for (service, span) in tags.into_iter().zip(batch) {
                    match groups.iter_mut().find(|(s, _)| *s == service) {
                        Some((_, spans)) => spans.push(span),
                        None => groups.push((service, vec![span])),
                    }
                }
                groups
            };
        let mut result = Ok(());
        for (service, spans) in groups {
            let Some(exporter) = self
                .services
                .lookup(service.as_ref().map(StringValue::as_str))
            else {
                continue;
            };
            if let Err(e) = exporter.export(&spans).await {
                result = Err(e);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags};

    use super::*;

    fn link(sampled: bool) -> Link {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        Link::with_context(SpanContext::new(
            TraceId::from_bytes([7; 16]),
            SpanId::from_bytes([3; 8]),
            flags,
            true,
            TraceState::default(),
        ))
    }

    fn remote_parent(flags: TraceFlags) -> Context {
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_bytes([1; 16]),
            SpanId::from_bytes([1; 8]),
            flags,
            true,
            TraceState::default(),
        ))
    }

    fn decide(sampler: &LinkAware, parent: Option<&Context>, links: &[Link]) -> SamplingDecision {
        sampler
            .should_sample(
                parent,
                TraceId::from_bytes([9; 16]),
                "fanout.batch",
                &SpanKind::Consumer,
                &[],
                links,
            )
            .decision
    }

    #[test]
    fn a_root_linked_to_a_sampled_trace_is_sampled() {
        let never = LinkAware(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)));
        assert_eq!(
            decide(&never, None, &[link(false), link(true)]),
            SamplingDecision::RecordAndSample
        );
        assert_eq!(decide(&never, None, &[link(false)]), SamplingDecision::Drop);
        assert_eq!(decide(&never, None, &[]), SamplingDecision::Drop);
        // A span with a parent follows the parent, links or not.
        let parent = remote_parent(TraceFlags::default());
        assert_eq!(
            decide(&never, Some(&parent), &[link(true)]),
            SamplingDecision::Drop
        );
    }

    #[test]
    fn the_flag_ratio_wins_and_is_parent_based() {
        let otel = OtelArgs {
            trace_sample_ratio: Some(0.0),
            ..OtelArgs::default()
        };
        let s = LinkAware(sampler(&otel).0);
        assert_eq!(decide(&s, None, &[]), SamplingDecision::Drop);
        let sampled_parent = remote_parent(TraceFlags::SAMPLED);
        assert_eq!(
            decide(&s, Some(&sampled_parent), &[]),
            SamplingDecision::RecordAndSample
        );
    }

    #[test]
    fn a_root_the_edge_sampled_is_sampled_and_a_parent_still_wins() {
        let otel = OtelArgs {
            trace_sample_ratio: Some(0.0),
            ..OtelArgs::default()
        };
        let (sampler, ratio) = sampler(&otel);
        assert_eq!(ratio, 0.0);
        let s = LinkAware(sampler);
        let edge = [KeyValue::new(EDGE_SAMPLED_KEY, true)];
        let decide_with = |parent: Option<&Context>, attributes: &[KeyValue]| {
            s.should_sample(
                parent,
                TraceId::from_bytes([9; 16]),
                "GET /x",
                &SpanKind::Server,
                attributes,
                &[],
            )
            .decision
        };
        assert_eq!(decide_with(None, &edge), SamplingDecision::RecordAndSample);
        assert_eq!(decide_with(None, &[]), SamplingDecision::Drop);
        let unsampled_parent = remote_parent(TraceFlags::default());
        assert_eq!(
            decide_with(Some(&unsampled_parent), &edge),
            SamplingDecision::Drop
        );
        let env_default = sampler_ratio_of(OtelArgs {
            trace_sample_ratio: Some(0.25),
            ..OtelArgs::default()
        });
        assert_eq!(env_default, 0.25);
    }

    fn sampler_ratio_of(otel: OtelArgs) -> f64 {
        sampler(&otel).1
    }

    #[test]
    fn the_service_tag_is_taken_off_before_export() {
        let mut span = SpanData {
            span_context: SpanContext::empty_context(),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Server,
            name: "x".into(),
            start_time: std::time::SystemTime::now(),
            end_time: std::time::SystemTime::now(),
            attributes: vec![
                KeyValue::new("http.route", "/x"),
                KeyValue::new(SERVICE_KEY, "feed"),
            ],
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: opentelemetry::trace::Status::Unset,
            instrumentation_scope: Default::default(),
        };
        assert_eq!(
            take_service(&mut span).as_ref().map(StringValue::as_str),
            Some("feed")
        );
        assert_eq!(span.attributes, vec![KeyValue::new("http.route", "/x")]);
        assert_eq!(take_service(&mut span), None);
    }
}
