//! The coordinator's merge cost, for `benches/distributed.sh` (ignored in normal test runs):
//! a `loadlab coordinator` process, and this process as 200 workers that speak the real
//! protocol and stream realistic reports (three endpoints, a few statuses, about 1 000 samples
//! each) as fast as the coordinator takes them. Prints the coordinator's CPU per 1 000
//! reports/s. Many workers with few reports each, because that is the shape of 1 000
//! reports/s in a real run (a worker reports once a second): the per-interval work is shared
//! by many reports, as it would be.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use loadlab::distributed::VERSION;
use loadlab::distributed::codec::{ReportMeta, encode_report};
use loadlab::metrics::{Buffer, HttpSample, Registry};
use loadlab_proto::runner::v1 as pb;
use pb::coordinator_client::CoordinatorClient;
use pb::worker_message::Kind;
use tokio::process::Command;

use crate::support;

const WORKERS: u32 = 200;
const REPORTS_PER_WORKER: u64 = 50;

/// One realistic interval report.
fn sample_report() -> pb::IntervalReport {
    let registry = Registry::new();
    let endpoints = [
        "GET /v1/users/{id}/timeline",
        "GET /v1/users/{id}/posts",
        "POST /v1/posts",
    ];
    for i in 0..1_000u64 {
        let endpoint = registry.endpoint(endpoints[(i % 3) as usize]);
        let status = if i % 97 == 0 { 503 } else { 200 };
        let micros = 800 + (i * 7_919) % 40_000;
        let r = registry.recorder(i);
        r.http(
            &HttpSample {
                endpoint,
                status,
                failed: status != 200,
                service: Duration::from_micros(micros),
                waiting: Duration::from_micros(micros * 9 / 10),
                receiving: Duration::from_micros(micros / 20),
                sending: Duration::from_micros(20),
                sent: 200,
                received: 2_000,
                ..HttpSample::default()
            },
            None,
        );
        r.iteration(Duration::from_micros(micros + 50));
        r.check(status == 200);
    }
    let mut b = Buffer::default();
    registry.drain_into(&mut b);
    encode_report(&b, &registry.endpoint_names(), ReportMeta::default()).expect("encodes")
}

fn msg(kind: Kind) -> pb::WorkerMessage {
    pb::WorkerMessage { kind: Some(kind) }
}

async fn synthetic_worker(url: String, index: u32, report: pb::IntervalReport) {
    let channel = tonic::transport::Endpoint::from_shared(url)
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut client = CoordinatorClient::new(channel);
    let reg = client
        .register(pb::RegisterRequest {
            run: String::new(),
            index,
            total: WORKERS,
            version: VERSION.into(),
            host: "bench".into(),
        })
        .await
        .expect("register")
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tx.send(msg(Kind::Hello(pb::Hello {
        index,
        session: reg.session,
    })))
    .await
    .expect("hello");
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("session")
        .into_inner();
    loop {
        let m = inbound.message().await.expect("stream").expect("open");
        match m.kind {
            Some(pb::coordinator_message::Kind::Setup(_)) => {
                tx.send(msg(Kind::Ready(pb::Ready {})))
                    .await
                    .expect("ready");
            }
            Some(pb::coordinator_message::Kind::Start(_)) => break,
            _ => {}
        }
    }
    // Keep reading (heartbeats) so the coordinator does not count us as deaf.
    let reader = tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    tx.send(msg(Kind::Started(pb::Started { at_unix_nanos: now })))
        .await
        .expect("started");
    for seq in 0..REPORTS_PER_WORKER {
        let mut r = report.clone();
        r.seq = seq;
        r.end_s = seq as f64 + 1.0;
        r.length_s = 1.0;
        tx.send(msg(Kind::Report(r))).await.expect("report");
    }
    tx.send(msg(Kind::Done(pb::Done {
        duration_s: REPORTS_PER_WORKER as f64,
        interrupted: 0,
        stopped_early: false,
        traces: Vec::new(),
    })))
    .await
    .expect("done");
    let _ = tokio::time::timeout(Duration::from_secs(60), reader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by benches/distributed.sh"]
async fn coordinator_cpu_per_thousand_reports_per_second() {
    let dir = support::out_dir("bench");
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("spec.yaml");
    std::fs::write(
        &file,
        format!(
            "scenario:\n  name: http\n  http:\n    requests:\n      - {{name: x, url: \"http://127.0.0.1:9/\"}}\nexecutor: {{type: constant-arrival-rate, rate: 1, duration: 10m, preAllocatedVUs: 1}}\nworkers: {WORKERS}\n"
        ),
    )
    .expect("spec");
    let mut coordinator = Command::new(support::loadlab())
        .args(["coordinator", "--quiet", "--listen", "127.0.0.1:0"])
        .arg("-f")
        .arg(&file)
        .arg("--out")
        .arg(dir.join("report"))
        .env("LOADLAB_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("coordinator");
    let pid = coordinator.id().expect("pid");
    let stdout = coordinator.stdout.take().expect("stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let line = lines.next_line().await.expect("read").expect("line");
    let url = format!("http://{}", line.rsplit(' ').next().expect("addr"));
    let report = sample_report();
    let size = prost::Message::encoded_len(&report);
    let before = loadlab::procstat::sample(pid).expect("coordinator cpu");
    let started = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|i| tokio::spawn(synthetic_worker(url.clone(), i, report.clone())))
        .collect();
    for w in workers {
        w.await.expect("worker");
    }
    let after = loadlab::procstat::sample(pid).expect("coordinator cpu");
    let wall = started.elapsed().as_secs_f64();
    let status = coordinator.wait().await.expect("coordinator exits");
    let s = support::written_summary(&dir.join("report"));
    assert!(status.success(), "{status}: {:?}", s.run.reason);
    let reports = f64::from(WORKERS) * REPORTS_PER_WORKER as f64;
    let cpu = after.cpu_s - before.cpu_s;
    println!(
        "coordinator merge: {reports:.0} reports of {size} bytes from {WORKERS} workers in {wall:.2} s ({:.0} reports/s), coordinator CPU {cpu:.2} s = {:.3} cores per 1 000 reports/s",
        reports / wall,
        cpu / reports * 1_000.0
    );
    assert_eq!(
        support::value(&s, "http_reqs", "count"),
        reports * 1_000.0,
        "every report merged"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
