//! `channel_members`: who has joined which channel (joining is remembered across connections).

use sea_orm::entity::prelude::*;

/// A membership row.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "channel_members")]
pub struct Model {
    /// Channel.
    #[sea_orm(primary_key, auto_increment = false)]
    pub channel_id: i64,
    /// Member.
    #[sea_orm(primary_key, auto_increment = false)]
    pub user_id: i64,
    /// First join.
    pub joined_at: DateTimeUtc,
}

/// No navigable relations are needed by the queries.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
