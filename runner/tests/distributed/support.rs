//! A local target that records what the workers send, the coordinator in this process, and
//! worker processes of the real `loadlab` binary.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::get;
use loadlab::distributed::coordinator::{Coordinator, CoordinatorOptions};
use loadlab::run::RunOptions;
use loadlab::spec::LoadTestSpec;
use loadlab::summary::Summary;
use tokio::process::{Child, Command};

/// VU ids below this get slow answers (in the tests, the VUs of worker 0).
pub const SLOW_BELOW: u64 = 10;
/// How slow, ms.
pub const SLOW_MS: u64 = 30;

/// What the target saw.
#[derive(Default)]
pub struct Seen {
    /// Requests answered.
    pub requests: AtomicU64,
    /// Requests per VU id (`/vu/{id}`).
    pub vus: Mutex<BTreeMap<u64, u64>>,
    /// `traceparent` trace ids sent to `/vu/{id}`, with their sampled flag.
    pub traceparents: Mutex<BTreeMap<String, bool>>,
}

/// A running target.
pub struct Target {
    /// Base URL.
    pub base: String,
    /// What it saw.
    pub seen: Arc<Seen>,
}

/// Starts the target: `/ok`, `/vu/{id}` (slow for ids below [`SLOW_BELOW`]), `/delay/{ms}`.
pub async fn target() -> Target {
    let seen = Arc::new(Seen::default());
    let app = Router::new()
        .route(
            "/ok",
            get(|State(s): State<Arc<Seen>>| async move {
                s.requests.fetch_add(1, Ordering::Relaxed);
                "ok"
            }),
        )
        .route(
            "/vu/{id}",
            get(
                |State(s): State<Arc<Seen>>, Path(id): Path<u64>, headers: HeaderMap| async move {
                    s.requests.fetch_add(1, Ordering::Relaxed);
                    *s.vus.lock().expect("not poisoned").entry(id).or_default() += 1;
                    let tp = headers
                        .get("traceparent")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    // `00-<trace id>-<span id>-<flags>`
                    if let Some(tp) = tp {
                        let parts: Vec<&str> = tp.split('-').collect();
                        if let [_, trace, _, flags] = parts[..] {
                            s.traceparents
                                .lock()
                                .expect("not poisoned")
                                .insert(trace.to_owned(), flags == "01");
                        }
                    }
                    if id < SLOW_BELOW {
                        tokio::time::sleep(Duration::from_millis(SLOW_MS)).await;
                    }
                    "ok"
                },
            ),
        )
        .route(
            "/delay/{ms}",
            get(
                |State(s): State<Arc<Seen>>, Path(ms): Path<u64>| async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    s.requests.fetch_add(1, Ordering::Relaxed);
                    "slept"
                },
            ),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Target {
        base: format!("http://{addr}"),
        seen,
    }
}

/// An `http` scenario spec of one request to `url`, with `executor` (YAML lines) and `extra`.
pub fn spec(url: &str, executor: &str, extra: &str) -> LoadTestSpec {
    let yaml = format!(
        "scenario:\n  name: http\n  params: {{timeout: 5s}}\n  http:\n    requests:\n      - {{name: req, url: \"{url}\"}}\nexecutor:\n{executor}\n{extra}"
    );
    LoadTestSpec::from_yaml(&yaml).unwrap_or_else(|e| panic!("spec: {e}\n{yaml}"))
}

/// A fresh report directory.
pub fn out_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "loadlab-dist-{name}-{}",
        loadlab_kit::test_support::unique_suffix()
    ))
}

/// Run options for a test run.
pub fn run_options(name: &str) -> RunOptions {
    RunOptions {
        out_dir: out_dir(name),
        progress: false,
        server_processes: Vec::new(),
        run_id: format!("test-{name}"),
        insecure_skip_verify: false,
    }
}

/// The `loadlab` binary under test.
pub fn loadlab() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_loadlab"))
}

/// A coordinator in this process on a loopback port.
pub async fn coordinator(spec: &LoadTestSpec, opts: RunOptions, workers: u32) -> Coordinator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    Coordinator::start(
        spec,
        CoordinatorOptions {
            run: opts,
            workers,
            start_lead: Duration::from_millis(300),
        },
        listener,
    )
    .await
    .expect("coordinator starts")
}

/// `loadlab worker` for `url`, index `index` of `total` (stderr piped for assertions).
pub fn worker(url: &str, index: u32, total: u32) -> Child {
    Command::new(loadlab())
        .args(["worker", "--coordinator", url, "--connect-timeout", "5s"])
        .args(["--index", &index.to_string(), "--total", &total.to_string()])
        .env("LOADLAB_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("worker starts")
}

/// Waits for a worker to exit; its status and stderr.
pub async fn finished(child: Child, within: Duration) -> (std::process::ExitStatus, String) {
    let out = tokio::time::timeout(within, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("worker did not exit within {within:?}"))
        .expect("wait");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits until the target has answered `n` requests.
pub async fn until_requests(seen: &Seen, n: u64, within: Duration) {
    tokio::time::timeout(within, async {
        while seen.requests.load(Ordering::Relaxed) < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the target did not see {n} requests within {within:?}"));
}

/// A metric value of a summary.
pub fn value(s: &Summary, metric: &str, key: &str) -> f64 {
    *s.metrics
        .get(metric)
        .unwrap_or_else(|| panic!("no metric {metric}"))
        .values
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {metric}"))
}

/// The summary written to `dir`, parsed back.
pub fn written_summary(dir: &std::path::Path) -> Summary {
    let json = std::fs::read_to_string(dir.join("summary.json")).expect("summary.json");
    assert!(
        std::fs::read_to_string(dir.join("index.html"))
            .expect("index.html")
            .contains("data-chart")
    );
    serde_json::from_str(&json).expect("summary parses")
}
