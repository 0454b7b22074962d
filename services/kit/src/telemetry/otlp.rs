//! The span exporter: OTLP/gRPC `TraceService/Export` requests built straight from the SDK's
//! spans.
//!
//! opentelemetry-otlp's exporter deep-clones every batch (to be able to retry it), converts each
//! span into opentelemetry-proto's owned message types (an allocation per id, name, key and
//! value) and then encodes those. At full sampling that was a third of what tracing cost the
//! services. Here each span is written once, by reference, as its protobuf `Span` message
//! ([`put_span`], done by the span processor when the span ends), and a batch of those is
//! framed into one `ExportTraceServiceRequest` ([`TraceExporter::export`]) in a request buffer
//! that is reused from batch to batch, then handed to the gRPC channel as it is (tonic's codec
//! would copy it once more into a fresh buffer). The wire format is the same (a test decodes it
//! with opentelemetry-proto and compares it with that crate's own conversion). A failed export
//! is dropped, not retried: spans are best-effort, and the next batch is already queued behind
//! it.
//!
//! Honours `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`, `…_HEADERS` and `…_TIMEOUT`; compression
//! (`…_COMPRESSION`) other than `none` is refused at start-up, as it is not built in.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use bytes::{BufMut as _, BytesMut};
use http_body_util::BodyExt as _;
use opentelemetry::trace::{SpanId, Status};
use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue, Value};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::SpanData;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
use tonic::transport::Channel;

use super::TelemetryError;

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// One service's span exporter (its resource is encoded once, up front).
#[derive(Debug)]
pub(super) struct TraceExporter {
    channel: Channel,
    /// Headers of every export request: gRPC's, and `OTEL_EXPORTER_OTLP_HEADERS`.
    headers: http::HeaderMap,
    timeout: Duration,
    runtime: tokio::runtime::Handle,
    /// `Resource` message body, and the resource's schema URL.
    resource: Vec<u8>,
    schema_url: String,
}

/// The first of `names` that is set in the environment.
fn env_first(names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| std::env::var(n).ok())
}

impl TraceExporter {
    /// An exporter to `endpoint` (unless `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` names another)
    /// with `resource`. Must be called inside a Tokio runtime: exports run on it.
    pub(super) fn new(
        endpoint: &str,
        default_timeout: Duration,
        resource: &Resource,
    ) -> Result<TraceExporter, TelemetryError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| TelemetryError::Config("span export needs a Tokio runtime".into()))?;
        let endpoint = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .unwrap_or_else(|_| endpoint.to_owned());
        let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
            .map_err(|e| TelemetryError::Config(format!("OTLP endpoint {endpoint:?}: {e}")))?
            .connect_timeout(default_timeout)
            .connect_lazy();
        let timeout = match env_first(&[
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ]) {
            Some(ms) => Duration::from_millis(ms.trim().parse().map_err(|_| {
                TelemetryError::Config(format!(
                    "OTEL_EXPORTER_OTLP_TIMEOUT must be milliseconds, got {ms:?}"
                ))
            })?),
            None => default_timeout,
        };
        if let Some(c) = env_first(&[
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
            "OTEL_EXPORTER_OTLP_COMPRESSION",
        ]) && !c.trim().eq_ignore_ascii_case("none")
        {
            return Err(TelemetryError::Config(format!(
                "OTLP compression {c:?} is not supported (use none)"
            )));
        }
        let mut headers = match env_first(&[
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            "OTEL_EXPORTER_OTLP_HEADERS",
        ]) {
            Some(list) => parse_headers(&list)?,
            None => http::HeaderMap::new(),
        };
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        Ok(TraceExporter {
            channel,
            headers,
            timeout,
            runtime,
            resource: encode_resource(resource),
            schema_url: resource.schema_url().unwrap_or_default().to_owned(),
        })
    }

    /// Sends one batch: `spans`, `Span` messages written by [`put_span`], all of `scope`.
    /// `out` is the request buffer, reused from batch to batch (its memory is reclaimed once
    /// the previous request has been written to the socket). Waits for the collector's answer
    /// for at most the export timeout or `limit`, whichever is shorter: call it from the
    /// export thread, not from inside the runtime.
    pub(super) fn export(
        &self,
        scope: &InstrumentationScope,
        spans: &[u8],
        out: &mut BytesMut,
        limit: Duration,
    ) -> OTelSdkResult {
        if spans.is_empty() {
            return Ok(());
        }
        encode_request(out, &self.resource, &self.schema_url, scope, spans);
        let body = out.split().freeze();
        let timeout = self.timeout.min(limit);
        let mut request =
            http::Request::new(tonic::body::Body::new(http_body_util::Full::new(body)));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = http::Uri::from_static(EXPORT_PATH);
        *request.headers_mut() = self.headers.clone();
        // gRPC's `TimeoutValue` has at most 8 digits.
        if let Ok(v) =
            http::HeaderValue::from_str(&format!("{}m", timeout.as_millis().clamp(1, 99_999_999)))
        {
            request.headers_mut().insert("grpc-timeout", v);
        }
        let channel = self.channel.clone();
        let (done, answer) = std::sync::mpsc::sync_channel(1);
        // The call (and its deadline) run on the runtime; this thread waits for the outcome.
        self.runtime.spawn(async move {
            let outcome = tokio::time::timeout(timeout, call(channel, request))
                .await
                .unwrap_or(Err(OTelSdkError::Timeout(timeout)));
            let _ = done.send(outcome);
        });
        match answer.recv_timeout(timeout + Duration::from_secs(1)) {
            Ok(outcome) => outcome,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(OTelSdkError::Timeout(timeout)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(
                OTelSdkError::InternalFailure("the runtime that sends spans has stopped".into()),
            ),
        }
    }
}

