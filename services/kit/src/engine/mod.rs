//! Engines hold the short-lived, fast state of the feed system — materialised timelines, the post
//! cache, the celebrity-follow cache and the fan-out queue — behind one set of traits with two
//! implementations: [`memory`] (single process, used by `loadlab demo`) and [`redis`] (fred).
//!
//! Both implement the same semantics and are tested against the same contract
//! (`tests/engine_contract.rs`); PostgreSQL/SQLite remain the source of truth, so everything an
//! engine holds can be lost and rebuilt.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::ids::Id;

pub mod memory;
pub mod redis;

/// Which engine a service runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// In-process state; every service must share the process (`loadlab up`/`demo`).
    Memory,
    /// Redis: shared by every replica.
    Redis,
}

/// An engine operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Redis refused, timed out or is unreachable.
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    /// A stored value did not decode.
    #[error("corrupt value at {key}: {detail}")]
    Corrupt {
        /// The key holding the value.
        key: String,
        /// What was wrong with it.
        detail: String,
    },
}

/// Which timeline: a user's home timeline (posts of whom they follow) or an author's own posts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TimelineKey {
    /// Home timeline of a user.
    Home(Id),
    /// Posts written by an author (used to merge celebrities' posts on read).
    Author(Id),
}

/// Materialised timelines: post ids ordered by creation time, capped.
///
/// A timeline is either *missing*, *materialised* but not yet filled, or *filled* (possibly
/// empty). Appends touch materialised timelines, filled or not; reads see only filled ones. A
/// reader that finds one missing rebuilds it: [`TimelineStore::materialise`] first, so appends
/// from then on land, then reads the source of truth, then [`TimelineStore::fill`]. That order
/// guarantees a post committed during the rebuild is either in the source read or appended
/// afterwards; and since a materialised timeline reads as missing until filled, a concurrent
/// reader never mistakes a rebuild in progress for an empty timeline (it rebuilds too).
#[async_trait]
pub trait TimelineStore: Send + Sync {
    /// Adds `post` to every materialised timeline among `keys`, trimming each to the newest `cap`
    /// entries once it holds more than `cap + cap / 16` (trimming in bulk is much cheaper than
    /// on every append). Idempotent. Returns how many timelines received it.
    async fn append(&self, keys: &[TimelineKey], post: Id, cap: usize) -> Result<u32, EngineError>;

    /// For each key, `None` if missing or not yet filled, else up to `limit` post ids strictly
    /// older than `before` (all when `None`), newest first.
    async fn range(
        &self,
        keys: &[TimelineKey],
        before: Option<Id>,
        limit: usize,
    ) -> Result<Vec<Option<Vec<Id>>>, EngineError>;

    /// Marks a timeline materialised (empty and not filled if it was missing; unchanged
    /// otherwise).
    async fn materialise(&self, key: TimelineKey) -> Result<(), EngineError>;

    /// Adds `posts` to a materialised timeline, trims it to `cap`, and marks it filled (readable,
    /// even when `posts` is empty). A missing timeline stays missing: it was invalidated (a follow
    /// changed the graph) while being rebuilt, and the next read rebuilds it from the new graph.
    async fn fill(&self, key: TimelineKey, posts: &[Id], cap: usize) -> Result<(), EngineError>;

    /// Drops a timeline (it becomes missing).
    async fn remove(&self, key: TimelineKey) -> Result<(), EngineError>;
}

/// Cache of "which celebrities does this user follow", consulted on every home-timeline read.
#[async_trait]
pub trait FollowCache: Send + Sync {
    /// The cached set, or `None` when not cached.
    async fn celebrities_followed(&self, user: Id) -> Result<Option<Vec<Id>>, EngineError>;
    /// Caches the set for `ttl`.
    async fn store_celebrities_followed(
        &self,
        user: Id,
        celebrities: &[Id],
        ttl: Duration,
    ) -> Result<(), EngineError>;
    /// Invalidates the cached sets of `users`.
    async fn forget_celebrities_followed(&self, users: &[Id]) -> Result<(), EngineError>;
}

