//! `posts`. `fanned_out_at` is the outbox marker: NULL until every follower's timeline holds the
//! post, so a sweep can find and finish fan-outs that a crash or a Redis outage interrupted.

use sea_orm::entity::prelude::*;

/// A post row.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "posts")]
pub struct Model {
    /// Snowflake id (its timestamp is the creation time).
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: i64,
    /// Author's user id.
    pub author_id: i64,
    /// Text, at most the configured number of characters.
    pub body: String,
    /// Creation time.
    pub created_at: DateTimeUtc,
    /// When fan-out completed; NULL while pending.
    pub fanned_out_at: Option<DateTimeUtc>,
}

/// No navigable relations are needed by the queries.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
