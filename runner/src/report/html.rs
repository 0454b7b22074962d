//! The HTML report, `index.html`: one self-contained file with inline CSS, inline SVG charts
//! drawn here in Rust, and a little inline JavaScript for hover tooltips. Users open it from
//! disk, often offline, so it references nothing outside itself.

use std::fmt::{self, Write};

use super::chart::{LineChart, Series};
use super::format::{self, Escape};
use super::tables;
use crate::summary::{Point, ServicePoint, ServiceStats, Summary, Verdict};

const STYLE: &str = include_str!("report.css");
const SCRIPT: &str = include_str!("tooltip.js");

/// Series colours, told apart by most colour-blind readers.
const PALETTE: [&str; 8] = [
    "#2f6fdf", "#d1242f", "#1a9850", "#e08a00", "#8250df", "#0e8a9e", "#d6409f", "#6e7781",
];

const MIB: f64 = 1024.0 * 1024.0;

/// Renders `summary` as one self-contained HTML5 document.
pub fn render(summary: &Summary) -> String {
    let mut out = String::with_capacity(64 * 1024);
    // fmt::Write into a String cannot fail; the Result exists only because the trait is generic.
    let _ = write_document(&mut out, summary);
    out
}

fn write_document(out: &mut String, s: &Summary) -> fmt::Result {
    let (_, verdict) = verdict_text(s.run.verdict);
    write!(
        out,
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<title>{scenario} · {verdict} · loadlab</title>
<style>
{STYLE}</style>
</head>
<body>
<main>
"#,
        scenario = Escape(&s.run.scenario),
    )?;
    write_header(out, s)?;
    write_charts(out, s)?;
    tables::write_thresholds(out, s)?;
    tables::write_endpoints(out, s)?;
    tables::write_metrics(out, s)?;
    tables::write_services(out, s)?;
    tables::write_spans(out, s)?;
    tables::write_traces(out, s)?;
    write!(
        out,
        r#"<footer>loadlab {version} · schema <code>{schema}</code> · the raw summary is embedded as <code>script#summary</code></footer>
</main>
"#,
        version = Escape(&s.run.version),
        schema = Escape(&s.schema),
    )?;
    write_embedded_json(out, s);
    write!(out, "<script>\n{SCRIPT}</script>\n</body>\n</html>\n")
}

fn verdict_text(verdict: Verdict) -> (&'static str, &'static str) {
    match verdict {
        Verdict::Pass => ("pass", "PASS"),
        Verdict::Fail => ("fail", "FAIL"),
    }
}

