//! The coordinator's merge of its workers' interval reports: exact run totals, and one merged
//! interval per report number for the time series and the live progress line.
//!
//! Workers start on one scheduled instant and report every second from it, so report `seq` of
//! every worker covers about the same wall-clock second. An interval is finished once every
//! worker that can still send it has (a worker that finished earlier, or was lost, is not waited
//! for); intervals are finished in order. Totals take every report at once, so they are exact
//! whatever the alignment.

use std::collections::BTreeMap;

use crate::metrics::Buffer;

use super::codec::Decoded;

/// One merged interval.
#[derive(Default)]
pub struct Interval {
    /// Report number.
    pub seq: u64,
    /// Everything the workers recorded in it.
    pub buffer: Buffer,
    /// Latest end of the interval among the reports, seconds since the start.
    pub end_s: f64,
    /// Longest interval among the reports, seconds.
    pub length_s: f64,
    /// Sum of the workers' peak VUs (an upper bound of the run's: peaks need not coincide).
    pub vus: u64,
    /// Highest worker CPU, cores.
    pub cpu_cores: f64,
    /// Worst worker scheduling lag, ms.
    pub lag_ms: f64,
    /// Some worker was saturated.
    pub saturated: bool,
    /// Workers that reported it.
    pub reporters: u32,
}

/// A report that breaks the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("worker {index} sent report {got}, expected {expected}")]
pub struct OutOfOrder {
    /// The worker.
    pub index: u32,
    /// The report number it sent.
    pub got: u64,
    /// The one it should have sent.
    pub expected: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Source {
    /// The next report number expected.
    next: u64,
    /// No more reports will come (done or lost).
    closed: bool,
}

/// Merges reports of `workers` workers.
pub struct Merger {
    sources: Vec<Source>,
    pending: BTreeMap<u64, Interval>,
    /// The next interval to finish.
    next: u64,
    /// Every report of the run, added up.
    pub totals: Buffer,
}

impl Merger {
    /// A merger for workers `0..workers`.
    pub fn new(workers: u32) -> Merger {
        Merger {
            sources: vec![Source::default(); workers as usize],
            pending: BTreeMap::new(),
            next: 0,
            totals: Buffer::default(),
        }
    }

    /// Adds worker `index`'s report. Reports of one worker must come numbered 0, 1, 2, ….
    pub fn add(&mut self, index: u32, report: &Decoded) -> Result<(), OutOfOrder> {
        let meta = &report.meta;
        let source = self
            .sources
            .get_mut(index as usize)
            .filter(|s| !s.closed)
            .ok_or(OutOfOrder {
                index,
                got: meta.seq,
                expected: u64::MAX,
            })?;
        if meta.seq != source.next {
            return Err(OutOfOrder {
                index,
                got: meta.seq,
                expected: source.next,
            });
        }
        source.next += 1;
        report.add_to(&mut self.totals);
        if meta.seq < self.next {
            // Its interval was finished without it (only after a wait for a worker declared
            // lost, whose later reports are not taken): the totals have it, the series not.
            return Ok(());
        }
        let slot = self.pending.entry(meta.seq).or_insert_with(|| Interval {
            seq: meta.seq,
            ..Interval::default()
        });
        report.add_to(&mut slot.buffer);
        slot.end_s = slot.end_s.max(meta.end_s);
        slot.length_s = slot.length_s.max(meta.length_s);
        slot.vus += meta.vus_peak;
        slot.cpu_cores = slot.cpu_cores.max(meta.cpu_cores);
        slot.lag_ms = slot.lag_ms.max(meta.lag_ms);
        slot.saturated |= meta.saturated;
        slot.reporters += 1;
        Ok(())
    }

    /// Worker `index` will send no more reports (it finished, or was lost).
    pub fn close(&mut self, index: u32) {
        if let Some(s) = self.sources.get_mut(index as usize) {
            s.closed = true;
        }
    }

    /// The next finished interval, if there is one.
    pub fn pop(&mut self) -> Option<Interval> {
        loop {
            let waiting = self
                .sources
                .iter()
                .any(|s| !s.closed && s.next <= self.next);
            if waiting {
                return None;
            }
            let first = self.pending.first_key_value().map(|(k, _)| *k)?;
            if first > self.next {
                // Nobody sent this number (every worker has closed before it): skip ahead.
                self.next = first;
                continue;
            }
            let (_, interval) = self.pending.pop_first()?;
            self.next = interval.seq + 1;
            return Some(interval);
        }
    }

    /// Every interval not finished yet, in order, as the run ends.
    pub fn drain(&mut self) -> Vec<Interval> {
        let rest: Vec<Interval> = std::mem::take(&mut self.pending).into_values().collect();
        if let Some(last) = rest.last() {
            self.next = last.seq + 1;
        }
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::distributed::codec::{Endpoints, ReportMeta, decode_report, encode_report};

    fn add(m: &mut Merger, index: u32, seq: u64, iterations: u64) -> Result<(), OutOfOrder> {
        let b = Buffer {
            iterations,
            ..Buffer::default()
        };
        let meta = ReportMeta {
            seq,
            end_s: seq as f64 + 1.0,
            length_s: 1.0,
            vus_peak: 2,
            ..ReportMeta::default()
        };
        let report = encode_report(&b, &[], meta).expect("encodes");
        let decoded = decode_report(&report, &mut Endpoints::default()).expect("decodes");
        m.add(index, &decoded)
    }

    #[test]
    fn intervals_finish_in_order_once_every_live_worker_sent_them() {
        let mut m = Merger::new(3);
        add(&mut m, 0, 0, 1).expect("in order");
        add(&mut m, 1, 0, 2).expect("in order");
        assert!(m.pop().is_none(), "worker 2 has not sent 0");
        add(&mut m, 0, 1, 10).expect("in order");
        add(&mut m, 2, 0, 3).expect("in order");
        let first = m.pop().expect("interval 0");
        assert_eq!(
            (
                first.seq,
                first.buffer.iterations,
                first.reporters,
                first.vus
            ),
            (0, 6, 3, 6)
        );
        assert!(m.pop().is_none(), "1 still missing from workers 1 and 2");
        // Worker 1 finishes; worker 2 is lost: nobody else owes interval 1.
        m.close(1);
        m.close(2);
        let second = m.pop().expect("interval 1");
        assert_eq!((second.seq, second.buffer.iterations), (1, 10));
        assert_eq!(m.totals.iterations, 16);
        assert!(m.drain().is_empty());
    }

    #[test]
    fn reports_out_of_order_or_after_close_are_refused() {
        let mut m = Merger::new(2);
        add(&mut m, 0, 0, 1).expect("in order");
        assert_eq!(
            add(&mut m, 0, 2, 1),
            Err(OutOfOrder {
                index: 0,
                got: 2,
                expected: 1
            })
        );
        assert!(add(&mut m, 0, 0, 1).is_err(), "a repeat");
        assert!(add(&mut m, 5, 0, 1).is_err(), "no such worker");
        m.close(1);
        assert!(add(&mut m, 1, 0, 1).is_err(), "closed");
        assert_eq!(m.totals.iterations, 1, "refused reports are not counted");
        let rest = m.drain();
        assert_eq!(rest.len(), 1);
    }
}
