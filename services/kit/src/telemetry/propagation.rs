//! W3C trace context across hops: HTTP headers and gRPC metadata (both are HTTP headers here),
//! and a compact [`TraceParent`] for hand-offs through queues and pub/sub, where the consumer's
//! span *links* to the producer's instead of becoming its child.

use std::fmt;
use std::str::FromStr;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The caller's context from `traceparent`/`tracestate` headers (empty when absent or when no
/// propagator is installed, i.e. telemetry is off).
pub fn extract(headers: &http::HeaderMap) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
}

/// The caller's `traceparent`, read straight from the header without a propagator or a
/// [`opentelemetry::Context`] (cheap enough for every request, most of which are unsampled);
/// `None` when absent or malformed, as the W3C propagator would treat it.
pub fn caller(headers: &http::HeaderMap) -> Option<TraceParent> {
    headers.get("traceparent")?.to_str().ok()?.parse().ok()
}

tokio::task_local! {
    /// The context of a request the edge decided not to sample: it runs without spans, and
    /// passes this on so that the next service follows the decision instead of drawing anew.
    static UNSAMPLED: TraceParent;
}

/// Runs `future` (a request's handling) as unsampled trace `tp`: no spans are exported from it
/// and calls it makes carry `tp` with the sampled flag off.
pub fn unsampled<F: std::future::Future>(
    tp: TraceParent,
    future: F,
) -> impl std::future::Future<Output = F::Output> {
    UNSAMPLED.scope(
        TraceParent {
            sampled: false,
            ..tp
        },
        future,
    )
}

/// Whether the current task handles an unsampled request (see [`unsampled`]).
pub fn in_unsampled() -> bool {
    UNSAMPLED.try_with(|_| ()).is_ok()
}

/// Writes `span`'s context into `headers` (see [`inject_context`]).
pub fn inject(span: &tracing::Span, headers: &mut http::HeaderMap) {
    inject_context(&span.context(), headers);
}

/// Writes the context `cx` (e.g. of a [`super::ClientSpan`], or the active one) into
/// `headers`; when it holds no span, the unsampled context of an unsampled request without
/// spans. Nothing otherwise (telemetry off, or no recorded span).
pub fn inject_context(cx: &opentelemetry::Context, headers: &mut http::HeaderMap) {
    if cx.span().span_context().is_valid() {
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(cx, &mut HeaderInjector(headers));
        });
    } else if let Ok(tp) = UNSAMPLED.try_with(|tp| *tp)
        && let Ok(v) = http::HeaderValue::from_str(&tp.to_string())
    {
        headers.insert("traceparent", v);
    }
}

/// A span's identity, small enough to travel with a queued job or a published message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// 128-bit trace id.
    pub trace_id: u128,
    /// 64-bit span id of the producing span.
    pub span_id: u64,
    /// Whether the producer's trace is sampled.
    pub sampled: bool,
}

impl TraceParent {
    /// The identity of `span`, if it is recorded by OpenTelemetry.
    pub fn of(span: &tracing::Span) -> Option<TraceParent> {
        TraceParent::of_context(&span.context())
    }

    /// The identity of the current span (of the unsampled request being handled, when it
    /// runs without spans).
    pub fn current() -> Option<TraceParent> {
        // The active OpenTelemetry context: a sampled request's server span, or the `tracing`
        // span entered last (entering one activates its context).
        TraceParent::of_context(&opentelemetry::Context::current())
            .or_else(|| UNSAMPLED.try_with(|tp| *tp).ok())
    }

    /// The span context in `cx` (e.g. a caller's, extracted from headers), if it is valid.
    pub fn of_context(cx: &opentelemetry::Context) -> Option<TraceParent> {
        let sc = cx.span().span_context().clone();
        sc.is_valid().then(|| TraceParent {
            trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
            sampled: sc.is_sampled(),
        })
    }

    /// As a remote span context.
    pub fn span_context(&self) -> SpanContext {
        SpanContext::new(
            TraceId::from_bytes(self.trace_id.to_be_bytes()),
            SpanId::from_bytes(self.span_id.to_be_bytes()),
            if self.sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            },
            true,
            TraceState::default(),
        )
    }

    /// Links `span` to this producer span (call before `span` is first entered, so that the
    /// link is part of the span's start and its sampling decision can see it).
    pub fn link(&self, span: &tracing::Span) {
        span.add_link(self.span_context());
    }

    /// The trace id as 32 lower-case hex digits (the form Jaeger's URLs use).
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

/// The `traceparent` header form: `00-<trace id>-<span id>-<flags>`.
impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }
}