/// Cache of encoded posts for hydration.
#[async_trait]
pub trait PostCache: Send + Sync {
    /// The cached encodings of `ids`, in order; `None` for misses.
    async fn get_many(&self, ids: &[Id]) -> Result<Vec<Option<Bytes>>, EngineError>;
    /// Caches encodings for `ttl`.
    async fn put_many(&self, entries: &[(Id, Bytes)], ttl: Duration) -> Result<(), EngineError>;
}

/// A post to fan out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FanoutJob {
    /// The post.
    pub post: Id,
    /// Its author.
    pub author: Id,
    /// The span that created the post, so the fan-out can link its trace to the post's
    /// (`None` when telemetry is off, or for jobs re-published by the sweep).
    pub trace: Option<crate::telemetry::propagation::TraceParent>,
}

/// A job handed to a consumer; it stays pending until acked, and is re-delivered to another
/// consumer (via [`FanoutConsumer::reclaim`]) if its consumer dies first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Queue-specific delivery id, passed back to [`FanoutConsumer::ack`].
    pub id: String,
    /// The job.
    pub job: FanoutJob,
}

/// The durable-ish hand-off between the post API and the fan-out workers (at-least-once).
#[async_trait]
pub trait FanoutQueue: Send + Sync {
    /// Enqueues a job.
    async fn publish(&self, job: FanoutJob) -> Result<(), EngineError>;
    /// A consumer in the shared group, named for stale-claim bookkeeping.
    async fn consumer(&self, name: &str) -> Result<Box<dyn FanoutConsumer>, EngineError>;
    /// Jobs not yet acknowledged (waiting or in flight).
    async fn backlog(&self) -> Result<u64, EngineError>;
}

/// One member of the fan-out consumer group.
#[async_trait]
pub trait FanoutConsumer: Send {
    /// Up to `max` new jobs, waiting at most `wait` for the first.
    async fn receive(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, EngineError>;
    /// Takes over up to `max` jobs that another consumer received but has not acked for `min_idle`.
    async fn reclaim(
        &mut self,
        min_idle: Duration,
        max: usize,
    ) -> Result<Vec<Delivery>, EngineError>;
    /// Marks jobs done.
    async fn ack(&mut self, ids: &[String]) -> Result<(), EngineError>;
}

/// A message received on a subscribed topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicMessage {
    /// The topic, without the engine's key prefix.
    pub topic: String,
    /// The payload.
    pub payload: Bytes,
}

/// Publish/subscribe on named topics: Redis pub/sub, or an in-process broadcast on the memory
/// engine. Delivery is at-most-once (messages published while a subscriber is disconnected
/// are not replayed) — durable state lives in the database.
#[async_trait]
pub trait PubSub: Send + Sync {
    /// Publishes `payload` on `topic`; returns how many subscribers received it (Redis: how many
    /// connections, not how many listeners behind them).
    async fn publish(&self, topic: &str, payload: Bytes) -> Result<u64, EngineError>;
    /// Publishes several messages in one round trip, in order: subscribers see them in the
    /// order given.
    async fn publish_many(&self, messages: &[(String, Bytes)]) -> Result<(), EngineError>;
    /// A new subscriber with its own connection (resubscribed automatically after reconnects).
    async fn subscriber(&self) -> Result<Subscription, EngineError>;
}

/// Subscribing and unsubscribing topics of a [`Subscription`].
#[async_trait]
pub trait SubscriptionControl: Send + Sync {
    /// Starts receiving `topic`.
    async fn subscribe(&self, topic: &str) -> Result<(), EngineError>;
    /// Stops receiving `topic`.
    async fn unsubscribe(&self, topic: &str) -> Result<(), EngineError>;
}

/// A subscriber: control plus the stream of messages for its topics.
pub struct Subscription {
    /// Subscribe/unsubscribe.
    pub control: Arc<dyn SubscriptionControl>,
    /// Messages. A receiver that falls too far behind loses messages (reported as `Lagged`).
    pub messages: tokio::sync::broadcast::Receiver<TopicMessage>,
}

