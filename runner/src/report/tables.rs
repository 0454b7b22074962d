//! The report's tables: thresholds, endpoints, k6-style metrics, services and slowest traces.

use std::fmt::{self, Write};

use super::format::{self, Escape};
use crate::summary::{Metric, MetricType, Summary};

pub(super) fn write_thresholds(out: &mut String, s: &Summary) -> fmt::Result {
    out.push_str("<section id=\"thresholds\">\n<h2>Thresholds</h2>\n");
    if s.thresholds.is_empty() {
        out.push_str("<p class=\"muted\">No thresholds were set.</p>\n</section>\n");
        return Ok(());
    }
    out.push_str(
        r#"<div class="table-wrap"><table class="thresholds"><thead><tr><th>metric</th><th>expression</th><th class="num">actual</th><th>result</th></tr></thead><tbody>
"#,
    );
    for t in &s.thresholds {
        let (class, result) = if t.ok {
            ("ok", "✓ ok")
        } else {
            ("failed", "✗ failed")
        };
        let actual = t.actual.map_or_else(
            || "no samples".to_owned(),
            |v| threshold_actual(s, &t.metric, &t.expr, v),
        );
        writeln!(
            out,
            r#"<tr class="{class}"><td><code>{metric}</code></td><td><code>{expr}</code></td><td class="num">{actual}</td><td class="status">{result}</td></tr>"#,
            metric = Escape(&t.metric),
            expr = Escape(&t.expr),
        )?;
    }
    out.push_str("</tbody></table></div>\n</section>\n");
    Ok(())
}

/// A threshold's measured value, in milliseconds when its metric holds times.
fn threshold_actual(s: &Summary, metric: &str, expr: &str, v: f64) -> String {
    let base = metric.split('{').next().unwrap_or(metric);
    let is_time = s
        .metrics
        .get(metric)
        .or_else(|| s.metrics.get(base))
        .is_some_and(|m| m.contains == "time");
    // `count` and `rate` of a time trend are not times.
    if is_time && !expr.starts_with("count") && !expr.starts_with("rate") {
        format::ms(v)
    } else {
        format::auto(v)
    }
}

pub(super) fn write_endpoints(out: &mut String, s: &Summary) -> fmt::Result {
    out.push_str("<section id=\"endpoints\">\n<h2>Endpoints</h2>\n");
    if s.endpoints.is_empty() {
        out.push_str("<p class=\"muted\">No requests were recorded.</p>\n</section>\n");
        return Ok(());
    }
    out.push_str(
        r#"<div class="table-wrap"><table class="endpoints"><thead><tr><th>scenario</th><th>endpoint</th><th class="num">requests</th><th class="num">failed</th><th class="num">rate</th><th class="num">avg</th><th class="num">p50</th><th class="num">p95</th><th class="num">p99</th><th class="num">max</th><th>statuses</th></tr></thead><tbody>
"#,
    );
    for e in &s.endpoints {
        let failed = if e.failed == 0 {
            "0".to_owned()
        } else {
            // requests > 0 whenever failed > 0; max(1) only keeps a corrupt summary from dividing by zero.
            let share = e.failed as f64 / e.requests.max(1) as f64;
            format!(
                r#"<span class="bad">{} ({})</span>"#,
                format::count(e.failed),
                format::percent(share)
            )
        };
        write!(
            out,
            r#"<tr><td>{scenario}</td><td><code>{endpoint}</code></td><td class="num">{requests}</td><td class="num">{failed}</td><td class="num">{rps} req/s</td><td class="num">{avg}</td><td class="num">{p50}</td><td class="num">{p95}</td><td class="num">{p99}</td><td class="num">{max}</td><td>"#,
            scenario = Escape(&e.scenario),
            endpoint = Escape(&e.endpoint),
            requests = format::count(e.requests),
            rps = format::auto(e.rps),
            avg = format::ms(e.avg_ms),
            p50 = format::ms(e.p50_ms),
            p95 = format::ms(e.p95_ms),
            p99 = format::ms(e.p99_ms),
            max = format::ms(e.max_ms),
        )?;
        for (status, n) in &e.statuses {
            let (class, label) = match status.as_bytes().first() {
                Some(b'2') => ("s2xx", status.as_str()),
                Some(b'3') => ("s3xx", status.as_str()),
                // "0" stands for transport errors (no response at all).
                _ if status == "0" => ("err", "transport error"),
                _ => ("err", status.as_str()),
            };
            write!(
                out,
                r#"<span class="status-code {class}"><b>{}</b> {}</span>"#,
                Escape(label),
                format::count(*n)
            )?;
        }
        out.push_str("</td></tr>\n");
    }
    out.push_str("</tbody></table></div>\n</section>\n");
    Ok(())
}