/// One `Export` call: a gRPC unary call whose request is already framed.
async fn call(channel: Channel, request: http::Request<tonic::body::Body>) -> OTelSdkResult {
    let failed = |what: String| OTelSdkError::InternalFailure(format!("span export: {what}"));
    let response = tower::ServiceExt::oneshot(channel, request)
        .await
        .map_err(|e| failed(format!("OTLP collector unreachable: {e}")))?;
    let (head, body) = response.into_parts();
    if head.status != http::StatusCode::OK {
        return Err(failed(format!("HTTP status {}", head.status)));
    }
    let status = |headers: &http::HeaderMap| {
        headers
            .get("grpc-status")
            .map(|v| std::str::from_utf8(v.as_bytes()).ok()?.parse::<i32>().ok())
    };
    // A trailers-only answer (an error, mostly) carries its status in the headers.
    if let Some(code) = status(&head.headers) {
        return match code {
            Some(0) => Ok(()),
            code => Err(failed(format!("gRPC status {code:?}"))),
        };
    }
    let body = body
        .collect()
        .await
        .map_err(|e| failed(format!("reading the answer: {e}")))?;
    match body.trailers().and_then(status) {
        Some(Some(0)) => {}
        code => return Err(failed(format!("gRPC status {:?}", code.flatten()))),
    }
    // The answer: a gRPC frame holding an `ExportTraceServiceResponse`.
    let data = body.to_bytes();
    if let Some(message) = data.get(5..)
        && let Ok(response) = <ExportTraceServiceResponse as prost::Message>::decode(message)
        && let Some(partial) = response.partial_success
        && (partial.rejected_spans > 0 || !partial.error_message.is_empty())
    {
        tracing::debug!(
            rejected = partial.rejected_spans,
            message = partial.error_message,
            "the OTLP collector rejected spans"
        );
    }
    Ok(())
}

/// `key1=value1,key2=value2`, values percent-encoded (the OTLP exporter specification).
fn parse_headers(list: &str) -> Result<http::HeaderMap, TelemetryError> {
    let mut map = http::HeaderMap::new();
    for pair in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad =
            || TelemetryError::Config(format!("OTEL_EXPORTER_OTLP_HEADERS: bad entry {pair:?}"));
        let (key, value) = pair.split_once('=').ok_or_else(bad)?;
        let value = percent_encoding::percent_decode_str(value.trim())
            .decode_utf8()
            .map_err(|_| bad())?;
        let key = http::HeaderName::from_bytes(key.trim().to_ascii_lowercase().as_bytes())
            .map_err(|_| bad())?;
        let value = http::HeaderValue::from_str(value.as_ref()).map_err(|_| bad())?;
        map.insert(key, value);
    }
    Ok(map)
}

