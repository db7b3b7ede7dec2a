//! The router end to end on the Redis backend, with middleware: dispatch by event type,
//! produced messages, dead letters, retries, and a shutdown that flushes every ack.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use streamwise::dead_letter::keys;
use streamwise::redis::RedisBackend;
use streamwise::router::{DeliveryInfo, Json, Outcome, Router, State};
use streamwise::{Message, Publisher, SubscribeOptions};
use streamwise_middleware::dead_letter::DeadLetterLayer;
use streamwise_middleware::retry::RetryLayer;
use streamwise_middleware::trace::TraceLayer;

use common::RedisServer;

#[tokio::test]
async fn a_router_over_redis_handles_produces_retries_and_dead_letters() {
    let server = RedisServer::start();
    let redis = RedisBackend::new(&server.url()).unwrap();
    let attempts = Arc::new(AtomicU32::new(0));

    async fn placed(Json(id): Json<u32>) -> Outcome {
        Outcome::ack().publish("invoices", Message::new("invoice.requested", &id).unwrap())
    }
    async fn flaky(State(attempts): State<Arc<AtomicU32>>, info: DeliveryInfo) -> Result<(), String> {
        // Fails on its first two calls (retried in-process), then works.
        if attempts.fetch_add(1, Ordering::SeqCst) < 2 {
            return Err(format!("busy (delivery {})", info.delivery_count()));
        }
        Ok(())
    }
    async fn broken() -> Result<(), &'static str> {
        Err("always broken")
    }

    let router = Router::with_state(attempts.clone());
    let routes = router
        .routes()
        .route("order.placed", placed)
        .route("order.flaky", flaky)
        .route("order.broken", broken)
        .layer(
            RetryLayer::new(2)
                .unwrap()
                .backoff(Duration::from_millis(5), Duration::from_millis(20))
                .unwrap(),
        )
        .layer(DeadLetterLayer::new(2).unwrap());
    let running = router
        .layer(TraceLayer::new())
        .subscribe(
            "orders",
            SubscribeOptions::new("billing", "w1").block(Duration::from_millis(200)),
            routes,
        )
        .start(Arc::new(redis.subscriber().unwrap()), Arc::new(redis.publisher()))
        .await
        .unwrap();

    let publisher = redis.publisher();
    publisher
        .publish("orders", Message::new("order.placed", &7u32).unwrap())
        .await
        .unwrap();
    publisher
        .publish("orders", Message::new("order.flaky", &8u32).unwrap())
        .await
        .unwrap();
    let broken_id = publisher
        .publish("orders", Message::new("order.broken", &9u32).unwrap())
        .await
        .unwrap();

    // placed: 1 delivery; flaky: 1 delivery (3 calls); broken: 2 deliveries, then dead-lettered.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while running.handled() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} handled",
            running.handled()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = running.shutdown().await.unwrap();
    assert_eq!((report.handled, report.abandoned), (4, 0));
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!(
        redis.pending_count("orders", "billing").await.unwrap(),
        0,
        "every ack flushed on shutdown"
    );
    assert_eq!(server.command("XLEN invoices"), ":1");
    let dead = streamwise::redis::admin::stream_info(redis.connection(), "orders-dead")
        .await
        .unwrap();
    assert_eq!(dead.length, 1);
    let record = dead.first_entry.unwrap().message().unwrap();
    let m = record.metadata();
    assert_eq!(m.get(keys::ORIGINAL_ID), Some(broken_id.to_string().as_str()));
    assert_eq!(
        m.get(keys::REASON),
        Some("failed on delivery 2 of 2: always broken")
    );
    assert_eq!(record.event_type(), "order.broken");
}
