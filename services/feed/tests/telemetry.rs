//! Telemetry must never cost the request path: with no endpoint nothing is exported (and no
//! exporter dials the default collector address); with an endpoint that accepts connections
//! but never answers, requests are served normally and shutdown still finishes in its grace.
//!
//! Each test installs the process-wide subscriber, so each runs in its own process (nextest);
//! under `cargo test` the first one to run decides the subscriber, which both tests tolerate.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use loadlab_kit::telemetry::{self, OtelArgs};
use reqwest::StatusCode;
use support::{Backend, Options, Stack};
use tokio::net::TcpListener;

/// A "collector" that accepts connections, counts them, and never answers a byte.
async fn black_hole(listener: TcpListener) -> Arc<AtomicUsize> {
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            // Keep the socket open: the exporter waits for an HTTP/2 answer that never comes.
            held.push(socket);
        }
    });
    accepted
}

/// Users, a follow graph and posts, then `reads` concurrent home-timeline reads; every read
/// must answer 200 with the posts.
async fn exercise(stack: Arc<Stack>, reads: usize) {
    let author = stack.register("author").await;
    let mut readers = Vec::new();
    for i in 0..4 {
        let r = stack.register(&format!("reader_{i}")).await;
        stack.follow(&r, &author).await;
        readers.push(r);
    }
    for i in 0..5 {
        stack.post(&author, &format!("post {i}")).await;
    }
    // Fan-out is asynchronous: wait until the first reader sees every post.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while stack.home_all(&readers[0]).await.len() < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "fan-out did not deliver"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut tasks = Vec::new();
    for i in 0..reads {
        let stack = stack.clone();
        let reader = readers[i % readers.len()].clone();
        tasks.push(tokio::spawn(async move {
            let (status, body) = stack.home(&reader, "?limit=20").await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(Stack::ids(&body).len(), 5, "{body}");
        }));
        if tasks.len() >= 32 {
            for t in tasks.drain(..) {
                t.await.expect("read task");
            }
        }
    }
    for t in tasks {
        t.await.expect("read task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_exported() {
    assert!(
        std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none(),
        "this test needs OTEL_EXPORTER_OTLP_ENDPOINT unset"
    );
    telemetry::init(telemetry::LogFormat::Text, &OtelArgs::default());
    assert!(!OtelArgs::default().enabled());
    // The OTLP default collector address: an exporter built with defaults would dial it. When
    // another process holds the port the check is skipped (the rest of the test still runs).
    let default_collector = match TcpListener::bind("127.0.0.1:4317").await {
        Ok(l) => Some(black_hole(l).await),
        Err(_) => None,
    };
    let stack = Arc::new(Stack::start(Options::new(Backend::PostgresRedis)).await);
    exercise(stack.clone(), 200).await;
    let stack = Arc::into_inner(stack).expect("no other handle");
    tokio::time::timeout(Duration::from_secs(20), stack.stop())
        .await
        .expect("shutdown finishes");
    if let Some(accepted) = default_collector {
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            0,
            "something dialled the default OTLP port"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_costs_spans_not_requests() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let accepted = black_hole(listener).await;
    let otel = OtelArgs::with_endpoint(&endpoint);
    telemetry::init(telemetry::LogFormat::Text, &otel);
    let mut options = Options::new(Backend::PostgresRedis);
    options.common_flags = vec!["--otlp-endpoint".into(), endpoint.clone()];
    let stack = Arc::new(Stack::start(options).await);
    // Enough requests to overflow the span queue many times while every export hangs.
    exercise(stack.clone(), 600).await;
    let stack = Arc::into_inner(stack).expect("no other handle");
    // Grace 2 s, plus at most the bounded telemetry flush: a hanging collector must not hold
    // shutdown. The bound here is generous; it only catches a hang.
    tokio::time::timeout(Duration::from_secs(30), stack.stop())
        .await
        .expect("shutdown finishes despite the hanging collector");
    assert!(
        accepted.load(Ordering::SeqCst) > 0,
        "the exporters never tried the collector"
    );
}
