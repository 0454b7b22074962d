//! A small summary shared by the report's unit tests.

use std::collections::BTreeMap;

use crate::summary::{
    EndpointStats, GeneratorHealth, Metric, MetricType, Point, RunInfo, ServerStats, ServicePoint,
    ServiceStats, Summary, ThresholdResult, Timeseries, TraceRef, Verdict,
};

/// A small but complete summary: 10 points, one service, one endpoint, two thresholds (one
/// failing), one trace.
pub fn summary() -> Summary {
    let points = (1..=10)
        .map(|t| Point {
            t: f64::from(t),
            rps: 100.0 + f64::from(t),
            errors_per_s: f64::from(t % 3),
            p50_ms: 10.0,
            p95_ms: 20.0,
            p99_ms: 30.0,
            vus: 10,
            dropped: 0,
            ..Point::default()
        })
        .collect();
    let service = ServiceStats {
        name: "feed".into(),
        avg_cpu_cores: 0.5,
        max_cpu_cores: 0.9,
        max_rss_bytes: 64 << 20,
        net_rx_bytes: 1 << 20,
        net_tx_bytes: 2 << 20,
        points: (1..=10)
            .map(|t| ServicePoint {
                t: f64::from(t),
                cpu_cores: 0.5,
                rss_bytes: 64 << 20,
                net_rx_bytes_per_s: 1000.0,
                net_tx_bytes_per_s: 2000.0,
            })
            .collect(),
    };
    let mut metrics = BTreeMap::new();
    metrics.insert(
        "http_req_duration".to_owned(),
        Metric {
            kind: MetricType::Trend,
            contains: "time".into(),
            values: [("avg", 12.34), ("p(95)", 20.0), ("max", 1234.5)]
                .map(|(k, v)| (k.to_owned(), v))
                .into(),
        },
    );
    metrics.insert(
        "http_req_failed".to_owned(),
        Metric {
            kind: MetricType::Rate,
            contains: "default".into(),
            values: [("rate", 0.0123), ("passes", 12.0), ("fails", 988.0)]
                .map(|(k, v)| (k.to_owned(), v))
                .into(),
        },
    );
    Summary {
        schema: crate::summary::SCHEMA.into(),
        run: RunInfo {
            id: "run-1".into(),
            scenario: "feed-read".into(),
            executor: "constant-arrival-rate".into(),
            target: [("feed".to_owned(), "http://127.0.0.1:8080".to_owned())].into(),
            started_at: "2025-01-01T00:00:00Z".into(),
            ended_at: "2025-01-01T00:00:10Z".into(),
            duration_s: 10.0,
            workers: 1,
            interrupted_iterations: 0,
            generator: GeneratorHealth {
                saturated: false,
                max_cpu_cores: 0.4,
                max_scheduling_lag_ms: 1.2,
                note: None,
            },
            verdict: Verdict::Fail,
            reason: Some("threshold http_req_duration p(95)<15 failed".into()),
            version: "0.1.0".into(),
            degraded: false,
            distributed: None,
        },
        metrics,
        thresholds: vec![
            ThresholdResult {
                metric: "http_req_duration".into(),
                expr: "p(95)<15".into(),
                ok: false,
                actual: Some(20.0),
            },
            ThresholdResult {
                metric: "http_req_failed".into(),
                expr: "rate<0.05".into(),
                ok: true,
                actual: Some(0.0123),
            },
        ],
        endpoints: vec![EndpointStats {
            scenario: "feed-read".into(),
            endpoint: "GET /v1/users/{id}/timeline".into(),
            requests: 1000,
            failed: 12,
            rps: 100.0,
            avg_ms: 12.34,
            p50_ms: 10.0,
            p95_ms: 20.0,
            p99_ms: 30.0,
            max_ms: 1234.5,
            statuses: [("200".to_owned(), 988), ("0".to_owned(), 12)].into(),
        }],
        timeseries: Timeseries {
            interval_s: 1.0,
            points,
        },
        server: ServerStats {
            source: "proc".into(),
            services: vec![service],
            spans: vec![crate::summary::SpanStats {
                service: "timeline".into(),
                name: "loadlab.timeline.v1.TimelineService/Get".into(),
                count: 120,
                p50_ms: 1.2,
                p95_ms: 4.5,
                p99_ms: 9.75,
                max_ms: 21.0,
                errors: 1,
            }],
        },
        traces: vec![TraceRef {
            t: 3.0,
            endpoint: "GET /v1/users/{id}/timeline".into(),
            duration_ms: 1234.5,
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            url: Some("http://127.0.0.1:16686/trace/4bf92f3577b34da6a3ce929d0e0e4736".into()),
        }],
    }
}
