//! The process-wide trace pipeline: one tracer provider whose spans are tagged with the service
//! that started them and exported, grouped by service, through one OTLP exporter per service
//! (each with that service's resource).
//!
//! The span processor is this module's [`Batcher`] rather than the SDK's `BatchSpanProcessor`:
//! a span is written as OTLP protobuf bytes the moment it ends, on the thread that ends it,
//! and queued as bytes; a background thread ships the queued bytes. The SDK's processor moves
//! every `SpanData` (a few hundred bytes) through a channel to its thread, which frees the
//! span's allocations there — cross-thread frees that the allocator charges back to the
//! request threads — and keeps the spans until they are converted at export. Encoding at the
//! end keeps all of a span's memory on its own thread and the queue compact.

use std::future::Future;
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use opentelemetry::trace::{
    Link, Span as _, SpanKind, TraceContextExt as _, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue, StringValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{
    Sampler, SamplingDecision, SamplingResult, SdkTracer, SdkTracerProvider, ShouldSample, Span,
    SpanData, SpanProcessor,
};

use super::otlp::{TraceExporter, put_span};
use super::{OtelArgs, TelemetryError};
use crate::lock;

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
        let processor = Batcher::start(BatchConfig::from_env(), Arc::clone(&services));
        let (sampler, root_ratio) = sampler(otel);
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
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

/// The batch settings: the standard `OTEL_BSP_*` variables, with the specification's defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
struct BatchConfig {
    /// Spans waiting for export at most; more are dropped (`OTEL_BSP_MAX_QUEUE_SIZE`, 2048).
    max_queue: usize,
    /// Spans per export request at most (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, 512, ≤ the queue).
    max_batch: usize,
    /// Longest wait before queued spans are sent (`OTEL_BSP_SCHEDULE_DELAY`, 5000 ms).
    delay: Duration,
    /// Bound of one export call (`OTEL_BSP_EXPORT_TIMEOUT`, 30000 ms; the exporter's own
    /// `OTEL_EXPORTER_OTLP_TIMEOUT` applies too).
    export_timeout: Duration,
}

impl BatchConfig {
    fn from_env() -> BatchConfig {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    fn from_lookup(var: impl Fn(&str) -> Option<String>) -> BatchConfig {
        use opentelemetry_sdk::trace as sdk;
        let number = |name: &str| {
            let value = var(name)?;
            match value.trim().parse::<u64>() {
                Ok(n) => Some(n),
                Err(_) => {
                    tracing::warn!(variable = name, %value, "not a number; using the default");
                    None
                }
            }
        };
        let count = |name, default: usize| {
            number(name).map_or(default, |n| usize::try_from(n).unwrap_or(usize::MAX).max(1))
        };
        // Capped, so that deadlines computed from them stay representable.
        let millis = |name, default| {
            number(name)
                .map_or(default, Duration::from_millis)
                .min(LONGEST_WAIT)
        };
        let max_queue = count(
            sdk::OTEL_BSP_MAX_QUEUE_SIZE,
            sdk::OTEL_BSP_MAX_QUEUE_SIZE_DEFAULT,
        );
        BatchConfig {
            max_queue,
            max_batch: count(
                sdk::OTEL_BSP_MAX_EXPORT_BATCH_SIZE,
                sdk::OTEL_BSP_MAX_EXPORT_BATCH_SIZE_DEFAULT,
            )
            .min(max_queue),
            delay: millis(
                sdk::OTEL_BSP_SCHEDULE_DELAY,
                sdk::OTEL_BSP_SCHEDULE_DELAY_DEFAULT,
            ),
            export_timeout: millis(
                sdk::OTEL_BSP_EXPORT_TIMEOUT,
                sdk::OTEL_BSP_EXPORT_TIMEOUT_DEFAULT,
            ),
        }
    }
}

/// The span processor: tags each span with the service of the task that starts it, writes it
/// as OTLP bytes when it ends (on that thread) into a bounded queue, one batch per service and
/// instrumentation scope, and lets a background thread send the batches. A full queue drops
/// spans: an unreachable or slow collector costs spans, never a request's time.
#[derive(Debug)]
struct Batcher {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Debug)]
struct Shared {
    config: BatchConfig,
    services: Arc<Services>,
    queue: Mutex<Queue>,
    /// Wakes the export thread: a batch is full, a flush is asked for, or shutdown.
    wake: Condvar,
    /// Wakes flushes waiting for the export thread to finish a round.
    done: Condvar,
}

/// What waits for export. Held only briefly, never during an export.
#[derive(Debug, Default)]
struct Queue {
    batches: Vec<Batch>,
    /// Spans in `batches`.
    spans: usize,
    /// Spans dropped because the queue was full, since the last warning.
    dropped: u64,
    /// Sent batches' buffers, kept for new batches (their memory stays mapped and warm).
    spare: Vec<Vec<u8>>,
    /// Scratch for one span's body.
    scratch: Vec<u8>,
    /// Flushes asked for, and the last one the export thread has done.
    flush_asked: u64,
    flush_done: u64,
    shutdown: bool,
    /// The export thread has ended.
    stopped: bool,
}

/// Spans of one service and scope, written as `ScopeSpans.spans` fields.
#[derive(Debug)]
struct Batch {
    service: Option<StringValue>,
    scope: InstrumentationScope,
    spans: usize,
    bytes: Vec<u8>,
}

impl Batcher {
    fn start(config: BatchConfig, services: Arc<Services>) -> Batcher {
        let batcher = Batcher::idle(config, services);
        batcher.spawn_thread();
        batcher
    }

    /// A batcher whose export thread is not running yet (it queues, and drops when full).
    fn idle(config: BatchConfig, services: Arc<Services>) -> Batcher {
        Batcher {
            shared: Arc::new(Shared {
                config,
                services,
                queue: Mutex::new(Queue::default()),
                wake: Condvar::new(),
                done: Condvar::new(),
            }),
            thread: Mutex::new(None),
        }
    }

    fn spawn_thread(&self) {
        let shared = &self.shared;
        let worker = Arc::clone(shared);
        let thread = std::thread::Builder::new()
            .name("loadlab-span-export".into())
            .spawn(move || worker.run())
            .map_err(|e| tracing::error!(error = %e, "cannot start the span export thread; spans are dropped"))
            .ok();
        if thread.is_none() {
            lock(&shared.queue).stopped = true;
        }
        *lock(&self.thread) = thread;
    }

    /// Asks the export thread for a round (`shutdown`: its last) and waits at most `limit` for
    /// it to end.
    fn round(&self, shutdown: bool, limit: Duration) -> OTelSdkResult {
        let shared = &self.shared;
        let mut q = lock(&shared.queue);
        if q.stopped || (q.shutdown && !shutdown) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        q.flush_asked += 1;
        q.shutdown |= shutdown;
        let asked = q.flush_asked;
        shared.wake.notify_one();
        let deadline = Instant::now() + limit;
        while q.flush_done < asked && !q.stopped {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(OTelSdkError::Timeout(limit));
            }
            q = shared
                .done
                .wait_timeout(q, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Ok(())
    }
}

impl Shared {
    /// The export thread: sends what is queued whenever a batch fills up, a flush is asked
    /// for, or the schedule delay has passed since the last round.
    fn run(&self) {
        let mut out = bytes::BytesMut::new();
        let mut last = Instant::now();
        // Failures and drops are logged when they start and then at most every WARN_EVERY, so
        // a dead collector does not flood the logs.
        let mut failing = false;
        let mut warned: Option<Instant> = None;
        loop {
            let (batches, asked, shutdown) = {
                let mut q = lock(&self.queue);
                loop {
                    let due = last + self.config.delay;
                    let now = Instant::now();
                    if q.shutdown
                        || q.flush_asked > q.flush_done
                        || now >= due
                        || q.batches.iter().any(|b| b.spans >= self.config.max_batch)
                    {
                        break;
                    }
                    q = self
                        .wake
                        .wait_timeout(q, due - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                if q.dropped > 0 && warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                    tracing::warn!(
                        dropped = q.dropped,
                        max_queue = self.config.max_queue,
                        "span export queue full: spans dropped (OTEL_BSP_MAX_QUEUE_SIZE)"
                    );
                    q.dropped = 0;
                    warned = Some(Instant::now());
                }
                q.spans = 0;
                (std::mem::take(&mut q.batches), q.flush_asked, q.shutdown)
            };
            last = Instant::now();
            for batch in &batches {
                let Some(exporter) = self
                    .services
                    .lookup(batch.service.as_ref().map(StringValue::as_str))
                else {
                    continue;
                };
                match exporter.export(
                    &batch.scope,
                    &batch.bytes,
                    &mut out,
                    self.config.export_timeout,
                ) {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!("span export works again");
                    }
                    Ok(()) => {}
                    Err(e) if failing => {
                        tracing::debug!(error = %e, spans = batch.spans, "span export failed; batch dropped");
                    }
                    Err(e) => {
                        failing = true;
                        tracing::warn!(
                            error = %e,
                            spans = batch.spans,
                            "span export failed; batches are dropped until it works again"
                        );
                    }
                }
            }
            let mut q = lock(&self.queue);
            // Enough buffers for a full queue's batches come back; more would only hold memory.
            let keep = self.config.max_queue.div_ceil(self.config.max_batch) + 1;
            for batch in batches {
                if q.spare.len() < keep {
                    let mut bytes = batch.bytes;
                    bytes.clear();
                    q.spare.push(bytes);
                }
            }
            q.flush_done = asked;
            if shutdown {
                q.stopped = true;
            }
            self.done.notify_all();
            if shutdown {
                return;
            }
        }
    }
}

impl SpanProcessor for Batcher {
    fn on_start(&self, span: &mut Span, _cx: &Context) {
        if let Some(service) = service_scope() {
            span.set_attribute(KeyValue::new(SERVICE_KEY, service));
        }
    }

    fn on_end(&self, mut span: SpanData) {
        let service = take_service(&mut span);
        span.attributes
            .retain(|kv| kv.key.as_str() != EDGE_SAMPLED_KEY);
        let config = &self.shared.config;
        let mut q = lock(&self.shared.queue);
        if q.shutdown {
            return;
        }
        if q.spans >= config.max_queue {
            q.dropped += 1;
            return;
        }
        let q = &mut *q;
        let open = q.batches.iter().rposition(|b| {
            b.spans < config.max_batch
                && b.service == service
                && b.scope == span.instrumentation_scope
        });
        let batch = match open {
            Some(i) => &mut q.batches[i],
            None => {
                let bytes = q.spare.pop().unwrap_or_default();
                q.batches.push(Batch {
                    service,
                    scope: span.instrumentation_scope.clone(),
                    spans: 0,
                    bytes,
                });
                let last = q.batches.len() - 1;
                &mut q.batches[last]
            }
        };
        put_span(&mut batch.bytes, &mut q.scratch, &span);
        batch.spans += 1;
        let full = batch.spans == config.max_batch;
        q.spans += 1;
        if full {
            self.shared.wake.notify_one();
        }
        // `span` is freed here, on the thread that made it.
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.round(false, FLUSH_WAIT)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.round(true, timeout)?;
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
        Ok(())
    }
}

/// How long a flush waits for the export thread.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// The longest schedule delay and export timeout taken from the environment.
const LONGEST_WAIT: Duration = Duration::from_secs(24 * 3600);

/// Least time between two warnings about dropped spans.
const WARN_EVERY: Duration = Duration::from_secs(10);

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

    fn config(max_queue: usize, max_batch: usize) -> BatchConfig {
        BatchConfig {
            max_queue,
            max_batch,
            delay: Duration::from_secs(3600),
            export_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn batch_settings_come_from_the_standard_variables() {
        let defaults = BatchConfig::from_lookup(|_| None);
        assert_eq!(defaults.max_queue, 2048);
        assert_eq!(defaults.max_batch, 512);
        assert_eq!(defaults.delay, Duration::from_millis(5000));
        assert_eq!(defaults.export_timeout, Duration::from_millis(30_000));
        let set = BatchConfig::from_lookup(|name| match name {
            "OTEL_BSP_MAX_QUEUE_SIZE" => Some("100".into()),
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE" => Some("1000".into()),
            "OTEL_BSP_SCHEDULE_DELAY" => Some(" 250 ".into()),
            "OTEL_BSP_EXPORT_TIMEOUT" => Some("soon".into()),
            _ => None,
        });
        assert_eq!(set.max_queue, 100);
        assert_eq!(set.max_batch, 100, "a batch is never larger than the queue");
        assert_eq!(set.delay, Duration::from_millis(250));
        assert_eq!(
            set.export_timeout,
            Duration::from_millis(30_000),
            "junk keeps the default"
        );
        let huge = BatchConfig::from_lookup(|name| {
            (name == "OTEL_BSP_SCHEDULE_DELAY").then(|| u64::MAX.to_string())
        });
        assert_eq!(huge.delay, LONGEST_WAIT);
        let zero = BatchConfig::from_lookup(|name| {
            (name == "OTEL_BSP_MAX_EXPORT_BATCH_SIZE").then(|| "0".into())
        });
        assert_eq!(zero.max_batch, 1);
    }

    fn ended_span(service: &'static str, scope: &InstrumentationScope, n: u64) -> SpanData {
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(0xabc + u128::from(n)),
                SpanId::from(n + 1),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Server,
            name: format!("span {n}").into(),
            start_time: std::time::SystemTime::now(),
            end_time: std::time::SystemTime::now(),
            attributes: vec![
                KeyValue::new(SERVICE_KEY, service),
                KeyValue::new("n", n as i64),
                KeyValue::new(EDGE_SAMPLED_KEY, true),
            ],
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: opentelemetry::trace::Status::Unset,
            instrumentation_scope: scope.clone(),
        }
    }

    /// Export requests received: (service.name, scope name, span names, attribute keys).
    type Received = Arc<Mutex<Vec<(String, String, Vec<String>, Vec<String>)>>>;

    struct Collector(Received);

    #[tonic::async_trait]
    impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
        for Collector
    {
        async fn export(
            &self,
            request: tonic::Request<
                opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
            >,
        ) -> Result<
            tonic::Response<
                opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
            >,
            tonic::Status,
        > {
            for rs in request.into_inner().resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| kv.value.as_ref())
                    .map(|v| format!("{:?}", v.value))
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    let scope = ss.scope.map(|s| s.name).unwrap_or_default();
                    let names = ss.spans.iter().map(|s| s.name.clone()).collect();
                    let keys = ss
                        .spans
                        .iter()
                        .flat_map(|s| s.attributes.iter().map(|kv| kv.key.clone()))
                        .collect();
                    lock(&self.0).push((service.clone(), scope, names, keys));
                }
            }
            Ok(tonic::Response::new(Default::default()))
        }
    }

    async fn collector() -> (String, Received) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let received = Received::default();
        let service = opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(
            Collector(Arc::clone(&received)),
        );
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (format!("http://{addr}"), received)
    }

    fn exporter(endpoint: &str, service: &'static str) -> (&'static str, Arc<TraceExporter>) {
        let resource = Resource::builder_empty().with_service_name(service).build();
        let exporter =
            TraceExporter::new(endpoint, Duration::from_secs(3), &resource).expect("exporter");
        (service, Arc::new(exporter))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_are_batched_per_service_and_scope_bounded_and_flushed() {
        let (endpoint, received) = collector().await;
        let services = Arc::new(Services(RwLock::new(vec![
            exporter(&endpoint, "feed"),
            exporter(&endpoint, "timeline"),
        ])));
        let batcher = Arc::new(Batcher::idle(config(7, 3), services));
        let loadlab = InstrumentationScope::builder("loadlab").build();
        let other = InstrumentationScope::builder("tracing-opentelemetry").build();
        // The export thread is not running: the queue takes 7 spans and drops the rest.
        for n in 0..5 {
            batcher.on_end(ended_span("feed", &loadlab, n));
        }
        batcher.on_end(ended_span("timeline", &loadlab, 5));
        batcher.on_end(ended_span("feed", &other, 6));
        batcher.on_end(ended_span("feed", &loadlab, 7));
        batcher.on_end(ended_span("timeline", &loadlab, 8));
        {
            let q = lock(&batcher.shared.queue);
            assert_eq!((q.spans, q.dropped), (7, 2));
            let shape: Vec<(Option<&str>, &str, usize)> = q
                .batches
                .iter()
                .map(|b| {
                    (
                        b.service.as_ref().map(StringValue::as_str),
                        b.scope.name(),
                        b.spans,
                    )
                })
                .collect();
            assert_eq!(
                shape,
                vec![
                    (Some("feed"), "loadlab", 3),
                    (Some("feed"), "loadlab", 2),
                    (Some("timeline"), "loadlab", 1),
                    (Some("feed"), "tracing-opentelemetry", 1),
                ]
            );
        }
        batcher.spawn_thread();
        let flushing = Arc::clone(&batcher);
        tokio::task::spawn_blocking(move || flushing.force_flush())
            .await
            .expect("join")
            .expect("flushed");
        let got = lock(&received).clone();
        let spans: Vec<(String, String, Vec<String>)> = got
            .iter()
            .map(|(svc, scope, names, _)| (svc.clone(), scope.clone(), names.clone()))
            .collect();
        let s = |v: &str| {
            format!(
                "{:?}",
                Some(
                    opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(v.into())
                )
            )
        };
        assert_eq!(
            spans,
            vec![
                (
                    s("feed"),
                    "loadlab".into(),
                    vec!["span 0".into(), "span 1".into(), "span 2".into()]
                ),
                (
                    s("feed"),
                    "loadlab".into(),
                    vec!["span 3".into(), "span 4".into()]
                ),
                (s("timeline"), "loadlab".into(), vec!["span 5".into()]),
                (
                    s("feed"),
                    "tracing-opentelemetry".into(),
                    vec!["span 6".into()]
                ),
            ]
        );
        assert!(
            got.iter()
                .flat_map(|(_, _, _, keys)| keys)
                .all(|k| k == "n"),
            "the in-process tags are taken off: {got:?}"
        );
        // Buffers come back for reuse; the queue is empty.
        {
            let q = lock(&batcher.shared.queue);
            assert_eq!((q.spans, q.batches.len(), q.spare.len()), (0, 0, 4));
        }
        // After shutdown nothing is queued, and flushing says so.
        let closing = Arc::clone(&batcher);
        tokio::task::spawn_blocking(move || closing.shutdown_with_timeout(Duration::from_secs(5)))
            .await
            .expect("join")
            .expect("shut down");
        batcher.on_end(ended_span("feed", &loadlab, 9));
        assert_eq!(lock(&batcher.shared.queue).spans, 0);
        assert!(matches!(
            batcher.force_flush(),
            Err(OTelSdkError::AlreadyShutdown)
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_collector_bounds_flushes_and_never_blocks_ending_spans() {
        // A port nobody listens on.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let services = Arc::new(Services(RwLock::new(vec![exporter(
            &format!("http://127.0.0.1:{port}"),
            "feed",
        )])));
        let batcher = Arc::new(Batcher::start(config(64, 8), services));
        let scope = InstrumentationScope::builder("loadlab").build();
        for n in 0..1000 {
            batcher.on_end(ended_span("feed", &scope, n));
        }
        let flushing = Arc::clone(&batcher);
        let flushed = tokio::task::spawn_blocking(move || flushing.force_flush())
            .await
            .expect("join");
        // Each failed export is logged and its batch dropped; the round completes.
        assert!(flushed.is_ok(), "{flushed:?}");
        let q = lock(&batcher.shared.queue);
        assert_eq!(q.spans, 0, "what was queued went out (and was dropped)");
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
