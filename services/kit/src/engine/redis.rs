//! The Redis engine (fred). Key layout, under the configured prefix `P`:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P tl:h:<user>` | sorted set | home timeline: members are 16-hex-digit post ids, scores are the id's millisecond timestamp; the member `""` marks the timeline materialised: at score -2 while a rebuild fills it (readers treat it as missing), at -1 once filled |
//! | `P tl:a:<author>` | sorted set | author timeline, same encoding |
//! | `P celebs:<user>` | set | celebrities `user` follows (member `""` marks it cached), with a TTL |
//! | `P post:<id>` | string | protobuf-encoded post, with a TTL |
//! | `P fanout` | stream | fan-out jobs (`post`, `author`), consumer group `fanout` |
//! | `P pres:all` | sorted set | presence entries `channel\|user\|gateway` scored by expiry (Unix ms) |
//! | `P pres:cnt:<channel>` | hash | user → gateways with an unexpired entry (online while > 0; channel 0 = connected) |
//! | `P <topic>` | pub/sub channel | topics published through [`PubSub`] |
//!
//! Scores are milliseconds, not ids: a 63-bit snowflake does not fit an f64 exactly. Members are
//! fixed-width hex so that Redis' lexicographic tie-break equals numeric order.

use std::sync::Arc;
use std::time::Duration;

use crate::telemetry::ClientSpan;
use async_trait::async_trait;
use bytes::Bytes;
use fred::prelude::*;
use fred::types::scripts::Script;
use fred::types::{Expiration, Value};

use super::{
    Delivery, EngineError, FanoutConsumer, FanoutJob, FanoutQueue, FollowCache, Health, PostCache,
    PresenceChange, PresenceStore, PubSub, Subscription, SubscriptionControl, TimelineKey,
    TimelineStore, TopicMessage,
};
use crate::ids::Id;

/// How to reach Redis.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://host:port[/db]`.
    pub url: String,
    /// Prefix of every key.
    pub prefix: String,
    /// Connections in the pool.
    pub pool_size: usize,
}

/// The client span of one engine operation (one Redis round trip, or a few for chunked ones),
/// named `<command> <what>`. Only inside sampled work: background loops (consumer reads,
/// presence expiry) would otherwise start a trace per poll, and unsampled requests would pay
/// for spans nobody sees.
fn op_span(name: &'static str, command: &'static str) -> ClientSpan {
    ClientSpan::start(|| {
        (
            name.into(),
            vec![
                opentelemetry::KeyValue::new("db.system.name", "redis"),
                opentelemetry::KeyValue::new("db.operation.name", command),
            ],
        )
    })
}

const GROUP: &str = "fanout";
/// Bound on the stream length. Acked entries are deleted, so this only bites if workers are down
/// for a long time; the database sweep re-publishes anything trimmed away.
const STREAM_MAX_LEN: i64 = 1_000_000;
/// Posts per fill script call.
const FILL_CHUNK: usize = 1_000;

/// Appends to materialised timelines. KEYS: timelines; ARGV: member, score, cap.
/// A materialised timeline always has at least its marker (score -2 or -1), so ZCARD tells missing
/// from materialised in one O(1) call. Trimming keeps rank 0 (the marker) and the newest `cap`;
/// it happens in bulk once a timeline exceeds its cap by 1/16, which saves a command on almost
/// every append (the dominant Redis cost of fan-out).
const APPEND_LUA: &str = r#"
local n = 0
local cap = tonumber(ARGV[3])
local slack = math.floor(cap / 16)
for _, key in ipairs(KEYS) do
  local card = redis.call('ZCARD', key)
  if card > 0 then
    card = card + redis.call('ZADD', key, ARGV[2], ARGV[1])
    if card > cap + 1 + slack then
      redis.call('ZREMRANGEBYRANK', key, 1, card - cap - 1)
    end
    n = n + 1
  end
end
return n
"#;

