//! Jaeger's query API (`/api/traces`), used by the coordinator in Kubernetes runs: find the
//! slowest traces of the run's window, link each as `<jaegerUrl>/trace/<id>`, and build the
//! per-service span breakdown from them (the local runs' receiver does this from OTLP).
//!
//! `GET {url}/api/traces?service=…&start=…&end=…&minDuration=…&limit=…` (times in Unix
//! microseconds) and `GET {url}/api/traces/{id}` both answer `{"data": [trace…], "errors": …}`,
//! a trace being `{traceID, spans: [{spanID, operationName, references, startTime, duration,
//! tags, processID}], processes: {id: {serviceName}}}`.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::http_client::{Client, ClientConfig, Request};
use crate::otlp::ReceivedSpan;
use crate::summary::{SpanStats, TraceRef, parse_time};
use crate::tracing_client::jaeger_link;

/// Why a query failed.
#[derive(Debug, thiserror::Error)]
pub enum JaegerError {
    /// The URL is not usable.
    #[error("Jaeger URL {0:?} is invalid")]
    Url(String),
    /// The request failed in transport.
    #[error("Jaeger query {url}: {message}")]
    Transport {
        /// Request URL.
        url: String,
        /// What failed.
        message: String,
    },
    /// Jaeger answered an error status or errors in the body.
    #[error("Jaeger query {url} answered {status}: {message}")]
    Status {
        /// Request URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// Body excerpt or Jaeger's error messages.
        message: String,
    },
    /// The body is not Jaeger's JSON.
    #[error("Jaeger query {url}: unexpected JSON: {source}")]
    Json {
        /// Request URL.
        url: String,
        /// Parse error.
        source: serde_json::Error,
    },
}

/// A trace search.
#[derive(Debug, Clone)]
pub struct TraceQuery {
    /// Service whose spans are searched (the edge service for load requests, or `loadlab`).
    pub service: String,
    /// Window start.
    pub start: SystemTime,
    /// Window end.
    pub end: SystemTime,
    /// Only traces at least this long.
    pub min_duration: Option<Duration>,
    /// Most traces returned.
    pub limit: u32,
}

#[derive(Debug, Deserialize)]
struct Envelope {
    #[serde(default)]
    data: Option<Vec<Trace>>,
    #[serde(default)]
    errors: Option<Vec<ApiError>>,
}

#[derive(Debug, Deserialize)]
struct ApiError {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    msg: String,
}

/// One trace as Jaeger returns it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Trace {
    /// Trace id (hex).
    #[serde(rename = "traceID")]
    pub trace_id: String,
    /// Its spans.
    pub spans: Vec<Span>,
    /// Processes by id (`p1`, …).
    #[serde(default)]
    pub processes: HashMap<String, Process>,
}

/// One span.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Span {
    /// Trace id (hex).
    #[serde(rename = "traceID")]
    pub trace_id: String,
    /// Span id (hex).
    #[serde(rename = "spanID")]
    pub span_id: String,
    /// Span name.
    pub operation_name: String,
    /// Parent (`CHILD_OF`) and link (`FOLLOWS_FROM`) references.
    #[serde(default)]
    pub references: Vec<Reference>,
    /// Start, Unix microseconds.
    pub start_time: u64,
    /// Duration, microseconds.
    pub duration: u64,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<Tag>,
    /// Key into the trace's `processes`.
    #[serde(rename = "processID", default)]
    pub process_id: String,
}

/// A span reference.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reference {
    /// `CHILD_OF` or `FOLLOWS_FROM`.
    pub ref_type: String,
    /// Referenced trace.
    #[serde(rename = "traceID")]
    pub trace_id: String,
    /// Referenced span.
    #[serde(rename = "spanID")]
    pub span_id: String,
}

/// A tag.
#[derive(Debug, Clone, Deserialize)]
pub struct Tag {
    /// Key.
    pub key: String,
    /// Value (string, number or bool).
    #[serde(default)]
    pub value: serde_json::Value,
}

/// A process (service).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    /// Service name.
    pub service_name: String,
}

impl Trace {
    /// The root span: the one without a `CHILD_OF` reference inside this trace (the earliest
    /// such span when several are).
    pub fn root(&self) -> Option<&Span> {
        self.spans
            .iter()
            .filter(|s| {
                !s.references
                    .iter()
                    .any(|r| r.ref_type == "CHILD_OF" && r.trace_id == self.trace_id)
            })
            .min_by_key(|s| s.start_time)
    }

