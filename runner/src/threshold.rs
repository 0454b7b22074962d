//! Thresholds in k6's syntax: `"http_req_duration{scenario:feed-read}": ["p(95)<200"]`, on the
//! command line `http_req_duration:p(95)<200`. A failed threshold fails the run (exit code 99).

use std::fmt;

use serde::Serialize;

/// How a metric is reduced to one number.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Aggregation {
    /// Mean.
    Avg,
    /// Minimum.
    Min,
    /// Maximum.
    Max,
    /// Median.
    Med,
    /// A percentile, 0–100.
    Percentile(f64),
    /// Number of samples (counters: the total).
    Count,
    /// Per-second rate (counters) or fraction of non-zero samples (rates).
    Rate,
    /// Last value (gauges).
    Value,
}

impl fmt::Display for Aggregation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Aggregation::Avg => f.write_str("avg"),
            Aggregation::Min => f.write_str("min"),
            Aggregation::Max => f.write_str("max"),
            Aggregation::Med => f.write_str("med"),
            Aggregation::Percentile(p) => write!(f, "p({p})"),
            Aggregation::Count => f.write_str("count"),
            Aggregation::Rate => f.write_str("rate"),
            Aggregation::Value => f.write_str("value"),
        }
    }
}

/// Comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Op {
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `==`
    Eq,
    /// `!=`
    Ne,
}

impl Op {
    fn holds(self, actual: f64, bound: f64) -> bool {
        match self {
            Op::Lt => actual < bound,
            Op::Le => actual <= bound,
            Op::Gt => actual > bound,
            Op::Ge => actual >= bound,
            Op::Eq => (actual - bound).abs() < f64::EPSILON,
            Op::Ne => (actual - bound).abs() >= f64::EPSILON,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Eq => "==",
            Op::Ne => "!=",
        }
    }
}

/// A threshold that does not parse; the message says where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ThresholdError(String);

/// One parsed threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Threshold {
    /// Metric name, e.g. `http_req_duration`.
    pub metric: String,
    /// Tag filter, e.g. `[("scenario", "feed-read")]`; all must match.
    pub filter: Vec<(String, String)>,
    /// The expression as written.
    pub expr: String,
    /// Reduction.
    #[serde(skip)]
    pub aggregation: Aggregation,
    /// Operator.
    #[serde(skip)]
    pub op: Op,
    /// Bound.
    #[serde(skip)]
    pub bound: f64,
}

impl Threshold {
    /// Parses `key` (`metric` or `metric{tag:value,…}`) and `expr` (`p(95)<200`).
    pub fn parse(key: &str, expr: &str) -> Result<Threshold, ThresholdError> {
        let (metric, filter) = parse_key(key)?;
        let e = expr.trim();
        let op_at = e.find(['<', '>', '=', '!']).ok_or_else(|| {
            ThresholdError(format!(
                "`{expr}`: expected an operator (<, <=, >, >=, ==, !=), as in `p(95)<200`"
            ))
        })?;
        let (lhs, rest) = e.split_at(op_at);
        let (op, rhs) = if let Some(r) = rest.strip_prefix("<=") {
            (Op::Le, r)
        } else if let Some(r) = rest.strip_prefix(">=") {
            (Op::Ge, r)
        } else if let Some(r) = rest.strip_prefix("==") {
            (Op::Eq, r)
        } else if let Some(r) = rest.strip_prefix("!=") {
            (Op::Ne, r)
        } else if let Some(r) = rest.strip_prefix('<') {
            (Op::Lt, r)
        } else if let Some(r) = rest.strip_prefix('>') {
            (Op::Gt, r)
        } else {
            return Err(ThresholdError(format!(
                "`{expr}`: unknown operator `{rest}`"
            )));
        };
        let aggregation =
            parse_aggregation(lhs.trim()).map_err(|m| ThresholdError(format!("`{expr}`: {m}")))?;
        let bound: f64 = rhs
            .trim()
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite())
            .ok_or_else(|| ThresholdError(format!("`{expr}`: `{}` is not a number", rhs.trim())))?;
        Ok(Threshold {
            metric,
            filter,
            expr: e.to_owned(),
            aggregation,
            op,
            bound,
        })
    }

    /// Parses the command-line form `metric[{tags}]:expr`.
    pub fn parse_cli(arg: &str) -> Result<Threshold, ThresholdError> {
        // The expression starts after the first ':' outside a tag filter.
        let mut depth = 0;
        for (i, c) in arg.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ':' if depth == 0 => return Threshold::parse(&arg[..i], &arg[i + 1..]),
                _ => {}
            }
        }
        Err(ThresholdError(format!(
            "`{arg}`: expected METRIC:EXPR, as in `http_req_duration:p(95)<200`"
        )))
    }

    /// The key as written (`metric{tag:value}`).
    pub fn key(&self) -> String {
        if self.filter.is_empty() {
            self.metric.clone()
        } else {
            let tags: Vec<String> = self
                .filter
                .iter()
                .map(|(k, v)| format!("{k}:{v}"))
                .collect();
            format!("{}{{{}}}", self.metric, tags.join(","))
        }
    }

    /// Whether `actual` satisfies the threshold.
    pub fn holds(&self, actual: f64) -> bool {
        self.op.holds(actual, self.bound)
    }

    /// `p(95) < 200` style rendering of the comparison.
    pub fn describe(&self) -> String {
        format!("{} {} {}", self.aggregation, self.op.as_str(), self.bound)
    }
}

