//! Bad load test files get a precise error naming the field.

use loadlab::spec::LoadTestSpec;

const GOOD: &str = r#"
apiVersion: loadlab.dev/v1alpha1
kind: LoadTest
metadata: {name: feed-mixed-2k}
spec:
  target: {feed: "http://feed:8080"}
  scenario:
    name: feed-mixed
    params: {users: 10000, followsPerUser: 50, celebrities: 10}
  executor:
    type: ramping-arrival-rate
    startRate: 100
    timeUnit: 1s
    preAllocatedVUs: 200
    maxVUs: 2000
    stages: [{duration: 1m, target: 2000}, {duration: 3m, target: 2000}, {duration: 30s, target: 0}]
    gracefulStop: 30s
  workers: 4
  thresholds:
    http_req_duration: ["p(95)<200"]
    http_req_failed: ["rate<0.01"]
  onWorkerLoss: fail
  tracing: {sampleRatio: 0.01, otlpEndpoint: "http://jaeger:4317", jaegerUrl: "http://jaeger:16686"}
  workerTemplate: {resources: {}, nodeSelector: {}, tolerations: [], affinity: {}, separate: true}
  coordinatorTemplate: {}
  startTimeoutSeconds: 120
  ttlSecondsAfterFinished: 3600
  abort: false
"#;

#[test]
fn the_architecture_example_parses() {
    let spec = LoadTestSpec::from_yaml(GOOD).expect("the documented example is valid");
    assert_eq!(spec.workers, 4);
    assert_eq!(spec.executor.type_name(), "ramping-arrival-rate");
    assert_eq!(spec.executor.duration().as_secs(), 270);
    // The bare spec (what `loadlab run -f` also takes) is the same thing.
    let bare: String = GOOD
        .lines()
        .skip_while(|l| !l.starts_with("spec:"))
        .skip(1)
        .map(|l| format!("{}\n", l.strip_prefix("  ").unwrap_or(l)))
        .collect();
    assert_eq!(LoadTestSpec::from_yaml(&bare).expect("bare spec"), spec);
}

fn error(yaml: &str) -> String {
    LoadTestSpec::from_yaml(yaml)
        .expect_err("invalid")
        .to_string()
}

#[test]
fn errors_name_the_field() {
    let cases = [
        (GOOD.replace("    gracefulStop: 30s", "    gracefulStop: 30s\n    rampUp: 5s"), "spec.executor", "unknown field `rampUp`"),
        (GOOD.replace("  workers: 4", "  workerz: 4"), "spec", "unknown field `workerz`"),
        (GOOD.replace("startRate: 100", "startRate: -5"), "spec.executor.startRate", "invalid value"),
        (GOOD.replace("{duration: 3m, target: 2000}", "{duration: 3x, target: 2000}"), "spec.executor.stages[1].duration", "not a duration"),
        (GOOD.replace("\"p(95)<200\"", "\"p95<200\""), "spec.thresholds.http_req_duration[0]", "not an aggregation"),
        (GOOD.replace("type: ramping-arrival-rate", "type: ramping-arival-rate"), "spec.executor.type", "unknown variant"),
        (GOOD.replace("name: feed-mixed", "name: feed-mix"), "spec.scenario.name", "unknown variant"),
        (GOOD.replace("followsPerUser: 50", "followsPerUser: fifty"), "spec.scenario.params.followsPerUser", "invalid type"),
        (GOOD.replace("workers: 4", "workers: 0"), "spec.workers", "at least 1"),
        (GOOD.replace("maxVUs: 2000", "maxVUs: 20"), "spec.executor.maxVUs", "preAllocatedVUs"),
        (GOOD.replace("stages: [{duration: 1m, target: 2000}, {duration: 3m, target: 2000}, {duration: 30s, target: 0}]", "stages: []"), "spec.executor.stages", "at least one stage"),
        (GOOD.replace("feed: \"http://feed:8080\"", "feed: \"feed:8080\""), "spec.target.feed", "not an http"),
        (GOOD.replace("sampleRatio: 0.01", "sampleRatio: 2"), "spec.tracing.sampleRatio", "between 0 and 1"),
        (GOOD.replace("kind: LoadTest", "kind: Job"), "kind", "expected LoadTest"),
        (GOOD.replace("  workers: 4\n", "  workers: 4\n  workers: 5\n"), "", "duplicate"),
    ];
    for (yaml, path, needle) in cases {
        let e = error(&yaml);
        assert!(e.starts_with(path), "error {e:?} should name {path:?}");
        assert!(e.contains(needle), "error {e:?} should say {needle:?}");
    }
    assert!(
        error("scenario: [").contains("line"),
        "YAML syntax errors give a position"
    );
}

#[test]
fn scenarios_need_their_targets_and_requests() {
    let e =
        error("scenario: {name: feed-read}\nexecutor: {type: constant-vus, vus: 1, duration: 1s}");
    assert!(e.starts_with("target.feed"), "{e}");
    let e = error("scenario: {name: http}\nexecutor: {type: constant-vus, vus: 1, duration: 1s}");
    assert!(e.starts_with("scenario.http"), "{e}");
    let e = error(
        "scenario: {name: http, http: {requests: [{name: a, url: 'ftp://x'}]}}\nexecutor: {type: constant-vus, vus: 1, duration: 1s}",
    );
    assert!(e.starts_with("scenario.http.requests[0].url"), "{e}");
    let e = error(
        "scenario: {name: http, http: {requests: [{name: a, url: 'http://x', method: 'GE T'}]}}\nexecutor: {type: constant-vus, vus: 1, duration: 1s}",
    );
    assert!(e.starts_with("scenario.http.requests[0].method"), "{e}");
    let e = error(
        "scenario: {name: http, http: {requests: [{name: a, url: 'http://x'}]}}\nexecutor: {type: constant-arrival-rate, rate: 0, duration: 1s, preAllocatedVUs: 1}",
    );
    assert!(e.starts_with("executor.rate"), "{e}");
}

#[test]
fn the_example_manifests_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("deploy/examples") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).expect("read");
            LoadTestSpec::from_yaml(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 2, "examples found: {seen}");
}

#[test]
fn a_target_may_list_replicas() {
    let yaml = "target: {feed: 'http://feed:8080/', chat: 'http://gw-a:8082, http://gw-b:8082'}\nscenario: {name: chat}\nexecutor: {type: constant-vus, vus: 2, duration: 10s}\n";
    let spec = LoadTestSpec::from_yaml(yaml).expect("valid");
    assert_eq!(
        spec.target_urls("chat"),
        ["http://gw-a:8082", "http://gw-b:8082"]
    );
    assert_eq!(spec.target_urls("feed"), ["http://feed:8080"]);
    assert!(spec.target_urls("nothing").is_empty());
    let bad = yaml.replace("http://gw-b:8082", "gw-b:8082");
    let err = LoadTestSpec::from_yaml(&bad).expect_err("not a URL");
    assert!(err.to_string().contains("target.chat"), "{err}");
    assert!(err.to_string().contains("gw-b:8082"), "{err}");
}
