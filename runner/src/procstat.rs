//! Resource use of local processes from `/proc`: CPU time, resident memory, and bytes read and
//! written (sockets and files alike — `/proc/<pid>/io`'s `rchar`/`wchar`; per-process network
//! bytes are not available from `/proc` without privileges).

use std::time::Instant;

/// One reading of a process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcSample {
    /// When it was taken.
    pub at: Instant,
    /// User + system CPU time, seconds.
    pub cpu_s: f64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// Bytes read through read-like system calls.
    pub read_bytes: u64,
    /// Bytes written through write-like system calls.
    pub written_bytes: u64,
}

/// Reads `/proc/<pid>` (`None` when the process is gone or /proc is unavailable).
pub fn sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after the last ')' are fixed.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after the name.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let rss_pages: u64 = fields.get(21)?.parse().ok()?;
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let io_field = |name: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(ProcSample {
        at: Instant::now(),
        cpu_s: ticks / clock_ticks_per_second(),
        rss_bytes: rss_pages * page_size(),
        read_bytes: io_field("rchar:"),
        written_bytes: io_field("wchar:"),
    })
}

/// CPU cores used between two samples.
pub fn cores_between(a: &ProcSample, b: &ProcSample) -> f64 {
    let wall = b.at.duration_since(a.at).as_secs_f64();
    if wall <= 0.0 {
        0.0
    } else {
        ((b.cpu_s - a.cpu_s) / wall).max(0.0)
    }
}

/// `sysconf(_SC_CLK_TCK)` is 100 on every Linux platform we run on; reading it would need libc.
fn clock_ticks_per_second() -> f64 {
    100.0
}

/// Page size from `/proc/self/smaps`' kernel page size, 4 KiB when unknown.
fn page_size() -> u64 {
    std::fs::read_to_string("/proc/self/smaps")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("KernelPageSize:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(4096, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_this_process() {
        let a = sample(std::process::id()).expect("own /proc entry");
        // Burn a little CPU so the difference is visible.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i ^ (x >> 3));
        }
        std::hint::black_box(x);
        let b = sample(std::process::id()).expect("own /proc entry");
        assert!(b.cpu_s >= a.cpu_s);
        assert!(b.rss_bytes > 1024 * 1024, "rss {}", b.rss_bytes);
        assert!(cores_between(&a, &b) > 0.0);
        assert!(sample(u32::MAX).is_none());
    }
}
