//! The seed contract (producer-api.md, consumer-api.md, data-model.md, quickstart.md) against a
//! real redis-server: every method, default, validation rule and error.

mod common;

use common::seed::{close_and_join, fast_consumer, next_event, run_consumer};

use std::sync::Arc;
use std::time::Duration;

use streamwise::Error;
use streamwise::redis_streams::{
    Backpressure, BackpressureMode, ConsumerGroupManager, ConsumerOptions, ConsumerStatus, ProducerOptions,
    RedisConnection, StreamConsumer, StreamManager, StreamOptions, StreamProducer,
};
use tokio::sync::mpsc;

use common::RedisServer;

const WAIT: Duration = Duration::from_secs(20);

fn conn(server: &RedisServer) -> RedisConnection {
    RedisConnection::new(&server.url()).unwrap()
}

/// Creates `group` on `stream` (and the stream), reading from the start; returns the manager.
async fn group_from_start(server: &RedisServer, stream: &str, group: &str) -> ConsumerGroupManager {
    let groups = ConsumerGroupManager::new(&server.url()).unwrap();
    groups.create_group(stream, group, "0").await.unwrap();
    groups
}

/// The ids of the entries pending for `consumer`.
async fn pending_ids(consumer: &StreamConsumer) -> Vec<String> {
    consumer
        .get_pending()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect()
}

#[tokio::test]
async fn the_quickstart_runs_as_documented() {
    let server = RedisServer::start();
    let url = server.url();
    let manager = StreamManager::new(&url).unwrap();
    let options = StreamOptions {
        max_length: Some(10_000),
        ..StreamOptions::default()
    };
    assert!(manager.create_stream("data-updates", options).await.unwrap());
    let producer = StreamProducer::new(&url, "data-updates").unwrap();
    let message_id = producer
        .publish(
            "price.update",
            &serde_json::json!({"symbol": "AAPL", "price": 150.25}),
            Some([("source", "market-feed")].into()),
        )
        .await
        .unwrap();
    let (ms, seq) = message_id.split_once('-').expect("timestamp-sequence");
    assert!(
        ms.parse::<u64>().is_ok() && seq.parse::<u64>().is_ok(),
        "{message_id}"
    );
    producer.close().await.unwrap();

    let groups = ConsumerGroupManager::new(&url).unwrap();
    assert!(
        groups
            .create_group("data-updates", "processors", "0")
            .await
            .unwrap()
    );
    let consumer = Arc::new(StreamConsumer::new(&url, "data-updates", "processors", "worker-1").unwrap());
    let (mut events, task) = run_consumer(consumer.clone(), Some(vec!["price.update"]), |_| true);
    let msg = next_event(&mut events).await;
    assert_eq!(msg.id, message_id);
    assert_eq!(msg.stream, "data-updates");
    assert_eq!(msg.event_type, "price.update");
    assert_eq!(
        msg.payload,
        serde_json::json!({"symbol": "AAPL", "price": 150.25})
    );
    assert_eq!(msg.metadata.get("source"), Some("market-feed"));
    assert!(
        streamwise::parse_timestamp(&msg.timestamp).is_ok(),
        "{}",
        msg.timestamp
    );
    assert_eq!(msg.delivery_count, 1);
    consumer.close().await.unwrap();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap().unwrap();
    assert!(
        consumer.get_pending().await.unwrap().is_empty(),
        "true acknowledged it"
    );
}

#[tokio::test]
async fn producer_validation_and_errors() {
    let server = RedisServer::start();
    let producer = StreamProducer::new(&server.url(), "s").unwrap();
    let err = producer.publish("", &1, None).await.unwrap_err();
    assert_eq!(err.invalid_field(), Some("event_type"));
    let huge = "x".repeat(1024 * 1024);
    assert!(matches!(
        producer.publish("t", &huge, None).await,
        Err(Error::PayloadTooLarge { limit: 1_048_576, .. })
    ));
    for bad in ["", "has space", "a.b"] {
        let err = StreamProducer::new(&server.url(), bad).unwrap_err();
        assert_eq!(err.invalid_field(), Some("stream_name"), "{bad:?}");
    }
    let err = StreamProducer::new("not-a-url", "s").unwrap_err();
    assert_eq!(err.invalid_field(), Some("redis_url"));
    let zero = ProducerOptions {
        max_length: 0,
        ..ProducerOptions::default()
    };
    assert_eq!(
        StreamProducer::with_options(conn(&server), "s", zero)
            .unwrap_err()
            .invalid_field(),
        Some("max_length")
    );

    let strict = ProducerOptions {
        auto_create_stream: false,
        ..ProducerOptions::default()
    };
    let strict = StreamProducer::with_options(conn(&server), "absent", strict).unwrap();
    assert!(matches!(
        strict.publish("t", &1, None).await,
        Err(Error::StreamNotFound { .. })
    ));

    // Metadata is optional: without it, no metadata field is written.
    let id = producer
        .publish("t", &serde_json::json!({"k": 1}), None)
        .await
        .unwrap();
    assert_eq!(server.command(&format!("XRANGE s {id} {id}")), "*1");
    let info = StreamManager::new(&server.url())
        .unwrap()
        .get_stream_info("s")
        .await
        .unwrap();
    let last = info.last_entry.unwrap();
    assert!(!last.fields.contains_key("metadata"));

    producer.close().await.unwrap();
    producer.close().await.unwrap();
    assert!(matches!(
        producer.publish("t", &1, None).await,
        Err(Error::Closed(_))
    ));

    let port = server.port();
    drop(server);
    let unreachable = RedisConnection::builder(&format!("redis://127.0.0.1:{port}"))
        .max_retries(1)
        .retry_base_delay(Duration::from_millis(5))
        .retry_max_delay(Duration::from_millis(5))
        .build()
        .unwrap();
    let producer = StreamProducer::with_options(unreachable, "s", ProducerOptions::default()).unwrap();
    assert!(matches!(
        producer.publish("t", &1, None).await,
        Err(Error::Connection { .. })
    ));
}

