//! Spawns the real feed + timeline services on ephemeral loopback ports, on either
//! PostgreSQL + Redis or SQLite + the memory engine, and talks to them over HTTP.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use clap::Parser;
use loadlab_feed::{Deps, FeedConfig};
use loadlab_kit::db::{self, DbSettings};
use loadlab_kit::engine::redis::RedisSettings;
use loadlab_kit::engine::{Engine, TimelineKey};
use loadlab_kit::{Id, Shutdown, test_support};
use loadlab_timeline::TimelineConfig;
use reqwest::{Method, StatusCode};
use sea_orm::DatabaseConnection;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The secret every test stack signs tokens with.
pub const SECRET: &str = "integration-test-secret-0123456789";

/// Which datastores a stack runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// PostgreSQL (own schema) + Redis (own key prefix).
    PostgresRedis,
    /// SQLite (own file) + the memory engine.
    SqliteMemory,
}

/// Knobs a test may turn.
#[derive(Debug, Clone)]
pub struct Options {
    pub backend: Backend,
    /// Redis URL for the Redis backend (a private server in fault tests).
    pub redis_url: Option<String>,
    /// PostgreSQL URL for the PostgreSQL backend (a private server in fault tests).
    pub postgres_url: Option<String>,
    pub celebrity_threshold: u64,
    pub timeline_cap: usize,
    pub fanout_batch: usize,
    pub fanout_batch_delay: Duration,
    pub sweep_interval: Duration,
    pub sweep_after: Duration,
    pub claim_idle: Duration,
    /// Run the fan-out workers inside the feed (`--role all`); otherwise `--role api`.
    pub fanout_in_feed: bool,
    pub max_body_bytes: usize,
    /// More feed flags, appended last (so they override the defaults above).
    pub feed_flags: Vec<String>,
    /// Flags for both services (e.g. `--otlp-endpoint`).
    pub common_flags: Vec<String>,
}

impl Options {
    pub fn new(backend: Backend) -> Self {
        Options {
            backend,
            redis_url: None,
            postgres_url: None,
            celebrity_threshold: 10_000,
            timeline_cap: 800,
            fanout_batch: 500,
            fanout_batch_delay: Duration::ZERO,
            sweep_interval: Duration::from_millis(500),
            sweep_after: Duration::from_secs(30),
            claim_idle: Duration::from_secs(30),
            fanout_in_feed: true,
            max_body_bytes: 64 * 1024,
            feed_flags: Vec::new(),
            common_flags: Vec::new(),
        }
    }
}

#[derive(Parser)]
#[command(args_override_self = true)]
struct FeedCli {
    #[command(flatten)]
    config: FeedConfig,
}

#[derive(Parser)]
struct TimelineCli {
    #[command(flatten)]
    config: TimelineConfig,
}

/// A running feed + timeline pair.
pub struct Stack {
    pub options: Options,
    pub feed_url: String,
    pub timeline_url: String,
    pub http: reqwest::Client,
    pub db: DatabaseConnection,
    pub db_settings: DbSettings,
    /// The timeline service's engine (shared with feed on the memory backend).
    pub engine: Engine,
    pub redis_prefix: String,
    pub shutdown: Shutdown,
    tasks: Vec<JoinHandle<()>>,
}

/// A registered user.
#[derive(Debug, Clone)]
pub struct User {
    pub id: Id,
    pub handle: String,
    pub token: String,
}

fn common_args(options: &Options, db: &DbSettings, prefix: &str) -> Vec<String> {
    let engine = match options.backend {
        Backend::PostgresRedis => "redis",
        Backend::SqliteMemory => "memory",
    };
    let mut args: Vec<String> = vec![
        "--engine".into(),
        engine.into(),
        "--redis-url".into(),
        options
            .redis_url
            .clone()
            .unwrap_or_else(test_support::redis_url),
        "--redis-prefix".into(),
        prefix.into(),
        "--database-url".into(),
        db.url.clone(),
        "--database-schema".into(),
        db.schema.clone(),
        "--jwt-secret".into(),
        SECRET.into(),
        "--node-id".into(),
        "1".into(),
        "--max-body-bytes".into(),
        options.max_body_bytes.to_string(),
        "--shutdown-grace".into(),
        "2s".into(),
    ];
    args.extend(options.common_flags.iter().cloned());
    args
}

