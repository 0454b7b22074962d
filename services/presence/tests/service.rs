//! The server around the service: probes, gRPC health, and graceful shutdown.

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use support::{Backend, EVENT_WAIT, Engines, Replica, watch};
use tonic::Code;

async fn probes_and_grpc_health_answer(backend: Backend) {
    let replica = Replica::start(Engines::new(backend).engine(), &[]).await;
    for (path, needle) in [
        ("/healthz", "ok"),
        ("/readyz", "engine"),
        ("/metrics", "loadlab_presence_heartbeats_total"),
    ] {
        let response = reqwest::get(format!("{}{path}", replica.url))
            .await
            .expect(path);
        assert_eq!(response.status(), reqwest::StatusCode::OK, "{path}");
        let body = response.text().await.expect("body");
        assert!(body.contains(needle), "{path}: {body}");
    }
    let channel = tonic::transport::Endpoint::from_shared(replica.url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "loadlab.presence.v1.PresenceService".into(),
        })
        .await
        .expect("health")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    replica.stop().await;
}
on_both_engines!(probes_and_grpc_health_answer);

async fn shutdown_ends_watch_streams_promptly(backend: Backend) {
    let replica = Replica::start(Engines::new(backend).engine(), &[]).await;
    let mut client = replica.client().await;
    let mut channel = watch(&mut client, 3).await;
    replica
        .wait_for_metric("loadlab_presence_active_watchers", 1.0)
        .await;

    let started = Instant::now();
    replica.shutdown.trigger();
    let status = tokio::time::timeout(EVENT_WAIT, channel.message())
        .await
        .expect("the stream ends in time")
        .expect_err("the stream ends with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
    // Well within the 10s grace: the open stream does not hold the server up.
    tokio::time::timeout(Duration::from_secs(5), replica.task)
        .await
        .expect("the server stops promptly")
        .expect("serve task");
    assert!(started.elapsed() < Duration::from_secs(5));
}
on_both_engines!(shutdown_ends_watch_streams_promptly);
