//! `loadlab`: the runner's command line.

use clap::{Parser, Subcommand};
use loadlab::stack::{Stack, StackArgs};
use loadlab_kit::{Shutdown, shutdown, telemetry};

/// mimalloc: the services allocate many small short-lived buffers per request, where glibc
/// malloc showed up as ~15% of CPU in profiles of the read path.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// loadlab: put real load on real distributed systems and watch them bend.
#[derive(Parser)]
#[command(name = "loadlab", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the system under test in this process: feed and timeline on consecutive ports from
    /// --base-port (memory engine and SQLite by default). Ctrl-C stops it gracefully.
    Up(StackArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init_logging(telemetry::LogFormat::Text);
    match cli.command {
        Command::Up(args) => {
            let stop = Shutdown::new();
            shutdown::trigger_on_signals(stop.clone());
            let stack = Stack::start(&args, stop).await?;
            if args.jwt_secret.is_none() {
                println!(
                    "JWT secret (tokens signed with it are accepted): {}",
                    stack.jwt_secret
                );
            }
            println!("feed      {}", stack.feed_url);
            println!("timeline  {} (gRPC)", stack.timeline_url);
            stack.wait().await?;
            Ok(())
        }
    }
}
