//! Spawns real chat gateways (and a presence service) on ephemeral loopback ports and drives
//! them with real WebSocket clients.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use chrono::Utc;
use clap::Parser;
use futures::{SinkExt, StreamExt};
use loadlab_chat_gateway::ChatConfig;
use loadlab_kit::auth::TokenKeys;
use loadlab_kit::db::entity::user;
use loadlab_kit::db::{self, DbSettings};
use loadlab_kit::engine::Engine;
use loadlab_kit::engine::redis::RedisSettings;
use loadlab_kit::{Id, Shutdown, test_support};
use loadlab_presence::PresenceConfig;
use sea_orm::{ActiveModelTrait, DatabaseConnection, Set};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// The secret tokens are signed with.
pub const SECRET: &str = "chat-integration-secret-0123456789";

/// Datastores of a stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// PostgreSQL + Redis.
    PostgresRedis,
    /// SQLite + the memory engine (gateways share the process).
    SqliteMemory,
}

#[derive(Parser)]
#[command(args_override_self = true)]
struct ChatCli {
    #[command(flatten)]
    config: ChatConfig,
}

#[derive(Parser)]
#[command(args_override_self = true)]
struct PresenceCli {
    #[command(flatten)]
    config: PresenceConfig,
}

/// Knobs.
#[derive(Debug, Clone)]
pub struct Options {
    pub backend: Backend,
    pub gateways: usize,
    pub redis_url: Option<String>,
    /// Extra gateway flags.
    pub gateway_flags: Vec<String>,
    /// Extra presence flags.
    pub presence_flags: Vec<String>,
}

impl Options {
    pub fn new(backend: Backend, gateways: usize) -> Self {
        Options {
            backend,
            gateways,
            redis_url: None,
            gateway_flags: Vec::new(),
            presence_flags: Vec::new(),
        }
    }
}

/// A running gateway.
pub struct GatewayProc {
    pub url: String,
    pub shutdown: Shutdown,
    pub task: Option<JoinHandle<()>>,
}

/// Presence + gateways.
pub struct Stack {
    pub options: Options,
    pub db: DatabaseConnection,
    pub db_settings: DbSettings,
    pub prefix: String,
    pub engine: Engine,
    pub presence_url: String,
    pub presence_shutdown: Shutdown,
    pub gateways: Vec<GatewayProc>,
    pub http: reqwest::Client,
    keys: TokenKeys,
    next_user: std::sync::atomic::AtomicU64,
}

