//! Applying heartbeats and expiries to the presence store, and announcing every resulting
//! online/offline transition on the engine's pub/sub (`presence:<channel>`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use futures::StreamExt;
use loadlab_kit::engine::{Engine, EngineError, PresenceChange};
use loadlab_kit::metrics::Metrics;
use loadlab_kit::{Id, Shutdown};
use loadlab_proto::presence::v1::State;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::domain::{self, Heartbeat};

/// Expired entries removed per `expire` call: one Lua script holds Redis for its whole batch.
pub const SWEEP_BATCH: usize = 1_000;
/// Most `expire` calls per sweep; a larger backlog waits for the next tick so one sweep cannot
/// monopolise Redis.
const SWEEP_ROUNDS: usize = 100;
/// Publishes in flight at once while announcing a batch of changes.
const PUBLISH_CONCURRENCY: usize = 64;

/// Labels of the change counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChangeLabels {
    /// `online` or `offline`.
    state: String,
}

#[derive(Clone, Default)]
struct TrackerMetrics {
    heartbeats: Counter,
    changes: Family<ChangeLabels, Counter>,
    publish_failures: Counter,
}

/// Presence bookkeeping over an engine.
#[derive(Clone)]
pub struct Tracker {
    engine: Engine,
    ttl_ms: i64,
    metrics: TrackerMetrics,
}

impl Tracker {
    /// A tracker whose entries live `ttl` past the heartbeat that refreshed them.
    pub fn new(engine: Engine, ttl: Duration, registry: &Metrics) -> Self {
        let metrics = TrackerMetrics::default();
        registry.register(
            "presence_heartbeats",
            "Valid heartbeats received",
            metrics.heartbeats.clone(),
        );
        registry.register(
            "presence_changes",
            "Presence transitions announced, by state",
            metrics.changes.clone(),
        );
        registry.register(
            "presence_publish_failures",
            "Presence events that could not be published (watchers missed them)",
            metrics.publish_failures.clone(),
        );
        Tracker {
            engine,
            ttl_ms: i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
            metrics,
        }
    }

    /// Applies a heartbeat — refreshes `online` until now + TTL, then drops `offline` — and
    /// announces the transitions. Returns how many there were.
    pub async fn heartbeat(&self, heartbeat: &Heartbeat) -> Result<u32, EngineError> {
        self.metrics.heartbeats.inc();
        let now = domain::now_ms();
        let gateway = heartbeat.gateway.as_str();
        let came_online = self
            .engine
            .presence
            .touch(gateway, &heartbeat.online, now.saturating_add(self.ttl_ms))
            .await?;
        // Announce before the next store call: these transitions happened even if it fails.
        self.announce(&came_online, State::Online, now).await;
        let went_offline = self
            .engine
            .presence
            .remove(gateway, &heartbeat.offline)
            .await?;
        self.announce(&went_offline, State::Offline, now).await;
        Ok(u32::try_from(came_online.len() + went_offline.len()).unwrap_or(u32::MAX))
    }

    /// Whether each user is connected, in order.
    pub async fn online(&self, users: &[Id]) -> Result<Vec<bool>, EngineError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        self.engine.presence.online(users).await
    }

    /// Removes the entries expired at `now_ms` and announces who went offline; returns how many
    /// transitions it announced.
    ///
    /// Safe on every replica at once: each `expire` call removes its entries atomically, so a
    /// transition is reported by exactly one replica.
    pub async fn sweep(&self, now_ms: i64) -> Result<usize, EngineError> {
        let mut total = 0;
        for _ in 0..SWEEP_ROUNDS {
            let gone = self.engine.presence.expire(now_ms, SWEEP_BATCH).await?;
            // `expire` reports transitions, not removed entries: a batch whose entries were all
            // backed by another gateway reports nothing although more may be due. Stopping on
            // an empty answer is still right — it costs at most one interval of delay, whereas
            // stopping on a short answer would often leave a due backlog behind.
            if gone.is_empty() {
                break;
            }
            self.announce(&gone, State::Offline, now_ms).await;
            total += gone.len();
        }
        Ok(total)
    }

    /// Sweeps every `interval` until `stop`. A failed sweep is logged and retried next tick
    /// (entries stay in the store until a sweep succeeds, so nothing is lost).
    pub async fn sweep_until(self, interval: Duration, stop: Shutdown) {
        let mut ticks = tokio::time::interval(interval);
        // After a slow sweep (a backlog, a slow Redis) wait a full interval rather than firing
        // the missed ticks back to back.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stopped = stop.wait();
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                () = &mut stopped => return,
                _ = ticks.tick() => {}
            }
            // Not raced against `stop`: cancelling between `expire` and the announcement would
            // lose OFFLINE events for entries already removed.
            match self.sweep(domain::now_ms()).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(offline = n, "presence sweep"),
                Err(e) => tracing::warn!(error = %e, "presence sweep failed; retrying"),
            }
        }
    }

    /// Publishes one event per change on its channel's topic. Failures are counted and logged,
    /// not returned: the store has already changed, so failing the caller would only make it
    /// retry a call that now reports no change.
    async fn announce(&self, changes: &[PresenceChange], state: State, at_ms: i64) {
        if changes.is_empty() {
            return;
        }
        let label = ChangeLabels {
            state: match state {
                State::Online => "online",
                State::Offline => "offline",
                State::Unspecified => "unspecified",
            }
            .to_owned(),
        };
        self.metrics
            .changes
            .get_or_create(&label)
            .inc_by(changes.len() as u64);
        // Owned messages and futures: a stream of closures borrowing `changes` makes the
        // handler's future fail the compiler's `Send` check ("FnOnce is not general enough").
        let messages: Vec<(String, Bytes)> = changes
            .iter()
            .map(|change| {
                let event = domain::event(*change, state, at_ms, false);
                (domain::topic(change.channel), domain::encode(&event))
            })
            .collect();
        let pubsub = Arc::clone(&self.engine.pubsub);
        // Publishes run concurrently and may overtake each other; that is harmless because a
        // batch never holds two transitions of the same (channel, user) pair.
        let failures: Vec<EngineError> = futures::stream::iter(messages)
            .map(move |(topic, payload)| {
                let pubsub = Arc::clone(&pubsub);
                async move { pubsub.publish(&topic, payload).await.err() }
            })
            .buffer_unordered(PUBLISH_CONCURRENCY)
            .filter_map(std::future::ready)
            .collect()
            .await;
        if let Some(first) = failures.first() {
            self.metrics.publish_failures.inc_by(failures.len() as u64);
            tracing::warn!(
                error = %first,
                failed = failures.len(),
                total = changes.len(),
                "presence events could not be published; watchers missed them"
            );
        }
    }
}
