//! The embedded stack: feed, timeline, chat-gateway and presence in one process, on consecutive
//! ports from a base port, sharing one engine — which is what makes the memory engine usable.

use std::net::{IpAddr, SocketAddr};

use clap::{Args, CommandFactory, Parser};
use loadlab_feed::{Deps, FeedConfig};
use loadlab_kit::engine::{Engine, EngineKind};
use loadlab_kit::server::ServeError;
use loadlab_kit::{Shutdown, db};
use loadlab_timeline::TimelineConfig;
use rand::RngCore;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Flags of `loadlab up`.
#[derive(Debug, Clone, Args)]
pub struct StackArgs {
    /// Address the services bind.
    #[arg(long, env = "LOADLAB_BIND", default_value = "127.0.0.1")]
    pub bind: IpAddr,

    /// First port: feed, timeline, chat-gateway and presence on consecutive ports.
    #[arg(long, env = "LOADLAB_BASE_PORT", default_value_t = 8080)]
    pub base_port: u16,

    /// Engine shared by the services.
    #[arg(long, env = "LOADLAB_ENGINE", value_enum, default_value_t = EngineKind::Memory)]
    pub engine: EngineKind,

    /// Redis URL for `--engine redis`.
    #[arg(
        long,
        env = "LOADLAB_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,

    /// Prefix of every Redis key.
    #[arg(long, env = "LOADLAB_REDIS_PREFIX", default_value = "loadlab:")]
    pub redis_prefix: String,

    /// Database URL (`sqlite://…` or `postgres://…`); migrated at start.
    #[arg(
        long,
        env = "LOADLAB_DATABASE_URL",
        default_value = "sqlite://loadlab.db?mode=rwc"
    )]
    pub database_url: String,

    /// PostgreSQL schema (created if missing).
    #[arg(long, env = "LOADLAB_DATABASE_SCHEMA", default_value = "")]
    pub database_schema: String,

    /// HS256 secret; a random one is generated (and printed) when absent.
    #[arg(long, env = "LOADLAB_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Flags passed to every service, e.g. `--service-flag=--celebrity-threshold=500`
    /// (repeatable). A flag a service does not know is an error naming it.
    #[arg(long = "service-flag", value_name = "FLAG", allow_hyphen_values = true)]
    pub service_flags: Vec<String>,
}

/// Why the stack could not start.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// A service rejected its flags.
    #[error("{service}: {message}")]
    Flags {
        /// Which service.
        service: &'static str,
        /// clap's explanation.
        message: String,
    },
    /// Set-up failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// A port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

#[derive(Parser)]
struct FeedCli {
    #[command(flatten)]
    config: FeedConfig,
}

#[derive(Parser)]
struct TimelineCli {
    #[command(flatten)]
    config: TimelineConfig,
}

#[derive(Parser)]
struct ChatCli {
    #[command(flatten)]
    config: loadlab_chat_gateway::ChatConfig,
}

#[derive(Parser)]
struct PresenceCli {
    #[command(flatten)]
    config: loadlab_presence::PresenceConfig,
}

/// A running embedded stack.
pub struct Stack {
    /// `http://host:port` of feed.
    pub feed_url: String,
    /// `http://host:port` of timeline.
    pub timeline_url: String,
    /// `http://host:port` of the chat gateway.
    pub chat_url: String,
    /// `http://host:port` of presence.
    pub presence_url: String,
    /// The JWT secret the services verify (to mint tokens for load).
    pub jwt_secret: String,
    /// Stops every service.
    pub shutdown: Shutdown,
    tasks: Vec<(&'static str, JoinHandle<Result<(), ServeError>>)>,
}

impl Stack {
    /// Binds every port, migrates the database and starts the services.
    pub async fn start(args: &StackArgs, shutdown: Shutdown) -> Result<Stack, StackError> {
        let jwt_secret = args.jwt_secret.clone().unwrap_or_else(|| {
            let mut bytes = [0u8; 24];
            rand::rng().fill_bytes(&mut bytes);
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        });
        // feed, timeline, chat-gateway, presence on consecutive ports; base port 0 gives every
        // service an ephemeral port (tests, `loadlab demo`).
        let mut listeners = Vec::with_capacity(4);
        for offset in 0..4u16 {
            let port = if args.base_port == 0 {
                0
            } else {
                args.base_port.saturating_add(offset)
            };
            listeners.push(bind(SocketAddr::new(args.bind, port)).await?);
        }
        let mut urls = Vec::with_capacity(4);
        for l in &listeners {
            let addr = l.local_addr().map_err(|source| StackError::Bind {
                addr: SocketAddr::new(args.bind, args.base_port),
                source,
            })?;
            urls.push(format!("http://{addr}"));
        }
        let [feed_url, timeline_url, chat_url, presence_url] =
            [0, 1, 2, 3].map(|i| urls[i].clone());

        let engine = match args.engine {
            EngineKind::Memory => "memory",
            EngineKind::Redis => "redis",
        };
        let common = [
            "--engine",
            engine,
            "--redis-url",
            &args.redis_url,
            "--redis-prefix",
            &args.redis_prefix,
            "--database-url",
            &args.database_url,
            "--database-schema",
            &args.database_schema,
            "--jwt-secret",
            &jwt_secret,
        ]
        .map(str::to_owned);
        let service_args = |name: &str, listen: &str, peers: &[(&str, &str)]| {
            let mut a = vec![name.to_owned()];
            a.extend(common.iter().cloned());
            a.extend([
                "--listen".to_owned(),
                listen.trim_start_matches("http://").to_owned(),
            ]);
            for (flag, url) in peers {
                a.extend([(*flag).to_owned(), (*url).to_owned()]);
            }
            a
        };
        let mut feed_args = service_args(
            "loadlab-feed",
            &feed_url,
            &[("--timeline-url", &timeline_url)],
        );
        let mut timeline_args = service_args(
            "loadlab-timeline",
            &timeline_url,
            &[("--feed-url", &feed_url)],
        );
        let mut chat_args = service_args(
            "loadlab-chat-gateway",
            &chat_url,
            &[("--presence-url", &presence_url)],
        );
        let mut presence_args = service_args("loadlab-presence", &presence_url, &[]);
        // A flag is handed to each service that knows it; one no service knows is an error.
        for flag in &args.service_flags {
            let name = flag
                .trim_start_matches('-')
                .split('=')
                .next()
                .unwrap_or_default();
            let mut known = false;
            for (knows, service_args) in [
                (knows::<FeedCli>(name), &mut feed_args),
                (knows::<TimelineCli>(name), &mut timeline_args),
                (knows::<ChatCli>(name), &mut chat_args),
                (knows::<PresenceCli>(name), &mut presence_args),
            ] {
                if knows {
                    service_args.push(flag.clone());
                    known = true;
                }
            }
            if !known {
                return Err(StackError::Flags {
                    service: "loadlab up",
                    message: format!("no service understands {flag:?}"),
                });
            }
        }
        let flags = |service: &'static str| {
            move |e: clap::Error| StackError::Flags {
                service,
                message: e.to_string(),
            }
        };
        let feed_cfg = FeedCli::try_parse_from(&feed_args)
            .map_err(flags("feed"))?
            .config;
        let timeline_cfg = TimelineCli::try_parse_from(&timeline_args)
            .map_err(flags("timeline"))?
            .config;
        let chat_cfg = ChatCli::try_parse_from(&chat_args)
            .map_err(flags("chat-gateway"))?
            .config;
        let presence_cfg = PresenceCli::try_parse_from(&presence_args)
            .map_err(flags("presence"))?
            .config;
        feed_cfg.validate().map_err(ServeError::from)?;
        timeline_cfg.validate().map_err(ServeError::from)?;
        chat_cfg.validate().map_err(ServeError::from)?;
        presence_cfg.validate().map_err(ServeError::from)?;

