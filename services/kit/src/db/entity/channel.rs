//! `channels`: chat rooms.

use sea_orm::entity::prelude::*;

/// A channel row.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "channels")]
pub struct Model {
    /// Snowflake id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: i64,
    /// Display name.
    pub name: String,
    /// Creator's user id.
    pub created_by: i64,
    /// Creation time.
    pub created_at: DateTimeUtc,
}

/// No navigable relations are needed by the queries.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
