//! The wire form of a worker's interval [`Buffer`] and of the run's set-up data.
//!
//! Histograms travel as HdrHistogram V2+DEFLATE, the format HdrHistogram implementations share;
//! they keep every bucket, so the coordinator's sum of the workers' histograms is bucket for
//! bucket the histogram one process would have recorded — exact percentiles, unlike schemes
//! that ship pre-computed quantiles or rounded values. Endpoints travel by name: each worker
//! interns its own ids, the coordinator re-interns them in its [`Endpoints`].
//!
//! Trust: a registered worker is trusted to send sane histogram blobs (a blob claiming a huge
//! payload makes the decoder allocate for it, within the gRPC message limit); the registration
//! checks and the message size limit are the guard against strangers.

use std::collections::HashMap;
use std::sync::Arc;

use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Serializer, V2DeflateSerializer};
use http::HeaderValue;
use loadlab_proto::runner::v1 as pb;

use super::hdr::{self, Sparse};
use crate::metrics::{self, Buffer, ERROR_KINDS, EndpointId, HttpSeries};
use crate::run::Prepared;
use crate::scenario::chat::ChatData;
use crate::scenario::feed::{FeedData, FeedUser};

/// A report or set-up message that cannot be decoded (or a histogram that cannot be encoded).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    /// A histogram blob is not V2(+DEFLATE) or does not fit the runner's bounds.
    #[error("histogram {which}: {message}")]
    Histogram {
        /// Which histogram (metric and tags).
        which: String,
        /// What is wrong.
        message: String,
    },
    /// A field holds a value the runner cannot represent.
    #[error("{field}: {message}")]
    Field {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn field(field: &'static str, message: impl Into<String>) -> CodecError {
    CodecError::Field {
        field,
        message: message.into(),
    }
}

/// Endpoint names interned to [`EndpointId`]s on the coordinator.
#[derive(Debug, Default, Clone)]
pub struct Endpoints {
    names: Vec<String>,
    ids: HashMap<String, EndpointId>,
}

impl Endpoints {
    /// The id of `name`, interning it the first time.
    pub fn intern(&mut self, name: &str) -> Result<EndpointId, CodecError> {
        if let Some(id) = self.ids.get(name) {
            return Ok(*id);
        }
        let id = u16::try_from(self.names.len())
            .map_err(|_| field("http.endpoint", "more than 65 536 distinct endpoints"))?;
        self.names.push(name.to_owned());
        self.ids.insert(name.to_owned(), EndpointId(id));
        Ok(EndpointId(id))
    }

    /// Names indexed by id.
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

/// Encodes one histogram; an empty one as an empty blob (most phases of most intervals).
pub fn encode_histogram(h: &Histogram<u64>, which: &str) -> Result<Vec<u8>, CodecError> {
    if h.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::with_capacity(256);
    V2DeflateSerializer::new()
        .serialize(h, &mut out)
        .map_err(|e| CodecError::Histogram {
            which: which.to_owned(),
            message: format!("{e:?}"),
        })?;
    Ok(out)
}

/// Decodes a blob; `None` for an empty one. Only histograms with the runner's exact layout
/// (1 µs – 1 h, 3 significant digits) are taken, so adding them can neither fail nor lose
/// precision (see [`super::hdr`]).
pub fn decode_histogram(blob: &[u8], which: &str) -> Result<Option<Sparse>, CodecError> {
    if blob.is_empty() {
        return Ok(None);
    }
    hdr::decode(blob)
        .map(Some)
        .map_err(|e| CodecError::Histogram {
            which: which.to_owned(),
            message: e.to_string(),
        })
}

/// Decodes a blob and adds it into `into` (a histogram of the runner's layout).
pub fn add_histogram(
    into: &mut Histogram<u64>,
    blob: &[u8],
    which: &str,
) -> Result<(), CodecError> {
    if let Some(h) = decode_histogram(blob, which)? {
        h.add_to(into);
    }
    Ok(())
}

/// What a report carries besides the measurements.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReportMeta {
    /// Interval number since the worker's start.
    pub seq: u64,
    /// Seconds from the worker's start to the end of the interval.
    pub end_s: f64,
    /// Interval length, seconds.
    pub length_s: f64,
    /// Most VUs active at once.
    pub vus_peak: u64,
    /// VUs allocated so far.
    pub vus_max: u64,
    /// Worker CPU, cores.
    pub cpu_cores: f64,
    /// Worst scheduling lag, ms.
    pub lag_ms: f64,
    /// The worker judged itself saturated.
    pub saturated: bool,
}

/// Encodes an interval; `names` are the worker's endpoint names by id.
pub fn encode_report(
    buffer: &Buffer,
    names: &[String],
    meta: ReportMeta,
) -> Result<pb::IntervalReport, CodecError> {
    let mut http = Vec::with_capacity(buffer.http.len());
    for ((endpoint, status), s) in &buffer.http {
        // Series stay in the buffer after a reset; only those with samples travel.
        if s.count == 0 {
            continue;
        }
        let name = names
            .get(endpoint.0 as usize)
            .cloned()
            .unwrap_or_else(|| format!("endpoint {}", endpoint.0));
        http.push(pb::HttpSeries {
            duration: encode_histogram(&s.duration, "http_req_duration")?,
            service: encode_histogram(&s.service, "http_req_service_duration")?,
            endpoint: name,
            status: u32::from(*status),
            count: s.count,
            failed: s.failed,
        });
    }
    let phases = if buffer.phases.iter().all(Histogram::is_empty) {
        Vec::new()
    } else {
        buffer
            .phases
            .iter()
            .zip(metrics::PHASES)
            .map(|(h, name)| encode_histogram(h, name))
            .collect::<Result<_, _>>()?
    };
    Ok(pb::IntervalReport {
        seq: meta.seq,
        end_s: meta.end_s,
        length_s: meta.length_s,
        http,
        phases,
        iterations: buffer.iterations,
        iteration_duration: encode_histogram(&buffer.iteration_duration, "iteration_duration")?,
        dropped_iterations: buffer.dropped,
        checks_passed: buffer.checks_passed,
        checks_failed: buffer.checks_failed,
        data_sent: buffer.data_sent,
        data_received: buffer.data_received,
        errors: buffer
            .errors
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect(),
        ws_sessions: buffer.ws_sessions,
        ws_session_failures: buffer.ws_session_failures,
        ws_connecting: encode_histogram(&buffer.ws_connecting, "ws_connecting")?,
        ws_msgs_sent: buffer.ws_msgs_sent,
        ws_msgs_received: buffer.ws_msgs_received,
        ws_delivery_latency: encode_histogram(&buffer.ws_delivery_latency, "ws_delivery_latency")?,
        vus_peak: meta.vus_peak,
        vus_max: meta.vus_max,
        generator: Some(pb::GeneratorSample {
            cpu_cores: meta.cpu_cores,
            lag_ms: meta.lag_ms,
            saturated: meta.saturated,
        }),
    })
}

/// One (endpoint, status) series of a decoded report.
#[derive(Debug, Clone)]
struct DecodedSeries {
    key: (EndpointId, u16),
    count: u64,
    failed: u64,
    duration: Option<Sparse>,
    service: Option<Sparse>,
}

/// A fully validated report, ready to be added to any number of buffers. Histograms stay
/// sparse (only their non-empty buckets): full histograms per report dominated the
/// coordinator's cost.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The report's numbering, timing, VUs and generator sample.
    pub meta: ReportMeta,
    http: Vec<DecodedSeries>,
    phases: Vec<(usize, Sparse)>,
    iteration_duration: Option<Sparse>,
    ws_connecting: Option<Sparse>,
    ws_delivery_latency: Option<Sparse>,
    errors: Vec<(&'static str, u64)>,
    iterations: u64,
    dropped: u64,
    checks_passed: u64,
    checks_failed: u64,
    data_sent: u64,
    data_received: u64,
    ws_sessions: u64,
    ws_session_failures: u64,
    ws_msgs_sent: u64,
    ws_msgs_received: u64,
}

fn add_opt(into: &mut Histogram<u64>, h: Option<&Sparse>) {
    if let Some(h) = h {
        h.add_to(into);
    }
}

impl Decoded {
    /// Requests in the report.
    pub fn requests(&self) -> u64 {
        self.http.iter().map(|s| s.count).sum()
    }

    /// Completed iterations in the report.
    pub fn iterations(&self) -> u64 {
        self.iterations
    }

    /// Adds the report into `b`.
    pub fn add_to(&self, b: &mut Buffer) {
        for s in &self.http {
            let series = b.http.entry(s.key).or_insert_with(|| HttpSeries {
                count: 0,
                failed: 0,
                duration: metrics::new_histogram(),
                service: metrics::new_histogram(),
            });
            series.count += s.count;
            series.failed += s.failed;
            add_opt(&mut series.duration, s.duration.as_ref());
            add_opt(&mut series.service, s.service.as_ref());
        }
        for (i, h) in &self.phases {
            if let Some(into) = b.phases.get_mut(*i) {
                add_opt(into, Some(h));
            }
        }
        b.iterations += self.iterations;
        add_opt(&mut b.iteration_duration, self.iteration_duration.as_ref());
        b.dropped += self.dropped;
        b.checks_passed += self.checks_passed;
        b.checks_failed += self.checks_failed;
        b.data_sent += self.data_sent;
        b.data_received += self.data_received;
        for (kind, n) in &self.errors {
            *b.errors.entry(kind).or_default() += n;
        }
        b.ws_sessions += self.ws_sessions;
        b.ws_session_failures += self.ws_session_failures;
        add_opt(&mut b.ws_connecting, self.ws_connecting.as_ref());
        b.ws_msgs_sent += self.ws_msgs_sent;
        b.ws_msgs_received += self.ws_msgs_received;
        add_opt(
            &mut b.ws_delivery_latency,
            self.ws_delivery_latency.as_ref(),
        );
    }
}

/// Decodes and validates a report (endpoints interned into `endpoints`).
pub fn decode_report(
    report: &pb::IntervalReport,
    endpoints: &mut Endpoints,
) -> Result<Decoded, CodecError> {
    let mut http = Vec::with_capacity(report.http.len());
    for s in &report.http {
        let id = endpoints.intern(&s.endpoint)?;
        let status = u16::try_from(s.status)
            .map_err(|_| field("http.status", format!("{} is not a status", s.status)))?;
        if s.failed > s.count {
            return Err(field(
                "http.failed",
                format!("{} failed of {} requests", s.failed, s.count),
            ));
        }
        let which = |m: &str| format!("{m}{{endpoint:{},status:{status}}}", s.endpoint);
        http.push(DecodedSeries {
            key: (id, status),
            count: s.count,
            failed: s.failed,
            duration: decode_histogram(&s.duration, &which("http_req_duration"))?,
            service: decode_histogram(&s.service, &which("http_req_service_duration"))?,
        });
    }
    let mut phases = Vec::new();
    match report.phases.len() {
        0 => {}
        n if n == metrics::PHASES.len() => {
            for (i, (blob, name)) in report.phases.iter().zip(metrics::PHASES).enumerate() {
                if let Some(h) = decode_histogram(blob, name)? {
                    phases.push((i, h));
                }
            }
        }
        n => {
            return Err(field(
                "phases",
                format!("{n} histograms, expected 0 or {}", metrics::PHASES.len()),
            ));
        }
    }
    let mut errors = Vec::with_capacity(report.errors.len());
    for (kind, n) in &report.errors {
        let kind = ERROR_KINDS
            .iter()
            .find(|k| **k == kind.as_str())
            .ok_or_else(|| field("errors", format!("unknown error kind {kind:?}")))?;
        errors.push((*kind, *n));
    }
    let finite = |name: &'static str, v: f64| {
        if v.is_finite() && v >= 0.0 {
            Ok(v)
        } else {
            Err(field(name, format!("{v} is not a non-negative number")))
        }
    };
    let g = report.generator.unwrap_or_default();
    let meta = ReportMeta {
        seq: report.seq,
        end_s: finite("end_s", report.end_s)?,
        length_s: finite("length_s", report.length_s)?,
        vus_peak: report.vus_peak,
        vus_max: report.vus_max,
        cpu_cores: finite("generator.cpu_cores", g.cpu_cores)?,
        lag_ms: finite("generator.lag_ms", g.lag_ms)?,
        saturated: g.saturated,
    };
    Ok(Decoded {
        meta,
        http,
        phases,
        iteration_duration: decode_histogram(&report.iteration_duration, "iteration_duration")?,
        ws_connecting: decode_histogram(&report.ws_connecting, "ws_connecting")?,
        ws_delivery_latency: decode_histogram(&report.ws_delivery_latency, "ws_delivery_latency")?,
        errors,
        iterations: report.iterations,
        dropped: report.dropped_iterations,
        checks_passed: report.checks_passed,
        checks_failed: report.checks_failed,
        data_sent: report.data_sent,
        data_received: report.data_received,
        ws_sessions: report.ws_sessions,
        ws_session_failures: report.ws_session_failures,
        ws_msgs_sent: report.ws_msgs_sent,
        ws_msgs_received: report.ws_msgs_received,
    })
}

