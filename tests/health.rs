//! Health: a router reports `Starting`, `Ready`, `Stopping`/`Stopped`; a subscription whose
//! Redis stops answering (SIGSTOP) turns `Degraded` within its block time and the reply margin,
//! and `Ready` again once Redis answers; a router whose subscription ended reports `Failed`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use streamwise::memory::MemoryBackend;
use streamwise::redis::RedisBackend;
use streamwise::router::{Health, Router, RouterHealth};
use streamwise::{Message, Publisher, SubscribeOptions, Subscriber};

use common::RedisServer;

/// Waits until `health` is what `want` accepts, failing after `within`; returns how long it took.
async fn wait_health(health: &RouterHealth, within: Duration, want: impl Fn(&Health) -> bool) -> Duration {
    let started = tokio::time::Instant::now();
    loop {
        let now = health.overall();
        if want(&now) {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "health stayed {now:?} for {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_reports_its_phases() {
    let backend = MemoryBackend::new();
    let router = Router::new();
    let routes = router.routes().route("t", || async {});
    let router = router.subscribe("phases", SubscribeOptions::new("g", "c"), routes);
    let health = router.health();
    assert_eq!(health.overall(), Health::Starting);
    let running = router
        .start(Arc::new(backend.subscriber()), Arc::new(backend.publisher()))
        .await
        .unwrap();
    assert_eq!(health.overall(), Health::Ready);
    let subscriptions = running.health().subscriptions();
    assert_eq!(subscriptions.len(), 1);
    assert_eq!(
        (
            subscriptions[0].topic.as_str(),
            subscriptions[0].group.as_str(),
            &subscriptions[0].health
        ),
        ("phases", "g", &Health::Ready)
    );
    running.shutdown().await.unwrap();
    assert_eq!(health.overall(), Health::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_whose_subscription_ended_reports_failed() {
    let backend = MemoryBackend::new();
    let subscriber = Arc::new(backend.subscriber());
    let router = Router::new();
    let routes = router.routes().route("t", || async {});
    let running = router
        .subscribe("ends", SubscribeOptions::new("g", "c"), routes)
        .start(subscriber.clone(), Arc::new(backend.publisher()))
        .await
        .unwrap();
    let health = running.health();
    assert!(health.overall().is_ready());
    // Closed from outside the router: the subscription ends while the router runs.
    subscriber.close().await.unwrap();
    wait_health(&health, Duration::from_secs(10), |h| {
        matches!(h, Health::Failed { .. })
    })
    .await;
    match &health.subscriptions()[0].health {
        Health::Failed { reason } => assert!(reason.contains("ended"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let _ = running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_whose_redis_stops_answering_is_degraded_then_ready_again() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let block = Duration::from_millis(200);
    let router = Router::new();
    let routes = router.routes().route("t", || async {});
    let running = router
        .subscribe("frozen", SubscribeOptions::new("g", "c").block(block), routes)
        .start(
            Arc::new(backend.subscriber().unwrap()),
            Arc::new(backend.publisher()),
        )
        .await
        .unwrap();
    let health = running.health();
    wait_health(&health, Duration::from_secs(5), Health::is_ready).await;

    server.freeze();
    // The documented bound: the block time and the reply margin (10 s), and a beat to notice.
    let took = wait_health(&health, block + Duration::from_secs(12), |h| {
        matches!(h, Health::Degraded { .. })
    })
    .await;
    eprintln!("degraded {took:?} after SIGSTOP: {:?}", health.overall());
    server.thaw();
    let took = wait_health(&health, Duration::from_secs(30), Health::is_ready).await;
    eprintln!("ready {took:?} after SIGCONT");
    // And it reads again.
    backend
        .publisher()
        .publish("frozen", Message::new("t", &1).unwrap())
        .await
        .unwrap();
    streamwise::testing::wait_until_handled(&running, 1).await;
    running.shutdown().await.unwrap();
}

/// A partitioned subscription stays `Degraded` while its Redis does not answer, also after
/// the member gave its partitions up (its heartbeat failing past its TTL): it does not turn
/// `Ready` with nothing left to read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_subscription_stays_degraded_through_an_outage() {
    use streamwise::partition::{PartitionOptions, PartitionedSubscriber};
    use streamwise::redis::RedisConnection;
    let server = RedisServer::start();
    // Short timeouts and few retries: an outage shows within seconds.
    let conn = RedisConnection::builder(&server.url())
        .response_timeout(Duration::from_millis(300))
        .max_retries(1)
        .build()
        .unwrap();
    let backend = RedisBackend::with_connection(conn);
    let subscriber = PartitionedSubscriber::new(
        Arc::new(backend.subscriber().unwrap()),
        Arc::new(backend.coordinator()),
    )
    .options(PartitionOptions::default().member_ttl(Duration::from_millis(600)))
    .topic("outage", 2);
    let router = Router::new();
    let routes = router.routes().route("t", || async {});
    let running = router
        .subscribe(
            "outage",
            SubscribeOptions::new("g", "m").block(Duration::from_millis(100)),
            routes,
        )
        .start(Arc::new(subscriber), Arc::new(backend.publisher()))
        .await
        .unwrap();
    let health = running.health();
    wait_health(&health, Duration::from_secs(10), Health::is_ready).await;

    server.freeze();
    wait_health(&health, Duration::from_secs(20), |h| {
        matches!(h, Health::Degraded { .. })
    })
    .await;
    // Well past the member's TTL, when it has given its partitions up: still degraded.
    let watch_until = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < watch_until {
        let now = health.overall();
        assert!(
            matches!(now, Health::Degraded { .. }),
            "during the outage: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.thaw();
    let took = wait_health(&health, Duration::from_secs(30), Health::is_ready).await;
    eprintln!("ready {took:?} after SIGCONT");
    running.shutdown().await.unwrap();
}