#[tokio::test]
async fn producer_max_length_trims_the_stream() {
    let server = RedisServer::start();
    let options = ProducerOptions {
        max_length: 100,
        ..ProducerOptions::default()
    };
    let producer = StreamProducer::with_options(conn(&server), "capped", options).unwrap();
    for n in 0..600 {
        producer.publish("t", &n, None).await.unwrap();
    }
    let info = StreamManager::new(&server.url())
        .unwrap()
        .get_stream_info("capped")
        .await
        .unwrap();
    assert!((100..=200).contains(&info.length), "length {}", info.length);
}

#[tokio::test]
async fn producer_backpressure_waits_or_fails_fast() {
    let server = RedisServer::start();
    let groups = ConsumerGroupManager::new(&server.url()).unwrap();
    groups.create_group("busy", "slow", "$").await.unwrap();
    let plain = StreamProducer::new(&server.url(), "busy").unwrap();
    for n in 0..5 {
        plain.publish("t", &n, None).await.unwrap();
    }
    let options = |mode| ProducerOptions {
        backpressure: Some(Backpressure::new("slow", 3, mode)),
        ..ProducerOptions::default()
    };
    let fail_fast =
        StreamProducer::with_options(conn(&server), "busy", options(BackpressureMode::FailFast)).unwrap();
    match fail_fast.publish("t", &9, None).await {
        Err(Error::Backpressure {
            lag, limit, group, ..
        }) => assert_eq!((lag, limit, group.as_str()), (5, 3, "slow")),
        other => panic!("expected Backpressure, got {other:?}"),
    }
    let waiting = StreamProducer::with_options(
        conn(&server),
        "busy",
        options(BackpressureMode::Wait {
            max_wait: Duration::from_secs(10),
        }),
    )
    .unwrap();
    let publish = tokio::spawn(async move { waiting.publish("t", &10, None).await });
    // The consumers catch up: the waiting publish goes through.
    server.command("XREADGROUP GROUP slow c COUNT 100 STREAMS busy >");
    let id = tokio::time::timeout(WAIT, publish)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(id.contains('-'));
    let give_up = StreamProducer::with_options(
        conn(&server),
        "busy",
        options(BackpressureMode::Wait {
            max_wait: Duration::from_millis(300),
        }),
    )
    .unwrap();
    for n in 0..5 {
        plain.publish("t", &n, None).await.unwrap();
    }
    let started = tokio::time::Instant::now();
    assert!(matches!(
        give_up.publish("t", &1, None).await,
        Err(Error::Backpressure { .. })
    ));
    assert!(started.elapsed() >= Duration::from_millis(300));
}