fn parse_key(key: &str) -> Result<(String, Vec<(String, String)>), ThresholdError> {
    let key = key.trim();
    let (name, filter) = match key.find('{') {
        Some(open) => {
            let close = key
                .strip_suffix('}')
                .ok_or_else(|| ThresholdError(format!("`{key}`: tag filter must end with `}}`")))?;
            (&key[..open], &close[open + 1..])
        }
        None => (key, ""),
    };
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(ThresholdError(format!(
            "`{key}`: `{name}` is not a metric name"
        )));
    }
    let mut tags = Vec::new();
    for pair in filter.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = pair.split_once(':').ok_or_else(|| {
            ThresholdError(format!("`{key}`: tag filter `{pair}` must be `tag:value`"))
        })?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || v.is_empty() {
            return Err(ThresholdError(format!(
                "`{key}`: tag filter `{pair}` must be `tag:value`"
            )));
        }
        tags.push((k.to_owned(), v.to_owned()));
    }
    Ok((name.to_owned(), tags))
}

fn parse_aggregation(s: &str) -> Result<Aggregation, String> {
    Ok(match s {
        "avg" => Aggregation::Avg,
        "min" => Aggregation::Min,
        "max" => Aggregation::Max,
        "med" => Aggregation::Med,
        "count" => Aggregation::Count,
        "rate" => Aggregation::Rate,
        "value" => Aggregation::Value,
        other => {
            let inner = other
                .strip_prefix("p(")
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| format!("`{other}` is not an aggregation (avg, min, max, med, p(N), count, rate, value)"))?;
            let p: f64 = inner
                .trim()
                .parse()
                .map_err(|_| format!("`{inner}` is not a percentile"))?;
            if !(0.0..=100.0).contains(&p) {
                return Err(format!("percentile {p} is outside 0..100"));
            }
            Aggregation::Percentile(p)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_k6_thresholds() {
        let t = Threshold::parse("http_req_duration", "p(95)<200").expect("parse");
        assert_eq!(t.aggregation, Aggregation::Percentile(95.0));
        assert_eq!((t.op, t.bound), (Op::Lt, 200.0));
        assert!(t.holds(199.9) && !t.holds(200.0));

        let t = Threshold::parse(
            "http_req_duration{scenario:feed-read, status:200}",
            " p(99.9) <= 500 ",
        )
        .expect("parse");
        assert_eq!(
            t.filter,
            vec![
                ("scenario".into(), "feed-read".into()),
                ("status".into(), "200".into())
            ]
        );
        assert_eq!(t.key(), "http_req_duration{scenario:feed-read,status:200}");
        assert_eq!(t.aggregation, Aggregation::Percentile(99.9));

        let t = Threshold::parse_cli("http_req_failed:rate<0.01").expect("cli");
        assert_eq!(
            (t.metric.as_str(), t.aggregation, t.op),
            ("http_req_failed", Aggregation::Rate, Op::Lt)
        );
        let t = Threshold::parse_cli("http_req_duration{endpoint:/v1/a:b}:max<=3")
            .expect("cli with colon in tag");
        assert_eq!(t.filter, vec![("endpoint".into(), "/v1/a:b".into())]);
        for (expr, op) in [
            ("count>=1", Op::Ge),
            ("avg>1", Op::Gt),
            ("med==2", Op::Eq),
            ("min!=0", Op::Ne),
        ] {
            assert_eq!(Threshold::parse("m", expr).expect(expr).op, op);
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        for (key, expr, needle) in [
            ("http_req_duration", "p95<200", "not an aggregation"),
            ("http_req_duration", "p(95)", "expected an operator"),
            ("http_req_duration", "p(95)<fast", "not a number"),
            ("http_req_duration", "p(101)<5", "outside"),
            ("http_req_duration", "p(95)=<5", "unknown operator"),
            ("Http Req", "avg<1", "not a metric name"),
            ("http_req_duration{scenario}", "avg<1", "tag:value"),
            ("http_req_duration{scenario:x", "avg<1", "must end with"),
        ] {
            let err = Threshold::parse(key, expr).expect_err(expr).to_string();
            assert!(err.contains(needle), "{key} {expr}: {err}");
        }
        assert!(Threshold::parse_cli("p(95)<200").is_err());
    }
}
