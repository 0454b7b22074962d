//! `loadlab run --workers N`: an in-process coordinator on a loopback port and N child processes
//! of this very binary running `loadlab worker` — the code path of pods, on one machine.
//!
//! The children get their own process group, so a Ctrl-C in the terminal reaches only the
//! coordinator, which then stops every worker through the protocol (graceful stop honoured).
//! They are killed when dropped, and a worker whose coordinator dies stops by itself within a
//! few seconds (see [`super::worker`]).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use loadlab_kit::Shutdown;
use tokio::net::TcpListener;
use tokio::process::Child;

use super::coordinator::{Coordinator, CoordinatorError, CoordinatorOptions};
use crate::run::{RunOptions, RunOutcome};
use crate::spec::LoadTestSpec;

/// How to start local workers.
#[derive(Debug, Clone)]
pub struct LocalWorkers {
    /// Worker processes.
    pub count: u32,
    /// The `loadlab` binary to run them with (usually `std::env::current_exe()`).
    pub exe: PathBuf,
}

/// Runs `spec` with `workers.count` local worker processes; writes the report like `run`.
pub async fn run(
    spec: &LoadTestSpec,
    opts: &RunOptions,
    workers: &LocalWorkers,
    stop: Shutdown,
) -> Result<RunOutcome, CoordinatorError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let coordinator = Coordinator::start(
        spec,
        CoordinatorOptions {
            run: opts.clone(),
            workers: workers.count,
            start_lead: Duration::from_millis(500),
        },
        listener,
    )
    .await?;
    let url = format!("http://{}", coordinator.local_addr());
    let mut children = Vec::with_capacity(workers.count as usize);
    for index in 0..workers.count {
        children.push(spawn_worker(
            &workers.exe,
            &url,
            index,
            workers.count,
            opts,
        )?);
    }
    // Watch the children: one that dies (before it could even register) is reported at once
    // instead of after the registration timeout.
    let notifier = coordinator.exit_notifier();
    let watchers: Vec<_> = children
        .into_iter()
        .enumerate()
        .map(|(index, mut child)| {
            let notifier = notifier.clone();
            let done = Shutdown::new();
            let stop_watching = done.clone();
            let task = tokio::spawn(async move {
                tokio::select! {
                    status = child.wait() => {
                        let reason = match status {
                            Ok(s) if s.success() => "exit status 0".to_owned(),
                            Ok(s) => s.to_string(),
                            Err(e) => e.to_string(),
                        };
                        notifier.exited(index as u32, reason).await;
                    }
                    () = stop_watching.wait() => {
                        // The run is over: a worker gets a moment to exit on its own.
                        if tokio::time::timeout(Duration::from_secs(5), child.wait()).await.is_err() {
                            let _ = child.kill().await;
                        }
                    }
                }
            });
            (done, task)
        })
        .collect();
    let outcome = coordinator.run(stop).await;
    for (done, task) in watchers {
        done.trigger();
        let _ = task.await;
    }
    outcome
}

fn spawn_worker(
    exe: &PathBuf,
    url: &str,
    index: u32,
    total: u32,
    opts: &RunOptions,
) -> Result<Child, std::io::Error> {
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("worker")
        .arg("--coordinator")
        .arg(url)
        .arg("--index")
        .arg(index.to_string())
        .arg("--total")
        .arg(total.to_string())
        .arg("--run")
        .arg(&opts.run_id)
        .arg("--connect-timeout")
        .arg("10s")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        // The Kubernetes variables must not leak into local workers.
        .env_remove("JOB_COMPLETION_INDEX");
    if opts.insecure_skip_verify {
        cmd.arg("--insecure");
    }
    // Workers log warnings and errors only, so the progress line stays readable.
    if std::env::var_os("LOADLAB_LOG").is_none() && std::env::var_os("RUST_LOG").is_none() {
        cmd.env("LOADLAB_LOG", "warn");
    }
    // N workers on one machine share its cores: each gets its share of runtime threads rather
    // than one per core, which would multiply idle spinning and context switches N-fold.
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = (cores / total.max(1) as usize).max(1);
        cmd.env("TOKIO_WORKER_THREADS", threads.to_string());
    }
    #[cfg(unix)]
    cmd.process_group(0);
    cmd.spawn().map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("starting worker {index} ({}): {e}", exe.display()),
        )
    })
}
