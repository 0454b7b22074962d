//! Starts real presence replicas on ephemeral loopback ports — on the memory engine or on Redis
//! under a key prefix of their own — and talks to them through the tonic client over h2c.
#![allow(dead_code)]

use std::time::Duration;

use clap::Parser;
use loadlab_kit::engine::Engine;
use loadlab_kit::engine::redis::RedisSettings;
use loadlab_kit::{Shutdown, test_support};
use loadlab_presence::PresenceConfig;
use loadlab_proto::presence::v1::presence_service_client::PresenceServiceClient;
use loadlab_proto::presence::v1::{
    GetRequest, HeartbeatRequest, PresenceEvent, State, UserChannels, WatchChannelRequest,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

/// Runs one test body on the memory engine and on Redis (`#[macro_use] mod support;`).
macro_rules! on_both_engines {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::$name(super::support::Backend::Memory).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::$name(super::support::Backend::Redis).await;
            }
        }
    };
}

/// How long a test waits for an event that should come.
pub const EVENT_WAIT: Duration = Duration::from_secs(5);

/// Which engine replicas run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One in-process engine, shared by the replicas of a test.
    Memory,
    /// Real Redis, under a key prefix no other test uses.
    Redis,
}

/// Engines for the replicas of one test: they share state like replicas in production do.
pub struct Engines {
    pub backend: Backend,
    memory: Engine,
    prefix: String,
}

impl Engines {
    pub fn new(backend: Backend) -> Self {
        Engines {
            backend,
            memory: Engine::memory(),
            prefix: test_support::redis_prefix(),
        }
    }

    /// A handle on the shared state: the same memory engine, or a new Redis connection pool.
    pub fn engine(&self) -> Engine {
        match self.backend {
            Backend::Memory => self.memory.clone(),
            Backend::Redis => Engine::redis(RedisSettings {
                url: test_support::redis_url(),
                prefix: self.prefix.clone(),
                pool_size: 2,
            })
            .expect("redis engine"),
        }
    }
}

/// Flags a test may turn, as on the command line.
pub fn config(extra: &[&str]) -> PresenceConfig {
    #[derive(Parser)]
    #[command(args_override_self = true)]
    struct Cli {
        #[command(flatten)]
        config: PresenceConfig,
    }
    let mut args = vec![
        "presence",
        "--listen",
        "127.0.0.1:0",
        "--jwt-secret",
        "integration-test-secret-0123456789",
        "--shutdown-grace",
        "10s",
    ];
    args.extend_from_slice(extra);
    Cli::try_parse_from(args).expect("presence flags").config
}

/// A running replica.
pub struct Replica {
    pub url: String,
    pub shutdown: Shutdown,
    pub task: JoinHandle<()>,
}

impl Replica {
    /// Starts a replica on `engine` with extra flags.
    pub async fn start(engine: Engine, flags: &[&str]) -> Replica {
        let cfg = config(flags);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let shutdown = Shutdown::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            loadlab_presence::serve_with(cfg, engine, listener, stop)
                .await
                .expect("presence serves");
        });
        Replica {
            url,
            shutdown,
            task,
        }
    }

    /// A client on a connection of its own.
    pub async fn client(&self) -> PresenceServiceClient<Channel> {
        self.client_on(Endpoint::from_shared(self.url.clone()).expect("url"))
            .await
    }

    /// A client whose connection accepts at most `bytes` unread bytes per stream, so a watcher
    /// that does not read pushes back on the server quickly (the default window is megabytes).
    pub async fn client_with_window(&self, bytes: u32) -> PresenceServiceClient<Channel> {
        self.client_on(
            Endpoint::from_shared(self.url.clone())
                .expect("url")
                .initial_stream_window_size(bytes),
        )
        .await
    }

    async fn client_on(&self, endpoint: Endpoint) -> PresenceServiceClient<Channel> {
        for _ in 0..100 {
            if let Ok(channel) = endpoint.connect().await {
                return PresenceServiceClient::new(channel);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("presence at {} does not accept connections", self.url);
    }

    /// The OpenMetrics exposition.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.url))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// The value of a sample (`name` including its labels, if any); 0 when absent.
    pub async fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until a sample has `value`.
    pub async fn wait_for_metric(&self, name: &str, value: f64) {
        let deadline = tokio::time::Instant::now() + EVENT_WAIT;
        loop {
            let now = self.metric(name).await;
            if now == value {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} stayed at {now}, expected {value}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the replica and waits for it.
    pub async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("stops within its grace period")
            .expect("serve task");
    }
}

/// `user` with `channels`.
pub fn user(user_id: u64, channel_ids: &[u64]) -> UserChannels {
    UserChannels {
        user_id,
        channel_ids: channel_ids.to_vec(),
    }
}

/// Sends a heartbeat; returns the number of changes.
pub async fn heartbeat(
    client: &mut PresenceServiceClient<Channel>,
    gateway: &str,
    online: Vec<UserChannels>,
    offline: Vec<UserChannels>,
) -> u32 {
    client
        .heartbeat(HeartbeatRequest {
            gateway_id: gateway.to_owned(),
            online,
            offline,
        })
        .await
        .expect("heartbeat")
        .into_inner()
        .changes
}

/// Whether each user is online, per `Get`.
pub async fn online(client: &mut PresenceServiceClient<Channel>, users: &[u64]) -> Vec<bool> {
    let answer = client
        .get(GetRequest {
            user_ids: users.to_vec(),
        })
        .await
        .expect("get")
        .into_inner()
        .users;
    assert_eq!(
        answer.iter().map(|u| u.user_id).collect::<Vec<_>>(),
        users,
        "Get answers in request order"
    );
    answer.into_iter().map(|u| u.online).collect()
}

/// Opens a watch on `channel`.
pub async fn watch(
    client: &mut PresenceServiceClient<Channel>,
    channel: u64,
) -> Streaming<PresenceEvent> {
    client
        .watch_channel(WatchChannelRequest {
            channel_id: channel,
        })
        .await
        .expect("watch")
        .into_inner()
}

/// The next event, failing the test if none comes in time or the stream fails.
pub async fn next_event(stream: &mut Streaming<PresenceEvent>) -> PresenceEvent {
    tokio::time::timeout(EVENT_WAIT, stream.message())
        .await
        .expect("an event in time")
        .expect("a healthy stream")
        .expect("the stream goes on")
}

/// Fails the test if an event arrives within `window`.
pub async fn assert_quiet(stream: &mut Streaming<PresenceEvent>, window: Duration) {
    if let Ok(got) = tokio::time::timeout(window, stream.message()).await {
        panic!("expected no event, got {got:?}");
    }
}

/// `(channel, user, state, snapshot)` of an event, for compact assertions.
pub fn summary(e: &PresenceEvent) -> (u64, u64, State, bool) {
    (e.channel_id, e.user_id, e.state(), e.snapshot)
}