/// A presence change of one user in one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PresenceChange {
    /// Channel (0 is "connected at all").
    pub channel: Id,
    /// User.
    pub user: Id,
}

/// Presence with TTLs: entries `(channel, user, gateway)` live until their expiry; a user is
/// online in a channel while at least one gateway has an unexpired entry for them. Channel 0
/// stands for "connected at all".
#[async_trait]
pub trait PresenceStore: Send + Sync {
    /// Creates or refreshes `gateway`'s entries until `expires_at_ms`; returns the pairs that
    /// came online.
    async fn touch(
        &self,
        gateway: &str,
        entries: &[PresenceChange],
        expires_at_ms: i64,
    ) -> Result<Vec<PresenceChange>, EngineError>;
    /// Removes `gateway`'s entries; returns the pairs that went offline.
    async fn remove(
        &self,
        gateway: &str,
        entries: &[PresenceChange],
    ) -> Result<Vec<PresenceChange>, EngineError>;
    /// Removes up to `max` entries that expired at `now_ms`; returns the pairs that went offline.
    async fn expire(&self, now_ms: i64, max: usize) -> Result<Vec<PresenceChange>, EngineError>;
    /// Whether each user is online (connected to any gateway).
    async fn online(&self, users: &[Id]) -> Result<Vec<bool>, EngineError>;
    /// Members of `channel` online now.
    async fn channel_online(&self, channel: Id) -> Result<Vec<Id>, EngineError>;
}

/// Liveness of the engine's backing store.
#[async_trait]
pub trait Health: Send + Sync {
    /// Ok when the store answers.
    async fn ping(&self) -> Result<(), EngineError>;
}

/// The engine a service runs on: one handle per concern, all backed by the same store.
#[derive(Clone)]
pub struct Engine {
    /// Which implementation.
    pub kind: EngineKind,
    /// Materialised timelines.
    pub timelines: Arc<dyn TimelineStore>,
    /// Celebrity-follow cache.
    pub follow_cache: Arc<dyn FollowCache>,
    /// Post cache.
    pub posts: Arc<dyn PostCache>,
    /// Fan-out queue.
    pub fanout: Arc<dyn FanoutQueue>,
    /// Publish/subscribe.
    pub pubsub: Arc<dyn PubSub>,
    /// Presence with TTLs.
    pub presence: Arc<dyn PresenceStore>,
    health: Arc<dyn Health>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// A fresh in-process engine. Share the returned handle between services in one process.
    pub fn memory() -> Engine {
        let m = Arc::new(memory::MemoryEngine::default());
        Engine {
            kind: EngineKind::Memory,
            timelines: m.clone(),
            follow_cache: m.clone(),
            posts: m.clone(),
            fanout: m.clone(),
            pubsub: m.clone(),
            presence: m.clone(),
            health: m,
        }
    }

    /// A Redis engine; the connection is established in the background and re-established after
    /// Redis restarts, so a service can start before Redis answers.
    pub fn redis(settings: redis::RedisSettings) -> Result<Engine, EngineError> {
        let r = Arc::new(redis::RedisEngine::connect(settings)?);
        Ok(Engine {
            kind: EngineKind::Redis,
            timelines: r.clone(),
            follow_cache: r.clone(),
            posts: r.clone(),
            fanout: r.clone(),
            pubsub: r.clone(),
            presence: r.clone(),
            health: r,
        })
    }

    /// The engine configured by `common`.
    pub fn from_args(common: &crate::config::CommonArgs) -> Result<Engine, EngineError> {
        match common.engine {
            EngineKind::Memory => Ok(Engine::memory()),
            EngineKind::Redis => Engine::redis(redis::RedisSettings {
                url: common.redis_url.clone(),
                prefix: common.redis_prefix.clone(),
                pool_size: common.redis_pool,
            }),
        }
    }

    /// Ok when the backing store answers.
    pub async fn ping(&self) -> Result<(), EngineError> {
        self.health.ping().await
    }
}
