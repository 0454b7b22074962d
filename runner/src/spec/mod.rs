//! The load test specification: the `spec` of a `LoadTest` resource, which `loadlab run -f`
//! reads too (a bare spec, or a whole `LoadTest` manifest). camelCase, k6's words where k6 has
//! them. Parsing names the offending field: `executor.stages[1].duration: …`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod duration;

pub use duration::{format_duration, parse_duration};

/// A load test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadTestSpec {
    /// Base URLs of the systems under test, by role: `feed`, `chat`. A role may list several
    /// replicas separated by commas (`chat: "http://gw-a:8082,http://gw-b:8082"`): the chat
    /// scenario spreads its VUs over them round-robin, the others use the first.
    #[serde(default)]
    pub target: BTreeMap<String, String>,
    /// What each iteration does.
    pub scenario: ScenarioSpec,
    /// How iterations are scheduled.
    pub executor: ExecutorSpec,
    /// Load generator processes (pods in Kubernetes).
    #[serde(default = "one")]
    pub workers: u32,
    /// Pass/fail criteria: metric (optionally `{tag:value,…}`) → expressions like `p(95)<200`.
    #[serde(default)]
    pub thresholds: BTreeMap<String, Vec<String>>,
    /// What to do when a worker is lost mid-run.
    #[serde(default)]
    pub on_worker_loss: OnWorkerLoss,
    /// Tracing of sampled requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingSpec>,
    /// Pod template settings for workers (used by the operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_template: Option<serde_json::Value>,
    /// Pod template settings for the coordinator (used by the operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator_template: Option<serde_json::Value>,
    /// How long workers may take to register before the run fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timeout_seconds: Option<u32>,
    /// How long a finished run is kept (Kubernetes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds_after_finished: Option<u32>,
    /// Stop the run (the only field that may change after creation).
    #[serde(default)]
    pub abort: bool,
}

fn one() -> u32 {
    1
}

/// Worker loss policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OnWorkerLoss {
    /// Fail the run, naming the worker.
    #[default]
    Fail,
    /// Finish degraded and record the loss.
    Continue,
}

/// Tracing settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingSpec {
    /// Fraction of requests traced.
    #[serde(default)]
    pub sample_ratio: f64,
    /// OTLP endpoint for the runner's spans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// Jaeger UI base URL for trace links.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jaeger_url: Option<String>,
}

/// Built-in scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ScenarioName {
    /// Home-timeline reads.
    FeedRead,
    /// Post creation.
    FeedWrite,
    /// 60% home timeline, 30% user timeline, 10% post.
    FeedMixed,
    /// WebSocket chat sessions.
    Chat,
    /// Declarative HTTP requests against any target.
    Http,
}

impl ScenarioName {
    /// The name as written in specs and tags.
    pub fn as_str(self) -> &'static str {
        match self {
            ScenarioName::FeedRead => "feed-read",
            ScenarioName::FeedWrite => "feed-write",
            ScenarioName::FeedMixed => "feed-mixed",
            ScenarioName::Chat => "chat",
            ScenarioName::Http => "http",
        }
    }
}

/// The scenario and its parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScenarioSpec {
    /// Which scenario.
    pub name: ScenarioName,
    /// Set-up and behaviour parameters.
    #[serde(default)]
    pub params: ScenarioParams,
    /// Requests of the `http` scenario.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpScenario>,
}

/// Parameters of the built-in scenarios (set-up runs once per run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ScenarioParams {
    /// Users created by set-up.
    pub users: u32,
    /// Average follows per user (power-law distributed).
    pub follows_per_user: u32,
    /// Users followed by a large share of everyone.
    pub celebrities: u32,
    /// Posts each user writes during set-up.
    pub posts_per_user: u32,
    /// Home/user timeline page size.
    pub page_size: u32,
    /// Per-request timeout.
    #[serde(with = "duration::serde_duration")]
    pub timeout: Duration,
    /// Chat: channels created by set-up.
    pub channels: u32,
    /// Chat: milliseconds between messages of one session.
    pub message_interval_ms: u32,
    /// Chat: how long one session (one iteration) stays connected.
    #[serde(with = "duration::serde_duration")]
    pub session_duration: Duration,
}

