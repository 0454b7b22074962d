//! The coordinator of a distributed run: serves `loadlab.runner.v1.Coordinator`, runs the
//! scenario's set-up once, holds the barrier, schedules the start, merges the workers' reports
//! exactly, watches for lost workers, and writes the same summary and report as a
//! single-process run (the summarizing is [`crate::run`]'s, fed the merged data).
//!
//! One task — the run loop — owns all run state; the gRPC handlers only check registrations and
//! forward session traffic to it as events, so there is no shared mutable state to reason about
//! beyond the roster of who holds which index.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use loadlab_kit::Shutdown;
use loadlab_proto::runner::v1 as pb;
use pb::coordinator_message::Kind as ToWorker;
use pb::worker_message::Kind as FromWorker;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::Status;

use super::codec::{self, Endpoints};
use super::merge::{Interval, Merger};
use super::service::{Event, Liveness, Roster, Service, unix_nanos};
use super::shard;
use super::{EXIT_RUN_INCOMPLETE, HEARTBEAT, LOSS_TIMEOUT, MAX_MESSAGE_BYTES};
use crate::executor::Execution;
use crate::procstat;
use crate::run::{
    self, Collected, Prepared, RunError, RunOptions, RunOutcome, interval_point, show_progress,
};
use crate::spec::{LoadTestSpec, OnWorkerLoss, ScenarioName, SpecError};
use crate::summary::{Distribution, LostWorker, Summary, TraceRef, Verdict, WorkerRecord};

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    /// Report directory, progress line, server processes to sample, run id, TLS leniency.
    pub run: RunOptions,
    /// Workers of the run (overrides the spec's `workers`).
    pub workers: u32,
    /// How far in the future the start is scheduled once every worker is ready: long enough
    /// for the Start message to reach every worker first (a LAN round trip is well below it).
    pub start_lead: Duration,
}