fn engine_for(options: &Options, prefix: &str) -> Engine {
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

fn common(options: &Options, db: &DbSettings, prefix: &str) -> Vec<String> {
    let engine = match options.backend {
        Backend::PostgresRedis => "redis",
        Backend::SqliteMemory => "memory",
    };
    [
        "--engine",
        engine,
        "--redis-url",
        &options
            .redis_url
            .clone()
            .unwrap_or_else(test_support::redis_url),
        "--redis-prefix",
        prefix,
        "--database-url",
        &db.url,
        "--database-schema",
        &db.schema,
        "--jwt-secret",
        SECRET,
        "--shutdown-grace",
        "3s",
    ]
    .map(str::to_owned)
    .to_vec()
}

impl Stack {
    pub async fn start(options: Options) -> Stack {
        let db_settings = match options.backend {
            Backend::PostgresRedis => test_support::postgres_db(),
            Backend::SqliteMemory => test_support::sqlite_db(),
        };
        let db = db::connect(&db_settings).await.expect("connect");
        db::migrate(&db).await.expect("migrate");
        let prefix = test_support::redis_prefix();
        let engine = engine_for(&options, &prefix);

        let presence_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let presence_url = format!("http://{}", presence_listener.local_addr().expect("addr"));
        let mut args = vec!["presence".to_owned()];
        args.extend(common(&options, &db_settings, &prefix));
        args.extend([
            "--presence-ttl".to_owned(),
            "2s".into(),
            "--presence-sweep-interval".into(),
            "100ms".into(),
        ]);
        args.extend(options.presence_flags.iter().cloned());
        let presence_cfg = PresenceCli::try_parse_from(args)
            .expect("presence flags")
            .config;
        let presence_shutdown = Shutdown::new();
        {
            let (engine, shutdown) = (engine.clone(), presence_shutdown.clone());
            tokio::spawn(async move {
                loadlab_presence::serve_with(presence_cfg, engine, presence_listener, shutdown)
                    .await
                    .expect("presence serves");
            });
        }
        let mut stack = Stack {
            options: options.clone(),
            db,
            db_settings,
            prefix,
            engine,
            presence_url,
            presence_shutdown,
            gateways: Vec::new(),
            http: reqwest::Client::new(),
            keys: TokenKeys::new(SECRET.as_bytes(), Duration::from_secs(3_600)).expect("keys"),
            next_user: std::sync::atomic::AtomicU64::new(1),
        };
        for i in 0..options.gateways {
            stack.add_gateway(i as u16 + 1).await;
        }
        stack
    }

    /// Starts one more gateway.
    pub async fn add_gateway(&mut self, node: u16) -> usize {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let mut args = vec!["gateway".to_owned()];
        args.extend(common(&self.options, &self.db_settings, &self.prefix));
        args.extend(
            [
                "--presence-url",
                &self.presence_url,
                "--node-id",
                &node.to_string(),
                "--heartbeat-interval",
                "500ms",
            ]
            .map(str::to_owned),
        );
        args.extend(self.options.gateway_flags.iter().cloned());
        let cfg = ChatCli::try_parse_from(args).expect("gateway flags").config;
        // Gateways in one process share the memory engine; with Redis each has its own pool.
        let engine = match self.options.backend {
            Backend::SqliteMemory => self.engine.clone(),
            Backend::PostgresRedis => engine_for(&self.options, &self.prefix),
        };
        let shutdown = Shutdown::new();
        let db = self.db.clone();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            loadlab_chat_gateway::serve_with(cfg, engine, db, listener, stop)
                .await
                .expect("gateway serves");
        });
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(r) = client.get(format!("{url}/readyz")).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "gateway {url} never became ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.gateways.push(GatewayProc {
            url,
            shutdown,
            task: Some(task),
        });
        self.gateways.len() - 1
    }

    /// A user row (chat has no sign-up of its own) and a token for it.
    pub async fn user(&self) -> (Id, String) {
        let n = self
            .next_user
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = Id(1_000_000 + n);
        user::ActiveModel {
            id: Set(id.as_i64()),
            handle: Set(format!("chatter_{n}")),
            password_hash: Set("-".into()),
            follower_count: Set(0),
            following_count: Set(0),
            created_at: Set(Utc::now()),
        }
        .insert(&self.db)
        .await
        .expect("insert user");
        (id, self.keys.issue(id))
    }

    /// A token for a user id, whether or not the user exists.
    pub fn token_for(&self, id: Id) -> String {
        self.keys.issue(id)
    }

    /// Creates a channel through gateway `g`.
    pub async fn channel(&self, g: usize, token: &str, name: &str) -> Id {
        let r = self
            .http
            .post(format!("{}/v1/channels", self.gateways[g].url))
            .bearer_auth(token)
            .json(&json!({"name": name}))
            .send()
            .await
            .expect("create channel");
        assert_eq!(r.status(), reqwest::StatusCode::CREATED);
        let v: Value = r.json().await.expect("json");
        v["id"].as_str().expect("id").parse().expect("id parses")
    }

    /// Every message of a channel's history, oldest first.
    pub async fn history(&self, g: usize, token: &str, channel: Id) -> Vec<Value> {
        let mut all = Vec::new();
        let mut query = "?limit=100".to_owned();
        loop {
            let r = self
                .http
                .get(format!(
                    "{}/v1/channels/{channel}/messages{query}",
                    self.gateways[g].url
                ))
                .bearer_auth(token)
                .send()
                .await
                .expect("history");
            assert_eq!(r.status(), reqwest::StatusCode::OK);
            let v: Value = r.json().await.expect("json");
            all.extend(v["messages"].as_array().cloned().unwrap_or_default());
            match v["next"].as_str() {
                Some(n) => query = format!("?limit=100&before={n}"),
                None => break,
            }
        }
        all.reverse();
        all
    }

    /// Stops gateway `g` gracefully and waits for it.
    pub async fn stop_gateway(&mut self, g: usize) {
        self.gateways[g].shutdown.trigger();
        if let Some(task) = self.gateways[g].task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }

    /// A gateway in a child process (the real binary), to kill without a goodbye.
    pub async fn spawn_gateway_process(&self) -> ChildGateway {
        let port = test_support::free_port();
        let mut args = common(&self.options, &self.db_settings, &self.prefix);
        args.extend(
            [
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--presence-url",
                &self.presence_url,
                "--node-id",
                "99",
                "--heartbeat-interval",
                "500ms",
            ]
            .map(str::to_owned),
        );
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_loadlab-chat-gateway"))
            .args(&args)
            .env("LOADLAB_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn the gateway binary");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.http.get(format!("{url}/readyz")).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "child gateway never became ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ChildGateway { url, child }
    }

    pub async fn stop(mut self) {
        for g in 0..self.gateways.len() {
            self.stop_gateway(g).await;
        }
        self.presence_shutdown.trigger();
    }
}

