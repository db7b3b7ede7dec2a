//! Upgrading from release 0.1: a database written by that release (tests/fixtures/
//! release-0.1.rdb) is migrated to this release's key names once, and then served as before.
//!
//! The fixture was written by release 0.1's own code: stream `orders` (retention 20 years,
//! max_length 100,000) with 6 entries `{"n": 0..5}`; group `billing`, whose consumer
//! `worker-1` acked n=0 and n=1, dead-lettered n=2 ("fixture: handler gave up") and crashed
//! holding n=3..5. Its keys: `orders`, `orders-dead`, `streamwise:meta:orders`,
//! `streamwise:checkpoint:orders`, `streamwise:consumers:orders:billing`.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use streamwise::redis::admin::{self, StreamSettings};
use streamwise::redis::{RedisBackend, RedisConnection};
use streamwise::{Message, Publisher, SubscribeOptions, Subscriber};

use common::RedisServer;

const WAIT: Duration = Duration::from_secs(20);

/// A private server holding the release-0.1 fixture.
fn server_with_release_0_1_data() -> RedisServer {
    let mut server = RedisServer::start();
    server.kill();
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/release-0.1.rdb");
    std::fs::copy(fixture, server.dir().join("dump.rdb")).expect("copy the fixture");
    server.restart();
    assert_eq!(
        server.command("DBSIZE"),
        ":5",
        "the fixture's five keys are loaded"
    );
    server
}

fn sorted(pairs: &[(String, String)]) -> Vec<(&str, &str)> {
    let mut v: Vec<_> = pairs.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    v.sort();
    v
}

/// Reclaim of entries idle for a day only: what a test sees taken over is the crash detection's.
fn day_long_reclaim() -> streamwise::ReclaimOptions {
    let day = Duration::from_secs(86_400);
    streamwise::ReclaimOptions::new(Duration::from_millis(100), day)
}

#[tokio::test]
async fn a_release_0_1_database_is_migrated_once_and_served_as_before() -> streamwise::Result<()> {
    let server = server_with_release_0_1_data();
    let conn = RedisConnection::new(&server.url())?;
    // A consumer of the dead letters kept a checkpoint too: it follows its stream's new name.
    server.command("HSET streamwise:checkpoint:orders-dead audit:a {}");

    let done = admin::migrate_key_names(&conn).await?;
    assert_eq!(
        sorted(&done.moved),
        vec![
            ("orders-dead", "{orders}-dead"),
            ("streamwise:checkpoint:orders", "streamwise:checkpoint:{orders}"),
            (
                "streamwise:checkpoint:orders-dead",
                "streamwise:checkpoint:{orders}-dead"
            ),
            (
                "streamwise:consumers:orders:billing",
                "streamwise:consumers:{orders}:billing"
            ),
            ("streamwise:meta:orders", "streamwise:meta:{orders}"),
        ]
    );
    assert!(done.left.is_empty(), "{done:?}");
    let again = admin::migrate_key_names(&conn).await?;
    assert!(
        again.moved.is_empty() && again.left.is_empty(),
        "a second run finds nothing: {again:?}"
    );

    // The stream's settings apply again.
    let (settings, created_at) = admin::stream_settings(&conn, "orders").await?;
    let twenty_years = 20 * 365 * 86_400_000;
    assert_eq!(
        settings,
        StreamSettings {
            retention_ms: Some(twenty_years),
            max_length: Some(100_000)
        }
    );
    assert!(created_at.is_some());

    // The checkpoint is where the new release looks for it: at the last acked entry, n=1.
    let store = streamwise::redis::RedisCheckpointStore::new(conn.clone());
    let checkpoint =
        streamwise::checkpoint::CheckpointStore::load(&store, "orders", "billing", "worker-1").await?;
    let mut raw = redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let first_two: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg("orders")
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(2)
        .query_async(&mut raw)
        .await
        .expect("XRANGE");
    let second = first_two.ids[1].id.clone();
    assert_eq!(checkpoint.map(|c| c.message_id.to_string()), Some(second));

    // The dead letter is read from the new dead-letter stream, with its reason.
    let redis = RedisBackend::with_connection(conn.clone());
    let subscriber = redis.subscriber()?;
    let mut dead = subscriber
        .subscribe(
            "{orders}-dead",
            SubscribeOptions::new("inspect", "i").start_from(streamwise::StartFrom::Beginning),
        )
        .await?;
    let record = tokio::time::timeout(WAIT, dead.next())
        .await
        .expect("the dead letter in time")
        .expect("open")?;
    assert_eq!(record.message().json()?, serde_json::json!({"n": 2}));
    assert_eq!(
        record
            .message()
            .metadata()
            .get(streamwise::dead_letter::keys::REASON),
        Some("fixture: handler gave up")
    );
    record.ack().await?;

    // The crashed worker-1 is known from the migrated registry: worker-2 takes its entries over
    // at once, and then reads what is new. Its entries are touched first, as if worker-1 had
    // crashed just now, so that reclaim by idle time (one day) cannot hand them out: only the
    // crash detection can.
    let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg("orders")
        .arg("billing")
        .arg("-")
        .arg("+")
        .arg(10)
        .query_async(&mut raw)
        .await
        .expect("XPENDING");
    assert_eq!(pending.len(), 3);
    let mut touch = redis::cmd("XCLAIM");
    touch.arg("orders").arg("billing").arg("worker-1").arg(0);
    for (id, ..) in &pending {
        touch.arg(id);
    }
    let _: redis::Value = touch.arg("JUSTID").query_async(&mut raw).await.expect("XCLAIM");
    redis
        .publisher()
        .publish(
            "orders",
            Message::new("order.placed", &serde_json::json!({"n": 6}))?,
        )
        .await?;
    let mut orders = subscriber
        .subscribe(
            "orders",
            SubscribeOptions::new("billing", "worker-2").reclaim(day_long_reclaim()),
        )
        .await?;
    let mut seen = BTreeSet::new();
    while seen.len() < 4 {
        let d = tokio::time::timeout(WAIT, orders.next())
            .await
            .expect("deliveries in time")
            .expect("open")?;
        seen.insert(d.message().json()?["n"].as_u64().expect("n"));
        d.ack().await?;
    }
    assert_eq!(seen, BTreeSet::from([3, 4, 5, 6]));
    subscriber.close().await?;
    assert_eq!(redis.pending_count("orders", "billing").await?, 0);
    Ok(())
}

#[tokio::test]
async fn without_the_migration_the_old_keys_are_left_untouched() -> streamwise::Result<()> {
    let server = server_with_release_0_1_data();
    let redis = RedisBackend::new(&server.url())?;
    // The new release serves the stream and its group; it neither reads nor removes 0.1's keys.
    redis
        .publisher()
        .publish(
            "orders",
            Message::new("order.placed", &serde_json::json!({"n": 6}))?,
        )
        .await?;
    assert_eq!(redis.pending_count("orders", "billing").await?, 3);
    let (settings, _) = admin::stream_settings(redis.connection(), "orders").await?;
    assert_eq!(
        settings,
        StreamSettings::default(),
        "0.1's settings are not read under the new name"
    );
    for key in [
        "orders-dead",
        "streamwise:meta:orders",
        "streamwise:consumers:orders:billing",
    ] {
        assert_eq!(server.command(&format!("EXISTS {key}")), ":1", "{key}");
    }
    // And the migration still finds them afterwards.
    assert_eq!(admin::migrate_key_names(redis.connection()).await?.moved.len(), 4);
    Ok(())
}
