//! Distributed runs for real: a coordinator, `loadlab worker` processes of the binary under
//! test, gRPC on loopback, and a local HTTP target — exact merging, the synchronized start,
//! thresholds on merged data, lost workers under both policies, a lost coordinator, stop, and
//! peers that must be refused.

mod bench;
mod peers;
mod runs;
mod stack;
mod support;
mod traces;
