//! The embedded stack: feed and timeline (chat-gateway and presence join them with the chat
//! system) in one process, on consecutive ports from a base port, sharing one engine — which is
//! what makes the memory engine usable.

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

    /// First port: feed, then timeline (then chat-gateway and presence) on consecutive ports.
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

/// A running embedded stack.
pub struct Stack {
    /// `http://host:port` of feed.
    pub feed_url: String,
    /// `http://host:port` of timeline.
    pub timeline_url: String,
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
        // Base port 0 gives every service an ephemeral port (tests).
        let addr = |offset: u16| {
            let port = if args.base_port == 0 {
                0
            } else {
                args.base_port.saturating_add(offset)
            };
            SocketAddr::new(args.bind, port)
        };
        let (feed_addr, timeline_addr) = (addr(0), addr(1));
        let feed_listener = bind(feed_addr).await?;
        let timeline_listener = bind(timeline_addr).await?;
        // Report the ports actually bound (base port 0 picks free ones).
        let feed_addr = feed_listener
            .local_addr()
            .map_err(|source| StackError::Bind {
                addr: feed_addr,
                source,
            })?;
        let timeline_addr = timeline_listener
            .local_addr()
            .map_err(|source| StackError::Bind {
                addr: timeline_addr,
                source,
            })?;
        let feed_url = format!("http://{feed_addr}");
        let timeline_url = format!("http://{timeline_addr}");

        let engine = match args.engine {
            EngineKind::Memory => "memory",
            EngineKind::Redis => "redis",
        };
        let common = vec![
            "--engine".to_owned(),
            engine.to_owned(),
            "--redis-url".to_owned(),
            args.redis_url.clone(),
            "--redis-prefix".to_owned(),
            args.redis_prefix.clone(),
            "--database-url".to_owned(),
            args.database_url.clone(),
            "--database-schema".to_owned(),
            args.database_schema.clone(),
            "--jwt-secret".to_owned(),
            jwt_secret.clone(),
        ];
        let mut feed_args = vec!["loadlab-feed".to_owned()];
        feed_args.extend(common.iter().cloned());
        feed_args.extend([
            "--listen".to_owned(),
            feed_addr.to_string(),
            "--timeline-url".to_owned(),
            timeline_url.clone(),
        ]);
        let mut timeline_args = vec!["loadlab-timeline".to_owned()];
        timeline_args.extend(common.iter().cloned());
        timeline_args.extend([
            "--listen".to_owned(),
            timeline_addr.to_string(),
            "--feed-url".to_owned(),
            feed_url.clone(),
        ]);
        // A flag is handed to each service that knows it; one no service knows is an error.
        for flag in &args.service_flags {
            let name = flag
                .trim_start_matches('-')
                .split('=')
                .next()
                .unwrap_or_default();
            let feed_knows = knows::<FeedCli>(name);
            let timeline_knows = knows::<TimelineCli>(name);
            if !feed_knows && !timeline_knows {
                return Err(StackError::Flags {
                    service: "loadlab up",
                    message: format!("no service understands {flag:?}"),
                });
            }
            if feed_knows {
                feed_args.push(flag.clone());
            }
            if timeline_knows {
                timeline_args.push(flag.clone());
            }
        }
        let feed_cfg = FeedCli::try_parse_from(&feed_args)
            .map_err(|e| StackError::Flags {
                service: "feed",
                message: e.to_string(),
            })?
            .config;
        let timeline_cfg = TimelineCli::try_parse_from(&timeline_args)
            .map_err(|e| StackError::Flags {
                service: "timeline",
                message: e.to_string(),
            })?
            .config;
        feed_cfg.validate().map_err(ServeError::from)?;
        timeline_cfg.validate().map_err(ServeError::from)?;

        // One engine for everyone: with the memory engine this is what makes it work at all.
        let engine = Engine::from_args(&feed_cfg.common).map_err(ServeError::from)?;
        let database = db::connect(&feed_cfg.common.db.settings())
            .await
            .map_err(ServeError::from)?;
        db::migrate(&database).await.map_err(ServeError::from)?;

        let mut tasks = Vec::new();
        {
            let (engine, shutdown) = (engine.clone(), shutdown.clone());
            tasks.push((
                "timeline",
                tokio::spawn(loadlab_timeline::serve_with(
                    timeline_cfg,
                    engine,
                    timeline_listener,
                    shutdown,
                )),
            ));
        }
        {
            let deps = Deps {
                engine,
                db: database,
            };
            tasks.push((
                "feed",
                tokio::spawn(loadlab_feed::serve_with(
                    feed_cfg,
                    deps,
                    feed_listener,
                    shutdown.clone(),
                )),
            ));
        }
        Ok(Stack {
            feed_url,
            timeline_url,
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