/// A gateway process.
pub struct ChildGateway {
    pub url: String,
    child: std::process::Child,
}

impl ChildGateway {
    /// SIGKILL: no drain, no goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGateway {
    fn drop(&mut self) {
        self.kill();
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket client.
pub struct Client {
    pub ws: Ws,
    pub user: Id,
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Ended {
    /// A close frame with this code.
    Closed(u16),
    /// The connection dropped without a close frame.
    Dropped,
}

impl Client {
    pub async fn connect(base: &str, user: Id, token: &str) -> Client {
        let url = format!(
            "{}/v1/chat/ws?token={token}",
            base.replacen("http://", "ws://", 1)
        );
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connects");
        Client { ws, user }
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .expect("send");
    }

    /// The next JSON frame (skipping pings), or panics after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Value {
        match self.try_next(timeout).await {
            Some(v) => v,
            None => panic!("no frame within {timeout:?}"),
        }
    }

    /// The next JSON frame, or None on timeout or close.
    pub async fn try_next(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??
                .ok()?;
            match m {
                Message::Text(t) => {
                    return Some(serde_json::from_str(t.as_str()).expect("server frames are JSON"));
                }
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// Frames until one has `type`, collecting the others.
    pub async fn until(&mut self, kind: &str, timeout: Duration) -> (Value, Vec<Value>) {
        let deadline = Instant::now() + timeout;
        let mut others = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self.next(left.max(Duration::from_millis(1))).await;
            if v["type"] == kind {
                return (v, others);
            }
            others.push(v);
        }
    }

    pub async fn join(&mut self, channel: Id) {
        self.send(json!({"type": "join", "channel": channel.to_string()}))
            .await;
        let (joined, _) = self.until("joined", Duration::from_secs(10)).await;
        assert_eq!(joined["channel"], channel.to_string());
    }

    /// Reads until the connection ends; returns how.
    pub async fn ended(&mut self, timeout: Duration) -> Ended {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("connection still open after {timeout:?}"),
                Ok(None) | Ok(Some(Err(_))) => return Ended::Dropped,
                Ok(Some(Ok(Message::Close(frame)))) => {
                    return Ended::Closed(frame.map_or(1005, |f| u16::from(f.code)));
                }
                Ok(Some(Ok(_))) => continue,
            }
        }
    }
}

/// `CloseCode` as a number, for readable assertions.
pub fn code(c: CloseCode) -> u16 {
    u16::from(c)
}

/// Runs `$name(Backend)` on both backends.
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
