//! W3C trace context across hops: HTTP headers and gRPC metadata (both are HTTP headers here),
//! and a compact [`TraceParent`] for hand-offs through queues and pub/sub, where the consumer's
//! span *links* to the producer's instead of becoming its child.

use std::fmt;
use std::str::FromStr;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The caller's `traceparent`, read straight from the header without a propagator or a
/// [`opentelemetry::Context`] (cheap enough for every request, most of which are unsampled);
/// `None` when absent or malformed, as the W3C propagator would treat it.
pub fn caller(headers: &http::HeaderMap) -> Option<TraceParent> {
    TraceParent::parse(headers.get(TRACEPARENT)?.as_bytes())
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
/// `headers` as W3C `traceparent` (and `tracestate` when it has entries); when it holds no
/// span, the unsampled context of an unsampled request without spans. Nothing otherwise
/// (telemetry off, or no recorded span).
///
/// This writes what the SDK's `TraceContextPropagator` writes, without its `format!` and its
/// always-present (usually empty) `tracestate` header: it runs on every outgoing call.
pub fn inject_context(cx: &opentelemetry::Context, headers: &mut http::HeaderMap) {
    let span = cx.span();
    let sc = span.span_context();
    if sc.is_valid() {
        headers.insert(TRACEPARENT, TraceParent::of_span_context(sc).header_value());
        let state = sc.trace_state().header();
        if !state.is_empty()
            && let Ok(v) = http::HeaderValue::from_str(&state)
        {
            headers.insert(TRACESTATE, v);
        }
    } else if let Ok(tp) = UNSAMPLED.try_with(|tp| *tp) {
        headers.insert(TRACEPARENT, tp.header_value());
    }
}

/// The caller's context for a request whose `traceparent` ([`caller`]) is `tp`: a remote span
/// context with `tp`'s ids and flag and the `tracestate` header's entries — what the W3C
/// propagator extracts (a malformed `tracestate` is dropped, as it does), without parsing
/// `traceparent` a second time.
pub fn caller_context(tp: TraceParent, headers: &http::HeaderMap) -> opentelemetry::Context {
    let state = headers
        .get(TRACESTATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<TraceState>().ok())
        .unwrap_or_default();
    opentelemetry::Context::new().with_remote_span_context(tp.span_context_with(state))
}

const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
const TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

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
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| TraceParent::of_span_context(sc))
    }

    /// The identity of a span context (valid or not).
    pub fn of_span_context(sc: &SpanContext) -> TraceParent {
        TraceParent {
            trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
            sampled: sc.is_sampled(),
        }
    }

    /// The `traceparent` form, `00-<trace id>-<span id>-<flags>`, as bytes (written without
    /// the formatting machinery: every outgoing call of a traced service writes one).
    pub fn encode(&self) -> [u8; TRACEPARENT_LEN] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        fn hex(out: &mut [u8], bytes: &[u8]) {
            for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
                pair[0] = HEX[usize::from(b >> 4)];
                pair[1] = HEX[usize::from(b & 0xf)];
            }
        }
        let mut out = [b'-'; TRACEPARENT_LEN];
        out[..2].copy_from_slice(b"00");
        hex(&mut out[3..35], &self.trace_id.to_be_bytes());
        hex(&mut out[36..52], &self.span_id.to_be_bytes());
        out[53] = b'0';
        out[54] = if self.sampled { b'1' } else { b'0' };
        out
    }

    /// The `traceparent` header value. It is marked sensitive, which HTTP/2 sends as a literal
    /// "never indexed": every request's value is new, so entering it into the HPACK tables
    /// of both peers would only cost hashing and evict the headers that do repeat.
    pub fn header_value(&self) -> http::HeaderValue {
        let mut value = match http::HeaderValue::from_bytes(&self.encode()) {
            Ok(v) => v,
            // Hex digits and dashes are always a valid header value.
            Err(_) => http::HeaderValue::from_static(""),
        };
        value.set_sensitive(true);
        value
    }

    /// Parses the `traceparent` form (see [`FromStr`]); `None` when malformed.
    pub fn parse(s: &[u8]) -> Option<TraceParent> {
        let s = s.trim_ascii();
        // Version 00 is exactly 55 bytes; a later version may append `-`-separated fields
        // (W3C §3.2.4). The W3C form is lower-case hex only (the SDK's parser, through
        // `from_str_radix`, also takes a sign).
        if s.len() < TRACEPARENT_LEN || s[2] != b'-' || s[35] != b'-' || s[52] != b'-' {
            return None;
        }
        let version = hex_u128(&s[..2])?;
        if version == 0xff
            || (version == 0 && s.len() != TRACEPARENT_LEN)
            || (s.len() > TRACEPARENT_LEN && s[TRACEPARENT_LEN] != b'-')
            || !s[TRACEPARENT_LEN..]
                .iter()
                .all(|&b| b == b'-' || hex_digit(b).is_some())
        {
            return None;
        }
        let trace_id = hex_u128(&s[3..35])?;
        let span_id = u64::try_from(hex_u128(&s[36..52])?).ok()?;
        let flags = hex_u128(&s[53..55])?;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        Some(TraceParent {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// As a remote span context.
    pub fn span_context(&self) -> SpanContext {
        self.span_context_with(TraceState::default())
    }

    /// As a remote span context carrying `state`.
    fn span_context_with(&self, state: TraceState) -> SpanContext {
        SpanContext::new(
            TraceId::from_bytes(self.trace_id.to_be_bytes()),
            SpanId::from_bytes(self.span_id.to_be_bytes()),
            if self.sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            },
            true,
            state,
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
        f.write_str(std::str::from_utf8(&self.encode()).map_err(|_| fmt::Error)?)
    }
}

/// Length of a version-00 `traceparent`.
pub const TRACEPARENT_LEN: usize = 55;

/// The value of a lower-case hex digit.
fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// Up to 32 lower-case hex digits as a number.
fn hex_u128(digits: &[u8]) -> Option<u128> {
    digits
        .iter()
        .try_fold(0u128, |n, &b| Some(n << 4 | u128::from(hex_digit(b)?)))
}

/// A malformed `traceparent`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed traceparent {0:?}")]
pub struct TraceParentError(pub String);

impl FromStr for TraceParent {
    type Err = TraceParentError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TraceParent::parse(s.as_bytes())
            .ok_or_else(|| TraceParentError(s.chars().take(64).collect()))
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};

    use super::*;

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

    #[test]
    fn injection_and_extraction_agree_with_the_w3c_propagator() {
        let propagator = opentelemetry_sdk::propagation::TraceContextPropagator::new();
        for (flags, state) in [
            (TraceFlags::SAMPLED, TraceState::default()),
            (
                TraceFlags::default(),
                TraceState::from_key_value([("vendor", "v1"), ("other", "x")]).expect("state"),
            ),
        ] {
            let sc = SpanContext::new(
                TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736),
                SpanId::from(0x00f0_67aa_0ba9_02b7),
                flags,
                false,
                state.clone(),
            );
            let cx = opentelemetry::Context::new().with_remote_span_context(sc.clone());
            let mut ours = http::HeaderMap::new();
            inject_context(&cx, &mut ours);
            let mut theirs = http::HeaderMap::new();
            propagator.inject_context(&cx, &mut HeaderInjector(&mut theirs));
            assert_eq!(ours.get("traceparent"), theirs.get("traceparent"));
            if state.header().is_empty() {
                // The propagator always writes `tracestate`; an empty one is left out here.
                assert!(!ours.contains_key("tracestate"));
            } else {
                assert_eq!(ours.get("tracestate"), theirs.get("tracestate"));
            }
            // What a peer reads back is what the propagator reads back.
            let tp = caller(&ours).expect("a valid traceparent");
            let extracted = caller_context(tp, &ours);
            let expected = propagator.extract(&HeaderExtractor(&theirs));
            assert_eq!(
                extracted.span().span_context(),
                expected.span().span_context()
            );
        }
        // Odd `tracestate` values are read as the propagator reads them.
        for state in ["=,=bad", "a=1,a=2", "k=v,,x=y", &"k=v,".repeat(40)] {
            let mut headers = http::HeaderMap::new();
            headers.insert(
                "traceparent",
                http::HeaderValue::from_static(
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
            );
            headers.insert(
                "tracestate",
                http::HeaderValue::from_str(state).expect("header value"),
            );
            let tp = caller(&headers).expect("valid");
            let cx = caller_context(tp, &headers);
            let expected = propagator.extract(&HeaderExtractor(&headers));
            assert_eq!(
                cx.span().span_context(),
                expected.span().span_context(),
                "{state:?}"
            );
        }
    }

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
