//! `loadlab`: the runner's command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use loadlab::cli::RunArgs;
use loadlab::distributed::cli::{CoordinatorArgs, WorkerArgs};
use loadlab::distributed::coordinator::{Coordinator, CoordinatorOptions};
use loadlab::distributed::{local, worker};
use loadlab::stack::{Stack, StackArgs};
use loadlab::summary::Summary;
use loadlab::{console, demo, report, run};
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
    /// The whole thing on this machine: the embedded stack (memory engine, SQLite), seeded, a
    /// ~30 s feed-mixed run with a live progress line, the summary, and a report in
    /// loadlab-report/ (summary.json, index.html).
    Demo {
        /// Length of the load phase.
        #[arg(long, default_value = "30s", value_parser = loadlab::spec::parse_duration)]
        duration: Duration,
        /// Report directory.
        #[arg(long, default_value = "loadlab-report")]
        out: PathBuf,
        /// No live progress line.
        #[arg(long)]
        quiet: bool,
    },
    /// Run the system under test in this process: feed, timeline, chat-gateway and presence on
    /// consecutive ports from --base-port (memory engine and SQLite by default). Ctrl-C stops it
    /// gracefully.
    Up(StackArgs),
    /// Run a load test from this machine (`-f loadtest.yaml` or flags). Exit code 99 when a
    /// threshold fails.
    Run(Box<RunArgs>),
    /// Coordinate a distributed run (a pod entrypoint): serve the coordinator protocol, run the
    /// set-up once, start the workers on one barrier, merge their results, write the report.
    /// Exit code 99 when a threshold fails, 98 when a worker was lost (onWorkerLoss: fail) or
    /// did not register in time.
    Coordinator(Box<CoordinatorArgs>),
    /// Generate one shard of a distributed run's load (a pod entrypoint) for the coordinator
    /// at --coordinator. Stops its load and exits non-zero when it loses the coordinator.
    Worker(WorkerArgs),
    /// A local OTLP/gRPC receiver (traces + metrics) for services run by hand: point their
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` at it; Ctrl-C prints what arrived per service and span.
    Receive {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:4317")]
        listen: std::net::SocketAddr,
    },
    /// Print the summary of a finished run and re-render its index.html.
    Report {
        /// The report directory (holding summary.json).
        dir: PathBuf,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // `loadlab up` hosts the services: their spans go to the endpoint the standard variable
    // names (the embedded receiver under `loadlab demo`); every other command exports nothing.
    let otel = telemetry::OtelArgs {
        otlp_endpoint: std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok(),
        trace_sample_ratio: std::env::var("LOADLAB_TRACE_SAMPLE_RATIO")
            .ok()
            .and_then(|r| r.parse().ok()),
        loadtest_run: std::env::var("LOADLAB_LOADTEST_RUN").ok(),
    };
    telemetry::init(telemetry::LogFormat::Text, &otel);
    match execute(cli.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn execute(command: Command) -> anyhow::Result<ExitCode> {
    let stop = Shutdown::new();
    shutdown::trigger_on_signals(stop.clone());
    match command {
        Command::Up(args) => {
            let stack = Stack::start(&args, stop).await?;
            if args.jwt_secret.is_none() {
                println!(
                    "JWT secret (tokens signed with it are accepted): {}",
                    stack.jwt_secret
                );
            }
            println!("feed          {}", stack.feed_url);
            println!("timeline      {} (gRPC)", stack.timeline_url);
            println!("chat-gateway  {} (WebSocket: /v1/chat/ws)", stack.chat_url);
            println!("presence      {} (gRPC)", stack.presence_url);
            stack.wait().await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            duration,
            out,
            quiet,
        } => {
            let outcome = demo::demo(out.clone(), duration, !quiet, stop).await?;
            finish(&outcome.summary, &out, outcome.exit_code)
        }
        Command::Run(args) => {
            let spec = args.spec()?;
            let opts = run::RunOptions {
                out_dir: args.out.clone(),
                progress: !args.quiet,
                server_processes: args.server_processes()?,
                run_id: run_id(),
                insecure_skip_verify: args.insecure,
            };
            let outcome = if args.distributed(&spec) {
                let workers = local::LocalWorkers {
                    count: spec.workers,
                    exe: std::env::current_exe()?,
                };
                local::run(&spec, &opts, &workers, stop).await?
            } else {
                run::run(&spec, &opts, stop).await?
            };
            finish(&outcome.summary, &args.out, outcome.exit_code)
        }
        Command::Coordinator(args) => {
            let text = std::fs::read_to_string(&args.file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
            let spec = loadlab::spec::LoadTestSpec::from_yaml(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
            let opts = CoordinatorOptions {
                run: run::RunOptions {
                    out_dir: args.out.clone(),
                    progress: !args.quiet,
                    server_processes: Vec::new(),
                    run_id: args.run.clone().unwrap_or_else(run_id),
                    insecure_skip_verify: args.insecure,
                },
                workers: args.workers.unwrap_or(spec.workers),
                start_lead: Duration::from_secs(1),
            };
            let listener = tokio::net::TcpListener::bind(&args.listen)
                .await
                .map_err(|e| anyhow::anyhow!("--listen {}: {e}", args.listen))?;
            let coordinator = Coordinator::start(&spec, opts.clone(), listener).await?;
            println!(
                "loadlab coordinator: run {} with {} workers, listening on {}",
                opts.run.run_id,
                opts.workers,
                coordinator.local_addr()
            );
            let outcome = coordinator.run(stop).await?;
            finish(&outcome.summary, &args.out, outcome.exit_code)
        }
        Command::Worker(args) => {
            let opts = worker::WorkerOptions {
                coordinator: args.coordinator,
                index: args.index,
                total: args.total,
                run: args.run,
                connect_timeout: args.connect_timeout,
                insecure_skip_verify: args.insecure,
            };
            let outcome = worker::work(&opts, stop).await?;
            tracing::info!(
                requests = outcome.requests,
                reports = outcome.reports,
                stopped_early = outcome.stopped_early,
                "worker done"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Receive { listen } => {
            let receiver = loadlab::otlp::Receiver::start(listen).await?;
            println!("OTLP/gRPC receiver at {}", receiver.endpoint());
            stop.wait().await;
            let spans = receiver.received().spans();
            println!(
                "{} spans received ({} dropped); metrics from {:?}",
                spans.len(),
                receiver.received().dropped_spans(),
                receiver.received().metric_services()
            );
            for row in loadlab::otlp::report::span_breakdown(&spans) {
                println!(
                    "{:<14} {:<48} {:>8} p50 {:>8.2} ms  p99 {:>8.2} ms",
                    row.service, row.name, row.count, row.p50_ms, row.p99_ms
                );
            }
            receiver.stop().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Report { dir } => {
            let path = dir.join("summary.json");
            let text = std::fs::read_to_string(&path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let summary: Summary = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            std::fs::write(dir.join("index.html"), report::html::render(&summary))?;
            let code = if summary.run.verdict == loadlab::summary::Verdict::Pass {
                0
            } else {
                run::EXIT_THRESHOLDS_FAILED
            };
            finish(&summary, &dir, code)
        }
    }
}

fn run_id() -> String {
    format!("run{}", chrono::Utc::now().format("%Y%m%d%H%M%S"))
}

fn finish(summary: &Summary, out: &std::path::Path, code: i32) -> anyhow::Result<ExitCode> {
    print!("{}", console::render(summary));
    println!(
        "\n  report: {}  ·  {}",
        out.join("index.html").display(),
        out.join("summary.json").display()
    );
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}
