//! `loadlab-chat-gateway`: the chat's WebSocket edge. Clients join channels and send messages;
//! each message is made durable (group commit), acked, and published on Redis pub/sub so every
//! gateway replica delivers it to its local members. Gateways report their users to the
//! presence service and relay channel presence to clients.
#![forbid(unsafe_code)]

pub mod committer;
pub mod config;
pub mod connection;
pub mod http;
pub mod presence;
pub mod protocol;
pub mod rooms;
pub mod store;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use loadlab_kit::auth::TokenKeys;
use loadlab_kit::engine::{Engine, EngineKind};
use loadlab_kit::hub::Hub;
use loadlab_kit::metrics::Metrics;
use loadlab_kit::server::{self, Check, Limits, Parts, ServeError};
use loadlab_kit::telemetry::{self, Telemetry};
use loadlab_kit::{Id, Shutdown, Snowflake, db, grpc as kit_grpc};
use loadlab_proto::presence::v1::presence_service_client::PresenceServiceClient;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use sea_orm::DatabaseConnection;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

pub use config::ChatConfig;

use crate::committer::{CommitMetrics, Committer};
use crate::connection::JoinError;
use crate::presence::PresenceLink;
use crate::rooms::{ConnId, Outbox, Rooms};
use crate::store::ChatStore;

/// Gateway metrics.
#[derive(Clone)]
pub struct GatewayMetrics {
    connections: Gauge,
    frames_in: Counter,
    frames_out: Counter,
    slow_consumers: Counter,
    rate_limited: Counter,
    /// Open WebSocket connections over OTLP (`chat.websocket.connections`).
    otel_connections: opentelemetry::metrics::UpDownCounter<i64>,
}

impl GatewayMetrics {
    fn new(meter: &opentelemetry::metrics::Meter) -> Self {
        GatewayMetrics {
            connections: Gauge::default(),
            frames_in: Counter::default(),
            frames_out: Counter::default(),
            slow_consumers: Counter::default(),
            rate_limited: Counter::default(),
            otel_connections: meter
                .i64_up_down_counter("chat.websocket.connections")
                .with_description("Open WebSocket connections")
                .build(),
        }
    }

    fn connected(&self) {
        self.connections.inc();
        self.otel_connections.add(1, &[]);
    }

    fn disconnected(&self) {
        self.connections.dec();
        self.otel_connections.add(-1, &[]);
    }
}

/// The service name in telemetry.
pub const SERVICE: &str = "chat-gateway";

/// Everything connections share.
pub struct Gateway {
    cfg: Arc<ChatConfig>,
    store: ChatStore,
    ids: Arc<Snowflake>,
    tokens: Arc<TokenKeys>,
    rooms: Arc<Rooms>,
    presence: Arc<PresenceLink>,
    committer: Mutex<Option<Committer>>,
    drained: watch::Receiver<bool>,
    shutdown: Shutdown,
    tracker: TaskTracker,
    next_conn: AtomicU64,
    channels: Mutex<HashSet<Id>>,
    metrics: GatewayMetrics,
}

impl Gateway {
    fn committer(&self) -> Option<Committer> {
        self.committer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    fn known_channel(&self, id: Id) {
        self.channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id);
    }

    async fn join_room(
        self: &Arc<Self>,
        channel: Id,
        conn: ConnId,
        user: Id,
        outbox: Outbox,
    ) -> Result<(), JoinError> {
        // Channels are never deleted: once seen, skip the existence check.
        let known = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&channel);
        if !known {
            if !self.store.channel_exists(channel).await? {
                return Err(JoinError::UnknownChannel);
            }
            self.known_channel(channel);
        }
        self.store.join(channel, user).await?;
        let first = self
            .rooms
            .join(channel, conn, user, outbox)
            .await
            .map_err(|e| JoinError::Unavailable(e.to_string()))?;
        if first {
            self.presence.watch(channel, self.rooms.clone());
        }
        self.presence.joined(user, channel);
        Ok(())
    }

    async fn leave_room(&self, channel: Id, conn: ConnId, user: Id) {
        self.presence.left(user, channel);
        match self.rooms.leave(channel, conn).await {
            Ok(true) => self.presence.unwatch(channel),
            Ok(false) => {}
            Err(e) => tracing::warn!(%channel, error = %e, "unsubscribing an empty channel failed"),
        }
    }
}

/// Runs the gateway with dependencies from `cfg` until `shutdown`.
pub async fn serve(cfg: ChatConfig, shutdown: Shutdown) -> Result<(), ServeError> {
    cfg.validate()?;
    if cfg.common.engine == EngineKind::Memory {
        tracing::warn!(
            "the memory engine is per-process: gateways in other processes will not see each other's messages"
        );
    }
    let engine = Engine::from_args(&cfg.common)?;
    let database = db::connect(&cfg.common.db.settings()).await?;
    let listener = server::bind(cfg.listen).await?;
    serve_with(cfg, engine, database, listener, shutdown).await
}