        // One engine for everyone: with the memory engine this is what makes it work at all.
        let engine = Engine::from_args(&feed_cfg.common).map_err(ServeError::from)?;
        let database = db::connect(&feed_cfg.common.db.settings())
            .await
            .map_err(ServeError::from)?;
        db::migrate(&database).await.map_err(ServeError::from)?;

        let mut listeners = listeners.into_iter();
        let mut next = || {
            listeners
                .next()
                .ok_or_else(|| ServeError::Setup("listener missing".into()))
        };
        let (feed_l, timeline_l, chat_l, presence_l) = (next()?, next()?, next()?, next()?);
        let tasks: Vec<(&'static str, JoinHandle<Result<(), ServeError>>)> = vec![
            (
                "presence",
                tokio::spawn(loadlab_presence::serve_with(
                    presence_cfg,
                    engine.clone(),
                    presence_l,
                    shutdown.clone(),
                )),
            ),
            (
                "timeline",
                tokio::spawn(loadlab_timeline::serve_with(
                    timeline_cfg,
                    engine.clone(),
                    timeline_l,
                    shutdown.clone(),
                )),
            ),
            (
                "chat-gateway",
                tokio::spawn(loadlab_chat_gateway::serve_with(
                    chat_cfg,
                    engine.clone(),
                    database.clone(),
                    chat_l,
                    shutdown.clone(),
                )),
            ),
            (
                "feed",
                tokio::spawn(loadlab_feed::serve_with(
                    feed_cfg,
                    Deps {
                        engine,
                        db: database,
                    },
                    feed_l,
                    shutdown.clone(),
                )),
            ),
        ];
        Ok(Stack {
            feed_url,
            timeline_url,
            chat_url,
            presence_url,
            jwt_secret,
            shutdown,
            tasks,
        })
    }

    /// Waits until every service has stopped (after `shutdown` fires, or when one fails — then
    /// the others are stopped too). Returns the first failure.
    pub async fn wait(self) -> Result<(), StackError> {
        let shutdown = self.shutdown.clone();
        let mut first_error = None;
        let mut pending: Vec<_> = self
            .tasks
            .into_iter()
            .map(|(name, task)| Box::pin(async move { (name, task.await) }))
            .collect();
        while !pending.is_empty() {
            let ((name, result), _, rest) = futures::future::select_all(pending).await;
            pending = rest;
            let failure = match result {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(join) => Some(ServeError::Setup(format!("{name} task failed: {join}"))),
            };
            if let Some(e) = failure {
                tracing::error!(service = name, error = %e, "service failed; stopping the stack");
                shutdown.trigger();
                first_error.get_or_insert(StackError::Serve(e));
            } else if !shutdown.is_triggered() {
                tracing::warn!(
                    service = name,
                    "service stopped unexpectedly; stopping the stack"
                );
                shutdown.trigger();
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Whether the service's command line has a `--name` flag.
fn knows<C: CommandFactory>(name: &str) -> bool {
    C::command()
        .get_arguments()
        .any(|a| a.get_long() == Some(name))
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StackError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StackError::Bind { addr, source })
}