    /// The spans flattened like the OTLP receiver's, so both feed one breakdown.
    pub fn flatten(&self) -> Vec<ReceivedSpan> {
        self.spans
            .iter()
            .map(|s| {
                let tag = |k: &str| s.tags.iter().find(|t| t.key == k);
                let status = match tag("otel.status_code").and_then(|t| t.value.as_str()) {
                    Some("ERROR") => 2,
                    Some("OK") => 1,
                    _ if tag("error").and_then(|t| t.value.as_bool()) == Some(true) => 2,
                    _ => 0,
                };
                let kind = match tag("span.kind").and_then(|t| t.value.as_str()) {
                    Some("server") => 2,
                    Some("client") => 3,
                    Some("producer") => 4,
                    Some("consumer") => 5,
                    _ => 1,
                };
                ReceivedSpan {
                    service: self
                        .processes
                        .get(&s.process_id)
                        .map_or_else(|| "unknown".to_owned(), |p| p.service_name.clone()),
                    trace_id: s.trace_id.clone(),
                    span_id: s.span_id.clone(),
                    parent_span_id: s
                        .references
                        .iter()
                        .find(|r| r.ref_type == "CHILD_OF")
                        .map(|r| r.span_id.clone())
                        .unwrap_or_default(),
                    name: s.operation_name.clone(),
                    kind,
                    start_unix_nano: s.start_time.saturating_mul(1_000),
                    end_unix_nano: (s.start_time + s.duration).saturating_mul(1_000),
                    attributes: s
                        .tags
                        .iter()
                        .map(|t| {
                            let v = match &t.value {
                                serde_json::Value::String(s) => s.clone(),
                                other => other.to_string(),
                            };
                            (t.key.clone(), v)
                        })
                        .collect(),
                    links: s
                        .references
                        .iter()
                        .filter(|r| r.ref_type == "FOLLOWS_FROM")
                        .map(|r| (r.trace_id.clone(), r.span_id.clone()))
                        .collect(),
                    status,
                }
            })
            .collect()
    }
}

/// A client of one Jaeger query service.
#[derive(Clone)]
pub struct JaegerClient {
    base: String,
    client: Client,
}

impl std::fmt::Debug for JaegerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JaegerClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

fn micros(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_micros()
}

/// Jaeger's duration syntax (Go's): whole milliseconds are enough here.
fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl JaegerClient {
    /// A client of the query service at `base` (e.g. `http://jaeger:16686`).
    pub fn new(base: &str) -> Result<Self, JaegerError> {
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(JaegerError::Url(base.to_owned()));
        }
        Ok(JaegerClient {
            base: base.trim_end_matches('/').to_owned(),
            client: Client::new(ClientConfig {
                timeout: Duration::from_secs(30),
                // Traces of a busy window run to megabytes.
                keep_body_bytes: 64 * 1024 * 1024,
                ..ClientConfig::default()
            }),
        })
    }

    async fn get(&self, url: String) -> Result<Vec<Trace>, JaegerError> {
        let uri = url.parse().map_err(|_| JaegerError::Url(url.clone()))?;
        let mut request = Request::new(http::Method::GET, uri);
        request.headers.insert(
            http::header::ACCEPT,
            http::HeaderValue::from_static("application/json"),
        );
        let mut conn = self.client.connection();
        let response = conn
            .send(request)
            .await
            .map_err(|e| JaegerError::Transport {
                url: url.clone(),
                message: e.to_string(),
            })?;
        if response.status == 404 {
            return Ok(Vec::new());
        }
        if response.status != 200 {
            return Err(JaegerError::Status {
                url,
                status: response.status,
                message: String::from_utf8_lossy(&response.body[..response.body.len().min(300)])
                    .into_owned(),
            });
        }
        let envelope: Envelope =
            serde_json::from_slice(&response.body).map_err(|source| JaegerError::Json {
                url: url.clone(),
                source,
            })?;
        if let Some(errors) = envelope.errors.filter(|e| !e.is_empty()) {
            return Err(JaegerError::Status {
                url,
                status: 200,
                message: errors
                    .iter()
                    .map(|e| format!("{} {}", e.code, e.msg))
                    .collect::<Vec<_>>()
                    .join("; "),
            });
        }
        Ok(envelope.data.unwrap_or_default())
    }

    /// Traces matching `query`.
    pub async fn find_traces(&self, query: &TraceQuery) -> Result<Vec<Trace>, JaegerError> {
        let mut url = format!(
            "{}/api/traces?service={}&start={}&end={}&limit={}",
            self.base,
            query_escape(&query.service),
            micros(query.start),
            micros(query.end),
            query.limit
        );
        if let Some(d) = query.min_duration {
            url.push_str(&format!("&minDuration={}", go_duration(d)));
        }
        self.get(url).await
    }

    /// One trace by id (`None` when Jaeger does not have it).
    pub async fn trace(&self, trace_id: &str) -> Result<Option<Trace>, JaegerError> {
        let url = format!("{}/api/traces/{}", self.base, query_escape(trace_id));
        Ok(self.get(url).await?.into_iter().next())
    }

    /// The `limit` slowest traces of `query`'s window as report references, slowest first,
    /// timed relative to `run_start` and linked to this Jaeger.
    pub async fn slowest(
        &self,
        query: &TraceQuery,
        run_start: SystemTime,
    ) -> Result<(Vec<TraceRef>, Vec<Trace>), JaegerError> {
        let traces = self.find_traces(query).await?;
        let start_us = micros(run_start);
        let mut refs: Vec<TraceRef> = traces
            .iter()
            .filter_map(|t| {
                let root = t.root()?;
                Some(TraceRef {
                    t: (u128::from(root.start_time).saturating_sub(start_us)) as f64 / 1e6,
                    endpoint: root.operation_name.clone(),
                    duration_ms: root.duration as f64 / 1e3,
                    trace_id: t.trace_id.clone(),
                    url: Some(jaeger_link(&self.base, &t.trace_id)),
                })
            })
            .collect();
        refs.sort_by(|a, b| b.duration_ms.total_cmp(&a.duration_ms));
        Ok((refs, traces))
    }
}

