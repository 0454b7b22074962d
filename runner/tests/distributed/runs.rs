//! Whole runs with several worker processes.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use loadlab::distributed::{EXIT_RUN_INCOMPLETE, local};
use loadlab::run::EXIT_THRESHOLDS_FAILED;
use loadlab::summary::Verdict;
use loadlab_kit::Shutdown;
use tokio::process::Command;

use crate::support::{self, SLOW_BELOW, SLOW_MS, value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_merge_exactly_start_together_and_meet_thresholds_on_merged_data() {
    let t = support::target().await;
    // 60 iterations/s for 3 s over 3 workers: 20/s each. Each worker has VUs 10k..10k+10, and
    // the target answers VUs 0..10 (worker 0's) slowly: a third of the requests are slow, so only
    // the merged data has a fast median and a slow 90th percentile.
    let spec = support::spec(
        &format!("{}/vu/{{{{vu}}}}", t.base),
        "  type: constant-arrival-rate\n  rate: 60\n  duration: 3s\n  preAllocatedVUs: 30\n  maxVUs: 30",
        "thresholds:\n  http_req_duration: [\"p(50)<15\", \"p(90)<15\"]\n  http_reqs: [\"count==180\"]",
    );
    let opts = support::run_options("merge");
    let workers = local::LocalWorkers {
        count: 3,
        exe: support::loadlab(),
    };
    let outcome = local::run(&spec, &opts, &workers, Shutdown::new())
        .await
        .expect("run");
    let s = &outcome.summary;
    assert_eq!(
        value(s, "iterations", "count"),
        180.0,
        "every scheduled start"
    );
    assert_eq!(value(s, "http_reqs", "count"), 180.0);
    assert_eq!(value(s, "dropped_iterations", "count"), 0.0);
    assert_eq!(t.seen.requests.load(Ordering::Relaxed), 180);
    let d = s.run.distributed.as_ref().expect("distributed section");
    assert_eq!(s.run.workers, 3);
    assert_eq!(d.workers.len(), 3);
    for w in &d.workers {
        assert_eq!(w.requests, 60, "worker {}: its share", w.index);
        assert!(w.start_offset_ms.is_some(), "worker {} start", w.index);
        assert!(!w.lost);
    }
    let total: u64 = d.workers.iter().map(|w| w.requests).sum();
    assert_eq!(total as f64, value(s, "http_reqs", "count"));
    let skew = d.start_skew_ms.expect("skew measured");
    assert!((0.0..1_000.0).contains(&skew), "start skew {skew} ms");
    assert!(d.scheduled_start.is_some());
    assert!(d.reports >= 9, "{} reports", d.reports);
    // VU ids are disjoint per worker: each worker's range shows up, nothing outside them.
    let vus = t.seen.vus.lock().expect("not poisoned").clone();
    assert!(vus.keys().all(|id| *id < 30), "{vus:?}");
    for k in 0..3 {
        assert!(
            vus.keys().any(|id| id / 10 == k),
            "worker {k}'s VUs missing: {vus:?}"
        );
    }
    let slow: u64 = vus
        .iter()
        .filter(|(id, _)| **id < SLOW_BELOW)
        .map(|(_, n)| n)
        .sum();
    assert_eq!(slow, 60, "worker 0 sent its 60 requests with its own VUs");
    // Thresholds on the merged histogram.
    let find = |expr: &str| {
        s.thresholds
            .iter()
            .find(|t| t.expr == expr)
            .unwrap_or_else(|| panic!("threshold {expr}"))
    };
    assert!(find("p(50)<15").ok, "{:?}", find("p(50)<15"));
    let p90 = find("p(90)<15");
    assert!(!p90.ok);
    assert!(
        p90.actual.expect("measured") >= SLOW_MS as f64,
        "{:?}",
        p90.actual
    );
    assert!(find("count==180").ok);
    assert_eq!(s.run.verdict, Verdict::Fail);
    assert_eq!(outcome.exit_code, EXIT_THRESHOLDS_FAILED);
    // One point per second from the merged intervals.
    let per_second: f64 = s.timeseries.points.iter().map(|p| p.rps).sum();
    assert!((150.0..=210.0).contains(&per_second), "{per_second}");
    let written = support::written_summary(&opts.out_dir);
    let back = written
        .run
        .distributed
        .expect("distributed section written");
    assert_eq!(back.workers.len(), 3);
    assert_eq!(back.scheduled_start, d.scheduled_start);
    let _ = std::fs::remove_dir_all(&opts.out_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadlab_run_with_workers_spawns_them_and_writes_the_usual_report() {
    let t = support::target().await;
    let out = support::out_dir("cli");
    let status = Command::new(support::loadlab())
        .args(["run", "--quiet", "--workers", "2", "--scenario", "http"])
        .args(["--url", &format!("{}/ok", t.base)])
        .args(["--rate", "20", "--duration", "2s"])
        .args(["--threshold", "http_reqs:count==40"])
        .arg("--out")
        .arg(&out)
        .env("LOADLAB_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .expect("loadlab run");
    assert!(status.success(), "{status}");
    let s = support::written_summary(&out);
    assert_eq!(s.run.workers, 2);
    assert_eq!(value(&s, "http_reqs", "count"), 40.0);
    assert!(s.thresholds.iter().all(|t| t.ok));
    assert_eq!(s.run.distributed.expect("distributed").workers.len(), 2);
    let _ = std::fs::remove_dir_all(&out);
}

/// Runs 3 workers at 30/s for `duration` and kills worker 1 once the target saw `after`
/// requests; the outcome and how long the run took.
async fn kill_worker_one(policy: &str, duration: &str) -> (loadlab::run::RunOutcome, Duration) {
    let t = support::target().await;
    let spec = support::spec(
        &format!("{}/ok", t.base),
        &format!(
            "  type: constant-arrival-rate\n  rate: 30\n  duration: {duration}\n  preAllocatedVUs: 6"
        ),
        &format!("onWorkerLoss: {policy}"),
    );
    let opts = support::run_options(&format!("loss-{policy}"));
    let coordinator = support::coordinator(&spec, opts.clone(), 3).await;
    let url = format!("http://{}", coordinator.local_addr());
    let mut children: Vec<_> = (0..3).map(|i| support::worker(&url, i, 3)).collect();
    let started = Instant::now();
    let victim = children.remove(1);
    let seen = t.seen.clone();
    let kill = async move {
        support::until_requests(&seen, 30, Duration::from_secs(20)).await;
        let mut victim = victim;
        victim.start_kill().expect("kill worker 1");
        let _ = victim.wait().await;
    };
    let (outcome, ()) = tokio::join!(coordinator.run(Shutdown::new()), kill);
    let elapsed = started.elapsed();
    for child in children {
        let (status, stderr) = support::finished(child, Duration::from_secs(10)).await;
        assert!(status.success(), "surviving worker: {status} {stderr}");
    }
    let _ = std::fs::remove_dir_all(&opts.out_dir);
    (outcome.expect("run"), elapsed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_fails_the_run_naming_it_by_default() {
    let (outcome, elapsed) = kill_worker_one("fail", "30s").await;
    let s = &outcome.summary;
    assert_eq!(outcome.exit_code, EXIT_RUN_INCOMPLETE);
    assert_eq!(s.run.verdict, Verdict::Fail);
    let reason = s.run.reason.as_deref().unwrap_or_default();
    assert!(reason.contains("worker 1 lost"), "{reason}");
    let d = s.run.distributed.as_ref().expect("distributed");
    assert_eq!(d.lost_workers.len(), 1);
    assert_eq!(d.lost_workers[0].index, 1);
    assert!(!d.lost_workers[0].reason.is_empty());
    assert!(d.workers[1].lost && !d.workers[0].lost && !d.workers[2].lost);
    assert!(!s.run.degraded);
    // The others were stopped at once rather than running out their 30 s.
    assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_under_continue_finishes_degraded_with_the_loss_recorded() {
    let (outcome, _) = kill_worker_one("continue", "4s").await;
    let s = &outcome.summary;
    assert_eq!(outcome.exit_code, 0, "{:?}", s.run.reason);
    assert_eq!(s.run.verdict, Verdict::Pass);
    assert!(s.run.degraded);
    let reason = s.run.reason.as_deref().unwrap_or_default();
    assert!(reason.contains("lost worker 1"), "{reason}");
    let d = s.run.distributed.as_ref().expect("distributed");
    assert_eq!(d.lost_workers.len(), 1);
    assert_eq!(d.lost_workers[0].index, 1);
    assert!(d.lost_workers[0].at_s < 4.0, "{:?}", d.lost_workers[0]);
    // The survivors ran their whole share: 10/s for 4 s each.
    assert_eq!(d.workers[0].requests, 40);
    assert_eq!(d.workers[2].requests, 40);
    assert!(d.workers[1].requests < 40);
    let total: u64 = d.workers.iter().map(|w| w.requests).sum();
    assert_eq!(total as f64, value(s, "http_reqs", "count"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_stop_their_load_within_seconds_when_the_coordinator_dies() {
    let t = support::target().await;
    let dir = support::out_dir("orphans");
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("spec.yaml");
    std::fs::write(
        &file,
        format!(
            "scenario:\n  name: http\n  http:\n    requests:\n      - {{name: ok, url: \"{}/ok\"}}\nexecutor:\n  type: constant-arrival-rate\n  rate: 40\n  duration: 60s\n  preAllocatedVUs: 4\nworkers: 2\n",
            t.base
        ),
    )
    .expect("spec");
    let mut coordinator = Command::new(support::loadlab())
        .args([
            "coordinator",
            "--quiet",
            "--listen",
            "127.0.0.1:0",
            "--run",
            "orphans",
        ])
        .arg("-f")
        .arg(&file)
        .arg("--out")
        .arg(dir.join("report"))
        .env("LOADLAB_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("coordinator");
    let stdout = coordinator.stdout.take().expect("stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("coordinator announces itself")
        .expect("read")
        .expect("a line");
    let addr = line.rsplit(' ').next().expect("address").to_owned();
    assert!(line.contains("listening on"), "{line}");
    let url = format!("http://{addr}");
    let workers: Vec<_> = (0..2).map(|i| support::worker(&url, i, 2)).collect();
    support::until_requests(&t.seen, 40, Duration::from_secs(20)).await;
    coordinator.start_kill().expect("kill the coordinator");
    let killed = Instant::now();
    for w in workers {
        let (status, stderr) = support::finished(w, Duration::from_secs(5)).await;
        assert!(!status.success(), "an orphaned worker exits non-zero");
        assert!(stderr.contains("lost the coordinator"), "{stderr}");
    }
    assert!(killed.elapsed() < Duration::from_secs(5));
    // And no more load arrives.
    let after = t.seen.requests.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(t.seen.requests.load(Ordering::Relaxed), after);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_reaches_every_worker_and_in_flight_iterations_finish() {
    let t = support::target().await;
    // Every iteration takes 400 ms: a stop always finds some in flight.
    let spec = support::spec(
        &format!("{}/delay/400", t.base),
        "  type: constant-vus\n  vus: 4\n  duration: 30s\n  gracefulStop: 5s",
        "",
    );
    let opts = support::run_options("stop");
    let coordinator = support::coordinator(&spec, opts.clone(), 2).await;
    let url = format!("http://{}", coordinator.local_addr());
    let workers: Vec<_> = (0..2).map(|i| support::worker(&url, i, 2)).collect();
    let stop = Shutdown::new();
    let trigger = {
        let stop = stop.clone();
        let seen = t.seen.clone();
        async move {
            support::until_requests(&seen, 8, Duration::from_secs(20)).await;
            tokio::time::sleep(Duration::from_millis(150)).await;
            stop.trigger();
        }
    };
    let started = Instant::now();
    let (outcome, ()) = tokio::join!(coordinator.run(stop), trigger);
    let outcome = outcome.expect("run");
    assert!(started.elapsed() < Duration::from_secs(15));
    for w in workers {
        let (status, stderr) = support::finished(w, Duration::from_secs(10)).await;
        assert!(status.success(), "{status} {stderr}");
    }
    let s = &outcome.summary;
    let reason = s.run.reason.as_deref().unwrap_or_default();
    assert!(reason.contains("stopped before the end"), "{reason}");
    // Graceful stop honoured: the in-flight requests completed and were counted.
    assert_eq!(s.run.interrupted_iterations, 0);
    assert_eq!(
        value(s, "http_reqs", "count") as u64,
        t.seen.requests.load(Ordering::Relaxed)
    );
    assert_eq!(value(s, "http_req_failed", "passes"), 0.0);
    let d = s.run.distributed.as_ref().expect("distributed");
    assert!(d.lost_workers.is_empty(), "{:?}", d.lost_workers);
    let _ = std::fs::remove_dir_all(&opts.out_dir);
}
