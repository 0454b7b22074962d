//! Renders a realistic summary to `index.html` and opens it in headless Chromium: the DOM must
//! hold every chart with real paths, and a screenshot must show more than a blank page.
//! Needs Debian's `chromium` (scripts/test installs it); without it these tests fail.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use loadlab::report::html;
use loadlab::summary::{
    EndpointStats, GeneratorHealth, Metric, MetricType, Point, RunInfo, SCHEMA, ServerStats,
    ServicePoint, ServiceStats, Summary, ThresholdResult, Timeseries, TraceRef, Verdict,
};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHARTS: [&str; 6] = ["rps", "latency", "vus", "cpu", "memory", "network"];
/// Chromium can hang on a broken environment; a test should fail instead.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(120);

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!(
            "loadlab-{label}-{}-{nanos}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// 60 one-second intervals of a run that ramps up, hits a latency knee and sheds errors.
fn realistic_summary() -> Summary {
    let points: Vec<Point> = (1..=60u32)
        .map(|i| {
            let t = f64::from(i);
            let wave = (t / 6.0).sin();
            let knee = if i > 40 { f64::from(i - 40) * 4.0 } else { 0.0 };
            Point {
                t,
                rps: (t * 25.0).min(1200.0) + wave * 40.0,
                errors_per_s: if i > 40 { f64::from(i - 40) * 1.5 } else { 0.0 },
                p50_ms: 8.0 + wave * 1.5 + knee * 0.3,
                p95_ms: 22.0 + wave * 4.0 + knee,
                p99_ms: 41.0 + wave * 6.0 + knee * 2.0,
                vus: u64::from(i.min(50)) * 2,
                dropped: u64::from(i.saturating_sub(45)),
                sent_bytes_per_s: 120_000.0 + wave * 10_000.0,
                received_bytes_per_s: 900_000.0 + wave * 50_000.0,
            }
        })
        .collect();
    let service = |name: &str, cpu: f64, rss_mib: u64| {
        let points: Vec<ServicePoint> = (1..=60u32)
            .map(|i| {
                let t = f64::from(i);
                let load = (t / 60.0).min(1.0);
                ServicePoint {
                    t,
                    cpu_cores: cpu * load + (t / 4.0).sin().abs() * 0.1,
                    rss_bytes: (rss_mib + u64::from(i)) << 20,
                    net_rx_bytes_per_s: 250_000.0 * cpu * load + (t / 3.0).cos() * 20_000.0,
                    net_tx_bytes_per_s: 800_000.0 * cpu * load,
                }
            })
            .collect();
        ServiceStats {
            name: name.to_owned(),
            avg_cpu_cores: cpu / 2.0,
            max_cpu_cores: cpu + 0.1,
            max_rss_bytes: (rss_mib + 60) << 20,
            net_rx_bytes: 12 << 20,
            net_tx_bytes: 40 << 20,
            points,
        }
    };
    let endpoint = |name: &str, requests: u64, failed: u64, p95: f64| EndpointStats {
        scenario: "feed-read".into(),
        endpoint: name.into(),
        requests,
        failed,
        rps: requests as f64 / 60.0,
        avg_ms: p95 / 2.5,
        p50_ms: p95 / 3.0,
        p95_ms: p95,
        p99_ms: p95 * 1.8,
        max_ms: p95 * 6.0,
        statuses: BTreeMap::from([
            ("200".to_owned(), requests - failed),
            ("503".to_owned(), failed),
        ]),
    };
    let trend = |avg: f64, p95: f64| Metric {
        kind: MetricType::Trend,
        contains: "time".into(),
        values: BTreeMap::from(
            [
                ("avg", avg),
                ("min", 1.2),
                ("med", avg * 0.8),
                ("max", p95 * 6.0),
                ("p(90)", p95 * 0.9),
                ("p(95)", p95),
            ]
            .map(|(k, v)| (k.to_owned(), v)),
        ),
    };
    Summary {
        schema: SCHEMA.into(),
        run: RunInfo {
            id: "01J9ZQ4KD2".into(),
            scenario: "feed-read".into(),
            executor: "ramping-arrival-rate".into(),
            target: BTreeMap::from([
                ("feed".to_owned(), "http://127.0.0.1:8080".to_owned()),
                ("timeline".to_owned(), "http://127.0.0.1:8081".to_owned()),
            ]),
            started_at: "2025-06-01T12:00:00Z".into(),
            ended_at: "2025-06-01T12:01:00Z".into(),
            duration_s: 60.0,
            workers: 2,
            interrupted_iterations: 0,
            generator: GeneratorHealth {
                saturated: true,
                max_cpu_cores: 3.96,
                max_scheduling_lag_ms: 48.5,
                note: Some("generator CPU above 95% for 14 s; scheduling lag up to 48.5 ms".into()),
            },
            verdict: Verdict::Fail,
            reason: Some("threshold http_req_duration p(95)<50 failed (actual 98.0)".into()),
            version: "0.1.0".into(),
            degraded: false,
            distributed: None,
        },
        metrics: BTreeMap::from([
            ("http_req_duration".to_owned(), trend(18.0, 98.0)),
            (
                "http_req_duration{scenario:feed-read}".to_owned(),
                trend(18.0, 98.0),
            ),
            (
                "http_reqs".to_owned(),
                Metric {
                    kind: MetricType::Counter,
                    contains: "default".into(),
                    values: BTreeMap::from([
                        ("count".to_owned(), 61_234.0),
                        ("rate".to_owned(), 1020.6),
                    ]),
                },
            ),
            (
                "http_req_failed".to_owned(),
                Metric {
                    kind: MetricType::Rate,
                    contains: "default".into(),
                    values: BTreeMap::from([
                        ("rate".to_owned(), 0.0049),
                        ("passes".to_owned(), 300.0),
                        ("fails".to_owned(), 60_934.0),
                    ]),
                },
            ),
        ]),
        thresholds: vec![
            ThresholdResult {
                metric: "http_req_duration".into(),
                expr: "p(95)<50".into(),
                ok: false,
                actual: Some(98.0),
            },
            ThresholdResult {
                metric: "http_req_failed".into(),
                expr: "rate<0.01".into(),
                ok: true,
                actual: Some(0.0049),
            },
        ],
        endpoints: vec![
            endpoint("GET /v1/users/{id}/timeline", 40_000, 200, 98.0),
            endpoint("POST /v1/posts", 15_000, 100, 60.0),
            // User-controlled text: must come out as text, not markup.
            endpoint("GET /v1/search?q=<b>bold</b>", 6_234, 0, 30.0),
        ],
        timeseries: Timeseries {
            interval_s: 1.0,
            points,
        },
        server: ServerStats {
            source: "proc".into(),
            services: vec![service("feed", 1.6, 180), service("timeline", 0.9, 95)],
            spans: Vec::new(),
        },
        traces: vec![
            TraceRef {
                t: 52.0,
                endpoint: "GET /v1/users/{id}/timeline".into(),
                duration_ms: 612.0,
                trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
                url: Some("http://127.0.0.1:16686/trace/4bf92f3577b34da6a3ce929d0e0e4736".into()),
            },
            TraceRef {
                t: 47.0,
                endpoint: "POST /v1/posts".into(),
                duration_ms: 420.5,
                trace_id: "00f067aa0ba902b7a3ce929d0e0e4736".into(),
                url: None,
            },
        ],
    }
}

/// Fails (never skips) without Chromium: a report nobody checked in a browser is untested.
fn chromium() -> &'static str {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: these tests open the report in headless Chromium. Install Debian's \
         chromium package (`apt-get install -y chromium`, as root) or run scripts/test, which does."
    );
    CHROMIUM
}