/// Reads timelines. KEYS: timelines; ARGV: max score (inclusive), count.
/// Returns, per key, false when missing or still being filled by a rebuild (marker at -2), else
/// members newest first. Scripts see RESP2 replies: ZSCORE gives a string, or false when absent.
const RANGE_LUA: &str = r#"
local out = {}
for i, key in ipairs(KEYS) do
  local marker = redis.call('ZSCORE', key, '')
  if marker and tonumber(marker) == -1 then
    out[i] = redis.call('ZREVRANGEBYSCORE', key, ARGV[1], 0, 'LIMIT', 0, tonumber(ARGV[2]))
  else
    out[i] = false
  end
end
return out
"#;

/// Fills a materialised timeline. KEYS: timeline; ARGV: cap, last chunk (1/0), then
/// score/member pairs. The last chunk marks the timeline filled (marker to -1), which makes it
/// readable. A missing timeline was invalidated while being rebuilt: it stays missing (returns 0).
const FILL_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
for i = 3, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('ZREMRANGEBYRANK', KEYS[1], 1, -(tonumber(ARGV[1]) + 1))
if ARGV[2] == '1' then
  redis.call('ZADD', KEYS[1], 'XX', -1, '')
end
return 1
"#;

/// Replaces a cached set. KEYS: set; ARGV: ttl seconds, members.
const STORE_SET_LUA: &str = r#"
redis.call('DEL', KEYS[1])
redis.call('SADD', KEYS[1], '')
for i = 2, #ARGV do
  redis.call('SADD', KEYS[1], ARGV[i])
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"#;

