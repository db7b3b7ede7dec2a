//! Retention that keeps its promise (issue 20): a quiet stream is trimmed by its settings, by
//! one of three processes' tasks; safe trims never remove what a group still needs, and a group
//! idle past its age stops holding them back.

mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;
use streamwise::redis::admin::{self, StreamSettings};
use streamwise::redis::client::cmd;
use streamwise::redis::retention::{Retention, TrimPolicy, trim};
use streamwise::redis::{RedisBackend, RedisConnection};
use streamwise::{Message, Publisher, SubscribeOptions, Subscriber};

use common::RedisServer;

async fn len(conn: &RedisConnection, stream: &str) -> u64 {
    conn.command(cmd("XLEN").arg(stream)).await.unwrap()
}

/// Waits until every consumer of `group` has been idle longer than `age`.
async fn idle_past(conn: &RedisConnection, stream: &str, group: &str, age: Duration) {
    let since = Instant::now();
    loop {
        let consumers = admin::consumers(conn, stream, group, Duration::MAX)
            .await
            .unwrap();
        if consumers.iter().all(|c| u128::from(c.idle_ms) > age.as_millis()) {
            return;
        }
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "{group} never idled past {age:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_stream_is_trimmed_by_its_retention_by_one_of_three_tasks() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let conn = backend.connection().clone();
    let settings = StreamSettings {
        retention_ms: Some(2_000),
        max_length: None,
    };
    admin::create_stream(&conn, "quiet", settings).await.unwrap();
    let publisher = backend.publisher();
    // One batch: the entries age together, so one trim takes them all.
    let batch = (0..10).map(|n| Message::new("t", &n).unwrap()).collect();
    publisher.publish_batch("quiet", batch).await.unwrap();
    let published = Instant::now();
    // Three processes' tasks, each on a connection of its own.
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            Retention::new(RedisConnection::new(&server.url()).unwrap())
                .interval(Duration::from_millis(200))
                .spawn()
        })
        .collect();
    while len(&conn, "quiet").await > 0 {
        assert!(published.elapsed() < Duration::from_secs(10), "never trimmed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = published.elapsed();
    eprintln!("trimmed {took:?} after the last publish (retention 2 s)");
    assert!(
        took >= Duration::from_millis(1_900),
        "trimmed after {took:?}, before the entries aged"
    );
    // A task counts its trim once the script's answer is back, a moment after the stream
    // emptied: wait for the count rather than read it at once.
    let removed = loop {
        let removed: Vec<u64> = tasks.iter().map(|t| t.stats().removed()).collect();
        if removed.iter().sum::<u64>() >= 10 || published.elapsed() > Duration::from_secs(10) {
            break removed;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(removed.iter().sum::<u64>(), 10, "{removed:?}");
    assert_eq!(
        removed.iter().filter(|r| **r > 0).count(),
        1,
        "one task trimmed: {removed:?}"
    );
    for task in tasks {
        task.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_safe_trim_keeps_what_groups_need_until_they_idle_past_their_age() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let conn = backend.connection().clone();
    let publisher = backend.publisher();
    for n in 0..20 {
        publisher
            .publish("needed", Message::new("t", &n).unwrap())
            .await
            .unwrap();
    }
    // A group with a live consumer that has read nothing yet (it lags behind everything) ...
    let subscriber = backend.subscriber().unwrap();
    let lagging = subscriber
        .subscribe("needed", SubscribeOptions::new("lagging", "w1"))
        .await
        .unwrap();
    // ... and a group of another client holding the first three entries pending.
    let _: redis::Value = conn
        .command(cmd("XGROUP").arg("CREATE").arg("needed").arg("holding").arg("0"))
        .await
        .unwrap();
    let _: redis::Value = conn
        .command(
            cmd("XREADGROUP")
                .arg("GROUP")
                .arg("holding")
                .arg("x")
                .arg("COUNT")
                .arg(3)
                .arg("STREAMS")
                .arg("needed")
                .arg(">"),
        )
        .await
        .unwrap();
    let by_length = TrimPolicy::default().max_length(5);
    let by_time = TrimPolicy::default().retention(Duration::ZERO);
    for policy in [&by_length, &by_time] {
        let trimmed = trim(&conn, "needed", policy).await.unwrap();
        assert_eq!(trimmed.removed, 0, "{policy:?}");
        assert!(trimmed.held_back);
    }
    assert_eq!(len(&conn, "needed").await, 20);

    // The lagging group reads and acknowledges everything: the pending three still hold.
    let mut lagging = lagging;
    for _ in 0..20 {
        lagging.next().await.unwrap().unwrap().ack().await.unwrap();
    }
    lagging.flush().await.unwrap();
    let trimmed = trim(&conn, "needed", &by_length).await.unwrap();
    assert_eq!((trimmed.removed, trimmed.held_back), (0, true));

    // Once the holding group's consumer idles past the age, it no longer holds back.
    let age = Duration::from_millis(300);
    idle_past(&conn, "needed", "holding", age).await;
    let trimmed = trim(&conn, "needed", &by_length.clone().idle_group_age(age))
        .await
        .unwrap();
    // (The other group may have idled that long too: it needs nothing any more.)
    assert!(
        trimmed.idle_groups.iter().any(|g| g == "holding"),
        "{:?}",
        trimmed.idle_groups
    );
    assert_eq!(trimmed.removed, 15);
    assert_eq!(len(&conn, "needed").await, 5);
    // Unsafe (the seed's time and length limits): whatever groups need.
    publisher
        .publish("needed", Message::new("t", &20).unwrap())
        .await
        .unwrap();
    let trimmed = trim(&conn, "needed", &by_length.clone().safe(false))
        .await
        .unwrap();
    assert_eq!(trimmed.removed, 1);
    drop(lagging);
    subscriber.close().await.unwrap();
}

/// The background task counts what it did: a trim a group held back, then, once the group's
/// consumer idled past the task's age, the group passed over (and the trim done).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_task_counts_held_back_trims_and_the_idle_groups_it_passes_over() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let conn = backend.connection().clone();
    let settings = StreamSettings {
        retention_ms: None,
        max_length: Some(2),
    };
    admin::create_stream(&conn, "counted", settings).await.unwrap();
    let batch = (0..5).map(|n| Message::new("t", &n).unwrap()).collect();
    backend.publisher().publish_batch("counted", batch).await.unwrap();
    let _: redis::Value = conn
        .command(cmd("XGROUP").arg("CREATE").arg("counted").arg("holding").arg("0"))
        .await
        .unwrap();
    let _: redis::Value = conn
        .command(
            cmd("XREADGROUP")
                .arg("GROUP")
                .arg("holding")
                .arg("x")
                .arg("COUNT")
                .arg(3)
                .arg("STREAMS")
                .arg("counted")
                .arg(">"),
        )
        .await
        .unwrap();
    let patient = Retention::new(RedisConnection::new(&server.url()).unwrap())
        .interval(Duration::from_millis(50))
        .spawn();
    let since = Instant::now();
    while patient.stats().held_back() == 0 {
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "no held-back trim counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(patient.stats().idle_groups_ignored(), 0);
    assert_eq!(patient.stats().removed(), 0);
    assert_eq!(len(&conn, "counted").await, 5);
    patient.stop().await;

    // The holding group's one consumer idles past 100 ms: a task with that age passes it over.
    let age = Duration::from_millis(100);
    idle_past(&conn, "counted", "holding", age).await;
    let lenient = Retention::new(RedisConnection::new(&server.url()).unwrap())
        .interval(Duration::from_millis(50))
        .idle_group_age(age)
        .spawn();
    let since = Instant::now();
    while lenient.stats().removed() < 3 {
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "the idle group still held back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(lenient.stats().idle_groups_ignored() >= 1);
    assert_eq!(len(&conn, "counted").await, 2);
    lenient.stop().await;
}

/// The seed facade: the configuration's `retention:` section starts the task, which trims a
/// quiet stream made by `StreamManager::create_stream`; `apply_retention` trims one stream
/// now, safely unless told otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_facade_and_its_configuration_run_retention() {
    use streamwise::redis_streams::{
        Config, ConsumerGroupManager, RetentionOptions, StreamManager, StreamOptions,
    };
    let server = RedisServer::start();
    let url = server.url();
    let manager = StreamManager::new(&url).unwrap();
    let conn = RedisConnection::new(&url).unwrap();
    let publisher = RedisBackend::new(&url).unwrap().publisher();
    let aging = StreamOptions {
        retention_ms: Some(500),
        max_length: None,
    };
    for stream in ["quiet", "held"] {
        manager.create_stream(stream, aging).await.unwrap();
        let batch = (0..5).map(|n| Message::new("t", &n).unwrap()).collect();
        publisher.publish_batch(stream, batch).await.unwrap();
    }

    // Disabled by default: nothing is started.
    let off = Config::from_yaml_str("redis_streams:\n  retention:\n    interval_ms: 100\n").unwrap();
    assert!(off.start_retention().unwrap().is_none());

    // `held` has a group holding all five entries pending: a safe trim leaves them.
    let groups = ConsumerGroupManager::new(&url).unwrap();
    groups.create_group("held", "g", "0").await.unwrap();
    let _: redis::Value = conn
        .command(
            cmd("XREADGROUP")
                .arg("GROUP")
                .arg("g")
                .arg("c")
                .arg("STREAMS")
                .arg("held")
                .arg(">"),
        )
        .await
        .unwrap();

    let yaml =
        format!("redis_streams:\n  url: {url}\n  retention:\n    enabled: true\n    interval_ms: 100\n");
    let task = Config::from_yaml_str(&yaml)
        .unwrap()
        .start_retention()
        .unwrap()
        .expect("enabled");
    let started = Instant::now();
    while len(&conn, "quiet").await > 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "never trimmed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Trims of `held` ran meanwhile and were held back; the task counts a trim a moment after
    // the stream emptied, so its count is awaited too.
    while task.stats().held_back() == 0 || task.stats().removed() < 5 {
        assert!(started.elapsed() < Duration::from_secs(10), "held was not tried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(len(&conn, "held").await, 5);
    assert_eq!(task.stats().removed(), 5);
    task.stop().await;

    let safe = manager
        .apply_retention("held", RetentionOptions::default())
        .await
        .unwrap();
    assert!(safe.held_back && safe.removed == 0, "{safe:?}");
    let unsafe_trim = RetentionOptions {
        safe: false,
        ..RetentionOptions::default()
    };
    let forced = manager.apply_retention("held", unsafe_trim).await.unwrap();
    assert_eq!(forced.removed, 5, "{forced:?}");
    let bad = RetentionOptions {
        interval_ms: 10,
        ..RetentionOptions::default()
    };
    assert_eq!(
        manager.start_retention(bad).unwrap_err().invalid_field(),
        Some("interval_ms")
    );
}
