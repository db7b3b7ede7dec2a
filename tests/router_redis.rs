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
    let dead = streamwise::redis::admin::stream_info(redis.connection(), "{orders}-dead")
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

/// A handler that never returns does not stretch the shutdown past its deadline: the
/// delivery is abandoned (it stays pending), the others' acks are flushed, all within it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_handler_does_not_stretch_the_shutdown_deadline() {
    let server = RedisServer::start();
    let redis = RedisBackend::new(&server.url()).unwrap();
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel::<u32>();
    async fn work(Json(n): Json<u32>, State(started): State<tokio::sync::mpsc::UnboundedSender<u32>>) {
        started.send(n).unwrap();
        if n == 0 {
            std::future::pending::<()>().await;
        }
    }
    let deadline = Duration::from_secs(2);
    let router = Router::with_state(started_tx).shutdown_deadline(deadline);
    let routes = router.routes().route("n", work);
    let running = router
        .subscribe("t", SubscribeOptions::new("g", "c").max_in_flight(10), routes)
        .start(Arc::new(redis.subscriber().unwrap()), Arc::new(redis.publisher()))
        .await
        .unwrap();
    let publisher = redis.publisher();
    for n in 0..5u32 {
        publisher
            .publish("t", Message::new("n", &n).unwrap())
            .await
            .unwrap();
    }
    for _ in 0..5 {
        tokio::time::timeout(Duration::from_secs(20), started.recv())
            .await
            .unwrap()
            .unwrap();
    }
    let asked = std::time::Instant::now();
    let report = running.shutdown().await.unwrap();
    let took = asked.elapsed();
    assert_eq!((report.handled, report.abandoned, report.unflushed), (4, 1, 0));
    assert!(
        took < deadline + Duration::from_millis(500),
        "shutdown took {took:?}"
    );
    assert_eq!(
        redis.pending_count("t", "g").await.unwrap(),
        1,
        "only the hung one is pending"
    );
}

/// Acks made while the server does not answer (SIGSTOP) cannot be written within the
/// shutdown deadline: the shutdown ends on time all the same and counts them as unflushed
/// (when the process exits then, their entries stay pending for the next run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_the_server_never_took_are_counted_as_unflushed() {
    let server = RedisServer::start();
    let redis = RedisBackend::new(&server.url()).unwrap();
    let publisher = redis.publisher();
    let batch: Vec<_> = (0..20u32).map(|n| Message::new("n", &n).unwrap()).collect();
    publisher.publish_batch("t", batch).await.unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel::<()>();
    async fn work(
        State((gate, started)): State<(
            Arc<tokio::sync::Semaphore>,
            tokio::sync::mpsc::UnboundedSender<()>,
        )>,
    ) {
        started.send(()).unwrap();
        gate.acquire().await.unwrap().forget();
    }
    let deadline = Duration::from_secs(2);
    let router = Router::with_state((gate.clone(), started_tx)).shutdown_deadline(deadline);
    let routes = router.routes().route("n", work);
    let running = router
        .subscribe(
            "t",
            SubscribeOptions::new("g", "c").max_in_flight(20).batch_size(20),
            routes,
        )
        .start(Arc::new(redis.subscriber().unwrap()), Arc::new(redis.publisher()))
        .await
        .unwrap();
    for _ in 0..20 {
        tokio::time::timeout(Duration::from_secs(20), started.recv())
            .await
            .unwrap()
            .unwrap();
    }
    server.freeze();
    gate.add_permits(20); // every handler returns: 20 acks for a server that does not answer
    let asked = std::time::Instant::now();
    let report = running.shutdown().await.unwrap();
    let took = asked.elapsed();
    server.thaw();
    assert_eq!((report.handled, report.abandoned, report.unflushed), (20, 0, 20));
    assert!(
        took < deadline + Duration::from_millis(500),
        "shutdown took {took:?}"
    );
}
