//! Migrations and entities on both databases.

use chrono::Utc;
use loadlab_kit::db::{self, DbSettings, entity::follow, entity::post, entity::user};
use loadlab_kit::test_support;
use sea_orm::{ActiveModelTrait, EntityTrait, Set, SqlErr};

async fn migrations_apply_twice_and_entities_round_trip(settings: DbSettings) {
    let conn = db::connect(&settings).await.expect("connect");
    db::migrate(&conn).await.expect("first migration");
    db::migrate(&conn)
        .await
        .expect("second migration is a no-op");
    db::ping(&conn).await.expect("ping");

    let now = Utc::now();
    for (id, handle) in [(1i64, "ada"), (2, "grace")] {
        user::ActiveModel {
            id: Set(id),
            handle: Set(handle.into()),
            password_hash: Set("x".into()),
            follower_count: Set(0),
            following_count: Set(0),
            created_at: Set(now),
        }
        .insert(&conn)
        .await
        .expect("insert user");
    }
    let duplicate = user::ActiveModel {
        id: Set(3),
        handle: Set("ada".into()),
        password_hash: Set("x".into()),
        follower_count: Set(0),
        following_count: Set(0),
        created_at: Set(now),
    }
    .insert(&conn)
    .await
    .expect_err("handles are unique");
    assert!(matches!(
        duplicate.sql_err(),
        Some(SqlErr::UniqueConstraintViolation(_))
    ));

    follow::ActiveModel {
        follower_id: Set(2),
        followee_id: Set(1),
        created_at: Set(now),
    }
    .insert(&conn)
    .await
    .expect("insert follow");
    let orphan = post::ActiveModel {
        id: Set(10),
        author_id: Set(99),
        body: Set("no author".into()),
        created_at: Set(now),
        fanned_out_at: Set(None),
    }
    .insert(&conn)
    .await
    .expect_err("posts need an existing author");
    assert!(matches!(
        orphan.sql_err(),
        Some(SqlErr::ForeignKeyConstraintViolation(_))
    ));
    post::ActiveModel {
        id: Set(11),
        author_id: Set(1),
        body: Set("héllo ✓".into()),
        created_at: Set(now),
        fanned_out_at: Set(None),
    }
    .insert(&conn)
    .await
    .expect("insert post");
    let stored = post::Entity::find_by_id(11)
        .one(&conn)
        .await
        .expect("find")
        .expect("row");
    assert_eq!(stored.body, "héllo ✓");
    assert_eq!(stored.created_at.timestamp_millis(), now.timestamp_millis());
    assert_eq!(stored.fanned_out_at, None);
}

#[tokio::test]
async fn postgres_migrations_and_entities() {
    migrations_apply_twice_and_entities_round_trip(test_support::postgres_db()).await;
}

#[tokio::test]
async fn sqlite_migrations_and_entities() {
    migrations_apply_twice_and_entities_round_trip(test_support::sqlite_db()).await;
}

#[tokio::test]
async fn invalid_schema_names_are_refused() {
    let mut settings = test_support::postgres_db();
    settings.schema = "bad; drop table users".into();
    let err = db::connect(&settings).await.expect_err("refused");
    assert!(err.to_string().contains("schema"), "{err}");
}