/// Redis cannot tell a group's lag after an entry in its unread range was deleted (or, on
/// Redis 7.0, on a replica promoted by a failover): backpressure counts the unread entries
/// itself then, up to one past the limit, instead of silently letting everything through.
#[tokio::test]
async fn producer_backpressure_holds_when_redis_cannot_tell_the_lag() {
    let server = RedisServer::start();
    let groups = ConsumerGroupManager::new(&server.url()).unwrap();
    groups.create_group("unknown-lag", "slow", "$").await.unwrap();
    let plain = StreamProducer::new(&server.url(), "unknown-lag").unwrap();
    let mut ids = Vec::new();
    for n in 0..6 {
        ids.push(plain.publish("t", &n, None).await.unwrap());
    }
    server.command(&format!("XDEL unknown-lag {}", ids[2]));
    let info = streamwise::redis::admin::group_info(&conn(&server), "unknown-lag", "slow")
        .await
        .unwrap();
    assert_eq!(info.lag, None, "Redis reports the lag as unknown");

    let options = ProducerOptions {
        backpressure: Some(Backpressure::new("slow", 3, BackpressureMode::FailFast)),
        ..ProducerOptions::default()
    };
    let producer = StreamProducer::with_options(conn(&server), "unknown-lag", options).unwrap();
    match producer.publish("t", &9, None).await {
        // Counted up to one past the limit.
        Err(Error::Backpressure { lag, limit, .. }) => assert_eq!((lag, limit), (4, 3)),
        other => panic!("expected Backpressure, got {other:?}"),
    }
    // Once the group has read everything, publishing goes on.
    server.command("XREADGROUP GROUP slow c COUNT 100 STREAMS unknown-lag >");
    let relaxed = ProducerOptions {
        backpressure: Some(Backpressure::new("slow", 3, BackpressureMode::FailFast)),
        ..ProducerOptions::default()
    };
    let fresh = StreamProducer::with_options(conn(&server), "unknown-lag", relaxed).unwrap();
    fresh.publish("t", &10, None).await.unwrap();
}

#[tokio::test]
async fn stream_manager_creates_describes_and_deletes() {
    let server = RedisServer::start();
    let manager = StreamManager::new(&server.url()).unwrap();
    assert!(
        manager
            .create_stream("events", StreamOptions::default())
            .await
            .unwrap()
    );
    assert!(
        !manager
            .create_stream("events", StreamOptions::default())
            .await
            .unwrap()
    );
    let info = manager.get_stream_info("events").await.unwrap();
    assert_eq!((info.length, info.groups), (0, 0), "empty, no phantom group");
    assert_eq!(info.first_entry, None);
    assert_eq!(
        info.settings.retention_ms,
        Some(86_400_000),
        "the seed's 24 h default"
    );
    assert_eq!(info.settings.max_length, None);
    assert!(info.created_at.is_some());

    let producer = StreamProducer::new(&server.url(), "events").unwrap();
    let first = producer.publish("a", &1, None).await.unwrap();
    let last = producer.publish("b", &2, None).await.unwrap();
    group_from_start(&server, "events", "g").await;
    let info = manager.get_stream_info("events").await.unwrap();
    assert_eq!((info.length, info.groups), (2, 1));
    assert!(info.radix_tree_keys >= 1);
    let first_entry = info.first_entry.unwrap();
    assert_eq!(first_entry.id.to_string(), first);
    assert_eq!(first_entry.message().unwrap().event_type(), "a");
    assert_eq!(info.last_entry.unwrap().id.to_string(), last);

    // Stream, settings hash, checkpoint hash.
    server.command("HSET streamwise:checkpoint:{events} g:c {}");
    assert_eq!(manager.delete_stream("events").await.unwrap(), 3);
    assert_eq!(manager.delete_stream("events").await.unwrap(), 0);
    assert!(matches!(
        manager.get_stream_info("events").await,
        Err(Error::StreamNotFound { stream }) if stream == "events"
    ));
    for bad in ["", "no spaces", "no:colons"] {
        let err = manager
            .create_stream(bad, StreamOptions::default())
            .await
            .unwrap_err();
        assert_eq!(err.invalid_field(), Some("stream"), "{bad:?}");
    }
}

