//! Peers the coordinator must refuse or survive, and runs that cannot start.

use std::time::Duration;

use loadlab::distributed::{EXIT_RUN_INCOMPLETE, VERSION};
use loadlab::summary::Verdict;
use loadlab_kit::Shutdown;
use loadlab_proto::runner::v1 as pb;
use pb::coordinator_client::CoordinatorClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use crate::support::{self, value};

fn register(index: u32, total: u32, version: &str, run: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        run: run.into(),
        index,
        total,
        version: version.into(),
        host: "test".into(),
    }
}

/// Writes `bytes` on a fresh connection and reads until the coordinator hangs up.
async fn garbage(addr: std::net::SocketAddr, bytes: &[u8]) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = tcp.write_all(bytes).await;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut sink)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_are_refused_with_clear_errors_and_the_run_still_works() {
    let t = support::target().await;
    let spec = support::spec(
        &format!("{}/ok", t.base),
        "  type: constant-arrival-rate\n  rate: 10\n  duration: 2s\n  preAllocatedVUs: 2",
        "",
    );
    let opts = support::run_options("peers");
    let coordinator = support::coordinator(&spec, opts.clone(), 2).await;
    let addr = coordinator.local_addr();
    let url = format!("http://{addr}");

    // The run loop runs alongside the probes (it answers sessions with the set-up data).
    let probes = async {
        // Garbage on the port, an HTTP/1.1 request, a half-open HTTP/2 preface: none of them
        // takes the coordinator down.
        garbage(addr, b"\x00\xff\x13garbage garbage garbage\r\n\r\n").await;
        garbage(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        garbage(addr, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\x00").await;

        let channel = tonic::transport::Endpoint::from_shared(url.clone())
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let mut client = CoordinatorClient::new(channel);
        let err = client
            .register(register(0, 2, "0.0.0-other", ""))
            .await
            .expect_err("other version");
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(
            err.message().contains("0.0.0-other") && err.message().contains(VERSION),
            "{}",
            err.message()
        );
        let err = client
            .register(register(0, 2, VERSION, "another-run"))
            .await
            .expect_err("other run");
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("another-run"), "{}", err.message());
        let err = client
            .register(register(2, 2, VERSION, ""))
            .await
            .expect_err("index out of range");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("index 2"), "{}", err.message());
        let err = client
            .register(register(0, 3, VERSION, ""))
            .await
            .expect_err("wrong worker count");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("3 workers"), "{}", err.message());

        // A session without a registration.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::Hello(pb::Hello {
                index: 0,
                session: 12_345,
            })),
        })
        .await
        .expect("queue");
        let err = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect_err("not registered");
        assert_eq!(err.code(), Code::FailedPrecondition);

        // Index 0 taken by this client: a real worker with the same index is refused and says why.
        let held = client
            .register(register(0, 2, VERSION, &opts.run_id))
            .await
            .expect("registers")
            .into_inner();
        assert_eq!(
            held.shard.as_ref().map(|s| (s.index, s.total)),
            Some((0, 2))
        );
        assert!(held.spec_json.contains("constant-arrival-rate"));
        let err = client
            .register(register(0, 2, VERSION, ""))
            .await
            .expect_err("duplicate");
        assert_eq!(err.code(), Code::AlreadyExists);
        assert!(err.message().contains("index 0"), "{}", err.message());
        let (status, stderr) =
            support::finished(support::worker(&url, 0, 2), Duration::from_secs(20)).await;
        assert!(!status.success());
        assert!(stderr.contains("already registered"), "{stderr}");

        // Before the start an index comes back when its session ends: open one, then leave.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::Hello(pb::Hello {
                index: 0,
                session: held.session,
            })),
        })
        .await
        .expect("queue");
        let mut inbound = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("session")
            .into_inner();
        let first = inbound.message().await.expect("message").expect("setup");
        assert!(matches!(
            first.kind,
            Some(pb::coordinator_message::Kind::Setup(_))
        ));
        drop(tx);
        drop(inbound);
        tokio::time::sleep(Duration::from_millis(300)).await;

        // Real workers take both indexes and the run completes, the coordinator none the worse.
        [support::worker(&url, 0, 2), support::worker(&url, 1, 2)]
    };
    let (outcome, workers) = tokio::join!(coordinator.run(Shutdown::new()), probes);
    let outcome = outcome.expect("the run completes");
    for w in workers {
        let (status, stderr) = support::finished(w, Duration::from_secs(10)).await;
        assert!(status.success(), "{status} {stderr}");
    }
    assert_eq!(outcome.exit_code, 0);
    assert_eq!(value(&outcome.summary, "http_reqs", "count"), 20.0);
    let _ = std::fs::remove_dir_all(&opts.out_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_never_registers_fails_the_run_by_name() {
    let t = support::target().await;
    let spec = support::spec(
        &format!("{}/ok", t.base),
        "  type: constant-arrival-rate\n  rate: 10\n  duration: 2s\n  preAllocatedVUs: 2",
        "startTimeoutSeconds: 2",
    );
    let opts = support::run_options("timeout");
    let coordinator = support::coordinator(&spec, opts.clone(), 3).await;
    let url = format!("http://{}", coordinator.local_addr());
    let present = support::worker(&url, 0, 3);
    let outcome = coordinator.run(Shutdown::new()).await.expect("an outcome");
    assert_eq!(outcome.exit_code, EXIT_RUN_INCOMPLETE);
    assert_eq!(outcome.summary.run.verdict, Verdict::Fail);
    let reason = outcome.summary.run.reason.as_deref().unwrap_or_default();
    assert!(
        reason.contains("workers 1, 2 did not register within 2 s"),
        "{reason}"
    );
    // The worker that came is sent home, not left waiting.
    let (status, stderr) = support::finished(present, Duration::from_secs(10)).await;
    assert!(status.success(), "{status} {stderr}");
    assert_eq!(value(&outcome.summary, "http_reqs", "count"), 0.0);
    support::written_summary(&opts.out_dir);
    let _ = std::fs::remove_dir_all(&opts.out_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_a_coordinator_gives_up_with_a_clear_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let (status, stderr) = support::finished(
        support::worker(&format!("http://{addr}"), 0, 1),
        Duration::from_secs(20),
    )
    .await;
    assert!(!status.success());
    assert!(stderr.contains("cannot reach the coordinator"), "{stderr}");
}
