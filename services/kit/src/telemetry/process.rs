//! Process metrics (the seed's server-side list): CPU time, resident memory and network bytes,
//! read from `/proc` when the metrics are collected (every export interval), never on a
//! request path.
//!
//! Network bytes come from `/proc/self/net/dev`, which counts the whole network namespace: in a
//! pod that is the pod (one service), on a laptop it is every process of the host namespace
//! (loopback included), so treat it as the machine's traffic there.

use opentelemetry::KeyValue;
use opentelemetry::metrics::Meter;

/// CPU seconds (user + system) of this process.
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may contain spaces; fields after the last ')' are fixed.
    let after = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = after.split_whitespace();
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after the name.
    let utime: f64 = fields.nth(11)?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    // sysconf(_SC_CLK_TCK) is 100 on every Linux platform we run on; reading it needs libc.
    Some((utime + stime) / 100.0)
}

/// Resident set size of this process, bytes.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Bytes received and transmitted on every interface of this network namespace.
pub fn network_bytes() -> Option<(u64, u64)> {
    let dev = std::fs::read_to_string("/proc/self/net/dev").ok()?;
    let mut rx = 0u64;
    let mut tx = 0u64;
    // Two header lines, then `iface: rx_bytes packets … (8 fields) tx_bytes …`.
    for line in dev.lines().skip(2) {
        let Some((_, counters)) = line.split_once(':') else {
            continue;
        };
        let fields: Vec<&str> = counters.split_whitespace().collect();
        if let (Some(r), Some(t)) = (fields.first(), fields.get(8)) {
            rx = rx.saturating_add(r.parse().unwrap_or(0));
            tx = tx.saturating_add(t.parse().unwrap_or(0));
        }
    }
    Some((rx, tx))
}

/// Registers `process.cpu.time` (s), `process.memory.usage` (By) and `process.network.io` (By,
/// by `network.io.direction`) on `meter`, following the OpenTelemetry semantic conventions.
pub fn register(meter: &Meter) {
    meter
        .f64_observable_counter("process.cpu.time")
        .with_unit("s")
        .with_description("CPU time used by the process (user + system)")
        .with_callback(|observer| {
            if let Some(s) = cpu_seconds() {
                observer.observe(s, &[]);
            }
        })
        .build();
    meter
        .u64_observable_gauge("process.memory.usage")
        .with_unit("By")
        .with_description("Resident memory of the process")
        .with_callback(|observer| {
            if let Some(b) = rss_bytes() {
                observer.observe(b, &[]);
            }
        })
        .build();
    meter
        .u64_observable_counter("process.network.io")
        .with_unit("By")
        .with_description("Bytes received and sent on the process's network namespace")
        .with_callback(|observer| {
            if let Some((rx, tx)) = network_bytes() {
                observer.observe(rx, &[KeyValue::new("network.io.direction", "receive")]);
                observer.observe(tx, &[KeyValue::new("network.io.direction", "transmit")]);
            }
        })
        .build();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let before = cpu_seconds().expect("/proc/self/stat");
        let mut x = 0u64;
        for i in 0..30_000_000u64 {
            x = x.wrapping_add(i ^ (x >> 3));
        }
        std::hint::black_box(x);
        assert!(cpu_seconds().expect("/proc/self/stat") >= before);
        assert!(rss_bytes().expect("VmRSS") > 1024 * 1024);
        let (rx, tx) = network_bytes().expect("/proc/self/net/dev");
        // Loopback counts both directions equally; some traffic has passed since boot.
        assert!(rx > 0 || tx > 0, "rx {rx} tx {tx}");
    }
}
