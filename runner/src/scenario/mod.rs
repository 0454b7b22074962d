//! Built-in scenarios: what one iteration does, plus the set-up each needs once per run.

use std::time::Duration;

use crate::http_client::{Request, RequestError, Response, VuConnection};
use crate::metrics::{EndpointId, HttpSample, Recorder};

pub mod chat;
pub mod feed;
pub mod http;

/// A short tag for the names set-up creates (user handles, channel names), derived from the
/// whole run id so that runs against one target never collide: a prefix of the id would be the
/// same for every run of the same day. Ten base-36 characters of a 64-bit FNV-1a hash fit the
/// handle rules (`a-z0-9_`, at most 32 characters with the user's index).
pub fn run_tag(run_id: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in run_id.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    (0..10)
        .map(|_| {
            let d = digits[(hash % 36) as usize] as char;
            hash /= 36;
            d
        })
        .collect()
}

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

#[cfg(test)]
mod tag_tests {
    use super::run_tag;

    #[test]
    fn run_tags_differ_for_runs_of_the_same_day_and_are_stable() {
        let a = run_tag("run20261202041706");
        let b = run_tag("run20261202041707");
        assert_ne!(a, b);
        assert_eq!(a, run_tag("run20261202041706"));
        assert_eq!(a.len(), 10);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase())
        );
    }
}