impl Default for ScenarioParams {
    fn default() -> Self {
        ScenarioParams {
            users: 1_000,
            follows_per_user: 50,
            celebrities: 10,
            posts_per_user: 5,
            page_size: 50,
            timeout: Duration::from_secs(10),
            channels: 50,
            message_interval_ms: 1_000,
            session_duration: Duration::from_secs(30),
        }
    }
}

/// The `http` scenario: weighted declarative requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpScenario {
    /// Requests; each iteration picks one by weight.
    pub requests: Vec<HttpRequestSpec>,
}

/// One declarative request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRequestSpec {
    /// Name, used as the `endpoint` tag.
    pub name: String,
    /// HTTP method.
    #[serde(default = "get")]
    pub method: String,
    /// URL; `{{vu}}`, `{{iter}}`, `{{random}}` and `{{uuid}}` are substituted.
    pub url: String,
    /// Headers (templated like the URL).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Body (templated like the URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Relative weight.
    #[serde(default = "one")]
    pub weight: u32,
    /// Checks on the response.
    #[serde(default)]
    pub checks: ChecksSpec,
}

fn get() -> String {
    "GET".to_owned()
}

/// Response checks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChecksSpec {
    /// Expected status code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Substring the body must contain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_contains: Option<String>,
    /// Largest acceptable duration.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "duration::serde_opt_duration"
    )]
    pub max_duration: Option<Duration>,
}

/// One stage of a ramping executor: reach `target` linearly over `duration`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Stage {
    /// How long the stage lasts.
    #[serde(with = "duration::serde_duration")]
    pub duration: Duration,
    /// VUs or iterations per time unit at the end of the stage.
    pub target: u32,
}

/// How iterations are scheduled (k6 semantics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ExecutorSpec {
    /// A fixed number of VUs looping for a duration.
    ConstantVus(ConstantVus),
    /// VUs ramped through stages.
    RampingVus(RampingVus),
    /// A fixed rate of iteration starts (open model).
    ConstantArrivalRate(ConstantArrivalRate),
    /// An iteration-start rate ramped through stages (open model).
    RampingArrivalRate(RampingArrivalRate),
    /// Each VU runs a fixed number of iterations.
    PerVuIterations(PerVuIterations),
    /// VUs share a fixed number of iterations.
    SharedIterations(SharedIterations),
}

/// `constant-vus`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConstantVus {
    /// VUs.
    pub vus: u32,
    /// How long.
    #[serde(with = "duration::serde_duration")]
    pub duration: Duration,
    /// How long in-flight iterations may finish after the end.
    #[serde(default = "graceful_stop", with = "duration::serde_duration")]
    pub graceful_stop: Duration,
}

/// `ramping-vus`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RampingVus {
    /// VUs at the start.
    #[serde(default, rename = "startVUs")]
    pub start_vus: u32,
    /// Stages.
    pub stages: Vec<Stage>,
    /// How long in-flight iterations may finish after the end.
    #[serde(default = "graceful_stop", with = "duration::serde_duration")]
    pub graceful_stop: Duration,
}

