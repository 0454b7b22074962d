//! One load test, start to verdict: set-up, the executor, a collector that turns recorded
//! samples into a per-second series and run totals, server-side sampling, the generator guard,
//! thresholds, and the summary.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use loadlab_kit::Shutdown;

use crate::distributed::shard::{Shard, ShardVus};
use crate::executor::{self, Iteration, Pacing};
use crate::http_client::{Client, ClientConfig};
use crate::metrics::{self, Buffer, PHASES, Registry, mean_ms, quantile_ms};
use crate::procstat::{self, ProcSample};
use crate::scenario::{chat, feed, http as http_scenario};
use crate::spec::{LoadTestSpec, ScenarioName};
use crate::summary::{
    EndpointStats, GeneratorHealth, Metric, MetricType, Point, RunInfo, ServerStats, ServicePoint,
    ServiceStats, Summary, ThresholdResult, Timeseries, Verdict,
};
use crate::threshold::{Aggregation, Threshold};

/// Exit code of a run whose thresholds failed (k6's).
pub const EXIT_THRESHOLDS_FAILED: i32 = 99;

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Where `summary.json` and `index.html` go.
    pub out_dir: PathBuf,
    /// Show a live progress line.
    pub progress: bool,
    /// Local processes of the system under test to sample: (service name, pid).
    pub server_processes: Vec<(String, u32)>,
    /// Run id (also used to make set-up data unique).
    pub run_id: String,
    /// Accept any TLS certificate.
    pub insecure_skip_verify: bool,
}

/// A finished run.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The summary (also written to `summary.json`).
    pub summary: Summary,
    /// 0 when every threshold held, [`EXIT_THRESHOLDS_FAILED`] otherwise.
    pub exit_code: i32,
}

