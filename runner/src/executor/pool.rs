//! The engine's threads: VUs run on a fixed set of single-threaded Tokio runtimes, one per
//! core by default, each VU on one of them for its whole life (wrk's thread-per-core model). A
//! request, its connection's I/O and its timers then stay on one thread: no work stealing, no
//! cross-thread wake-ups on the request path, and no worker threads parking and unparking when
//! the generator shares its cores with the target. On two cores shared with nginx this measured
//! about 1.1× the requests per CPU-second of running the VUs on the multi-threaded runtime.
//!
//! `LOADLAB_ENGINE_THREADS` sets the number of threads (default: the CPUs this process may use,
//! which honours container CPU limits); `0` runs the VUs on the caller's runtime instead.
//! The pool is process-wide and started on first use; its threads idle when no run is going.

use std::future::Future;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::task::JoinSet;

/// Environment variable naming the number of engine threads.
pub const THREADS_ENV: &str = "LOADLAB_ENGINE_THREADS";

/// The engine's runtimes.
#[derive(Debug)]
pub struct EnginePool {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

static POOL: OnceLock<Option<EnginePool>> = OnceLock::new();

/// Threads the pool gets: `LOADLAB_ENGINE_THREADS`, else the available parallelism (at most
/// 256: more would only cost memory).
pub fn configured_threads() -> usize {
    match std::env::var(THREADS_ENV) {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) => n.min(256),
            Err(_) => {
                tracing::warn!(value = %v, "{THREADS_ENV} is not a number; using one thread per CPU");
                default_threads()
            }
        },
        Err(_) => default_threads(),
    }
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// The process's engine pool (`None` when configured to 0 threads or when its threads could
/// not start; VUs then run on the caller's runtime).
pub fn pool() -> Option<&'static EnginePool> {
    POOL.get_or_init(|| {
        let n = configured_threads();
        if n == 0 {
            return None;
        }
        match EnginePool::start(n) {
            Ok(pool) => Some(pool),
            Err(e) => {
                tracing::warn!(error = %e, "engine threads did not start; VUs share the main runtime");
                None
            }
        }
    })
    .as_ref()
}

impl EnginePool {
    /// Starts `n` threads, each driving a current-thread runtime until the process exits.
    pub fn start(n: usize) -> std::io::Result<EnginePool> {
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("loadlab-engine-{i}"))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    match rt {
                        Ok(rt) => {
                            if tx.send(Ok(rt.handle().clone())).is_ok() {
                                // Drives the VUs spawned onto this runtime, for good.
                                rt.block_on(std::future::pending::<()>());
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                })?;
            let handle = rx.recv().map_err(|_| {
                std::io::Error::other("an engine thread exited before its runtime started")
            })??;
            handles.push(handle);
        }
        Ok(EnginePool {
            handles,
            next: AtomicUsize::new(0),
        })
    }

    /// Threads in the pool.
    pub fn threads(&self) -> usize {
        self.handles.len()
    }

    /// Every runtime of the pool.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// The runtime for the next VU (round robin, so VUs spread evenly whatever their ids).
    pub fn next_handle(&self) -> &Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }
}

/// Spawns a VU's task into `vus`: on the engine pool when there is one, else on the current
/// runtime.
pub fn spawn_vu<F>(vus: &mut JoinSet<()>, task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    match pool() {
        Some(pool) => {
            vus.spawn_on(task, pool.next_handle());
        }
        None => {
            vus.spawn(task);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn vus_spread_over_the_pool_threads_and_report_back() {
        let pool = EnginePool::start(2).expect("threads start");
        assert_eq!(pool.threads(), 2);
        let mut set = JoinSet::new();
        let names = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        for _ in 0..4 {
            let names = names.clone();
            set.spawn_on(
                async move {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    let name = std::thread::current().name().map(str::to_owned);
                    names.lock().expect("not poisoned").push(name);
                },
                pool.next_handle(),
            );
        }
        while let Some(done) = set.join_next().await {
            done.expect("task ran");
        }
        let mut names = names.lock().expect("not poisoned").clone();
        names.sort();
        assert_eq!(
            names,
            [
                Some("loadlab-engine-0".to_owned()),
                Some("loadlab-engine-0".to_owned()),
                Some("loadlab-engine-1".to_owned()),
                Some("loadlab-engine-1".to_owned()),
            ]
        );
    }
}