/// `constant-arrival-rate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConstantArrivalRate {
    /// Iterations per `timeUnit`.
    pub rate: u32,
    /// The unit of `rate`.
    #[serde(default = "second", with = "duration::serde_duration")]
    pub time_unit: Duration,
    /// How long.
    #[serde(with = "duration::serde_duration")]
    pub duration: Duration,
    /// VUs created up front.
    #[serde(default, rename = "preAllocatedVUs")]
    pub pre_allocated_vus: u32,
    /// Most VUs; when all are busy, iterations are dropped (see `maxLateness`).
    #[serde(default, rename = "maxVUs")]
    pub max_vus: u32,
    /// When every VU is busy, an iteration waits up to this long for one instead of being
    /// dropped at once (0, the default, is k6's behaviour). Its latency counts from its
    /// intended start, so a stalled target shows up as latency.
    #[serde(default, with = "duration::serde_duration")]
    pub max_lateness: Duration,
    /// How long in-flight iterations may finish after the end.
    #[serde(default = "graceful_stop", with = "duration::serde_duration")]
    pub graceful_stop: Duration,
}

/// `ramping-arrival-rate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RampingArrivalRate {
    /// Iterations per `timeUnit` at the start.
    #[serde(default)]
    pub start_rate: u32,
    /// The unit of the rates.
    #[serde(default = "second", with = "duration::serde_duration")]
    pub time_unit: Duration,
    /// Stages (targets are rates).
    pub stages: Vec<Stage>,
    /// VUs created up front.
    #[serde(default, rename = "preAllocatedVUs")]
    pub pre_allocated_vus: u32,
    /// Most VUs; when all are busy, iterations are dropped (see `maxLateness`).
    #[serde(default, rename = "maxVUs")]
    pub max_vus: u32,
    /// When every VU is busy, an iteration waits up to this long for one instead of being
    /// dropped at once (0, the default, is k6's behaviour). Its latency counts from its
    /// intended start, so a stalled target shows up as latency.
    #[serde(default, with = "duration::serde_duration")]
    pub max_lateness: Duration,
    /// How long in-flight iterations may finish after the end.
    #[serde(default = "graceful_stop", with = "duration::serde_duration")]
    pub graceful_stop: Duration,
}

/// `per-vu-iterations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PerVuIterations {
    /// VUs.
    pub vus: u32,
    /// Iterations each VU runs.
    pub iterations: u32,
    /// Upper bound on the run.
    #[serde(default = "max_duration", with = "duration::serde_duration")]
    pub max_duration: Duration,
    /// How long in-flight iterations may finish after `maxDuration`.
    #[serde(default = "graceful_stop", with = "duration::serde_duration")]
    pub graceful_stop: Duration,
}

/// `shared-iterations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SharedIterations {
    /// VUs.
    pub vus: u32,
    /// Iterations shared by all VUs.
    pub iterations: u32,
    /// Upper bound on the run.
    #[serde(default = "max_duration", with = "duration::serde_duration")]
    pub max_duration: Duration,
    /// How long in-flight iterations may finish after `maxDuration`.
    #[serde(default = "graceful_stop", with = "duration::serde_duration")]
    pub graceful_stop: Duration,
}

fn graceful_stop() -> Duration {
    Duration::from_secs(30)
}

fn second() -> Duration {
    Duration::from_secs(1)
}

fn max_duration() -> Duration {
    Duration::from_secs(600)
}

