//! loadlab's runner. Today: the embedded stack behind `loadlab up` — every service of the system
//! under test in one process, on consecutive ports, sharing one engine.
#![forbid(unsafe_code)]

pub mod cli;
pub mod console;
pub mod demo;
pub mod distributed;
pub mod executor;
pub mod http_client;
pub mod jaeger;
pub mod metrics;
pub mod otlp;
pub mod procstat;
pub mod report;
pub mod run;
pub mod scenario;
pub mod spec;
pub mod stack;
pub mod summary;
pub mod threshold;
pub mod tracing_client;