#[tokio::test]
async fn consumer_group_manager_covers_the_contract() {
    let server = RedisServer::start();
    let groups = ConsumerGroupManager::new(&server.url()).unwrap();
    assert!(groups.create_group("orders", "billing", "0").await.unwrap());
    assert!(
        !groups.create_group("orders", "billing", "0").await.unwrap(),
        "idempotent"
    );
    assert!(groups.create_group("orders", "audit", "$").await.unwrap());
    let err = groups.create_group("orders", "x", "later").await.unwrap_err();
    assert_eq!(err.invalid_field(), Some("start_id"));
    assert!(matches!(
        groups.create_group_on_existing_stream("missing", "g", "0").await,
        Err(Error::StreamNotFound { .. })
    ));
    let mut names = groups.list_groups("orders").await.unwrap();
    names.sort();
    assert_eq!(names, ["audit", "billing"]);
    assert!(matches!(
        groups.list_groups("missing").await,
        Err(Error::StreamNotFound { .. })
    ));

    let producer = StreamProducer::new(&server.url(), "orders").unwrap();
    for n in 0..3 {
        producer.publish("order.placed", &n, None).await.unwrap();
    }
    let info = groups.get_group_info("orders", "billing").await.unwrap();
    assert_eq!(info.name, "billing");
    assert_eq!((info.consumers, info.pending, info.lag), (0, 0, Some(3)));
    assert_eq!(info.last_delivered_id, streamwise::EntryId::ZERO);
    assert!(matches!(
        groups.get_group_info("orders", "nobody").await,
        Err(Error::GroupNotFound { .. })
    ));
    assert!(matches!(
        groups.get_group_info("missing", "nobody").await,
        Err(Error::GroupNotFound { .. })
    ));

    // A consumer of another client (no lease) holds one entry; a live consumer takes the rest.
    server.command("XREADGROUP GROUP billing other COUNT 1 STREAMS orders >");
    let consumer = Arc::new(
        StreamConsumer::with_options(conn(&server), "orders", "billing", "live", fast_consumer()).unwrap(),
    );
    let (mut events, task) = run_consumer(consumer.clone(), None, |_| false);
    next_event(&mut events).await;
    next_event(&mut events).await;
    let info = groups.get_group_info("orders", "billing").await.unwrap();
    assert_eq!(
        (info.consumers, info.pending, info.lag),
        (2, 3, Some(0)),
        "{info:?}"
    );
    let consumers = groups.consumers("orders", "billing").await.unwrap();
    let status = |name: &str| {
        consumers
            .iter()
            .find(|c| c.name == name)
            .map(|c| (c.status, c.crashed))
    };
    assert_eq!(status("live"), Some((ConsumerStatus::Active, false)));
    assert_eq!(status("other"), Some((ConsumerStatus::Disconnected, false)));
    let idle = groups
        .clone()
        .idle_after(Duration::ZERO)
        .consumers("orders", "billing")
        .await
        .unwrap();
    assert_eq!(
        idle.iter().find(|c| c.name == "live").map(|c| c.status),
        Some(ConsumerStatus::Idle)
    );
    close_and_join(&consumer, task).await;
    let after = groups.consumers("orders", "billing").await.unwrap();
    assert_eq!(
        after.iter().find(|c| c.name == "live").map(|c| c.status),
        Some(ConsumerStatus::Disconnected)
    );
    assert!(matches!(
        groups.consumers("orders", "nobody").await,
        Err(Error::GroupNotFound { .. })
    ));

    assert!(groups.delete_group("orders", "billing").await.unwrap());
    assert!(!groups.delete_group("orders", "billing").await.unwrap());
    assert!(!groups.delete_group("missing", "billing").await.unwrap());
}

#[tokio::test]
async fn consumer_acknowledges_on_true_and_keeps_pending_on_false() {
    let server = RedisServer::start();
    group_from_start(&server, "jobs", "workers").await;
    let producer = StreamProducer::new(&server.url(), "jobs").unwrap();
    let keep = producer
        .publish("job", &serde_json::json!({"keep": true}), None)
        .await
        .unwrap();
    let done = producer
        .publish("job", &serde_json::json!({"keep": false}), None)
        .await
        .unwrap();

    let consumer = Arc::new(
        StreamConsumer::with_options(conn(&server), "jobs", "workers", "w1", fast_consumer()).unwrap(),
    );
    let (mut events, task) = run_consumer(consumer.clone(), None, |m| m.payload["keep"] == false);
    assert_eq!(next_event(&mut events).await.id, keep);
    assert_eq!(next_event(&mut events).await.id, done);
    close_and_join(&consumer, task).await;

    let pending = consumer.get_pending().await.unwrap();
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].id, keep);
    assert_eq!(pending[0].consumer, "w1");
    assert_eq!(pending[0].delivered, 1);
    assert_eq!(consumer.acknowledge(&keep).await.unwrap(), 1);
    assert_eq!(
        consumer.acknowledge(&keep).await.unwrap(),
        0,
        "already acknowledged"
    );
    assert!(consumer.get_pending().await.unwrap().is_empty());
    let err = consumer.acknowledge("not-an-id").await.unwrap_err();
    assert_eq!(err.invalid_field(), Some("message_id"));
    assert_eq!(consumer.lag().await.unwrap(), Some(0));
}

#[tokio::test]
async fn event_type_filter_skips_and_counts_other_types() {
    let server = RedisServer::start();
    group_from_start(&server, "mixed", "g").await;
    let producer = StreamProducer::new(&server.url(), "mixed").unwrap();
    for (i, t) in ["price.update", "alert", "price.update", "heartbeat"]
        .iter()
        .enumerate()
    {
        producer.publish(t, &i, None).await.unwrap();
    }
    let consumer =
        Arc::new(StreamConsumer::with_options(conn(&server), "mixed", "g", "c", fast_consumer()).unwrap());
    let (mut events, task) = run_consumer(consumer.clone(), Some(vec!["price.update"]), |_| true);
    assert_eq!(next_event(&mut events).await.payload, 0);
    assert_eq!(next_event(&mut events).await.payload, 2);
    // Wait until the last (skipped) entry was handled too.
    let deadline = tokio::time::Instant::now() + WAIT;
    while consumer.skipped() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "skipped only {}",
            consumer.skipped()
        );
        tokio::task::yield_now().await;
    }
    close_and_join(&consumer, task).await;
    assert!(events.try_recv().is_err(), "other types never reach the callback");
    assert_eq!(consumer.skipped(), 2);
    assert!(
        consumer.get_pending().await.unwrap().is_empty(),
        "skipped events are acknowledged"
    );
}