/// Why a coordinator could not run.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The spec cannot be distributed.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// Set-up or the report failed.
    #[error(transparent)]
    Run(#[from] RunError),
    /// The listener failed.
    #[error("coordinator listener: {0}")]
    Io(#[from] std::io::Error),
    /// Stopped before the load started.
    #[error("{0}")]
    Aborted(String),
}

/// A coordinator listening for its workers.
pub struct Coordinator {
    spec: LoadTestSpec,
    opts: CoordinatorOptions,
    addr: SocketAddr,
    events_tx: mpsc::Sender<Event>,
    events: mpsc::Receiver<Event>,
    roster: Arc<Mutex<Roster>>,
    liveness: Arc<Liveness>,
    server_stop: Shutdown,
    server: tokio::task::JoinHandle<()>,
}

/// Tells a coordinator that a worker's process exited (local runs watch their children, which
/// spots a worker that dies before it could register).
#[derive(Clone)]
pub struct ExitNotifier(mpsc::Sender<Event>);

impl ExitNotifier {
    /// Worker `index`'s process exited, for `reason`.
    pub async fn exited(&self, index: u32, reason: String) {
        let _ = self.0.send(Event::Exited { index, reason }).await;
    }
}

impl Coordinator {
    /// Plans the shards of `spec` and starts serving on `listener`.
    pub async fn start(
        spec: &LoadTestSpec,
        opts: CoordinatorOptions,
        listener: TcpListener,
    ) -> Result<Coordinator, CoordinatorError> {
        if opts.workers == 0 {
            return Err(SpecError {
                path: "workers".into(),
                message: "must be at least 1".into(),
            }
            .into());
        }
        let mut spec = spec.clone();
        spec.workers = opts.workers;
        spec.validate()?;
        let users = match spec.scenario.name {
            ScenarioName::Http => 0,
            _ => spec.scenario.params.users,
        };
        let mut plans = Vec::with_capacity(opts.workers as usize);
        for index in 0..opts.workers {
            let (executor, s) = shard::plan(&spec.executor, users, opts.workers, index);
            let mut mine = spec.clone();
            mine.executor = executor;
            let json = serde_json::to_string(&mine).map_err(|e| SpecError {
                path: "spec".into(),
                message: format!("cannot encode the spec: {e}"),
            })?;
            plans.push((
                json,
                pb::Shard {
                    index,
                    total: opts.workers,
                    vu_offset: s.vu_offset,
                    users_from: s.users.start,
                    users_to: s.users.end,
                },
            ));
        }
        let (events_tx, events) = mpsc::channel(1_024);
        let service = Service::new(
            opts.run.run_id.clone(),
            opts.workers,
            plans,
            events_tx.clone(),
        );
        let roster = service.roster.clone();
        let liveness = service.liveness.clone();
        let addr = listener.local_addr()?;
        let server_stop = Shutdown::new();
        let signal = server_stop.clone();
        let server = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            // HTTP/2 pings find a dead connection even when nothing is sent on it.
            .http2_keepalive_interval(Some(HEARTBEAT))
            .http2_keepalive_timeout(Some(LOSS_TIMEOUT))
            .add_service(
                pb::coordinator_server::CoordinatorServer::new(service)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                signal.wait(),
            );
        let server = tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "coordinator server stopped");
            }
        });
        tracing::debug!(%addr, run = %opts.run.run_id, workers = opts.workers, "coordinator listening");
        Ok(Coordinator {
            spec,
            opts,
            addr,
            events_tx,
            events,
            roster,
            liveness,
            server_stop,
            server,
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle to report worker process exits.
    pub fn exit_notifier(&self) -> ExitNotifier {
        ExitNotifier(self.events_tx.clone())
    }

    /// Runs the whole distributed run; `stop` (Ctrl-C, abort) stops every worker gracefully.
    pub async fn run(self, stop: Shutdown) -> Result<RunOutcome, CoordinatorError> {
        let Coordinator {
            spec,
            opts,
            addr: _,
            events_tx,
            mut events,
            roster,
            liveness,
            server_stop,
            server,
        } = self;
        let result = RunLoop::new(&spec, &opts, roster, liveness)
            .run(&mut events, stop)
            .await;
        drop(events_tx);
        server_stop.trigger();
        // Sessions close with their senders; give the server a moment to say goodbye.
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
        Ok(report(result?, &spec, &opts.run).await?)
    }
}

/// A summarized run, before its report: what Jaeger adds comes first (it needs awaiting).
struct Finished {
    summary: Summary,
    /// The run failed before it could finish (exit code [`EXIT_RUN_INCOMPLETE`]).
    incomplete: bool,
}

/// Writes the report of a finished run, with Jaeger's slow traces when the spec names a Jaeger.
async fn report(
    finished: Finished,
    spec: &LoadTestSpec,
    opts: &RunOptions,
) -> Result<RunOutcome, RunError> {
    let Finished {
        mut summary,
        incomplete,
    } = finished;
    if !incomplete {
        crate::jaeger::enrich_run(&mut summary, spec).await;
    }
    let mut outcome = run::finish(summary, opts)?;
    if incomplete {
        outcome.exit_code = EXIT_RUN_INCOMPLETE;
    }
    Ok(outcome)
}

#[derive(Default)]
struct Worker {
    tx: Option<mpsc::Sender<Result<pb::CoordinatorMessage, Status>>>,
    ready: bool,
    last_seen: Option<Instant>,
    start_offset_ms: Option<f64>,
    done: Option<pb::Done>,
    lost: Option<(f64, String)>,
    reports: u64,
    requests: u64,
    iterations: u64,
    vus_max: u64,
    last_end_s: f64,
}

impl Worker {
    fn finished(&self) -> bool {
        self.done.is_some() || self.lost.is_some()
    }

    /// Queues `kind`; false when the worker is not reading its stream (or it is gone).
    fn send(&self, kind: ToWorker) -> bool {
        self.tx.as_ref().is_some_and(|tx| {
            tx.try_send(Ok(pb::CoordinatorMessage { kind: Some(kind) }))
                .is_ok()
        })
    }
}

struct Running {
    start_at: SystemTime,
    start: Instant,
}

struct RunLoop<'a> {
    spec: &'a LoadTestSpec,
    opts: &'a CoordinatorOptions,
    roster: Arc<Mutex<Roster>>,
    liveness: Arc<Liveness>,
    workers: Vec<Worker>,
    setup: Option<pb::Setup>,
    running: Option<Running>,
    merger: Merger,
    endpoints: Endpoints,
    collected: Collected,
    progress: indicatif::ProgressBar,
    /// Why the run failed (a lost worker under `fail`, a worker that never came).
    failure: Option<String>,
    degraded: bool,
    stop_requested: bool,
    /// After a stop or an abort: when to stop waiting for workers.
    stop_deadline: Option<Instant>,
    began: Instant,
}

