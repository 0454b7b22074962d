//! From received telemetry to the report: the per-service span breakdown and the servers' CPU,
//! memory and network over the run.

use std::collections::BTreeMap;

use super::{MetricPoint, ProcessMetric, Received, ReceivedSpan};
use crate::summary::{ServicePoint, ServiceStats, SpanStats, Summary};

/// Adds what the receiver got during the run to `summary`: the span breakdown, and per-service
/// CPU/memory/network from OTLP metrics ahead of any `/proc` figures (kept for processes that
/// export no telemetry).
pub fn enrich(summary: &mut Summary, received: &Received) {
    let Some((from, to)) = load_window(summary) else {
        return;
    };
    summary.server.spans = span_breakdown(&within(received.spans(), from, to));
    // Metric points arrive once per export interval: the interval that ends after the load
    // (often the final flush at shutdown) still describes it; the one before the load would
    // describe set-up, so the window is widened at the end only.
    let services = server_stats(received, from, to + METRIC_SLACK_NS);
    if !services.is_empty() {
        let had_proc = !summary.server.services.is_empty();
        let mut all = services;
        all.append(&mut summary.server.services);
        summary.server.services = all;
        summary.server.source = if had_proc { "otlp+proc" } else { "otlp" }.into();
    }
}

/// One metric export interval (the services' default), in nanoseconds.
pub const METRIC_SLACK_NS: u64 = 5_000_000_000;

/// The load phase of a run as Unix nanoseconds: it ends at `ended_at` and lasted `duration_s`.
fn load_window(summary: &Summary) -> Option<(u64, u64)> {
    let (start, end) = summary.run.load_window()?;
    let nanos = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    };
    Some((nanos(start), nanos(end)))
}