#[tokio::test]
async fn auto_ack_acknowledges_before_the_callback() {
    let server = RedisServer::start();
    group_from_start(&server, "fire", "g").await;
    StreamProducer::new(&server.url(), "fire")
        .unwrap()
        .publish("t", &1, None)
        .await
        .unwrap();
    let options = ConsumerOptions {
        auto_ack: true,
        ..fast_consumer()
    };
    let consumer = Arc::new(StreamConsumer::with_options(conn(&server), "fire", "g", "c", options).unwrap());
    let (mut events, task) = run_consumer(consumer.clone(), None, |_| false);
    next_event(&mut events).await;
    close_and_join(&consumer, task).await;
    assert!(
        consumer.get_pending().await.unwrap().is_empty(),
        "auto_ack ignores the callback's false"
    );
}

#[tokio::test]
async fn a_missing_group_is_group_not_found_unless_created() {
    let server = RedisServer::start();
    StreamProducer::new(&server.url(), "lonely")
        .unwrap()
        .publish("t", &1, None)
        .await
        .unwrap();
    let consumer =
        StreamConsumer::with_options(conn(&server), "lonely", "absent", "c", fast_consumer()).unwrap();
    match consumer.subscribe(|_| async { true }, None).await {
        Err(Error::GroupNotFound { stream, group }) => {
            assert_eq!((stream.as_str(), group.as_str()), ("lonely", "absent"))
        }
        other => panic!("expected GroupNotFound, got {other:?}"),
    }
    let options = ConsumerOptions {
        create_group: true,
        ..fast_consumer()
    };
    let consumer =
        Arc::new(StreamConsumer::with_options(conn(&server), "lonely", "absent", "c", options).unwrap());
    let (mut events, task) = run_consumer(consumer.clone(), None, |_| true);
    assert_eq!(next_event(&mut events).await.payload, 1);
    close_and_join(&consumer, task).await;
}

#[tokio::test]
async fn consumer_options_are_validated_by_name() {
    let server = RedisServer::start();
    let cases = [
        (
            ConsumerOptions {
                block_ms: 0,
                ..ConsumerOptions::default()
            },
            "block_ms",
        ),
        (
            ConsumerOptions {
                count: 0,
                ..ConsumerOptions::default()
            },
            "count",
        ),
        (
            ConsumerOptions {
                start_id: "soon".into(),
                ..ConsumerOptions::default()
            },
            "start_id",
        ),
        (
            ConsumerOptions {
                max_deliveries: 0,
                ..ConsumerOptions::default()
            },
            "max_deliveries",
        ),
        (
            ConsumerOptions {
                reclaim_enabled: true,
                reclaim_interval_ms: 0,
                ..ConsumerOptions::default()
            },
            "reclaim_interval_ms",
        ),
        (
            ConsumerOptions {
                lease_ttl_ms: 1,
                ..ConsumerOptions::default()
            },
            "lease_ttl_ms",
        ),
        (
            ConsumerOptions {
                ack_flush_interval_ms: 3_600_000,
                ..ConsumerOptions::default()
            },
            "ack_flush_interval_ms",
        ),
        (
            ConsumerOptions {
                max_entry_size: 0,
                ..ConsumerOptions::default()
            },
            "max_entry_size",
        ),
    ];
    for (options, field) in cases {
        let err = StreamConsumer::with_options(conn(&server), "s", "g", "c", options).unwrap_err();
        assert_eq!(err.invalid_field(), Some(field), "{err}");
    }
    for (stream, group, consumer, field) in [
        ("a b", "g", "c", "stream"),
        ("s", "", "c", "group"),
        ("s", "g", "c:1", "consumer"),
    ] {
        let err = StreamConsumer::new(&server.url(), stream, group, consumer).unwrap_err();
        assert_eq!(err.invalid_field(), Some(field));
    }
}

#[tokio::test]
async fn consumer_names_are_unique_within_a_group() {
    let server = RedisServer::start();
    group_from_start(&server, "s", "g").await;
    let first =
        Arc::new(StreamConsumer::with_options(conn(&server), "s", "g", "same", fast_consumer()).unwrap());
    let (_events, task) = run_consumer(first.clone(), None, |_| true);
    // Wait until the first holds its lease.
    let groups = ConsumerGroupManager::new(&server.url()).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.command("EXISTS streamwise:lease:{s}:g:same") != ":1" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first consumer never took its lease"
        );
        tokio::task::yield_now().await;
    }
    let second = StreamConsumer::with_options(conn(&server), "s", "g", "same", fast_consumer()).unwrap();
    assert!(matches!(
        second.subscribe(|_| async { true }, None).await,
        Err(Error::ConsumerActive { .. })
    ));
    close_and_join(&first, task).await;
    assert!(
        groups
            .consumers("s", "g")
            .await
            .unwrap()
            .iter()
            .all(|c| c.status == ConsumerStatus::Disconnected)
    );
}

