//! Channels, memberships and messages in the database.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use loadlab_kit::Id;
use loadlab_kit::db::entity::{channel, channel_member, message};
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, DatabaseConnection, DbErr, EntityTrait,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set, SqlErr,
};

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The channel does not exist.
    #[error("channel {0} not found")]
    UnknownChannel(Id),
    /// The user does not exist.
    #[error("user {0} not found")]
    UnknownUser(Id),
    /// A message names a channel or sender that does not exist.
    #[error("a message refers to a channel or user that does not exist")]
    DanglingReference,
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] DbErr),
}

/// A message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Id.
    pub id: Id,
    /// Channel.
    pub channel: Id,
    /// Sender.
    pub sender: Id,
    /// Text.
    pub body: String,
    /// When it became durable.
    pub created_at: DateTime<Utc>,
}

/// A message to write.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Id minted by the gateway.
    pub id: Id,
    /// Channel.
    pub channel: Id,
    /// Sender.
    pub sender: Id,
    /// Sender's idempotency key.
    pub client_msg_id: String,
    /// Text.
    pub body: String,
}

/// The chat tables.
#[derive(Clone)]
pub struct ChatStore {
    db: DatabaseConnection,
}

impl ChatStore {
    /// A store over `db`.
    pub fn new(db: DatabaseConnection) -> Self {
        ChatStore { db }
    }

    /// The database handle.
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Creates a channel; its creator becomes a member.
    pub async fn create_channel(&self, id: Id, name: &str, creator: Id) -> Result<(), StoreError> {
        let now = Utc::now();
        let created = channel::ActiveModel {
            id: Set(id.as_i64()),
            name: Set(name.to_owned()),
            created_by: Set(creator.as_i64()),
            created_at: Set(now),
        }
        .insert(&self.db)
        .await;
        match created {
            Ok(_) => {}
            Err(e) if matches!(e.sql_err(), Some(SqlErr::ForeignKeyConstraintViolation(_))) => {
                return Err(StoreError::UnknownUser(creator));
            }
            Err(e) => return Err(e.into()),
        }
        self.join(id, creator).await
    }

    /// Whether the channel exists.
    pub async fn channel_exists(&self, id: Id) -> Result<bool, StoreError> {
        Ok(channel::Entity::find_by_id(id.as_i64())
            .count(&self.db)
            .await?
            > 0)
    }

    /// Makes `user` a member of `channel` (idempotent).
    pub async fn join(&self, channel: Id, user: Id) -> Result<(), StoreError> {
        let inserted = channel_member::Entity::insert(channel_member::ActiveModel {
            channel_id: Set(channel.as_i64()),
            user_id: Set(user.as_i64()),
            joined_at: Set(Utc::now()),
        })
        .on_conflict(
            OnConflict::columns([
                channel_member::Column::ChannelId,
                channel_member::Column::UserId,
            ])
            .do_nothing()
            .to_owned(),
        )
        .exec_without_returning(&self.db)
        .await;
        match inserted {
            Ok(_) | Err(DbErr::RecordNotInserted) => Ok(()),
            Err(e) if matches!(e.sql_err(), Some(SqlErr::ForeignKeyConstraintViolation(_))) => {
                if self.channel_exists(channel).await? {
                    Err(StoreError::UnknownUser(user))
                } else {
                    Err(StoreError::UnknownChannel(channel))
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Whether `user` is a member of `channel`.
    pub async fn is_member(&self, channel: Id, user: Id) -> Result<bool, StoreError> {
        Ok(
            channel_member::Entity::find_by_id((channel.as_i64(), user.as_i64()))
                .count(&self.db)
                .await?
                > 0,
        )
    }

    /// A page of a channel's messages, newest first, older than `before` when given.
    pub async fn history(
        &self,
        channel: Id,
        before: Option<Id>,
        limit: u64,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let mut query =
            message::Entity::find().filter(message::Column::ChannelId.eq(channel.as_i64()));
        if let Some(b) = before {
            query = query.filter(message::Column::Id.lt(b.as_i64()));
        }
        let rows = query
            .order_by_desc(message::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?;
        Ok(rows.into_iter().map(stored).collect())
    }

    /// Writes a batch in one statement; duplicates of `(sender, client_msg_id)` are skipped.
    /// Returns, per message, the stored id (its own, or the original's for a retry).
    pub async fn insert_batch(
        &self,
        batch: &[NewMessage],
    ) -> Result<Vec<(Id, DateTime<Utc>)>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let now = Utc::now();
        let rows = batch.iter().map(|m| message::ActiveModel {
            id: Set(m.id.as_i64()),
            channel_id: Set(m.channel.as_i64()),
            sender_id: Set(m.sender.as_i64()),
            client_msg_id: Set(m.client_msg_id.clone()),
            body: Set(m.body.clone()),
            created_at: Set(now),
        });
        let inserted = message::Entity::insert_many(rows)
            .on_conflict(
                OnConflict::columns([message::Column::SenderId, message::Column::ClientMsgId])
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(&self.db)
            .await;
        match inserted {
            Ok(_) | Err(DbErr::RecordNotInserted) => {}
            Err(e) if matches!(e.sql_err(), Some(SqlErr::ForeignKeyConstraintViolation(_))) => {
                // The committer retries message by message so one bad message cannot sink
                // the batch.
                return Err(StoreError::DanglingReference);
            }
            Err(e) => return Err(e.into()),
        }
        let mut keys = Condition::any();
        for m in batch {
            keys = keys.add(
                Condition::all()
                    .add(message::Column::SenderId.eq(m.sender.as_i64()))
                    .add(message::Column::ClientMsgId.eq(m.client_msg_id.clone())),
            );
        }
        let found: Vec<(i64, i64, String, DateTime<Utc>)> = message::Entity::find()
            .select_only()
            .column(message::Column::Id)
            .column(message::Column::SenderId)
            .column(message::Column::ClientMsgId)
            .column(message::Column::CreatedAt)
            .filter(keys)
            .into_tuple()
            .all(&self.db)
            .await?;
        let by_key: HashMap<(i64, String), (Id, DateTime<Utc>)> = found
            .into_iter()
            .map(|(id, sender, cmid, at)| ((sender, cmid), (Id::from_i64(id), at)))
            .collect();
        batch
            .iter()
            .map(|m| {
                by_key
                    .get(&(m.sender.as_i64(), m.client_msg_id.clone()))
                    .copied()
                    .ok_or_else(|| {
                        StoreError::Db(DbErr::Custom(format!(
                            "message {} vanished after insert",
                            m.id
                        )))
                    })
            })
            .collect()
    }
}

fn stored(m: message::Model) -> StoredMessage {
    StoredMessage {
        id: Id::from_i64(m.id),
        channel: Id::from_i64(m.channel_id),
        sender: Id::from_i64(m.sender_id),
        body: m.body,
        created_at: m.created_at,
    }
}
