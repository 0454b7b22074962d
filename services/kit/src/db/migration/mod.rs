//! Schema migrations (sea-orm-migration), identical on SQLite and PostgreSQL.

use sea_orm_migration::prelude::*;

mod m20261125_000001_feed;
mod m20261125_000002_chat;

/// Every migration, in order.
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261125_000001_feed::Migration),
            Box::new(m20261125_000002_chat::Migration),
        ]
    }
}