fn lock(m: &Mutex<Roster>) -> std::sync::MutexGuard<'_, Roster> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<'a> RunLoop<'a> {
    fn new(
        spec: &'a LoadTestSpec,
        opts: &'a CoordinatorOptions,
        roster: Arc<Mutex<Roster>>,
        liveness: Arc<Liveness>,
    ) -> RunLoop<'a> {
        RunLoop {
            spec,
            opts,
            roster,
            liveness,
            workers: (0..opts.workers).map(|_| Worker::default()).collect(),
            setup: None,
            running: None,
            merger: Merger::new(opts.workers),
            endpoints: Endpoints::default(),
            collected: Collected::new(&opts.run.server_processes),
            progress: run::progress_bar(opts.run.progress),
            failure: None,
            degraded: false,
            stop_requested: false,
            stop_deadline: None,
            began: Instant::now(),
        }
    }

    async fn run(
        mut self,
        events: &mut mpsc::Receiver<Event>,
        stop: Shutdown,
    ) -> Result<Finished, CoordinatorError> {
        let started_at = chrono::Utc::now();
        let cpu_before = procstat::sample(std::process::id());
        let n = self.opts.workers;
        let timeout =
            Duration::from_secs(u64::from(self.spec.start_timeout_seconds.unwrap_or(120)));
        let registration_deadline = self.began + timeout;
        let client = run::client_for(self.spec, self.opts.run.insecure_skip_verify);
        let bar = self.progress.clone();
        let tell = move |m: &str| bar.set_message(format!("set-up: {m}"));
        // Set-up runs inside this loop (not spawned: its future is not `Send`), polled
        // alongside the registrations it overlaps with.
        let setup = run::prepare(self.spec, &self.opts.run.run_id, &client, &tell);
        tokio::pin!(setup);
        let mut setup_pending = true;
        let mut tick = tokio::time::interval(HEARTBEAT / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.running.is_some() && self.workers.iter().all(Worker::finished) {
                break;
            }
            tokio::select! {
                event = events.recv() => {
                    let Some(event) = event else { break };
                    self.on_event(event);
                }
                joined = &mut setup, if setup_pending => {
                    setup_pending = false;
                    let prepared = match joined {
                        Ok(p) => p,
                        Err(e) => {
                            self.stop_all(true, &format!("set-up failed: {e}"));
                            self.progress.finish_and_clear();
                            return Err(e.into());
                        }
                    };
                    self.on_setup(&prepared);
                }
                _ = tick.tick() => {
                    if let Some(outcome) = self.on_tick(registration_deadline, timeout) {
                        return outcome;
                    }
                }
                () = stop.wait(), if !self.stop_requested => {
                    self.stop_requested = true;
                    if self.running.is_none() {
                        self.stop_all(false, "the coordinator was stopped before the start");
                        self.progress.finish_and_clear();
                        return Err(CoordinatorError::Aborted(
                            "stopped before the workers started".into(),
                        ));
                    }
                    tracing::info!("stopping every worker (graceful stop)");
                    self.stop_all(false, "the coordinator was stopped");
                    self.stop_deadline = Some(Instant::now() + self.spec.executor.graceful_stop() + LOSS_TIMEOUT * 3);
                }
            }
            if self.running.is_none()
                && self.setup.is_some()
                && self.workers.iter().all(|w| w.ready)
            {
                self.schedule_start(n);
            }
        }
        let ended_at = chrono::Utc::now();
        let cpu_after = procstat::sample(std::process::id());
        self.progress.finish_and_clear();
        let coordinator_cpu_s = match (cpu_before, cpu_after) {
            (Some(a), Some(b)) => (b.cpu_s - a.cpu_s).max(0.0),
            _ => 0.0,
        };
        Ok(self.summarize(started_at, ended_at, coordinator_cpu_s)?)
    }

    fn on_setup(&mut self, prepared: &Prepared) {
        let setup = codec::encode_setup(prepared);
        for (index, w) in self.workers.iter().enumerate() {
            if w.tx.is_some() && !w.send(ToWorker::Setup(setup.clone())) {
                tracing::warn!(index, "cannot send set-up data to worker");
            }
        }
        self.setup = Some(setup);
        self.show_gathering();
    }

    fn show_gathering(&self) {
        let connected = self.workers.iter().filter(|w| w.tx.is_some()).count();
        let ready = self.workers.iter().filter(|w| w.ready).count();
        let setup = if self.setup.is_some() {
            "set-up done"
        } else {
            "set-up running"
        };
        self.progress.set_message(format!(
            "workers: {connected}/{} connected, {ready} ready; {setup}",
            self.workers.len()
        ));
    }

    fn schedule_start(&mut self, n: u32) {
        lock(&self.roster).seal();
        let start_at = SystemTime::now() + self.opts.start_lead;
        let at = unix_nanos(start_at);
        for (index, w) in self.workers.iter().enumerate() {
            if !w.send(ToWorker::Start(pb::Start { at_unix_nanos: at })) {
                tracing::warn!(index, "cannot send the start to worker");
            }
        }
        let start = Instant::now() + self.opts.start_lead;
        // The silence clock restarts at the start: nobody is lost for the wait itself.
        for w in &mut self.workers {
            w.last_seen = Some(start);
        }
        tracing::debug!(workers = n, lead = ?self.opts.start_lead, "every worker is ready; start scheduled");
        self.running = Some(Running { start_at, start });
    }

    fn elapsed_s(&self) -> f64 {
        self.running.as_ref().map_or(0.0, |r| {
            Instant::now()
                .saturating_duration_since(r.start)
                .as_secs_f64()
        })
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Connected { index, tx } => {
                let Some(w) = self.workers.get_mut(index as usize) else {
                    return;
                };
                w.tx = Some(tx);
                w.last_seen = Some(Instant::now());
                if let Some(setup) = &self.setup
                    && !w.send(ToWorker::Setup(setup.clone()))
                {
                    tracing::warn!(index, "cannot send set-up data to worker");
                }
                tracing::debug!(index, "worker connected");
                self.show_gathering();
            }
            Event::Message { index, kind } => self.on_message(index, *kind),
            Event::Ended { index, reason } => {
                let Some(w) = self.workers.get_mut(index as usize) else {
                    return;
                };
                if w.finished() {
                    return;
                }
                if self.running.is_none() {
                    // Before the start a worker may leave and come back (a restarted pod).
                    tracing::warn!(index, %reason, "worker left before the start");
                    *w = Worker::default();
                    lock(&self.roster).release(index);
                    self.show_gathering();
                } else {
                    self.lose(index, format!("its stream ended ({reason})"));
                }
            }
            Event::Exited { index, reason } => {
                let Some(w) = self.workers.get(index as usize) else {
                    return;
                };
                if w.finished() {
                    return;
                }
                if self.running.is_none() {
                    if self.failure.is_none() {
                        self.failure =
                            Some(format!("worker {index} exited before the start: {reason}"));
                    }
                } else {
                    self.lose(index, format!("its process exited ({reason})"));
                }
            }
        }
    }

    fn on_message(&mut self, index: u32, kind: FromWorker) {
        let start_at = self.running.as_ref().map(|r| r.start_at);
        let Some(w) = self.workers.get_mut(index as usize) else {
            return;
        };
        if w.finished() {
            return;
        }
        w.last_seen = Some(Instant::now().max(w.last_seen.unwrap_or_else(Instant::now)));
        match kind {
            FromWorker::Hello(_) | FromWorker::Heartbeat(_) => {}
            FromWorker::Ready(_) => {
                w.ready = true;
                self.show_gathering();
            }
            FromWorker::Started(s) => {
                if let Some(at) = start_at {
                    let offset = (s.at_unix_nanos - unix_nanos(at)) as f64 / 1e6;
                    w.start_offset_ms = Some(offset);
                    tracing::debug!(index, offset_ms = offset, "worker started");
                }
            }
            FromWorker::Report(report) => {
                let decoded = match codec::decode_report(&report, &mut self.endpoints) {
                    Ok(d) => d,
                    Err(e) => return self.lose(index, format!("it sent a malformed report: {e}")),
                };
                let (requests, iterations) = (decoded.requests(), decoded.iterations());
                let meta = decoded.meta;
                if let Err(e) = self.merger.add(index, &decoded) {
                    return self.lose(index, e.to_string());
                }
                let Some(w) = self.workers.get_mut(index as usize) else {
                    return;
                };
                w.reports += 1;
                w.requests += requests;
                w.iterations += iterations;
                w.vus_max = meta.vus_max;
                w.last_end_s = meta.end_s;
                self.emit_intervals();
            }
            FromWorker::Done(done) => {
                tracing::debug!(index, duration_s = done.duration_s, "worker done");
                w.done = Some(done);
                // Dropping the sender ends the worker's stream: its cue to exit.
                w.tx = None;
                self.merger.close(index);
                self.emit_intervals();
            }
        }
    }

    /// Worker `index` is lost: apply the run's policy.
    fn lose(&mut self, index: u32, reason: String) {
        let at = self.elapsed_s();
        let Some(w) = self.workers.get_mut(index as usize) else {
            return;
        };
        if w.finished() {
            return;
        }
        tracing::warn!(index, at_s = at, %reason, "worker lost");
        w.lost = Some((at, reason.clone()));
        w.tx = None;
        self.merger.close(index);
        let all_lost = self.workers.iter().all(|w| w.lost.is_some());
        match self.spec.on_worker_loss {
            OnWorkerLoss::Fail => {
                if self.failure.is_none() {
                    self.failure = Some(format!("worker {index} lost at {at:.1}s: {reason}"));
                    self.stop_all(
                        true,
                        &format!("worker {index} was lost and the run fails (onWorkerLoss: fail)"),
                    );
                    self.stop_deadline = Some(Instant::now() + LOSS_TIMEOUT * 3);
                }
            }
            OnWorkerLoss::Continue => {
                self.degraded = true;
                self.progress.println(format!(
                    "  ⚠ worker {index} lost at {at:.1}s ({reason}); continuing without it"
                ));
                if all_lost && self.failure.is_none() {
                    self.failure = Some(format!(
                        "every worker was lost (the last, worker {index}, at {at:.1}s: {reason})"
                    ));
                }
            }
        }
        self.emit_intervals();
    }

    fn stop_all(&self, abort: bool, reason: &str) {
        for w in &self.workers {
            if !w.finished() {
                let _ = w.send(ToWorker::Stop(pb::Stop {
                    abort,
                    reason: reason.to_owned(),
                }));
            }
        }
    }

    /// Heartbeats, silence, and the deadlines. `Some` ends the run early.
    fn on_tick(
        &mut self,
        registration_deadline: Instant,
        timeout: Duration,
    ) -> Option<Result<Finished, CoordinatorError>> {
        let now = Instant::now();
        let mut silent = Vec::new();
        let mut deaf = Vec::new();
        for (index, w) in self.workers.iter().enumerate() {
            if w.tx.is_none() || w.finished() {
                continue;
            }
            // Heard on arrival, or processed (the start resets the clock for everyone).
            let silent_for = w.last_seen.map(|t| {
                now.saturating_duration_since(t)
                    .min(self.liveness.silent_for(index as u32))
            });
            if silent_for.is_some_and(|d| d > LOSS_TIMEOUT) {
                silent.push(index as u32);
            } else if !w.send(ToWorker::Heartbeat(pb::Heartbeat {})) {
                deaf.push(index as u32);
            }
        }
        for index in silent {
            self.on_silence(
                index,
                format!("no message for {} s", LOSS_TIMEOUT.as_secs()),
            );
        }
        for index in deaf {
            self.on_silence(index, "it stopped reading its stream".into());
        }
        if self.running.is_none() {
            let missing: Vec<String> = self
                .workers
                .iter()
                .enumerate()
                .filter(|(_, w)| w.tx.is_none())
                .map(|(i, _)| i.to_string())
                .collect();
            let unready: Vec<String> = self
                .workers
                .iter()
                .enumerate()
                .filter(|(_, w)| w.tx.is_some() && !w.ready)
                .map(|(i, _)| i.to_string())
                .collect();
            let failure = if let Some(f) = self.failure.clone() {
                Some(f)
            } else if now >= registration_deadline && !missing.is_empty() {
                Some(format!(
                    "worker{} {} did not register within {} s (startTimeoutSeconds)",
                    if missing.len() == 1 { "" } else { "s" },
                    missing.join(", "),
                    timeout.as_secs()
                ))
            } else if now >= registration_deadline && self.setup.is_some() && !unready.is_empty() {
                Some(format!(
                    "worker{} {} did not get ready within {} s (startTimeoutSeconds)",
                    if unready.len() == 1 { "" } else { "s" },
                    unready.join(", "),
                    timeout.as_secs()
                ))
            } else {
                None
            };
            if let Some(reason) = failure {
                tracing::error!(%reason, "the run cannot start");
                self.failure = Some(reason.clone());
                self.stop_all(true, &reason);
                self.progress.finish_and_clear();
                return Some(
                    self.summarize(chrono::Utc::now(), chrono::Utc::now(), 0.0)
                        .map_err(CoordinatorError::from),
                );
            }
            return None;
        }
        // Running: nobody may take forever.
        let hard = self.running.as_ref().map(|r| {
            r.start
                + self.spec.executor.duration()
                + self.spec.executor.graceful_stop()
                + LOSS_TIMEOUT * 10
        });
        let deadline = match (hard, self.stop_deadline) {
            (Some(h), Some(s)) => Some(h.min(s)),
            (h, s) => h.or(s),
        };
        if deadline.is_some_and(|d| now >= d) {
            let late: Vec<u32> = self
                .workers
                .iter()
                .enumerate()
                .filter(|(_, w)| !w.finished())
                .map(|(i, _)| i as u32)
                .collect();
            for index in late {
                self.lose(index, "it did not finish in time".into());
            }
        }
        None
    }

    fn on_silence(&mut self, index: u32, reason: String) {
        if self.running.is_some() {
            self.lose(index, reason);
        } else if let Some(w) = self.workers.get_mut(index as usize) {
            tracing::warn!(index, %reason, "worker went quiet before the start; dropping it");
            *w = Worker::default();
            lock(&self.roster).release(index);
        }
    }

    /// Turns finished intervals into points and progress.
    fn emit_intervals(&mut self) {
        while let Some(interval) = self.merger.pop() {
            self.emit(&interval);
        }
    }

    fn emit(&mut self, iv: &Interval) {
        let point = interval_point(&iv.buffer, iv.end_s, iv.length_s, iv.vus);
        self.collected.sample_services(point.t);
        self.collected
            .generator
            .record(iv.cpu_cores, iv.lag_ms, iv.saturated);
        let live = self.workers.iter().filter(|w| w.lost.is_none()).count();
        show_progress(
            &self.progress,
            Duration::from_secs_f64(iv.end_s),
            self.spec.executor.duration(),
            &point,
            &format!("  workers {live}/{}", self.workers.len()),
        );
        self.collected.points.push(point);
    }

    fn summarize(
        &mut self,
        started_at: chrono::DateTime<chrono::Utc>,
        ended_at: chrono::DateTime<chrono::Utc>,
        coordinator_cpu_s: f64,
    ) -> Result<Finished, RunError> {
        for interval in self.merger.drain() {
            self.emit(&interval);
        }
        let mut collected = std::mem::take(&mut self.collected);
        collected.totals = std::mem::take(&mut self.merger.totals);
        let execution = Execution {
            duration: Duration::from_secs_f64(
                self.workers
                    .iter()
                    .map(|w| w.done.as_ref().map_or(w.last_end_s, |d| d.duration_s))
                    .fold(0.0, f64::max)
                    .max(0.0),
            ),
            interrupted: self
                .workers
                .iter()
                .filter_map(|w| w.done.as_ref().map(|d| d.interrupted))
                .sum(),
            stopped_early: self.stop_requested
                || self.failure.is_some()
                || self
                    .workers
                    .iter()
                    .any(|w| w.done.as_ref().is_some_and(|d| d.stopped_early)),
        };
        let vus_max = self.workers.iter().map(|w| w.vus_max).sum();
        let mut summary = run::summarize(
            self.spec,
            &self.opts.run,
            self.endpoints.names(),
            vus_max,
            collected,
            started_at,
            ended_at,
            &execution,
        );
        let offsets: Vec<f64> = self
            .workers
            .iter()
            .filter_map(|w| w.start_offset_ms)
            .collect();
        let skew = if offsets.is_empty() {
            None
        } else {
            let max = offsets.iter().copied().fold(f64::MIN, f64::max);
            let min = offsets.iter().copied().fold(f64::MAX, f64::min);
            Some(max - min)
        };
        let roster = lock(&self.roster);
        let records = self
            .workers
            .iter()
            .enumerate()
            .map(|(i, w)| WorkerRecord {
                index: i as u32,
                host: roster.host(i as u32),
                start_offset_ms: w.start_offset_ms,
                reports: w.reports,
                requests: w.requests,
                iterations: w.iterations,
                lost: w.lost.is_some(),
            })
            .collect();
        drop(roster);
        let lost_workers: Vec<LostWorker> = self
            .workers
            .iter()
            .enumerate()
            .filter_map(|(i, w)| {
                w.lost.as_ref().map(|(at, reason)| LostWorker {
                    index: i as u32,
                    at_s: *at,
                    reason: reason.clone(),
                })
            })
            .collect();
        summary.run.degraded = self.degraded;
        summary.run.distributed = Some(Distribution {
            scheduled_start: self.running.as_ref().map(|r| {
                chrono::DateTime::<chrono::Utc>::from(r.start_at)
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            }),
            start_skew_ms: skew,
            on_worker_loss: match self.spec.on_worker_loss {
                OnWorkerLoss::Fail => "fail".into(),
                OnWorkerLoss::Continue => "continue".into(),
            },
            workers: records,
            lost_workers,
            reports: self.workers.iter().map(|w| w.reports).sum(),
            coordinator_cpu_s,
        });
        if let Some(failure) = &self.failure {
            summary.run.verdict = Verdict::Fail;
            summary.run.reason = Some(match summary.run.reason.take() {
                Some(r) => format!("{failure}; {r}"),
                None => failure.clone(),
            });
        } else if self.degraded {
            let lost: Vec<String> = self
                .workers
                .iter()
                .enumerate()
                .filter(|(_, w)| w.lost.is_some())
                .map(|(i, _)| i.to_string())
                .collect();
            let note = format!(
                "degraded: lost worker{} {} (onWorkerLoss: continue)",
                if lost.len() == 1 { "" } else { "s" },
                lost.join(", ")
            );
            summary.run.reason = Some(match summary.run.reason.take() {
                Some(r) => format!("{r}; {note}"),
                None => note,
            });
        }
        // The workers' slowest sampled requests, merged (they run on one clock, the start).
        let jaeger_url = self
            .spec
            .tracing
            .as_ref()
            .and_then(|t| t.jaeger_url.as_deref());
        let refs = self
            .workers
            .iter_mut()
            .filter_map(|w| w.done.as_mut())
            .flat_map(|d| std::mem::take(&mut d.traces))
            .map(|t| TraceRef {
                t: t.t,
                endpoint: t.endpoint,
                duration_ms: t.duration_ms,
                trace_id: t.trace_id,
                url: None,
            });
        summary.traces = crate::tracing_client::merge_refs(refs, jaeger_url);
        Ok(Finished {
            summary,
            incomplete: self.failure.is_some(),
        })
    }
}
