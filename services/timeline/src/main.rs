//! `loadlab-timeline` binary.

use clap::Parser;
use loadlab_kit::{Shutdown, shutdown, telemetry};
use loadlab_timeline::TimelineConfig;

/// mimalloc: the services allocate many small short-lived buffers per request, where glibc
/// malloc showed up as ~15% of CPU in profiles of the read path.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    telemetry::init(cli.config.common.log_format, &cli.config.common.otel);
    let stop = Shutdown::new();
    shutdown::trigger_on_signals(stop.clone());
    loadlab_timeline::serve(cli.config, stop).await?;
    Ok(())
}
