//! The in-process engine: the same semantics as Redis, held in this process's memory.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;

use super::{
    Delivery, EngineError, FanoutConsumer, FanoutJob, FanoutQueue, FollowCache, Health, PostCache,
    PresenceChange, PresenceStore, PubSub, Subscription, SubscriptionControl, TimelineKey,
    TimelineStore, TopicMessage,
};
use crate::ids::Id;
use crate::lock;

/// Capacity of the in-process pub/sub broadcast: how far a subscriber may fall behind.
const PUBSUB_CAPACITY: usize = 65_536;

/// All in-process state. Locks are held only for map operations, never across an await.
pub struct MemoryEngine {
    timelines: Mutex<HashMap<TimelineKey, Timeline>>,
    celebrities: Mutex<HashMap<Id, (Vec<Id>, Instant)>>,
    posts: Mutex<HashMap<Id, (Bytes, Instant)>>,
    queue: Arc<Queue>,
    bus: tokio::sync::broadcast::Sender<TopicMessage>,
    presence: Mutex<PresenceState>,
}

impl Default for MemoryEngine {
    fn default() -> Self {
        MemoryEngine {
            timelines: Mutex::default(),
            celebrities: Mutex::default(),
            posts: Mutex::default(),
            queue: Arc::default(),
            bus: tokio::sync::broadcast::channel(PUBSUB_CAPACITY).0,
            presence: Mutex::default(),
        }
    }
}

#[derive(Default)]
struct PresenceState {
    /// (channel, user, gateway) → expiry (Unix ms).
    entries: HashMap<(Id, Id, String), i64>,
    /// (channel, user) → number of gateways with an entry.
    counts: HashMap<(Id, Id), u32>,
}

impl PresenceState {
    fn drop_entry(&mut self, key: &(Id, Id, String)) -> Option<PresenceChange> {
        self.entries.remove(key)?;
        let pair = (key.0, key.1);
        let n = self.counts.entry(pair).or_default();
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.counts.remove(&pair);
            return Some(PresenceChange {
                channel: pair.0,
                user: pair.1,
            });
        }
        None
    }
}

/// A materialised timeline; `filled` turns true when the rebuild that materialised it fills it.
#[derive(Default)]
struct Timeline {
    ids: BTreeSet<Id>,
    filled: bool,
}

#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    ready: Notify,
}

#[derive(Default)]
struct QueueState {
    next_seq: u64,
    ready: VecDeque<(u64, FanoutJob)>,
    /// seq → (job, consumer, delivered at)
    pending: BTreeMap<u64, (FanoutJob, String, Instant)>,
}

/// Trims to `cap` once the set exceeds it by `slack` (the same bulk trimming as Redis).
fn trim(set: &mut BTreeSet<Id>, cap: usize, slack: usize) {
    if set.len() > cap + slack {
        while set.len() > cap {
            set.pop_first();
        }
    }
}

#[async_trait]
impl TimelineStore for MemoryEngine {
    async fn append(&self, keys: &[TimelineKey], post: Id, cap: usize) -> Result<u32, EngineError> {
        let mut timelines = lock(&self.timelines);
        let mut n = 0;
        for key in keys {
            if let Some(t) = timelines.get_mut(key) {
                t.ids.insert(post);
                trim(&mut t.ids, cap, cap / 16);
                n += 1;
            }
        }
        Ok(n)
    }

    async fn range(
        &self,
        keys: &[TimelineKey],
        before: Option<Id>,
        limit: usize,
    ) -> Result<Vec<Option<Vec<Id>>>, EngineError> {
        let timelines = lock(&self.timelines);
        Ok(keys
            .iter()
            .map(|key| {
                timelines
                    .get(key)
                    .filter(|t| t.filled)
                    .map(|t| match before {
                        Some(b) => t.ids.range(..b).rev().take(limit).copied().collect(),
                        None => t.ids.iter().rev().take(limit).copied().collect(),
                    })
            })
            .collect())
    }

    async fn materialise(&self, key: TimelineKey) -> Result<(), EngineError> {
        lock(&self.timelines).entry(key).or_default();
        Ok(())
    }

    async fn fill(&self, key: TimelineKey, posts: &[Id], cap: usize) -> Result<(), EngineError> {
        let mut timelines = lock(&self.timelines);
        if let Some(t) = timelines.get_mut(&key) {
            t.ids.extend(posts.iter().copied());
            trim(&mut t.ids, cap, 0);
            t.filled = true;
        }
        Ok(())
    }