/// Why a run could not complete.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Set-up against the target failed.
    #[error(transparent)]
    Setup(#[from] feed::SetupError),
    /// A request template is invalid.
    #[error(transparent)]
    Template(#[from] http_scenario::TemplateError),
    /// The scenario cannot run yet.
    #[error("{0}")]
    Unsupported(String),
    /// Writing the report failed.
    #[error("writing the report to {path}: {source}")]
    Report {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// Everything the collector accumulates (the distributed coordinator fills the same record from
/// its workers' merged reports, so both paths share [`summarize`]).
#[derive(Default)]
pub(crate) struct Collected {
    /// Exact run totals.
    pub(crate) totals: Buffer,
    /// One point per interval.
    pub(crate) points: Vec<Point>,
    pub(crate) services: Vec<ServiceTrack>,
    pub(crate) generator: GeneratorTrack,
}

pub(crate) struct ServiceTrack {
    name: String,
    pid: u32,
    first: Option<ProcSample>,
    last: Option<ProcSample>,
    points: Vec<ServicePoint>,
}

/// The generator guard's running tally.
#[derive(Default)]
pub(crate) struct GeneratorTrack {
    last: Option<ProcSample>,
    max_cpu: f64,
    max_lag_ms: f64,
    saturated_intervals: u32,
    intervals: u32,
}

impl GeneratorTrack {
    /// Whether an interval in which this process used `cpu` cores and its runtime fell behind by
    /// `lag_ms` counts as saturated: timers or the arrival schedule late by more than 25 ms, or
    /// nearly every core in use.
    pub(crate) fn saturated(cpu: f64, lag_ms: f64) -> bool {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        lag_ms > 25.0 || cpu > 0.9 * cores
    }

    /// Counts one interval.
    pub(crate) fn record(&mut self, cpu: f64, lag_ms: f64, saturated: bool) {
        self.max_cpu = self.max_cpu.max(cpu);
        self.max_lag_ms = self.max_lag_ms.max(lag_ms);
        self.intervals += 1;
        if saturated {
            self.saturated_intervals += 1;
        }
    }

    /// Samples this process; the CPU it used (cores) since the previous sample, if there was one.
    pub(crate) fn sample_self(&mut self) -> Option<f64> {
        let sample = procstat::sample(std::process::id())?;
        let cpu = self
            .last
            .map(|prev| procstat::cores_between(&prev, &sample));
        self.last = Some(sample);
        cpu
    }
}

impl Collected {
    /// An empty record that samples `server_processes` and this process.
    pub(crate) fn new(server_processes: &[(String, u32)]) -> Collected {
        let mut generator = GeneratorTrack::default();
        let _ = generator.sample_self();
        Collected {
            services: server_processes
                .iter()
                .map(|(name, pid)| ServiceTrack {
                    name: name.clone(),
                    pid: *pid,
                    first: procstat::sample(*pid),
                    last: procstat::sample(*pid),
                    points: Vec::new(),
                })
                .collect(),
            generator,
            ..Collected::default()
        }
    }

    /// Samples the server processes for the interval ending at `t` seconds.
    pub(crate) fn sample_services(&mut self, t: f64) {
        for s in &mut self.services {
            if let Some(sample) = procstat::sample(s.pid) {
                if let Some(prev) = s.last {
                    let dt = sample.at.duration_since(prev.at).as_secs_f64().max(1e-3);
                    s.points.push(ServicePoint {
                        t,
                        cpu_cores: procstat::cores_between(&prev, &sample),
                        rss_bytes: sample.rss_bytes,
                        net_rx_bytes_per_s: sample.read_bytes.saturating_sub(prev.read_bytes)
                            as f64
                            / dt,
                        net_tx_bytes_per_s: sample.written_bytes.saturating_sub(prev.written_bytes)
                            as f64
                            / dt,
                    });
                }
                s.last = Some(sample);
            }
        }
    }
}

/// What a run's one-time set-up created, for the workload of every worker of the run.
#[derive(Debug, Clone)]
pub enum Prepared {
    /// Nothing to set up (the `http` scenario).
    Nothing,
    /// Users, follow graph and posts of the feed scenarios.
    Feed(Arc<feed::FeedData>),
    /// Users and channels of the chat scenario.
    Chat(Arc<chat::ChatData>),
}

/// Runs the set-up `spec`'s scenario needs, once per run; `tell` hears each phase.
pub async fn prepare(
    spec: &LoadTestSpec,
    run_id: &str,
    client: &Client,
    tell: &(dyn Fn(&str) + Sync),
) -> Result<Prepared, RunError> {
    // Set-up data is named after the run, so runs against one target do not collide.
    let tag = crate::scenario::run_tag(run_id);
    match spec.scenario.name {
        ScenarioName::FeedRead | ScenarioName::FeedWrite | ScenarioName::FeedMixed => {
            let base = spec
                .target_urls("feed")
                .into_iter()
                .next()
                .unwrap_or_default();
            let data = feed::setup(&base, &spec.scenario.params, client, &tag, tell).await?;
            tracing::info!(
                users = data.users.len(),
                follows = data.follows,
                posts = data.posts,
                "feed set-up done"
            );
            Ok(Prepared::Feed(Arc::new(data)))
        }
        ScenarioName::Http => Ok(Prepared::Nothing),
        ScenarioName::Chat => {
            let feed_base = spec
                .target_urls("feed")
                .into_iter()
                .next()
                .unwrap_or_default();
            // Channels are created through the first replica; they live in the shared database.
            let chat_base = spec
                .target_urls("chat")
                .into_iter()
                .next()
                .unwrap_or_default();
            let data = chat::setup(
                &feed_base,
                &chat_base,
                &spec.scenario.params,
                client,
                &tag,
                tell,
            )
            .await?;
            Ok(Prepared::Chat(Arc::new(data)))
        }
    }
}

/// Something that runs a built workload: the local collector, or a distributed worker's
/// reporter. Each scenario's workload is its own type, so it is handed over generically.
pub(crate) trait Drive {
    /// What driving produces.
    type Output;
    /// Runs the executor over `workload`.
    fn drive<I: Iteration>(self, workload: Arc<I>) -> impl Future<Output = Self::Output> + Send;
}

/// Builds `spec`'s workload over what set-up `prepared` — this `shard`'s part of it — and hands
/// it to `driver`. `schedule_start` is when the executor will start (chat sessions end with the
/// schedule).
pub(crate) async fn with_workload<D: Drive>(
    spec: &LoadTestSpec,
    prepared: &Prepared,
    client: Client,
    registry: &Registry,
    shard: &Shard,
    schedule_start: tokio::time::Instant,
    driver: D,
) -> Result<D::Output, RunError> {
    let mismatch = || {
        RunError::Unsupported(format!(
            "set-up data does not fit scenario {}",
            spec.scenario.name.as_str()
        ))
    };
    match spec.scenario.name {
        ScenarioName::FeedRead | ScenarioName::FeedWrite | ScenarioName::FeedMixed => {
            let Prepared::Feed(data) = prepared else {
                return Err(mismatch());
            };
            let base = spec
                .target_urls("feed")
                .into_iter()
                .next()
                .unwrap_or_default();
            let workload = feed::FeedWorkload::new(
                spec.scenario.name,
                &base,
                &spec.scenario.params,
                data.clone(),
                shard.actors(data.users.len()),
                client,
                registry,
            );
            Ok(driver.drive(ShardVus::new(workload, shard)).await)
        }
        ScenarioName::Http => {
            let Some(http) = &spec.scenario.http else {
                return Err(RunError::Unsupported(
                    "scenario.http: missing requests".into(),
                ));
            };
            let workload = http_scenario::HttpWorkload::new(http, client, registry)?;
            Ok(driver.drive(ShardVus::new(workload, shard)).await)
        }
        ScenarioName::Chat => {
            let Prepared::Chat(data) = prepared else {
                return Err(mismatch());
            };
            let gateways = spec.target_urls("chat");
            // Sessions end with the schedule at the latest.
            let run_end = schedule_start + spec.executor.duration();
            let workload =
                chat::ChatWorkload::new(&gateways, &spec.scenario.params, data.clone(), run_end);
            Ok(driver.drive(ShardVus::new(workload, shard)).await)
        }
    }
}

/// The HTTP client a run's VUs (and its set-up) use.
pub(crate) fn client_for(spec: &LoadTestSpec, insecure_skip_verify: bool) -> Client {
    Client::new(ClientConfig {
        timeout: spec.scenario.params.timeout,
        insecure_skip_verify,
        ..ClientConfig::default()
    })
}

/// Runs `spec` until its schedule ends or `stop` fires; writes the report into `opts.out_dir`.
pub async fn run(
    spec: &LoadTestSpec,
    opts: &RunOptions,
    stop: Shutdown,
) -> Result<RunOutcome, RunError> {
    let registry = Registry::new();
    let client = client_for(spec, opts.insecure_skip_verify);
    let started_at = chrono::Utc::now();
    let progress = progress_bar(opts.progress);
    let tell = |m: &str| progress.set_message(format!("set-up: {m}"));
    let prepared = prepare(spec, &opts.run_id, &client, &tell).await?;
    let local = Local {
        spec,
        opts,
        registry: registry.clone(),
        progress,
        started_at,
        stop,
    };
    with_workload(
        spec,
        &prepared,
        client,
        &registry,
        &Shard::whole(),
        tokio::time::Instant::now(),
        local,
    )
    .await?
}

/// The single-process path: this process runs the whole schedule and collects it itself.
struct Local<'a> {
    spec: &'a LoadTestSpec,
    opts: &'a RunOptions,
    registry: Arc<Registry>,
    progress: ProgressBar,
    started_at: chrono::DateTime<chrono::Utc>,
    stop: Shutdown,
}

impl Drive for Local<'_> {
    type Output = Result<RunOutcome, RunError>;

    fn drive<I: Iteration>(self, workload: Arc<I>) -> impl Future<Output = Self::Output> + Send {
        drive(
            self.spec,
            self.opts,
            workload,
            self.registry,
            self.progress,
            self.started_at,
            self.stop,
        )
    }
}

/// The live progress line (hidden when disabled).
pub(crate) fn progress_bar(enabled: bool) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(1_000);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:24}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

