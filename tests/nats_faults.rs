//! Server faults on NATS: the server killed and restarted while a router consumes (nothing
//! lost, nothing left pending), and a server frozen for longer than the lease TTL (the
//! subscription keeps its consumer name and goes on).

#![cfg(feature = "nats")]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use streamwise::nats::{NatsBackend, NatsSubscriberOptions};
use streamwise::router::{Json, Outcome, Router};
use streamwise::testing::NatsServer;
use streamwise::{Error, Message, Publisher, SubscribeOptions, Subscriber, Subscription};

const MESSAGES: u64 = 5_000;

/// Reads the records of handled messages (group `audit` on `handled`).
async fn catch_up(sub: &mut Subscription, seen: &mut HashSet<u64>, total: &mut u64) {
    while let Ok(Some(item)) = tokio::time::timeout(Duration::from_millis(20), sub.next()).await {
        let Ok(d) = item else { continue };
        seen.insert(d.message().decode().expect("a number"));
        *total += 1;
        let _ = d.ack().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_loses_nothing() {
    let mut server = NatsServer::start();
    let url = server.url();
    let nats = NatsBackend::connect(&url).await.unwrap();
    for batch in 0..MESSAGES / 500 {
        let messages = (batch * 500..(batch + 1) * 500)
            .map(|n| Message::new("n", &n).unwrap())
            .collect();
        nats.publisher().publish_batch("work", messages).await.unwrap();
    }
    async fn handle(Json(n): Json<u64>) -> streamwise::Result<Outcome> {
        tokio::time::sleep(Duration::from_millis(1)).await;
        Ok(Outcome::ack().publish("handled", Message::new("handled", &n)?))
    }
    let consumer = NatsBackend::connect(&url).await.unwrap();
    let subscriber = consumer
        .subscriber_with(NatsSubscriberOptions::default().ack_wait(Duration::from_secs(2)))
        .unwrap();
    let router = Router::new();
    let routes = router.routes().route("n", handle);
    let options = SubscribeOptions::new("workers", "w1")
        .max_in_flight(50)
        .batch_size(50)
        .block(Duration::from_millis(200));
    let running = router
        .subscribe("work", options, routes)
        .start(Arc::new(subscriber), Arc::new(consumer.publisher()))
        .await
        .unwrap();
    let auditor = nats.subscriber();
    let mut audit = auditor
        .subscribe(
            "handled",
            SubscribeOptions::new("audit", "a")
                .max_in_flight(500)
                .batch_size(500),
        )
        .await
        .unwrap();
    let (mut seen, mut total) = (HashSet::new(), 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < 500 {
        assert!(Instant::now() < deadline, "no progress before the restart");
        catch_up(&mut audit, &mut seen, &mut total).await;
    }
    server.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.restart();
    let restarted_at = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        catch_up(&mut audit, &mut seen, &mut total).await;
        let pending = nats.pending_count("work", "workers").await.unwrap_or(u64::MAX);
        if seen.len() as u64 == MESSAGES && pending == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not finished after the restart: {} of {MESSAGES} handled, {pending} pending",
            seen.len()
        );
    }
    println!(
        "restart: {MESSAGES} handled, {} duplicates, 0 lost, finished {:.1} s after the restart",
        total - MESSAGES,
        restarted_at.elapsed().as_secs_f64()
    );
    running.shutdown().await.unwrap();
    auditor.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_keeps_its_name_through_a_freeze_longer_than_its_lease() {
    let server = NatsServer::start();
    let options = NatsSubscriberOptions::default().lease_ttl(Duration::from_secs(1));
    let nats = NatsBackend::connect(&server.url()).await.unwrap();
    let subscriber = nats.subscriber_with(options.clone()).unwrap();
    let mut sub = subscriber
        .subscribe(
            "frozen",
            SubscribeOptions::new("g", "c").block(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    server.freeze();
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.thaw();
    // Let its heartbeat find the lease gone and take it again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let other = NatsBackend::connect(&server.url())
        .await
        .unwrap()
        .subscriber_with(options)
        .unwrap();
    match other
        .subscribe(
            "frozen",
            SubscribeOptions::new("g", "c").block(Duration::from_millis(200)),
        )
        .await
    {
        Err(Error::ConsumerActive { .. }) => {}
        other => panic!("the name should still be held after the freeze, got {other:?}"),
    }
    nats.publisher()
        .publish("frozen", Message::new("t", &1).unwrap())
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .expect("a delivery after the freeze")
        .expect("the subscription goes on")
        .unwrap();
    d.ack().await.unwrap();
    subscriber.close().await.unwrap();
}
