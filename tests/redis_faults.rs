//! Faults the Redis subscriber must ride out without handing an entry out twice, cutting a
//! nack delay short, exceeding its in-flight limit, sharing a consumer name, or skipping
//! unacked entries (the invariants of ARCHITECTURE.md). Each of these once failed; each names the promise it guards.

mod common;

use std::time::Duration;

use futures::StreamExt;
use streamwise::redis::{RedisBackend, RedisConnection, RedisSubscriber, RedisSubscriberOptions};
use streamwise::{Delivery, Message, Publisher, SubscribeOptions, Subscriber, Subscription};

use common::RedisServer;

fn msg(n: u64) -> Message {
    Message::new("n", &n).unwrap()
}

/// Next Ok delivery within `t`, skipping Err items; None on timeout.
async fn next_ok(sub: &mut Subscription, t: Duration) -> Option<Delivery> {
    let deadline = tokio::time::Instant::now() + t;
    loop {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Err(_) => return None,
            Ok(None) => return None,
            Ok(Some(Ok(d))) => return Some(d),
            Ok(Some(Err(e))) => eprintln!("err item: {e}"),
        }
    }
}

/// The next Ok delivery, which must come within 5 s.
async fn delivery(sub: &mut Subscription) -> Delivery {
    next_ok(sub, Duration::from_secs(5)).await.expect("delivery")
}

/// A server whose stream `t` holds one message.
async fn server_with_one_message() -> RedisServer {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    backend.publisher().publish("t", msg(1)).await.unwrap();
    server
}

/// Fails if a delivery comes within `t`: `what` says which promise that breaks.
async fn assert_no_delivery_within(sub: &mut Subscription, t: Duration, what: &str) {
    let delivered = next_ok(sub, t).await;
    assert!(
        delivered.is_none(),
        "{what}: {:?}",
        delivered.map(|d| d.info().clone())
    );
}

/// Consumer `c` of group `g`, with reads blocking 200 ms so that faults are noticed quickly.
fn quick_reads() -> SubscribeOptions {
    SubscribeOptions::new("g", "c").block(Duration::from_millis(200))
}

fn subscriber(server: &RedisServer, options: RedisSubscriberOptions) -> RedisSubscriber {
    RedisSubscriber::new(RedisConnection::new(&server.url()).unwrap(), options).unwrap()
}

/// An entry acked (Ok) whose `XACK` is not flushed yet is not handed out again when a read
/// error makes the subscription re-read its pending list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_but_unflushed_entries_are_not_handed_out_again_after_a_read_error() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let publisher = backend.publisher();
    for n in 0..3 {
        publisher.publish("t", msg(n)).await.unwrap();
    }
    // A slow flush stands in for an XACK delayed by an outage (the flusher retries with
    // backoff, keeping the batch, while the reader has already reconnected).
    let sub_ = subscriber(
        &server,
        RedisSubscriberOptions::default().ack_flush_interval(Duration::from_secs(3)),
    );
    let mut sub = sub_.subscribe("t", quick_reads()).await.unwrap();
    for _ in 0..3 {
        let d = delivery(&mut sub).await;
        d.ack().await.unwrap();
    }
    // Connection trouble on the read connection.
    server.command("CLIENT KILL TYPE normal");
    assert_no_delivery_within(
        &mut sub,
        Duration::from_secs(2),
        "an entry acked (Ok) was handed out again",
    )
    .await;
    sub_.close().await.unwrap();
}

/// A `nack_after` delay holds across a read error: the re-read of the pending list leaves the
/// waiting entry alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_after_delay_survives_a_read_error() {
    let server = server_with_one_message().await;
    let sub_ = subscriber(&server, RedisSubscriberOptions::default());
    let mut sub = sub_.subscribe("t", quick_reads()).await.unwrap();
    let d = delivery(&mut sub).await;
    d.nack_after(Duration::from_secs(10)).await.unwrap();
    server.command("CLIENT KILL TYPE normal");
    assert_no_delivery_within(
        &mut sub,
        Duration::from_secs(3),
        "nack_after(10s) redelivered within 3s",
    )
    .await;
    sub_.close().await.unwrap();
}

