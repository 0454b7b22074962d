//! `loadlab-timeline`: home timelines (`loadlab.timeline.v1.TimelineService`) — capped sorted
//! sets of post ids written by fan-out, read with celebrity posts merged in, hydrated through the
//! post cache, and rebuilt from the follow graph when missing.
#![forbid(unsafe_code)]

pub mod config;
pub mod grpc;
pub mod timelines;

use std::sync::Arc;

use loadlab_kit::engine::{Engine, EngineKind};
use loadlab_kit::metrics::Metrics;
use loadlab_kit::server::{self, Check, Limits, Parts, ServeError};
use loadlab_kit::telemetry::{self, Telemetry};
use loadlab_kit::{Shutdown, grpc as kit_grpc};
use loadlab_proto::feed::v1::feed_service_client::FeedServiceClient;
use loadlab_proto::timeline::v1::timeline_service_server::TimelineServiceServer;
use tokio::net::TcpListener;

pub use config::TimelineConfig;

/// Runs the timeline service with an engine from `cfg` until `shutdown`.
pub async fn serve(cfg: TimelineConfig, shutdown: Shutdown) -> Result<(), ServeError> {
    cfg.validate()?;
    if cfg.common.engine == EngineKind::Memory {
        tracing::warn!(
            "the memory engine is per-process: run feed and timeline together (`loadlab up`) or use --engine redis"
        );
    }
    let engine = Engine::from_args(&cfg.common)?;
    let listener = server::bind(cfg.listen).await?;
    serve_with(cfg, engine, listener, shutdown).await
}

/// Runs the timeline service on a given engine and listener until `shutdown`.
pub async fn serve_with(
    cfg: TimelineConfig,
    engine: Engine,
    listener: TcpListener,
    shutdown: Shutdown,
) -> Result<(), ServeError> {
    cfg.validate()?;
    let telemetry = Telemetry::start("timeline", env!("CARGO_PKG_VERSION"), &cfg.common.otel)?;
    let metrics = Metrics::with_telemetry(&telemetry);
    let feed = FeedServiceClient::new(kit_grpc::lazy_channel(
        &cfg.feed_url,
        cfg.common.request_timeout,
    )?);
    let timelines = timelines::Timelines::new(
        engine.clone(),
        feed,
        cfg.timeline_cap,
        cfg.celebrity_cache_ttl,
        cfg.post_cache_ttl,
        &metrics,
    );
    let engine_check: Check = Arc::new(move || {
        let engine = engine.clone();
        Box::pin(async move { engine.ping().await.map_err(|e| e.to_string()) })
    });
    let router = server::router(
        Parts {
            name: "timeline",
            http: axum::Router::new(),
            grpc: tonic::service::Routes::new(TimelineServiceServer::new(grpc::TimelineGrpc::new(
                timelines,
            ))),
            grpc_names: vec!["loadlab.timeline.v1.TimelineService"],
            descriptors: vec![loadlab_proto::FILE_DESCRIPTOR_SET],
            checks: vec![("engine", engine_check)],
            metrics,
            limits: Limits::from_args(&cfg.common),
        },
        &shutdown,
    )
    .await
    .map_err(|e| ServeError::Setup(e.to_string()))?;
    tracing::info!("timeline starting");
    let served = server::serve(listener, router, shutdown, cfg.common.shutdown_grace).await;
    telemetry
        .shutdown(cfg.common.shutdown_grace.min(telemetry::FLUSH_LIMIT))
        .await;
    served?;
    tracing::info!("timeline stopped");
    Ok(())
}
