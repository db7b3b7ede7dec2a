//! `streamwise::redis::ops` as a library, against private redis-servers: the repairs check
//! for live consumers in the same step as they write (a consumer that starts between the
//! first look and the write is seen), live consumers are found without scanning the keyspace,
//! bad durations are no panic, and the replay's resume key goes when its run or its stream
//! does. The CLI's own tests (`cli/tests/cli.rs`) cover the commands end to end.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use streamwise::redis::client::{Value, cmd};
use streamwise::redis::ops::{self, Mode, PendingQuery, ReplayOptions, ResetTo, TrimGuard, TrimTo};
use streamwise::redis::{RedisBackend, RedisConnection, RedisSubscriber, RedisSubscriberOptions, admin};
use streamwise::{Message, Publisher, StartFrom, SubscribeOptions, Subscriber, Subscription};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use common::RedisServer;

/// A loopback TCP proxy that, once armed, holds back the first command whose bytes contain
/// one of its markers until the test lets it go: the window between a repair's first look
/// and its write, opened as wide as the test needs.
struct HoldingProxy {
    port: u16,
    markers: Vec<&'static [u8]>,
    armed: AtomicBool,
    held: Notify,
    release: Notify,
}

impl HoldingProxy {
    async fn start(upstream: u16, markers: &[&'static [u8]]) -> Arc<HoldingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Arc::new(HoldingProxy {
            port: listener.local_addr().unwrap().port(),
            markers: markers.to_vec(),
            armed: AtomicBool::new(false),
            held: Notify::new(),
            release: Notify::new(),
        });
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let p = p.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        let chunk = &buf[..n];
                        if p.markers.iter().any(|m| chunk.windows(m.len()).any(|w| w == *m))
                            && p.armed.swap(false, Ordering::SeqCst)
                        {
                            p.held.notify_one();
                            p.release.notified().await;
                        }
                        if sw.write_all(chunk).await.is_err() {
                            return;
                        }
                    }
                });
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                });
            }
        });
        proxy
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Waits until a command is held.
    async fn held(&self) {
        tokio::time::timeout(Duration::from_secs(20), self.held.notified())
            .await
            .expect("the write reaches the proxy");
    }

    fn release(&self) {
        self.release.notify_one();
    }
}

/// A consumer of `group` on `stream` that holds its lease and keeps what it reads pending
/// (at most `in_flight`), until dropped with its subscriber.
struct Holder {
    subscriber: RedisSubscriber,
    subscription: Subscription,
}

impl Holder {
    async fn start(url: &str, stream: &str, group: &str, consumer: &str, in_flight: usize) -> Holder {
        let subscriber = RedisSubscriber::new(
            RedisConnection::new(url).unwrap(),
            RedisSubscriberOptions::default(),
        )
        .unwrap();
        let subscription = subscriber
            .subscribe(
                stream,
                SubscribeOptions::new(group, consumer)
                    .max_in_flight(in_flight)
                    .batch_size(in_flight),
            )
            .await
            .unwrap();
        Holder {
            subscriber,
            subscription,
        }
    }

    async fn stop(self) {
        drop(self.subscription);
        self.subscriber.close().await.unwrap();
    }
}

async fn cmd_on(conn: &RedisConnection, args: &[&str]) -> Value {
    let mut c = cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    conn.command(&c).await.unwrap()
}

async fn exists(conn: &RedisConnection, key: &str) -> bool {
    matches!(cmd_on(conn, &["EXISTS", key]).await, Value::Int(1))
}

