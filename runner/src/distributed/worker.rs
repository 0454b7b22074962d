//! A load worker: registers with its coordinator, builds its share of the workload from the
//! set-up data it is sent, starts on the scheduled instant, streams one exact report per second,
//! and stops its load when told to — or by itself within seconds when it loses the coordinator,
//! so an orphaned worker never goes on hammering the target.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use loadlab_kit::Shutdown;
use loadlab_proto::runner::v1 as pb;
use pb::coordinator_client::CoordinatorClient;
use pb::coordinator_message::Kind as FromCoordinator;
use pb::worker_message::Kind as ToCoordinator;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::Streaming;
use tonic::transport::Channel;

use super::codec::{self, ReportMeta};
use super::service::unix_nanos;
use super::shard::Shard;
use super::{HEARTBEAT, LOSS_TIMEOUT, MAX_MESSAGE_BYTES, VERSION};
use crate::executor::{self, Execution, Iteration, Pacing};
use crate::metrics::{self, Buffer, Registry};
use crate::run::{self, Drive, GeneratorTrack, Prepared, RunError};
use crate::spec::LoadTestSpec;

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The coordinator, e.g. `http://coordinator:7000`.
    pub coordinator: String,
    /// This worker's shard.
    pub index: u32,
    /// Workers of the run.
    pub total: u32,
    /// The run (empty: whatever the coordinator runs).
    pub run: String,
    /// How long to keep trying to reach the coordinator at first (it may start after us).
    pub connect_timeout: Duration,
    /// Accept any TLS certificate from the target.
    pub insecure_skip_verify: bool,
}

/// Why a worker stopped without finishing its share.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The coordinator URL is unusable.
    #[error("coordinator URL {url:?}: {message}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The coordinator could not be reached.
    #[error("cannot reach the coordinator at {url} within {seconds} s: {message}")]
    Unreachable {
        /// The URL.
        url: String,
        /// How long it tried.
        seconds: u64,
        /// The last error.
        message: String,
    },
    /// The coordinator refused this worker.
    #[error("the coordinator refused worker {index} ({code:?}): {message}")]
    Refused {
        /// This worker.
        index: u32,
        /// The gRPC status code.
        code: tonic::Code,
        /// Its message.
        message: String,
    },
    /// The coordinator went away; the load was stopped.
    #[error("lost the coordinator ({0}); load stopped")]
    CoordinatorLost(String),
    /// The coordinator sent something this worker cannot use.
    #[error("the coordinator sent an unusable {what}: {message}")]
    Protocol {
        /// Which message.
        what: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The workload could not be built.
    #[error(transparent)]
    Run(#[from] RunError),
}

/// How a worker's share went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerOutcome {
    /// Requests this worker sent.
    pub requests: u64,
    /// Interval reports sent.
    pub reports: u64,
    /// A stop request ended it early (or before it started).
    pub stopped_early: bool,
}

type Outbound = mpsc::Sender<pb::WorkerMessage>;

/// Reports queued towards the coordinator before it counts as not reading.
const OUTBOUND_CAPACITY: usize = 64;

fn message(kind: ToCoordinator) -> pb::WorkerMessage {
    pb::WorkerMessage { kind: Some(kind) }
}

/// Queues a message; an error says why the coordinator counts as lost.
fn send(tx: &Outbound, kind: ToCoordinator) -> Result<(), String> {
    tx.try_send(message(kind)).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => "it stopped reading our stream".to_owned(),
        mpsc::error::TrySendError::Closed(_) => "our stream to it closed".to_owned(),
    })
}

fn host_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    format!("{host} pid {}", std::process::id())
}

