//! `loadlab run` flags and how they become a [`LoadTestSpec`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::spec::{
    ConstantArrivalRate, ConstantVus, ExecutorSpec, HttpRequestSpec, HttpScenario, LoadTestSpec,
    OnWorkerLoss, PerVuIterations, RampingArrivalRate, RampingVus, ScenarioName, ScenarioParams,
    ScenarioSpec, SharedIterations, SpecError, Stage, parse_duration,
};
use crate::threshold::Threshold;

/// Executor types on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExecutorKind {
    /// `constant-vus`.
    ConstantVus,
    /// `ramping-vus`.
    RampingVus,
    /// `constant-arrival-rate`.
    ConstantArrivalRate,
    /// `ramping-arrival-rate`.
    RampingArrivalRate,
    /// `per-vu-iterations`.
    PerVuIterations,
    /// `shared-iterations`.
    SharedIterations,
}

/// Flags of `loadlab run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// A load test: a LoadTest manifest or its spec (YAML or JSON). Flags override it.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Scenario (required without -f).
    #[arg(long, value_enum)]
    pub scenario: Option<ScenarioName>,
    /// URL for the `http` scenario (one GET request).
    #[arg(long)]
    pub url: Option<String>,
    /// Targets by role, e.g. `--target feed=http://127.0.0.1:8080` (repeatable or comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub target: Vec<String>,
    /// Executor (default: constant-arrival-rate with --rate, ramping-vus with --stages, else constant-vus).
    #[arg(long, value_enum)]
    pub executor: Option<ExecutorKind>,
    /// VUs (constant-vus, iteration executors; start VUs of ramping-vus).
    #[arg(long)]
    pub vus: Option<u32>,
    /// Iterations per second (arrival-rate executors; start rate of ramping-arrival-rate).
    #[arg(long)]
    pub rate: Option<u32>,
    /// Duration, e.g. 30s or 1m30s.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Stages `DURATION:TARGET,…`, e.g. `30s:100,1m:500,30s:0`.
    #[arg(long, value_parser = parse_stages)]
    pub stages: Option<Stages>,
    /// Iterations (per VU for per-vu-iterations, in total for shared-iterations).
    #[arg(long)]
    pub iterations: Option<u32>,
    /// VUs allocated up front (arrival-rate executors).
    #[arg(long = "pre-allocated-vus")]
    pub pre_allocated_vus: Option<u32>,
    /// Most VUs (arrival-rate executors).
    #[arg(long = "max-vus")]
    pub max_vus: Option<u32>,
    /// Arrival-rate executors: how long an iteration may wait for a busy VU before it is
    /// dropped (default 0: dropped at once, as in k6).
    #[arg(long = "max-lateness", value_parser = parse_duration)]
    pub max_lateness: Option<Duration>,
    /// Thresholds `METRIC[{tag:value}]:EXPR`, e.g. `http_req_duration:p(95)<200` (repeatable).
    #[arg(long = "threshold")]
    pub thresholds: Vec<String>,
    /// Feed scenarios: users created by set-up.
    #[arg(long)]
    pub users: Option<u32>,
    /// Per-request timeout.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Load worker processes on this machine, over the coordinator protocol that pods use
    /// (default: the spec's `workers`; one worker without the flag runs in this process).
    #[arg(long)]
    pub workers: Option<u32>,
    /// What to do when a worker is lost mid-run: fail (default) or continue (degraded).
    #[arg(long = "on-worker-loss", value_parser = parse_on_worker_loss)]
    pub on_worker_loss: Option<OnWorkerLoss>,
    /// Report directory.
    #[arg(long, default_value = "loadlab-report")]
    pub out: PathBuf,
    /// Local processes of the system under test to sample, `NAME=PID` (repeatable).
    #[arg(long = "server-pid")]
    pub server_pids: Vec<String>,
    /// Accept any TLS certificate.
    #[arg(long)]
    pub insecure: bool,
    /// No live progress line.
    #[arg(long)]
    pub quiet: bool,
}

fn parse_on_worker_loss(s: &str) -> Result<OnWorkerLoss, String> {
    match s {
        "fail" => Ok(OnWorkerLoss::Fail),
        "continue" => Ok(OnWorkerLoss::Continue),
        other => Err(format!("`{other}`: expected fail or continue")),
    }
}

/// Parsed `--stages`.
#[derive(Debug, Clone, PartialEq)]
pub struct Stages(pub Vec<Stage>);

