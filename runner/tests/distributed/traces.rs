//! Request tracing in a distributed run: every worker samples, sends `traceparent` and keeps its
//! slowest sampled requests; the coordinator merges them and, with a `jaegerUrl`, asks Jaeger
//! (a protocol double serving recorded Jaeger API JSON, since Jaeger cannot run here) for the
//! run's slow traces, links every reference and builds the span breakdown from them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use loadlab::distributed::local;
use loadlab_kit::Shutdown;

use crate::support::{self, SLOW_MS, value};

const TRACES: &str = include_str!("../fixtures/jaeger_traces.json");
/// The recorded slow trace (812 ms, feed → timeline → Redis).
const JAEGER_SLOW: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

type Searches = Arc<Mutex<Vec<HashMap<String, String>>>>;

async fn search(
    State(seen): State<Searches>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    seen.lock().expect("not poisoned").push(q);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        TRACES,
    )
        .into_response()
}

async fn jaeger() -> (String, Searches) {
    let seen: Searches = Arc::default();
    let app = Router::new()
        .route("/api/traces", get(search))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_trace_their_requests_and_the_report_links_the_slowest_to_jaeger() {
    let t = support::target().await;
    let (jaeger_url, searches) = jaeger().await;
    // 40/s for 3 s over 2 workers; worker 0's VUs (ids below 10) are answered slowly.
    let spec = support::spec(
        &format!("{}/vu/{{{{vu}}}}", t.base),
        "  type: constant-arrival-rate\n  rate: 40\n  duration: 3s\n  preAllocatedVUs: 20\n  maxVUs: 20",
        &format!("tracing:\n  sampleRatio: 1\n  jaegerUrl: \"{jaeger_url}\""),
    );
    let opts = support::run_options("traces");
    let workers = local::LocalWorkers {
        count: 2,
        exe: support::loadlab(),
    };
    let outcome = local::run(&spec, &opts, &workers, Shutdown::new())
        .await
        .expect("run");
    let s = &outcome.summary;
    assert_eq!(value(s, "http_reqs", "count"), 120.0);

    // Every request carried a sampled traceparent of its own.
    let sent: BTreeMap<String, bool> = t.seen.traceparents.lock().expect("lock").clone();
    assert_eq!(sent.len(), 120, "one trace per request");
    assert!(sent.values().all(|sampled| *sampled), "sampleRatio 1");

    // Jaeger was asked once, for the generator's traces of the run, at least p99 long.
    let searches = searches.lock().expect("lock").clone();
    assert_eq!(searches.len(), 1, "{searches:?}");
    let q = &searches[0];
    assert_eq!(q["service"], "loadlab");
    assert_eq!(q["limit"], "100");
    let start: u64 = q["start"].parse().expect("start in µs");
    let end: u64 = q["end"].parse().expect("end in µs");
    assert!(start < end, "{q:?}");
    let min_ms: u64 = q["minDuration"]
        .strip_suffix("ms")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("minDuration {:?}", q["minDuration"]));
    let p99 = value(s, "http_req_duration", "p(99)");
    assert_eq!(min_ms, p99.floor() as u64, "minDuration is the run's p99");
    assert!(
        min_ms >= SLOW_MS,
        "half the requests were slow: {min_ms} ms"
    );

    // The workers' slowest sampled requests, merged: up to 3 per second, each a request that
    // was sent, slow (worker 0's), and linked.
    let from_workers: Vec<_> = s
        .traces
        .iter()
        .filter(|r| sent.contains_key(&r.trace_id))
        .collect();
    let mut per_second: BTreeMap<u64, usize> = BTreeMap::new();
    for r in &from_workers {
        *per_second.entry(r.t.floor() as u64).or_default() += 1;
        assert_eq!(r.endpoint, "GET req");
        assert!(r.duration_ms >= SLOW_MS as f64, "{r:?}");
    }
    assert!(
        per_second.values().all(|n| (1..=3).contains(n)),
        "{per_second:?}"
    );
    for second in 1..3 {
        assert!(
            per_second.contains_key(&second),
            "second {second}: {per_second:?}"
        );
    }
    // Jaeger's slow trace joined them.
    let slow = s
        .traces
        .iter()
        .find(|r| r.trace_id == JAEGER_SLOW)
        .expect("Jaeger's slow trace is referenced");
    assert!((slow.duration_ms - 812.0).abs() < 1e-9);
    for r in &s.traces {
        assert_eq!(
            r.url.as_deref(),
            Some(&*format!("{jaeger_url}/trace/{}", r.trace_id)),
            "{r:?}"
        );
    }
    assert!(s.traces.windows(2).all(|w| w[0].t <= w[1].t), "time order");

    // The span breakdown comes from Jaeger's traces.
    for service in ["feed", "timeline"] {
        assert!(
            s.server.spans.iter().any(|row| row.service == service),
            "{service} in {:?}",
            s.server.spans
        );
    }
    // The written report has the same references and breakdown.
    let written = support::written_summary(&opts.out_dir);
    let ids = |s: &loadlab::summary::Summary| {
        s.traces
            .iter()
            .map(|r| (r.trace_id.clone(), r.url.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&written), ids(s));
    assert_eq!(written.server.spans.len(), s.server.spans.len());
    let _ = std::fs::remove_dir_all(&opts.out_dir);
}