/// With reclaim on, the subscription's own `XAUTOCLAIM` does not take back its own entry
/// waiting out a `nack_after` delay longer than `min_idle`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_reclaim_does_not_cut_a_nack_delay_short() {
    let server = server_with_one_message().await;
    let sub_ = subscriber(
        &server,
        RedisSubscriberOptions::default().lease_ttl(Duration::from_secs(3)),
    );
    let mut sub = sub_
        .subscribe(
            "t",
            quick_reads().reclaim(streamwise::ReclaimOptions::new(
                Duration::from_millis(500),
                Duration::from_secs(2),
            )),
        )
        .await
        .unwrap();
    let d = delivery(&mut sub).await;
    d.nack_after(Duration::from_secs(8)).await.unwrap();
    assert_no_delivery_within(
        &mut sub,
        Duration::from_secs(5),
        "nack_after(8s) redelivered within 5s",
    )
    .await;
    sub_.close().await.unwrap();
}

/// A dead-letter write that fails (its stream has the wrong type) in the middle of a batch
/// never lets the subscription exceed `max_in_flight`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fetch_does_not_over_release_capacity() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let publisher = backend.publisher();
    publisher.publish("t", msg(1)).await.unwrap();
    publisher.publish("t", msg(2)).await.unwrap();
    // A malformed entry (no event_type) and a dead-letter stream that cannot be written yet.
    server.command("XADD t * foo bar");
    for n in 3..10 {
        publisher.publish("t", msg(n)).await.unwrap();
    }
    server.command("SET {t}-dead not-a-stream");
    let sub_ = subscriber(&server, RedisSubscriberOptions::default());
    let mut sub = sub_
        .subscribe("t", quick_reads().max_in_flight(3).batch_size(3))
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(delivery(&mut sub).await);
    }
    // The dead-letter stream works again.
    server.command("DEL {t}-dead");
    while let Some(d) = next_ok(&mut sub, Duration::from_secs(3)).await {
        held.push(d);
    }
    assert!(
        held.len() <= 3,
        "{} deliveries unsettled at once with max_in_flight 3: {:?}",
        held.len(),
        held.iter().map(|d| d.id().to_string()).collect::<Vec<_>>()
    );
    sub_.close().await.unwrap();
}

/// When another consumer takes this consumer's lease (after a pause longer than its TTL, say),
/// the subscription reports `ConsumerActive` and stops, instead of going on beside the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_lost_its_lease_stops() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let publisher = backend.publisher();
    publisher.publish("t", msg(1)).await.unwrap();
    let a_ = subscriber(
        &server,
        RedisSubscriberOptions::default().lease_ttl(Duration::from_millis(600)),
    );
    let mut a = a_.subscribe("t", quick_reads()).await.unwrap();
    let _held = delivery(&mut a).await;
    // Someone else holds the lease now.
    assert_eq!(
        server.command("SET streamwise:lease:{t}:g:c another-token PX 60000"),
        "+OK"
    );
    match tokio::time::timeout(Duration::from_secs(5), a.next()).await {
        Ok(Some(Err(streamwise::Error::ConsumerActive { consumer, .. }))) => assert_eq!(consumer, "c"),
        other => panic!("expected ConsumerActive from the subscription that lost its lease, got {other:?}"),
    }
    match tokio::time::timeout(Duration::from_secs(5), a.next()).await {
        Ok(None) => {}
        other => panic!("the subscription must end after losing its lease, got {other:?}"),
    }
    // The lease stays with its new holder.
    assert_eq!(server.command("GET streamwise:lease:{t}:g:c"), "$13");
    a_.close().await.unwrap();
}