pub fn engine_for(options: &Options, prefix: &str) -> Engine {
    match options.backend {
        Backend::SqliteMemory => Engine::memory(),
        Backend::PostgresRedis => Engine::redis(RedisSettings {
            url: options
                .redis_url
                .clone()
                .unwrap_or_else(test_support::redis_url),
            prefix: prefix.to_owned(),
            pool_size: 2,
        })
        .expect("redis engine"),
    }
}

/// The feed config a stack uses (tests that start extra fan-out workers reuse it).
pub fn feed_config(
    options: &Options,
    db: &DbSettings,
    prefix: &str,
    listen: &str,
    timeline_url: &str,
    role: &str,
) -> FeedConfig {
    let mut args = vec!["feed".to_owned()];
    args.extend(common_args(options, db, prefix));
    args.extend(
        [
            "--listen",
            listen,
            "--role",
            role,
            "--timeline-url",
            timeline_url,
            "--celebrity-threshold",
            &options.celebrity_threshold.to_string(),
            "--password-memory-kib",
            "256",
            "--password-iterations",
            "1",
            "--fanout-batch",
            &options.fanout_batch.to_string(),
            "--fanout-batch-delay",
            &format!("{}ms", options.fanout_batch_delay.as_millis()),
            "--fanout-sweep-interval",
            &format!("{}ms", options.sweep_interval.as_millis()),
            "--fanout-sweep-after",
            &format!("{}ms", options.sweep_after.as_millis()),
            "--fanout-claim-idle",
            &format!("{}ms", options.claim_idle.as_millis()),
        ]
        .map(str::to_owned),
    );
    args.extend(options.feed_flags.iter().cloned());
    FeedCli::try_parse_from(args).expect("feed flags").config
}

impl Stack {
    pub async fn start(options: Options) -> Stack {
        let db_settings = match options.backend {
            Backend::PostgresRedis => {
                let mut settings = test_support::postgres_db();
                if let Some(url) = &options.postgres_url {
                    settings.url = url.clone();
                }
                settings
            }
            Backend::SqliteMemory => test_support::sqlite_db(),
        };
        let db = db::connect(&db_settings).await.expect("connect database");
        db::migrate(&db).await.expect("migrate");
        let prefix = test_support::redis_prefix();

        let feed_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind feed");
        let timeline_listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind timeline");
        let feed_url = format!("http://{}", feed_listener.local_addr().expect("addr"));
        let timeline_url = format!("http://{}", timeline_listener.local_addr().expect("addr"));

        let timeline_engine = engine_for(&options, &prefix);
        let feed_engine = match options.backend {
            Backend::SqliteMemory => timeline_engine.clone(),
            Backend::PostgresRedis => engine_for(&options, &prefix),
        };
        let role = if options.fanout_in_feed { "all" } else { "api" };
        let feed_cfg = feed_config(
            &options,
            &db_settings,
            &prefix,
            "127.0.0.1:0",
            &timeline_url,
            role,
        );
        let mut targs = vec!["timeline".to_owned()];
        targs.extend(common_args(&options, &db_settings, &prefix));
        targs.extend(
            [
                "--feed-url",
                &feed_url,
                "--timeline-cap",
                &options.timeline_cap.to_string(),
            ]
            .map(str::to_owned),
        );
        let timeline_cfg = TimelineCli::try_parse_from(targs)
            .expect("timeline flags")
            .config;

        let shutdown = Shutdown::new();
        let mut tasks = Vec::new();
        {
            let shutdown = shutdown.clone();
            let engine = timeline_engine.clone();
            tasks.push(tokio::spawn(async move {
                loadlab_timeline::serve_with(timeline_cfg, engine, timeline_listener, shutdown)
                    .await
                    .expect("timeline serves");
            }));
        }
        {
            let shutdown = shutdown.clone();
            let deps = Deps {
                engine: feed_engine,
                db: db.clone(),
            };
            tasks.push(tokio::spawn(async move {
                loadlab_feed::serve_with(feed_cfg, deps, feed_listener, shutdown)
                    .await
                    .expect("feed serves");
            }));
        }
        let stack = Stack {
            options,
            feed_url,
            timeline_url,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("client"),
            db,
            db_settings,
            engine: timeline_engine,
            redis_prefix: prefix,
            shutdown,
            tasks,
        };
        stack.wait_ready(&stack.feed_url).await;
        stack.wait_ready(&stack.timeline_url).await;
        stack
    }