fn bearer(auth: &HeaderValue) -> String {
    auth.to_str()
        .unwrap_or_default()
        .trim_start_matches("Bearer ")
        .to_owned()
}

/// The set-up data as sent to workers.
pub fn encode_setup(prepared: &Prepared) -> pb::Setup {
    let data = match prepared {
        Prepared::Nothing => pb::setup::Data::None(pb::NoSetup {}),
        Prepared::Feed(d) => pb::setup::Data::Feed(pb::FeedSetup {
            users: d
                .users
                .iter()
                .map(|u| pb::SetupUser {
                    id: u.id.clone(),
                    token: bearer(&u.auth),
                })
                .collect(),
            follows: d.follows as u64,
            posts: d.posts as u64,
        }),
        Prepared::Chat(d) => pb::setup::Data::Chat(pb::ChatSetup {
            users: d
                .users
                .iter()
                .map(|(id, token)| pb::SetupUser {
                    id: id.clone(),
                    token: token.clone(),
                })
                .collect(),
            channels: d.channels.clone(),
        }),
    };
    pb::Setup { data: Some(data) }
}

/// The set-up data a worker received.
pub fn decode_setup(setup: &pb::Setup) -> Result<Prepared, CodecError> {
    Ok(match &setup.data {
        None | Some(pb::setup::Data::None(_)) => Prepared::Nothing,
        Some(pb::setup::Data::Feed(f)) => {
            let users = f
                .users
                .iter()
                .map(|u| {
                    let auth = HeaderValue::from_str(&format!("Bearer {}", u.token))
                        .map_err(|e| field("setup.feed.users.token", e.to_string()))?;
                    Ok(FeedUser {
                        id: u.id.clone(),
                        auth,
                    })
                })
                .collect::<Result<_, CodecError>>()?;
            Prepared::Feed(Arc::new(FeedData {
                users,
                follows: usize::try_from(f.follows).unwrap_or(usize::MAX),
                posts: usize::try_from(f.posts).unwrap_or(usize::MAX),
            }))
        }
        Some(pb::setup::Data::Chat(c)) => Prepared::Chat(Arc::new(ChatData {
            users: c
                .users
                .iter()
                .map(|u| (u.id.clone(), u.token.clone()))
                .collect(),
            channels: c.channels.clone(),
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{HttpSample, Registry};
    use proptest::prelude::*;
    use std::time::Duration;

    /// Encodes and decodes, as the wire would.
    fn through_the_wire(h: &Histogram<u64>) -> Histogram<u64> {
        let blob = encode_histogram(h, "test").expect("encodes");
        let mut out = metrics::new_histogram();
        add_histogram(&mut out, &blob, "test").expect("decodes");
        out
    }

    proptest! {
        /// Per-worker histograms, shipped and merged, are the histogram of all the samples:
        /// same buckets, so same counts, min, max, mean and every percentile — for any split.
        #[test]
        fn merging_shipped_histograms_equals_recording_everything(
            samples in prop::collection::vec((1u64..3_600_000_000, 0usize..8), 1..2_000),
            workers in 1usize..8,
        ) {
            let mut all = metrics::new_histogram();
            let mut parts = vec![metrics::new_histogram(); workers];
            for (v, w) in &samples {
                all.record(*v).expect("in range");
                parts[w % workers].record(*v).expect("in range");
            }
            let mut merged = metrics::new_histogram();
            for p in &parts {
                merged.add(through_the_wire(p)).expect("same bounds");
            }
            prop_assert!(merged == all);
            prop_assert_eq!(merged.len(), samples.len() as u64);
            for q in [0.0, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0] {
                prop_assert_eq!(merged.value_at_quantile(q), all.value_at_quantile(q));
            }
            prop_assert_eq!(merged.min(), all.min());
            prop_assert_eq!(merged.max(), all.max());
        }
    }

    proptest! {
        // Each case builds several registries of full-range histograms: fewer cases.
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Whole interval buffers: workers' reports decoded and added equal one registry's.
        #[test]
        fn merging_reports_equals_one_process(
            requests in prop::collection::vec((0u16..3, prop::sample::select(vec![200u16, 404, 503, 6]), 1u64..5_000_000, 0u64..20_000), 0..400),
            workers in 1usize..6,
        ) {
            let names = ["GET /a", "POST /b", "GET /c/{id}"];
            let one = Registry::new();
            let each: Vec<_> = (0..workers).map(|_| Registry::new()).collect();
            for (i, (ep, status, us, queued)) in requests.iter().enumerate() {
                let w = &each[i % workers];
                // Workers intern in their own order; names must line up on the coordinator.
                let ids = if i % 2 == 0 { [0, 1, 2] } else { [2, 1, 0] };
                for name in ids {
                    w.endpoint(names[name]);
                }
                for r in [&one, w] {
                    let sample = HttpSample {
                        endpoint: r.endpoint(names[*ep as usize]),
                        status: *status,
                        failed: *status >= 400 || *status < 100,
                        queued: Duration::from_micros(*queued),
                        service: Duration::from_micros(*us),
                        waiting: Duration::from_micros(us / 2),
                        sent: 10,
                        received: 100,
                        ..HttpSample::default()
                    };
                    let rec = r.recorder(i as u64);
                    rec.http(&sample, (*status == 6).then_some("timeout"));
                    rec.iteration(Duration::from_micros(us + queued));
                    rec.check(*status == 200);
                }
            }
            let mut expected = Buffer::default();
            one.drain_into(&mut expected);
            let mut endpoints = Endpoints::default();
            let mut merged = Buffer::default();
            for w in &each {
                let mut b = Buffer::default();
                w.drain_into(&mut b);
                let report = encode_report(&b, &w.endpoint_names(), ReportMeta::default()).expect("encodes");
                decode_report(&report, &mut endpoints).expect("decodes").add_to(&mut merged);
            }
            prop_assert_eq!(merged.requests(), expected.requests());
            prop_assert_eq!(merged.failures(), expected.failures());
            prop_assert_eq!(merged.iterations, expected.iterations);
            prop_assert_eq!(merged.checks_passed, expected.checks_passed);
            prop_assert_eq!(merged.data_sent, expected.data_sent);
            prop_assert_eq!(&merged.errors, &expected.errors);
            prop_assert!(merged.duration_all() == expected.duration_all());
            prop_assert!(merged.iteration_duration == expected.iteration_duration);
            for (m, e) in merged.phases.iter().zip(&expected.phases) {
                prop_assert!(m == e);
            }
            let expected_names = one.endpoint_names();
            for ((id, status), s) in &expected.http {
                let name = &expected_names[id.0 as usize];
                let mid = endpoints.intern(name).expect("interned");
                let m = &merged.http[&(mid, *status)];
                prop_assert_eq!((m.count, m.failed), (s.count, s.failed));
                prop_assert!(m.duration == s.duration && m.service == s.service);
            }
        }
    }

    #[test]
    fn garbage_is_refused_with_the_histogram_named() {
        let mut h = metrics::new_histogram();
        let err = add_histogram(&mut h, b"not a histogram", "http_req_duration{endpoint:x}")
            .expect_err("garbage");
        assert!(
            err.to_string().contains("http_req_duration{endpoint:x}"),
            "{err}"
        );
        // A histogram with values beyond the runner's bounds does not fit.
        let mut wide = Histogram::<u64>::new_with_bounds(1, u64::MAX / 4, 3).expect("bounds");
        wide.record(u64::MAX / 8).expect("in range");
        let blob = encode_histogram(&wide, "wide").expect("encodes");
        assert!(add_histogram(&mut h, &blob, "wide").is_err());
        let report = pb::IntervalReport {
            phases: vec![Vec::new(); 2],
            ..pb::IntervalReport::default()
        };
        let Err(err) = decode_report(&report, &mut Endpoints::default()) else {
            panic!("2 phases must be refused");
        };
        assert!(err.to_string().starts_with("phases:"), "{err}");
        let report = pb::IntervalReport {
            errors: [("gremlins".to_owned(), 1)].into(),
            ..pb::IntervalReport::default()
        };
        assert!(decode_report(&report, &mut Endpoints::default()).is_err());
    }

    #[test]
    fn setup_data_round_trips() {
        let feed = Prepared::Feed(Arc::new(FeedData {
            users: vec![FeedUser {
                id: "42".into(),
                auth: HeaderValue::from_static("Bearer abc.def"),
            }],
            follows: 3,
            posts: 4,
        }));
        let Prepared::Feed(back) = decode_setup(&encode_setup(&feed)).expect("decodes") else {
            panic!("feed set-up expected");
        };
        assert_eq!(back.users[0].id, "42");
        assert_eq!(back.users[0].auth, "Bearer abc.def");
        assert_eq!((back.follows, back.posts), (3, 4));
        let bad = pb::Setup {
            data: Some(pb::setup::Data::Feed(pb::FeedSetup {
                users: vec![pb::SetupUser {
                    id: "1".into(),
                    token: "line\nbreak".into(),
                }],
                ..pb::FeedSetup::default()
            })),
        };
        assert!(decode_setup(&bad).is_err());
    }
}