/// Traces asked of Jaeger for a report at most.
pub const REPORT_TRACE_LIMIT: u32 = 100;
/// How long after the last span's export a run waits before asking Jaeger (the collector
/// batches and indexes spans before they can be found).
pub const INDEX_DELAY: Duration = Duration::from_secs(3);
/// The window asked of Jaeger reaches this far past the end of the run (late server spans).
const WINDOW_SLACK: Duration = Duration::from_secs(5);

/// Adds what Jaeger knows about a finished run to its summary: the slowest traces of the run's
/// window rooted in the generator's client spans (service `loadlab`, at least as long as the
/// run's p99) join `traces`, every trace reference is linked as `<jaeger_url>/trace/<id>`, and
/// when no receiver filled `server.spans` the per-service span breakdown of those traces
/// does. Returns how many traces Jaeger gave.
pub async fn enrich(
    summary: &mut crate::summary::Summary,
    jaeger_url: &str,
) -> Result<usize, JaegerError> {
    let client = JaegerClient::new(jaeger_url)?;
    let (load_start, ended) = summary.run.load_window().unwrap_or_else(|| {
        let now = SystemTime::now();
        (now, now)
    });
    let started = parse_time(&summary.run.started_at).unwrap_or(ended);
    let load_start = load_start.max(started);
    let min_duration = summary
        .metrics
        .get("http_req_duration")
        .and_then(|m| m.values.get("p(99)"))
        .copied()
        .filter(|ms| ms.is_finite() && *ms >= 1.0)
        .map(|ms| Duration::from_millis(ms.floor() as u64));
    let query = TraceQuery {
        service: "loadlab".into(),
        start: started,
        end: ended + WINDOW_SLACK,
        min_duration,
        limit: REPORT_TRACE_LIMIT,
    };
    let (found, traces) = client.slowest(&query, load_start).await?;
    let ours = std::mem::take(&mut summary.traces);
    summary.traces =
        crate::tracing_client::merge_refs(ours.into_iter().chain(found), Some(jaeger_url));
    if summary.server.spans.is_empty() {
        summary.server.spans = span_breakdown(&traces);
    }
    Ok(traces.len())
}

/// [`enrich`] for a run whose spec names a Jaeger (`tracing.jaegerUrl`, with sampling on):
/// waits [`INDEX_DELAY`] for Jaeger to index the last spans; a Jaeger that cannot be asked
/// costs a warning, not the report.
pub async fn enrich_run(summary: &mut crate::summary::Summary, spec: &crate::spec::LoadTestSpec) {
    let Some(tracing) = spec.tracing.as_ref() else {
        return;
    };
    let Some(url) = tracing
        .jaeger_url
        .as_deref()
        .filter(|u| !u.trim().is_empty())
    else {
        return;
    };
    if tracing.sample_ratio <= 0.0 {
        return;
    }
    tokio::time::sleep(INDEX_DELAY).await;
    match enrich(summary, url).await {
        Ok(n) => tracing::info!(traces = n, jaeger = url, "slow traces from Jaeger"),
        Err(e) => tracing::warn!(error = %e, "the report has no traces from Jaeger"),
    }
}

/// The per-service span breakdown of Jaeger traces.
pub fn span_breakdown(traces: &[Trace]) -> Vec<SpanStats> {
    let spans: Vec<ReceivedSpan> = traces.iter().flat_map(Trace::flatten).collect();
    crate::otlp::report::span_breakdown(&spans)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_escaped_and_durations_use_go_syntax() {
        assert_eq!(query_escape("chat-gateway"), "chat-gateway");
        assert_eq!(query_escape("a b/c"), "a%20b%2Fc");
        assert_eq!(go_duration(Duration::from_millis(250)), "250ms");
        assert!(JaegerClient::new("jaeger:16686").is_err());
    }
}
