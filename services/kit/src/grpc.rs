//! gRPC client plumbing shared by services that call each other.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use opentelemetry::KeyValue;
use tonic::transport::{Channel, Endpoint};

/// The gRPC status code of a response as its headers tell it: a failed call answers
/// "trailers-only", with grpc-status in the headers; a successful unary call sends it in
/// trailers, which a middleware never sees, so absent means OK (0).
pub(crate) fn grpc_status(headers: &http::HeaderMap) -> i64 {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(0)
}

/// A bad peer URL.
#[derive(Debug, thiserror::Error)]
#[error("invalid peer URL {url:?}: {reason}")]
pub struct PeerUrlError {
    /// The URL.
    pub url: String,
    /// Why it was refused.
    pub reason: String,
}

/// A lazily-connecting, traced channel to a peer service: it connects on first use and
/// reconnects after the peer restarts, so services can start in any order.
pub fn lazy_channel(url: &str, request_timeout: Duration) -> Result<TracedChannel, PeerUrlError> {
    lazy_untraced_channel(url, request_timeout).map(TracedChannel::new)
}

/// [`lazy_channel`] without client spans.
pub fn lazy_untraced_channel(
    url: &str,
    request_timeout: Duration,
) -> Result<Channel, PeerUrlError> {
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| PeerUrlError {
        url: url.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(endpoint
        .connect_timeout(Duration::from_secs(2))
        .timeout(request_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// A channel to a peer whose calls get a client span each, with the span's context sent in
/// the request metadata (`traceparent`), so the peer's server span becomes its child.
#[derive(Debug, Clone)]
pub struct TracedChannel {
    inner: Channel,
}

impl TracedChannel {
    /// Wraps `inner`.
    pub fn new(inner: Channel) -> Self {
        TracedChannel { inner }
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for TracedChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        // A client span only under a sampled caller (outside traced work it would start a
        // trace per call). Without one the caller's context still travels, so an unsampled
        // request stays unsampled downstream instead of being sampled anew by the peer.
        let uri = request.uri();
        let mut span = crate::telemetry::ClientSpan::start(|| {
            let full = uri.path().trim_start_matches('/');
            let (service, method) = full.split_once('/').unwrap_or((full, ""));
            let names = |s: &str| crate::telemetry::names::value(s);
            (
                crate::telemetry::names::name(full),
                vec![
                    KeyValue::new("rpc.system", "grpc"),
                    KeyValue::new("rpc.service", names(service)),
                    KeyValue::new("rpc.method", names(method)),
                    KeyValue::new("server.address", names(uri.host().unwrap_or_default())),
                ],
            )
        });
        let cx = span
            .context()
            .unwrap_or_else(opentelemetry::Context::current);
        crate::telemetry::propagation::inject_context(&cx, request.headers_mut());
        let call = tower::Service::call(&mut self.inner, request);
        Box::pin(async move {
            let result = call.await;
            if span.is_recording() {
                let code = match &result {
                    Ok(r) => grpc_status(r.headers()),
                    Err(_) => 14, // UNAVAILABLE: the transport failed.
                };
                span.set_attribute(KeyValue::new("rpc.grpc.status_code", code));
                if code != 0 {
                    span.set_error(format!("gRPC status {code}"));
                }
            }
            result
        })
    }
}
