//! Spans made with the OpenTelemetry SDK directly rather than through `tracing`: the server
//! span of a sampled request ([`server_span`]) and the client spans of single operations
//! inside it — one Redis command, one outgoing gRPC call ([`ClientSpan`]).
//!
//! These are nearly all the spans of a traced request (a home-timeline read makes six, all of
//! them here) and they need none of what a `tracing` span brings: no registry slot, no
//! per-poll enter and exit through every layer, no conversion at close (`benches/tracing.sh`
//! measures what is left). The server span is the active OpenTelemetry
//! context while its request runs (`FutureExt::with_context`), so the client spans and any
//! `tracing` spans the request opens (SQL statements) take it as their parent — `tracing`
//! spans follow the active context, and entering one activates its own — and all of them
//! are attributed to the request's service. Client spans exist only inside sampled work:
//! anywhere else [`ClientSpan::start`] costs one lookup and returns an inert span.

use std::borrow::Cow;
use std::future::Future;

use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt as _, Tracer as _,
};
use opentelemetry::{Context, KeyValue};

/// Starts the server span `name` of a sampled request, child of `parent` (the caller's context,
/// empty for a new trace), and returns the context that holds it: run the request with
/// `FutureExt::with_context` on it, and end the span through it. Spans are exported from this
/// process (the edge decides to sample only then); without a pipeline the context is `parent`.
pub fn server_span(
    name: impl Into<Cow<'static, str>>,
    mut attributes: Vec<KeyValue>,
    parent: &Context,
) -> Context {
    let Some(tracer) = super::pipeline::active_tracer() else {
        return parent.clone();
    };
    // Room for the service tag (added at start) and the status attribute (set at the end),
    // so neither grows the vector again.
    attributes.reserve(2);
    let span = tracer
        .span_builder(name.into())
        .with_kind(SpanKind::Server)
        .with_attributes(attributes)
        .start_with_context(tracer, parent);
    parent.with_span(span)
}

/// A client span, or nothing when the current work is not sampled. Ends when dropped (also
/// when the operation is cancelled), or through [`ClientSpan::run`].
#[derive(Debug)]
pub struct ClientSpan(Option<opentelemetry_sdk::trace::Span>);

impl ClientSpan {
    /// Starts a client span named `name`, child of the active context (the request's server
    /// span, or the `tracing` span entered last), if that belongs to a sampled trace and spans
    /// are exported. `describe` gives its name and attributes, and is only called then.
    pub fn start(describe: impl FnOnce() -> (Cow<'static, str>, Vec<KeyValue>)) -> Self {
        let Some(tracer) = super::pipeline::active_tracer() else {
            return ClientSpan(None);
        };
        // The active context: the request's server span, or the `tracing` span entered last
        // (entering one activates its OpenTelemetry context).
        let parent = Context::current();
        if !parent.span().span_context().is_sampled() {
            return ClientSpan(None);
        }
        let (name, mut attributes) = describe();
        // Room for the service tag the span processor adds at start.
        attributes.reserve(1);
        let span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(tracer, &parent);
        ClientSpan(Some(span))
    }

    /// Whether the span records (it was started under a sampled parent).
    pub fn is_recording(&self) -> bool {
        self.0.is_some()
    }

    /// The span's context, to propagate to the peer; `None` for an inert span.
    pub fn span_context(&self) -> Option<&SpanContext> {
        self.0.as_ref().map(|s| s.span_context())
    }

    /// A context whose active span is this one (for injection into outgoing headers).
    pub fn context(&self) -> Option<Context> {
        self.span_context()
            .map(|sc| Context::new().with_remote_span_context(sc.clone()))
    }

    /// Sets an attribute.
    pub fn set_attribute(&mut self, attribute: KeyValue) {
        if let Some(s) = &mut self.0 {
            s.set_attribute(attribute);
        }
    }

    /// Marks the operation failed.
    pub fn set_error(&mut self, description: impl Into<Cow<'static, str>>) {
        if let Some(s) = &mut self.0 {
            s.set_status(Status::error(description));
        }
    }

    /// Runs `operation` within the span and ends it when the operation finishes; a failure
    /// sets the span's status to error with the error's message.
    pub async fn run<T, E: std::fmt::Display>(
        mut self,
        operation: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let result = operation.await;
        if let Err(e) = &result
            && self.is_recording()
        {
            self.set_error(e.to_string());
        }
        drop(self);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn outside_sampled_work_a_client_span_is_inert_and_runs_the_operation() {
        let mut called = false;
        let span = ClientSpan::start(|| {
            called = true;
            ("GET x".into(), Vec::new())
        });
        assert!(!called, "attributes are not built for an inert span");
        assert!(!span.is_recording());
        assert!(span.span_context().is_none() && span.context().is_none());
        let out: Result<u8, String> = span.run(async { Err("boom".to_owned()) }).await;
        assert_eq!(
            out,
            Err("boom".to_owned()),
            "the operation's result passes through"
        );
    }
}
