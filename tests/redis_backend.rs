//! The Redis backend's own promises, each against a private redis-server:
//! wire format, trimming, size limit, stream auto-creation, foreign and malformed entries,
//! crashed consumers, heartbeats, checkpoints, retention, restarts and the retry budget.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use redis::streams::StreamRangeReply;
use streamwise::dead_letter::{self, keys as dl};
use streamwise::redis::admin::{self, StreamSettings};
use streamwise::redis::{
    PublisherOptions, RedisBackend, RedisConnection, RedisPublisher, RedisSubscriber, RedisSubscriberOptions,
    StreamReader,
};
use streamwise::{
    Error, Message, Publisher, ReclaimOptions, StartFrom, SubscribeOptions, Subscriber, Subscription,
};

use common::RedisServer;

const WAIT: Duration = Duration::from_secs(20);

async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

fn redis_cli(server: &RedisServer, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &server.port().to_string()])
        .args(args)
        .output()
        .expect("redis-cli is installed with redis-server");
    assert!(out.status.success(), "redis-cli failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Appends an entry of `fields` (name, value, ...) to `stream` as another producer would, with
/// redis-cli; returns its id.
fn xadd(server: &RedisServer, stream: &str, fields: &[&str]) -> String {
    let mut args = vec!["XADD", stream, "*"];
    args.extend_from_slice(fields);
    redis_cli(server, &args)
}

/// Checks `done` every 10 ms until it holds; fails with `what` once `deadline` has passed.
async fn wait_until(
    deadline: tokio::time::Instant,
    what: impl Fn() -> String,
    mut done: impl AsyncFnMut() -> bool,
) {
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "{}", what());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn recv(sub: &mut Subscription) -> streamwise::Delivery {
    match tokio::time::timeout(WAIT, sub.next()).await {
        Ok(Some(Ok(d))) => d,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

fn opts(group: &str, consumer: &str) -> SubscribeOptions {
    SubscribeOptions::new(group, consumer).block(Duration::from_millis(200))
}

fn string(v: &redis::Value) -> String {
    redis::from_redis_value(v.clone()).expect("string value")
}

#[tokio::test]
async fn publisher_writes_the_wire_format() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let msg = Message::new(
        "price.update",
        &serde_json::json!({"symbol": "AAPL", "price": 150.25}),
    )
    .unwrap()
    .with_metadata("source", "market-feed");
    let id = backend
        .publisher()
        .publish("data-updates", msg.clone())
        .await
        .unwrap();

    let mut c = raw(&server).await;
    let reply: StreamRangeReply = redis::cmd("XRANGE")
        .arg("data-updates")
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(reply.ids.len(), 1);
    let entry = &reply.ids[0];
    assert_eq!(entry.id, id.to_string());
    let fields: HashMap<&str, String> = entry.map.iter().map(|(k, v)| (k.as_str(), string(v))).collect();
    assert_eq!(fields["event_type"], "price.update");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&fields["payload"]).unwrap(),
        serde_json::json!({"symbol": "AAPL", "price": 150.25})
    );
    assert_eq!(fields["metadata"], r#"{"source":"market-feed"}"#);
    assert_eq!(fields["timestamp"], msg.timestamp_rfc3339());
    assert_eq!(fields["timestamp"].len(), "2026-11-22T10:00:00.123Z".len());
    assert!(fields["timestamp"].ends_with('Z'));
    assert_eq!(fields["uuid"], msg.uuid().to_string());
    assert_eq!(fields.len(), 5);
}

#[tokio::test]
async fn max_length_trims_approximately_and_batches_keep_order() {
    let server = RedisServer::start();
    let conn = RedisConnection::new(&server.url()).unwrap();
    let publisher = RedisPublisher::new(conn, PublisherOptions::default().max_length(100));
    let mut last = None;
    for batch in 0..10u64 {
        let messages = (0..100u64)
            .map(|n| Message::new("t", &(batch * 100 + n)).unwrap())
            .collect();
        let ids = publisher.publish_batch("trimmed", messages).await.unwrap();
        assert_eq!(ids.len(), 100);
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert!(last.is_none_or(|l| l < ids[0]));
        last = ids.last().copied();
    }
    let len: u64 = redis::cmd("XLEN")
        .arg("trimmed")
        .query_async(&mut raw(&server).await)
        .await
        .unwrap();
    // MAXLEN ~ keeps at least the limit and trims whole nodes (100 entries each by default).
    assert!(
        (100..=200).contains(&len),
        "XLEN {len} after 1000 publishes with max_length 100"
    );
}

#[tokio::test]
async fn oversized_entries_are_refused_before_anything_is_written() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let publisher = backend.publisher();
    let big = Message::from_json_bytes("t", format!("\"{}\"", "x".repeat(1024 * 1024))).unwrap();
    match publisher.publish("big", big.clone()).await {
        Err(Error::PayloadTooLarge { size, limit }) => {
            assert_eq!(limit, 1024 * 1024);
            assert_eq!(size, streamwise::codec::wire_size(&big));
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    // One bad message in a batch: nothing of the batch is written.
    let small = Message::new("t", &1).unwrap();
    assert!(matches!(
        publisher.publish_batch("big", vec![small, big]).await,
        Err(Error::PayloadTooLarge { .. })
    ));
    let exists: u64 = redis::cmd("EXISTS")
        .arg("big")
        .query_async(&mut raw(&server).await)
        .await
        .unwrap();
    assert_eq!(exists, 0, "nothing may be written");
    // The limit is configurable.
    let conn = RedisConnection::new(&server.url()).unwrap();
    let tight = RedisPublisher::new(conn, PublisherOptions::default().max_entry_size(100));
    assert!(matches!(
        tight
            .publish("big", Message::new("t", &"x".repeat(50)).unwrap())
            .await,
        Err(Error::PayloadTooLarge { limit: 100, .. })
    ));
}

#[tokio::test]
async fn without_auto_create_a_missing_stream_is_stream_not_found() {
    let server = RedisServer::start();
    let conn = RedisConnection::new(&server.url()).unwrap();
    let publisher = RedisPublisher::new(conn, PublisherOptions::default().auto_create(false));
    match publisher.publish("absent", Message::new("t", &1).unwrap()).await {
        Err(Error::StreamNotFound { stream }) => assert_eq!(stream, "absent"),
        other => panic!("expected StreamNotFound, got {other:?}"),
    }
    let exists: u64 = redis::cmd("EXISTS")
        .arg("absent")
        .query_async(&mut raw(&server).await)
        .await
        .unwrap();
    assert_eq!(exists, 0);
    xadd(&server, "present", &["event_type", "t", "payload", "1"]);
    publisher
        .publish("present", Message::new("t", &2).unwrap())
        .await
        .unwrap();
}

#[tokio::test]
async fn an_entry_written_by_redis_cli_is_consumed() {
    let server = RedisServer::start();
    let id = xadd(
        &server,
        "data-updates",
        &[
            "event_type",
            "price.update",
            "payload",
            r#"{"symbol":"AAPL","price":150.25}"#,
            "metadata",
            r#"{"source":"market-feed"}"#,
            "timestamp",
            "2026-11-22T10:00:00.123Z",
            "uuid",
            "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
            "written_by",
            "redis-cli",
        ],
    );
    let backend = RedisBackend::new(&server.url()).unwrap();
    let subscriber = backend.subscriber().unwrap();
    let mut sub = subscriber
        .subscribe("data-updates", opts("processors", "worker-1"))
        .await
        .unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(d.id().to_string(), id);
    let m = d.message();
    assert_eq!(m.event_type(), "price.update");
    assert_eq!(
        m.json().unwrap(),
        serde_json::json!({"symbol": "AAPL", "price": 150.25})
    );
    assert_eq!(m.metadata().get("source"), Some("market-feed"));
    assert_eq!(m.timestamp_rfc3339(), "2026-11-22T10:00:00.123Z");
    assert_eq!(m.uuid().to_string(), "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b");
    d.ack().await.unwrap();
    subscriber.close().await.unwrap();
    assert_eq!(
        backend.pending_count("data-updates", "processors").await.unwrap(),
        0
    );
}

#[tokio::test]
async fn malformed_entries_are_dead_lettered_and_the_subscription_goes_on() {
    let server = RedisServer::start();
    let bad = [
        vec!["payload", r#"{"no":"type"}"#],
        vec!["event_type", "t", "payload", "not json"],
        vec!["event_type", "t"],
        vec!["event_type", "t", "payload", "{}", "metadata", "[1,2]"],
    ];
    let mut bad_ids = Vec::new();
    for fields in &bad {
        bad_ids.push(xadd(&server, "orders", fields));
    }
    let mut c = raw(&server).await;
    let binary: String = redis::cmd("XADD")
        .arg("orders")
        .arg("*")
        .arg("event_type")
        .arg(&[0xffu8, 0xfe, 0x00][..])
        .arg("payload")
        .arg(&[0x80u8, 0x81][..])
        .query_async(&mut c)
        .await
        .unwrap();
    bad_ids.push(binary);
    let good = xadd(&server, "orders", &["event_type", "order.placed", "payload", "7"]);

    let backend = RedisBackend::new(&server.url()).unwrap();
    let subscriber = backend.subscriber().unwrap();
    let mut sub = subscriber
        .subscribe("orders", opts("billing", "c"))
        .await
        .unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(
        d.id().to_string(),
        good,
        "the good entry arrives; the bad ones never do"
    );
    d.ack().await.unwrap();

    let mut dead = subscriber
        .subscribe(&dead_letter::stream_for("orders"), opts("inspect", "c"))
        .await
        .unwrap();
    let mut reasons = HashMap::new();
    for _ in 0..bad_ids.len() {
        let r = recv(&mut dead).await;
        let m = r.message();
        assert_eq!(m.event_type(), dead_letter::UNDECODABLE_EVENT_TYPE);
        assert_eq!(m.metadata().get(dl::STREAM), Some("orders"));
        assert_eq!(m.metadata().get(dl::GROUP), Some("billing"));
        reasons.insert(
            m.metadata().get(dl::ORIGINAL_ID).unwrap().to_owned(),
            m.metadata().get(dl::REASON).unwrap().to_owned(),
        );
        r.ack().await.unwrap();
    }
    assert_eq!(
        reasons.keys().cloned().collect::<HashSet<_>>(),
        bad_ids.iter().cloned().collect()
    );
    assert!(reasons[&bad_ids[0]].contains("no event_type"), "{reasons:?}");
    assert!(
        reasons[&bad_ids[1]].contains("payload is not JSON"),
        "{reasons:?}"
    );
    assert!(reasons[&bad_ids[2]].contains("no payload"), "{reasons:?}");
    assert!(reasons[&bad_ids[3]].contains("metadata"), "{reasons:?}");
    assert!(reasons[&bad_ids[4]].contains("UTF-8"), "{reasons:?}");
    assert_eq!(subscriber.stats().undecodable, 5);
    subscriber.close().await.unwrap();
    assert_eq!(backend.pending_count("orders", "billing").await.unwrap(), 0);
}

#[tokio::test]
async fn oversized_entries_are_dead_lettered_whole_and_unknown_fields_are_ignored() {
    let server = RedisServer::start();
    let big_payload = format!("\"{}\"", "x".repeat(2000));
    let big = xadd(
        &server,
        "orders",
        &["event_type", "order.placed", "payload", &big_payload],
    );
    // A field another producer added (say, a tracing header): ignored, the entry is delivered.
    let extra = xadd(
        &server,
        "orders",
        &["event_type", "order.placed", "payload", "7", "x-trace", "abc"],
    );

    let backend = RedisBackend::new(&server.url()).unwrap();
    let conn = RedisConnection::new(&server.url()).unwrap();
    assert!(matches!(
        RedisSubscriber::new(conn.clone(), RedisSubscriberOptions::default().max_entry_size(0)),
        Err(Error::Invalid { field, .. }) if field == "max_entry_size"
    ));
    let subscriber =
        RedisSubscriber::new(conn, RedisSubscriberOptions::default().max_entry_size(1024)).unwrap();
    let mut sub = subscriber
        .subscribe("orders", opts("billing", "c"))
        .await
        .unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(
        d.id().to_string(),
        extra,
        "the oversized entry is never handed out"
    );
    assert_eq!(d.message().decode::<i32>().unwrap(), 7);
    d.ack().await.unwrap();

    // The record is as large as the entry; dead-letter streams are read without the limit.
    let mut dead = subscriber
        .subscribe(&dead_letter::stream_for("orders"), opts("inspect", "c"))
        .await
        .unwrap();
    let r = recv(&mut dead).await;
    let m = r.message();
    assert_eq!(
        m.event_type(),
        "order.placed",
        "the record is the original message"
    );
    assert_eq!(m.decode::<String>().unwrap().len(), 2000);
    assert_eq!(m.metadata().get(dl::ORIGINAL_ID), Some(big.as_str()));
    let reason = m.metadata().get(dl::REASON).unwrap();
    assert!(reason.contains("larger than max_entry_size 1024"), "{reason}");
    r.ack().await.unwrap();
    assert_eq!(subscriber.stats().oversized, 1);
    subscriber.close().await.unwrap();
    assert_eq!(backend.pending_count("orders", "billing").await.unwrap(), 0);
}

/// Runs a consumer on a runtime of its own, takes `n` entries without settling them, then
/// kills the runtime: no close, no lease release, connections gone, as in a process crash.
fn crash_after_taking(
    url: String,
    stream: &'static str,
    group: &'static str,
    n: usize,
    lease: Duration,
) -> Vec<String> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let ids = rt.block_on(async {
            let conn = RedisConnection::new(&url).unwrap();
            let subscriber =
                RedisSubscriber::new(conn, RedisSubscriberOptions::default().lease_ttl(lease)).unwrap();
            let mut sub = subscriber
                .subscribe(stream, opts(group, "doomed").max_in_flight(n).batch_size(n))
                .await
                .unwrap();
            let mut held = Vec::new();
            while held.len() < n {
                held.push(recv(&mut sub).await);
            }
            let ids = held.iter().map(|d| d.id().to_string()).collect();
            // Keep everything from running its clean-up: a crash runs no destructors.
            std::mem::forget(held);
            std::mem::forget(sub);
            std::mem::forget(subscriber);
            ids
        });
        rt.shutdown_background();
        ids
    })
    .join()
    .expect("crashing consumer thread")
}

