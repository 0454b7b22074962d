//! `loadlab-feed`: the feed's HTTP edge and owner of posts and the follow graph
//! (`loadlab.feed.v1.FeedService`), plus the fan-out workers that push new posts into followers'
//! home timelines (`--role api|fanout|all`).
#![forbid(unsafe_code)]

pub mod config;
pub mod domain;
pub mod fanout;
pub mod grpc;
pub mod http;
pub mod store;

use std::sync::Arc;

use loadlab_kit::auth::{Passwords, TokenKeys};
use loadlab_kit::engine::{Engine, EngineKind};
use loadlab_kit::metrics::Metrics;
use loadlab_kit::server::{self, Check, Limits, Parts, ServeError};
use loadlab_kit::telemetry::{self, Telemetry};
use loadlab_kit::{Shutdown, Snowflake, db, grpc as kit_grpc};
use loadlab_proto::feed::v1::feed_service_server::FeedServiceServer;
use loadlab_proto::timeline::v1::timeline_service_client::TimelineServiceClient;
use sea_orm::DatabaseConnection;
use tokio::net::TcpListener;

pub use config::{FeedConfig, Role};

/// What the feed runs on; built from the config by [`serve`], or passed in by `loadlab up` and
/// tests so that services in one process share one memory engine.
#[derive(Clone)]
pub struct Deps {
    /// The engine.
    pub engine: Engine,
    /// The database.
    pub db: DatabaseConnection,
}

impl Deps {
    /// Connects to what `cfg` names.
    pub async fn connect(cfg: &FeedConfig) -> Result<Deps, ServeError> {
        if cfg.common.engine == EngineKind::Memory {
            tracing::warn!(
                "the memory engine is per-process: run feed and timeline together (`loadlab up`) or use --engine redis"
            );
        }
        Ok(Deps {
            engine: Engine::from_args(&cfg.common)?,
            db: db::connect(&cfg.common.db.settings()).await?,
        })
    }
}

/// Runs the feed with dependencies from `cfg` until `shutdown`.
pub async fn serve(cfg: FeedConfig, shutdown: Shutdown) -> Result<(), ServeError> {
    cfg.validate()?;
    let deps = Deps::connect(&cfg).await?;
    let listener = server::bind(cfg.listen).await?;
    serve_with(cfg, deps, listener, shutdown).await
}

/// Runs the feed on given dependencies and listener until `shutdown`.
pub async fn serve_with(
    cfg: FeedConfig,
    deps: Deps,
    listener: TcpListener,
    shutdown: Shutdown,
) -> Result<(), ServeError> {
    cfg.validate()?;
    if cfg.common.migrate {
        db::migrate(&deps.db).await?;
    }
    let node = cfg.common.resolved_node_id();
    let ids = Arc::new(Snowflake::new(node).map_err(|e| ServeError::Setup(e.to_string()))?);
    let tokens = Arc::new(
        TokenKeys::new(cfg.common.jwt_secret_bytes(), cfg.token_ttl)
            .map_err(|e| ServeError::Setup(e.to_string()))?,
    );
    let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
    let passwords =
        Passwords::new(cfg.hash_cost(), parallel).map_err(|e| ServeError::Setup(e.to_string()))?;
    let timeline = TimelineServiceClient::new(kit_grpc::lazy_channel(
        &cfg.timeline_url,
        cfg.common.request_timeout,
    )?);
    let store = store::FeedStore::new(
        deps.db.clone(),
        ids,
        deps.engine.clone(),
        cfg.celebrity_threshold,
        cfg.post_cache_ttl,
    );
    let telemetry = Telemetry::start("feed", env!("CARGO_PKG_VERSION"), &cfg.common.otel)?;
    let metrics = Metrics::with_telemetry(&telemetry);

    let (http_routes, grpc_routes, grpc_names) = if cfg.role.serves_api() {
        let state = http::AppState {
            store: store.clone(),
            tokens,
            passwords,
            timeline: timeline.clone(),
            max_post_chars: cfg.max_post_chars,
        };
        let grpc = tonic::service::Routes::new(FeedServiceServer::new(grpc::FeedGrpc::new(
            store.clone(),
            cfg.max_post_chars,
        )));
        (
            http::routes(state),
            grpc,
            vec!["loadlab.feed.v1.FeedService"],
        )
    } else {
        (
            axum::Router::new(),
            tonic::service::Routes::default(),
            Vec::new(),
        )
    };

    let db_check: Check = {
        let db = deps.db.clone();
        Arc::new(move || {
            let db = db.clone();
            Box::pin(async move { db::ping(&db).await.map_err(|e| e.to_string()) })
        })
    };
    let engine_check: Check = {
        let engine = deps.engine.clone();
        Arc::new(move || {
            let engine = engine.clone();
            Box::pin(async move { engine.ping().await.map_err(|e| e.to_string()) })
        })
    };

    let fanout_task = if cfg.role.runs_fanout() {
        let worker = fanout::Fanout::new(
            store.clone(),
            deps.engine.clone(),
            timeline,
            fanout::FanoutSettings {
                batch: cfg.fanout_batch,
                concurrency: cfg.fanout_concurrency,
                consumers: cfg.fanout_consumers,
                batch_delay: cfg.fanout_batch_delay,
                sweep_interval: cfg.fanout_sweep_interval,
                sweep_after: cfg.fanout_sweep_after,
                claim_idle: cfg.fanout_claim_idle,
                celebrity_threshold: cfg.celebrity_threshold,
            },
            fanout::FanoutMetrics::register(&metrics),
        );
        let name = format!(
            "feed-{node}-{}-{}",
            std::process::id(),
            chrono::Utc::now().timestamp_millis()
        );
        Some(tokio::spawn(telemetry::in_service(
            "feed",
            worker.run(name, shutdown.clone()),
        )))
    } else {
        None
    };

    let router = server::router(
        Parts {
            name: "feed",
            http: http_routes,
            grpc: grpc_routes,
            grpc_names,
            descriptors: vec![loadlab_proto::FILE_DESCRIPTOR_SET],
            checks: vec![("database", db_check), ("engine", engine_check)],
            metrics,
            limits: Limits::from_args(&cfg.common),
        },
        &shutdown,
    )
    .await
    .map_err(|e| ServeError::Setup(e.to_string()))?;

    tracing::info!(role = ?cfg.role, engine = ?deps.engine.kind, node, "feed starting");
    let served = server::serve(
        listener,
        router,
        shutdown.clone(),
        cfg.common.shutdown_grace,
    )
    .await;
    if let Some(task) = fanout_task {
        shutdown.trigger();
        if tokio::time::timeout(cfg.common.shutdown_grace, task)
            .await
            .is_err()
        {
            tracing::warn!(
                "fan-out workers did not stop within the grace period; unacked jobs will be reclaimed"
            );
        }
    }
    telemetry
        .shutdown(cfg.common.shutdown_grace.min(telemetry::FLUSH_LIMIT))
        .await;
    served?;
    tracing::info!("feed stopped");
    Ok(())
}
