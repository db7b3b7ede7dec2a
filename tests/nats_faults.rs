//! Server and network faults on NATS: the server killed and restarted while a router consumes
//! (nothing lost, nothing left pending), a server frozen for longer than the lease TTL (the
//! subscription keeps its consumer name and goes on), and a proxy that resets and stalls every
//! connection while messages flow (every publish goes through, nothing lost).

#![cfg(feature = "nats")]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use futures::StreamExt;
use streamwise::nats::{NatsBackend, NatsOptions, NatsPublisherOptions, NatsSubscriberOptions};
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
    let quick = NatsOptions::default().request_timeout(Duration::from_secs(1));
    let nats = NatsBackend::connect_with(&server.url(), quick).await.unwrap();
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
    let health = sub.health_handle();
    assert!(
        matches!(health.health(), streamwise::SubscriptionHealth::Degraded { .. }),
        "the lease could not be renewed during the freeze"
    );
    server.thaw();
    // Its heartbeat finds the lease gone (run out during the freeze) and takes it again.
    let thawed_at = Instant::now();
    while health.health() != streamwise::SubscriptionHealth::Ready {
        assert!(
            thawed_at.elapsed() < Duration::from_secs(20),
            "{:?}",
            health.health()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

/// A TCP proxy between the clients and the server resets every connection every 2 seconds
/// and sometimes stalls them for a second, while a publisher and a subscriber work: every
/// publish returns an id (retried, deduplicated by the server), every one is consumed, and
/// nobody gets stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_and_stalls_lose_nothing_and_stop_no_one() {
    let server = NatsServer::start();
    let proxy = Proxy::start(server.port()).await;
    let url = format!("nats://127.0.0.1:{}", proxy.port);
    let options = NatsOptions::default().request_timeout(Duration::from_millis(1500));
    let subscribing = NatsBackend::connect_with(&url, options.clone()).await.unwrap();
    let subscriber = subscribing
        .subscriber_with(NatsSubscriberOptions::default().ack_wait(Duration::from_secs(2)))
        .unwrap();
    let mut sub = subscriber
        .subscribe(
            "flaky",
            SubscribeOptions::new("g", "c")
                .block(Duration::from_millis(200))
                .max_in_flight(50),
        )
        .await
        .unwrap();
    let publishing = NatsBackend::connect_with(&url, options).await.unwrap();
    let publisher = publishing
        .publisher_with(NatsPublisherOptions::default().max_retries(20))
        .unwrap();

    let total = 3000u64;
    let mut producer = Some(tokio::spawn(async move {
        let (mut ok, mut errors) = (HashSet::new(), Vec::new());
        for n in 0..total {
            match publisher.publish("flaky", Message::new("n", &n).unwrap()).await {
                Ok(_) => {
                    ok.insert(n);
                }
                Err(e) => errors.push(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        (ok, errors)
    }));
    let faults = {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let mut stalls = 0;
            for round in 1..=6 {
                tokio::time::sleep(Duration::from_secs(2)).await;
                proxy.reset_all();
                if round % 3 == 0 {
                    proxy.stall(true);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    proxy.stall(false);
                    stalls += 1;
                }
            }
            stalls
        })
    };

    let mut consumed = HashSet::new();
    let mut deliveries = 0u64;
    let started = Instant::now();
    let mut produced: Option<(HashSet<u64>, Vec<String>)> = None;
    loop {
        if let Some((ok, _)) = &produced
            && ok.is_subset(&consumed)
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the consumer got stuck at {} of {total}",
            consumed.len()
        );
        match tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
            Ok(Some(Ok(d))) => {
                deliveries += 1;
                consumed.insert(d.message().decode::<u64>().unwrap());
                // An ack may be lost to a reset; the message then comes back: at-least-once.
                let _ = d.ack().await;
            }
            Ok(Some(Err(e))) => panic!("an error surfaced: {e}"),
            Ok(None) => panic!("the subscription ended"),
            Err(_) => {}
        }
        if producer.as_ref().is_some_and(|p| p.is_finished())
            && let Some(done) = producer.take()
        {
            produced = Some(done.await.unwrap());
        }
    }
    let (ok, errors) = produced.unwrap();
    let stalls = faults.await.unwrap();
    let accepted = proxy.accepted.load(Ordering::Relaxed);
    println!(
        "nats network faults: {} published, {} consumed ({deliveries} deliveries), {} resets, {stalls} stalls, {accepted} connections, {} publish errors, 0 lost, {:.1} s",
        ok.len(),
        consumed.len(),
        proxy.resets.load(Ordering::Relaxed),
        errors.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        accepted >= 2 + 2 * 5,
        "only {accepted} connections: the clients did not reconnect"
    );
    assert!(
        errors.is_empty(),
        "publishes failed despite the retries: {errors:?}"
    );
    assert_eq!(ok.len() as u64, total);
    assert_eq!(proxy.resets.load(Ordering::Relaxed), 6);
    subscriber.close().await.unwrap();
}

/// A publish whose acknowledgement does not come in time is sent again, and JetStream keeps
/// one copy: the first copy, held back by a stalled connection, and the retry both reach the
/// server, and the stream holds one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_publish_is_stored_once() {
    let server = NatsServer::start();
    let proxy = Proxy::start(server.port()).await;
    let url = format!("nats://127.0.0.1:{}", proxy.port);
    let options = NatsOptions::default().request_timeout(Duration::from_millis(500));
    let nats = NatsBackend::connect_with(&url, options).await.unwrap();
    let publisher = nats.publisher();
    // The stream exists first, so that the publish below is the only message.
    nats.subscriber()
        .subscribe("once", SubscribeOptions::new("g", "c"))
        .await
        .unwrap();
    proxy.stall(true);
    let publish =
        tokio::spawn(async move { publisher.publish("once", Message::new("n", &1).unwrap()).await });
    // Past the acknowledgement's timeout and the first retry's backoff: at least two copies
    // wait in the proxy.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    proxy.stall(false);
    let id = publish
        .await
        .unwrap()
        .expect("the retried publish is acknowledged");
    let direct = NatsBackend::connect(&server.url()).await.unwrap();
    assert_eq!(
        direct.stream_len("once").await.unwrap(),
        1,
        "a retry stored a second copy"
    );
    assert_eq!(id, streamwise::EntryId::new(0, 1));
}
