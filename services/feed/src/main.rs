//! `loadlab-feed` binary.

use clap::{Parser, Subcommand};
use loadlab_feed::FeedConfig;
use loadlab_kit::config::DbArgs;
use loadlab_kit::{Shutdown, db, shutdown, telemetry};

/// mimalloc: the services allocate many small short-lived buffers per request, where glibc
/// malloc showed up as ~15% of CPU in profiles of the read path.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The feed service: HTTP edge, FeedService gRPC and fan-out workers.
#[derive(Parser)]
#[command(name = "loadlab-feed", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: FeedConfig,
}

#[derive(Subcommand)]
enum Command {
    /// Apply database migrations and exit (the Helm hook Job runs this).
    Migrate {
        #[command(flatten)]
        db: DbArgs,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Migrate { db: args }) => {
            telemetry::init_logging(telemetry::LogFormat::Text);
            args.validate()?;
            let conn = db::connect(&args.settings()).await?;
            db::migrate(&conn).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        None => {
            let config = cli.config;
            telemetry::init(config.common.log_format, &config.common.otel);
            let stop = Shutdown::new();
            shutdown::trigger_on_signals(stop.clone());
            loadlab_feed::serve(config, stop).await?;
            Ok(())
        }
    }
}