/// Runs headless Chromium on `page` with `extra` flags and returns its stdout.
fn run_chromium(page: &Path, extra: &[&str]) -> String {
    let dir = TempDir::new("chromium");
    let (stdout_path, stderr_path) = (dir.0.join("stdout"), dir.0.join("stderr"));
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.0.join("profile").display()
        ))
        .args(extra)
        .arg(format!("file://{}", page.display()))
        // Files, not pipes: a DOM dump can outgrow a pipe buffer while we wait for the exit.
        .stdout(File::create(&stdout_path).expect("stdout file"))
        .stderr(File::create(&stderr_path).expect("stderr file"))
        .stdin(Stdio::null())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + CHROMIUM_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium did not finish within {CHROMIUM_TIMEOUT:?} on {}",
                page.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = fs::read_to_string(&stdout_path).expect("read chromium stdout");
    assert!(
        status.success(),
        "chromium failed ({status}) on {}:\n{}",
        page.display(),
        fs::read_to_string(&stderr_path).unwrap_or_default()
    );
    stdout
}

/// Writes the realistic report into `dir` and returns the path of `index.html`.
fn write_report(dir: &TempDir) -> PathBuf {
    let path = dir.0.join("index.html");
    fs::write(&path, html::render(&realistic_summary())).expect("write index.html");
    path
}