fn write_header(out: &mut String, s: &Summary) -> fmt::Result {
    let run = &s.run;
    let (verdict_class, verdict) = verdict_text(run.verdict);
    write!(
        out,
        r#"<header class="run">
<div>
<h1>loadlab report · {scenario}</h1>
<dl class="meta">
<dt>run</dt><dd><code>{id}</code></dd>
<dt>scenario</dt><dd>{scenario}</dd>
<dt>executor</dt><dd>{executor}</dd>
<dt>target</dt><dd>"#,
        scenario = Escape(&run.scenario),
        id = Escape(&run.id),
        executor = Escape(&run.executor),
    )?;
    if run.target.is_empty() {
        out.push('—');
    }
    for (i, (role, url)) in run.target.iter().enumerate() {
        let sep = if i > 0 { "<br>" } else { "" };
        write!(out, "{sep}{}: <code>{}</code>", Escape(role), Escape(url))?;
    }
    write!(
        out,
        r#"</dd>
<dt>started</dt><dd><time>{started}</time></dd>
<dt>ended</dt><dd><time>{ended}</time></dd>
<dt>duration</dt><dd>{duration}</dd>
<dt>workers</dt><dd>{workers}</dd>
<dt>generator</dt><dd>max CPU {cpu} cores · max scheduling lag {lag}</dd>
</dl>
</div>
<div>
<div class="verdict {verdict_class}" id="verdict">{verdict}</div>
"#,
        started = Escape(&run.started_at),
        ended = Escape(&run.ended_at),
        duration = format::duration(run.duration_s),
        workers = workers_text(run),
        cpu = format::number(run.generator.max_cpu_cores, 2),
        lag = format::ms(run.generator.max_scheduling_lag_ms),
    )?;
    if let Some(reason) = &run.reason {
        write!(
            out,
            r#"<p class="reason" id="reason">{}</p>"#,
            Escape(reason)
        )?;
    }
    out.push_str("</div>\n</header>\n");
    if run.generator.saturated {
        out.push_str(
            r#"<div class="banner" id="saturation" role="alert"><strong>⚠ The load generator saturated.</strong> For part of this run the generator, not the system under test, was the bottleneck: latency and throughput below describe the generator. Add workers or lower the load."#,
        );
        if let Some(note) = &run.generator.note {
            write!(out, r#"<br><span class="note">{}</span>"#, Escape(note))?;
        }
        out.push_str("</div>\n");
    }
    Ok(())
}

/// The worker count, and for distributed runs the start skew and any lost worker (escaped).
fn workers_text(run: &crate::summary::RunInfo) -> String {
    let mut text = run.workers.to_string();
    if let Some(d) = &run.distributed {
        if let Some(skew) = d.start_skew_ms {
            text.push_str(&format!(" · start skew {}", format::ms(skew)));
        }
        for lost in &d.lost_workers {
            text.push_str(&format!(
                " · <span class=\"lost\">lost worker {} at {}: {}</span>",
                lost.index,
                format::duration(lost.at_s),
                Escape(&lost.reason)
            ));
        }
        if run.degraded {
            text.push_str(" · degraded");
        }
    }
    text
}

fn write_charts(out: &mut String, s: &Summary) -> fmt::Result {
    out.push_str("<section id=\"charts\">\n<h2>Over time</h2>\n<div class=\"charts\">\n");
    for chart in charts(s) {
        write!(
            out,
            "<figure class=\"card\">\n<figcaption><h3>{}</h3></figcaption>\n",
            Escape(chart.title)
        )?;
        chart.render(out)?;
        out.push_str("\n</figure>\n");
    }
    out.push_str("</div>\n</section>\n");
    Ok(())
}

/// The six time charts, client-side first, then server-side per service.
fn charts(s: &Summary) -> Vec<LineChart<'static>> {
    let client = |name: &str, color, field: fn(&Point) -> f64| Series {
        name: name.to_owned(),
        color,
        dashed: false,
        points: s
            .timeseries
            .points
            .iter()
            .map(|p| (p.t, field(p)))
            .collect(),
    };
    let per_service = |field: fn(&ServicePoint) -> f64| -> Vec<Series> {
        s.server
            .services
            .iter()
            .zip(PALETTE.iter().cycle())
            .map(|(svc, &color)| service_series(svc, svc.name.clone(), color, false, field))
            .collect()
    };
    let network = s
        .server
        .services
        .iter()
        .zip(PALETTE.iter().cycle())
        .flat_map(|(svc, &color)| {
            [
                service_series(svc, format!("{} rx", svc.name), color, false, |p| {
                    p.net_rx_bytes_per_s
                }),
                service_series(svc, format!("{} tx", svc.name), color, true, |p| {
                    p.net_tx_bytes_per_s
                }),
            ]
        })
        .collect();
    vec![
        LineChart {
            key: "rps",
            title: "Requests and errors per second",
            y_unit: "req/s",
            series: vec![
                client("requests/s", PALETTE[0], |p| p.rps),
                client("errors/s", PALETTE[1], |p| p.errors_per_s),
            ],
        },
        LineChart {
            key: "latency",
            title: "Latency percentiles",
            y_unit: "ms",
            series: vec![
                client("p50", PALETTE[2], |p| p.p50_ms),
                client("p95", PALETTE[3], |p| p.p95_ms),
                client("p99", PALETTE[1], |p| p.p99_ms),
            ],
        },
        LineChart {
            key: "vus",
            title: "Virtual users and dropped iterations",
            y_unit: "count",
            // Counts are far below 2^53, where u64 → f64 would start to round.
            series: vec![
                client("VUs", PALETTE[4], |p| p.vus as f64),
                client("dropped iterations", PALETTE[1], |p| p.dropped as f64),
            ],
        },
        LineChart {
            key: "cpu",
            title: "CPU per service",
            y_unit: "cores",
            series: per_service(|p| p.cpu_cores),
        },
        LineChart {
            key: "memory",
            title: "Resident memory per service",
            y_unit: "MiB",
            series: per_service(|p| p.rss_bytes as f64 / MIB),
        },
        LineChart {
            key: "network",
            title: "Network per service",
            y_unit: "bytes/s",
            series: network,
        },
    ]
}

fn service_series(
    svc: &ServiceStats,
    name: String,
    color: &'static str,
    dashed: bool,
    field: fn(&ServicePoint) -> f64,
) -> Series {
    Series {
        name,
        color,
        dashed,
        points: svc.points.iter().map(|p| (p.t, field(p))).collect(),
    }
}

