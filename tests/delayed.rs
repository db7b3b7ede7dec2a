//! Delayed publish on Redis (`Publisher::publish_at`): messages appear when due, never before,
//! each exactly once, while two movers (subscriptions of the topic) run and one, in a process
//! of its own, is SIGKILLed half-way; a schedule survives a server restart with AOF, before
//! the movers start and while they work.
//!
//! The mover process is this test binary run again with `STREAMWISE_MOVER_URL` set (see
//! [`mover_process_entry_point`]).

mod common;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use streamwise::redis::RedisBackend;
use streamwise::redis::client::cmd;
use streamwise::{Message, Publisher, SubscribeOptions, Subscriber, Subscription};

use common::RedisServer;

fn ms_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Handles `sub` until it ends, sending (number, due ms, received ms) of each delivery.
fn collect(
    mut sub: Subscription,
    seen: tokio::sync::mpsc::UnboundedSender<(u64, u64, u64)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = sub.next().await {
            let received = ms_since_epoch(SystemTime::now());
            let body: serde_json::Value = delivery.message().decode().unwrap();
            let (n, due) = (body["n"].as_u64().unwrap(), body["due"].as_u64().unwrap());
            delivery.ack().await.unwrap();
            if seen.send((n, due, received)).is_err() {
                return;
            }
        }
    })
}