/// A spec that does not parse or does not make sense; `path` names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SpecError {
    /// Dotted path of the offending field, e.g. `executor.stages[1].duration`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl SpecError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl LoadTestSpec {
    /// Parses YAML (or JSON): a bare spec or a `LoadTest` manifest (its `spec` is used).
    pub fn from_yaml(text: &str) -> Result<LoadTestSpec, SpecError> {
        let value: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| SpecError::new(location(&e), e.to_string()))?;
        let (value, prefix) = match value {
            serde_yaml::Value::Mapping(ref m)
                if m.contains_key("apiVersion") || m.contains_key("kind") =>
            {
                let kind = m.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
                if kind != "LoadTest" {
                    return Err(SpecError::new(
                        "kind",
                        format!("expected LoadTest, found {kind:?}"),
                    ));
                }
                let spec = m
                    .get("spec")
                    .cloned()
                    .ok_or_else(|| SpecError::new("spec", "a LoadTest manifest needs a spec"))?;
                (spec, "spec.")
            }
            other => (other, ""),
        };
        // Tagged enums lose the path of an error inside them (serde buffers their content), so
        // the executor is checked on its own first, variant by variant.
        if let Some(executor) = value.get("executor") {
            check_executor(executor)
                .map_err(|e| SpecError::new(format!("{prefix}executor{}", e.path), e.message))?;
        }
        let spec: LoadTestSpec = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            SpecError::new(
                format!("{prefix}{path}").trim_end_matches('.').to_owned(),
                e.into_inner().to_string(),
            )
        })?;
        spec.validate()
            .map_err(|e| SpecError::new(format!("{prefix}{}", e.path), e.message))?;
        Ok(spec)
    }

    /// The base URLs of a target role (several when it lists replicas), without trailing `/`.
    pub fn target_urls(&self, role: &str) -> Vec<String> {
        self.target
            .get(role)
            .map(|urls| {
                urls.split(',')
                    .map(|u| u.trim().trim_end_matches('/').to_owned())
                    .filter(|u| !u.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Checks rules the types cannot express.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.workers == 0 {
            return Err(SpecError::new("workers", "must be at least 1"));
        }
        for (role, urls) in &self.target {
            for url in urls.split(',').map(str::trim) {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(SpecError::new(
                        format!("target.{role}"),
                        format!("{url:?} is not an http:// or https:// URL"),
                    ));
                }
            }
        }
        self.executor.validate()?;
        self.validate_scenario()?;
        for (metric, exprs) in &self.thresholds {
            for (i, expr) in exprs.iter().enumerate() {
                crate::threshold::Threshold::parse(metric, expr).map_err(|e| {
                    SpecError::new(format!("thresholds.{metric}[{i}]"), e.to_string())
                })?;
            }
        }
        if let Some(t) = &self.tracing
            && !(0.0..=1.0).contains(&t.sample_ratio)
        {
            return Err(SpecError::new(
                "tracing.sampleRatio",
                "must be between 0 and 1",
            ));
        }
        Ok(())
    }

    fn validate_scenario(&self) -> Result<(), SpecError> {
        let s = &self.scenario;
        let needs = |role: &str| -> Result<(), SpecError> {
            if self.target.contains_key(role) {
                Ok(())
            } else {
                Err(SpecError::new(
                    format!("target.{role}"),
                    format!("scenario {} needs a {role} target URL", s.name.as_str()),
                ))
            }
        };
        match s.name {
            ScenarioName::FeedRead | ScenarioName::FeedWrite | ScenarioName::FeedMixed => {
                needs("feed")?;
                if s.params.users < 2 {
                    return Err(SpecError::new(
                        "scenario.params.users",
                        "must be at least 2",
                    ));
                }
                if s.params.celebrities >= s.params.users {
                    return Err(SpecError::new(
                        "scenario.params.celebrities",
                        "must be below users",
                    ));
                }
                if s.params.follows_per_user >= s.params.users {
                    return Err(SpecError::new(
                        "scenario.params.followsPerUser",
                        "must be below users",
                    ));
                }
                if !(1..=100).contains(&s.params.page_size) {
                    return Err(SpecError::new(
                        "scenario.params.pageSize",
                        "must be between 1 and 100",
                    ));
                }
            }
            ScenarioName::Chat => {
                needs("chat")?;
                // Users are created through the feed's API (the gateway has no sign-up).
                needs("feed")?;
                if s.params.message_interval_ms == 0 {
                    return Err(SpecError::new(
                        "scenario.params.messageIntervalMs",
                        "must be at least 1",
                    ));
                }
                if s.params.session_duration.is_zero() {
                    return Err(SpecError::new(
                        "scenario.params.sessionDuration",
                        "must be positive",
                    ));
                }
                if s.params.channels == 0 {
                    return Err(SpecError::new(
                        "scenario.params.channels",
                        "must be at least 1",
                    ));
                }
            }
            ScenarioName::Http => {
                let http = s.http.as_ref().ok_or_else(|| {
                    SpecError::new(
                        "scenario.http",
                        "the http scenario needs `http: {requests: [...]}`",
                    )
                })?;
                if http.requests.is_empty() {
                    return Err(SpecError::new(
                        "scenario.http.requests",
                        "needs at least one request",
                    ));
                }
                for (i, r) in http.requests.iter().enumerate() {
                    if r.weight == 0 {
                        return Err(SpecError::new(
                            format!("scenario.http.requests[{i}].weight"),
                            "must be at least 1",
                        ));
                    }
                    if http::Method::from_bytes(r.method.as_bytes()).is_err() {
                        return Err(SpecError::new(
                            format!("scenario.http.requests[{i}].method"),
                            format!("{:?} is not an HTTP method", r.method),
                        ));
                    }
                    if !(r.url.starts_with("http://") || r.url.starts_with("https://")) {
                        return Err(SpecError::new(
                            format!("scenario.http.requests[{i}].url"),
                            format!("{:?} is not an http:// or https:// URL", r.url),
                        ));
                    }
                }
            }
        }
        if s.params.timeout.is_zero() {
            return Err(SpecError::new(
                "scenario.params.timeout",
                "must be positive",
            ));
        }
        Ok(())
    }
}

impl ExecutorSpec {
    /// The executor's name as written in specs.
    pub fn type_name(&self) -> &'static str {
        match self {
            ExecutorSpec::ConstantVus(_) => "constant-vus",
            ExecutorSpec::RampingVus(_) => "ramping-vus",
            ExecutorSpec::ConstantArrivalRate(_) => "constant-arrival-rate",
            ExecutorSpec::RampingArrivalRate(_) => "ramping-arrival-rate",
            ExecutorSpec::PerVuIterations(_) => "per-vu-iterations",
            ExecutorSpec::SharedIterations(_) => "shared-iterations",
        }
    }

    /// How long in-flight iterations may finish after the schedule ends.
    pub fn graceful_stop(&self) -> Duration {
        match self {
            ExecutorSpec::ConstantVus(e) => e.graceful_stop,
            ExecutorSpec::RampingVus(e) => e.graceful_stop,
            ExecutorSpec::ConstantArrivalRate(e) => e.graceful_stop,
            ExecutorSpec::RampingArrivalRate(e) => e.graceful_stop,
            ExecutorSpec::PerVuIterations(e) => e.graceful_stop,
            ExecutorSpec::SharedIterations(e) => e.graceful_stop,
        }
    }

    /// The scheduled length (iteration-count executors: their `maxDuration`).
    pub fn duration(&self) -> Duration {
        let stages = |s: &[Stage]| s.iter().map(|s| s.duration).sum();
        match self {
            ExecutorSpec::ConstantVus(e) => e.duration,
            ExecutorSpec::RampingVus(e) => stages(&e.stages),
            ExecutorSpec::ConstantArrivalRate(e) => e.duration,
            ExecutorSpec::RampingArrivalRate(e) => stages(&e.stages),
            ExecutorSpec::PerVuIterations(e) => e.max_duration,
            ExecutorSpec::SharedIterations(e) => e.max_duration,
        }
    }

    fn validate(&self) -> Result<(), SpecError> {
        let positive = |path: &str, d: Duration| {
            if d.is_zero() {
                Err(SpecError::new(
                    format!("executor.{path}"),
                    "must be positive",
                ))
            } else {
                Ok(())
            }
        };
        let at_least_one = |path: &str, n: u32| {
            if n == 0 {
                Err(SpecError::new(
                    format!("executor.{path}"),
                    "must be at least 1",
                ))
            } else {
                Ok(())
            }
        };
        let stages = |stages: &[Stage]| {
            if stages.is_empty() {
                return Err(SpecError::new(
                    "executor.stages",
                    "needs at least one stage",
                ));
            }
            Ok(())
        };
        let vus_bounds = |pre: u32, max: u32| {
            if max != 0 && max < pre {
                Err(SpecError::new(
                    "executor.maxVUs",
                    format!("must be at least preAllocatedVUs ({pre})"),
                ))
            } else if pre == 0 && max == 0 {
                Err(SpecError::new(
                    "executor.preAllocatedVUs",
                    "must be at least 1",
                ))
            } else {
                Ok(())
            }
        };
        match self {
            ExecutorSpec::ConstantVus(e) => {
                at_least_one("vus", e.vus)?;
                positive("duration", e.duration)
            }
            ExecutorSpec::RampingVus(e) => stages(&e.stages),
            ExecutorSpec::ConstantArrivalRate(e) => {
                at_least_one("rate", e.rate)?;
                positive("timeUnit", e.time_unit)?;
                positive("duration", e.duration)?;
                vus_bounds(e.pre_allocated_vus, e.max_vus)
            }
            ExecutorSpec::RampingArrivalRate(e) => {
                positive("timeUnit", e.time_unit)?;
                stages(&e.stages)?;
                vus_bounds(e.pre_allocated_vus, e.max_vus)
            }
            ExecutorSpec::PerVuIterations(e) => {
                at_least_one("vus", e.vus)?;
                at_least_one("iterations", e.iterations)?;
                positive("maxDuration", e.max_duration)
            }
            ExecutorSpec::SharedIterations(e) => {
                at_least_one("vus", e.vus)?;
                at_least_one("iterations", e.iterations)?;
                positive("maxDuration", e.max_duration)
            }
        }
    }
}