/// The value of `attr` in the first tag of `tag`, e.g. `d` of `<path …>`.
fn attribute<'a>(tag: &'a str, attr: &str) -> Option<&'a str> {
    let needle = format!(" {attr}=\"");
    let start = tag.find(&needle)? + needle.len();
    tag[start..].split('"').next()
}

#[test]
fn report_renders_every_chart_in_chromium() {
    let dir = TempDir::new("report-dom");
    let dom = run_chromium(&write_report(&dir), &["--dump-dom"]);

    for key in CHARTS {
        let open = format!(r#"<svg class="chart" data-chart="{key}""#);
        let start = dom
            .find(&open)
            .unwrap_or_else(|| panic!("no {key} chart in the DOM"));
        let svg = &dom[start..start + dom[start..].find("</svg>").expect("</svg>")];
        let paths: Vec<&str> = svg
            .split("<path ")
            .skip(1)
            .filter_map(|tag| tag.split('>').next())
            .filter(|tag| tag.contains(r#"class="series""#))
            .collect();
        assert!(!paths.is_empty(), "{key}: no path.series");
        for tag in &paths {
            let d = attribute(tag, "d").unwrap_or_else(|| panic!("{key}: a series without d"));
            let points = d.matches(['M', 'L']).count();
            assert!(
                points >= 50,
                "{key}: a series has only {points} points: {d}"
            );
            assert!(!d.contains("NaN"), "{key}: {d}");
        }
        assert!(!svg.contains("no data"), "{key} says no data");
    }
    assert_eq!(dom.matches(r#"data-chart="network""#).count(), 1);
    assert!(dom.contains(r#"data-series="timeline tx""#));

    assert!(dom.contains(r#"id="verdict">FAIL<"#), "no FAIL badge");
    assert!(dom.contains(r#"id="saturation""#), "no saturation banner");
    assert!(dom.contains("scheduling lag up to 48.5 ms"));
    assert!(
        dom.contains(r#"<tr class="failed">"#),
        "the failing threshold is not styled failed"
    );
    assert!(
        dom.contains("q=&lt;b&gt;bold&lt;/b&gt;"),
        "endpoint text was not escaped"
    );
    // The tooltip script marks the document once it ran to the end without throwing.
    assert!(
        dom.contains(r#"<html lang="en" class="js">"#),
        "the inline script did not run"
    );

    let start = dom.find(r#"id="summary">"#).expect("embedded summary") + r#"id="summary">"#.len();
    let json = &dom[start..start + dom[start..].find("</script>").expect("</script>")];
    serde_json::from_str::<Summary>(json).expect("the embedded summary is a Summary");
    // Compared as JSON values: serde_json's default float parsing may differ from the original
    // in the last bit, but both sides go through the same parser here.
    let embedded: serde_json::Value = serde_json::from_str(json).expect("embedded JSON");
    let expected = serde_json::to_string(&realistic_summary()).expect("serialize");
    let expected: serde_json::Value = serde_json::from_str(&expected).expect("reparse");
    assert!(
        embedded == expected,
        "the embedded summary differs from the rendered one"
    );
}

#[test]
fn report_screenshot_in_chromium_is_not_blank() {
    let dir = TempDir::new("report-shot");
    let report = write_report(&dir);
    let blank = dir.0.join("blank.html");
    fs::write(
        &blank,
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"></head><body></body></html>",
    )
    .expect("write blank page");

    let shoot = |page: &Path, name: &str| {
        let png = dir.0.join(name);
        run_chromium(
            page,
            &[
                &format!("--screenshot={}", png.display()),
                "--window-size=1280,2400",
            ],
        );
        let bytes =
            fs::read(&png).unwrap_or_else(|e| panic!("no screenshot {}: {e}", png.display()));
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{name} is not a PNG"
        );
        // IHDR: width and height, big-endian, right after the signature and chunk header.
        let size = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        assert_eq!(
            (size(16), size(20)),
            (1280, 2400),
            "{name} has the wrong size"
        );
        bytes.len()
    };
    let blank_len = shoot(&blank, "blank.png");
    let report_len = shoot(&report, "shot.png");
    // A blank page compresses to a few KB at most; charts, text and tables are far richer.
    assert!(
        report_len > 40_000,
        "the report screenshot is only {report_len} bytes"
    );
    assert!(
        report_len > blank_len * 5,
        "the report screenshot ({report_len} bytes) is hardly bigger than a blank page's ({blank_len})"
    );
}
