//! Network faults: a TCP proxy between the clients and redis-server resets every connection
//! every 2 seconds and sometimes stalls them for a second. Publisher and consumer recover by
//! themselves: every publish that returned an id is consumed, nobody gets stuck, and no error
//! surfaces while the outages stay within the retry budget.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use streamwise::redis::{
    PublisherOptions, RedisConnection, RedisPublisher, RedisSubscriber, RedisSubscriberOptions,
};
use streamwise::{Message, Publisher, SubscribeOptions, Subscriber};

use common::RedisServer;
use common::proxy::Proxy;

/// The proxy's URL, for a Redis client.
fn url_of(proxy: &Proxy) -> String {
    format!("redis://127.0.0.1:{}", proxy.port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_and_stalls_lose_nothing_and_stop_no_one() {
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port()).await;
    let conn = || {
        RedisConnection::builder(&url_of(&proxy))
            .max_retries(10)
            .retry_base_delay(Duration::from_millis(50))
            .retry_max_delay(Duration::from_millis(500))
            .response_timeout(Duration::from_millis(1500))
            .connect_timeout(Duration::from_secs(1))
            .build()
            .unwrap()
    };
    let subscriber = RedisSubscriber::new(conn(), RedisSubscriberOptions::default()).unwrap();
    let mut sub = subscriber
        .subscribe(
            "flaky",
            SubscribeOptions::new("g", "c")
                .block(Duration::from_millis(200))
                .max_in_flight(50),
        )
        .await
        .unwrap();

    let total = 3000u64;
    let publisher = Arc::new(RedisPublisher::new(conn(), PublisherOptions::default()));
    let mut producer = Some({
        let publisher = publisher.clone();
        tokio::spawn(async move {
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
        })
    });
    let faults = {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let mut stalls = 0;
            for round in 1.. {
                tokio::time::sleep(Duration::from_secs(2)).await;
                proxy.reset_all();
                if round % 3 == 0 {
                    proxy.stall(true);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    proxy.stall(false);
                    stalls += 1;
                }
                if round >= 6 {
                    return stalls;
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
                // An ack may be lost to a reset; the entry then comes back: at-least-once.
                let _ = d.ack().await;
            }
            Ok(Some(Err(e))) => panic!("an error surfaced within the retry budget: {e}"),
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
        "network faults: {} published, {} consumed ({} deliveries), {} resets, {stalls} stalls, {accepted} connections, {} publish errors, 0 lost",
        ok.len(),
        consumed.len(),
        deliveries,
        proxy.resets.load(Ordering::Relaxed),
        errors.len()
    );
    // Publisher, subscriber reader and subscriber side connection all came back after resets.
    assert!(
        accepted >= 3 + 2 * 5,
        "only {accepted} connections: the clients did not reconnect after the resets"
    );
    assert!(
        errors.is_empty(),
        "errors surfaced within the retry budget: {errors:?}"
    );
    assert_eq!(ok.len() as u64, total);
    assert!(
        proxy.resets.load(Ordering::Relaxed) >= 5,
        "the faults happened while messages flowed"
    );
    subscriber.close().await.unwrap();
}