#[tokio::test]
async fn checkpoints_go_to_redis_by_default_and_stay_in_memory_when_asked() {
    let server = RedisServer::start();
    group_from_start(&server, "cp", "g").await;
    let producer = StreamProducer::new(&server.url(), "cp").unwrap();
    let id = producer.publish("t", &1, None).await.unwrap();

    let in_memory = ConsumerOptions {
        use_redis_checkpoint: false,
        ..fast_consumer()
    };
    let consumer =
        Arc::new(StreamConsumer::with_options(conn(&server), "cp", "g", "mem", in_memory).unwrap());
    let (mut events, task) = run_consumer(consumer.clone(), None, |_| true);
    next_event(&mut events).await;
    close_and_join(&consumer, task).await;
    assert_eq!(server.command("HEXISTS streamwise:checkpoint:{cp} g:mem"), ":0");

    let id2 = producer.publish("t", &2, None).await.unwrap();
    let consumer =
        Arc::new(StreamConsumer::with_options(conn(&server), "cp", "g", "redis", fast_consumer()).unwrap());
    let (mut events, task) = run_consumer(consumer.clone(), None, |_| true);
    next_event(&mut events).await;
    close_and_join(&consumer, task).await;
    assert_ne!(id, id2);
    let saved = server
        .command_lines("HGET streamwise:checkpoint:{cp} g:redis", 2)
        .remove(1);
    assert!(saved.contains(&id2), "{saved}");
}

#[tokio::test]
async fn reclaim_takes_over_what_another_consumer_left_idle() {
    let server = RedisServer::start();
    group_from_start(&server, "r", "g").await;
    let id = StreamProducer::new(&server.url(), "r")
        .unwrap()
        .publish("t", &1, None)
        .await
        .unwrap();
    // A consumer of another client takes the entry and never acknowledges it.
    server.command("XREADGROUP GROUP g gone COUNT 1 STREAMS r >");
    let options = ConsumerOptions {
        reclaim_enabled: true,
        reclaim_interval_ms: 100,
        reclaim_min_idle_ms: 200,
        ..fast_consumer()
    };
    let consumer =
        Arc::new(StreamConsumer::with_options(conn(&server), "r", "g", "rescuer", options).unwrap());
    let (mut events, task) = run_consumer(consumer.clone(), None, |_| true);
    let msg = next_event(&mut events).await;
    assert_eq!((msg.id.as_str(), msg.delivery_count), (id.as_str(), 2));
    close_and_join(&consumer, task).await;
}

#[tokio::test]
async fn one_connection_serves_every_facade() {
    let server = RedisServer::start();
    let shared = conn(&server);
    let manager = StreamManager::with_connection(shared.clone());
    let groups = ConsumerGroupManager::with_connection(shared.clone());
    manager
        .create_stream("shared", StreamOptions::default())
        .await
        .unwrap();
    groups.create_group("shared", "g", "0").await.unwrap();
    let producer =
        StreamProducer::with_options(shared.clone(), "shared", ProducerOptions::default()).unwrap();
    producer.publish("t", &1, None).await.unwrap();
    let consumer =
        Arc::new(StreamConsumer::with_options(shared, "shared", "g", "c", fast_consumer()).unwrap());
    let (mut events, task) = run_consumer(consumer.clone(), None, |_| true);
    assert_eq!(next_event(&mut events).await.payload, 1);
    close_and_join(&consumer, task).await;
    assert_eq!(groups.get_group_info("shared", "g").await.unwrap().pending, 0);
}

#[tokio::test]
async fn close_is_graceful_the_event_in_hand_is_acknowledged() {
    let server = RedisServer::start();
    group_from_start(&server, "grace", "g").await;
    let producer = StreamProducer::new(&server.url(), "grace").unwrap();
    for n in 0..3 {
        producer.publish("t", &n, None).await.unwrap();
    }
    let consumer =
        Arc::new(StreamConsumer::with_options(conn(&server), "grace", "g", "c", fast_consumer()).unwrap());
    let (in_callback_tx, mut in_callback) = mpsc::unbounded_channel();
    let (release_tx, release) = tokio::sync::watch::channel(false);
    let task = {
        let consumer = consumer.clone();
        tokio::spawn(async move {
            consumer
                .subscribe(
                    move |msg| {
                        let _ = in_callback_tx.send(msg.id);
                        let mut release = release.clone();
                        async move {
                            // A slow handler: it finishes only when the test says so.
                            let _ = release.wait_for(|go| *go).await;
                            true
                        }
                    },
                    None,
                )
                .await
        })
    };
    let in_hand = tokio::time::timeout(WAIT, in_callback.recv())
        .await
        .unwrap()
        .unwrap();
    // Close while the callback is still running, then let it finish.
    consumer.close().await.unwrap();
    release_tx.send(true).unwrap();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap().unwrap();
    let pending = pending_ids(&consumer).await;
    assert!(
        !pending.contains(&in_hand),
        "the event in hand was acknowledged and flushed: {pending:?}"
    );
    assert!(in_callback.try_recv().is_err(), "no event after close");
    assert!(matches!(
        consumer.subscribe(|_| async { true }, None).await,
        Err(Error::Closed(_))
    ));
}