    async fn remove(&self, key: TimelineKey) -> Result<(), EngineError> {
        lock(&self.timelines).remove(&key);
        Ok(())
    }
}

#[async_trait]
impl FollowCache for MemoryEngine {
    async fn celebrities_followed(&self, user: Id) -> Result<Option<Vec<Id>>, EngineError> {
        let mut map = lock(&self.celebrities);
        match map.get(&user) {
            Some((ids, expires)) if *expires > Instant::now() => Ok(Some(ids.clone())),
            Some(_) => {
                map.remove(&user);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn store_celebrities_followed(
        &self,
        user: Id,
        celebrities: &[Id],
        ttl: Duration,
    ) -> Result<(), EngineError> {
        let mut sorted = celebrities.to_vec();
        sorted.sort_unstable();
        lock(&self.celebrities).insert(user, (sorted, Instant::now() + ttl));
        Ok(())
    }

    async fn forget_celebrities_followed(&self, users: &[Id]) -> Result<(), EngineError> {
        let mut map = lock(&self.celebrities);
        for u in users {
            map.remove(u);
        }
        Ok(())
    }
}

#[async_trait]
impl PostCache for MemoryEngine {
    async fn get_many(&self, ids: &[Id]) -> Result<Vec<Option<Bytes>>, EngineError> {
        let posts = lock(&self.posts);
        let now = Instant::now();
        Ok(ids
            .iter()
            .map(|id| {
                posts
                    .get(id)
                    .filter(|(_, expires)| *expires > now)
                    .map(|(b, _)| b.clone())
            })
            .collect())
    }

    async fn put_many(&self, entries: &[(Id, Bytes)], ttl: Duration) -> Result<(), EngineError> {
        let mut posts = lock(&self.posts);
        let now = Instant::now();
        // Expired entries are dropped opportunistically so the cache does not grow forever.
        if posts.len() > 100_000 {
            posts.retain(|_, (_, expires)| *expires > now);
        }
        for (id, bytes) in entries {
            posts.insert(*id, (bytes.clone(), now + ttl));
        }
        Ok(())
    }
}

#[async_trait]
impl FanoutQueue for MemoryEngine {
    async fn publish(&self, job: FanoutJob) -> Result<(), EngineError> {
        {
            let mut q = lock(&self.queue.state);
            q.next_seq += 1;
            let seq = q.next_seq;
            q.ready.push_back((seq, job));
        }
        self.queue.ready.notify_one();
        Ok(())
    }

    async fn consumer(&self, name: &str) -> Result<Box<dyn FanoutConsumer>, EngineError> {
        Ok(Box::new(MemoryConsumer {
            queue: Arc::clone(&self.queue),
            name: name.to_owned(),
        }))
    }

    async fn backlog(&self) -> Result<u64, EngineError> {
        let q = lock(&self.queue.state);
        Ok((q.ready.len() + q.pending.len()) as u64)
    }
}

/// A member of the in-process consumer group. Dropping it without acking leaves its jobs
/// pending, to be reclaimed by another consumer — the same as a killed Redis consumer.
struct MemoryConsumer {
    queue: Arc<Queue>,
    name: String,
}

impl MemoryConsumer {
    fn take_ready(&self, max: usize) -> Vec<Delivery> {
        let mut q = lock(&self.queue.state);
        let now = Instant::now();
        let mut out = Vec::new();
        while out.len() < max {
            let Some((seq, job)) = q.ready.pop_front() else {
                break;
            };
            q.pending.insert(seq, (job, self.name.clone(), now));
            out.push(Delivery {
                id: seq.to_string(),
                job,
            });
        }
        out
    }
}

#[async_trait]
impl FanoutConsumer for MemoryConsumer {
    async fn receive(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, EngineError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register interest before checking, so a publish in between is not missed.
            let notified = self.queue.ready.notified();
            let batch = self.take_ready(max);
            if !batch.is_empty() {
                return Ok(batch);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn reclaim(
        &mut self,
        min_idle: Duration,
        max: usize,
    ) -> Result<Vec<Delivery>, EngineError> {
        let mut q = lock(&self.queue.state);
        let now = Instant::now();
        let mut out = Vec::new();
        for (seq, (job, owner, delivered)) in q.pending.iter_mut() {
            if out.len() >= max {
                break;
            }
            if now.duration_since(*delivered) >= min_idle {
                *owner = self.name.clone();
                *delivered = now;
                out.push(Delivery {
                    id: seq.to_string(),
                    job: *job,
                });
            }
        }
        Ok(out)
    }

    async fn ack(&mut self, ids: &[String]) -> Result<(), EngineError> {
        let mut q = lock(&self.queue.state);
        for id in ids {
            if let Ok(seq) = id.parse::<u64>() {
                q.pending.remove(&seq);
            }
        }
        Ok(())
    }
}

#[async_trait]
impl PubSub for MemoryEngine {
    async fn publish(&self, topic: &str, payload: Bytes) -> Result<u64, EngineError> {
        let message = TopicMessage {
            topic: topic.to_owned(),
            payload,
        };
        Ok(self.bus.send(message).map_or(0, |n| n as u64))
    }

    async fn publish_many(&self, messages: &[(String, Bytes)]) -> Result<(), EngineError> {
        for (topic, payload) in messages {
            let _ = self.bus.send(TopicMessage {
                topic: topic.clone(),
                payload: payload.clone(),
            });
        }
        Ok(())
    }

    async fn subscriber(&self) -> Result<Subscription, EngineError> {
        // Every subscriber sees the whole bus and keeps the topics it asked for.
        let topics = Arc::new(Mutex::new(std::collections::HashSet::<String>::new()));
        let (tx, rx) = tokio::sync::broadcast::channel(PUBSUB_CAPACITY);
        let mut bus = self.bus.subscribe();
        let wanted = Arc::clone(&topics);
        tokio::spawn(async move {
            loop {
                match bus.recv().await {
                    Ok(m) => {
                        if lock(&wanted).contains(&m.topic) && tx.send(m).is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "in-process subscriber fell behind");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
                if tx.receiver_count() == 0 {
                    return;
                }
            }
        });
        Ok(Subscription {
            control: Arc::new(MemoryTopics(topics)),
            messages: rx,
        })
    }
}

/// The topic set of an in-process subscriber.
struct MemoryTopics(Arc<Mutex<std::collections::HashSet<String>>>);

#[async_trait]
impl SubscriptionControl for MemoryTopics {
    async fn subscribe(&self, topic: &str) -> Result<(), EngineError> {
        lock(&self.0).insert(topic.to_owned());
        Ok(())
    }

    async fn unsubscribe(&self, topic: &str) -> Result<(), EngineError> {
        lock(&self.0).remove(topic);
        Ok(())
    }
}

#[async_trait]
impl PresenceStore for MemoryEngine {
    async fn touch(
        &self,
        gateway: &str,
        entries: &[PresenceChange],
        expires_at_ms: i64,
    ) -> Result<Vec<PresenceChange>, EngineError> {
        let mut p = lock(&self.presence);
        let mut online = Vec::new();
        for e in entries {
            let key = (e.channel, e.user, gateway.to_owned());
            if p.entries.insert(key, expires_at_ms).is_none() {
                let n = p.counts.entry((e.channel, e.user)).or_default();
                *n += 1;
                if *n == 1 {
                    online.push(*e);
                }
            }
        }
        Ok(online)
    }

    async fn remove(
        &self,
        gateway: &str,
        entries: &[PresenceChange],
    ) -> Result<Vec<PresenceChange>, EngineError> {
        let mut p = lock(&self.presence);
        Ok(entries
            .iter()
            .filter_map(|e| p.drop_entry(&(e.channel, e.user, gateway.to_owned())))
            .collect())
    }

    async fn expire(&self, now_ms: i64, max: usize) -> Result<Vec<PresenceChange>, EngineError> {
        let mut p = lock(&self.presence);
        let expired: Vec<(Id, Id, String)> = p
            .entries
            .iter()
            .filter(|(_, expiry)| **expiry <= now_ms)
            .map(|(k, _)| k.clone())
            .take(max)
            .collect();
        Ok(expired.iter().filter_map(|k| p.drop_entry(k)).collect())
    }

    async fn online(&self, users: &[Id]) -> Result<Vec<bool>, EngineError> {
        let p = lock(&self.presence);
        Ok(users
            .iter()
            .map(|u| p.counts.contains_key(&(Id(0), *u)))
            .collect())
    }

    async fn channel_online(&self, channel: Id) -> Result<Vec<Id>, EngineError> {
        let p = lock(&self.presence);
        let mut users: Vec<Id> = p
            .counts
            .keys()
            .filter(|(c, _)| *c == channel)
            .map(|(_, u)| *u)
            .collect();
        users.sort_unstable();
        Ok(users)
    }
}

#[async_trait]
impl Health for MemoryEngine {
    async fn ping(&self) -> Result<(), EngineError> {
        Ok(())
    }
}
