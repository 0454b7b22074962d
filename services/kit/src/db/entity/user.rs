//! `users`: accounts. `follower_count` is kept in the same transaction as `follows` rows and
//! decides who is a celebrity (posts merged on read instead of fanned out).

use sea_orm::entity::prelude::*;

/// A user row.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "users")]
pub struct Model {
    /// Snowflake id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: i64,
    /// Unique, lower-case handle.
    #[sea_orm(unique)]
    pub handle: String,
    /// argon2id PHC string.
    pub password_hash: String,
    /// How many users follow this one.
    pub follower_count: i64,
    /// How many users this one follows.
    pub following_count: i64,
    /// Sign-up time.
    pub created_at: DateTimeUtc,
}

/// No navigable relations are needed by the queries.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