#[tokio::test]
async fn a_crashed_consumers_hundred_entries_are_finished_by_another() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let publisher = backend.publisher();
    let messages = (0..100u64).map(|n| Message::new("t", &n).unwrap()).collect();
    publisher.publish_batch("work", messages).await.unwrap();

    let taken = crash_after_taking(server.url(), "work", "workers", 100, Duration::from_millis(300));
    assert_eq!(taken.len(), 100);
    assert_eq!(backend.pending_count("work", "workers").await.unwrap(), 100);

    // min_idle is far away: only the crash (lease gone, entries pending) lets the survivor
    // take the entries now.
    let subscriber = backend.subscriber().unwrap();
    let reclaim = ReclaimOptions::new(Duration::from_millis(100), Duration::from_secs(3600));
    let mut sub = subscriber
        .subscribe(
            "work",
            opts("workers", "survivor")
                .max_in_flight(100)
                .batch_size(100)
                .reclaim(reclaim),
        )
        .await
        .unwrap();
    let mut finished = HashSet::new();
    while finished.len() < 100 {
        let d = recv(&mut sub).await;
        assert_eq!(d.delivery_count(), 2, "{:?}", d.info());
        finished.insert(d.id().to_string());
        d.ack().await.unwrap();
    }
    assert_eq!(finished, taken.into_iter().collect());
    assert!(subscriber.stats().crashed_consumers >= 1);
    subscriber.close().await.unwrap();
    assert_eq!(backend.pending_count("work", "workers").await.unwrap(), 0);
}