/// Runs the gateway on given dependencies and listener until `shutdown`; then drains: stops
/// accepting, answers every queued send, closes connections with 1001, reports users offline.
pub async fn serve_with(
    cfg: ChatConfig,
    engine: Engine,
    database: DatabaseConnection,
    listener: TcpListener,
    shutdown: Shutdown,
) -> Result<(), ServeError> {
    cfg.validate()?;
    if cfg.common.migrate {
        db::migrate(&database).await?;
    }
    let node = cfg.common.resolved_node_id();
    let ids = Arc::new(Snowflake::new(node).map_err(|e| ServeError::Setup(e.to_string()))?);
    let tokens = Arc::new(
        TokenKeys::new(
            cfg.common.jwt_secret_bytes(),
            std::time::Duration::from_secs(86_400),
        )
        .map_err(|e| ServeError::Setup(e.to_string()))?,
    );
    let telemetry = Telemetry::start(SERVICE, env!("CARGO_PKG_VERSION"), &cfg.common.otel)?;
    let metrics = Metrics::with_telemetry(&telemetry);
    let gm = GatewayMetrics::new(metrics.meter());
    metrics.register(
        "chat_connections",
        "Open WebSocket connections",
        gm.connections.clone(),
    );
    metrics.register(
        "chat_frames_in",
        "Frames received from clients",
        gm.frames_in.clone(),
    );
    metrics.register(
        "chat_frames_out",
        "Frames sent to clients",
        gm.frames_out.clone(),
    );
    metrics.register(
        "chat_slow_consumers",
        "Connections closed for not reading",
        gm.slow_consumers.clone(),
    );
    metrics.register(
        "chat_rate_limited",
        "Sends refused by the rate limit",
        gm.rate_limited.clone(),
    );
    let store = ChatStore::new(database.clone());
    let hub = Hub::new(engine.pubsub.as_ref()).await?;
    let gateway_id = format!(
        "gw-{node}-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_millis()
    );
    let rooms = Arc::new(Rooms::new(hub, metrics.meter(), &gateway_id));
    let presence_client = PresenceServiceClient::new(kit_grpc::lazy_channel(
        &cfg.presence_url,
        cfg.common.request_timeout,
    )?);
    let presence = PresenceLink::new(presence_client, gateway_id);
    let (committer, drained) = Committer::spawn(
        store.clone(),
        engine.pubsub.clone(),
        cfg.commit_batch,
        cfg.commit_queue,
        CommitMetrics::register(&metrics),
    );
    let cfg = Arc::new(cfg);
    let gateway = Arc::new(Gateway {
        cfg: cfg.clone(),
        store,
        ids,
        tokens,
        rooms,
        presence: presence.clone(),
        committer: Mutex::new(Some(committer)),
        drained,
        shutdown: shutdown.clone(),
        tracker: TaskTracker::new(),
        next_conn: AtomicU64::new(1),
        channels: Mutex::default(),
        metrics: gm,
    });
    let presence_task = tokio::spawn(telemetry::in_service(
        SERVICE,
        presence
            .clone()
            .run(cfg.heartbeat_interval, shutdown.clone()),
    ));

    let db_check: Check = {
        let db = database.clone();
        Arc::new(move || {
            let db = db.clone();
            Box::pin(async move { db::ping(&db).await.map_err(|e| e.to_string()) })
        })
    };
    let engine_check: Check = Arc::new(move || {
        let engine = engine.clone();
        Box::pin(async move { engine.ping().await.map_err(|e| e.to_string()) })
    });
    let router = server::router(
        Parts {
            name: "chat-gateway",
            http: http::routes(gateway.clone()),
            grpc: tonic::service::Routes::default(),
            grpc_names: Vec::new(),
            descriptors: vec![loadlab_proto::FILE_DESCRIPTOR_SET],
            checks: vec![("database", db_check), ("engine", engine_check)],
            metrics,
            limits: Limits::from_args(&cfg.common),
        },
        &shutdown,
    )
    .await
    .map_err(|e| ServeError::Setup(e.to_string()))?;

    tracing::info!(node, "chat gateway starting");
    let served = server::serve(
        listener,
        router,
        shutdown.clone(),
        cfg.common.shutdown_grace,
    )
    .await;
    // Drain: connections stop reading; once the last handle to the committer is gone it
    // answers what is queued and reports drained; writers then flush and close with 1001.
    gateway
        .committer
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    gateway.tracker.close();
    if tokio::time::timeout(cfg.common.shutdown_grace, gateway.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections did not close within the grace period");
    }
    let _ = presence_task.await;
    telemetry
        .shutdown(cfg.common.shutdown_grace.min(telemetry::FLUSH_LIMIT))
        .await;
    served?;
    tracing::info!("chat gateway stopped");
    Ok(())
}
