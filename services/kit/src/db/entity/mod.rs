//! Tables of the feed domain.

pub mod follow;
pub mod post;
pub mod user;