#[tokio::test]
async fn a_long_handler_keeps_its_entry_by_heartbeat() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let id = backend
        .publisher()
        .publish("slow", Message::new("t", &1).unwrap())
        .await
        .unwrap();

    // Heartbeat every 100 ms (a third of the lease).
    let conn = RedisConnection::new(&server.url()).unwrap();
    let worker = RedisSubscriber::new(
        conn,
        RedisSubscriberOptions::default().lease_ttl(Duration::from_millis(300)),
    )
    .unwrap();
    let mut busy = worker.subscribe("slow", opts("g", "busy")).await.unwrap();
    let held = recv(&mut busy).await;
    assert_eq!(held.id(), id);

    let thief = backend.subscriber().unwrap();
    let reclaim = ReclaimOptions::new(Duration::from_millis(50), Duration::from_millis(400));
    let mut other = thief
        .subscribe("slow", opts("g", "thief").reclaim(reclaim))
        .await
        .unwrap();
    // The handler works for 4x min_idle; the entry must stay with it all along.
    match tokio::time::timeout(Duration::from_millis(1600), other.next()).await {
        Err(_) => {}
        Ok(item) => panic!("a live handler's entry was reclaimed: {item:?}"),
    }
    held.ack().await.unwrap();
    worker.close().await.unwrap();
    thief.close().await.unwrap();
    assert_eq!(backend.pending_count("slow", "g").await.unwrap(), 0);
    assert_eq!(thief.stats().reclaimed, 0);
}

/// The heartbeat touches a held entry at every beat, so its idle time stays under one
/// interval (a third of the lease) plus a round trip, and reclaim `min_idle` just above two
/// thirds of the lease is safe. It once touched only entries held a whole interval since the
/// last touch, which a beat a little early missed: every other beat, idle up to two thirds of
/// the lease, and a live handler's entry was reclaimed (a flaky fault test found it).
#[tokio::test]
async fn a_held_entry_is_touched_at_every_heartbeat() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    backend
        .publisher()
        .publish("slow", Message::new("t", &1).unwrap())
        .await
        .unwrap();
    let ttl = Duration::from_millis(1800);
    let interval = ttl / 3;
    let worker = RedisSubscriber::new(
        RedisConnection::new(&server.url()).unwrap(),
        RedisSubscriberOptions::default().lease_ttl(ttl),
    )
    .unwrap();
    let mut busy = worker.subscribe("slow", opts("g", "busy")).await.unwrap();
    let held = recv(&mut busy).await;

    // A measurement over five beats, read as XPENDING reports it.
    let mut c = raw(&server).await;
    let mut longest = 0u64;
    let until = tokio::time::Instant::now() + interval * 5;
    while tokio::time::Instant::now() < until {
        let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg("slow")
            .arg("g")
            .arg("-")
            .arg("+")
            .arg(10)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        longest = longest.max(rows[0].2);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bound = interval + Duration::from_millis(250);
    assert!(
        Duration::from_millis(longest) < bound,
        "a held entry idled {longest} ms between heartbeats (interval {interval:?})"
    );
    held.ack().await.unwrap();
    worker.close().await.unwrap();
}

#[tokio::test]
async fn checkpoints_follow_acks_and_a_vanished_group_resumes_there() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let publisher = backend.publisher();
    let first: Vec<_> = (0..5u64).map(|n| Message::new("t", &n).unwrap()).collect();
    let ids = publisher.publish_batch("resume", first).await.unwrap();

    let subscriber = backend.subscriber().unwrap();
    let mut sub = subscriber.subscribe("resume", opts("g", "c")).await.unwrap();
    for _ in 0..5 {
        recv(&mut sub).await.ack().await.unwrap();
    }
    subscriber.close().await.unwrap();
    let mut c = raw(&server).await;
    let checkpoint: String = redis::cmd("HGET")
        .arg("streamwise:checkpoint:{resume}")
        .arg("g:c")
        .query_async(&mut c)
        .await
        .unwrap();
    let checkpoint: serde_json::Value = serde_json::from_str(&checkpoint).unwrap();
    assert_eq!(checkpoint["message_id"], ids[4].to_string());
    assert!(streamwise::parse_timestamp(checkpoint["timestamp"].as_str().unwrap()).is_ok());

    // The group disappears (deleted by hand, or lost with a server without persistence).
    let destroyed: u64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg("resume")
        .arg("g")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(destroyed, 1);
    let later = publisher
        .publish("resume", Message::new("t", &5u64).unwrap())
        .await
        .unwrap();

    // Re-created at the checkpoint: the five acked entries do not come back.
    let subscriber = backend.subscriber().unwrap();
    let mut sub = subscriber.subscribe("resume", opts("g", "c")).await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(d.id(), later);
    d.ack().await.unwrap();
    match tokio::time::timeout(Duration::from_millis(400), sub.next()).await {
        Err(_) => {}
        Ok(item) => panic!("an acked entry came back: {item:?}"),
    }
    subscriber.close().await.unwrap();
}

/// The checkpoint never passes an entry still pending for its consumer: e1 and e3 acked, e2
/// dropped unsettled (or nacked, its retry not yet due) leaves the checkpoint at e1, and a
/// group re-created from it delivers e2 again.
#[tokio::test]
async fn the_checkpoint_stays_below_an_entry_left_pending() {
    for leave in ["drop", "nack"] {
        let server = RedisServer::start();
        let backend = RedisBackend::new(&server.url()).unwrap();
        let publisher = backend.publisher();
        let batch: Vec<_> = (1..=3u64).map(|n| Message::new("t", &n).unwrap()).collect();
        let ids = publisher.publish_batch("hole", batch).await.unwrap();

        let subscriber = backend.subscriber().unwrap();
        let mut sub = subscriber.subscribe("hole", opts("g", "c")).await.unwrap();
        let (e1, e2, e3) = (recv(&mut sub).await, recv(&mut sub).await, recv(&mut sub).await);
        e1.ack().await.unwrap();
        e3.ack().await.unwrap();
        match leave {
            "drop" => drop(e2),
            _ => e2.nack_after(Duration::from_secs(3600)).await.unwrap(),
        }
        subscriber.close().await.unwrap();
        let store = streamwise::redis::RedisCheckpointStore::new(backend.connection().clone());
        use streamwise::checkpoint::CheckpointStore;
        let position = store.load("hole", "g", "c").await.unwrap().expect("a checkpoint");
        // At e1, or just below e2 (everything up to e2 is acknowledged), never at or past it.
        assert!(
            position.message_id >= ids[0] && position.message_id < ids[1],
            "{leave}: the checkpoint {} passed e2 {}",
            position.message_id,
            ids[1]
        );

        let mut c = raw(&server).await;
        let _: u64 = redis::cmd("XGROUP")
            .arg("DESTROY")
            .arg("hole")
            .arg("g")
            .query_async(&mut c)
            .await
            .unwrap();
        let subscriber = backend.subscriber().unwrap();
        let mut sub = subscriber.subscribe("hole", opts("g", "c")).await.unwrap();
        let again: Vec<_> = [recv(&mut sub).await, recv(&mut sub).await]
            .iter()
            .map(|d| d.id())
            .collect();
        assert_eq!(again, [ids[1], ids[2]], "{leave}: e2 (and e3 after it) come back");
        subscriber.close().await.unwrap();
    }
}