/// A process that died holding its lease (killed, the lease left to run out) is restarted at
/// once under the same name: `subscribe` waits for the lease to run out, takes it over, and
/// the entries the dead process held come first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_under_the_same_name_takes_over_the_lease_of_a_dead_process() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let publisher = backend.publisher();
    let held = publisher.publish("t", msg(1)).await.unwrap();
    assert_eq!(server.command("XGROUP CREATE t g 0"), "+OK");
    // What the dead process left: its lease (not renewed any more) and an entry it held.
    assert_eq!(
        server.command("SET streamwise:lease:{t}:g:c dead-token PX 1500"),
        "+OK"
    );
    assert_eq!(server.command("SADD streamwise:consumers:{t}:g c"), ":1");
    assert_eq!(server.command("XREADGROUP GROUP g c COUNT 1 STREAMS t >"), "*1");
    let later = publisher.publish("t", msg(2)).await.unwrap();

    let restarted = subscriber(&server, RedisSubscriberOptions::default());
    let mut sub = tokio::time::timeout(Duration::from_secs(10), restarted.subscribe("t", quick_reads()))
        .await
        .expect("subscribe waits no longer than the lease had left")
        .expect("the lease of a dead holder is taken over");
    let first = delivery(&mut sub).await;
    assert_eq!(
        (first.id(), first.delivery_count()),
        (held, 2),
        "the dead process's entry first"
    );
    first.ack().await.unwrap();
    let second = delivery(&mut sub).await;
    assert_eq!(second.id(), later);
    second.ack().await.unwrap();
    assert_ne!(
        server.command("GET streamwise:lease:{t}:g:c"),
        "$10",
        "not the dead token"
    );
    restarted.close().await.unwrap();
}

/// A name whose holder is alive (it renews its lease) is refused, after a look no longer than
/// the holder's lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_holder_keeps_its_name() {
    let server = RedisServer::start();
    let live = subscriber(
        &server,
        RedisSubscriberOptions::default().lease_ttl(Duration::from_millis(600)),
    );
    let _sub = live.subscribe("t", quick_reads()).await.unwrap();
    let second = subscriber(&server, RedisSubscriberOptions::default());
    match tokio::time::timeout(Duration::from_secs(5), second.subscribe("t", quick_reads())).await {
        Ok(Err(streamwise::Error::ConsumerActive { consumer, .. })) => assert_eq!(consumer, "c"),
        other => panic!("expected ConsumerActive while the holder lives, got {other:?}"),
    }
    live.close().await.unwrap();
    second.close().await.unwrap();
}

/// Dropping the subscription stream (stop fetching) while a delivery is still being handled
/// keeps the lease: the same consumer name cannot start elsewhere and take that entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_keeps_the_lease_while_deliveries_are_in_flight() {
    let server = server_with_one_message().await;
    let a_ = subscriber(&server, RedisSubscriberOptions::default());
    let mut a = a_.subscribe("t", quick_reads()).await.unwrap();
    let in_flight = delivery(&mut a).await;
    drop(a); // stop fetching; the handler still works on `in_flight`
    // Give a premature lease release (the failure this guards against) time to happen.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b_ = subscriber(&server, RedisSubscriberOptions::default());
    let second = b_.subscribe("t", quick_reads()).await;
    let dup = match second {
        Err(_) => None,
        Ok(mut b) => next_ok(&mut b, Duration::from_secs(2)).await,
    };
    assert!(
        dup.is_none(),
        "entry {} handed to a second consumer named c while the first still handles it",
        in_flight.id()
    );
    in_flight.ack().await.unwrap();
}

/// The checkpoint is a low watermark: a group re-created at it redelivers an entry that was
/// still unacked, even though later entries were acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_recreated_at_checkpoint_redelivers_an_entry_left_unacked() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let publisher = backend.publisher();
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(publisher.publish("t", msg(n)).await.unwrap());
    }
    let sub_ = subscriber(&server, RedisSubscriberOptions::default());
    let mut sub = sub_.subscribe("t", quick_reads().max_in_flight(3)).await.unwrap();
    let mut ds = Vec::new();
    for _ in 0..3 {
        ds.push(delivery(&mut sub).await);
    }
    // Entry 0 is still being handled; entries 1 and 2 are acked.
    let first = ds.remove(0);
    for d in ds {
        d.ack().await.unwrap();
    }
    // Closing flushes the acks and the checkpoint.
    sub_.close().await.unwrap();
    drop(first); // handler crashed: entry 0 must come back
    drop(sub);
    // The group is destroyed (operator mistake, failover to a replica without it...).
    server.command("XGROUP DESTROY t g");
    let next = subscriber(&server, RedisSubscriberOptions::default());
    let mut sub = next.subscribe("t", quick_reads()).await.unwrap();
    let got = next_ok(&mut sub, Duration::from_secs(2)).await;
    assert_eq!(
        got.map(|d| d.id()),
        Some(ids[0]),
        "entry 0 was never acked but the group was re-created past it"
    );
}

