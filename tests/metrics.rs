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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_round_trip_records_exactly_what_happened() {
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
    backend
        .connection()
        .command::<String>(
            cmd("XADD")
                .arg(topic)
                .arg("*")
                .arg("event_type")
                .arg("order.placed")
                .arg("payload")
                .arg("{not json")
                .arg("metadata")
                .arg("{}")
                .arg("timestamp")
                .arg("2026-12-06T00:00:00.000Z")
                .arg("uuid")
                .arg("0193a1b2-0000-7000-8000-000000000000"),
        )
        .await
        .unwrap();

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