    async fn wait_ready(&self, base: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(r) = self.http.get(format!("{base}/readyz")).send().await
                && r.status() == StatusCode::OK
            {
                return;
            }
            assert!(Instant::now() < deadline, "{base} never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops both services and waits for them.
    pub async fn stop(mut self) {
        self.shutdown.trigger();
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }

    /// Any request; returns status and JSON body (Null when empty).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{}", self.feed_url, path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status();
        let bytes = resp.bytes().await.expect("body");
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("non-JSON body {bytes:?}: {e}"))
        };
        (status, value)
    }

    /// Sends raw bytes as a body.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{}", self.feed_url, path))
            .body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status();
        let bytes = resp.bytes().await.expect("body");
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, value)
    }

    pub async fn register(&self, handle: &str) -> User {
        let (status, body) = self
            .call(
                Method::POST,
                "/v1/users",
                None,
                Some(json!({"handle": handle, "password": "correct horse"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "register {handle}: {body}");
        User {
            id: body["id"].as_str().expect("id").parse().expect("id parses"),
            handle: body["handle"].as_str().expect("handle").to_owned(),
            token: body["token"].as_str().expect("token").to_owned(),
        }
    }

    pub async fn follow(&self, who: &User, whom: &User) {
        let (status, body) = self
            .call(
                Method::POST,
                &format!("/v1/users/{}/follows/{}", who.id, whom.id),
                Some(&who.token),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "follow: {body}");
    }

    pub async fn post(&self, who: &User, text: &str) -> Id {
        let (status, body) = self
            .call(
                Method::POST,
                "/v1/posts",
                Some(&who.token),
                Some(json!({"body": text})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "post: {body}");
        body["id"].as_str().expect("id").parse().expect("id parses")
    }

    /// Post ids of a list response, in order.
    pub fn ids(body: &Value) -> Vec<Id> {
        body["posts"]
            .as_array()
            .unwrap_or_else(|| panic!("no posts in {body}"))
            .iter()
            .map(|p| p["id"].as_str().expect("id").parse().expect("id parses"))
            .collect()
    }

    /// One page of a home timeline.
    pub async fn home(&self, who: &User, query: &str) -> (StatusCode, Value) {
        self.call(
            Method::GET,
            &format!("/v1/users/{}/timeline{query}", who.id),
            Some(&who.token),
            None,
        )
        .await
    }

    /// Every post id of a home timeline, following `next` cursors.
    pub async fn home_all(&self, who: &User) -> Vec<Id> {
        let mut all = Vec::new();
        let mut query = "?limit=100".to_owned();
        loop {
            let (status, body) = self.home(who, &query).await;
            assert_eq!(status, StatusCode::OK, "home timeline: {body}");
            all.extend(Self::ids(&body));
            match body["next"].as_str() {
                Some(next) => query = format!("?limit=100&before={next}"),
                None => return all,
            }
        }
    }

    /// What the engine holds for a home timeline, without triggering a rebuild.
    pub async fn stored_home(&self, user: Id) -> Option<Vec<Id>> {
        self.engine
            .timelines
            .range(&[TimelineKey::Home(user)], None, 100_000)
            .await
            .expect("engine read")
            .pop()
            .flatten()
    }

    /// Polls `check` until it returns true, failing after `timeout`.
    pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if check().await {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every post is marked fanned out in the database.
    pub async fn wait_fanned_out(&self, timeout: Duration) {
        use loadlab_kit::db::entity::post;
        use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
        let db = self.db.clone();
        Self::eventually("every post fanned out", timeout, move || {
            let db = db.clone();
            async move {
                post::Entity::find()
                    .filter(post::Column::FannedOutAt.is_null())
                    .count(&db)
                    .await
                    .map(|n| n == 0)
                    .unwrap_or(false)
            }
        })
        .await;
    }
}

/// Runs `$body` (an `async fn(Backend)`) once per backend, as two tests.
#[macro_export]
macro_rules! both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres_redis() {
                super::$name(super::support::Backend::PostgresRedis).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite_memory() {
                super::$name(super::support::Backend::SqliteMemory).await;
            }
        }
    };
}
