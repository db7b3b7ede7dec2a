//! `streamwise::redis::ops` as a library, against private redis-servers: the repairs check
//! for live consumers in the same step as they write (a consumer that starts between the
//! first look and the write is seen), live consumers are found without scanning the keyspace,
//! bad durations are no panic, and the replay's resume key goes when its run or its stream
//! does. The CLI's own tests (`cli/tests/cli.rs`) cover the commands end to end.

mod common;

use streamwise::redis::client::{Value, cmd};
use streamwise::redis::ops::{self, Mode, ReplayOptions};
use streamwise::redis::{RedisBackend, RedisConnection, admin};
use streamwise::{Message, Publisher};

use common::RedisServer;

async fn cmd_on(conn: &RedisConnection, args: &[&str]) -> Value {
    let mut c = cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    conn.command(&c).await.unwrap()
}

async fn exists(conn: &RedisConnection, key: &str) -> bool {
    matches!(cmd_on(conn, &["EXISTS", key]).await, Value::Int(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_key_goes_when_its_run_ends_on_an_empty_stream_or_its_stream_is_deleted() {
    let server = RedisServer::start();
    let redis = RedisBackend::new(&server.url()).unwrap();
    let conn = redis.connection();
    let key = "streamwise:replay:{orders}-dead";
    let record = |n: i32| {
        streamwise::dead_letter::DeadLetter {
            reason: "payment service down",
            original_id: streamwise::EntryId::new(1, 0),
            stream: "orders",
            group: "billing",
            delivery_count: 3,
        }
        .for_message(&Message::new("order.placed", &n).unwrap())
    };
    let add_records = || async {
        let publisher = redis.publisher();
        for n in 0..3 {
            publisher.publish("{orders}-dead", record(n)).await.unwrap();
        }
    };
    let interrupted_run = || async {
        // Stopped at once: the run ends after its first record.
        let report = ops::replay_dead_letters(
            conn,
            "orders",
            &ReplayOptions::new(Mode::Execute),
            std::future::ready(()),
            &mut |_, _| {},
        )
        .await
        .unwrap();
        assert!(report.interrupted && report.replayed == 1, "{report:?}");
    };
    add_records().await;
    interrupted_run().await;
    assert!(exists(conn, key).await);

    // The rest is purged; the next run has nothing to replay, and finishes: the key goes.
    ops::purge_dead_letters(conn, "orders", None, Mode::Execute)
        .await
        .unwrap();
    let report = ops::replay_dead_letters(
        conn,
        "orders",
        &ReplayOptions::new(Mode::Execute),
        std::future::pending(),
        &mut |_, _| {},
    )
    .await
    .unwrap();
    assert!(report.bounds[0].resumed && report.replayed == 0, "{report:?}");
    assert!(!exists(conn, key).await);

    // Deleting the dead-letter stream deletes an unfinished run's key with it.
    add_records().await;
    interrupted_run().await;
    assert!(exists(conn, key).await);
    admin::delete_stream(conn, "{orders}-dead").await.unwrap();
    assert!(!exists(conn, key).await);
}