/// Deserializes the executor's variant struct directly, so errors carry the field path
/// (`.stages[1].duration`, relative to `executor`).
fn check_executor(value: &serde_yaml::Value) -> Result<(), SpecError> {
    fn check<T: serde::de::DeserializeOwned>(map: serde_yaml::Mapping) -> Result<(), SpecError> {
        serde_path_to_error::deserialize::<_, T>(serde_yaml::Value::Mapping(map))
            .map(|_| ())
            .map_err(|e| {
                let path = e.path().to_string();
                let path = if path == "." {
                    String::new()
                } else {
                    format!(".{path}")
                };
                SpecError::new(path, e.into_inner().to_string())
            })
    }
    let serde_yaml::Value::Mapping(map) = value else {
        return Err(SpecError::new("", "expected a mapping with a `type`"));
    };
    let mut map = map.clone();
    let kind = match map.remove("type") {
        Some(serde_yaml::Value::String(kind)) => kind,
        Some(_) => return Err(SpecError::new(".type", "must be a string")),
        None => {
            return Err(SpecError::new(
                ".type",
                "missing: constant-vus, ramping-vus, constant-arrival-rate, ramping-arrival-rate, per-vu-iterations or shared-iterations",
            ));
        }
    };
    match kind.as_str() {
        "constant-vus" => check::<ConstantVus>(map),
        "ramping-vus" => check::<RampingVus>(map),
        "constant-arrival-rate" => check::<ConstantArrivalRate>(map),
        "ramping-arrival-rate" => check::<RampingArrivalRate>(map),
        "per-vu-iterations" => check::<PerVuIterations>(map),
        "shared-iterations" => check::<SharedIterations>(map),
        other => Err(SpecError::new(
            ".type",
            format!(
                "unknown variant `{other}`, expected one of constant-vus, ramping-vus, constant-arrival-rate, ramping-arrival-rate, per-vu-iterations, shared-iterations"
            ),
        )),
    }
}

fn location(e: &serde_yaml::Error) -> String {
    e.location().map_or_else(
        || "(document)".to_owned(),
        |l| format!("line {} column {}", l.line(), l.column()),
    )
}