/// Count and p50/p95/p99/max per (service, span name), slowest p99 first.
pub fn span_breakdown(spans: &[ReceivedSpan]) -> Vec<SpanStats> {
    let mut groups: BTreeMap<(&str, &str), (Vec<f64>, u64)> = BTreeMap::new();
    for s in spans {
        let entry = groups.entry((&s.service, &s.name)).or_default();
        entry.0.push(s.duration_ms());
        if s.status == 2 {
            entry.1 += 1;
        }
    }
    let mut out: Vec<SpanStats> = groups
        .into_iter()
        .map(|((service, name), (mut durations, errors))| {
            durations.sort_by(f64::total_cmp);
            SpanStats {
                service: service.to_owned(),
                name: name.to_owned(),
                count: durations.len() as u64,
                p50_ms: nearest_rank(&durations, 0.50),
                p95_ms: nearest_rank(&durations, 0.95),
                p99_ms: nearest_rank(&durations, 0.99),
                max_ms: durations.last().copied().unwrap_or(0.0),
                errors,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        b.p99_ms
            .total_cmp(&a.p99_ms)
            .then_with(|| a.service.cmp(&b.service))
    });
    out
}

/// The nearest-rank quantile of sorted values (0 when empty).
fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Spans that started within `[from, to]` (Unix nanoseconds).
pub fn within(spans: Vec<ReceivedSpan>, from: u64, to: u64) -> Vec<ReceivedSpan> {
    spans
        .into_iter()
        .filter(|s| s.start_unix_nano >= from && s.start_unix_nano <= to)
        .collect()
}

/// Per-service CPU (cores), peak memory and network from the exported process metrics,
/// between `from` and `to` (Unix nanoseconds); points are placed relative to `from`.
/// Services that share a process (`loadlab up`) report the same process figures: they form
/// one row, named after all of them, rather than repeating the process once per service.
pub fn server_stats(received: &Received, from: u64, to: u64) -> Vec<ServiceStats> {
    let mut processes: Vec<(String, Vec<String>)> = Vec::new();
    for service in received.metric_services() {
        let process = received.process_of(&service);
        match processes.iter_mut().find(|(p, _)| *p == process) {
            Some((_, services)) => services.push(service),
            None => processes.push((process, vec![service])),
        }
    }
    processes
        .into_iter()
        .filter_map(|(_, services)| {
            let mut stats = process_stats(received, &services[0], from, to)?;
            stats.name = services.join(" + ");
            Some(stats)
        })
        .collect()
}

fn process_stats(received: &Received, service: &str, from: u64, to: u64) -> Option<ServiceStats> {
    let pick = |m| -> Vec<MetricPoint> {
        let mut p: Vec<MetricPoint> = received
            .points(service, m)
            .into_iter()
            .filter(|p| p.time_unix_nano >= from && p.time_unix_nano <= to)
            .collect();
        p.sort_by_key(|p| p.time_unix_nano);
        p
    };
    let cpu = pick(ProcessMetric::CpuSeconds);
    let mem = pick(ProcessMetric::MemoryBytes);
    let rx = pick(ProcessMetric::NetRxBytes);
    let tx = pick(ProcessMetric::NetTxBytes);
    if cpu.is_empty() && mem.is_empty() {
        return None;
    }
    Some(service_stats(
        service.to_owned(),
        from,
        &cpu,
        &mem,
        &rx,
        &tx,
    ))
}

fn service_stats(
    name: String,
    from: u64,
    cpu: &[MetricPoint],
    mem: &[MetricPoint],
    rx: &[MetricPoint],
    tx: &[MetricPoint],
) -> ServiceStats {
    let secs = |a: &MetricPoint, b: &MetricPoint| {
        b.time_unix_nano.saturating_sub(a.time_unix_nano) as f64 / 1e9
    };
    let rate = |series: &[MetricPoint], at: u64| -> f64 {
        // The rate over the export interval that ends at `at`.
        let i = series.iter().position(|p| p.time_unix_nano >= at);
        match i {
            Some(i) if i > 0 => {
                let (a, b) = (&series[i - 1], &series[i]);
                let dt = secs(a, b);
                if dt > 0.0 {
                    ((b.value - a.value) / dt).max(0.0)
                } else {
                    0.0
                }
            }
            _ => 0.0,
        }
    };
    let mut points = Vec::new();
    let mut max_cpu = 0.0f64;
    for pair in cpu.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let dt = secs(a, b);
        if dt <= 0.0 {
            continue;
        }
        let cores = ((b.value - a.value) / dt).max(0.0);
        max_cpu = max_cpu.max(cores);
        let rss = mem
            .iter()
            .min_by_key(|m| m.time_unix_nano.abs_diff(b.time_unix_nano))
            .map_or(0, |m| m.value as u64);
        points.push(ServicePoint {
            t: b.time_unix_nano.saturating_sub(from) as f64 / 1e9,
            cpu_cores: cores,
            rss_bytes: rss,
            net_rx_bytes_per_s: rate(rx, b.time_unix_nano),
            net_tx_bytes_per_s: rate(tx, b.time_unix_nano),
        });
    }
    let avg_cpu = match (cpu.first(), cpu.last()) {
        (Some(a), Some(b)) if secs(a, b) > 0.0 => ((b.value - a.value) / secs(a, b)).max(0.0),
        _ => 0.0,
    };
    let delta = |s: &[MetricPoint]| match (s.first(), s.last()) {
        (Some(a), Some(b)) => (b.value - a.value).max(0.0) as u64,
        _ => 0,
    };
    ServiceStats {
        name,
        avg_cpu_cores: avg_cpu,
        max_cpu_cores: max_cpu,
        max_rss_bytes: mem.iter().map(|m| m.value as u64).max().unwrap_or(0),
        net_rx_bytes: delta(rx),
        net_tx_bytes: delta(tx),
        points,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(service: &str, name: &str, ms: u64, status: i32) -> ReceivedSpan {
        ReceivedSpan {
            service: service.into(),
            trace_id: "0".repeat(32),
            span_id: "1".repeat(16),
            parent_span_id: String::new(),
            name: name.into(),
            kind: 2,
            start_unix_nano: 1_000,
            end_unix_nano: 1_000 + ms * 1_000_000,
            attributes: Vec::new(),
            links: Vec::new(),
            status,
        }
    }

    #[test]
    fn breakdown_groups_by_service_and_name_with_nearest_rank_quantiles() {
        let mut spans: Vec<ReceivedSpan> =
            (1..=100).map(|ms| span("feed", "GET /x", ms, 0)).collect();
        spans.push(span("timeline", "Get", 500, 2));
        let stats = span_breakdown(&spans);
        assert_eq!(stats.len(), 2);
        // Slowest p99 first.
        assert_eq!(stats[0].service, "timeline");
        assert_eq!(stats[0].errors, 1);
        let feed = &stats[1];
        assert_eq!(feed.count, 100);
        assert_eq!(feed.p50_ms, 50.0);
        assert_eq!(feed.p95_ms, 95.0);
        assert_eq!(feed.p99_ms, 99.0);
        assert_eq!(feed.max_ms, 100.0);
        assert!(span_breakdown(&[]).is_empty());
    }

    #[test]
    fn cumulative_cpu_becomes_cores_per_interval() {
        let s = 1_000_000_000u64;
        let cpu = [
            MetricPoint {
                time_unix_nano: 10 * s,
                value: 1.0,
            },
            MetricPoint {
                time_unix_nano: 15 * s,
                value: 3.5,
            },
            MetricPoint {
                time_unix_nano: 20 * s,
                value: 4.0,
            },
        ];
        let mem = [MetricPoint {
            time_unix_nano: 15 * s,
            value: 5e6,
        }];
        let rx = [
            MetricPoint {
                time_unix_nano: 10 * s,
                value: 0.0,
            },
            MetricPoint {
                time_unix_nano: 15 * s,
                value: 5_000.0,
            },
            MetricPoint {
                time_unix_nano: 20 * s,
                value: 5_000.0,
            },
        ];
        let stats = service_stats("feed".into(), 10 * s, &cpu, &mem, &rx, &[]);
        assert_eq!(stats.points.len(), 2);
        assert!((stats.points[0].cpu_cores - 0.5).abs() < 1e-9);
        assert!((stats.points[1].cpu_cores - 0.1).abs() < 1e-9);
        assert!((stats.max_cpu_cores - 0.5).abs() < 1e-9);
        assert!((stats.avg_cpu_cores - 0.3).abs() < 1e-9);
        assert_eq!(stats.points[0].t, 5.0);
        assert_eq!(stats.max_rss_bytes, 5_000_000);
        assert_eq!(stats.net_rx_bytes, 5_000);
        assert!((stats.points[0].net_rx_bytes_per_s - 1_000.0).abs() < 1e-9);
        assert_eq!(stats.points[1].net_rx_bytes_per_s, 0.0);
    }
}