/// `flush` returns once the acks made before it are in Redis (nothing pending at that very
/// moment), and with the error when they cannot be written.
#[tokio::test]
async fn flush_returns_once_acks_are_written_or_with_the_error() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let publisher = backend.publisher();
    let batch: Vec<_> = (0..50u64).map(|n| Message::new("t", &n).unwrap()).collect();
    publisher.publish_batch("fl", batch).await.unwrap();
    let subscriber = backend.subscriber().unwrap();
    let mut sub = subscriber
        .subscribe("fl", opts("g", "c").max_in_flight(50).batch_size(50))
        .await
        .unwrap();
    for _ in 0..50 {
        recv(&mut sub).await.ack().await.unwrap();
    }
    sub.flush().await.unwrap();
    assert_eq!(
        backend.pending_count("fl", "g").await.unwrap(),
        0,
        "flushed means written"
    );

    // Acks that Redis refuses: the flush says so.
    publisher
        .publish("fl", Message::new("t", &50u64).unwrap())
        .await
        .unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(server.command("ACL SETUSER default -xack"), "+OK");
    d.ack().await.unwrap();
    let err = tokio::time::timeout(WAIT, sub.flush())
        .await
        .expect("flush answers")
        .unwrap_err();
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(err.to_string().contains("acknowledgements not written"), "{err}");
    assert_eq!(server.command("ACL SETUSER default +xack"), "+OK");
    // The ack is kept and written on a later attempt.
    let deadline = tokio::time::Instant::now() + WAIT;
    wait_until(
        deadline,
        || "the refused ack was never written".into(),
        async || sub.flush().await.is_ok() && backend.pending_count("fl", "g").await.unwrap() == 0,
    )
    .await;
    subscriber.close().await.unwrap();
    assert!(matches!(sub.flush().await, Err(Error::Closed(_))));
}

/// A dead-letter record Redis refuses (no right to XADD) leaves its entry pending, is retried
/// with backoff while the subscription goes on, and is written once the right is back: no
/// restart needed.
#[tokio::test]
async fn a_refused_dead_letter_write_is_retried_until_it_succeeds() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let publisher = backend.publisher();
    publisher
        .publish("dl", Message::from_json_bytes("t", "not json").unwrap())
        .await
        .unwrap();
    let good = publisher
        .publish("dl", Message::new("t", &1).unwrap())
        .await
        .unwrap();
    assert_eq!(server.command("ACL SETUSER default -xadd"), "+OK");
    let subscriber = backend.subscriber().unwrap();
    let mut sub = subscriber.subscribe("dl", opts("g", "c")).await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(
        d.id(),
        good,
        "the subscription goes on past the entry it cannot dead-letter"
    );
    d.ack().await.unwrap();
    // The subscription works while it is read from.
    let reading = tokio::spawn(async move {
        if let Some(item) = sub.next().await {
            panic!("nothing else is deliverable: {item:?}");
        }
    });
    let deadline = tokio::time::Instant::now() + WAIT;
    wait_until(
        deadline,
        || format!("the write was not retried: {:?}", subscriber.stats()),
        async || subscriber.stats().dead_letter_failures >= 2,
    )
    .await;
    assert_eq!(
        backend.pending_count("dl", "g").await.unwrap(),
        1,
        "kept pending meanwhile"
    );
    assert_eq!(server.command("ACL SETUSER default +xadd"), "+OK");
    wait_until(
        deadline,
        || "never dead-lettered after the right came back".into(),
        async || backend.pending_count("dl", "g").await.unwrap() == 0,
    )
    .await;
    assert_eq!(server.command("XLEN {dl}-dead"), ":1");
    assert_eq!(subscriber.stats().dead_lettered, 1);
    subscriber.close().await.unwrap();
    reading.await.unwrap();
}

/// A handler's dead letter whose record cannot be written (the dead-letter key holds
/// another type, so its `XADD` fails inside the write) leaves the entry pending, unacked,
/// counted as unflushed, and is written once the key is fixed: the entry never leaves the
/// pending list without its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_that_cannot_be_written_stays_pending_until_it_is() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let id = backend
        .publisher()
        .publish("dlw", Message::new("t", &1).unwrap())
        .await
        .unwrap();
    assert_eq!(server.command("SET {dlw}-dead not-a-stream"), "+OK");
    let subscriber = backend.subscriber().unwrap();
    let mut sub = subscriber.subscribe("dlw", opts("g", "c")).await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(d.id(), id);
    d.dead_letter("bad order").await.unwrap();
    let flushed = sub.flush().await;
    assert!(
        flushed.is_err(),
        "a flush reports the unwritten record: {flushed:?}"
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    wait_until(
        deadline,
        || format!("not retried: {:?}", subscriber.stats()),
        async || subscriber.stats().dead_letter_failures >= 2,
    )
    .await;
    assert_eq!(
        backend.pending_count("dlw", "g").await.unwrap(),
        1,
        "kept pending meanwhile"
    );
    assert_eq!(subscriber.unflushed(), 1);
    assert_eq!(server.command("DEL {dlw}-dead"), ":1");
    wait_until(
        deadline,
        || "never written after the key was fixed".into(),
        async || backend.pending_count("dlw", "g").await.unwrap() == 0,
    )
    .await;
    assert_eq!(server.command("XLEN {dlw}-dead"), ":1");
    sub.flush().await.unwrap();
    assert_eq!(subscriber.unflushed(), 0);
    let mut dead = subscriber
        .subscribe("{dlw}-dead", opts("inspect", "c"))
        .await
        .unwrap();
    let record = recv(&mut dead).await;
    assert_eq!(record.message().metadata().get(dl::REASON), Some("bad order"));
    record.ack().await.unwrap();
    assert_eq!(subscriber.stats().dead_lettered, 1);
    subscriber.close().await.unwrap();
}

/// Dead-letter records that keep failing are retried on their own backoff, one attempt per
/// retry, not on every ack the flusher writes: a hundred stuck records neither hammer Redis
/// nor hold up the acks of the deliveries that flow meanwhile, and they are all written once
/// the dead-letter stream works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_dead_letters_back_off_and_do_not_hold_up_acks() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let publisher = backend.publisher();
    for _ in 0..100 {
        publisher
            .publish("dlb", Message::from_json_bytes("t", "not json").unwrap())
            .await
            .unwrap();
    }
    for n in 0..20 {
        publisher
            .publish("dlb", Message::new("t", &n).unwrap())
            .await
            .unwrap();
    }
    assert_eq!(server.command("SET {dlb}-dead not-a-stream"), "+OK");
    let subscriber = backend.subscriber().unwrap();
    let mut sub = subscriber
        .subscribe("dlb", opts("g", "c").batch_size(50).max_in_flight(50))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    for acked in 1..=20u64 {
        let d = recv(&mut sub).await;
        d.ack().await.unwrap();
        // Each ack is written before the next delivery is taken.
        wait_until(
            deadline,
            || format!("ack {acked} not written"),
            async || subscriber.stats().acked >= acked,
        )
        .await;
    }
    let failures = subscriber.stats().dead_letter_failures;
    assert!(
        failures < 50,
        "{failures} failed dead-letter writes while 20 acks went out: the stuck records were tried on every ack"
    );
    assert_eq!(
        backend.pending_count("dlb", "g").await.unwrap(),
        100,
        "the stuck ones stay pending"
    );
    assert_eq!(server.command("DEL {dlb}-dead"), ":1");
    wait_until(
        deadline,
        || "never dead-lettered after the key was fixed".into(),
        async || backend.pending_count("dlb", "g").await.unwrap() == 0,
    )
    .await;
    assert_eq!(server.command("XLEN {dlb}-dead"), ":100");
    assert_eq!(subscriber.stats().dead_lettered, 100);
    subscriber.close().await.unwrap();
}

