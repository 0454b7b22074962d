//! `follows`: the follow graph, one row per (follower, followee).

use sea_orm::entity::prelude::*;

/// A follow edge.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "follows")]
pub struct Model {
    /// Who follows.
    #[sea_orm(primary_key, auto_increment = false)]
    pub follower_id: i64,
    /// Who is followed.
    #[sea_orm(primary_key, auto_increment = false)]
    pub followee_id: i64,
    /// When the edge was created.
    pub created_at: DateTimeUtc,
}

/// No navigable relations are needed by the queries.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
