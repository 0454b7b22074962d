//! channels, channel_members, messages.

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
                    .table("channels")
                    .if_not_exists()
                    .col(big_integer("id").primary_key())
                    .col(string_len("name", 100))
                    .col(big_integer("created_by"))
                    .col(timestamp_with_time_zone("created_at"))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_channels_creator")
                            .from("channels", "created_by")
                            .to("users", "id")
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("channel_members")
                    .if_not_exists()
                    .col(big_integer("channel_id"))
                    .col(big_integer("user_id"))
                    .col(timestamp_with_time_zone("joined_at"))
                    .primary_key(Index::create().col("channel_id").col("user_id"))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_members_channel")
                            .from("channel_members", "channel_id")
                            .to("channels", "id")
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_members_user")
                            .from("channel_members", "user_id")
                            .to("users", "id")
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("messages")
                    .if_not_exists()
                    .col(big_integer("id").primary_key())
                    .col(big_integer("channel_id"))
                    .col(big_integer("sender_id"))
                    .col(string_len("client_msg_id", 64))
                    .col(text("body"))
                    .col(timestamp_with_time_zone("created_at"))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_messages_channel")
                            .from("messages", "channel_id")
                            .to("channels", "id")
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_messages_sender")
                            .from("messages", "sender_id")
                            .to("users", "id")
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        // Retries of one send are one message.
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("ux_messages_sender_client_msg")
                    .table("messages")
                    .col("sender_id")
                    .col("client_msg_id")
                    .unique()
                    .to_owned(),
            )
            .await?;
        // History: a channel's messages, newest first.
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("idx_messages_channel_id")
                    .table("messages")
                    .col("channel_id")
                    .col("id")
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in ["messages", "channel_members", "channels"] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
