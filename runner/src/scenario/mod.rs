//! Built-in scenarios: what one iteration does, plus the set-up each needs once per run.

use std::time::Duration;

use crate::http_client::{Request, RequestError, Response, VuConnection};
use crate::metrics::{EndpointId, HttpSample, Recorder};

pub mod chat;
pub mod feed;
pub mod http;

/// Sends `request`, records it under `endpoint`, and returns the response when there was one.
///
/// A request fails (k6's `http_req_failed`) on a transport error or a status outside 200–399.
/// `queued` — how late the iteration started behind schedule — is charged to the first request
/// of the iteration only; callers pass `Duration::ZERO` for later ones.
pub async fn send_recorded(
    conn: &mut VuConnection,
    recorder: &Recorder,
    endpoint: EndpointId,
    request: Request,
    queued: Duration,
) -> Result<Response, RequestError> {
    let mut request = request;
    let tracing = crate::tracing_client::active();
    let trace = tracing.as_ref().map(|t| {
        let uri = request.uri.clone();
        // Names are looked up only for sampled requests (the lookup takes a lock).
        t.start(
            || recorder.registry().endpoint_name(endpoint),
            || uri.to_string(),
            &mut request.headers,
        )
    });
    let result = conn.send(request).await;
    let (sample, error) = match &result {
        Ok(r) => (
            HttpSample {
                endpoint,
                status: r.status,
                failed: !(200..400).contains(&r.status),
                queued,
                blocked: r.timings.blocked,
                connecting: r.timings.connecting,
                tls_handshaking: r.timings.tls_handshaking,
                sending: r.timings.sending,
                waiting: r.timings.waiting,
                receiving: r.timings.receiving,
                service: r.timings.duration,
                sent: r.bytes_sent,
                received: r.bytes_received,
            },
            None,
        ),
        Err(e) => (
            HttpSample {
                endpoint,
                status: crate::metrics::error_status(e.kind.as_str()),
                failed: true,
                queued,
                blocked: e.timings.blocked,
                connecting: e.timings.connecting,
                tls_handshaking: e.timings.tls_handshaking,
                sending: e.timings.sending,
                waiting: e.timings.waiting,
                receiving: e.timings.receiving,
                service: e.timings.duration,
                sent: e.bytes_sent,
                received: e.bytes_received,
            },
            Some(e.kind.as_str()),
        ),
    };
    recorder.http(&sample, error);
    if let (Some(tracing), Some(trace)) = (tracing, trace) {
        tracing.finish(trace, endpoint, sample.status, sample.service);
    }
    result
}
