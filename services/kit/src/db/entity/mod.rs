//! Tables of the feed and chat domains.

pub mod channel;
pub mod channel_member;
pub mod follow;
pub mod message;
pub mod post;
pub mod user;