/// A subscription of `topic` in group `g`, handled by [`collect`]: its task and what it sees.
async fn collect_group_g(
    subscriber: &dyn Subscriber,
    topic: &str,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<(u64, u64, u64)>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let sub = subscriber
        .subscribe(
            topic,
            SubscribeOptions::new("g", "c").block(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    (collect(sub, tx), rx)
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Not a test of its own: the body of the mover process the test below starts and SIGKILLs.
/// A subscription of the topic in a group of its own, never polled: its mover runs anyway.
#[test]
fn mover_process_entry_point() {
    let Ok(url) = std::env::var("STREAMWISE_MOVER_URL") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let backend = RedisBackend::new(&url).expect("url");
        let subscriber = backend.subscriber().expect("subscriber");
        let _sub = subscriber
            .subscribe(TOPIC, SubscribeOptions::new("movers", "m"))
            .await
            .expect("subscribe");
        println!("moving");
        std::io::Write::flush(&mut std::io::stdout()).expect("flush");
        std::future::pending::<()>().await;
    });
}

const TOPIC: &str = "reminders";

/// 10,000 messages published with random delays up to 5 s, moved by two movers, one of them
/// a process SIGKILLed half-way: none comes before it is due or twice, each is appended once,
/// and the lateness (reported) is within 100 ms at the 99th percentile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_come_when_due_once_each_while_a_mover_is_killed() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let publisher = backend.publisher();
    let n = 10_000u64;
    /// Kills the mover process however the test ends.
    struct KillOnDrop(Option<std::process::Child>);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            if let Some(child) = self.0.as_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
    let mover = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "mover_process_entry_point",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("STREAMWISE_MOVER_URL", server.url())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("a mover process");
    let mut mover = KillOnDrop(Some(mover));
    {
        use std::io::BufRead;
        // The test harness prints its own lines first.
        let lines = std::io::BufReader::new(mover.0.as_mut().unwrap().stdout.as_mut().unwrap()).lines();
        assert!(
            lines
                .map_while(std::result::Result::ok)
                .any(|l| l.trim_end().ends_with("moving")),
            "the mover process did not start"
        );
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let subscriber = backend.subscriber().unwrap();
    let options = SubscribeOptions::new("g", "a")
        .max_in_flight(128)
        .batch_size(64)
        .block(Duration::from_millis(200));
    let consumer = collect(subscriber.subscribe(TOPIC, options).await.unwrap(), tx);
    // Random delays up to 5 s, the same every run. A message's due time is taken just before
    // its publish_after, so it is never later than the one the publisher stores. Those due
    // within a second go out through the publisher's one-off move, the rest through the
    // movers.
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut batch = Vec::new();
    for i in 0..n {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let delay = Duration::from_millis(rng % 5_000);
        let body = serde_json::json!({"n": i, "due": ms_since_epoch(SystemTime::now() + delay)});
        batch.push(publisher.publish_after(TOPIC, delay, Message::new("reminder", &body).unwrap()));
        if batch.len() == 100 {
            for r in futures::future::join_all(batch.drain(..)).await {
                r.unwrap();
            }
        }
    }
    for r in futures::future::join_all(batch.drain(..)).await {
        r.unwrap();
    }
    let mut got: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut duplicates = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut killed = false;
    while (got.len() as u64) < n {
        let (i, due, received) = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} delayed messages came", got.len()))
            .expect("the collector");
        if got.insert(i, (due, received)).is_some() {
            duplicates += 1;
        }
        if !killed && got.len() as u64 == n / 2 {
            let mut child = mover.0.take().expect("the mover");
            child.kill().expect("SIGKILL the mover");
            child.wait().expect("reap the mover");
            killed = true;
        }
    }
    consumer.abort();
    assert_eq!(duplicates, 0, "a delayed message came twice");
    let stream_len: u64 = backend
        .connection()
        .command(cmd("XLEN").arg(TOPIC))
        .await
        .unwrap();
    assert_eq!(stream_len, n, "each delayed message appended exactly once");
    let info = streamwise::redis::admin::stream_info(backend.connection(), TOPIC)
        .await
        .unwrap();
    assert_eq!(info.scheduled, 0);
    assert!(
        info.oldest_entry_age
            .is_some_and(|age| age < Duration::from_secs(60))
    );
    let mut late: Vec<i64> = got
        .values()
        .map(|(due, received)| *received as i64 - *due as i64)
        .collect();
    late.sort_unstable();
    assert!(late[0] >= 0, "a message came {} ms before it was due", -late[0]);
    let (p50, p99, max) = (
        percentile(&late, 0.5),
        percentile(&late, 0.99),
        late[late.len() - 1],
    );
    eprintln!("{n} delayed messages, lateness after due: p50 {p50} ms, p99 {p99} ms, max {max} ms");
    // The bound. Measured here: p99 4 ms on a quiet machine, 9 ms with three busy
    // loops on its two cores.
    assert!(p99 <= 100, "p99 lateness {p99} ms");
    subscriber.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_survives_a_server_restart_with_aof() {
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let backend = RedisBackend::new(&server.url()).unwrap();
    let publisher = backend.publisher();
    let topic = "restarted";
    let at = SystemTime::now() + Duration::from_millis(1_500);
    for i in 0..100u64 {
        let body = serde_json::json!({"n": i, "due": ms_since_epoch(at)});
        publisher
            .publish_at(topic, at, Message::new("reminder", &body).unwrap())
            .await
            .unwrap();
    }
    // The schedule is in the server only: nothing moves it before the restart.
    server.kill();
    server.restart();
    let subscriber = backend.subscriber().unwrap();
    let (task, mut rx) = collect_group_g(&subscriber, topic).await;
    let mut got = std::collections::HashSet::new();
    while got.len() < 100 {
        let (i, due, received) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("the scheduled messages after the restart")
            .unwrap();
        assert!(received >= due, "message {i} came before it was due");
        assert!(got.insert(i), "message {i} came twice");
    }
    task.abort();
    subscriber.close().await.unwrap();
}

/// The server SIGKILLed and restarted (AOF, fsync always) while the movers are at work:
/// every scheduled message still comes, none before it is due, and each is appended to the
/// stream exactly once (a delivery whose ack the crash lost may come again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_while_messages_are_being_moved_loses_none_and_appends_none_twice() {
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let backend = RedisBackend::new(&server.url()).unwrap();
    let publisher = backend.publisher();
    let topic = "crashing";
    let n = 2_000u64;
    let subscriber = backend.subscriber().unwrap();
    let (task, mut rx) = collect_group_g(&subscriber, topic).await;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for i in 0..n {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let delay = Duration::from_millis(500 + rng % 2_500);
        let body = serde_json::json!({"n": i, "due": ms_since_epoch(SystemTime::now() + delay)});
        publisher
            .publish_after(topic, delay, Message::new("reminder", &body).unwrap())
            .await
            .unwrap();
    }
    let mut got = std::collections::HashSet::new();
    let mut restarted = false;
    while (got.len() as u64) < n {
        let (i, due, received) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} scheduled messages came", got.len()))
            .unwrap();
        assert!(
            received >= due,
            "message {i} came {} ms before it was due",
            due - received
        );
        got.insert(i);
        if !restarted && got.len() as u64 == n / 2 {
            let waiting = streamwise::redis::admin::stream_info(backend.connection(), topic)
                .await
                .unwrap()
                .scheduled;
            assert!(waiting > 0, "nothing left to move when the server is killed");
            server.kill();
            server.restart();
            restarted = true;
        }
    }
    task.abort();
    let stream_len: u64 = backend
        .connection()
        .command(cmd("XLEN").arg(topic))
        .await
        .unwrap();
    assert_eq!(stream_len, n, "each scheduled message appended exactly once");
    let info = streamwise::redis::admin::stream_info(backend.connection(), topic)
        .await
        .unwrap();
    assert_eq!(info.scheduled, 0);
    subscriber.close().await.unwrap();
}

/// A due time between two milliseconds is stored as the later one: the mover compares whole
/// milliseconds of the server's clock, so a score rounded down would move the message up to a
/// millisecond before it is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_time_is_never_stored_earlier_than_asked() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let publisher = backend.publisher();
    let at = SystemTime::now() + Duration::from_secs(3600) + Duration::from_micros(900);
    publisher
        .publish_at("rounding", at, Message::new("t", &1).unwrap())
        .await
        .unwrap();
    let scored: Vec<(Vec<u8>, u64)> = backend
        .connection()
        .command(
            cmd("ZRANGE")
                .arg("streamwise:scheduled:{rounding}")
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES"),
        )
        .await
        .unwrap();
    assert_eq!(scored.len(), 1);
    // The topic has no stream yet, only the schedule: it is there, with nothing in it.
    let info = streamwise::redis::admin::stream_info(backend.connection(), "rounding")
        .await
        .unwrap();
    assert_eq!((info.length, info.scheduled), (0, 1));
    assert!(info.oldest_entry_age.is_none());
    let due = UNIX_EPOCH + Duration::from_millis(scored[0].1);
    assert!(due >= at, "stored due {due:?} is before {at:?}");
    assert!(due < at + Duration::from_millis(1));
}