/// A codec that cannot encode dead-letter records: the dead letter is not written, the entry
/// stays pending, and `flush` says so (it does not claim the settlement was written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_record_the_codec_cannot_encode_is_reported_by_flush() {
    struct NoRecords;
    impl streamwise::codec::Codec for NoRecords {
        fn encode(&self, message: &Message) -> streamwise::Result<Vec<(&'static str, bytes::Bytes)>> {
            if message.metadata().get(dl::REASON).is_some() {
                return Err(Error::invalid(
                    "record",
                    "this codec writes no dead-letter records",
                ));
            }
            streamwise::codec::JsonCodec.encode(message)
        }
        fn decode(&self, entry: streamwise::codec::RawEntry) -> streamwise::Result<Message> {
            streamwise::codec::JsonCodec.decode(entry)
        }
    }
    let server = RedisServer::start();
    let conn = streamwise::redis::RedisConnection::new(&server.url()).unwrap();
    let backend = RedisBackend::with_connection(conn.clone());
    backend
        .publisher()
        .publish("dle", Message::new("t", &1).unwrap())
        .await
        .unwrap();
    let subscriber = RedisSubscriber::new(conn, RedisSubscriberOptions::default().codec(NoRecords)).unwrap();
    let mut sub = subscriber.subscribe("dle", opts("g", "c")).await.unwrap();
    recv(&mut sub).await.dead_letter("bad").await.unwrap();
    let err = sub.flush().await.unwrap_err();
    assert!(err.to_string().contains("cannot be encoded"), "{err}");
    assert_eq!(backend.pending_count("dle", "g").await.unwrap(), 1);
    assert_eq!(server.command("EXISTS {dle}-dead"), ":0");
    subscriber.close().await.unwrap();
}

/// A handler's dead letter is written at once, not after the acks' gathering interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_does_not_wait_for_the_ack_gathering_interval() {
    let server = RedisServer::start();
    let conn = streamwise::redis::RedisConnection::new(&server.url()).unwrap();
    let backend = RedisBackend::with_connection(conn.clone());
    backend
        .publisher()
        .publish("dlg", Message::new("t", &1).unwrap())
        .await
        .unwrap();
    let options = RedisSubscriberOptions::default().ack_flush_interval(Duration::from_secs(10));
    let subscriber = RedisSubscriber::new(conn, options).unwrap();
    let mut sub = subscriber.subscribe("dlg", opts("g", "c")).await.unwrap();
    recv(&mut sub).await.dead_letter("bad").await.unwrap();
    // Well before the 10 s the acks gather for.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    wait_until(
        deadline,
        || "the record waited for the ack interval".into(),
        async || server.command("XLEN {dlg}-dead") == ":1",
    )
    .await;
    subscriber.close().await.unwrap();
}

/// `wait_replicas`: a publish returns once the replica has the entry; with the replica
/// paused it fails with `Error::NotReplicated` naming the entry (which the master kept),
/// instead of reporting success; once the replica is back, publishes succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_that_wait_for_replicas_fail_typed_when_the_replica_lags() {
    let master = RedisServer::start();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &master.port().to_string()]);
    let deadline = tokio::time::Instant::now() + WAIT;
    wait_until(
        deadline,
        || "the replica never caught up".into(),
        async || master.command("WAIT 1 100") == ":1",
    )
    .await;
    let conn = streamwise::redis::RedisConnection::new(&master.url()).unwrap();
    // A healthy replica answers at once, but the whole suite may keep these two cores busy:
    // the publishes that must succeed may wait longer than the one that must fail.
    let patient = RedisPublisher::new(
        conn.clone(),
        PublisherOptions::default().wait_replicas(1, Duration::from_secs(5)),
    );
    let options = PublisherOptions::default().wait_replicas(1, Duration::from_millis(500));
    let publisher = RedisPublisher::new(conn, options);
    let first = patient
        .publish("wr", Message::new("t", &1).unwrap())
        .await
        .unwrap();
    assert_eq!(
        replica.command("XLEN wr"),
        ":1",
        "acknowledged means on the replica"
    );
    assert_eq!(replica.command(&format!("XRANGE wr {first} {first}")), "*1");

    replica.freeze();
    let err = publisher
        .publish_batch(
            "wr",
            vec![Message::new("t", &2).unwrap(), Message::new("t", &3).unwrap()],
        )
        .await
        .unwrap_err();
    match &err {
        Error::NotReplicated {
            stream,
            ids,
            acknowledged,
            wanted,
        } => {
            assert_eq!(stream, "wr");
            assert_eq!(ids.len(), 2);
            assert_eq!((*acknowledged, *wanted), (0, 1));
        }
        other => panic!("expected NotReplicated, got {other:?}"),
    }
    assert_eq!(master.command("XLEN wr"), ":3", "the master kept the entries");
    replica.thaw();
    wait_until(
        deadline,
        || "publishes never succeeded again".into(),
        async || {
            patient
                .publish("wr", Message::new("t", &4).unwrap())
                .await
                .is_ok()
        },
    )
    .await;
}

/// Request/reply on Redis leaves nothing behind once the replies are closed: no reply
/// stream, no checkpoints, no leases; command and reply streams are capped as they grow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_leaves_no_litter_and_command_streams_are_capped() {
    use streamwise::cqrs::{Command, Cqrs, Replies};
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Ping;
    impl Command for Ping {
        fn name() -> std::borrow::Cow<'static, str> {
            "Ping".into()
        }
    }
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let cqrs = Cqrs::new();
    let router = cqrs
        .command_processor("pong")
        .handle_with_reply(|_: Ping| async { Ok::<_, std::convert::Infallible>("pong") })
        .register(streamwise::router::Router::new(), "w")
        .unwrap();
    let running = router
        .start(
            Arc::new(backend.subscriber().unwrap()),
            Arc::new(backend.publisher()),
        )
        .await
        .unwrap();
    let replies = Replies::listen(Arc::new(backend.subscriber().unwrap()))
        .await
        .unwrap();
    let topic = replies.topic().to_owned();
    let bus = cqrs
        .command_bus(Arc::new(backend.publisher()))
        .with_replies(replies.clone())
        .with_max_length(100);
    for _ in 0..500 {
        let pong: String = bus.send_and_wait(&Ping, WAIT).await.unwrap();
        assert_eq!(pong, "pong");
    }
    let len = |key: &str| -> u64 {
        server
            .command(&format!("XLEN {key}"))
            .trim_start_matches(':')
            .parse()
            .unwrap()
    };
    // MAXLEN ~ trims whole nodes of (by default) 100 entries.
    assert!(
        len("commands-Ping") <= 200,
        "{} commands kept",
        len("commands-Ping")
    );
    replies.close().await.unwrap();
    running.shutdown().await.unwrap();
    let keys = redis_cli(&server, &["--scan", "--pattern", &format!("*{topic}*")]);
    assert_eq!(keys, "", "left behind by the closed replies");
}

