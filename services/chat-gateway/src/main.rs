//! `loadlab-chat-gateway` binary.

use clap::Parser;
use loadlab_chat_gateway::ChatConfig;
use loadlab_kit::{Shutdown, shutdown, telemetry};

/// mimalloc: many small short-lived buffers per frame; glibc malloc showed up as ~15% of CPU
/// in profiles of the services.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The chat gateway: WebSocket edge, history HTTP, delivery across replicas.
#[derive(Parser)]
#[command(name = "loadlab-chat-gateway", version)]
struct Cli {
    #[command(flatten)]
    config: ChatConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(cli.config.common.log_format, &cli.config.common.otel);
    let stop = Shutdown::new();
    shutdown::trigger_on_signals(stop.clone());
    loadlab_chat_gateway::serve(cli.config, stop).await?;
    Ok(())
}