pub(super) fn write_metrics(out: &mut String, s: &Summary) -> fmt::Result {
    out.push_str("<section id=\"metrics\">\n<h2>Metrics</h2>\n");
    if s.metrics.is_empty() {
        out.push_str("<p class=\"muted\">No metrics were recorded.</p>\n</section>\n");
        return Ok(());
    }
    out.push_str(
        r#"<div class="table-wrap"><table class="metrics"><thead><tr><th>metric</th><th>type</th><th>values</th></tr></thead><tbody>
"#,
    );
    for (name, metric) in &s.metrics {
        // Tagged sub-metrics (`name{tag:value}`) sort right after their parent; indent them.
        let class = if name.contains('{') {
            r#" class="sub""#
        } else {
            ""
        };
        write!(
            out,
            r#"<tr{class}><td><code>{name}</code></td><td>{kind}</td><td>"#,
            name = Escape(name),
            kind = metric_kind(metric.kind),
        )?;
        let mut values: Vec<_> = metric.values.iter().collect();
        values.sort_by_key(|(key, _)| (value_rank(key), key.as_str()));
        for (key, &v) in values {
            write!(
                out,
                r#"<span class="kv"><b>{}</b>{}</span>"#,
                Escape(key),
                metric_value(metric, key, v)
            )?;
        }
        out.push_str("</td></tr>\n");
    }
    out.push_str("</tbody></table></div>\n</section>\n");
    Ok(())
}

fn metric_kind(kind: MetricType) -> &'static str {
    match kind {
        MetricType::Counter => "counter",
        MetricType::Gauge => "gauge",
        MetricType::Rate => "rate",
        MetricType::Trend => "trend",
    }
}

/// k6's order for aggregates; anything else follows alphabetically.
fn value_rank(key: &str) -> usize {
    const ORDER: [&str; 12] = [
        "avg", "min", "med", "max", "p(90)", "p(95)", "p(99)", "value", "count", "rate", "passes",
        "fails",
    ];
    ORDER.iter().position(|k| *k == key).unwrap_or(ORDER.len())
}

fn metric_value(metric: &Metric, key: &str, v: f64) -> String {
    let in_unit = |v| match metric.contains.as_str() {
        "time" => format::ms(v),
        "data" => format::bytes(v),
        _ => format::auto(v),
    };
    match (metric.kind, key) {
        (MetricType::Rate, "rate") => format::percent(v),
        (MetricType::Counter, "rate") => format!("{}/s", in_unit(v)),
        (MetricType::Counter, "count") => in_unit(v),
        (_, "count" | "passes" | "fails") => format::auto(v),
        _ => in_unit(v),
    }
}

pub(super) fn write_services(out: &mut String, s: &Summary) -> fmt::Result {
    out.push_str("<section id=\"services\">\n<h2>Services</h2>\n");
    if s.server.services.is_empty() {
        out.push_str("<p class=\"muted\">No server-side figures were collected.</p>\n</section>\n");
        return Ok(());
    }
    if !s.server.source.is_empty() {
        writeln!(
            out,
            r#"<p class="muted">source: <code>{}</code></p>"#,
            Escape(&s.server.source)
        )?;
    }
    out.push_str(
        r#"<div class="table-wrap"><table class="services"><thead><tr><th>service</th><th class="num">avg CPU</th><th class="num">max CPU</th><th class="num">max RSS</th><th class="num">net rx</th><th class="num">net tx</th></tr></thead><tbody>
"#,
    );
    for svc in &s.server.services {
        writeln!(
            out,
            r#"<tr><td>{name}</td><td class="num">{avg} cores</td><td class="num">{max} cores</td><td class="num">{rss}</td><td class="num">{rx}</td><td class="num">{tx}</td></tr>"#,
            name = Escape(&svc.name),
            avg = format::number(svc.avg_cpu_cores, 2),
            max = format::number(svc.max_cpu_cores, 2),
            rss = format::bytes(svc.max_rss_bytes as f64),
            rx = format::bytes(svc.net_rx_bytes as f64),
            tx = format::bytes(svc.net_tx_bytes as f64),
        )?;
    }
    out.push_str("</tbody></table></div>\n</section>\n");
    Ok(())
}

