//! End-of-run reports rendered from the [`Summary`](crate::summary::Summary).

mod chart;
#[cfg(test)]
mod fixture;
mod format;
pub mod html;
mod tables;