async fn drive<I: Iteration>(
    spec: &LoadTestSpec,
    opts: &RunOptions,
    workload: Arc<I>,
    registry: Arc<Registry>,
    progress: ProgressBar,
    started_at: chrono::DateTime<chrono::Utc>,
    stop: Shutdown,
) -> Result<RunOutcome, RunError> {
    let pacing = Arc::new(Pacing::default());
    let collected = Arc::new(Mutex::new(Collected::new(&opts.server_processes)));
    let load_started = Instant::now();
    let planned = spec.executor.duration();
    let collector_stop = Shutdown::new();
    let prober = tokio::spawn(executor::probe_timer_lag(
        pacing.clone(),
        collector_stop.clone(),
    ));
    let collector = tokio::spawn(collect(
        registry.clone(),
        pacing.clone(),
        collected.clone(),
        load_started,
        planned,
        progress.clone(),
        collector_stop.clone(),
    ));
    let tracing = crate::tracing_client::for_run(spec);
    let execution =
        executor::execute(&spec.executor, workload, registry.clone(), pacing, stop).await;
    collector_stop.trigger();
    let _ = collector.await;
    let _ = prober.await;
    progress.finish_and_clear();
    let ended_at = chrono::Utc::now();
    let collected = std::mem::take(&mut *lock(&collected));
    let mut summary = summarize(
        spec,
        opts,
        &registry.endpoint_names(),
        metrics::gauge(&registry.vus_max),
        collected,
        started_at,
        ended_at,
        &execution,
    );
    if let Some(tracing) = tracing {
        summary.traces = tracing.complete(&registry.endpoint_names()).await;
        crate::jaeger::enrich_run(&mut summary, spec).await;
    }
    finish(summary, opts)
}