/// Parses `30s:100,1m:500`.
pub fn parse_stages(s: &str) -> Result<Stages, String> {
    let mut stages = Vec::new();
    for (i, part) in s.split(',').enumerate() {
        let (d, t) = part.split_once(':').ok_or_else(|| {
            format!(
                "stage {} `{part}`: expected DURATION:TARGET, as in 30s:100",
                i + 1
            )
        })?;
        let duration = parse_duration(d).map_err(|e| format!("stage {} duration: {e}", i + 1))?;
        let target = t
            .trim()
            .parse::<u32>()
            .map_err(|_| format!("stage {} target `{t}` is not a whole number", i + 1))?;
        stages.push(Stage { duration, target });
    }
    Ok(Stages(stages))
}

impl RunArgs {
    /// The spec these flags describe (over `-f` when given). Errors name the flag or field.
    pub fn spec(&self) -> Result<LoadTestSpec, SpecError> {
        let err = |path: &str, message: String| SpecError {
            path: path.to_owned(),
            message,
        };
        let mut spec = match &self.file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| err(&path.display().to_string(), e.to_string()))?;
                LoadTestSpec::from_yaml(&text).map_err(|e| SpecError {
                    path: format!("{}: {}", path.display(), e.path),
                    message: e.message,
                })?
            }
            None => {
                let name = self.scenario.ok_or_else(|| {
                    err(
                        "--scenario",
                        "required without -f (feed-read, feed-write, feed-mixed, chat, http)"
                            .into(),
                    )
                })?;
                LoadTestSpec {
                    target: BTreeMap::new(),
                    scenario: ScenarioSpec {
                        name,
                        params: ScenarioParams::default(),
                        http: None,
                    },
                    executor: ExecutorSpec::ConstantVus(ConstantVus {
                        vus: 10,
                        duration: Duration::from_secs(30),
                        graceful_stop: Duration::from_secs(30),
                    }),
                    workers: 1,
                    thresholds: BTreeMap::new(),
                    on_worker_loss: OnWorkerLoss::Fail,
                    tracing: None,
                    worker_template: None,
                    coordinator_template: None,
                    start_timeout_seconds: None,
                    ttl_seconds_after_finished: None,
                    abort: false,
                }
            }
        };
        for t in &self.target {
            let (role, url) = t.split_once('=').ok_or_else(|| {
                err(
                    "--target",
                    format!("`{t}`: expected ROLE=URL, as in feed=http://127.0.0.1:8080"),
                )
            })?;
            spec.target
                .insert(role.trim().to_owned(), url.trim().to_owned());
        }
        if let Some(url) = &self.url {
            let uri: http::Uri = url
                .parse()
                .map_err(|e| err("--url", format!("{url:?}: {e}")))?;
            spec.scenario.http = Some(HttpScenario {
                requests: vec![HttpRequestSpec {
                    name: uri.path().to_owned(),
                    method: "GET".into(),
                    url: url.clone(),
                    headers: BTreeMap::new(),
                    body: None,
                    weight: 1,
                    checks: Default::default(),
                }],
            });
        }
        if let Some(users) = self.users {
            spec.scenario.params.users = users;
        }
        if let Some(t) = self.timeout {
            spec.scenario.params.timeout = t;
        }
        if self.file.is_none()
            || self.executor.is_some()
            || self.vus.is_some()
            || self.rate.is_some()
            || self.duration.is_some()
            || self.stages.is_some()
            || self.iterations.is_some()
            || self.max_lateness.is_some()
        {
            spec.executor = self.executor(&spec.executor)?;
        }
        if let Some(n) = self.workers {
            spec.workers = n;
        }
        if let Some(policy) = self.on_worker_loss {
            spec.on_worker_loss = policy;
        }
        for arg in &self.thresholds {
            let t = Threshold::parse_cli(arg).map_err(|e| err("--threshold", e.to_string()))?;
            spec.thresholds.entry(t.key()).or_default().push(t.expr);
        }
        spec.validate()?;
        Ok(spec)
    }

    fn executor(&self, base: &ExecutorSpec) -> Result<ExecutorSpec, SpecError> {
        let kind = self
            .executor
            .unwrap_or(match (self.rate, &self.stages, base) {
                (Some(_), Some(_), _) => ExecutorKind::RampingArrivalRate,
                (Some(_), None, _) => ExecutorKind::ConstantArrivalRate,
                (None, Some(_), _) => ExecutorKind::RampingVus,
                (None, None, ExecutorSpec::ConstantArrivalRate(_)) => {
                    ExecutorKind::ConstantArrivalRate
                }
                (None, None, ExecutorSpec::RampingArrivalRate(_)) => {
                    ExecutorKind::RampingArrivalRate
                }
                (None, None, ExecutorSpec::RampingVus(_)) => ExecutorKind::RampingVus,
                (None, None, ExecutorSpec::PerVuIterations(_)) => ExecutorKind::PerVuIterations,
                (None, None, ExecutorSpec::SharedIterations(_)) => ExecutorKind::SharedIterations,
                _ => ExecutorKind::ConstantVus,
            });
        let duration = self
            .duration
            .unwrap_or_else(|| base.duration())
            .max(Duration::from_millis(1));
        let graceful_stop = base.graceful_stop();
        let stages = || {
            self.stages.clone().map(|s| s.0).ok_or_else(|| SpecError {
                path: "--stages".into(),
                message: format!("{kind:?} needs --stages (e.g. 30s:100,1m:500)"),
            })
        };
        let rate = self.rate.unwrap_or(10);
        let pre = self
            .pre_allocated_vus
            .unwrap_or_else(|| self.vus.unwrap_or(rate.clamp(1, 100)));
        let max = self
            .max_vus
            .unwrap_or(pre.max(rate.saturating_mul(2)).max(1));
        Ok(match kind {
            ExecutorKind::ConstantVus => ExecutorSpec::ConstantVus(ConstantVus {
                vus: self.vus.unwrap_or(10),
                duration,
                graceful_stop,
            }),
            ExecutorKind::RampingVus => ExecutorSpec::RampingVus(RampingVus {
                start_vus: self.vus.unwrap_or(0),
                stages: stages()?,
                graceful_stop,
            }),
            ExecutorKind::ConstantArrivalRate => {
                ExecutorSpec::ConstantArrivalRate(ConstantArrivalRate {
                    rate,
                    time_unit: Duration::from_secs(1),
                    duration,
                    pre_allocated_vus: pre,
                    max_vus: max,
                    max_lateness: self.max_lateness.unwrap_or_default(),
                    graceful_stop,
                })
            }
            ExecutorKind::RampingArrivalRate => {
                let stages = stages()?;
                let peak = stages.iter().map(|s| s.target).max().unwrap_or(rate);
                ExecutorSpec::RampingArrivalRate(RampingArrivalRate {
                    start_rate: self.rate.unwrap_or(0),
                    time_unit: Duration::from_secs(1),
                    stages,
                    pre_allocated_vus: self.pre_allocated_vus.unwrap_or(peak.clamp(1, 100)),
                    max_vus: self.max_vus.unwrap_or(peak.saturating_mul(2).max(1)),
                    max_lateness: self.max_lateness.unwrap_or_default(),
                    graceful_stop,
                })
            }
            ExecutorKind::PerVuIterations => ExecutorSpec::PerVuIterations(PerVuIterations {
                vus: self.vus.unwrap_or(1),
                iterations: self.iterations.unwrap_or(1),
                max_duration: self.duration.unwrap_or(Duration::from_secs(600)),
                graceful_stop,
            }),
            ExecutorKind::SharedIterations => ExecutorSpec::SharedIterations(SharedIterations {
                vus: self.vus.unwrap_or(1),
                iterations: self.iterations.unwrap_or(1),
                max_duration: self.duration.unwrap_or(Duration::from_secs(600)),
                graceful_stop,
            }),
        })
    }

    /// Whether the run goes through the coordinator protocol with local worker processes:
    /// `--workers` given, or a spec asking for more than one.
    pub fn distributed(&self, spec: &LoadTestSpec) -> bool {
        self.workers.is_some() || spec.workers > 1
    }

    /// `--server-pid NAME=PID` pairs.
    pub fn server_processes(&self) -> Result<Vec<(String, u32)>, SpecError> {
        self.server_pids
            .iter()
            .map(|s| {
                let (name, pid) = s.split_once('=').ok_or_else(|| SpecError {
                    path: "--server-pid".into(),
                    message: format!("`{s}`: expected NAME=PID"),
                })?;
                let pid = pid.trim().parse::<u32>().map_err(|_| SpecError {
                    path: "--server-pid".into(),
                    message: format!("`{pid}` is not a process id"),
                })?;
                Ok((name.trim().to_owned(), pid))
            })
            .collect()
    }
}