/// Runs this worker's share of a run until it is done, stopped, or the coordinator is lost.
pub async fn work(opts: &WorkerOptions, stop: Shutdown) -> Result<WorkerOutcome, WorkerError> {
    let url = opts.coordinator.clone();
    let endpoint = tonic::transport::Endpoint::from_shared(url.clone())
        .map_err(|e| WorkerError::Url {
            url: url.clone(),
            message: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(HEARTBEAT)
        .keep_alive_timeout(LOSS_TIMEOUT)
        .keep_alive_while_idle(true);
    // In Kubernetes the coordinator's Service may answer only after the workers start.
    let deadline = Instant::now() + opts.connect_timeout;
    let channel = loop {
        match endpoint.connect().await {
            Ok(channel) => break channel,
            Err(e) if Instant::now() < deadline && !stop.is_triggered() => {
                tracing::debug!(error = %e, %url, "coordinator not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => {
                return Err(WorkerError::Unreachable {
                    url,
                    seconds: opts.connect_timeout.as_secs(),
                    message: source_chain(&e),
                });
            }
        }
    };
    let mut client = CoordinatorClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let refused = |s: tonic::Status| WorkerError::Refused {
        index: opts.index,
        code: s.code(),
        message: s.message().to_owned(),
    };
    let offset_ns = clock_offset(&mut client).await.map_err(refused)?;
    let registration = client
        .register(pb::RegisterRequest {
            run: opts.run.clone(),
            index: opts.index,
            total: opts.total,
            version: VERSION.to_owned(),
            host: host_name(),
        })
        .await
        .map_err(refused)?
        .into_inner();
    let protocol = |what: &'static str| move |e: String| WorkerError::Protocol { what, message: e };
    let spec: LoadTestSpec = serde_json::from_str(&registration.spec_json)
        .map_err(|e| protocol("spec")(e.to_string()))?;
    let shard = registration
        .shard
        .map(|s| Shard {
            index: s.index,
            total: s.total,
            vu_offset: s.vu_offset,
            users: s.users_from..s.users_to,
        })
        .ok_or_else(|| protocol("registration")("no shard".into()))?;
    tracing::info!(
        index = opts.index,
        run = %registration.run,
        clock_offset_ms = offset_ns as f64 / 1e6,
        executor = ?spec.executor,
        "registered"
    );
    let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
    send(
        &tx,
        ToCoordinator::Hello(pb::Hello {
            index: opts.index,
            session: registration.session,
        }),
    )
    .map_err(WorkerError::CoordinatorLost)?;
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(refused)?
        .into_inner();
    let Some((prepared, start_at)) = await_start(&mut inbound, &tx, &stop).await? else {
        return Ok(WorkerOutcome {
            stopped_early: true,
            ..WorkerOutcome::default()
        });
    };
    // The start instant on this machine's clock, as a monotonic instant.
    let local_start_ns = start_at - offset_ns;
    let wait_ns = local_start_ns - unix_nanos(SystemTime::now());
    if wait_ns < 0 {
        tracing::warn!(
            late_ms = -wait_ns as f64 / 1e6,
            "the scheduled start had passed when it arrived"
        );
    }
    let start = Instant::now() + Duration::from_nanos(u64::try_from(wait_ns).unwrap_or(0));
    let registry = Registry::new();
    let http = run::client_for(&spec, opts.insecure_skip_verify);
    let driver = Worker {
        spec: &spec,
        registry: registry.clone(),
        tx,
        inbound,
        start,
        offset_ns,
        stop,
    };
    run::with_workload(&spec, &prepared, http, &registry, &shard, start, driver).await?
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The coordinator's clock minus ours, ns: Cristian's estimate from the fastest of a few
/// round trips (a slow one says little about where in it the coordinator read its clock).
async fn clock_offset(client: &mut CoordinatorClient<Channel>) -> Result<i64, tonic::Status> {
    let mut best: Option<(i64, i64)> = None;
    for _ in 0..5 {
        let sent = unix_nanos(SystemTime::now());
        let theirs = client
            .clock(pb::ClockRequest {})
            .await?
            .into_inner()
            .now_unix_nanos;
        let received = unix_nanos(SystemTime::now());
        let rtt = received - sent;
        let offset = theirs - (sent + rtt / 2);
        if best.is_none_or(|(r, _)| rtt < r) {
            best = Some((rtt, offset));
        }
    }
    Ok(best.map_or(0, |(_, offset)| offset))
}

/// Waits for the set-up data (answering Ready) and the start; `None` when stopped first.
async fn await_start(
    inbound: &mut Streaming<pb::CoordinatorMessage>,
    tx: &Outbound,
    stop: &Shutdown,
) -> Result<Option<(Prepared, i64)>, WorkerError> {
    let mut prepared = None;
    let mut beat = tokio::time::interval(HEARTBEAT);
    let mut last_seen = Instant::now();
    loop {
        tokio::select! {
            msg = inbound.message() => {
                last_seen = Instant::now();
                match msg {
                    Ok(Some(pb::CoordinatorMessage { kind: Some(kind) })) => match kind {
                        FromCoordinator::Heartbeat(_) => {}
                        FromCoordinator::Setup(setup) => {
                            let p = codec::decode_setup(&setup).map_err(|e| WorkerError::Protocol {
                                what: "set-up",
                                message: e.to_string(),
                            })?;
                            prepared = Some(p);
                            send(tx, ToCoordinator::Ready(pb::Ready {}))
                                .map_err(WorkerError::CoordinatorLost)?;
                        }
                        FromCoordinator::Start(s) => {
                            let p = prepared.take().ok_or_else(|| WorkerError::Protocol {
                                what: "start",
                                message: "Start came before the set-up data".into(),
                            })?;
                            return Ok(Some((p, s.at_unix_nanos)));
                        }
                        FromCoordinator::Stop(s) => {
                            tracing::info!(reason = %s.reason, "stopped before the start");
                            return Ok(None);
                        }
                    },
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        return Err(WorkerError::CoordinatorLost(
                            "it closed the session before the start".into(),
                        ));
                    }
                    Err(status) => {
                        return Err(WorkerError::CoordinatorLost(status.message().to_owned()));
                    }
                }
            }
            _ = beat.tick() => {
                if last_seen.elapsed() > LOSS_TIMEOUT {
                    return Err(WorkerError::CoordinatorLost(format!(
                        "no message for {} s",
                        LOSS_TIMEOUT.as_secs()
                    )));
                }
                send(tx, ToCoordinator::Heartbeat(pb::Heartbeat {}))
                    .map_err(WorkerError::CoordinatorLost)?;
            }
            () = stop.wait() => return Ok(None),
        }
    }
}

/// The running part of a worker.
struct Worker<'a> {
    spec: &'a LoadTestSpec,
    registry: Arc<Registry>,
    tx: Outbound,
    inbound: Streaming<pb::CoordinatorMessage>,
    start: Instant,
    offset_ns: i64,
    stop: Shutdown,
}

/// How long an orphaned worker lets in-flight iterations finish before it cuts them off.
const ORPHAN_GRACE: Duration = Duration::from_secs(1);

/// Turns the registry's samples into numbered reports.
struct Reporter {
    registry: Arc<Registry>,
    pacing: Arc<Pacing>,
    start: Instant,
    last: Instant,
    seq: u64,
    interval: Buffer,
    generator: GeneratorTrack,
    requests: u64,
}

impl Reporter {
    fn report(&mut self, tx: &Outbound) -> Result<(), String> {
        let now = Instant::now();
        self.interval.reset();
        self.registry.drain_into(&mut self.interval);
        let cpu = self.generator.sample_self().unwrap_or(0.0);
        let lag_ms = run::take_lag_ms(&self.pacing);
        let meta = ReportMeta {
            seq: self.seq,
            end_s: now.saturating_duration_since(self.start).as_secs_f64(),
            length_s: now.saturating_duration_since(self.last).as_secs_f64(),
            vus_peak: self.registry.take_vus_peak(),
            vus_max: metrics::gauge(&self.registry.vus_max),
            cpu_cores: cpu,
            lag_ms,
            saturated: GeneratorTrack::saturated(cpu, lag_ms),
        };
        let report = codec::encode_report(&self.interval, &self.registry.endpoint_names(), meta)
            .map_err(|e| format!("cannot encode a report: {e}"))?;
        send(tx, ToCoordinator::Report(report))?;
        self.requests += self.interval.requests();
        self.last = now;
        self.seq += 1;
        Ok(())
    }
}

impl Drive for Worker<'_> {
    type Output = Result<WorkerOutcome, WorkerError>;

    fn drive<I: Iteration>(self, workload: Arc<I>) -> impl Future<Output = Self::Output> + Send {
        self.run(workload)
    }
}

impl Worker<'_> {
    async fn run<I: Iteration>(mut self, workload: Arc<I>) -> Result<WorkerOutcome, WorkerError> {
        let lost = |reason: String| WorkerError::CoordinatorLost(reason);
        let mut beat = tokio::time::interval(HEARTBEAT);
        let mut last_seen = Instant::now();
        // Until the start: listen (a stop may come), keep the heartbeat.
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(self.start) => break,
                msg = self.inbound.message() => {
                    last_seen = Instant::now();
                    match msg {
                        Ok(Some(pb::CoordinatorMessage { kind: Some(FromCoordinator::Stop(s)) })) => {
                            tracing::info!(reason = %s.reason, "stopped before the start");
                            return Ok(WorkerOutcome { stopped_early: true, ..WorkerOutcome::default() });
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => return Err(lost("it closed the session".into())),
                        Err(status) => return Err(lost(status.message().to_owned())),
                    }
                }
                _ = beat.tick() => {
                    if last_seen.elapsed() > LOSS_TIMEOUT {
                        return Err(lost(format!("no message for {} s", LOSS_TIMEOUT.as_secs())));
                    }
                    send(&self.tx, ToCoordinator::Heartbeat(pb::Heartbeat {})).map_err(lost)?;
                }
                () = self.stop.wait() => {
                    return Ok(WorkerOutcome { stopped_early: true, ..WorkerOutcome::default() });
                }
            }
        }
        let pacing = Arc::new(Pacing::default());
        let probe_stop = Shutdown::new();
        let prober = tokio::spawn(executor::probe_timer_lag(
            pacing.clone(),
            probe_stop.clone(),
        ));
        let exec_stop = Shutdown::new();
        let started = unix_nanos(SystemTime::now()) + self.offset_ns;
        let mut generator = GeneratorTrack::default();
        let _ = generator.sample_self();
        let mut reporter = Reporter {
            registry: self.registry.clone(),
            pacing: pacing.clone(),
            start: Instant::now(),
            last: Instant::now(),
            seq: 0,
            interval: Buffer::default(),
            generator,
            requests: 0,
        };
        // Request tracing of this worker's share (sampling, `traceparent`, client spans); its
        // slowest sampled requests go to the coordinator with the `Done`.
        let tracing = crate::tracing_client::for_run(self.spec);
        let execution = executor::execute(
            &self.spec.executor,
            workload,
            self.registry.clone(),
            pacing,
            exec_stop.clone(),
        );
        tokio::pin!(execution);
        send(
            &self.tx,
            ToCoordinator::Started(pb::Started {
                at_unix_nanos: started,
            }),
        )
        .map_err(lost)?;
        let first = reporter.start + Duration::from_secs(1);
        let mut report_tick = tokio::time::interval_at(first, Duration::from_secs(1));
        report_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut orphaned: Option<String> = None;
        let mut cut_off: Option<Instant> = None;
        let mut aborted = false;
        let far = Instant::now() + Duration::from_secs(365 * 24 * 3_600);
        let execution: Option<Execution> = loop {
            tokio::select! {
                done = &mut execution => break Some(done),
                _ = report_tick.tick(), if orphaned.is_none() => {
                    if let Err(reason) = reporter.report(&self.tx) {
                        orphaned = Some(reason);
                    }
                }
                _ = beat.tick(), if orphaned.is_none() => {
                    if last_seen.elapsed() > LOSS_TIMEOUT {
                        orphaned = Some(format!("no message for {} s", LOSS_TIMEOUT.as_secs()));
                    } else if let Err(reason) = send(&self.tx, ToCoordinator::Heartbeat(pb::Heartbeat {})) {
                        orphaned = Some(reason);
                    }
                }
                msg = self.inbound.message(), if orphaned.is_none() => {
                    last_seen = Instant::now();
                    match msg {
                        Ok(Some(pb::CoordinatorMessage { kind: Some(FromCoordinator::Stop(s)) })) => {
                            tracing::info!(abort = s.abort, reason = %s.reason, "stop requested");
                            exec_stop.trigger();
                            if s.abort {
                                aborted = true;
                                cut_off = Some(Instant::now());
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => orphaned = Some("it closed the session".into()),
                        Err(status) => orphaned = Some(status.message().to_owned()),
                    }
                }
                () = tokio::time::sleep_until(cut_off.unwrap_or(far)), if cut_off.is_some() => break None,
                () = self.stop.wait(), if !exec_stop.is_triggered() => {
                    tracing::info!("stopping (graceful stop)");
                    exec_stop.trigger();
                }
            }
            if orphaned.is_some() && cut_off.is_none() {
                // Without a coordinator nobody would ever read the results: stop the load now.
                tracing::error!(reason = ?orphaned, "lost the coordinator; stopping the load");
                exec_stop.trigger();
                cut_off = Some(Instant::now() + ORPHAN_GRACE);
            }
        };
        // An execution cut off here is dropped, which aborts its VUs.
        probe_stop.trigger();
        let _ = prober.await;
        let traces = match tracing {
            Some(t) => t.complete(&self.registry.endpoint_names()).await,
            None => Vec::new(),
        };
        if let Some(reason) = orphaned {
            return Err(lost(reason));
        }
        let interrupted_now = metrics::gauge(&self.registry.vus);
        let execution = execution.unwrap_or(Execution {
            duration: reporter.start.elapsed(),
            interrupted: interrupted_now,
            stopped_early: true,
        });
        reporter.report(&self.tx).map_err(lost)?;
        send(
            &self.tx,
            ToCoordinator::Done(pb::Done {
                duration_s: execution.duration.as_secs_f64(),
                interrupted: execution.interrupted,
                stopped_early: execution.stopped_early || aborted,
                traces: traces
                    .into_iter()
                    .map(|r| pb::SlowTrace {
                        t: r.t,
                        endpoint: r.endpoint,
                        duration_ms: r.duration_ms,
                        trace_id: r.trace_id,
                    })
                    .collect(),
            }),
        )
        .map_err(lost)?;
        // The coordinator ends the session once it has the Done: then everything arrived.
        let acknowledged = tokio::time::timeout(LOSS_TIMEOUT * 2, async {
            while let Ok(Some(_)) = self.inbound.message().await {}
        })
        .await;
        if acknowledged.is_err() {
            tracing::warn!("the coordinator did not close the session after our last report");
        }
        Ok(WorkerOutcome {
            requests: reporter.requests,
            reports: reporter.seq,
            stopped_early: execution.stopped_early || aborted,
        })
    }
}
