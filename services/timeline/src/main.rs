//! `loadlab-timeline` binary.

use clap::Parser;
use loadlab_kit::{Shutdown, shutdown, telemetry};
use loadlab_timeline::TimelineConfig;

/// The timeline service: home timelines over gRPC.
#[derive(Parser)]
#[command(name = "loadlab-timeline", version)]
struct Cli {
    #[command(flatten)]
    config: TimelineConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init_logging(cli.config.common.log_format);
    let stop = Shutdown::new();
    shutdown::trigger_on_signals(stop.clone());
    loadlab_timeline::serve(cli.config, stop).await?;
    Ok(())
}
