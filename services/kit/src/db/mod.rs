//! The database: sea-orm entities and migrations for users, follows and posts, on SQLite (the
//! embedded default) and PostgreSQL. It is the source of truth; engines only cache.

use std::time::Duration;

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbErr};
use sea_orm_migration::MigratorTrait;

pub mod entity;
pub mod migration;

pub use migration::Migrator;

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct DbSettings {
    /// `sqlite://…` or `postgres://…`.
    pub url: String,
    /// PostgreSQL schema (created if missing); empty for the default.
    pub schema: String,
    /// Pool size.
    pub max_connections: u32,
}

impl DbSettings {
    fn is_sqlite(&self) -> bool {
        self.url.starts_with("sqlite:")
    }
}

/// Connects (and, for PostgreSQL with a schema, creates the schema and points `search_path` at it).
pub async fn connect(settings: &DbSettings) -> Result<DatabaseConnection, DbErr> {
    if !settings.is_sqlite() && !settings.schema.is_empty() {
        validate_schema_name(&settings.schema)?;
        let bootstrap = Database::connect(base_options(settings, 1)).await?;
        bootstrap
            .execute_unprepared(&format!(
                "CREATE SCHEMA IF NOT EXISTS \"{}\"",
                settings.schema
            ))
            .await?;
        bootstrap.close().await?;
    }
    let mut options = base_options(settings, settings.max_connections);
    if !settings.is_sqlite() && !settings.schema.is_empty() {
        options.set_schema_search_path(settings.schema.clone());
    }
    Database::connect(options).await
}

fn base_options(settings: &DbSettings, max_connections: u32) -> ConnectOptions {
    let mut options = ConnectOptions::new(settings.url.clone());
    options
        .max_connections(max_connections)
        .min_connections(1)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(5))
        .sqlx_logging(false);
    if settings.is_sqlite() {
        // WAL lets readers proceed during writes; the busy timeout serialises writers instead of
        // failing them with SQLITE_BUSY under concurrent posting.
        options.map_sqlx_sqlite_opts(|o| {
            o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
        });
    }
    options
}

fn validate_schema_name(schema: &str) -> Result<(), DbErr> {
    let ok = !schema.is_empty()
        && schema.len() <= 63
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !schema.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(DbErr::Custom(format!(
            "database schema {schema:?} must be 1-63 characters of a-z, 0-9 and _, not starting with a digit"
        )))
    }
}

/// Applies pending migrations.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    Migrator::up(db, None).await
}

/// Ok when the database answers a trivial query.
pub async fn ping(db: &DatabaseConnection) -> Result<(), DbErr> {
    db.ping().await
}