#[tokio::test]
async fn position_and_crash_reports() {
    let server = RedisServer::start();
    let groups = group_from_start(&server, "pos", "g").await;
    let producer = StreamProducer::new(&server.url(), "pos").unwrap();
    let id = producer.publish("t", &1, None).await.unwrap();
    let consumer =
        Arc::new(StreamConsumer::with_options(conn(&server), "pos", "g", "c", fast_consumer()).unwrap());
    assert_eq!(consumer.position().await.unwrap(), None);
    let (mut events, task) = run_consumer(consumer.clone(), None, |_| true);
    next_event(&mut events).await;
    assert_eq!(
        groups.check_consumer("pos", "g", "c").await.unwrap().status,
        ConsumerStatus::Active
    );
    close_and_join(&consumer, task).await;
    assert_eq!(
        consumer.position().await.unwrap().unwrap().message_id.to_string(),
        id
    );

    // A consumer that used a lease and vanished holding an entry: crashed.
    producer.publish("t", &2, None).await.unwrap();
    server.command("XREADGROUP GROUP g ghost COUNT 1 STREAMS pos >");
    server.command("SADD streamwise:consumers:{pos}:g ghost");
    match groups.check_consumer("pos", "g", "ghost").await {
        Err(Error::ConsumerCrashed {
            consumer, pending, ..
        }) => assert_eq!((consumer.as_str(), pending), ("ghost", 1)),
        other => panic!("expected ConsumerCrashed, got {other:?}"),
    }
    let err = groups.check_consumer("pos", "g", "nobody").await.unwrap_err();
    assert_eq!(err.invalid_field(), Some("consumer"));
}

