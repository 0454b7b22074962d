//! `messages`: chat messages. `(sender_id, client_msg_id)` is unique, so a client's retry of a
//! send that timed out is recognised and answered with the original id instead of duplicated.

use sea_orm::entity::prelude::*;

/// A message row.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "messages")]
pub struct Model {
    /// Snowflake id (its timestamp is the send time).
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: i64,
    /// Channel.
    pub channel_id: i64,
    /// Sender.
    pub sender_id: i64,
    /// The sender's id for this message, for idempotent retries.
    pub client_msg_id: String,
    /// Text (at most the configured size).
    pub body: String,
    /// When it became durable.
    pub created_at: DateTimeUtc,
}

/// No navigable relations are needed by the queries.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