// --- Protobuf writing. Field numbers are those of opentelemetry/proto/{trace,common,resource}/v1.
// Like prost, scalar fields at their default value are left out; message fields that are set
// (and oneof members) are always written.

fn put_len_prefix(buf: &mut Vec<u8>, tag: u32, len: usize) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
}

fn put_bytes(buf: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
    if !bytes.is_empty() {
        put_len_prefix(buf, tag, bytes.len());
        buf.extend_from_slice(bytes);
    }
}

fn put_varint(buf: &mut Vec<u8>, tag: u32, value: u64) {
    if value != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(value, buf);
    }
}

fn put_fixed64(buf: &mut Vec<u8>, tag: u32, value: u64) {
    if value != 0 {
        encode_key(tag, WireType::SixtyFourBit, buf);
        buf.extend_from_slice(&value.to_le_bytes());
    }
}

fn put_fixed32(buf: &mut Vec<u8>, tag: u32, value: u32) {
    if value != 0 {
        encode_key(tag, WireType::ThirtyTwoBit, buf);
        buf.extend_from_slice(&value.to_le_bytes());
    }
}

/// Writes a message field whose body `f` writes (through a scratch buffer: the length comes
/// first on the wire). For the few, large messages; attributes compute their length instead.
fn put_message(buf: &mut Vec<u8>, tag: u32, f: impl FnOnce(&mut Vec<u8>)) {
    let mut body = Vec::new();
    f(&mut body);
    put_len_prefix(buf, tag, body.len());
    buf.extend_from_slice(&body);
}

/// A scalar attribute value.
enum Scalar<'a> {
    Bool(bool),
    I64(i64),
    F64(f64),
    Str(Cow<'a, str>),
}

impl Scalar<'_> {
    /// Length of the `AnyValue` body.
    fn len(&self) -> usize {
        match self {
            Scalar::Bool(_) => 2,
            Scalar::I64(i) => 1 + encoded_len_varint(*i as u64),
            Scalar::F64(_) => 9,
            Scalar::Str(s) => 1 + encoded_len_varint(s.len() as u64) + s.len(),
        }
    }

    /// Writes the `AnyValue` body (a oneof member: written even at its default).
    fn put(&self, buf: &mut Vec<u8>) {
        match self {
            Scalar::Bool(b) => {
                encode_key(2, WireType::Varint, buf);
                encode_varint(u64::from(*b), buf);
            }
            Scalar::I64(i) => {
                encode_key(3, WireType::Varint, buf);
                encode_varint(*i as u64, buf);
            }
            Scalar::F64(d) => {
                encode_key(4, WireType::SixtyFourBit, buf);
                buf.extend_from_slice(&d.to_bits().to_le_bytes());
            }
            Scalar::Str(s) => {
                put_len_prefix(buf, 1, s.len());
                buf.extend_from_slice(s.as_bytes());
            }
        }
    }
}

fn str_scalar(s: &StringValue) -> Scalar<'_> {
    Scalar::Str(Cow::Borrowed(s.as_str()))
}

/// The elements of an array value (`None` for a scalar).
fn array_items(value: &Value) -> Option<Vec<Scalar<'_>>> {
    let Value::Array(array) = value else {
        return None;
    };
    Some(match array {
        Array::Bool(v) => v.iter().map(|b| Scalar::Bool(*b)).collect(),
        Array::I64(v) => v.iter().map(|i| Scalar::I64(*i)).collect(),
        Array::F64(v) => v.iter().map(|d| Scalar::F64(*d)).collect(),
        Array::String(v) => v.iter().map(str_scalar).collect(),
        other => vec![Scalar::Str(Cow::Owned(other.to_string()))],
    })
}

fn scalar(value: &Value) -> Scalar<'_> {
    match value {
        Value::Bool(b) => Scalar::Bool(*b),
        Value::I64(i) => Scalar::I64(*i),
        Value::F64(d) => Scalar::F64(*d),
        Value::String(s) => str_scalar(s),
        other => Scalar::Str(Cow::Owned(other.to_string())),
    }
}