/// Writes the report of a summarized run; the outcome with its exit code.
pub(crate) fn finish(summary: Summary, opts: &RunOptions) -> Result<RunOutcome, RunError> {
    write_report(&summary, opts)?;
    let exit_code = if summary.run.verdict == Verdict::Pass {
        0
    } else {
        EXIT_THRESHOLDS_FAILED
    };
    Ok(RunOutcome { summary, exit_code })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One interval's point of the time series: `interval` measured over `secs` seconds, ending `t`
/// seconds into the run, with at most `vus` VUs active.
pub(crate) fn interval_point(interval: &Buffer, t: f64, secs: f64, vus: u64) -> Point {
    let secs = secs.max(1e-3);
    let all = interval.duration_all();
    Point {
        t,
        rps: interval.requests() as f64 / secs,
        errors_per_s: interval.failures() as f64 / secs,
        p50_ms: quantile_ms(&all, 0.50),
        p95_ms: quantile_ms(&all, 0.95),
        p99_ms: quantile_ms(&all, 0.99),
        vus,
        dropped: interval.dropped,
        sent_bytes_per_s: interval.data_sent as f64 / secs,
        received_bytes_per_s: interval.data_received as f64 / secs,
    }
}

/// The generator's worst scheduling lag (arrival schedule or probe timer) since the last call, ms.
pub(crate) fn take_lag_ms(pacing: &Pacing) -> f64 {
    use std::sync::atomic::Ordering::Relaxed;
    let dispatch = pacing.max_dispatch_lag_us.swap(0, Relaxed);
    let timer = pacing.max_timer_lag_us.swap(0, Relaxed);
    dispatch.max(timer) as f64 / 1_000.0
}

/// Updates the progress line with the latest point.
pub(crate) fn show_progress(
    progress: &ProgressBar,
    elapsed: Duration,
    planned: Duration,
    point: &Point,
    note: &str,
) {
    if !planned.is_zero() {
        progress.set_position(
            ((elapsed.as_secs_f64() / planned.as_secs_f64()).min(1.0) * 1_000.0) as u64,
        );
    }
    progress.set_message(format!(
        "{:>5.1}s/{}  {:>8.1} req/s  {:>5.2}% errors  p95 {:>7.2} ms  VUs {}{note}",
        elapsed.as_secs_f64(),
        crate::spec::format_duration(planned),
        point.rps,
        if point.rps > 0.0 {
            point.errors_per_s / point.rps * 100.0
        } else {
            0.0
        },
        point.p95_ms,
        point.vus
    ));
}

/// Once a second: drain the samples into a point and the totals, sample the servers and the
/// generator, update the progress line. A final drain happens when stopped.
async fn collect(
    registry: Arc<Registry>,
    pacing: Arc<Pacing>,
    collected: Arc<Mutex<Collected>>,
    started: Instant,
    planned: Duration,
    progress: ProgressBar,
    stop: Shutdown,
) {
    let mut interval = Buffer::default();
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Instant::now();
    loop {
        let done = tokio::select! {
            _ = tick.tick() => false,
            () = stop.wait() => true,
        };
        let now = Instant::now();
        let secs = now.duration_since(last).as_secs_f64();
        last = now;
        interval.reset();
        registry.drain_into(&mut interval);
        let t = now.duration_since(started).as_secs_f64();
        let point = interval_point(&interval, t, secs, registry.take_vus_peak());
        let lag_ms = take_lag_ms(&pacing);
        {
            let mut c = lock(&collected);
            c.totals.add(&interval);
            c.sample_services(point.t);
            let g = &mut c.generator;
            if let Some(cpu) = g.sample_self() {
                g.record(cpu, lag_ms, GeneratorTrack::saturated(cpu, lag_ms));
            }
            c.points.push(point.clone());
        }
        show_progress(&progress, now.duration_since(started), planned, &point, "");
        if done {
            break;
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn summarize(
    spec: &LoadTestSpec,
    opts: &RunOptions,
    names: &[String],
    vus_max: u64,
    collected: Collected,
    started_at: chrono::DateTime<chrono::Utc>,
    ended_at: chrono::DateTime<chrono::Utc>,
    execution: &executor::Execution,
) -> Summary {
    let totals = &collected.totals;
    let seconds = execution.duration.as_secs_f64().max(1e-3);
    let scenario = spec.scenario.name.as_str();
    let mut metrics = BTreeMap::new();
    let trend = |h: &hdrhistogram::Histogram<u64>| Metric {
        kind: MetricType::Trend,
        contains: "time".into(),
        values: trend_values(h),
    };
    let counter = |n: u64, contains: &str| Metric {
        kind: MetricType::Counter,
        contains: contains.into(),
        values: BTreeMap::from([
            ("count".into(), n as f64),
            ("rate".into(), n as f64 / seconds),
        ]),
    };
    let rate = |passes: u64, fails: u64| Metric {
        kind: MetricType::Rate,
        contains: "default".into(),
        values: BTreeMap::from([
            (
                "rate".into(),
                if passes + fails == 0 {
                    0.0
                } else {
                    passes as f64 / (passes + fails) as f64
                },
            ),
            ("passes".into(), passes as f64),
            ("fails".into(), fails as f64),
        ]),
    };
    let requests = totals.requests();
    let failures = totals.failures();
    metrics.insert("http_reqs".into(), counter(requests, "default"));
    // k6's http_req_failed: "passes" are failed requests (the rate is the failure rate).
    metrics.insert(
        "http_req_failed".into(),
        rate(failures, requests - failures),
    );
    metrics.insert("http_req_duration".into(), trend(&totals.duration_all()));
    let mut service = metrics::new_histogram();
    for s in totals.http.values() {
        let _ = service.add(&s.service);
    }
    metrics.insert("http_req_service_duration".into(), trend(&service));
    for (name, h) in PHASES.iter().zip(&totals.phases) {
        metrics.insert((*name).into(), trend(h));
    }
    metrics.insert("iterations".into(), counter(totals.iterations, "default"));
    metrics.insert(
        "iteration_duration".into(),
        trend(&totals.iteration_duration),
    );
    metrics.insert(
        "dropped_iterations".into(),
        counter(totals.dropped, "default"),
    );
    metrics.insert(
        "checks".into(),
        rate(totals.checks_passed, totals.checks_failed),
    );
    metrics.insert("data_sent".into(), counter(totals.data_sent, "data"));
    metrics.insert(
        "data_received".into(),
        counter(totals.data_received, "data"),
    );
    if totals.ws_sessions > 0 {
        metrics.insert("ws_sessions".into(), counter(totals.ws_sessions, "default"));
        metrics.insert(
            "ws_session_failures".into(),
            counter(totals.ws_session_failures, "default"),
        );
        metrics.insert("ws_connecting".into(), trend(&totals.ws_connecting));
        metrics.insert(
            "ws_msgs_sent".into(),
            counter(totals.ws_msgs_sent, "default"),
        );
        metrics.insert(
            "ws_msgs_received".into(),
            counter(totals.ws_msgs_received, "default"),
        );
        metrics.insert(
            "ws_delivery_latency".into(),
            trend(&totals.ws_delivery_latency),
        );
    }
    let vus_max = vus_max as f64;
    let peak_vus = collected.points.iter().map(|p| p.vus).max().unwrap_or(0) as f64;
    metrics.insert(
        "vus".into(),
        Metric {
            kind: MetricType::Gauge,
            contains: "default".into(),
            values: BTreeMap::from([
                ("value".into(), 0.0),
                ("min".into(), 0.0),
                ("max".into(), peak_vus),
            ]),
        },
    );
    metrics.insert(
        "vus_max".into(),
        Metric {
            kind: MetricType::Gauge,
            contains: "default".into(),
            values: BTreeMap::from([
                ("value".into(), vus_max),
                ("min".into(), vus_max),
                ("max".into(), vus_max),
            ]),
        },
    );

    // Thresholds, evaluated on the exact totals; tagged ones also appear as sub-metrics.
    let mut thresholds = Vec::new();
    for (key, exprs) in &spec.thresholds {
        for expr in exprs {
            let Ok(t) = Threshold::parse(key, expr) else {
                continue;
            };
            let actual = aggregate(&t, totals, names, scenario, seconds, &metrics);
            if !t.filter.is_empty()
                && let Some(sub) = sub_metric(&t, totals, names, scenario, seconds)
            {
                metrics.insert(t.key(), sub);
            }
            thresholds.push(ThresholdResult {
                metric: t.key(),
                expr: t.expr.clone(),
                ok: actual.is_some_and(|a| t.holds(a)),
                actual,
            });
        }
    }

    /// One endpoint's series summed over statuses.
    struct PerEndpoint {
        count: u64,
        failed: u64,
        duration: hdrhistogram::Histogram<u64>,
        statuses: BTreeMap<String, u64>,
    }
    let mut per_endpoint: BTreeMap<u16, PerEndpoint> = BTreeMap::new();
    for ((endpoint, status), s) in &totals.http {
        let e = per_endpoint
            .entry(endpoint.0)
            .or_insert_with(|| PerEndpoint {
                count: 0,
                failed: 0,
                duration: metrics::new_histogram(),
                statuses: BTreeMap::new(),
            });
        e.count += s.count;
        e.failed += s.failed;
        let _ = e.duration.add(&s.duration);
        *e.statuses
            .entry(metrics::status_label(*status))
            .or_default() += s.count;
    }
    let endpoints = per_endpoint
        .into_iter()
        .map(|(id, e)| EndpointStats {
            scenario: scenario.into(),
            endpoint: names
                .get(id as usize)
                .cloned()
                .unwrap_or_else(|| format!("endpoint {id}")),
            requests: e.count,
            failed: e.failed,
            rps: e.count as f64 / seconds,
            avg_ms: mean_ms(&e.duration),
            p50_ms: quantile_ms(&e.duration, 0.50),
            p95_ms: quantile_ms(&e.duration, 0.95),
            p99_ms: quantile_ms(&e.duration, 0.99),
            max_ms: quantile_ms(&e.duration, 1.0),
            statuses: e.statuses,
        })
        .collect();

    let services = collected
        .services
        .into_iter()
        .map(|s| {
            let n = s.points.len().max(1) as f64;
            let (rx, tx) = match (s.first, s.last) {
                (Some(a), Some(b)) => (
                    b.read_bytes.saturating_sub(a.read_bytes),
                    b.written_bytes.saturating_sub(a.written_bytes),
                ),
                _ => (0, 0),
            };
            ServiceStats {
                avg_cpu_cores: s.points.iter().map(|p| p.cpu_cores).sum::<f64>() / n,
                max_cpu_cores: s.points.iter().map(|p| p.cpu_cores).fold(0.0, f64::max),
                max_rss_bytes: s.points.iter().map(|p| p.rss_bytes).max().unwrap_or(0),
                net_rx_bytes: rx,
                net_tx_bytes: tx,
                name: s.name,
                points: s.points,
            }
        })
        .collect();

    let g = collected.generator;
    let saturated = g.saturated_intervals >= 2 && g.saturated_intervals * 10 >= g.intervals.max(1);
    let generator = GeneratorHealth {
        saturated,
        max_cpu_cores: g.max_cpu,
        max_scheduling_lag_ms: g.max_lag_ms,
        note: saturated.then(|| {
            format!(
                "the load generator was saturated in {} of {} seconds (CPU up to {:.2} cores, scheduling late by up to {:.0} ms): figures partly describe the generator, not the system",
                g.saturated_intervals, g.intervals, g.max_cpu, g.max_lag_ms
            )
        }),
    };
    let failed: Vec<String> = thresholds
        .iter()
        .filter(|t| !t.ok)
        .map(|t| format!("{} {}", t.metric, t.expr))
        .collect();
    let verdict = if failed.is_empty() {
        Verdict::Pass
    } else {
        Verdict::Fail
    };
    let mut reason =
        (!failed.is_empty()).then(|| format!("thresholds failed: {}", failed.join("; ")));
    if execution.stopped_early {
        let note = "stopped before the end of its schedule".to_owned();
        reason = Some(reason.map_or(note.clone(), |r| format!("{r}; {note}")));
    }
    Summary {
        schema: crate::summary::SCHEMA.into(),
        run: RunInfo {
            id: opts.run_id.clone(),
            scenario: scenario.into(),
            executor: spec.executor.type_name().into(),
            target: spec.target.clone(),
            started_at: started_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            ended_at: ended_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            duration_s: seconds,
            workers: spec.workers,
            interrupted_iterations: execution.interrupted,
            generator,
            verdict,
            reason,
            version: env!("CARGO_PKG_VERSION").into(),
            degraded: false,
            distributed: None,
        },
        metrics,
        thresholds,
        endpoints,
        timeseries: Timeseries {
            interval_s: 1.0,
            points: collected.points,
        },
        server: ServerStats {
            source: "proc".into(),
            services,
            spans: Vec::new(),
        },
        traces: Vec::new(),
    }
}

fn trend_values(h: &hdrhistogram::Histogram<u64>) -> BTreeMap<String, f64> {
    let empty = h.is_empty();
    let q = |x: f64| if empty { 0.0 } else { quantile_ms(h, x) };
    BTreeMap::from([
        ("avg".into(), mean_ms(h)),
        (
            "min".into(),
            if empty { 0.0 } else { h.min() as f64 / 1_000.0 },
        ),
        ("med".into(), q(0.5)),
        (
            "max".into(),
            if empty { 0.0 } else { h.max() as f64 / 1_000.0 },
        ),
        ("p(90)".into(), q(0.90)),
        ("p(95)".into(), q(0.95)),
        ("p(99)".into(), q(0.99)),
        ("count".into(), h.len() as f64),
    ])
}

/// Whether a (endpoint, status) series matches a threshold's tag filter.
fn matches(filter: &[(String, String)], endpoint: &str, status: u16, scenario: &str) -> bool {
    filter.iter().all(|(k, v)| match k.as_str() {
        "endpoint" | "name" => {
            endpoint == v || endpoint.split_once(' ').is_some_and(|(_, path)| path == v)
        }
        "method" => endpoint.split_once(' ').is_some_and(|(m, _)| m == v),
        "status" => status.to_string() == *v || (v == "0" && status < 100),
        "error" => status < 100 && metrics::status_label(status) == *v,
        "scenario" => scenario == v,
        _ => false,
    })
}

/// A tagged view of the HTTP metrics (`None` for metrics without tags).
fn filtered(
    t: &Threshold,
    totals: &Buffer,
    names: &[String],
    scenario: &str,
) -> Option<(
    u64,
    u64,
    hdrhistogram::Histogram<u64>,
    hdrhistogram::Histogram<u64>,
)> {
    let mut count = 0;
    let mut failed = 0;
    let mut duration = metrics::new_histogram();
    let mut service = metrics::new_histogram();
    for ((endpoint, status), s) in &totals.http {
        let name = names.get(endpoint.0 as usize).map_or("", String::as_str);
        if matches(&t.filter, name, *status, scenario) {
            count += s.count;
            failed += s.failed;
            let _ = duration.add(&s.duration);
            let _ = service.add(&s.service);
        }
    }
    Some((count, failed, duration, service))
}

fn sub_metric(
    t: &Threshold,
    totals: &Buffer,
    names: &[String],
    scenario: &str,
    seconds: f64,
) -> Option<Metric> {
    let (count, failed, duration, service) = filtered(t, totals, names, scenario)?;
    Some(match t.metric.as_str() {
        "http_req_duration" => Metric {
            kind: MetricType::Trend,
            contains: "time".into(),
            values: trend_values(&duration),
        },
        "http_req_service_duration" => Metric {
            kind: MetricType::Trend,
            contains: "time".into(),
            values: trend_values(&service),
        },
        "http_reqs" => Metric {
            kind: MetricType::Counter,
            contains: "default".into(),
            values: BTreeMap::from([
                ("count".into(), count as f64),
                ("rate".into(), count as f64 / seconds),
            ]),
        },
        "http_req_failed" => Metric {
            kind: MetricType::Rate,
            contains: "default".into(),
            values: BTreeMap::from([
                (
                    "rate".into(),
                    if count == 0 {
                        0.0
                    } else {
                        failed as f64 / count as f64
                    },
                ),
                ("passes".into(), failed as f64),
                ("fails".into(), (count - failed) as f64),
            ]),
        },
        _ => return None,
    })
}

/// The number a threshold compares, from the exact run totals; `None` without samples.
fn aggregate(
    t: &Threshold,
    totals: &Buffer,
    names: &[String],
    scenario: &str,
    seconds: f64,
    metrics: &BTreeMap<String, Metric>,
) -> Option<f64> {
    let tagged = matches!(
        t.metric.as_str(),
        "http_req_duration" | "http_req_service_duration" | "http_reqs" | "http_req_failed"
    );
    if tagged && !t.filter.is_empty() {
        let metric = sub_metric(t, totals, names, scenario, seconds)?;
        let (count, ..) = filtered(t, totals, names, scenario)?;
        if count == 0 {
            return None;
        }
        return from_metric(&metric, t.aggregation, totals, names, scenario, t);
    }
    if !t.filter.is_empty()
        && !t
            .filter
            .iter()
            .all(|(k, v)| k == "scenario" && v == scenario)
    {
        return None;
    }
    let metric = metrics.get(&t.metric)?;
    from_metric(metric, t.aggregation, totals, names, scenario, t)
}

fn from_metric(
    metric: &Metric,
    aggregation: Aggregation,
    totals: &Buffer,
    names: &[String],
    scenario: &str,
    t: &Threshold,
) -> Option<f64> {
    let v = |k: &str| metric.values.get(k).copied();
    match (metric.kind, aggregation) {
        (MetricType::Trend, Aggregation::Percentile(p)) => {
            // Any percentile, exactly, from the histogram rather than the fixed summary set.
            let h = match t.metric.as_str() {
                "http_req_duration" | "http_req_service_duration" => {
                    let (_, _, d, s) = filtered(t, totals, names, scenario)?;
                    if t.metric == "http_req_duration" {
                        d
                    } else {
                        s
                    }
                }
                "iteration_duration" => totals.iteration_duration.clone(),
                "ws_delivery_latency" => totals.ws_delivery_latency.clone(),
                "ws_connecting" => totals.ws_connecting.clone(),
                other => PHASES
                    .iter()
                    .position(|p| *p == other)
                    .map(|i| totals.phases[i].clone())?,
            };
            if h.is_empty() {
                None
            } else {
                Some(quantile_ms(&h, p / 100.0))
            }
        }
        (MetricType::Trend, Aggregation::Avg) => v("avg"),
        (MetricType::Trend, Aggregation::Min) => v("min"),
        (MetricType::Trend, Aggregation::Max) => v("max"),
        (MetricType::Trend, Aggregation::Med) => v("med"),
        (MetricType::Trend, Aggregation::Count) => v("count"),
        (MetricType::Counter, Aggregation::Count) => v("count"),
        (MetricType::Counter, Aggregation::Rate) => v("rate"),
        (MetricType::Rate, Aggregation::Rate) => v("rate"),
        (MetricType::Gauge, Aggregation::Value) => v("value"),
        (MetricType::Gauge, Aggregation::Min) => v("min"),
        (MetricType::Gauge, Aggregation::Max) => v("max"),
        _ => None,
    }
}

pub(crate) fn write_report(summary: &Summary, opts: &RunOptions) -> Result<(), RunError> {
    let io = |path: PathBuf| {
        move |source| RunError::Report {
            path: path.clone(),
            source,
        }
    };
    std::fs::create_dir_all(&opts.out_dir).map_err(io(opts.out_dir.clone()))?;
    let json_path = opts.out_dir.join("summary.json");
    let json = serde_json::to_vec_pretty(summary).map_err(|e| RunError::Report {
        path: json_path.clone(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(&json_path, json).map_err(io(json_path.clone()))?;
    let html_path = opts.out_dir.join("index.html");
    std::fs::write(&html_path, crate::report::html::render(summary))
        .map_err(io(html_path.clone()))?;
    Ok(())
}
