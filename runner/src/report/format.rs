//! Text for the reports: HTML escaping and human-readable numbers.

use std::fmt;

/// Displays its text HTML-escaped, safe in element content and in quoted attribute values.
///
/// A `Display` wrapper rather than a `String`-returning function so that `write!` streams the
/// escaped text straight into the document without an allocation per field.
#[derive(Debug, Clone, Copy)]
pub struct Escape<'a>(pub &'a str);

impl fmt::Display for Escape<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..at])?;
            f.write_str(match rest.as_bytes()[at] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[at + 1..];
        }
        f.write_str(rest)
    }
}

/// `v` with `decimals` fraction digits and comma-grouped thousands: `1,234.5`.
pub fn number(v: f64, decimals: usize) -> String {
    if v.is_nan() {
        return "n/a".to_owned();
    }
    if v.is_infinite() {
        return if v > 0.0 { "∞" } else { "−∞" }.to_owned();
    }
    let digits = format!("{:.*}", decimals, v.abs());
    let (int, frac) = match digits.split_once('.') {
        Some((int, frac)) => (int, Some(frac)),
        None => (digits.as_str(), None),
    };
    let mut out = String::with_capacity(digits.len() + int.len() / 3 + 1);
    // Rounding may turn a tiny negative into zero; "-0.0" would read as a real negative.
    if v < 0.0 && digits.bytes().any(|b| b.is_ascii_digit() && b != b'0') {
        out.push('-');
    }
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if let Some(frac) = frac {
        out.push('.');
        out.push_str(frac);
    }
    out
}

/// `v` with as many decimals as its magnitude deserves: `1,234.5`, `12.3`, `1.23`, `0.123`,
/// `0.00490` (three significant digits below one, so small rates stay comparable).
pub fn auto(v: f64) -> String {
    let a = v.abs();
    let decimals = if a == 0.0 || a >= 10.0 || !a.is_finite() {
        if a.fract() == 0.0 || a >= 1e6 { 0 } else { 1 }
    } else if a >= 1.0 {
        2
    } else {
        // 0.0049 → 5 decimals; capped so a denormal does not print 300 zeros.
        (2 - a.log10().floor() as i32).clamp(3, 9) as usize
    };
    number(v, decimals)
}

/// Milliseconds: `12.3 ms`.
pub fn ms(v: f64) -> String {
    format!("{} ms", auto(v))
}

/// A count: `1,234`.
pub fn count(n: u64) -> String {
    // u64 → f64 loses precision only above 2^53, far beyond any request count.
    number(n as f64, 0)
}

/// A fraction as a percentage: `1.23%`.
pub fn percent(fraction: f64) -> String {
    format!("{}%", number(fraction * 100.0, 2))
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `12.3 MiB`.
pub fn bytes(v: f64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if !v.is_finite() || v.abs() < 1024.0 {
        return format!("{} B", number(v, 0));
    }
    let mut scaled = v / 1024.0;
    let mut unit = 0;
    while scaled.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        scaled /= 1024.0;
        unit += 1;
    }
    format!("{} {}", number(scaled, 1), UNITS[unit])
}

/// A span of seconds: `45.2s`, `2m 05s`, `1h 02m 03s`.
pub fn duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 60.0 {
        return format!("{}s", number(secs, 1));
    }
    // Whole seconds: nobody reads tenths on a multi-minute run.
    let total = secs.round() as u64;
    let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
    if h > 0 {
        format!("{h}h {m:02}m {s:02}s")
    } else {
        format!("{m}m {s:02}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            Escape(r#"<script>alert("x" & 'y')</script>"#).to_string(),
            "&lt;script&gt;alert(&quot;x&quot; &amp; &#39;y&#39;)&lt;/script&gt;"
        );
        assert_eq!(
            Escape("GET /v1/users/{id}").to_string(),
            "GET /v1/users/{id}"
        );
        assert_eq!(Escape("ünïcode ✓").to_string(), "ünïcode ✓");
    }

    #[test]
    fn groups_thousands() {
        assert_eq!(number(1234.5, 1), "1,234.5");
        assert_eq!(number(1_234_567.0, 0), "1,234,567");
        assert_eq!(number(999.0, 0), "999");
        assert_eq!(number(-1234.0, 0), "-1,234");
        assert_eq!(number(-0.001, 1), "0.0");
        assert_eq!(number(f64::NAN, 1), "n/a");
        assert_eq!(number(f64::INFINITY, 1), "∞");
    }

    #[test]
    fn picks_decimals_by_magnitude() {
        assert_eq!(auto(1234.56), "1,234.6");
        assert_eq!(auto(12.34), "12.3");
        assert_eq!(auto(1.234), "1.23");
        assert_eq!(auto(0.1234), "0.123");
        assert_eq!(auto(0.0049), "0.00490");
        assert_eq!(auto(1e-300), "0.000000000");
        assert_eq!(auto(0.0), "0");
        assert_eq!(auto(42.0), "42");
        assert_eq!(ms(12.34), "12.3 ms");
    }

    #[test]
    fn formats_units() {
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(bytes(12.3 * 1024.0 * 1024.0), "12.3 MiB");
        assert_eq!(percent(0.0123), "1.23%");
        assert_eq!(duration(45.24), "45.2s");
        assert_eq!(duration(125.0), "2m 05s");
        assert_eq!(duration(3723.0), "1h 02m 03s");
        assert_eq!(count(1234), "1,234");
    }
}