/// The server is killed and restarted (no persistence): the subscription reports an error
/// after its retry budget, then recovers on its own, and the publisher recovers too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_without_persistence_recovers_with_an_error_item_in_between() {
    let mut server = RedisServer::start();
    let conn = || {
        RedisConnection::builder(&server.url())
            .max_retries(2)
            .retry_base_delay(Duration::from_millis(50))
            .retry_max_delay(Duration::from_millis(200))
            .build()
            .unwrap()
    };
    let backend = RedisBackend::with_connection(conn());
    let publisher = backend.publisher();
    publisher.publish("t", msg(1)).await.unwrap();
    let sub_ = RedisSubscriber::new(conn(), RedisSubscriberOptions::default()).unwrap();
    let mut sub = sub_.subscribe("t", quick_reads()).await.unwrap();
    let d = delivery(&mut sub).await;
    d.ack().await.unwrap();
    server.kill();
    let t0 = std::time::Instant::now();
    let item = tokio::time::timeout(Duration::from_secs(20), sub.next()).await;
    eprintln!(
        "after kill: {:?} in {:?}",
        item.as_ref().map(|o| o
            .as_ref()
            .map(|r| r.as_ref().map(|d| d.id()).map_err(|e| e.to_string()))),
        t0.elapsed()
    );
    assert!(
        matches!(item, Ok(Some(Err(_)))),
        "expected an Err item while the server is down"
    );
    server.restart();
    // Publisher recovers.
    let mut published = None;
    for _ in 0..20 {
        match publisher.publish("t", msg(2)).await {
            Ok(id) => {
                published = Some(id);
                break;
            }
            Err(e) => eprintln!("publish: {e}"),
        }
    }
    let id = published.expect("publisher recovered");
    let got = next_ok(&mut sub, Duration::from_secs(10)).await;
    assert_eq!(got.as_ref().map(|d| d.id()), Some(id), "subscription recovered");
    eprintln!("stats {:?}", sub_.stats());
    sub_.close().await.unwrap();
}

/// With `create_group(false)`, a group that vanishes is reported (`GroupNotFound`), not
/// re-created behind the user's back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_group_off_is_respected_after_the_group_vanishes() {
    let server = RedisServer::start();
    server.command("XGROUP CREATE t g $ MKSTREAM");
    let sub_ = subscriber(&server, RedisSubscriberOptions::default());
    let mut sub = sub_
        .subscribe(
            "t",
            SubscribeOptions::new("g", "c")
                .create_group(false)
                .block(Duration::from_millis(100)),
        )
        .await
        .unwrap();
    let _ = next_ok(&mut sub, Duration::from_millis(300)).await;
    server.command("XGROUP DESTROY t g");
    match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
        Ok(Some(Err(streamwise::Error::GroupNotFound { group, .. }))) => assert_eq!(group, "g"),
        other => panic!("expected GroupNotFound once the group vanished, got {other:?}"),
    }
    let groups = server.command_lines("XINFO GROUPS t", 1);
    assert_eq!(
        groups,
        ["*0"],
        "the group was re-created although create_group is off"
    );
}

/// Default settings, server with AOF: an ack returns Ok, the server dies before the `XACK`
/// lands, and comes back after longer than the retry budget. The flusher retries on its own
/// timer until the ack is written, and the re-drain does not hand the entry out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_during_outage_is_flushed_after_restart_and_not_redelivered() {
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let conn = || {
        RedisConnection::builder(&server.url())
            .max_retries(2)
            .retry_base_delay(Duration::from_millis(50))
            .retry_max_delay(Duration::from_millis(200))
            .build()
            .unwrap()
    };
    let backend = RedisBackend::with_connection(conn());
    backend.publisher().publish("t", msg(1)).await.unwrap();
    let sub_ = RedisSubscriber::new(conn(), RedisSubscriberOptions::default()).unwrap();
    let mut sub = sub_.subscribe("t", quick_reads()).await.unwrap();
    let d = delivery(&mut sub).await;
    server.kill();
    d.ack().await.expect("ack is Ok");
    // An outage longer than the flusher's retry budget (2 retries, at most 200 ms apart).
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.restart();
    assert_no_delivery_within(&mut sub, Duration::from_secs(3), "acked entry handed out again").await;
    let pending = backend.pending_count("t", "g").await.unwrap();
    assert_eq!(pending, 0, "the Ok ack was never flushed");
    sub_.close().await.unwrap();
}

