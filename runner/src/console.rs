//! The end-of-test summary printed to the terminal (k6-like).

use std::fmt::Write as _;

use crate::summary::{MetricType, Summary, Verdict};

/// Renders the terminal summary.
pub fn render(summary: &Summary) -> String {
    let mut out = String::new();
    let r = &summary.run;
    let verdict = match r.verdict {
        Verdict::Pass => "✓ PASS",
        Verdict::Fail => "✗ FAIL",
    };
    let _ = writeln!(
        out,
        "\n  {}  ·  {}  ·  {:.1}s  ·  {} worker{}    {verdict}",
        r.scenario,
        r.executor,
        r.duration_s,
        r.workers,
        if r.workers == 1 { "" } else { "s" }
    );
    for (role, url) in &r.target {
        let _ = writeln!(out, "  target {role}: {url}");
    }
    if let Some(reason) = &r.reason {
        let _ = writeln!(out, "  reason: {reason}");
    }
    if let Some(d) = &r.distributed {
        if let Some(skew) = d.start_skew_ms {
            let _ = writeln!(out, "  start skew across workers: {skew:.2} ms");
        }
        for lost in &d.lost_workers {
            let _ = writeln!(
                out,
                "  ⚠ lost worker {} at {:.1}s: {}",
                lost.index, lost.at_s, lost.reason
            );
        }
    }
    if let Some(note) = &r.generator.note {
        let _ = writeln!(out, "  ⚠ {note}");
    }
    if !summary.thresholds.is_empty() {
        let _ = writeln!(out, "\n  thresholds");
        for t in &summary.thresholds {
            let actual = t
                .actual
                .map_or_else(|| "no data".to_owned(), |a| format!("{a:.3}"));
            let _ = writeln!(
                out,
                "    {} {}{actual}",
                if t.ok { "✓" } else { "✗" },
                dots(&format!("{} {}", t.metric, t.expr), 50),
            );
        }
    }
    let _ = writeln!(out);
    for (name, m) in &summary.metrics {
        let v = |k: &str| m.values.get(k).copied().unwrap_or(0.0);
        let line = match m.kind {
            MetricType::Trend => format!(
                "avg={} min={} med={} max={} p(90)={} p(95)={} p(99)={}",
                ms(v("avg")),
                ms(v("min")),
                ms(v("med")),
                ms(v("max")),
                ms(v("p(90)")),
                ms(v("p(95)")),
                ms(v("p(99)"))
            ),
            MetricType::Counter if m.contains == "data" => {
                format!("{} {}/s", bytes(v("count")), bytes(v("rate")))
            }
            MetricType::Counter => format!("{} {:.1}/s", v("count"), v("rate")),
            MetricType::Rate => format!(
                "{:.2}% ✓ {} ✗ {}",
                v("rate") * 100.0,
                v("passes"),
                v("fails")
            ),
            MetricType::Gauge => format!("{} min={} max={}", v("value"), v("min"), v("max")),
        };
        let _ = writeln!(out, "  {}: {line}", dots(name, 34).trim_end_matches(' '));
    }
    if !summary.endpoints.is_empty() {
        let _ = writeln!(
            out,
            "\n  {:<36} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9}",
            "endpoint", "requests", "failed", "req/s", "p50 ms", "p95 ms", "p99 ms"
        );
        for e in &summary.endpoints {
            let _ = writeln!(
                out,
                "  {:<36} {:>9} {:>7} {:>9.1} {:>9.2} {:>9.2} {:>9.2}",
                truncate(&e.endpoint, 36),
                e.requests,
                e.failed,
                e.rps,
                e.p50_ms,
                e.p95_ms,
                e.p99_ms
            );
        }
    }
    if !summary.server.services.is_empty() {
        let _ = writeln!(
            out,
            "\n  {:<20} {:>10} {:>10} {:>12}",
            "service", "avg CPU", "max CPU", "max RSS"
        );
        for s in &summary.server.services {
            let _ = writeln!(
                out,
                "  {:<20} {:>10.2} {:>10.2} {:>9.1} MiB",
                truncate(&s.name, 20),
                s.avg_cpu_cores,
                s.max_cpu_cores,
                s.max_rss_bytes as f64 / 1_048_576.0
            );
        }
    }
    out
}

fn dots(label: &str, width: usize) -> String {
    let n = width.saturating_sub(label.chars().count());
    format!("{label}{} ", ".".repeat(n))
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}

fn ms(v: f64) -> String {
    if v >= 1_000.0 {
        format!("{:.2}s", v / 1_000.0)
    } else {
        format!("{v:.2}ms")
    }
}

fn bytes(v: f64) -> String {
    const UNITS: [&str; 4] = ["B", "kB", "MB", "GB"];
    let mut v = v;
    let mut unit = 0;
    while v >= 1_000.0 && unit < UNITS.len() - 1 {
        v /= 1_000.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}
