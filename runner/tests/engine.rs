//! The load engine end to end against a real local HTTP target with injected delays, errors and
//! stalls: counts, rates, failure classification, percentiles against known delays, coordinated
//! omission, transport errors, huge responses, thresholds and the exit code.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use loadlab::run::{self, EXIT_THRESHOLDS_FAILED, RunOptions, RunOutcome};
use loadlab::spec::LoadTestSpec;
use loadlab::summary::{Summary, Verdict};
use loadlab_kit::Shutdown;

#[derive(Clone)]
struct Target {
    started: Instant,
}

/// Starts the target; returns its base URL.
async fn target() -> String {
    let state = Arc::new(Target {
        started: Instant::now(),
    });
    let app = Router::new()
        .route("/ok", get(|| async { "ok" }))
        .route(
            "/delay/{ms}",
            get(|Path(ms): Path<u64>| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                "slept"
            }),
        )
        .route(
            "/status/{code}",
            get(|Path(code): Path<u16>| async move {
                StatusCode::from_u16(code).unwrap_or(StatusCode::IM_A_TEAPOT)
            }),
        )
        // Stalls for 1 s every 5 s: requests arriving in the last second of each 5 s window are
        // held until the window ends.
        .route(
            "/stall",
            get(|State(t): State<Arc<Target>>| async move {
                let phase = t.started.elapsed().as_millis() % 5_000;
                if phase >= 4_000 {
                    tokio::time::sleep(Duration::from_millis((5_000 - phase) as u64)).await;
                }
                "ok"
            }),
        )
        .route(
            "/big",
            get(|| async {
                let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
                let stream = futures::stream::iter(
                    (0..128).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
                );
                Body::from_stream(stream)
            }),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

fn out_dir() -> PathBuf {
    std::env::temp_dir().join(format!(
        "loadlab-engine-{}",
        loadlab_kit::test_support::unique_suffix()
    ))
}

async fn run_yaml(yaml: &str) -> RunOutcome {
    let spec = LoadTestSpec::from_yaml(yaml).unwrap_or_else(|e| panic!("spec: {e}\n{yaml}"));
    let opts = RunOptions {
        out_dir: out_dir(),
        progress: false,
        server_processes: vec![("test".into(), std::process::id())],
        run_id: "test".into(),
        insecure_skip_verify: false,
    };
    let outcome = run::run(&spec, &opts, Shutdown::new()).await.expect("run");
    // The report is written and parses back.
    let json = std::fs::read_to_string(opts.out_dir.join("summary.json")).expect("summary.json");
    let parsed: Summary = serde_json::from_str(&json).expect("summary parses");
    assert_eq!(parsed.run.verdict, outcome.summary.run.verdict);
    assert!(
        std::fs::read_to_string(opts.out_dir.join("index.html"))
            .expect("index.html")
            .contains("data-chart")
    );
    let _ = std::fs::remove_dir_all(&opts.out_dir);
    outcome
}

fn value(s: &Summary, metric: &str, key: &str) -> f64 {
    *s.metrics
        .get(metric)
        .unwrap_or_else(|| panic!("no metric {metric}"))
        .values
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {metric}"))
}

fn http_spec(base: &str, requests: &str, executor: &str, extra: &str) -> String {
    format!(
        "scenario:\n  name: http\n  params: {{timeout: 2s}}\n  http:\n    requests:\n{requests}\nexecutor:\n{executor}\n{extra}",
    )
    .replace("BASE", base)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constant_arrival_rate_starts_exactly_the_scheduled_iterations() {
    let base = target().await;
    let yaml = http_spec(
        &base,
        "      - {name: ok, url: BASE/ok, checks: {status: 200}}",
        "  type: constant-arrival-rate\n  rate: 100\n  duration: 3s\n  preAllocatedVUs: 20\n  maxVUs: 50",
        "",
    );
    let s = run_yaml(&yaml).await.summary;
    assert_eq!(value(&s, "iterations", "count"), 300.0);
    assert_eq!(value(&s, "http_reqs", "count"), 300.0);
    assert_eq!(value(&s, "dropped_iterations", "count"), 0.0);
    assert_eq!(value(&s, "checks", "passes"), 300.0);
    let rate = value(&s, "http_reqs", "rate");
    assert!((90.0..=101.0).contains(&rate), "rate {rate}");
    assert_eq!(s.endpoints.len(), 1);
    assert_eq!(s.endpoints[0].endpoint, "GET ok");
    assert_eq!(s.endpoints[0].statuses.get("200"), Some(&300));
    assert!(s.timeseries.points.len() >= 3, "one point per second");
    let per_second: f64 = s.timeseries.points.iter().map(|p| p.rps).sum();
    assert!(
        (270.0..=330.0).contains(&per_second),
        "series sums to the total: {per_second}"
    );
    assert_eq!(s.server.services.len(), 1);
    assert!(s.server.services[0].max_rss_bytes > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constant_vus_percentiles_match_the_known_delay() {
    let base = target().await;
    let yaml = http_spec(
        &base,
        "      - {name: slow, url: BASE/delay/50}",
        "  type: constant-vus\n  vus: 4\n  duration: 2s",
        "",
    );
    let s = run_yaml(&yaml).await.summary;
    let (min, med, p99) = (
        value(&s, "http_req_duration", "min"),
        value(&s, "http_req_duration", "med"),
        value(&s, "http_req_duration", "p(99)"),
    );
    assert!(min >= 50.0, "min {min}");
    assert!((50.0..75.0).contains(&med), "median {med}");
    assert!(p99 < 250.0, "p99 {p99}");
    let n = value(&s, "http_reqs", "count");
    // 4 VUs back to back for 2 s at ~50 ms each.
    assert!((100.0..=165.0).contains(&n), "{n} requests");
    assert_eq!(value(&s, "vus_max", "value"), 4.0);
    // Keep-alive: only the first request of each VU connects.
    assert!(value(&s, "http_req_connecting", "med") < 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_classified_and_thresholds_fail_the_run() {
    let base = target().await;
    let yaml = http_spec(
        &base,
        "      - {name: ok, url: BASE/ok, weight: 2}\n      - {name: error, url: BASE/status/500, weight: 1}\n      - {name: missing, url: BASE/status/404, weight: 1}\n      - {name: redirect, url: BASE/status/304, weight: 1}",
        "  type: shared-iterations\n  vus: 4\n  iterations: 500",
        "thresholds:\n  http_req_failed: ['rate<0.01']\n  'http_req_duration{status:200}': ['p(95)<1000']\n  'http_reqs{endpoint:GET ok}': ['count>10']",
    );
    let outcome = run_yaml(&yaml).await;
    let s = &outcome.summary;
    assert_eq!(value(s, "http_reqs", "count"), 500.0);
    let by_name = |n: &str| {
        s.endpoints
            .iter()
            .find(|e| e.endpoint == n)
            .unwrap_or_else(|| panic!("{n}"))
    };
    let (ok, error, missing, redirect) = (
        by_name("GET ok"),
        by_name("GET error"),
        by_name("GET missing"),
        by_name("GET redirect"),
    );
    assert_eq!(
        ok.requests + error.requests + missing.requests + redirect.requests,
        500
    );
    assert_eq!(error.failed, error.requests);
    assert_eq!(missing.failed, missing.requests);
    assert_eq!(
        ok.failed + redirect.failed,
        0,
        "2xx and 3xx are not failures"
    );
    assert_eq!(error.statuses.get("500"), Some(&error.requests));
    let failed = (error.requests + missing.requests) as f64;
    assert_eq!(value(s, "http_req_failed", "passes"), failed);
    assert!((value(s, "http_req_failed", "rate") - failed / 500.0).abs() < 1e-9);
    // Thresholds: the failure rate fails, the tagged ones hold, the sub-metrics are reported.
    assert_eq!(s.run.verdict, Verdict::Fail);
    assert_eq!(outcome.exit_code, EXIT_THRESHOLDS_FAILED);
    let t = |m: &str| {
        s.thresholds
            .iter()
            .find(|t| t.metric == m)
            .unwrap_or_else(|| panic!("{m}"))
    };
    assert!(!t("http_req_failed").ok);
    assert!(t("http_req_duration{status:200}").ok);
    assert_eq!(
        t("http_reqs{endpoint:GET ok}").actual,
        Some(ok.requests as f64)
    );
    assert!(s.metrics.contains_key("http_req_duration{status:200}"));
    assert!(
        s.run
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("http_req_failed")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalling_target_shows_in_latency_from_the_intended_start_but_not_in_service_time() {
    let base = target().await;
    // 4 VUs cannot keep 200/s going through a 1 s stall: iterations wait (maxLateness) and their
    // latency counts from when they should have started.
    let yaml = http_spec(
        &base,
        "      - {name: stall, url: BASE/stall}",
        "  type: constant-arrival-rate\n  rate: 200\n  duration: 10s\n  preAllocatedVUs: 4\n  maxVUs: 4\n  maxLateness: 5s",
        "",
    );
    let s = run_yaml(&yaml).await.summary;
    let n = value(&s, "http_reqs", "count");
    assert!(n >= 1_900.0, "{n} requests");
    let p99 = value(&s, "http_req_duration", "p(99)");
    let service_p99 = value(&s, "http_req_service_duration", "p(99)");
    assert!(
        p99 >= 500.0,
        "p99 from the intended start is {p99} ms: the stall must show"
    );
    assert!(
        service_p99 < 100.0,
        "raw service time p99 is {service_p99} ms: only a few requests were in flight during the stalls"
    );
    assert_eq!(value(&s, "dropped_iterations", "count"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_max_lateness_busy_vus_mean_dropped_iterations() {
    let base = target().await;
    let yaml = http_spec(
        &base,
        "      - {name: slow, url: BASE/delay/200}",
        "  type: constant-arrival-rate\n  rate: 50\n  duration: 2s\n  preAllocatedVUs: 2\n  maxVUs: 2",
        "",
    );
    let s = run_yaml(&yaml).await.summary;
    let (done, dropped) = (
        value(&s, "iterations", "count"),
        value(&s, "dropped_iterations", "count"),
    );
    // Two VUs at 200 ms each manage ~10/s of the 50/s asked.
    assert!(dropped >= 60.0, "dropped {dropped}");
    assert_eq!(
        done + dropped,
        100.0,
        "every scheduled start is either run or dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_errors_are_classified_by_kind() {
    let base = target().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let yaml = http_spec(
        &base,
        &format!(
            "      - {{name: slow, url: BASE/delay/3000}}\n      - {{name: refused, url: 'http://127.0.0.1:{closed}/x'}}\n      - {{name: nxdomain, url: 'http://does-not-exist.invalid/x'}}\n      - {{name: big, url: BASE/big, checks: {{status: 200, bodyContains: xxxx}}}}"
        ),
        "  type: per-vu-iterations\n  vus: 2\n  iterations: 8",
        "",
    )
    .replace("timeout: 2s", "timeout: 300ms");
    let s = run_yaml(&yaml).await.summary;
    assert_eq!(value(&s, "http_reqs", "count"), 16.0);
    let find = |n: &str| s.endpoints.iter().find(|e| e.endpoint == n);
    if let Some(e) = find("GET slow") {
        assert_eq!(e.statuses.get("timeout"), Some(&e.requests), "{e:?}");
    }
    if let Some(e) = find("GET refused") {
        assert_eq!(
            e.statuses.get("connect_refused"),
            Some(&e.requests),
            "{e:?}"
        );
    }
    if let Some(e) = find("GET nxdomain") {
        assert_eq!(e.statuses.get("dns"), Some(&e.requests), "{e:?}");
    }
    let big = find("GET big").expect("some big responses in 16 weighted picks");
    assert_eq!(big.failed, 0);
    assert!(value(&s, "data_received", "count") >= big.requests as f64 * 8.0 * 1_048_576.0);
    assert_eq!(
        value(&s, "checks", "fails"),
        0.0,
        "the 8 MiB body was checked (first MiB kept)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ramping_vus_follow_the_stages() {
    let base = target().await;
    let yaml = http_spec(
        &base,
        "      - {name: slow, url: BASE/delay/20}",
        "  type: ramping-vus\n  startVUs: 0\n  stages: [{duration: 1s, target: 6}, {duration: 1s, target: 6}, {duration: 1s, target: 0}]",
        "",
    );
    let s = run_yaml(&yaml).await.summary;
    assert_eq!(value(&s, "vus_max", "value"), 6.0);
    let peak = s.timeseries.points.iter().map(|p| p.vus).max().unwrap_or(0);
    assert_eq!(peak, 6, "{:?}", s.timeseries.points);
    // Ramp up and down average 3 VUs for 2 s, plus 6 VUs for 1 s: ~12 VU-seconds at ~20 ms.
    let n = value(&s, "iterations", "count");
    assert!((350.0..=650.0).contains(&n), "{n} iterations");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_cuts_off_iterations_that_run_too_long() {
    let base = target().await;
    let yaml = http_spec(
        &base,
        "      - {name: slow, url: BASE/delay/1500}",
        "  type: constant-vus\n  vus: 3\n  duration: 500ms\n  gracefulStop: 200ms",
        "",
    )
    .replace("timeout: 2s", "timeout: 10s");
    let started = Instant::now();
    let s = run_yaml(&yaml).await.summary;
    assert!(
        started.elapsed() < Duration::from_millis(1_400),
        "stopped after gracefulStop, not after the request"
    );
    assert_eq!(s.run.interrupted_iterations, 3);
    assert_eq!(value(&s, "iterations", "count"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_request_ends_the_run_early_and_says_so() {
    let base = target().await;
    let yaml = http_spec(
        &base,
        "      - {name: ok, url: BASE/ok}",
        "  type: constant-arrival-rate\n  rate: 50\n  duration: 30s\n  preAllocatedVUs: 5",
        "",
    );
    let spec = LoadTestSpec::from_yaml(&yaml).expect("spec");
    let stop = Shutdown::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            stop.trigger();
        });
    }
    let opts = RunOptions {
        out_dir: out_dir(),
        progress: false,
        server_processes: Vec::new(),
        run_id: "stop".into(),
        insecure_skip_verify: false,
    };
    let started = Instant::now();
    let s = run::run(&spec, &opts, stop).await.expect("run").summary;
    assert!(started.elapsed() < Duration::from_secs(5));
    let n = value(&s, "iterations", "count");
    assert!((50.0..=100.0).contains(&n), "{n}");
    assert!(
        s.run
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("stopped before the end"),
        "{:?}",
        s.run.reason
    );
    let _ = std::fs::remove_dir_all(&opts.out_dir);
}