/// The server's CPU seconds so far (`INFO cpu`: user + sys).
fn server_cpu(server: &RedisServer) -> f64 {
    let mut c = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let info: String = redis::cmd("INFO").arg("cpu").query(&mut c).unwrap();
    info.lines()
        .filter(|l| l.starts_with("used_cpu_sys:") || l.starts_with("used_cpu_user:"))
        .filter_map(|l| l.split(':').nth(1)?.parse::<f64>().ok())
        .sum()
}

/// How many commands the server has run (`INFO stats`).
fn commands(server: &RedisServer) -> u64 {
    let mut c = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let info: String = redis::cmd("INFO").arg("stats").query(&mut c).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// A vanished group that cannot be re-created (the user may not run XGROUP) is retried with
/// the connection's backoff, not in a busy loop: a handful of reads and errors in two seconds,
/// and the server stays idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_cannot_be_recreated_is_retried_with_backoff() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let subscriber = backend.subscriber().unwrap();
    let mut sub = subscriber.subscribe("t", quick_reads()).await.unwrap();
    assert_eq!(server.command("ACL SETUSER default -xgroup"), "+OK");
    assert_eq!(server.command("DEL t"), ":1");
    let (commands_before, cpu_before) = (commands(&server), server_cpu(&server));
    let watch = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut errors = 0;
    while let Ok(item) = tokio::time::timeout_at(watch, sub.next()).await {
        match item {
            Some(Err(_)) => errors += 1,
            other => panic!("expected errors only, got {other:?}"),
        }
    }
    let reads = commands(&server) - commands_before;
    let cpu = server_cpu(&server) - cpu_before;
    assert!(errors >= 1, "the fault is reported");
    assert!(
        errors <= 10 && reads <= 60,
        "{errors} errors, {reads} commands in 2 s: a busy loop"
    );
    assert!(cpu < 0.5, "the server spent {cpu:.2} s of CPU in 2 s");
    assert_eq!(server.command("ACL SETUSER default +xgroup"), "+OK");
    subscriber.close().await.unwrap();
}