/// A malformed `traceparent`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed traceparent {0:?}")]
pub struct TraceParentError(pub String);

impl FromStr for TraceParent {
    type Err = TraceParentError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TraceParentError(s.chars().take(64).collect());
        // The W3C format is lower-case hex only (`from_str_radix` below would also take upper
        // case and a sign; the SDK's propagator rejects the former).
        let lower_hex = |b: u8| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        if !s.trim().bytes().all(lower_hex) {
            return Err(bad());
        }
        let mut parts = s.trim().split('-');
        let (Some(version), Some(trace), Some(span), Some(flags)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        // Version 00 has exactly four fields; later versions may append more (W3C §3.2.4).
        if version.len() != 2
            || version == "ff"
            || (version == "00" && parts.next().is_some())
            || trace.len() != 32
            || span.len() != 16
            || flags.len() != 2
        {
            return Err(bad());
        }
        let trace_id = u128::from_str_radix(trace, 16).map_err(|_| bad())?;
        let span_id = u64::from_str_radix(span, 16).map_err(|_| bad())?;
        let flags = u8::from_str_radix(flags, 16).map_err(|_| bad())?;
        u8::from_str_radix(version, 16).map_err(|_| bad())?;
        if trace_id == 0 || span_id == 0 {
            return Err(bad());
        }
        Ok(TraceParent {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_caller_is_read_from_traceparent_like_the_propagator_does() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(caller(&headers), None, "no header");
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        headers.insert("traceparent", http::HeaderValue::from_static(value));
        headers.insert("tracestate", http::HeaderValue::from_static("vendor=x"));
        let tp = caller(&headers).expect("valid traceparent");
        assert_eq!(tp.to_string(), value);
        assert!(tp.sampled);
        // The SDK's propagator agrees on what the caller is.
        let propagator = opentelemetry_sdk::propagation::TraceContextPropagator::new();
        let cx = opentelemetry::propagation::TextMapPropagator::extract(
            &propagator,
            &HeaderExtractor(&headers),
        );
        assert_eq!(TraceParent::of_context(&cx), Some(tp));
        // W3C allows lower-case hex digits only; the SDK's parser lets a sign through
        // (`from_str_radix` takes "+"), this one does not.
        headers.insert(
            "traceparent",
            http::HeaderValue::from_static(
                "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        );
        assert_eq!(caller(&headers), None, "a sign is not a hex digit");
        for junk in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "not a traceparent",
        ] {
            headers.insert("traceparent", http::HeaderValue::from_static(junk));
            assert_eq!(caller(&headers), None, "{junk:?} accepted");
            let cx = opentelemetry::propagation::TextMapPropagator::extract(
                &propagator,
                &HeaderExtractor(&headers),
            );
            assert_eq!(
                TraceParent::of_context(&cx),
                None,
                "{junk:?}: the SDK accepts it"
            );
        }
    }

    #[test]
    fn traceparent_round_trips_and_rejects_junk() {
        let tp = TraceParent {
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            span_id: 0x00f067aa0ba902b7,
            sampled: true,
        };
        let s = tp.to_string();
        assert_eq!(s, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(s.parse::<TraceParent>(), Ok(tp));
        let unsampled: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
            .parse()
            .expect("valid");
        assert!(!unsampled.sampled);
        for junk in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(junk.parse::<TraceParent>().is_err(), "{junk:?} accepted");
        }
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(tp.span_context().is_remote());
        assert!(tp.span_context().is_sampled());
    }

    #[tokio::test]
    async fn an_unsampled_request_passes_its_context_on_unsampled() {
        let tp = TraceParent {
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            span_id: 0x00f067aa0ba902b7,
            sampled: true,
        };
        assert!(!in_unsampled());
        let (headers, current, inside) = unsampled(tp, async {
            let mut headers = http::HeaderMap::new();
            inject(&tracing::Span::none(), &mut headers);
            (headers, TraceParent::current(), in_unsampled())
        })
        .await;
        assert!(inside);
        assert_eq!(
            headers.get("traceparent").and_then(|v| v.to_str().ok()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
            "the flag is off whatever the caller said"
        );
        assert_eq!(
            current,
            Some(TraceParent {
                sampled: false,
                ..tp
            })
        );
        assert!(!in_unsampled(), "the scope ends with the request");
    }

    #[test]
    fn nothing_is_injected_without_a_recorded_span() {
        let mut headers = http::HeaderMap::new();
        inject(&tracing::Span::none(), &mut headers);
        assert!(headers.is_empty());
        assert!(TraceParent::current().is_none());
    }
}