/// The per-service span breakdown of the sampled traces, slowest p99 first.
pub(super) fn write_spans(out: &mut String, s: &Summary) -> fmt::Result {
    if s.server.spans.is_empty() {
        return Ok(());
    }
    out.push_str(
        r#"<section id="spans">
<h2>Where the time goes (sampled traces)</h2>
<div class="table-wrap"><table class="spans"><thead><tr><th>service</th><th>span</th><th class="num">count</th><th class="num">p50</th><th class="num">p95</th><th class="num">p99</th><th class="num">max</th><th class="num">errors</th></tr></thead><tbody>
"#,
    );
    for row in &s.server.spans {
        writeln!(
            out,
            r#"<tr><td>{service}</td><td><code>{name}</code></td><td class="num">{count}</td><td class="num">{p50}</td><td class="num">{p95}</td><td class="num">{p99}</td><td class="num">{max}</td><td class="num">{errors}</td></tr>"#,
            service = Escape(&row.service),
            name = Escape(&row.name),
            count = row.count,
            p50 = format::ms(row.p50_ms),
            p95 = format::ms(row.p95_ms),
            p99 = format::ms(row.p99_ms),
            max = format::ms(row.max_ms),
            errors = row.errors,
        )?;
    }
    out.push_str(
        "</tbody></table></div>
</section>
",
    );
    Ok(())
}

pub(super) fn write_traces(out: &mut String, s: &Summary) -> fmt::Result {
    out.push_str("<section id=\"traces\">\n<h2>Slowest traces</h2>\n");
    if s.traces.is_empty() {
        out.push_str("<p class=\"muted\">No traces were sampled.</p>\n</section>\n");
        return Ok(());
    }
    out.push_str(
        r#"<div class="table-wrap"><table class="traces"><thead><tr><th class="num">at</th><th>endpoint</th><th class="num">duration</th><th>trace id</th><th>trace</th></tr></thead><tbody>
"#,
    );
    for t in &s.traces {
        write!(
            out,
            r#"<tr><td class="num">{at}</td><td><code>{endpoint}</code></td><td class="num">{duration}</td><td class="id">{id}</td><td>"#,
            at = format::duration(t.t),
            endpoint = Escape(&t.endpoint),
            duration = format::ms(t.duration_ms),
            id = Escape(&t.trace_id),
        )?;
        match t.url.as_deref() {
            Some(url) if is_web_url(url) => write!(
                out,
                r#"<a href="{}" target="_blank" rel="noopener noreferrer">open</a>"#,
                Escape(url)
            )?,
            // Anything else (javascript:, data:…) is shown, never made clickable.
            Some(url) => write!(out, "<code>{}</code>", Escape(url))?,
            None => out.push('—'),
        }
        out.push_str("</td></tr>\n");
    }
    out.push_str("</tbody></table></div>\n</section>\n");
    Ok(())
}

fn is_web_url(url: &str) -> bool {
    let url = url.trim_start();
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::fixture::summary;
    use crate::report::html::render;

    #[test]
    fn span_breakdown_is_a_table_only_when_there_are_spans() {
        let html = render(&summary());
        assert!(html.contains(r#"<section id="spans">"#));
        assert!(html.contains("<code>loadlab.timeline.v1.TimelineService/Get</code>"));
        let mut s = summary();
        s.server.spans.clear();
        assert!(!render(&s).contains(r#"<section id="spans">"#));
    }

    #[test]
    fn failing_threshold_is_styled_failed() {
        let html = render(&summary());
        let failed = html
            .split(r#"<tr class="failed">"#)
            .nth(1)
            .expect("a failed row");
        let row = failed.split("</tr>").next().expect("row end");
        assert!(
            row.contains("p(95)&lt;15") && row.contains("20 ms") && row.contains("failed"),
            "{row}"
        );
        let ok = html
            .split(r#"<tr class="ok">"#)
            .nth(1)
            .expect("a passing row");
        assert!(
            ok.split("</tr>")
                .next()
                .expect("row end")
                .contains("rate&lt;0.05")
        );
        assert!(html.contains(r#"<div class="verdict fail" id="verdict">FAIL</div>"#));
    }

    #[test]
    fn numbers_are_readable() {
        let html = render(&summary());
        assert!(html.contains("12.3 ms"));
        assert!(html.contains("1,234.5 ms"));
        assert!(html.contains("1.23%"));
        assert!(html.contains("64.0 MiB"));
        assert!(html.contains(r#"<b>transport error</b> 12"#));
    }

    #[test]
    fn only_web_trace_urls_become_links() {
        let mut s = summary();
        s.traces[0].url = Some("javascript:alert(1)".into());
        let html = render(&s);
        assert!(!html.contains("href="));
        assert!(html.contains("<code>javascript:alert(1)</code>"));
        assert!(is_web_url("HTTPS://jaeger.example/trace/1"));
        assert!(!is_web_url("data:text/html,hi"));
        assert!(!is_web_url("http"));
    }
}