/// Deliveries nacked after their group was destroyed and re-created past them (their entries
/// are in no pending list, and the group will not read them again) are never dropped
/// silently: each is dead-lettered with the reason, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_whose_group_was_destroyed_are_dead_lettered_not_lost() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let publisher = backend.publisher();
    let batch: Vec<_> = (0..5).map(msg).collect();
    let ids = publisher.publish_batch("t", batch).await.unwrap();
    let subscriber = backend.subscriber().unwrap();
    let mut sub = subscriber
        .subscribe("t", quick_reads().max_in_flight(5))
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(delivery(&mut sub).await);
    }
    assert_eq!(server.command("XGROUP DESTROY t g"), ":1");
    assert_eq!(server.command("XGROUP CREATE t g $"), "+OK");
    for d in held {
        d.nack().await.unwrap();
    }
    let reading = tokio::spawn(async move {
        if let Some(item) = sub.next().await {
            panic!("nothing is deliverable again: {item:?}");
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while server.command("XLEN {t}-dead") != ":5" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the retries were dropped: {:?}",
            subscriber.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut c = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let records: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg("{t}-dead")
        .arg("-")
        .arg("+")
        .query(&mut c)
        .unwrap();
    let mut originals: Vec<streamwise::EntryId> = Vec::new();
    for record in &records.ids {
        let metadata: String = record.get("metadata").unwrap();
        let metadata: serde_json::Value = serde_json::from_str(&metadata).unwrap();
        assert!(
            metadata["dead_letter.reason"]
                .as_str()
                .unwrap()
                .contains("no longer pending"),
            "{metadata}"
        );
        originals.push(
            metadata["dead_letter.original_id"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap(),
        );
    }
    originals.sort();
    assert_eq!(originals, ids);
    assert_eq!(subscriber.stats().unclaimable, 5);
    subscriber.close().await.unwrap();
    reading.await.unwrap();
}

/// A restart shorter than the default retry budget (100 ms doubling with equal jitter, 5
/// retries: at least 1.55 s of backoff) surfaces no error to a publisher: each retry after a
/// refused connection connects anew after its backoff, instead of taking the refusal of an
/// attempt made before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_shorter_than_the_retry_budget_surfaces_no_error_to_the_publisher() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let mut server = RedisServer::start();
    let publisher = Arc::new(RedisBackend::new(&server.url()).unwrap().publisher());
    publisher.publish("t", msg(0)).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let publishing = tokio::spawn({
        let (publisher, stop, published) = (publisher.clone(), stop.clone(), published.clone());
        async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Acquire) {
                match publisher.publish("t", msg(1)).await {
                    Ok(_) => {
                        published.fetch_add(1, Ordering::AcqRel);
                    }
                    Err(e) => errors.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            errors
        }
    });
    for cycle in 0..2 {
        server.kill();
        // The outage itself, not a wait for a condition.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        server.restart();
        // Publishing goes on after the restart.
        let before = published.load(Ordering::Acquire);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while published.load(Ordering::Acquire) < before + 3 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "cycle {cycle}: no publish got through after the restart"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    stop.store(true, Ordering::Release);
    let errors = publishing.await.unwrap();
    assert!(
        errors.is_empty(),
        "publishes failed across 1.5 s restarts: {errors:?}"
    );
}

/// A script the server refuses (here for want of memory) is named in the error by what it
/// does, not only by the SHA in the server's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_script_is_named_in_the_error() {
    let server = RedisServer::start();
    server.command("XGROUP CREATE t g $ MKSTREAM");
    // Every write is refused from now on; the group exists, so the lease is the first write.
    assert_eq!(server.command("CONFIG SET maxmemory 1"), "+OK");
    let sub_ = subscriber(&server, RedisSubscriberOptions::default());
    let err = sub_
        .subscribe("t", SubscribeOptions::new("g", "c"))
        .await
        .map(drop)
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("lease acquire"), "{text}");
    assert!(text.contains("OOM"), "{text}");
}

/// After an outage longer than the lease that cut everyone off (the server frozen), no one is
/// taken for crashed the moment the server is back: a reclaiming consumer first gives the
/// others one lease TTL, in which the live one renews its lease and touches its entries, so
/// it keeps its in-flight deliveries and nothing is handled twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_a_live_consumers_entries_are_not_taken_over() {
    let server = RedisServer::start();
    // Long enough that A's first renewal after the thaw falls inside B's hold-back even when
    // the whole suite keeps both cores busy (600 ms once was not).
    let ttl = Duration::from_millis(1200);
    let publisher = RedisBackend::new(&server.url()).unwrap().publisher();
    let batch: Vec<_> = (0..3).map(msg).collect();
    publisher.publish_batch("t", batch).await.unwrap();
    let a_ = subscriber(&server, RedisSubscriberOptions::default().lease_ttl(ttl));
    let mut a = a_
        .subscribe(
            "t",
            SubscribeOptions::new("g", "a")
                .block(Duration::from_millis(100))
                .max_in_flight(3),
        )
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(delivery(&mut a).await);
    }
    let b_ = subscriber(&server, RedisSubscriberOptions::default().lease_ttl(ttl));
    let mut b = b_
        .subscribe(
            "t",
            SubscribeOptions::new("g", "b")
                .block(Duration::from_millis(100))
                .reclaim(streamwise::ReclaimOptions::new(
                    Duration::from_millis(50),
                    Duration::from_secs(1),
                )),
        )
        .await
        .unwrap();
    let (taken_tx, mut taken) = tokio::sync::mpsc::unbounded_channel();
    let reclaiming = tokio::spawn(async move {
        while let Some(item) = b.next().await {
            if let Ok(d) = item {
                let _ = taken_tx.send(d.id());
            }
        }
    });
    // Both stay subscribed while the server is frozen past their leases (and A's entries
    // idle past B's min_idle).
    server.freeze();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    server.thaw();
    // An observation window, not a synchronisation: twice the TTL after the thaw.
    match tokio::time::timeout(ttl * 2 + Duration::from_millis(300), taken.recv()).await {
        Err(_) => {}
        Ok(id) => panic!("a live consumer's entry was taken over after the outage: {id:?}"),
    }
    for d in held {
        d.ack().await.unwrap();
    }
    a_.close().await.unwrap();
    b_.close().await.unwrap();
    reclaiming.await.unwrap();
    assert!(taken.try_recv().is_err());
}