#[tokio::test]
async fn a_payload_with_invalid_utf8_never_reaches_the_callback() {
    // As redis-py writes it: JSON quotes around a byte that is not UTF-8.
    let server = RedisServer::start();
    group_from_start(&server, "raw", "g").await;
    let client = streamwise::redis::client::Client::open(server.url()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let bad: String = streamwise::redis::client::cmd("XADD")
        .arg("raw")
        .arg("*")
        .arg("event_type")
        .arg("e")
        .arg("payload")
        .arg(&b"\"\xff\""[..])
        .query_async(&mut raw)
        .await
        .unwrap();
    let producer = StreamProducer::new(&server.url(), "raw").unwrap();
    let good = producer
        .publish("e", &serde_json::json!({"ok": true}), None)
        .await
        .unwrap();

    let consumer =
        Arc::new(StreamConsumer::with_options(conn(&server), "raw", "g", "c", fast_consumer()).unwrap());
    let (mut events, task) = run_consumer(consumer.clone(), None, |_| true);
    let event = next_event(&mut events).await;
    assert_eq!(event.id, good, "the entry behind the bad one is delivered");
    assert_eq!(event.payload, serde_json::json!({"ok": true}));
    consumer.close().await.unwrap();
    task.await.unwrap().expect("subscribe ends cleanly");
    assert!(events.try_recv().is_err(), "the bad entry was never called back");
    assert!(consumer.get_pending().await.unwrap().is_empty());
    assert_eq!(server.command("XLEN {raw}-dead"), ":1");
    let dead: streamwise::redis::client::Value = streamwise::redis::client::cmd("XRANGE")
        .arg("{raw}-dead")
        .arg("-")
        .arg("+")
        .query_async(&mut raw)
        .await
        .unwrap();
    let record = format!("{dead:?}");
    assert!(
        record.contains(&bad) && record.contains("payload is not JSON"),
        "{record}"
    );
}

/// Acks gather for 10 s here; `flush` sends them at once and returns when they are written.
#[tokio::test]
async fn flush_returns_once_the_callbacks_acknowledgements_are_written() {
    let server = RedisServer::start();
    group_from_start(&server, "fl", "g").await;
    let producer = StreamProducer::new(&server.url(), "fl").unwrap();
    let mut ids = Vec::new();
    for n in 0..21 {
        ids.push(producer.publish("t", &n, None).await.unwrap());
    }
    let slow_acks = ConsumerOptions {
        ack_flush_interval_ms: 10_000,
        ..fast_consumer()
    };
    let consumer = Arc::new(StreamConsumer::with_options(conn(&server), "fl", "g", "c", slow_acks).unwrap());
    consumer.flush().await.expect("nothing to flush before subscribe");
    let (mut events, task) = run_consumer(consumer.clone(), None, |_| true);
    // The callback runs one event at a time: when the 21st is called back, the first 20 are
    // acknowledged (queued, gathering for 10 s).
    for _ in 0..21 {
        next_event(&mut events).await;
    }
    let before = consumer.get_pending().await.unwrap();
    assert!(
        before.len() >= 20,
        "the acks are still gathering: {}",
        before.len()
    );
    tokio::time::timeout(Duration::from_secs(5), consumer.flush())
        .await
        .expect("flush does not wait out the gathering")
        .unwrap();
    let pending = pending_ids(&consumer).await;
    assert!(
        ids[..20].iter().all(|id| !pending.contains(id)),
        "flushed acks are in Redis: {pending:?}"
    );
    close_and_join(&consumer, task).await;
}

/// The lease TTL set in the options is the one Redis holds.
#[tokio::test]
async fn the_lease_ttl_is_taken_from_the_options() {
    let server = RedisServer::start();
    group_from_start(&server, "lt", "g").await;
    let options = ConsumerOptions {
        lease_ttl_ms: 1200,
        ..fast_consumer()
    };
    let consumer = Arc::new(StreamConsumer::with_options(conn(&server), "lt", "g", "c", options).unwrap());
    let (_events, task) = run_consumer(consumer.clone(), None, |_| true);
    let deadline = tokio::time::Instant::now() + WAIT;
    let ttl = loop {
        let reply = server.command("PTTL streamwise:lease:{lt}:g:c");
        let ms: i64 = reply.trim_start_matches(':').parse().unwrap();
        if ms > 0 {
            break ms;
        }
        assert!(tokio::time::Instant::now() < deadline, "no lease taken");
        tokio::task::yield_now().await;
    };
    assert!(ttl <= 1200, "PTTL {ttl} ms is above the configured 1200 ms");
    close_and_join(&consumer, task).await;
}

/// A seed consumer on a partitioned topic is a member of its group: it gets the entries of
/// every partition (it is the only member), each key's in order.
#[tokio::test]
async fn a_consumer_reads_a_partitioned_topic_as_a_group_member() {
    use streamwise::partition::{PartitionedPublisher, partition_for_key};
    let server = RedisServer::start();
    let backend = streamwise::redis::RedisBackend::new(&server.url()).unwrap();
    let publisher = PartitionedPublisher::new(Arc::new(backend.publisher()), Arc::new(backend.coordinator()))
        .topic("payments", 4);
    let keys = ["alice", "bob", "carol", "dave", "erin"];
    let partitions: std::collections::HashSet<u32> = keys.iter().map(|k| partition_for_key(k, 4)).collect();
    assert!(partitions.len() > 1, "the keys spread over partitions");
    for seq in 0..4u64 {
        for key in keys {
            let message = streamwise::Message::new("payment.made", &seq).unwrap();
            publisher.publish_keyed("payments", key, message).await.unwrap();
        }
    }
    // The seed's way to make the group: on a partitioned topic, on every partition.
    assert!(
        group_from_start(&server, "payments", "billing")
            .await
            .list_groups("payments~p0")
            .await
            .unwrap()
            == ["billing"]
    );
    let consumer = Arc::new(
        StreamConsumer::with_options(conn(&server), "payments", "billing", "worker-1", fast_consumer())
            .unwrap(),
    );
    let (mut events, task) = run_consumer(consumer.clone(), None, |_| true);
    let mut next: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for _ in 0..keys.len() * 4 {
        let event = next_event(&mut events).await;
        let key = event.metadata.get("partition_key").expect("keyed").to_owned();
        let partition = format!("payments~p{}", partition_for_key(&key, 4));
        assert_eq!(event.stream, partition, "the event names its partition's stream");
        let seq: u64 = event.payload_as().unwrap();
        let expected = next.entry(key.clone()).or_insert(0);
        assert_eq!(seq, *expected, "{key} out of order");
        *expected += 1;
    }
    // Calls that look at one stream are refused on a partitioned topic, instead of looking at
    // a stream that holds nothing.
    for err in [
        consumer.acknowledge("1-0").await.unwrap_err(),
        consumer.get_pending().await.unwrap_err(),
        consumer.lag().await.unwrap_err(),
    ] {
        assert!(matches!(err, Error::Partitioned { partitions: 4, .. }), "{err:?}");
    }
    close_and_join(&consumer, task).await;
}