#[tokio::test]
async fn retention_trims_entries_older_than_retention_ms() {
    let server = RedisServer::start();
    let mut c = raw(&server).await;
    // 300 entries from 1970: far older than any retention.
    for n in 1..=300u64 {
        let _: String = redis::cmd("XADD")
            .arg("kept")
            .arg(format!("{n}-0"))
            .arg("event_type")
            .arg("t")
            .arg("payload")
            .arg("1")
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("HSET")
        .arg("streamwise:meta:{kept}")
        .arg("retention_ms")
        .arg(86_400_000)
        .query_async(&mut c)
        .await
        .unwrap();
    let backend = RedisBackend::new(&server.url()).unwrap();
    backend
        .publisher()
        .publish("kept", Message::new("t", &1).unwrap())
        .await
        .unwrap();
    let len: u64 = redis::cmd("XLEN").arg("kept").query_async(&mut c).await.unwrap();
    // MINID ~ removes whole nodes of old entries; the new entry stays.
    assert!(len <= 101, "XLEN {len}: old entries were not trimmed");
    let first: StreamRangeReply = redis::cmd("XRANGE")
        .arg("kept")
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(first.ids[0].id.parse::<streamwise::EntryId>().is_ok());
}

/// What a consumer handled, by entry and by message, so that an entry handed out twice (a
/// redelivery, which a live consumer must never do) is told apart from a message written twice:
/// a publish whose reply a connection failure lost is retried, and when the lost attempt had
/// run, the stream holds two entries of the message, with one UUID ([`RedisPublisher`]
/// documents this). Counting by payload would blame the consumer for the publisher's copy.
#[derive(Default)]
struct Handled {
    /// Deliveries per entry.
    entries: HashMap<streamwise::EntryId, u64>,
    /// The entries (in delivery order, without repeats) and UUID of each payload number.
    messages: HashMap<u64, (Vec<streamwise::EntryId>, streamwise::Uuid)>,
}

impl Handled {
    /// Notes a delivery of a message whose payload is its number; returns the number.
    fn record(&mut self, d: &streamwise::Delivery) -> u64 {
        let n: u64 = d.message().decode().unwrap();
        let uuid = d.message().uuid();
        let deliveries = self.entries.entry(d.id()).or_default();
        *deliveries += 1;
        let (ids, first_uuid) = self.messages.entry(n).or_insert_with(|| (Vec::new(), uuid));
        assert_eq!(
            *first_uuid,
            uuid,
            "message {n} came in entries of different messages: {ids:?} and {}",
            d.id()
        );
        if *deliveries == 1 {
            ids.push(d.id());
        }
        n
    }

    /// How many distinct messages were handled.
    fn messages(&self) -> usize {
        self.messages.len()
    }

    /// Deliveries of an entry handled before.
    fn redelivered(&self) -> u64 {
        self.entries.values().map(|c| c - 1).sum()
    }

    /// Entries beyond the first of each message: copies of a publish written twice.
    fn copies(&self) -> u64 {
        self.messages.values().map(|(ids, _)| ids.len() as u64 - 1).sum()
    }
}

#[tokio::test]
async fn publisher_and_consumer_ride_out_a_server_restart() {
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let conn = RedisConnection::builder(&server.url())
        .max_retries(12)
        .retry_base_delay(Duration::from_millis(20))
        .retry_max_delay(Duration::from_millis(500))
        .build()
        .unwrap();
    let publisher = Arc::new(RedisPublisher::new(conn.clone(), PublisherOptions::default()));
    let subscriber = RedisSubscriber::new(conn.clone(), RedisSubscriberOptions::default()).unwrap();
    let mut sub = subscriber
        .subscribe("survive", opts("g", "c").max_in_flight(50).batch_size(50))
        .await
        .unwrap();

    let total = 400u64;
    let (published_tx, mut published_rx) = tokio::sync::mpsc::unbounded_channel();
    let producer = {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            for n in 0..total {
                let id = publisher.publish("survive", Message::new("t", &n).unwrap()).await;
                published_tx.send((n, id)).unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    let mut handled = Handled::default();
    let mut restarts = 0;
    while handled.messages() < total as usize {
        let d = recv(&mut sub).await;
        handled.record(&d);
        d.ack().await.unwrap();
        let seen = handled.messages();
        if (seen == 100 && restarts == 0) || (seen == 250 && restarts == 1) {
            server.kill();
            tokio::time::sleep(Duration::from_millis(200)).await;
            server.restart();
            restarts += 1;
        }
    }
    producer.await.unwrap();
    let mut published = 0;
    while let Ok((n, id)) = published_rx.try_recv() {
        let id = id.unwrap_or_else(|e| panic!("publish {n} failed across the restart: {e}"));
        assert!(
            handled.entries.contains_key(&id),
            "the entry {id} that publish {n} returned was not delivered"
        );
        published += 1;
    }
    assert_eq!(published, total);
    assert_eq!(restarts, 2);
    // Every entry in the stream is handled, copies of a retried publish included.
    let entries: usize = redis_cli(&server, &["XLEN", "survive"]).parse().unwrap();
    while handled.entries.len() < entries {
        let d = recv(&mut sub).await;
        handled.record(&d);
        d.ack().await.unwrap();
    }
    // The consumer never died, so no entry it handled comes back: entries it held, acked
    // but not yet flushed, or read in a reply lost to the kill are all accounted for.
    assert_eq!(
        handled.redelivered(),
        0,
        "entries handled twice across server restarts"
    );
    // A publish in flight at a kill may have been written before its reply was lost, and
    // then again by its retry: at most one message per kill, the copies with its UUID.
    assert!(
        handled.copies() <= restarts,
        "{} messages written twice in {restarts} restarts",
        handled.copies()
    );
    assert_eq!(entries as u64, total + handled.copies());
    subscriber.close().await.unwrap();
}

/// A loopback proxy to a server that, once armed, swallows the next reply the server sends
/// and cuts that connection: the command ran, its client never hears of it.
struct ReplyCutter {
    port: u16,
    armed: Arc<std::sync::atomic::AtomicBool>,
    cut: Arc<std::sync::atomic::AtomicU64>,
}

impl ReplyCutter {
    async fn start(upstream: u16) -> ReplyCutter {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (armed, cut) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (armed_, cut_) = (armed.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(("127.0.0.1", upstream))
                    .await
                    .unwrap();
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                });
                let (armed, cut) = (armed_.clone(), cut_.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if armed.swap(false, Ordering::AcqRel) {
                            // Dropping the client's half ends its connection: it reads EOF.
                            cut.fetch_add(1, Ordering::AcqRel);
                            return;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        ReplyCutter { port, armed, cut }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The next reply from the server is lost, with its connection.
    fn cut_next_reply(&self) {
        self.armed.store(true, std::sync::atomic::Ordering::Release);
    }

    fn cuts(&self) -> u64 {
        self.cut.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// What the restart test meets when a kill falls between an `XADD` and its reply, made
/// deterministic: the publish is retried and written twice, the two entries carry one UUID,
/// and the consumer handles each entry once. Counted by payload, as the restart test once
/// did, this looks like a message handled twice.
#[tokio::test]
async fn a_publish_whose_reply_is_lost_is_written_twice_and_each_entry_handled_once() {
    let server = RedisServer::start();
    let cutter = ReplyCutter::start(server.port()).await;
    let conn = RedisConnection::builder(&cutter.url())
        .max_retries(3)
        .retry_base_delay(Duration::from_millis(10))
        .retry_max_delay(Duration::from_millis(20))
        .build()
        .unwrap();
    let publisher = RedisPublisher::new(conn, PublisherOptions::default());
    // The consumer talks to the server directly: only the publisher loses a reply.
    let backend = RedisBackend::new(&server.url()).unwrap();
    let subscriber = backend.subscriber().unwrap();
    let mut sub = subscriber.subscribe("lost-reply", opts("g", "c")).await.unwrap();

    // Opens the publisher's connections and reads the stream's settings, so that the next
    // reply from the server is the XADD's.
    publisher
        .publish("lost-reply", Message::new("t", &1u64).unwrap())
        .await
        .unwrap();
    cutter.cut_next_reply();
    let id = publisher
        .publish("lost-reply", Message::new("t", &2u64).unwrap())
        .await
        .unwrap();
    assert_eq!(cutter.cuts(), 1, "the XADD's reply was not cut");
    assert_eq!(redis_cli(&server, &["XLEN", "lost-reply"]), "3");

    let mut handled = Handled::default();
    while handled.entries.len() < 3 {
        let d = recv(&mut sub).await;
        handled.record(&d);
        d.ack().await.unwrap();
    }
    assert_eq!(handled.messages(), 2);
    assert_eq!(handled.redelivered(), 0);
    assert_eq!(handled.copies(), 1, "the message written twice is one message");
    let (copies, _) = &handled.messages[&2];
    assert_eq!(copies.len(), 2);
    assert_eq!(copies[1], id, "the retry's entry is the id publish returned");
    subscriber.close().await.unwrap();
}

#[tokio::test]
async fn errors_surface_only_after_the_retry_budget_and_the_stream_recovers() {
    let mut server = RedisServer::start();
    let conn = RedisConnection::builder(&server.url())
        .max_retries(2)
        .retry_base_delay(Duration::from_millis(10))
        .retry_max_delay(Duration::from_millis(20))
        .build()
        .unwrap();
    let publisher = RedisPublisher::new(conn.clone(), PublisherOptions::default());
    let subscriber = RedisSubscriber::new(conn.clone(), RedisSubscriberOptions::default()).unwrap();
    let mut sub = subscriber.subscribe("flaky", opts("g", "c")).await.unwrap();
    publisher
        .publish("flaky", Message::new("t", &1).unwrap())
        .await
        .unwrap();
    recv(&mut sub).await.ack().await.unwrap();

    server.kill();
    match publisher.publish("flaky", Message::new("t", &2).unwrap()).await {
        Err(Error::Connection { message, .. }) => assert!(message.contains("after 2 retries"), "{message}"),
        other => panic!("expected a connection error, got {other:?}"),
    }
    match tokio::time::timeout(WAIT, sub.next()).await {
        Ok(Some(Err(Error::Connection { .. }))) => {}
        other => panic!("expected the stream to report the outage, got {other:?}"),
    }
    server.restart();
    publisher
        .publish("flaky", Message::new("t", &3).unwrap())
        .await
        .unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(d.message().decode::<u64>().unwrap(), 3);
    d.ack().await.unwrap();
    subscriber.close().await.unwrap();
}

#[tokio::test]
async fn connection_errors_never_show_the_password() {
    let server = RedisServer::start();
    let port = server.port();
    drop(server);
    let conn = RedisConnection::builder(&format!("redis://user:hunter2@127.0.0.1:{port}"))
        .max_retries(1)
        .retry_base_delay(Duration::from_millis(5))
        .retry_max_delay(Duration::from_millis(5))
        .build()
        .unwrap();
    let publisher = RedisPublisher::new(conn.clone(), PublisherOptions::default());
    let err = publisher
        .publish("s", Message::new("t", &1).unwrap())
        .await
        .unwrap_err();
    let mut text = format!("{err} {err:?} {conn:?}");
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        text.push_str(&s.to_string());
        source = s.source();
    }
    assert!(matches!(err, Error::Connection { .. }), "{err}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("user:***@"), "{text}");
}

#[tokio::test]
async fn a_pending_entry_trimmed_away_is_reported_and_dead_lettered() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let id = backend
        .publisher()
        .publish("trim", Message::new("t", &1).unwrap())
        .await
        .unwrap();
    let first = backend.subscriber().unwrap();
    let mut sub = first.subscribe("trim", opts("g", "c")).await.unwrap();
    let held = recv(&mut sub).await;
    first.close().await.unwrap();
    drop(held);
    drop(sub);
    redis_cli(&server, &["XTRIM", "trim", "MAXLEN", "0"]);

    // The restarted consumer drains its pending list first and finds the entry gone.
    let second = backend.subscriber().unwrap();
    let mut sub = second.subscribe("trim", opts("g", "c")).await.unwrap();
    match tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        Err(_) => {}
        Ok(item) => panic!("a trimmed entry cannot be delivered: {item:?}"),
    }
    let mut dead = second
        .subscribe(&dead_letter::stream_for("trim"), opts("inspect", "c"))
        .await
        .unwrap();
    let record = recv(&mut dead).await;
    assert_eq!(record.message().event_type(), dead_letter::TRIMMED_EVENT_TYPE);
    assert_eq!(
        record.message().metadata().get(dl::ORIGINAL_ID),
        Some(id.to_string().as_str())
    );
    record.ack().await.unwrap();
    assert_eq!(second.stats().trimmed_pending, 1);
    second.close().await.unwrap();
    assert_eq!(backend.pending_count("trim", "g").await.unwrap(), 0);
}

#[tokio::test]
async fn created_streams_are_empty_keep_their_settings_and_publishers_apply_them() {
    let server = RedisServer::start();
    let conn = RedisConnection::new(&server.url()).unwrap();
    let settings = StreamSettings {
        retention_ms: Some(86_400_000),
        max_length: Some(100),
    };
    assert!(admin::create_stream(&conn, "made", settings).await.unwrap());
    assert!(
        !admin::create_stream(&conn, "made", StreamSettings::default())
            .await
            .unwrap()
    );
    let mut c = raw(&server).await;
    let len: u64 = redis::cmd("XLEN").arg("made").query_async(&mut c).await.unwrap();
    assert_eq!(len, 0);
    let exists: u64 = redis::cmd("EXISTS")
        .arg("made")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(exists, 1, "an empty stream exists");
    assert_eq!(
        redis_cli(&server, &["XINFO", "GROUPS", "made"]),
        "",
        "no phantom group"
    );
    let (read, created_at) = admin::stream_settings(&conn, "made").await.unwrap();
    assert_eq!(read, settings, "the second create_stream left the settings alone");
    let age = std::time::SystemTime::now()
        .duration_since(created_at.unwrap())
        .unwrap();
    assert!(age < Duration::from_secs(60));

    // The publisher has no max_length of its own: the stream's applies.
    let publisher = RedisBackend::new(&server.url()).unwrap().publisher();
    for batch in 0..5u64 {
        let messages = (0..100u64)
            .map(|n| Message::new("t", &(batch * 100 + n)).unwrap())
            .collect();
        publisher.publish_batch("made", messages).await.unwrap();
    }
    let len: u64 = redis::cmd("XLEN").arg("made").query_async(&mut c).await.unwrap();
    assert!(
        (100..=200).contains(&len),
        "XLEN {len} with the stream's max_length 100"
    );

    for (settings, field) in [
        (
            StreamSettings {
                max_length: Some(0),
                ..Default::default()
            },
            "max_length",
        ),
        (
            StreamSettings {
                retention_ms: Some(0),
                ..Default::default()
            },
            "retention_ms",
        ),
    ] {
        let err = admin::create_stream(&conn, "other", settings).await.unwrap_err();
        assert_eq!(err.invalid_field(), Some(field));
    }
    let err = admin::create_stream(&conn, "bad name", StreamSettings::default())
        .await
        .unwrap_err();
    assert_eq!(err.invalid_field(), Some("stream"));
}

#[tokio::test]
async fn a_reader_without_a_group_resumes_after_its_checkpoint() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let messages = (0..5u64).map(|n| Message::new("t", &n).unwrap()).collect();
    let ids = backend
        .publisher()
        .publish_batch("audit", messages)
        .await
        .unwrap();
    xadd(&server, "audit", &["not", "ours"]);

    let conn = backend.connection().clone();
    let mut reader = StreamReader::open(conn.clone(), "audit", "archiver", StartFrom::Beginning)
        .await
        .unwrap();
    let batch = reader.next_batch(3, Duration::from_millis(100)).await.unwrap();
    let got: Vec<_> = batch
        .iter()
        .map(|(id, m)| (*id, m.as_ref().unwrap().decode::<u64>().unwrap()))
        .collect();
    assert_eq!(got, [(ids[0], 0), (ids[1], 1), (ids[2], 2)]);
    reader.commit(ids[1]).await.unwrap();
    drop(reader);

    // Reopened: resumes after the committed id, not after what was merely read.
    let mut reader = StreamReader::open(conn.clone(), "audit", "archiver", StartFrom::Beginning)
        .await
        .unwrap();
    assert_eq!(reader.cursor(), ids[1].to_string());
    let batch = reader.next_batch(10, Duration::from_millis(100)).await.unwrap();
    let numbers: Vec<_> = batch
        .iter()
        .filter_map(|(_, m)| m.as_ref().ok())
        .map(|m| m.decode::<u64>().unwrap())
        .collect();
    assert_eq!(numbers, [2, 3, 4]);
    assert!(
        batch.last().unwrap().1.is_err(),
        "an entry in another format comes with its decode error"
    );
    assert_eq!(reader.checkpoint().await.unwrap().unwrap().message_id, ids[1]);

    // Another reader name has its own position; `$` means only new entries.
    let mut fresh = StreamReader::open(conn, "audit", "tail", StartFrom::Latest)
        .await
        .unwrap();
    assert!(
        fresh
            .next_batch(10, Duration::from_millis(50))
            .await
            .unwrap()
            .is_empty()
    );
    let err = fresh.next_batch(0, Duration::from_millis(50)).await.unwrap_err();
    assert_eq!(err.invalid_field(), Some("count"));
}

/// The subscriber's and the reader's own connections use the URL's database, like the shared
/// one: a mismatch would read an empty stream in database 0 and never deliver.
#[tokio::test]
async fn the_urls_database_is_used_by_the_read_connections_too() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&format!("{}/3", server.url())).unwrap();
    common::round_trip(&backend, "in-db-3").await.unwrap();
    let mut reader = StreamReader::open(
        backend.connection().clone(),
        "in-db-3",
        "archiver",
        StartFrom::Beginning,
    )
    .await
    .unwrap();
    let batch = reader.next_batch(10, Duration::from_millis(100)).await.unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(redis_cli(&server, &["-n", "3", "XLEN", "in-db-3"]), "1");
    assert_eq!(redis_cli(&server, &["-n", "0", "EXISTS", "in-db-3"]), "0");
}

/// One publisher shared by many tasks: every publish lands once, with the id it was given
/// (one task at a time uses the publisher's own connection, the others the shared one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_shared_by_many_tasks_gives_each_publish_its_own_id() {
    let server = RedisServer::start();
    let publisher = Arc::new(RedisBackend::new(&server.url()).unwrap().publisher());
    let mut tasks = Vec::new();
    for task in 0..20u64 {
        let publisher = publisher.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for n in 0..50u64 {
                let value = task * 1000 + n;
                let id = publisher
                    .publish("shared", Message::new("t", &value).unwrap())
                    .await
                    .unwrap();
                sent.push((id, value));
            }
            sent
        }));
    }
    let mut sent = HashMap::new();
    for task in tasks {
        sent.extend(task.await.unwrap());
    }
    assert_eq!(sent.len(), 1000, "ids are unique");
    let mut c = raw(&server).await;
    let stored: StreamRangeReply = redis::cmd("XRANGE")
        .arg("shared")
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(stored.ids.len(), 1000);
    for entry in stored.ids {
        let id: streamwise::EntryId = entry.id.parse().unwrap();
        let payload: String = entry.get("payload").unwrap();
        assert_eq!(
            payload,
            sent[&id].to_string(),
            "entry {id} is the publish that got its id"
        );
    }
}

