//! Metrics: a real Redis round trip, with a handler that fails some deliveries once, one it
//! dead-letters and an entry that is not JSON, records exactly the expected values per label.
//! The recorder is `metrics-util`'s debugging one, installed once for this test binary.
#![cfg(feature = "metrics")]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use streamwise::metrics::names;
use streamwise::redis::RedisBackend;
use streamwise::redis::client::cmd;
use streamwise::router::{Json, Permanent, RetryBackoff, Router};
use streamwise::{Message, Publisher, SubscribeOptions};

use common::RedisServer;

/// A snapshot drains what it reads (counters and gauges back to 0, histograms emptied), so the
/// tests of this binary take turns: each holds this while it records and reads.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().expect("the only recorder of this binary");
        snapshotter
    })
}

/// Every metric recorded for `topic`, by name and its other labels (sorted `k=v` pairs).
fn recorded(topic: &str) -> HashMap<(String, Vec<String>), DebugValue> {
    snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| {
            let key = key.key();
            let labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.iter().any(|(k, v)| k == "topic" && v == topic).then(|| {
                let mut others: Vec<String> = labels
                    .into_iter()
                    .filter(|(k, _)| k != "topic")
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                others.sort();
                ((key.name().to_owned(), others), value)
            })
        })
        .collect()
}

fn counter(metrics: &HashMap<(String, Vec<String>), DebugValue>, name: &str, labels: &[&str]) -> u64 {
    let labels = labels.iter().map(|s| s.to_string()).collect();
    match metrics.get(&(name.to_owned(), labels)) {
        Some(DebugValue::Counter(n)) => *n,
        Some(other) => panic!("{name} is not a counter: {other:?}"),
        None => 0,
    }
}

fn histogram_count(
    metrics: &HashMap<(String, Vec<String>), DebugValue>,
    name: &str,
    labels: &[&str],
) -> usize {
    let labels = labels.iter().map(|s| s.to_string()).collect();
    match metrics.get(&(name.to_owned(), labels)) {
        Some(DebugValue::Histogram(values)) => values.len(),
        Some(other) => panic!("{name} is not a histogram: {other:?}"),
        None => 0,
    }
}