/// Adds presence entries. KEYS: the entries index; ARGV: prefix, expiry, gateway, then
/// channel/user pairs. Returns the pairs that came online (flattened).
const PRESENCE_TOUCH_LUA: &str = r#"
local out = {}
local prefix, expiry, gateway = ARGV[1], ARGV[2], ARGV[3]
for i = 4, #ARGV, 2 do
  local c, u = ARGV[i], ARGV[i + 1]
  if redis.call('ZADD', KEYS[1], expiry, c .. '|' .. u .. '|' .. gateway) == 1 then
    if redis.call('HINCRBY', prefix .. 'pres:cnt:' .. c, u, 1) == 1 then
      out[#out + 1] = c
      out[#out + 1] = u
    end
  end
end
return out
"#;

/// Removes presence entries. KEYS: the entries index; ARGV: prefix, gateway, then pairs.
/// Returns the pairs that went offline.
const PRESENCE_REMOVE_LUA: &str = r#"
local out = {}
local prefix, gateway = ARGV[1], ARGV[2]
for i = 3, #ARGV, 2 do
  local c, u = ARGV[i], ARGV[i + 1]
  if redis.call('ZREM', KEYS[1], c .. '|' .. u .. '|' .. gateway) == 1 then
    local key = prefix .. 'pres:cnt:' .. c
    if redis.call('HINCRBY', key, u, -1) <= 0 then
      redis.call('HDEL', key, u)
      out[#out + 1] = c
      out[#out + 1] = u
    end
  end
end
return out
"#;

/// Removes expired presence entries. KEYS: the entries index; ARGV: prefix, now, max.
/// Returns the pairs that went offline.
const PRESENCE_EXPIRE_LUA: &str = r#"
local out = {}
local prefix = ARGV[1]
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(expired) do
  redis.call('ZREM', KEYS[1], member)
  local c, u = string.match(member, '^(%d+)|(%d+)|')
  if c then
    local key = prefix .. 'pres:cnt:' .. c
    if redis.call('HINCRBY', key, u, -1) <= 0 then
      redis.call('HDEL', key, u)
      out[#out + 1] = c
      out[#out + 1] = u
    end
  end
end
return out
"#;

/// The Redis-backed engine.
pub struct RedisEngine {
    builder: Builder,
    pool: Pool,
    prefix: String,
    append: Script,
    range: Script,
    fill: Script,
    store_set: Script,
    presence_touch: Script,
    presence_remove: Script,
    presence_expire: Script,
}

fn builder(url: &str) -> Result<Builder, EngineError> {
    let config = Config::from_url(url)?;
    let mut builder = Builder::from_config(config);
    builder
        .with_config(|c| {
            // Start even when Redis is down; readiness reports it and commands fail fast.
            c.fail_fast = false;
        })
        .with_performance_config(|p| {
            // Above the 1 s XREADGROUP block, below any client-facing deadline.
            p.default_command_timeout = Duration::from_secs(3);
        })
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.internal_command_timeout = Duration::from_secs(2);
            c.max_command_attempts = 2;
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2));
    Ok(builder)
}

impl RedisEngine {
    /// Connects in the background (reconnecting forever with backoff).
    pub fn connect(settings: RedisSettings) -> Result<Self, EngineError> {
        let builder = builder(&settings.url)?;
        let pool = builder.build_pool(settings.pool_size.max(1))?;
        // Connection tasks run in the background; `fail_fast = false` makes them retry until Redis
        // answers instead of failing the service at start.
        let _ = pool.connect_pool();
        Ok(RedisEngine {
            builder,
            pool,
            prefix: settings.prefix,
            append: Script::from_lua(APPEND_LUA),
            range: Script::from_lua(RANGE_LUA),
            fill: Script::from_lua(FILL_LUA),
            store_set: Script::from_lua(STORE_SET_LUA),
            presence_touch: Script::from_lua(PRESENCE_TOUCH_LUA),
            presence_remove: Script::from_lua(PRESENCE_REMOVE_LUA),
            presence_expire: Script::from_lua(PRESENCE_EXPIRE_LUA),
        })
    }

    fn timeline_key(&self, key: TimelineKey) -> String {
        match key {
            TimelineKey::Home(u) => format!("{}tl:h:{}", self.prefix, u),
            TimelineKey::Author(u) => format!("{}tl:a:{}", self.prefix, u),
        }
    }

    fn celebs_key(&self, user: Id) -> String {
        format!("{}celebs:{}", self.prefix, user)
    }

    fn post_key(&self, id: Id) -> String {
        format!("{}post:{}", self.prefix, id)
    }

    fn stream_key(&self) -> String {
        format!("{}fanout", self.prefix)
    }
}

fn member(id: Id) -> String {
    format!("{:016x}", id.0)
}

fn parse_member(key: &str, v: &Value) -> Result<Option<Id>, EngineError> {
    let s = v.as_str().ok_or_else(|| EngineError::Corrupt {
        key: key.to_owned(),
        detail: format!("member is not a string: {v:?}"),
    })?;
    if s.is_empty() {
        return Ok(None);
    }
    u64::from_str_radix(&s, 16)
        .map(|n| Some(Id(n)))
        .map_err(|e| EngineError::Corrupt {
            key: key.to_owned(),
            detail: format!("member {s:?}: {e}"),
        })
}

#[async_trait]
impl TimelineStore for RedisEngine {
    async fn append(&self, keys: &[TimelineKey], post: Id, cap: usize) -> Result<u32, EngineError> {
        op_span("EVALSHA timeline append", "EVALSHA")
            .run(async {
                if keys.is_empty() {
                    return Ok(0);
                }
                let redis_keys: Vec<String> = keys.iter().map(|k| self.timeline_key(*k)).collect();
                let n: i64 = self
                    .append
                    .evalsha_with_reload(
                        self.pool.next(),
                        redis_keys,
                        vec![member(post), post.epoch_ms().to_string(), cap.to_string()],
                    )
                    .await?;
                Ok(n as u32)
            })
            .await
    }

    async fn range(
        &self,
        keys: &[TimelineKey],
        before: Option<Id>,
        limit: usize,
    ) -> Result<Vec<Option<Vec<Id>>>, EngineError> {
        op_span("EVALSHA timeline range", "EVALSHA")
            .run(async {
                if keys.is_empty() {
                    return Ok(Vec::new());
                }
                let redis_keys: Vec<String> = keys.iter().map(|k| self.timeline_key(*k)).collect();
                let max = before.map_or_else(|| "+inf".to_owned(), |b| b.epoch_ms().to_string());
                // Entries sharing `before`'s millisecond are filtered here; over-fetch a little so that
                // filtering rarely leaves a page short, and retry with more when it does.
                let mut extra = 16usize;
                loop {
                    let fetch = limit + if before.is_some() { extra } else { 0 };
                    let value: Value = self
                        .range
                        .evalsha_with_reload(
                            self.pool.next(),
                            redis_keys.clone(),
                            vec![max.clone(), fetch.to_string()],
                        )
                        .await?;
                    let mut short = false;
                    let mut out = Vec::with_capacity(keys.len());
                    for (i, entry) in value.into_array().into_iter().enumerate() {
                        let key = redis_keys.get(i).map_or("?", String::as_str);
                        if entry.is_null() || matches!(entry, Value::Boolean(false)) {
                            out.push(None);
                            continue;
                        }
                        let raw = entry.into_array();
                        let raw_len = raw.len();
                        let mut ids = Vec::with_capacity(raw_len.min(limit));
                        for v in &raw {
                            if let Some(id) = parse_member(key, v)?
                                && before.is_none_or(|b| id < b)
                                && ids.len() < limit
                            {
                                ids.push(id);
                            }
                        }
                        if raw_len == fetch && ids.len() < limit {
                            short = true;
                        }
                        out.push(Some(ids));
                    }
                    out.resize(keys.len(), None);
                    if !short || extra > 65_536 {
                        return Ok(out);
                    }
                    extra *= 8;
                }
            })
            .await
    }

    async fn materialise(&self, key: TimelineKey) -> Result<(), EngineError> {
        op_span("ZADD timeline materialise", "ZADD")
            .run(async {
                let _: Value = self
                    .pool
                    .zadd(
                        self.timeline_key(key),
                        Some(SetOptions::NX),
                        None,
                        false,
                        false,
                        (-2.0, ""),
                    )
                    .await?;
                Ok(())
            })
            .await
    }

    async fn fill(&self, key: TimelineKey, posts: &[Id], cap: usize) -> Result<(), EngineError> {
        op_span("EVALSHA timeline fill", "EVALSHA")
            .run(async {
                // Chunked so one script call stays small even for a cap of many thousands; an
                // empty rebuild still needs one call, to mark the timeline filled.
                let mut chunks: Vec<&[Id]> = posts.chunks(FILL_CHUNK).collect();
                if chunks.is_empty() {
                    chunks.push(&[]);
                }
                let last = chunks.len() - 1;
                for (i, chunk) in chunks.into_iter().enumerate() {
                    let mut args = Vec::with_capacity(2 + chunk.len() * 2);
                    args.push(cap.to_string());
                    args.push(if i == last { "1" } else { "0" }.to_owned());
                    for p in chunk {
                        args.push(p.epoch_ms().to_string());
                        args.push(member(*p));
                    }
                    let _: Value = self
                        .fill
                        .evalsha_with_reload(self.pool.next(), vec![self.timeline_key(key)], args)
                        .await?;
                }
                Ok(())
            })
            .await
    }

    async fn remove(&self, key: TimelineKey) -> Result<(), EngineError> {
        op_span("DEL timeline remove", "DEL")
            .run(async {
                let _: i64 = self.pool.del(self.timeline_key(key)).await?;
                Ok(())
            })
            .await
    }
}

#[async_trait]
impl FollowCache for RedisEngine {
    async fn celebrities_followed(&self, user: Id) -> Result<Option<Vec<Id>>, EngineError> {
        op_span("SMEMBERS celebrities get", "SMEMBERS")
            .run(async {
                let key = self.celebs_key(user);
                let members: Vec<String> = self.pool.smembers(&key).await?;
                if members.is_empty() {
                    return Ok(None);
                }
                let mut ids = Vec::with_capacity(members.len());
                for m in members.iter().filter(|m| !m.is_empty()) {
                    ids.push(m.parse::<Id>().map_err(|e| EngineError::Corrupt {
                        key: key.clone(),
                        detail: e.to_string(),
                    })?);
                }
                ids.sort_unstable();
                Ok(Some(ids))
            })
            .await
    }

    async fn store_celebrities_followed(
        &self,
        user: Id,
        celebrities: &[Id],
        ttl: Duration,
    ) -> Result<(), EngineError> {
        op_span("EVALSHA celebrities store", "EVALSHA")
            .run(async {
                let mut args = Vec::with_capacity(celebrities.len() + 1);
                args.push(ttl.as_secs().max(1).to_string());
                args.extend(celebrities.iter().map(Id::to_string));
                let _: Value = self
                    .store_set
                    .evalsha_with_reload(self.pool.next(), vec![self.celebs_key(user)], args)
                    .await?;
                Ok(())
            })
            .await
    }

    async fn forget_celebrities_followed(&self, users: &[Id]) -> Result<(), EngineError> {
        op_span("DEL celebrities forget", "DEL")
            .run(async {
                for chunk in users.chunks(1_000) {
                    let keys: Vec<String> = chunk.iter().map(|u| self.celebs_key(*u)).collect();
                    let _: i64 = self.pool.del(keys).await?;
                }
                Ok(())
            })
            .await
    }
}

#[async_trait]
impl PostCache for RedisEngine {
    async fn get_many(&self, ids: &[Id]) -> Result<Vec<Option<Bytes>>, EngineError> {
        op_span("MGET post cache get", "MGET")
            .run(async {
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let keys: Vec<String> = ids.iter().map(|id| self.post_key(*id)).collect();
                let values: Vec<Option<Bytes>> = if keys.len() == 1 {
                    vec![self.pool.get(&keys[0]).await?]
                } else {
                    self.pool.mget(keys).await?
                };
                Ok(values)
            })
            .await
    }

    async fn put_many(&self, entries: &[(Id, Bytes)], ttl: Duration) -> Result<(), EngineError> {
        op_span("SET post cache put", "SET")
            .run(async {
                if entries.is_empty() {
                    return Ok(());
                }
                let client = self.pool.next();
                let pipeline = client.pipeline();
                for (id, bytes) in entries {
                    let _: () = pipeline
                        .set(
                            self.post_key(*id),
                            bytes.clone(),
                            Some(Expiration::EX(ttl.as_secs().max(1) as i64)),
                            None,
                            false,
                        )
                        .await?;
                }
                let _: Vec<Value> = pipeline.all().await?;
                Ok(())
            })
            .await
    }
}

#[async_trait]
impl FanoutQueue for RedisEngine {
    async fn publish(&self, job: FanoutJob) -> Result<(), EngineError> {
        op_span("XADD fanout publish", "XADD")
            .run(async {
                let _: Value = self
                    .pool
                    .xadd(
                        self.stream_key(),
                        false,
                        ("MAXLEN", "~", STREAM_MAX_LEN),
                        "*",
                        {
                            let mut fields = vec![
                                ("post", job.post.to_string()),
                                ("author", job.author.to_string()),
                            ];
                            if let Some(tp) = job.trace {
                                fields.push(("traceparent", tp.to_string()));
                            }
                            fields
                        },
                    )
                    .await?;
                Ok(())
            })
            .await
    }

    async fn consumer(&self, name: &str) -> Result<Box<dyn FanoutConsumer>, EngineError> {
        // Blocking reads get their own connection so they never stall the shared pool.
        let client = self.builder.build()?;
        // The connection task runs detached; dropping its handle does not stop it.
        drop(client.connect());
        let consumer = RedisConsumer {
            client,
            stream: self.stream_key(),
            name: name.to_owned(),
        };
        Ok(Box::new(consumer))
    }

    async fn backlog(&self) -> Result<u64, EngineError> {
        // Acked entries are deleted, so the stream length is what is waiting or in flight.
        let n: u64 = self.pool.xlen(self.stream_key()).await?;
        Ok(n)
    }
}

struct RedisConsumer {
    client: Client,
    stream: String,
    name: String,
}

impl Drop for RedisConsumer {
    fn drop(&mut self) {
        let client = self.client.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = client.quit().await;
            });
        }
    }
}

fn is_nogroup(e: &fred::error::Error) -> bool {
    e.details().contains("NOGROUP")
}

impl RedisConsumer {
    /// Creates the group (and stream) if missing — at start, and again after Redis lost its
    /// data. Reading from `0` picks up jobs published before the group existed.
    async fn ensure_group(&self) -> Result<(), EngineError> {
        let created: Result<Value, _> = self
            .client
            .xgroup_create(&self.stream, GROUP, "0", true)
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(e) if e.details().contains("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Parses stream entries (`[id, [field, value, …]]`, nil for deleted ones); malformed
    /// entries are logged and acked so they do not come back forever.
    async fn deliveries(&mut self, entries: Vec<Value>) -> Result<Vec<Delivery>, EngineError> {
        let mut out = Vec::new();
        let mut malformed = Vec::new();
        for entry in entries {
            if entry.is_null() {
                continue;
            }
            let mut pair = entry.into_array().into_iter();
            let (Some(id), Some(fields)) = (pair.next(), pair.next()) else {
                continue;
            };
            let Some(id) = id.as_string() else { continue };
            let mut map = std::collections::HashMap::new();
            for kv in fields.into_array().chunks(2) {
                if let [k, v] = kv
                    && let (Some(k), Some(v)) = (k.as_string(), v.as_string())
                {
                    map.insert(k, v);
                }
            }
            match self.parse_fields(&id, &map) {
                Some(d) => out.push(d),
                None => malformed.push(id),
            }
        }
        if !malformed.is_empty() {
            self.ack(&malformed).await?;
        }
        Ok(out)
    }

    fn parse_fields(
        &self,
        id: &str,
        fields: &std::collections::HashMap<String, String>,
    ) -> Option<Delivery> {
        let post = fields.get("post").and_then(|v| v.parse::<Id>().ok());
        let author = fields.get("author").and_then(|v| v.parse::<Id>().ok());
        // A bad traceparent costs the link, not the job.
        let trace = fields.get("traceparent").and_then(|v| v.parse().ok());
        match (post, author) {
            (Some(post), Some(author)) => Some(Delivery {
                id: id.to_owned(),
                job: FanoutJob {
                    post,
                    author,
                    trace,
                },
            }),
            _ => {
                tracing::warn!(stream = %self.stream, entry = %id, ?fields, "skipping malformed fan-out entry");
                None
            }
        }
    }
}

#[async_trait]
impl FanoutConsumer for RedisConsumer {
    async fn receive(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, EngineError> {
        for attempt in 0..2 {
            let result: Result<Value, _> = self
                .client
                .xreadgroup(
                    GROUP,
                    &self.name,
                    Some(max as u64),
                    Some(wait.as_millis().max(1) as u64),
                    false,
                    &self.stream,
                    ">",
                )
                .await;
            match result {
                Ok(value) => {
                    // Reply: nil on timeout, else [[stream, [entry, …]]] (a map under RESP3).
                    let streams = match value {
                        Value::Map(map) => map.inner().into_values().collect(),
                        other => other
                            .into_array()
                            .into_iter()
                            .filter_map(|pair| pair.into_array().into_iter().nth(1))
                            .collect::<Vec<_>>(),
                    };
                    let entries = streams.into_iter().flat_map(Value::into_array).collect();
                    return self.deliveries(entries).await;
                }
                Err(e) if is_nogroup(&e) && attempt == 0 => self.ensure_group().await?,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Vec::new())
    }

    async fn reclaim(
        &mut self,
        min_idle: Duration,
        max: usize,
    ) -> Result<Vec<Delivery>, EngineError> {
        let result: Result<Value, _> = self
            .client
            .xautoclaim(
                &self.stream,
                GROUP,
                &self.name,
                min_idle.as_millis() as u64,
                "0-0",
                Some(max as u64),
                false,
            )
            .await;
        let value = match result {
            Ok(v) => v,
            Err(e) if is_nogroup(&e) => {
                self.ensure_group().await?;
                return Ok(Vec::new());
            }
            Err(e) => return Err(e.into()),
        };
        // Reply: [next-cursor, [[id, [field, value, …]] | nil, …], [deleted ids] (Redis ≥ 7)].
        let mut parts = value.into_array().into_iter();
        let _cursor = parts.next();
        let entries = parts.next().map(Value::into_array).unwrap_or_default();
        self.deliveries(entries).await
    }

    async fn ack(&mut self, ids: &[String]) -> Result<(), EngineError> {
        if ids.is_empty() {
            return Ok(());
        }
        let _: i64 = self.client.xack(&self.stream, GROUP, ids.to_vec()).await?;
        let _: i64 = self.client.xdel(&self.stream, ids.to_vec()).await?;
        Ok(())
    }
}

/// How far a subscriber may fall behind before it loses messages.
const PUBSUB_CAPACITY: usize = 65_536;

#[async_trait]
impl PubSub for RedisEngine {
    async fn publish(&self, topic: &str, payload: Bytes) -> Result<u64, EngineError> {
        op_span("PUBLISH pubsub publish", "PUBLISH")
            .run(async {
                let n: i64 = self
                    .pool
                    .next()
                    .publish(format!("{}{topic}", self.prefix), payload)
                    .await?;
                Ok(n.max(0) as u64)
            })
            .await
    }

    async fn publish_many(&self, messages: &[(String, Bytes)]) -> Result<(), EngineError> {
        op_span("PUBLISH pubsub publish", "PUBLISH")
            .run(async {
                if messages.is_empty() {
                    return Ok(());
                }
                // One pipeline on one connection keeps the order.
                let pipeline = self.pool.next().pipeline();
                for (topic, payload) in messages {
                    let _: () = pipeline
                        .publish(format!("{}{topic}", self.prefix), payload.clone())
                        .await?;
                }
                let results: Vec<Value> = pipeline.all().await?;
                drop(results);
                Ok(())
            })
            .await
    }

    async fn subscriber(&self) -> Result<Subscription, EngineError> {
        let mut builder = self.builder.clone();
        builder.with_performance_config(|p| p.broadcast_channel_capacity = PUBSUB_CAPACITY);
        let client = builder.build_subscriber_client()?;
        drop(client.connect());
        // Re-subscribes every tracked channel after a reconnect (e.g. a Redis restart).
        drop(client.manage_subscriptions());
        let mut incoming = client.message_rx();
        let (tx, rx) = tokio::sync::broadcast::channel(PUBSUB_CAPACITY);
        let prefix = self.prefix.clone();
        tokio::spawn(async move {
            loop {
                match incoming.recv().await {
                    Ok(m) => {
                        let channel = m.channel.to_string();
                        let topic = channel.strip_prefix(&prefix).unwrap_or(&channel).to_owned();
                        let payload = m.value.into_bytes().unwrap_or_default();
                        if tx.send(TopicMessage { topic, payload }).is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "redis subscriber fell behind");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Subscription {
            control: Arc::new(RedisTopics {
                client,
                prefix: self.prefix.clone(),
            }),
            messages: rx,
        })
    }
}

/// Topics of one Redis subscriber connection.
struct RedisTopics {
    client: fred::clients::SubscriberClient,
    prefix: String,
}

impl Drop for RedisTopics {
    fn drop(&mut self) {
        let client = self.client.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = client.quit().await;
            });
        }
    }
}

#[async_trait]
impl SubscriptionControl for RedisTopics {
    async fn subscribe(&self, topic: &str) -> Result<(), EngineError> {
        self.client
            .subscribe(format!("{}{topic}", self.prefix))
            .await?;
        Ok(())
    }

    async fn unsubscribe(&self, topic: &str) -> Result<(), EngineError> {
        self.client
            .unsubscribe(format!("{}{topic}", self.prefix))
            .await?;
        Ok(())
    }
}

fn presence_args(entries: &[PresenceChange]) -> impl Iterator<Item = String> + '_ {
    entries
        .iter()
        .flat_map(|e| [e.channel.0.to_string(), e.user.0.to_string()])
}

fn presence_pairs(key: &str, value: Value) -> Result<Vec<PresenceChange>, EngineError> {
    let flat = value.into_array();
    let mut out = Vec::with_capacity(flat.len() / 2);
    for pair in flat.chunks(2) {
        let parse = |v: &Value| {
            v.as_str()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| EngineError::Corrupt {
                    key: key.to_owned(),
                    detail: format!("presence id {v:?}"),
                })
        };
        if let [c, u] = pair {
            out.push(PresenceChange {
                channel: Id(parse(c)?),
                user: Id(parse(u)?),
            });
        }
    }
    Ok(out)
}

impl RedisEngine {
    fn presence_key(&self) -> String {
        format!("{}pres:all", self.prefix)
    }

    /// Runs a presence script over `entries`, `head` then the entries' arguments each call,
    /// chunked (one script call holds Redis for its whole length); the changes it reports.
    async fn presence_script(
        &self,
        script: &Script,
        head: &[String],
        entries: &[PresenceChange],
    ) -> Result<Vec<PresenceChange>, EngineError> {
        let key = self.presence_key();
        let mut out = Vec::new();
        for chunk in entries.chunks(500) {
            let mut args = head.to_vec();
            args.extend(presence_args(chunk));
            let v: Value = script
                .evalsha_with_reload(self.pool.next(), vec![key.clone()], args)
                .await?;
            out.extend(presence_pairs(&key, v)?);
        }
        Ok(out)
    }
}

#[async_trait]
impl PresenceStore for RedisEngine {
    async fn touch(
        &self,
        gateway: &str,
        entries: &[PresenceChange],
        expires_at_ms: i64,
    ) -> Result<Vec<PresenceChange>, EngineError> {
        op_span("EVALSHA presence touch", "EVALSHA")
            .run(async {
                let head = [
                    self.prefix.clone(),
                    expires_at_ms.to_string(),
                    gateway.to_owned(),
                ];
                self.presence_script(&self.presence_touch, &head, entries)
                    .await
            })
            .await
    }

    async fn remove(
        &self,
        gateway: &str,
        entries: &[PresenceChange],
    ) -> Result<Vec<PresenceChange>, EngineError> {
        op_span("EVALSHA presence remove", "EVALSHA")
            .run(async {
                let head = [self.prefix.clone(), gateway.to_owned()];
                self.presence_script(&self.presence_remove, &head, entries)
                    .await
            })
            .await
    }

    async fn expire(&self, now_ms: i64, max: usize) -> Result<Vec<PresenceChange>, EngineError> {
        op_span("EVALSHA presence expire", "EVALSHA")
            .run(async {
                let args = vec![
                    self.prefix.clone(),
                    now_ms.to_string(),
                    max.max(1).to_string(),
                ];
                let v: Value = self
                    .presence_expire
                    .evalsha_with_reload(self.pool.next(), vec![self.presence_key()], args)
                    .await?;
                presence_pairs(&self.presence_key(), v)
            })
            .await
    }

    async fn online(&self, users: &[Id]) -> Result<Vec<bool>, EngineError> {
        op_span("HMGET presence online", "HMGET")
            .run(async {
                if users.is_empty() {
                    return Ok(Vec::new());
                }
                let fields: Vec<String> = users.iter().map(|u| u.0.to_string()).collect();
                let counts: Vec<Option<i64>> = self
                    .pool
                    .next()
                    .hmget(format!("{}pres:cnt:0", self.prefix), fields)
                    .await?;
                Ok(counts.into_iter().map(|c| c.unwrap_or(0) > 0).collect())
            })
            .await
    }

    async fn channel_online(&self, channel: Id) -> Result<Vec<Id>, EngineError> {
        op_span("HKEYS presence channel", "HKEYS")
            .run(async {
                let fields: Vec<String> = self
                    .pool
                    .next()
                    .hkeys(format!("{}pres:cnt:{}", self.prefix, channel))
                    .await?;
                let mut users: Vec<Id> = fields
                    .iter()
                    .filter_map(|f| f.parse::<u64>().ok())
                    .map(Id)
                    .collect();
                users.sort_unstable();
                Ok(users)
            })
            .await
    }
}

#[async_trait]
impl Health for RedisEngine {
    async fn ping(&self) -> Result<(), EngineError> {
        let _: String = self.pool.next().ping(None).await?;
        Ok(())
    }
}