/// Embeds the summary for tools. Inside `<script>` only `</script` (and `<!--`) can break out,
/// so every `<` becomes the JSON escape `\u003c` — valid JSON, since `<` can only occur in strings.
fn write_embedded_json(out: &mut String, s: &Summary) {
    out.push_str("<script type=\"application/json\" id=\"summary\">");
    match serde_json::to_string(s) {
        Ok(json) => out.push_str(
            &json
                .replace('<', "\\u003c")
                .replace('>', "\\u003e")
                .replace('&', "\\u0026"),
        ),
        // Unreachable for these types (string map keys only); the report is still useful without it.
        Err(_) => out.push_str("null"),
    }
    out.push_str("</script>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::fixture::summary;
    use crate::summary::ServerStats;

    #[test]
    fn distributed_runs_show_skew_and_lost_workers_escaped() {
        let mut s = summary();
        s.run.workers = 3;
        s.run.degraded = true;
        s.run.distributed = Some(crate::summary::Distribution {
            start_skew_ms: Some(1.25),
            lost_workers: vec![crate::summary::LostWorker {
                index: 1,
                at_s: 2.5,
                reason: "<script>x</script>".into(),
            }],
            ..Default::default()
        });
        let html = render(&s);
        assert!(html.contains("start skew"), "skew shown");
        assert!(html.contains("lost worker 1"), "loss shown");
        assert!(html.contains("degraded"));
        assert!(!html.contains("<script>x</script>"), "reason escaped");
    }

    const CHARTS: [&str; 6] = ["rps", "latency", "vus", "cpu", "memory", "network"];

    /// The text of `<script type="application/json" id="summary">`.
    fn embedded_json(html: &str) -> &str {
        let start =
            html.find(r#"id="summary">"#).expect("embedded summary") + r#"id="summary">"#.len();
        let len = html[start..].find("</script>").expect("closing tag");
        &html[start..start + len]
    }

    #[test]
    fn script_in_user_text_comes_out_escaped() {
        let mut s = summary();
        s.endpoints[0].endpoint = "<script>alert(1)</script>".into();
        s.run.reason = Some("<img src=x onerror=alert(1)>".into());
        s.run.target.insert("<b>".into(), "\"><script>".into());
        let html = render(&s);
        assert!(!html.contains("<script>alert"));
        assert!(!html.contains("<img"));
        assert!(html.contains("&lt;b&gt;: <code>&quot;&gt;&lt;script&gt;</code>"));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("&lt;img src=x onerror=alert(1)&gt;"));
    }

    #[test]
    fn embedded_json_cannot_close_its_script() {
        let mut s = summary();
        s.endpoints[0].endpoint = "</script><script>alert(1)</script><!--".into();
        let html = render(&s);
        // Exactly two scripts: the JSON data and the tooltip code.
        assert_eq!(html.matches("</script>").count(), 2);
        assert!(!html.contains("<!--"));
        let json = embedded_json(&html);
        assert!(!json.contains('<'));
        let back: Summary = serde_json::from_str(json).expect("the embedded summary parses");
        assert_eq!(back.endpoints[0].endpoint, s.endpoints[0].endpoint);
        let original = serde_json::to_string(&s).expect("serialize");
        let value = |json: &str| serde_json::from_str::<serde_json::Value>(json).expect("JSON");
        assert_eq!(value(json), value(&original));
    }

    #[test]
    fn every_chart_is_present() {
        let html = render(&summary());
        for key in CHARTS {
            assert_eq!(
                html.matches(&format!(r#"<svg class="chart" data-chart="{key}""#))
                    .count(),
                1,
                "{key}"
            );
        }
        for series in [
            "requests/s",
            "errors/s",
            "p50",
            "p95",
            "p99",
            "VUs",
            "feed",
            "feed rx",
            "feed tx",
        ] {
            assert!(
                html.contains(&format!(r#"class="series" data-series="{series}""#)),
                "{series}"
            );
        }
        assert!(!html.contains("no data"));
    }

    #[test]
    fn empty_summary_renders_no_data_charts() {
        let mut s = summary();
        s.timeseries.points.clear();
        s.server = ServerStats::default();
        s.endpoints.clear();
        s.thresholds.clear();
        s.traces.clear();
        s.metrics.clear();
        let html = render(&s);
        for key in CHARTS {
            assert!(html.contains(&format!(r#"data-chart="{key}""#)), "{key}");
        }
        assert_eq!(html.matches(">no data</text>").count(), 6);
        assert!(!html.contains(r#"class="series""#));
    }

    #[test]
    fn saturation_banner_only_when_saturated() {
        let mut s = summary();
        assert!(!render(&s).contains(r#"id="saturation""#));
        s.run.generator.saturated = true;
        s.run.generator.note = Some("CPU at 98% for 12s".into());
        let html = render(&s);
        assert!(html.contains(r#"id="saturation""#));
        assert!(html.contains("CPU at 98% for 12s"));
    }

    #[test]
    fn references_nothing_outside_the_file() {
        let html = render(&summary());
        for needle in [" src=", "<link", "@import", "url(", "<iframe", "<img"] {
            assert!(!html.contains(needle), "{needle}");
        }
        // The only link is the trace viewer's, which the user configured.
        assert_eq!(html.matches("href=").count(), 1);
    }
}