/// A publish dropped while it waits for its reply leaves the publisher's own connection owing
/// that reply; the next publish must not take it for its own.
#[tokio::test]
async fn a_publish_dropped_halfway_does_not_hand_its_reply_to_the_next() {
    let server = RedisServer::start();
    let publisher = RedisBackend::new(&server.url()).unwrap().publisher();
    publisher
        .publish("halfway", Message::new("t", &0).unwrap())
        .await
        .unwrap();
    let mut c = raw(&server).await;
    let mut dropped = 0;
    for n in 1..=20u64 {
        let mut abandoned = Box::pin(publisher.publish("halfway", Message::new("t", &(n * 100)).unwrap()));
        if futures::poll!(abandoned.as_mut()).is_pending() {
            dropped += 1;
        }
        drop(abandoned);
        let id = publisher
            .publish("halfway", Message::new("t", &n).unwrap())
            .await
            .unwrap();
        let stored: StreamRangeReply = redis::cmd("XRANGE")
            .arg("halfway")
            .arg(id.to_string())
            .arg(id.to_string())
            .query_async(&mut c)
            .await
            .unwrap();
        let payload: String = stored.ids[0].get("payload").unwrap();
        assert_eq!(payload, n.to_string(), "the id returned is this publish's entry");
    }
    assert!(dropped > 0, "no publish was caught waiting for its reply");
}

