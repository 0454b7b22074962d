//! The Jaeger query client against a local protocol double: an HTTP server that checks the
//! query parameters the way jaeger-query does and serves Jaeger API JSON from
//! `tests/fixtures/` (Jaeger itself cannot run here).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use loadlab::jaeger::{self, JaegerClient, JaegerError, TraceQuery};

const TRACES: &str = include_str!("fixtures/jaeger_traces.json");
const TRACE: &str = include_str!("fixtures/jaeger_trace.json");
const ERROR: &str = include_str!("fixtures/jaeger_error.json");
const SLOW: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const FAST: &str = "a3ce929d0e0e47364bf92f3577b34da6";

type Seen = Arc<Mutex<Vec<HashMap<String, String>>>>;

fn json(status: StatusCode, body: &'static str) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

async fn search(State(seen): State<Seen>, Query(q): Query<HashMap<String, String>>) -> Response {
    seen.lock().expect("lock").push(q.clone());
    // jaeger-query refuses a search without a service, with its error envelope.
    if q.get("service").is_none_or(String::is_empty) {
        return json(StatusCode::BAD_REQUEST, ERROR);
    }
    let numeric = |k: &str| q.get(k).is_some_and(|v| v.parse::<u64>().is_ok());
    if !(numeric("start") && numeric("end") && numeric("limit")) {
        return json(StatusCode::BAD_REQUEST, ERROR);
    }
    json(StatusCode::OK, TRACES)
}

async fn by_id(Path(id): Path<String>) -> Response {
    if id == SLOW {
        json(StatusCode::OK, TRACE)
    } else {
        json(
            StatusCode::NOT_FOUND,
            r#"{"data":null,"total":0,"limit":0,"offset":0,"errors":[{"code":404,"msg":"trace not found"}]}"#,
        )
    }
}

async fn double() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let app = Router::new()
        .route("/api/traces", get(search))
        .route("/api/traces/{id}", get(by_id))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    (url, seen)
}

#[tokio::test]
async fn finds_the_slowest_traces_of_a_window_and_links_them() {
    let (url, seen) = double().await;
    let client = JaegerClient::new(&format!("{url}/")).expect("client");
    // The fixture's traces start 2 s and 5 s after this instant.
    let run_start = UNIX_EPOCH + Duration::from_micros(1_796_185_032_000_000);
    let query = TraceQuery {
        service: "loadlab".into(),
        start: run_start,
        end: run_start + Duration::from_secs(60),
        min_duration: Some(Duration::from_millis(50)),
        limit: 20,
    };
    let (refs, traces) = client.slowest(&query, run_start).await.expect("query");

    let q = seen.lock().expect("lock").pop().expect("one search");
    assert_eq!(q["service"], "loadlab");
    assert_eq!(q["start"], "1796185032000000");
    assert_eq!(q["end"], "1796185092000000");
    assert_eq!(q["minDuration"], "50ms");
    assert_eq!(q["limit"], "20");

    assert_eq!(traces.len(), 2);
    assert_eq!(refs.len(), 2);
    // Slowest first, timed from the run's start, linked to this Jaeger.
    assert_eq!(refs[0].trace_id, SLOW);
    assert_eq!(refs[0].endpoint, "GET /v1/users/{id}/timeline");
    assert!((refs[0].duration_ms - 812.0).abs() < 1e-9);
    assert!((refs[0].t - 2.0).abs() < 1e-9);
    assert_eq!(
        refs[0].url.as_deref(),
        Some(&*format!("{url}/trace/{SLOW}"))
    );
    assert_eq!(refs[1].trace_id, FAST);
    assert!((refs[1].t - 5.0).abs() < 1e-9);

    // The breakdown groups by service and span name; the Redis span carries an error.
    let breakdown = jaeger::span_breakdown(&traces);
    let redis = breakdown
        .iter()
        .find(|s| s.name == "EVALSHA timeline range")
        .expect("redis row");
    assert_eq!(redis.service, "timeline");
    assert_eq!(redis.count, 1);
    assert_eq!(redis.errors, 1);
    assert!((redis.p99_ms - 805.0).abs() < 1e-9);
    let services: std::collections::BTreeSet<&str> =
        breakdown.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        services.into_iter().collect::<Vec<_>>(),
        ["feed", "loadlab", "timeline"]
    );
    // Parent links survive the flattening.
    let spans = traces
        .iter()
        .find(|t| t.trace_id == SLOW)
        .expect("slow trace")
        .flatten();
    let server = spans
        .iter()
        .find(|s| s.service == "timeline" && s.kind == 2)
        .expect("timeline server span");
    assert_eq!(server.parent_span_id, "2222222222222222");
}

#[tokio::test]
async fn fetches_one_trace_and_reports_jaeger_errors() {
    let (url, _) = double().await;
    let client = JaegerClient::new(&url).expect("client");
    let trace = client.trace(SLOW).await.expect("query").expect("found");
    assert_eq!(trace.trace_id, SLOW);
    let root = trace.root().expect("root");
    assert_eq!(root.span_id, "00f067aa0ba902b7");
    assert_eq!(trace.processes["p2"].service_name, "feed");
    assert!(
        client
            .trace("ffffffffffffffffffffffffffffffff")
            .await
            .expect("query")
            .is_none()
    );

    let bad = TraceQuery {
        service: String::new(),
        start: SystemTime::now() - Duration::from_secs(60),
        end: SystemTime::now(),
        min_duration: None,
        limit: 5,
    };
    match client.find_traces(&bad).await {
        Err(JaegerError::Status {
            status, message, ..
        }) => {
            assert_eq!(status, 400);
            assert!(message.contains("service"), "{message}");
        }
        other => panic!("expected Jaeger's 400, got {other:?}"),
    }
    // Nothing listens there: a transport error, not a panic or a hang.
    let gone = JaegerClient::new("http://127.0.0.1:9").expect("client");
    assert!(matches!(
        gone.trace(SLOW).await,
        Err(JaegerError::Transport { .. })
    ));
}