fn message_len(body: usize) -> usize {
    1 + encoded_len_varint(body as u64) + body
}

/// Writes a `KeyValue` field `tag`.
fn put_key_value(buf: &mut Vec<u8>, tag: u32, key: &str, value: &Value) {
    let key_field = if key.is_empty() {
        0
    } else {
        1 + encoded_len_varint(key.len() as u64) + key.len()
    };
    match array_items(value) {
        None => {
            let v = scalar(value);
            put_len_prefix(buf, tag, key_field + message_len(v.len()));
            put_bytes(buf, 1, key.as_bytes());
            put_len_prefix(buf, 2, v.len());
            v.put(buf);
        }
        Some(items) => {
            // AnyValue { array_value (5): ArrayValue { values (1): AnyValue… } }
            let array_body: usize = items.iter().map(|i| message_len(i.len())).sum();
            let any_body = message_len(array_body);
            put_len_prefix(buf, tag, key_field + message_len(any_body));
            put_bytes(buf, 1, key.as_bytes());
            put_len_prefix(buf, 2, any_body);
            put_len_prefix(buf, 5, array_body);
            for item in &items {
                put_len_prefix(buf, 1, item.len());
                item.put(buf);
            }
        }
    }
}

fn put_attributes(buf: &mut Vec<u8>, tag: u32, attributes: &[KeyValue]) {
    for kv in attributes {
        put_key_value(buf, tag, kv.key.as_str(), &kv.value);
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// `SpanFlags`: the W3C trace flags, plus "has is-remote" (0x100) and "is remote" (0x200).
fn span_flags(remote: bool, trace_flags: u8) -> u32 {
    u32::from(trace_flags) | 0x100 | if remote { 0x200 } else { 0 }
}

/// Writes `span` as a `spans` field (2) of `ScopeSpans` (appends it to `buf`); `b` is a scratch
/// buffer, reused from span to span, for the span's body.
pub(super) fn put_span(buf: &mut Vec<u8>, b: &mut Vec<u8>, span: &SpanData) {
    b.clear();
    let cx = &span.span_context;
    put_bytes(b, 1, &cx.trace_id().to_bytes());
    put_bytes(b, 2, &cx.span_id().to_bytes());
    put_bytes(b, 3, cx.trace_state().header().as_bytes());
    if span.parent_span_id != SpanId::INVALID {
        put_bytes(b, 4, &span.parent_span_id.to_bytes());
    }
    put_bytes(b, 5, span.name.as_bytes());
    let kind = match span.span_kind {
        opentelemetry::trace::SpanKind::Internal => 1,
        opentelemetry::trace::SpanKind::Server => 2,
        opentelemetry::trace::SpanKind::Client => 3,
        opentelemetry::trace::SpanKind::Producer => 4,
        opentelemetry::trace::SpanKind::Consumer => 5,
    };
    put_varint(b, 6, kind);
    put_fixed64(b, 7, nanos(span.start_time));
    put_fixed64(b, 8, nanos(span.end_time));
    put_attributes(b, 9, &span.attributes);
    put_varint(b, 10, u64::from(span.dropped_attributes_count));
    for event in &span.events.events {
        put_message(b, 11, |e| {
            put_fixed64(e, 1, nanos(event.timestamp));
            put_bytes(e, 2, event.name.as_bytes());
            put_attributes(e, 3, &event.attributes);
            put_varint(e, 4, u64::from(event.dropped_attributes_count));
        });
    }
    put_varint(b, 12, u64::from(span.events.dropped_count));
    for link in &span.links.links {
        put_message(b, 13, |l| {
            let cx = &link.span_context;
            put_bytes(l, 1, &cx.trace_id().to_bytes());
            put_bytes(l, 2, &cx.span_id().to_bytes());
            put_bytes(l, 3, cx.trace_state().header().as_bytes());
            put_attributes(l, 4, &link.attributes);
            put_varint(l, 5, u64::from(link.dropped_attributes_count));
            put_fixed32(l, 6, span_flags(cx.is_remote(), cx.trace_flags().to_u8()));
        });
    }
    put_varint(b, 14, u64::from(span.links.dropped_count));
    // Status { message (2), code (3) }: always present, even when empty.
    let (message, code) = match &span.status {
        Status::Unset => ("", 0),
        Status::Ok => ("", 1),
        Status::Error { description } => (description.as_ref(), 2),
    };
    let message_field = if message.is_empty() {
        0
    } else {
        message_len(message.len())
    };
    put_len_prefix(b, 15, message_field + if code == 0 { 0 } else { 2 });
    put_bytes(b, 2, message.as_bytes());
    put_varint(b, 3, code);
    put_fixed32(
        b,
        16,
        span_flags(span.parent_span_is_remote, cx.trace_flags().to_u8()),
    );
    put_len_prefix(buf, 2, b.len());
    buf.extend_from_slice(b);
}

fn put_scope(buf: &mut Vec<u8>, scope: &InstrumentationScope) {
    put_message(buf, 1, |s| {
        put_bytes(s, 1, scope.name().as_bytes());
        put_bytes(s, 2, scope.version().unwrap_or_default().as_bytes());
        for kv in scope.attributes() {
            put_key_value(s, 3, kv.key.as_str(), &kv.value);
        }
    });
}

/// The body of a `Resource` message: its attributes.
fn encode_resource(resource: &Resource) -> Vec<u8> {
    let mut encoded = Vec::new();
    for (key, value) in resource.iter() {
        put_key_value(&mut encoded, 1, key.as_str(), value);
    }
    encoded
}

/// Writes into `out` (emptied first) the gRPC message of an `ExportTraceServiceRequest` of
/// one resource (its encoded body and schema URL) and one scope whose spans are `spans`
/// (`Span` messages written by [`put_span`]): the 5-byte frame header, then the message.
fn encode_request(
    out: &mut BytesMut,
    resource: &[u8],
    schema_url: &str,
    scope: &InstrumentationScope,
    spans: &[u8],
) {
    let mut scope_field = Vec::new();
    put_scope(&mut scope_field, scope);
    let mut scope_tail = Vec::new();
    put_bytes(
        &mut scope_tail,
        3,
        scope.schema_url().unwrap_or_default().as_bytes(),
    );
    let mut tail = Vec::new();
    put_bytes(&mut tail, 3, schema_url.as_bytes());
    // ResourceSpans { resource (1), scope_spans (2): ScopeSpans { scope (1), spans (2)…,
    // schema_url (3) }, schema_url (3) }, as field 1 of the request.
    let scope_spans = scope_field.len() + spans.len() + scope_tail.len();
    let resource_spans = message_len(resource.len()) + message_len(scope_spans) + tail.len();
    let mut head = Vec::with_capacity(32 + resource.len() + scope_field.len());
    put_len_prefix(&mut head, 1, resource_spans);
    put_len_prefix(&mut head, 1, resource.len());
    head.extend_from_slice(resource);
    put_len_prefix(&mut head, 2, scope_spans);
    head.extend_from_slice(&scope_field);
    let message = message_len(resource_spans);
    out.clear();
    out.reserve(5 + message);
    // Not compressed; the length as a big-endian u32 (an export is far below 4 GiB).
    out.put_u8(0);
    out.put_u32(u32::try_from(message).unwrap_or(u32::MAX));
    out.put_slice(&head);
    out.put_slice(spans);
    out.put_slice(&scope_tail);
    out.put_slice(&tail);
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{Link, SpanContext, SpanKind, TraceFlags, TraceId, TraceState};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use prost::Message as _;

    fn context(trace: u128, span: u64, remote: bool) -> SpanContext {
        SpanContext::new(
            TraceId::from(trace),
            SpanId::from(span),
            TraceFlags::SAMPLED,
            remote,
            TraceState::from_key_value([("vendor", "v1")]).expect("trace state"),
        )
    }

    fn span(n: u64, scope: &InstrumentationScope) -> SpanData {
        let at = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_796_000_000_000_000_000 + n);
        let mut events = SpanEvents::default();
        let mut links = SpanLinks::default();
        if n.is_multiple_of(2) {
            events.events.push(opentelemetry::trace::Event::new(
                "retry",
                at,
                vec![KeyValue::new("attempt", 2)],
                1,
            ));
            events.dropped_count = 3;
            links.links.push(Link::new(
                context(7, 8, true),
                vec![KeyValue::new("messaging.operation", "process")],
                0,
            ));
            links.dropped_count = 1;
        }
        SpanData {
            span_context: context(0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c, 100 + n, false),
            parent_span_id: if n == 0 {
                SpanId::INVALID
            } else {
                SpanId::from(99)
            },
            parent_span_is_remote: n == 1,
            span_kind: [
                SpanKind::Server,
                SpanKind::Client,
                SpanKind::Internal,
                SpanKind::Producer,
                SpanKind::Consumer,
            ][n as usize % 5]
                .clone(),
            name: if n.is_multiple_of(2) {
                Cow::Borrowed("GET /v1/users/{id}/timeline")
            } else {
                Cow::Owned(format!("EVALSHA {n}"))
            },
            start_time: at,
            end_time: at + Duration::from_micros(1_500),
            attributes: vec![
                KeyValue::new("http.route", "/v1/users/{id}/timeline"),
                KeyValue::new("http.response.status_code", 200 - n as i64 * 300),
                KeyValue::new("sampled", n.is_multiple_of(2)),
                KeyValue::new("ratio", 0.25),
                KeyValue::new("empty", ""),
                KeyValue::new("ids", Value::Array(Array::I64(vec![1, -2, 3]))),
                KeyValue::new("flags", Value::Array(Array::Bool(vec![true, false]))),
                KeyValue::new("weights", Value::Array(Array::F64(vec![0.5]))),
                KeyValue::new(
                    "names",
                    Value::Array(Array::String(vec!["a".into(), "".into(), "ü".into()])),
                ),
            ],
            dropped_attributes_count: n as u32 % 2,
            events,
            links,
            status: match n % 3 {
                0 => Status::Unset,
                1 => Status::Ok,
                _ => Status::error("gRPC status 14"),
            },
            instrumentation_scope: scope.clone(),
        }
    }

    /// What opentelemetry-proto's own conversion would send for the same spans.
    fn reference(resource: &Resource, spans: &[SpanData]) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                spans.to_vec(),
                &ResourceAttributesWithSchema::from(resource),
            ),
        }
    }

    /// One request per scope, as the span processor sends them: each scope's spans written by
    /// `put_span` as they end, then framed. Returned as one request, the scopes' `ScopeSpans`
    /// side by side under the one resource, to compare with the reference.
    fn ours(resource: &Resource, spans: &[SpanData]) -> ExportTraceServiceRequest {
        let mut scopes: Vec<(&InstrumentationScope, Vec<u8>)> = Vec::new();
        let mut scratch = Vec::new();
        for span in spans {
            let i = match scopes
                .iter()
                .position(|(s, _)| **s == span.instrumentation_scope)
            {
                Some(i) => i,
                None => {
                    scopes.push((&span.instrumentation_scope, Vec::new()));
                    scopes.len() - 1
                }
            };
            put_span(&mut scopes[i].1, &mut scratch, span);
        }
        let mut merged: Option<ExportTraceServiceRequest> = None;
        let mut out = BytesMut::new();
        for (scope, encoded) in scopes {
            encode_request(
                &mut out,
                &encode_resource(resource),
                resource.schema_url().unwrap_or_default(),
                scope,
                &encoded,
            );
            let framed = out.split().freeze();
            assert_eq!(framed[0], 0, "not compressed");
            let len = u32::from_be_bytes([framed[1], framed[2], framed[3], framed[4]]);
            assert_eq!(
                len as usize,
                framed.len() - 5,
                "the frame holds the message"
            );
            let request =
                ExportTraceServiceRequest::decode(&framed[5..]).expect("our encoding decodes");
            assert_eq!(request.resource_spans.len(), 1);
            match &mut merged {
                None => merged = Some(request),
                Some(m) => m.resource_spans[0]
                    .scope_spans
                    .extend(request.resource_spans[0].scope_spans.iter().cloned()),
            }
        }
        merged.unwrap_or_default()
    }

    #[test]
    fn the_wire_format_matches_opentelemetry_proto() {
        let resource = Resource::builder_empty()
            .with_service_name("timeline")
            .with_attributes([
                KeyValue::new("service.instance.id", "host:1:timeline"),
                KeyValue::new("k8s.pod.name", "timeline-0"),
            ])
            .build();
        let loadlab = InstrumentationScope::builder("loadlab").build();
        let tracing = InstrumentationScope::builder("tracing-opentelemetry")
            .with_version("0.34")
            .with_schema_url("https://opentelemetry.io/schemas/1.36.0")
            .with_attributes([KeyValue::new("scope.attr", 1)])
            .build();
        // Interleaved scopes: grouped in order of first appearance, spans in order.
        let spans: Vec<SpanData> = (0..7)
            .map(|n| span(n, if n % 3 == 2 { &tracing } else { &loadlab }))
            .collect();
        assert_eq!(ours(&resource, &spans), reference(&resource, &spans));

        let with_schema = Resource::builder_empty()
            .with_schema_url([KeyValue::new("a", "b")], "https://s")
            .build();
        assert_eq!(
            ours(&with_schema, &spans[..1]),
            reference(&with_schema, &spans[..1])
        );
    }

    /// CPU cost of preparing one 512-span batch: opentelemetry-otlp's path (clone the batch,
    /// convert to opentelemetry-proto messages, prost-encode) against this module's encoder.
    /// A measurement, not a check: `cargo test --release -p loadlab-kit --lib encode_cost --
    /// --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement; run on demand"]
    fn encode_cost() {
        let resource = Resource::builder_empty()
            .with_service_name("timeline")
            .with_attributes([KeyValue::new("service.instance.id", "host:1:timeline")])
            .build();
        let scope = InstrumentationScope::builder("loadlab").build();
        // Spans like the read path's: a server span and Redis client spans.
        let batch: Vec<SpanData> = (0..512u64)
            .map(|n| {
                let mut s = span(n, &scope);
                s.events = SpanEvents::default();
                s.links = SpanLinks::default();
                s.attributes.truncate(3);
                s
            })
            .collect();
        let attrs = ResourceAttributesWithSchema::from(&resource);
        let encoded_resource = encode_resource(&resource);
        let rounds = 200;
        let started = std::time::Instant::now();
        let mut bytes = 0;
        for _ in 0..rounds {
            let request = ExportTraceServiceRequest {
                resource_spans: group_spans_by_resource_and_scope(batch.clone(), &attrs),
            };
            bytes += request.encode_to_vec().len();
        }
        let theirs = started.elapsed() / rounds;
        let started = std::time::Instant::now();
        let mut ours_bytes = 0;
        let (mut spans, mut scratch, mut out) = (Vec::new(), Vec::new(), BytesMut::new());
        for _ in 0..rounds {
            spans.clear();
            for span in &batch {
                put_span(&mut spans, &mut scratch, span);
            }
            encode_request(&mut out, &encoded_resource, "", &scope, &spans);
            ours_bytes += out.split().len() - 5;
        }
        let ours = started.elapsed() / rounds;
        assert_eq!(bytes, ours_bytes, "same wire size");
        println!(
            "512 spans: clone + convert + encode {theirs:?}, direct encode {ours:?} ({:.1}x)",
            theirs.as_secs_f64() / ours.as_secs_f64()
        );
    }

    #[test]
    fn headers_follow_the_specification() {
        let map = parse_headers("api-key=se%20cret, X-Tenant = blue ,,").expect("parses");
        assert_eq!(
            map.get("api-key").and_then(|v| v.to_str().ok()),
            Some("se cret")
        );
        assert_eq!(
            map.get("x-tenant").and_then(|v| v.to_str().ok()),
            Some("blue")
        );
        for bad in ["novalue", "bad key=1", "k=%ff"] {
            let err = parse_headers(bad).expect_err(bad).to_string();
            assert!(err.contains(bad), "{err}");
        }
    }
}