/// `n` entries (the numbers 0 to n-1) in `topic`, and a subscription of group `g` reading
/// them from the start in batches of `batch` with `max_in_flight`.
async fn backlog(
    server: &RedisServer,
    topic: &str,
    n: u64,
    batch: usize,
    max_in_flight: usize,
) -> (RedisSubscriber, Subscription) {
    let backend = RedisBackend::new(&server.url()).unwrap();
    let messages: Vec<Message> = (0..n).map(|n| Message::new("t", &n).unwrap()).collect();
    backend.publisher().publish_batch(topic, messages).await.unwrap();
    let subscriber = backend.subscriber().unwrap();
    let options = opts("g", "c")
        .batch_size(batch)
        .max_in_flight(max_in_flight)
        .start_from(StartFrom::Beginning);
    let sub = subscriber.subscribe(topic, options).await.unwrap();
    (subscriber, sub)
}

/// A nack during a long backlog comes back within a few batches: reading ahead while
/// batches come back full must not keep a due retry waiting until the backlog is gone.
#[tokio::test]
async fn a_nack_is_redelivered_during_a_backlog_not_after_it() {
    let server = RedisServer::start();
    let (subscriber, mut sub) = backlog(&server, "backlog", 3000, 50, 200).await;
    let first = recv(&mut sub).await;
    let nacked = first.id();
    first.nack().await.unwrap();
    let mut seen = 1;
    loop {
        let d = recv(&mut sub).await;
        seen += 1;
        if d.id() == nacked {
            assert_eq!(d.delivery_count(), 2);
            d.ack().await.unwrap();
            break;
        }
        d.ack().await.unwrap();
    }
    assert!(seen < 500, "the nacked entry came back after {seen} deliveries");
    subscriber.close().await.unwrap();
}

/// On a backlog, two reads go ahead of the batch being handled, so that the server has the
/// next one queued when it answers one; no more than two (`max_in_flight` is not the bound
/// here: the conformance suite checks that one).
#[tokio::test]
async fn a_backlog_keeps_two_reads_ahead_of_the_batch_handled() {
    let server = RedisServer::start();
    let (subscriber, mut sub) = backlog(&server, "ahead", 1000, 100, 1000).await;
    // One delivery taken and held: its read (100) came back full, and the reads sent ahead
    // were sent before it was handed out; nothing polls the subscription after that.
    let first = recv(&mut sub).await;
    let mut c = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let pending = async |c: &mut redis::aio::MultiplexedConnection| -> u64 {
        let summary: (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
            .arg("ahead")
            .arg("g")
            .query_async(c)
            .await
            .unwrap();
        summary.0
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    let seen = std::cell::Cell::new(0);
    wait_until(
        deadline,
        || {
            format!(
                "{} entries delivered to the consumer; 300 expected (one batch, two ahead)",
                seen.get()
            )
        },
        async || {
            seen.set(pending(&mut c).await);
            seen.get() >= 300
        },
    )
    .await;
    assert_eq!(pending(&mut c).await, 300, "no more than two reads ahead");
    first.ack().await.unwrap();
    // Everything is still handed out once each, in order.
    for n in 1..1000u64 {
        let d = recv(&mut sub).await;
        assert_eq!(d.message().decode::<u64>().unwrap(), n);
        d.ack().await.unwrap();
    }
    subscriber.close().await.unwrap();
    assert_eq!(pending(&mut c).await, 0);
}

/// A flusher that panics (here, a codec that panics on the dead-letter record) does not keep
/// the lease, nor `close`, waiting for it forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_returns_when_the_flusher_panicked() {
    use streamwise::codec::{Codec, JsonCodec, RawEntry};
    #[derive(Debug)]
    struct PanicsOnEncode;
    impl Codec for PanicsOnEncode {
        fn encode(&self, _: &streamwise::Message) -> streamwise::Result<Vec<(&'static str, bytes::Bytes)>> {
            panic!("this codec cannot encode");
        }
        fn decode(&self, entry: RawEntry) -> streamwise::Result<streamwise::Message> {
            JsonCodec.decode(entry)
        }
    }
    let server = RedisServer::start();
    let conn = RedisConnection::new(&server.url()).unwrap();
    let publisher = RedisBackend::with_connection(conn.clone()).publisher();
    publisher
        .publish("panicky", streamwise::Message::new("t", &1).unwrap())
        .await
        .unwrap();
    let subscriber =
        RedisSubscriber::new(conn, RedisSubscriberOptions::default().codec(PanicsOnEncode)).unwrap();
    let mut sub = subscriber
        .subscribe("panicky", SubscribeOptions::new("g", "c"))
        .await
        .unwrap();
    let delivery = sub.next().await.unwrap().unwrap();
    delivery.dead_letter("refused").await.unwrap();
    drop(delivery);
    drop(sub);
    tokio::time::timeout(Duration::from_secs(20), subscriber.close())
        .await
        .expect("close returns")
        .unwrap();
}
