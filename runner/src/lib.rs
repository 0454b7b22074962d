//! loadlab's runner. Today: the embedded stack behind `loadlab up` — every service of the system
//! under test in one process, on consecutive ports, sharing one engine.
#![forbid(unsafe_code)]

pub mod stack;