/// Adds an entry of `event_type` to `topic` in the wire format whose payload is not JSON.
async fn add_not_json(conn: &streamwise::redis::RedisConnection, topic: &str, event_type: &str) {
    conn.command::<String>(
        cmd("XADD")
            .arg(topic)
            .arg("*")
            .arg("event_type")
            .arg(event_type)
            .arg("payload")
            .arg("{not json")
            .arg("metadata")
            .arg("{}")
            .arg("timestamp")
            .arg("2026-12-06T00:00:00.000Z")
            .arg("uuid")
            .arg(streamwise::Uuid::now_v7().to_string()),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_round_trip_records_exactly_what_happened() {
    let _turn = SERIAL.lock().await;
    snapshotter();
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let topic = "metered";
    let publisher = backend.publisher();
    for n in 0..20u64 {
        publisher
            .publish(topic, Message::new("order.placed", &n).unwrap())
            .await
            .unwrap();
    }
    publisher
        .publish(topic, Message::new("order.unknown", &0).unwrap())
        .await
        .unwrap();
    // An entry no codec can read: its payload is not JSON.
    add_not_json(backend.connection(), topic, "order.placed").await;

    // Fails multiples of 5 on their first delivery; dead-letters 7.
    async fn handle(
        Json(n): Json<u64>,
        info: streamwise::router::DeliveryInfo,
    ) -> Result<(), streamwise::BoxError> {
        if n == 7 {
            return Err(Permanent::new("seven is refused").into());
        }
        if n % 5 == 0 && info.delivery_count() == 1 {
            return Err("first try fails".into());
        }
        Ok(())
    }
    let options = SubscribeOptions::new("billing", "w1").block(Duration::from_millis(100));
    let router = Router::new().retry_backoff(RetryBackoff::exponential(
        Duration::from_millis(10),
        Duration::from_millis(10),
    ));
    let routes = router.routes().route("order.placed", handle);
    let running = router
        .subscribe(topic, options, routes)
        .start(
            Arc::new(backend.subscriber().unwrap()),
            Arc::new(backend.publisher()),
        )
        .await
        .unwrap();
    // 20 first deliveries, 4 second ones, the unrouted one (dead-lettered by the fallback).
    streamwise::testing::wait_until_handled(&running, 25).await;
    running.shutdown().await.unwrap();

    let m = recorded(topic);
    let placed = |outcome: &'static str| ["event_type=order.placed", outcome, "group=billing"];
    let labels = |outcome| {
        let mut l = placed(outcome).to_vec();
        l.sort();
        l
    };
    assert_eq!(counter(&m, names::PUBLISHED_TOTAL, &["outcome=ok"]), 21);
    assert_eq!(counter(&m, names::PUBLISHED_TOTAL, &["outcome=error"]), 0);
    assert_eq!(histogram_count(&m, names::PUBLISH_DURATION_SECONDS, &[]), 21);
    assert_eq!(counter(&m, names::DELIVERIES_TOTAL, &labels("outcome=ack")), 19);
    assert_eq!(counter(&m, names::DELIVERIES_TOTAL, &labels("outcome=nack")), 4);
    assert_eq!(
        counter(&m, names::DELIVERIES_TOTAL, &labels("outcome=dead_letter")),
        1
    );
    assert_eq!(counter(&m, names::DELIVERIES_TOTAL, &labels("outcome=error")), 0);
    assert_eq!(
        counter(
            &m,
            names::DELIVERIES_TOTAL,
            &["event_type=unrouted", "group=billing", "outcome=dead_letter"]
        ),
        1,
        "an event type without a route is labelled unrouted"
    );
    assert_eq!(
        histogram_count(&m, names::HANDLER_DURATION_SECONDS, &labels("outcome=ack")),
        19
    );
    assert_eq!(counter(&m, names::REDELIVERIES_TOTAL, &["group=billing"]), 4);
    assert_eq!(
        counter(
            &m,
            names::DEAD_LETTERS_TOTAL,
            &["group=billing", "reason=handler"]
        ),
        2,
        "seven, and the unrouted one"
    );
    assert_eq!(
        counter(&m, names::DEAD_LETTERS_TOTAL, &["group=billing", "reason=decode"]),
        1
    );
    assert_eq!(counter(&m, names::READ_ERRORS_TOTAL, &["group=billing"]), 0);
    assert_eq!(
        histogram_count(&m, names::END_TO_END_SECONDS, &["group=billing"]),
        25
    );
    match m.get(&(names::IN_FLIGHT.to_owned(), vec!["group=billing".to_owned()])) {
        Some(DebugValue::Gauge(v)) => assert_eq!(v.into_inner(), 0.0),
        other => panic!("in-flight gauge: {other:?}"),
    }
}

fn gauge(metrics: &HashMap<(String, Vec<String>), DebugValue>, name: &str, labels: &[&str]) -> f64 {
    let labels = labels.iter().map(|s| s.to_string()).collect();
    match metrics.get(&(name.to_owned(), labels)) {
        Some(DebugValue::Gauge(v)) => v.into_inner(),
        other => panic!("{name}: {other:?}"),
    }
}

/// The group monitor's gauges match `XINFO GROUPS` and `XPENDING` while a backlog forms, while
/// a consumer holds entries, and once everything is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_monitor_gauges_follow_a_backlog_as_it_forms_and_drains() {
    use futures::StreamExt;
    use streamwise::redis::{GroupMonitor, admin};
    use streamwise::{StartFrom, Subscriber};
    let _turn = SERIAL.lock().await;
    snapshotter();
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let conn = backend.connection().clone();
    let topic = "monitored";
    admin::create_group(&conn, topic, "billing", StartFrom::Beginning, true)
        .await
        .unwrap();
    let messages = (0..100u64).map(|n| Message::new("t", &n).unwrap()).collect();
    backend.publisher().publish_batch(topic, messages).await.unwrap();
    let monitor = GroupMonitor::new(conn.clone()).watch(topic, "billing").unwrap();
    let labels = ["group=billing"];

    let polled = monitor.poll().await.unwrap();
    assert_eq!((polled.len(), polled[0].lag, polled[0].pending), (1, 100, 0));
    let m = recorded(topic);
    assert_eq!(gauge(&m, names::GROUP_LAG_ENTRIES, &labels), 100.0);
    assert_eq!(gauge(&m, names::GROUP_PENDING_ENTRIES, &labels), 0.0);
    assert_eq!(gauge(&m, names::STREAM_LENGTH_ENTRIES, &labels), 100.0);
    assert!(gauge(&m, names::GROUP_LAG_SECONDS, &labels) >= 0.0);

    // A consumer takes 30 and holds them.
    let subscriber = backend.subscriber().unwrap();
    let options = SubscribeOptions::new("billing", "w1")
        .batch_size(30)
        .max_in_flight(30);
    let mut sub = subscriber.subscribe(topic, options).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..30 {
        held.push(sub.next().await.unwrap().unwrap());
    }
    monitor.poll().await.unwrap();
    let info = admin::group_info(&conn, topic, "billing").await.unwrap();
    let m = recorded(topic);
    assert_eq!(
        gauge(&m, names::GROUP_PENDING_ENTRIES, &labels),
        info.pending as f64
    );
    assert_eq!(
        gauge(&m, names::GROUP_LAG_ENTRIES, &labels),
        info.lag.unwrap() as f64
    );
    assert_eq!((info.pending, info.lag), (30, Some(70)));
    assert!(gauge(&m, names::OLDEST_PENDING_SECONDS, &labels) >= 0.0);

    // All acknowledged and read: nothing lags, nothing pending.
    for d in held {
        d.ack().await.unwrap();
    }
    for _ in 30..100 {
        sub.next().await.unwrap().unwrap().ack().await.unwrap();
    }
    sub.flush().await.unwrap();
    monitor.poll().await.unwrap();
    let m = recorded(topic);
    assert_eq!(gauge(&m, names::GROUP_LAG_ENTRIES, &labels), 0.0);
    assert_eq!(gauge(&m, names::GROUP_PENDING_ENTRIES, &labels), 0.0);
    assert_eq!(gauge(&m, names::GROUP_LAG_SECONDS, &labels), 0.0);
    assert_eq!(gauge(&m, names::OLDEST_PENDING_SECONDS, &labels), 0.0);
    subscriber.close().await.unwrap();
}

/// On a partitioned topic the monitor records each partition under the topic, with a
/// `partition` label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_monitor_records_each_partition_of_a_partitioned_topic() {
    use streamwise::StartFrom;
    use streamwise::partition::{PartitionedPublisher, partition_for_key, partition_stream};
    use streamwise::redis::{GroupMonitor, admin};
    let _turn = SERIAL.lock().await;
    snapshotter();
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let conn = backend.connection().clone();
    let topic = "monitored-partitions";
    let publisher = PartitionedPublisher::new(Arc::new(backend.publisher()), Arc::new(backend.coordinator()))
        .topic(topic, 2);
    for n in 0..10u64 {
        publisher
            .publish_keyed(topic, "ada", Message::new("t", &n).unwrap())
            .await
            .unwrap();
    }
    for p in 0..2 {
        admin::create_group(
            &conn,
            &partition_stream(topic, p),
            "billing",
            StartFrom::Beginning,
            true,
        )
        .await
        .unwrap();
    }
    GroupMonitor::new(conn)
        .watch(topic, "billing")
        .unwrap()
        .poll()
        .await
        .unwrap();
    let m = recorded(topic);
    let ada = partition_for_key("ada", 2);
    for p in 0..2u32 {
        let partition = format!("partition={p}");
        let want = if p == ada { 10.0 } else { 0.0 };
        assert_eq!(
            gauge(&m, names::GROUP_LAG_ENTRIES, &["group=billing", &partition]),
            want
        );
    }
}

