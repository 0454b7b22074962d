//! `loadlab demo`: the embedded stack in a child process (so its CPU and memory are measured
//! apart from the generator's), a seeded feed, a ~30 s `feed-mixed` run, and the report.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use loadlab_kit::Shutdown;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::run::{self, RunOptions, RunOutcome};
use crate::spec::{
    ExecutorSpec, LoadTestSpec, OnWorkerLoss, RampingArrivalRate, ScenarioName, ScenarioParams,
    ScenarioSpec, Stage,
};

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The embedded stack did not start.
    #[error("starting the embedded stack: {0}")]
    Stack(String),
    /// The run failed.
    #[error(transparent)]
    Run(#[from] run::RunError),
}

/// The demo's load test against `feed`.
pub fn demo_spec(feed: &str, duration: Duration) -> LoadTestSpec {
    let secs = duration.as_secs().max(6);
    let ramp = (secs / 3).max(1);
    let hold = secs.saturating_sub(ramp * 2).max(1);
    LoadTestSpec {
        target: BTreeMap::from([("feed".to_owned(), feed.to_owned())]),
        scenario: ScenarioSpec {
            name: ScenarioName::FeedMixed,
            params: ScenarioParams {
                users: 300,
                follows_per_user: 20,
                celebrities: 5,
                posts_per_user: 3,
                ..ScenarioParams::default()
            },
            http: None,
        },
        executor: ExecutorSpec::RampingArrivalRate(RampingArrivalRate {
            start_rate: 20,
            time_unit: Duration::from_secs(1),
            stages: vec![
                Stage {
                    duration: Duration::from_secs(ramp),
                    target: 300,
                },
                Stage {
                    duration: Duration::from_secs(hold),
                    target: 300,
                },
                Stage {
                    duration: Duration::from_secs(ramp),
                    target: 50,
                },
            ],
            pre_allocated_vus: 50,
            max_vus: 400,
            max_lateness: Duration::ZERO,
            graceful_stop: Duration::from_secs(10),
        }),
        workers: 1,
        thresholds: BTreeMap::from([
            ("http_req_duration".to_owned(), vec!["p(95)<200".to_owned()]),
            ("http_req_failed".to_owned(), vec!["rate<0.01".to_owned()]),
        ]),
        on_worker_loss: OnWorkerLoss::Fail,
        tracing: None,
        worker_template: None,
        coordinator_template: None,
        start_timeout_seconds: None,
        ttl_seconds_after_finished: None,
        abort: false,
    }
}

/// A running `loadlab up` child.
struct StackProcess {
    child: Child,
    feed_url: String,
    dir: PathBuf,
}

impl StackProcess {
    async fn start(otlp_endpoint: &str) -> Result<StackProcess, DemoError> {
        let exe = std::env::current_exe().map_err(|e| DemoError::Stack(e.to_string()))?;
        let dir = std::env::temp_dir().join(format!("loadlab-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| DemoError::Stack(format!("{}: {e}", dir.display())))?;
        let db = dir.join("demo.db");
        let _ = std::fs::remove_file(&db);
        let mut child = Command::new(exe)
            .args([
                "up",
                "--engine",
                "memory",
                "--base-port",
                "0",
                "--database-url",
                &format!("sqlite://{}?mode=rwc", db.display()),
                // Cheap hashing so set-up signs up hundreds of users in seconds (a lab, not
                // production); celebrities above 100 followers are merged on read.
                "--service-flag=--password-memory-kib=1024",
                "--service-flag=--password-iterations=1",
                "--service-flag=--celebrity-threshold=100",
            ])
            .env("LOADLAB_LOG", "warn")
            // The services export spans and metrics to the demo's embedded receiver; sampling
            // follows the generator's traceparent.
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_endpoint)
            // Requests carry the generator's decision; work without a traceparent (fan-out
            // of unsampled posts, heartbeats, sweeps) is traced only when linked to a sampled
            // trace.
            .env("LOADLAB_TRACE_SAMPLE_RATIO", "0")
            // A short run wants more than the default one point per 5 s of server figures.
            .env("OTEL_METRIC_EXPORT_INTERVAL", "1000")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| DemoError::Stack(e.to_string()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| DemoError::Stack("no stdout".into()))?;
        let mut lines = BufReader::new(stdout).lines();
        let feed_url = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.strip_prefix("feed").map(str::trim)
                    && url.starts_with("http://")
                {
                    return Some(url.to_owned());
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| DemoError::Stack("the stack did not report its feed address".into()))?;
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let stack = StackProcess {
            child,
            feed_url,
            dir,
        };
        stack.wait_ready().await?;
        Ok(stack)
    }

    async fn wait_ready(&self) -> Result<(), DemoError> {
        let client = crate::http_client::Client::new(crate::http_client::ClientConfig::default());
        let mut conn = client.connection();
        for _ in 0..200 {
            let request = crate::http_client::Request {
                method: http::Method::GET,
                uri: format!("{}/readyz", self.feed_url)
                    .parse()
                    .map_err(|e| DemoError::Stack(format!("{e}")))?,
                headers: http::HeaderMap::new(),
                body: bytes::Bytes::new(),
            };
            if matches!(conn.send(request).await, Ok(r) if r.status == 200) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(DemoError::Stack("the stack never became ready".into()))
    }

    async fn stop(mut self) {
        // SIGTERM for a graceful stop (std offers only SIGKILL without libc).
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Fraction of the demo's requests traced end to end.
pub const DEMO_SAMPLE_RATIO: f64 = 0.05;

/// Runs the demo; the report goes to `out_dir`.
pub async fn demo(
    out_dir: PathBuf,
    duration: Duration,
    progress: bool,
    stop: Shutdown,
) -> Result<RunOutcome, DemoError> {
    println!("starting the embedded stack (memory engine, SQLite) …");
    let receiver = crate::otlp::Receiver::start(([127, 0, 0, 1], 0).into())
        .await
        .map_err(|e| DemoError::Stack(format!("OTLP receiver: {e}")))?;
    let stack = StackProcess::start(&receiver.endpoint()).await?;
    println!(
        "feed is at {}; seeding and running feed-mixed for {}s",
        stack.feed_url,
        duration.as_secs()
    );
    let mut spec = demo_spec(&stack.feed_url, duration);
    spec.tracing = Some(crate::spec::TracingSpec {
        sample_ratio: DEMO_SAMPLE_RATIO,
        otlp_endpoint: Some(receiver.endpoint()),
        jaeger_url: None,
    });
    let pid = stack.child.id().unwrap_or(0);
    let opts = RunOptions {
        out_dir,
        progress,
        server_processes: vec![("loadlab up (feed + timeline)".to_owned(), pid)],
        run_id: format!("demo{}", chrono::Utc::now().format("%H%M%S")),
        insecure_skip_verify: false,
    };
    let outcome = run::run(&spec, &opts, stop).await;
    // Stopping the stack flushes its last spans and metrics to the receiver.
    stack.stop().await;
    let mut outcome = outcome?;
    crate::otlp::report::enrich(&mut outcome.summary, receiver.received());
    receiver.stop().await;
    run::write_report(&outcome.summary, &opts)?;
    Ok(outcome)
}