async fn eventually_exists(conn: &RedisConnection, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !exists(conn, key).await {
        assert!(Instant::now() < deadline, "{key} not within 20 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn publish(redis: &RedisBackend, stream: &str, n: u64) {
    let publisher = redis.publisher();
    for i in 0..n {
        publisher
            .publish(stream, Message::new("order.placed", &i).unwrap())
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_refuses_a_consumer_that_starts_between_its_look_and_its_write() {
    let server = RedisServer::start();
    let redis = RedisBackend::new(&server.url()).unwrap();
    let conn = redis.connection().clone();
    publish(&redis, "orders", 3).await;
    admin::create_group(&conn, "orders", "billing", StartFrom::Latest, false)
        .await
        .unwrap();
    let before = admin::group_info(&conn, "orders", "billing").await.unwrap();
    // The write of the old code (XGROUP SETID) and of the guarded one (a script).
    let proxy = HoldingProxy::start(server.port(), &[b"SETID", b"EVALSHA"]).await;
    let through = RedisConnection::new(&proxy.url()).unwrap();
    proxy.arm();
    let reset = tokio::spawn(async move {
        ops::reset_group(
            &through,
            "orders",
            "billing",
            ResetTo::Earliest,
            Mode::Execute,
            false,
        )
        .await
    });
    // The reads found no live consumer; the write is held. A consumer starts meanwhile.
    proxy.held().await;
    let holder = Holder::start(&server.url(), "orders", "billing", "w-1", 10).await;
    eventually_exists(&conn, "streamwise:lease:{orders}:billing:w-1").await;
    proxy.release();
    let report = reset.await.unwrap().unwrap();
    assert!(report.refused, "{report:?}");
    assert_eq!(report.live.len(), 1, "{report:?}");
    assert_eq!(report.live[0].consumer, "w-1");
    assert!(!report.streams[0].applied);
    assert!(!report.changes());
    // The group was left where it was: w-1 was delivered nothing.
    let after = admin::group_info(&conn, "orders", "billing").await.unwrap();
    assert_eq!(after.last_delivered_id, before.last_delivered_id);
    assert_eq!(after.pending, 0);
    holder.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trim_refuses_a_consumer_that_starts_between_its_look_and_its_write() {
    let server = RedisServer::start();
    let redis = RedisBackend::new(&server.url()).unwrap();
    let conn = redis.connection().clone();
    publish(&redis, "orders", 10).await;
    // A group that has been delivered nothing, and has no consumer yet: nothing protected.
    admin::create_group(&conn, "orders", "billing", StartFrom::Beginning, false)
        .await
        .unwrap();
    let proxy = HoldingProxy::start(server.port(), &[b"XTRIM", b"EVALSHA"]).await;
    let through = RedisConnection::new(&proxy.url()).unwrap();
    let dry = ops::trim(
        &through,
        "orders",
        TrimTo::MaxLen(2),
        Mode::DryRun,
        TrimGuard::default(),
    )
    .await
    .unwrap();
    assert!(!dry.refused && dry.changes(), "{dry:?}");
    proxy.arm();
    let trim = tokio::spawn(async move {
        ops::trim(
            &through,
            "orders",
            TrimTo::MaxLen(2),
            Mode::Execute,
            TrimGuard::default(),
        )
        .await
    });
    proxy.held().await;
    let holder = Holder::start(&server.url(), "orders", "billing", "w-1", 2).await;
    eventually_exists(&conn, "streamwise:lease:{orders}:billing:w-1").await;
    proxy.release();
    let report = trim.await.unwrap().unwrap();
    assert!(report.refused, "{report:?}");
    let row = &report.streams[0];
    assert!(row.would_cut && !row.applied, "{row:?}");
    assert_eq!(row.protected_for, ["billing"]);
    assert_eq!(report.live[0].consumer, "w-1");
    assert_eq!(admin::stream_length(&conn, "orders").await.unwrap(), 10);
    holder.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_consumers_are_found_without_scanning_the_keyspace() {
    let server = RedisServer::start();
    let redis = RedisBackend::new(&server.url()).unwrap();
    let conn = redis.connection();
    publish(&redis, "orders", 4).await;
    admin::create_group(conn, "orders", "billing", StartFrom::Beginning, false)
        .await
        .unwrap();
    let holder = Holder::start(&server.url(), "orders", "billing", "w-1", 2).await;
    eventually_exists(conn, "streamwise:lease:{orders}:billing:w-1").await;
    cmd_on(conn, &["CONFIG", "RESETSTAT"]).await;

    let groups = ops::groups(conn, "orders").await.unwrap();
    assert_eq!(groups.groups[0].live_consumers, 1);
    let reset = ops::reset_group(conn, "orders", "billing", ResetTo::Earliest, Mode::DryRun, false)
        .await
        .unwrap();
    assert!(reset.refused);
    assert_eq!(reset.live[0].consumer, "w-1");
    assert!(reset.live[0].lease_ttl_ms.is_some_and(|ttl| ttl > 0));
    let trim = ops::trim(
        conn,
        "orders",
        TrimTo::MaxLen(0),
        Mode::DryRun,
        TrimGuard::default(),
    )
    .await
    .unwrap();
    assert!(trim.refused);
    assert_eq!(trim.live[0].consumer, "w-1");

    let stats: String = conn.command(cmd("INFO").arg("commandstats")).await.unwrap();
    assert!(!stats.contains("cmdstat_scan:"), "{stats}");
    assert!(stats.contains("cmdstat_smembers:"), "{stats}");
    holder.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_beyond_the_clock_are_no_panic() {
    let server = RedisServer::start();
    let redis = RedisBackend::new(&server.url()).unwrap();
    let conn = redis.connection();
    publish(&redis, "orders", 2).await;
    cmd_on(conn, &["XADD", "{orders}-dead", "*", "f", "v"]).await;
    for mode in [Mode::DryRun, Mode::Execute] {
        let purge = ops::purge_dead_letters(conn, "orders", Some(Duration::MAX), mode)
            .await
            .unwrap();
        assert_eq!((purge.total, purge.older_than_ms), (0, Some(u64::MAX)));
        let trim = ops::trim(
            conn,
            "orders",
            TrimTo::OlderThan(Duration::MAX),
            mode,
            TrimGuard::default(),
        )
        .await
        .unwrap();
        assert!(!trim.changes(), "{trim:?}");
    }
    assert_eq!(admin::stream_length(conn, "{orders}-dead").await.unwrap(), 1);
    assert_eq!(admin::stream_length(conn, "orders").await.unwrap(), 2);
    // A query left at its defaults is a valid one.
    admin::create_group(conn, "orders", "billing", StartFrom::Beginning, false)
        .await
        .unwrap();
    let pending = ops::pending(conn, "orders", "billing", &PendingQuery::default())
        .await
        .unwrap();
    assert!(pending.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_key_goes_when_its_run_ends_on_an_empty_stream_or_its_stream_is_deleted() {
    let server = RedisServer::start();
    let redis = RedisBackend::new(&server.url()).unwrap();
    let conn = redis.connection();
    let key = "streamwise:replay:{orders}-dead";
    let record = |n: i32| {
        streamwise::dead_letter::DeadLetter {
            reason: "payment service down",
            original_id: streamwise::EntryId::new(1, 0),
            stream: "orders",
            group: "billing",
            delivery_count: 3,
        }
        .for_message(&Message::new("order.placed", &n).unwrap())
    };
    let add_records = || async {
        let publisher = redis.publisher();
        for n in 0..3 {
            publisher.publish("{orders}-dead", record(n)).await.unwrap();
        }
    };
    let interrupted_run = || async {
        // Stopped at once: the run ends after its first record.
        let report = ops::replay_dead_letters(
            conn,
            "orders",
            &ReplayOptions::new(Mode::Execute),
            std::future::ready(()),
            &mut |_, _| {},
        )
        .await
        .unwrap();
        assert!(report.interrupted && report.replayed == 1, "{report:?}");
    };
    add_records().await;
    interrupted_run().await;
    assert!(exists(conn, key).await);

    // The rest is purged; the next run has nothing to replay, and finishes: the key goes.
    ops::purge_dead_letters(conn, "orders", None, Mode::Execute)
        .await
        .unwrap();
    let report = ops::replay_dead_letters(
        conn,
        "orders",
        &ReplayOptions::new(Mode::Execute),
        std::future::pending(),
        &mut |_, _| {},
    )
    .await
    .unwrap();
    assert!(report.bounds[0].resumed && report.replayed == 0, "{report:?}");
    assert!(!exists(conn, key).await);

    // Deleting the dead-letter stream deletes an unfinished run's key with it.
    add_records().await;
    interrupted_run().await;
    assert!(exists(conn, key).await);
    admin::delete_stream(conn, "{orders}-dead").await.unwrap();
    assert!(!exists(conn, key).await);
}
