//! The in-process engine: the same semantics as Redis, held in this process's memory.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;

use super::{
    Delivery, EngineError, FanoutConsumer, FanoutJob, FanoutQueue, FollowCache, Health, PostCache,
    TimelineKey, TimelineStore,
};
use crate::ids::Id;

/// All in-process state. Locks are held only for map operations, never across an await.
#[derive(Default)]
pub struct MemoryEngine {
    timelines: Mutex<HashMap<TimelineKey, BTreeSet<Id>>>,
    celebrities: Mutex<HashMap<Id, (Vec<Id>, Instant)>>,
    posts: Mutex<HashMap<Id, (Bytes, Instant)>>,
    queue: Arc<Queue>,
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the maps half-updated in a way that
    // matters (each operation is a single insert/remove), so recover instead of cascading.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
            if let Some(set) = timelines.get_mut(key) {
                set.insert(post);
                trim(set, cap, cap / 16);
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
                timelines.get(key).map(|set| match before {
                    Some(b) => set.range(..b).rev().take(limit).copied().collect(),
                    None => set.iter().rev().take(limit).copied().collect(),
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
        if let Some(set) = timelines.get_mut(&key) {
            set.extend(posts.iter().copied());
            trim(set, cap, 0);
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
impl Health for MemoryEngine {
    async fn ping(&self) -> Result<(), EngineError> {
        Ok(())
    }
}
