//! `loadlab-presence`: who is online (`loadlab.presence.v1.PresenceService`). Chat gateways
//! report their users in batched heartbeats; entries expire a TTL after the last heartbeat that
//! listed them, so a gateway that dies takes its users offline without any explicit call. Every
//! online/offline transition is published on the engine's pub/sub as `presence:<channel>`, and
//! `WatchChannel` streams a channel's snapshot followed by those events.
#![forbid(unsafe_code)]

pub mod config;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod tracker;
pub mod watch;

use std::sync::Arc;

use loadlab_kit::Shutdown;
use loadlab_kit::engine::{Engine, EngineKind};
use loadlab_kit::hub::Hub;
use loadlab_kit::metrics::Metrics;
use loadlab_kit::server::{self, Check, Limits, Parts, ServeError};
use loadlab_kit::telemetry::{self, Telemetry};
use loadlab_proto::presence::v1::presence_service_server::PresenceServiceServer;
use tokio::net::TcpListener;

pub use config::PresenceConfig;
pub use error::PresenceError;

/// Runs the presence service with an engine from `cfg` until `shutdown`.
pub async fn serve(cfg: PresenceConfig, shutdown: Shutdown) -> Result<(), ServeError> {
    cfg.validate()?;
    if cfg.common.engine == EngineKind::Memory {
        tracing::warn!(
            "the memory engine is per-process: run chat-gateway and presence together (`loadlab up`) or use --engine redis"
        );
    }
    let engine = Engine::from_args(&cfg.common)?;
    let listener = server::bind(cfg.listen).await?;
    serve_with(cfg, engine, listener, shutdown).await
}

/// Runs the presence service on a given engine and listener until `shutdown`.
pub async fn serve_with(
    cfg: PresenceConfig,
    engine: Engine,
    listener: TcpListener,
    shutdown: Shutdown,
) -> Result<(), ServeError> {
    cfg.validate()?;
    let telemetry = Telemetry::start("presence", env!("CARGO_PKG_VERSION"), &cfg.common.otel)?;
    let metrics = Metrics::with_telemetry(&telemetry);
    let hub = Hub::new(engine.pubsub.as_ref()).await?;
    let tracker = tracker::Tracker::new(engine.clone(), cfg.presence_ttl, &metrics);
    let watchers = watch::Watchers::new(
        hub,
        engine.clone(),
        cfg.watch_buffer,
        shutdown.clone(),
        &metrics,
    );
    let engine_check: Check = Arc::new(move || {
        let engine = engine.clone();
        Box::pin(async move { engine.ping().await.map_err(|e| e.to_string()) })
    });
    let router = server::router(
        Parts {
            name: "presence",
            http: axum::Router::new(),
            grpc: tonic::service::Routes::new(PresenceServiceServer::new(grpc::PresenceGrpc::new(
                tracker.clone(),
                watchers,
            ))),
            grpc_names: vec!["loadlab.presence.v1.PresenceService"],
            descriptors: vec![loadlab_proto::FILE_DESCRIPTOR_SET],
            checks: vec![("engine", engine_check)],
            metrics,
            limits: Limits::from_args(&cfg.common),
        },
        &shutdown,
    )
    .await
    .map_err(|e| ServeError::Setup(e.to_string()))?;
    // A child token: the sweeper also stops when serving fails, not only on shutdown.
    let sweeper_stop = shutdown.child();
    let sweeper = tokio::spawn(telemetry::in_service(
        "presence",
        tracker.sweep_until(cfg.presence_sweep_interval, sweeper_stop.clone()),
    ));
    tracing::info!("presence starting");
    let served = server::serve(listener, router, shutdown, cfg.common.shutdown_grace).await;
    sweeper_stop.trigger();
    // A sweep in progress finishes (so its OFFLINE events go out) unless Redis hangs.
    match tokio::time::timeout(cfg.common.shutdown_grace, sweeper).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "presence sweeper failed"),
        Err(_) => tracing::warn!("presence sweeper did not stop within the grace period"),
    }
    telemetry
        .shutdown(cfg.common.shutdown_grace.min(telemetry::FLUSH_LIMIT))
        .await;
    served?;
    tracing::info!("presence stopped");
    Ok(())
}