/// A handler abandoned at the shutdown deadline does not leave the in-flight gauge up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_flight_gauge_falls_to_zero_when_handlers_are_abandoned() {
    let _turn = SERIAL.lock().await;
    snapshotter();
    let backend = streamwise::memory::MemoryBackend::new();
    let topic = "abandoned";
    let router = Router::new().shutdown_deadline(Duration::from_millis(300));
    let routes = router.routes().route("stuck", std::future::pending::<()>);
    let running = router
        .subscribe(topic, SubscribeOptions::new("g", "w1"), routes)
        .start(Arc::new(backend.subscriber()), Arc::new(backend.publisher()))
        .await
        .unwrap();
    backend
        .publisher()
        .publish(topic, Message::new("stuck", &1).unwrap())
        .await
        .unwrap();
    while running.in_flight() < 1 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let report = running.shutdown().await.unwrap();
    assert_eq!(report.abandoned, 1);
    let m = recorded(topic);
    assert_eq!(gauge(&m, names::IN_FLIGHT, &["group=g"]), 0.0);
}

/// A dead letter is counted once, when its record is written: not also when its entry, whose
/// record could not be written before the subscriber closed, is read and dead-lettered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_counted_once_when_it_is_written() {
    use futures::StreamExt;
    use streamwise::Subscriber;
    let _turn = SERIAL.lock().await;
    snapshotter();
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let conn = backend.connection().clone();
    let topic = "dead-once";
    // An entry that is not JSON, and a dead-letter stream key that is not a stream: the
    // record cannot be written yet.
    add_not_json(&conn, topic, "t").await;
    conn.command::<String>(cmd("SET").arg("{dead-once}-dead").arg("in the way"))
        .await
        .unwrap();
    let options = || SubscribeOptions::new("g", "c").block(Duration::from_millis(100));
    let first = backend.subscriber().unwrap();
    let mut sub = first.subscribe(topic, options()).await.unwrap();
    // Reads run while the subscription is polled; nothing is handed out.
    let poll = tokio::spawn(async move { while sub.next().await.is_some() {} });
    // Wait until the write was tried and refused.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while first.stats().dead_letter_failures == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the write was never tried"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    poll.abort();
    let _ = poll.await;
    first.close().await.unwrap();

    conn.command::<i64>(cmd("DEL").arg("{dead-once}-dead"))
        .await
        .unwrap();
    let second = backend.subscriber().unwrap();
    let mut sub = second.subscribe(topic, options()).await.unwrap();
    let poll = tokio::spawn(async move { while sub.next().await.is_some() {} });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while second.stats().dead_lettered == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the record was never written"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    poll.abort();
    let _ = poll.await;
    second.close().await.unwrap();
    let m = recorded(topic);
    assert_eq!(
        counter(&m, names::DEAD_LETTERS_TOTAL, &["group=g", "reason=decode"]),
        1
    );
}
