//! users, follows, posts.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("users")
                    .if_not_exists()
                    .col(big_integer("id").primary_key())
                    .col(string_len("handle", 64).unique_key())
                    .col(text("password_hash"))
                    .col(big_integer("follower_count").default(0))
                    .col(big_integer("following_count").default(0))
                    .col(timestamp_with_time_zone("created_at"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("follows")
                    .if_not_exists()
                    .col(big_integer("follower_id"))
                    .col(big_integer("followee_id"))
                    .col(timestamp_with_time_zone("created_at"))
                    .primary_key(Index::create().col("follower_id").col("followee_id"))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_follows_follower")
                            .from("follows", "follower_id")
                            .to("users", "id")
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_follows_followee")
                            .from("follows", "followee_id")
                            .to("users", "id")
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        // Followers of a user, in id order: fan-out pages through this.
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("idx_follows_followee")
                    .table("follows")
                    .col("followee_id")
                    .col("follower_id")
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("posts")
                    .if_not_exists()
                    .col(big_integer("id").primary_key())
                    .col(big_integer("author_id"))
                    .col(text("body"))
                    .col(timestamp_with_time_zone("created_at"))
                    .col(timestamp_with_time_zone_null("fanned_out_at"))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_posts_author")
                            .from("posts", "author_id")
                            .to("users", "id")
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        // A user's posts, newest first: user timelines and timeline rebuilds.
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("idx_posts_author_id")
                    .table("posts")
                    .col("author_id")
                    .col("id")
                    .to_owned(),
            )
            .await?;
        // The outbox sweep looks only at posts whose fan-out has not completed; a partial index
        // keeps it tiny. Same syntax on SQLite and PostgreSQL.
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE INDEX IF NOT EXISTS idx_posts_pending_fanout ON posts (id) WHERE fanned_out_at IS NULL",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table("posts").if_exists().to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table("follows").if_exists().to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table("users").if_exists().to_owned())
            .await?;
        Ok(())
    }
}
