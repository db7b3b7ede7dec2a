//! Crashes on NATS: a consumer process is killed with SIGKILL ten times at random points
//! while 20,000 messages flow; the next processes get the dead ones' deliveries back from the
//! server (after `ack_wait`) and finish the work. Every message is handled at least once,
//! duplicates stay within the in-flight windows of the killed processes, and nothing is left
//! pending.
//!
//! A handler records a message as handled by publishing it to the topic `handled` before its
//! delivery is acked (the router publishes an outcome's messages first), so a kill after the
//! record and before the ack makes a duplicate, never a loss. The consumer process is this
//! test binary run again with `STREAMWISE_NATS_CRASH_URL` set.

#![cfg(feature = "nats")]

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use streamwise::nats::{NatsBackend, NatsSubscriberOptions};
use streamwise::router::{Json, Outcome, Router};
use streamwise::testing::NatsServer;
use streamwise::{Message, Publisher, SubscribeOptions, Subscriber, Subscription};

const MESSAGES: u64 = 100_000;
const KILLS: u32 = 20;
const STREAM: &str = "work";
const HANDLED: &str = "handled";
/// Per consumer process: deliveries in flight and messages per pull.
const WINDOW: usize = 50;
/// How soon a killed process's deliveries go to the others.
const ACK_WAIT: Duration = Duration::from_secs(2);

/// Not a test of its own: the body of the consumer processes that
/// [`twenty_sigkills_lose_nothing`] starts. Without `STREAMWISE_NATS_CRASH_URL` it does nothing.
#[test]
fn nats_consumer_process_entry_point() {
    let (Ok(url), Ok(name)) = (
        std::env::var("STREAMWISE_NATS_CRASH_URL"),
        std::env::var("STREAMWISE_NATS_CRASH_NAME"),
    ) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let nats = NatsBackend::connect(&url).await.expect("connect");
        let subscriber = nats
            .subscriber_with(NatsSubscriberOptions::default().ack_wait(ACK_WAIT))
            .expect("subscriber");
        async fn handle(Json(n): Json<u64>) -> streamwise::Result<Outcome> {
            // Some work first, as real handlers do: a kill often lands in the middle of it.
            tokio::time::sleep(Duration::from_millis(2)).await;
            Ok(Outcome::ack().publish(HANDLED, Message::new("handled", &n)?))
        }
        let options = SubscribeOptions::new("workers", &name)
            .max_in_flight(WINDOW)
            .batch_size(WINDOW)
            .block(Duration::from_millis(200));
        let router = Router::new();
        let routes = router.routes().route("n", handle);
        let router = router.subscribe(STREAM, options, routes);
        let _running = router
            .start(Arc::new(subscriber), Arc::new(nats.publisher()))
            .await
            .expect("router");
        // Runs until killed.
        std::future::pending::<()>().await;
    });
}

fn spawn_consumer(url: &str, name: &str) -> Child {
    Command::new(std::env::current_exe().expect("own path"))
        .args([
            "nats_consumer_process_entry_point",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("STREAMWISE_NATS_CRASH_URL", url)
        .env("STREAMWISE_NATS_CRASH_NAME", name)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a consumer process")
}

/// A small deterministic generator for kill points (xorshift).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The records of handled messages, read as group `audit`: distinct numbers and the total.
struct Audit {
    sub: Subscription,
    seen: HashSet<u64>,
    total: u64,
}

impl Audit {
    /// Takes in every record there is now (waiting at most `for_` for the next).
    async fn catch_up(&mut self, for_: Duration) {
        while let Ok(Some(item)) = tokio::time::timeout(for_, self.sub.next()).await {
            let d = item.expect("a record");
            self.seen.insert(d.message().decode().expect("a number"));
            self.total += 1;
            d.ack().await.expect("ack");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sigkills_lose_nothing() {
    let server = NatsServer::start();
    let url = server.url();
    let nats = NatsBackend::connect(&url).await.unwrap();
    let publisher = nats.publisher();
    for batch in 0..MESSAGES / 1000 {
        let messages = (batch * 1000..(batch + 1) * 1000)
            .map(|n| Message::new("n", &n).unwrap())
            .collect();
        publisher.publish_batch(STREAM, messages).await.unwrap();
    }
    let auditor = nats.subscriber();
    let mut audit = Audit {
        sub: auditor
            .subscribe(
                HANDLED,
                SubscribeOptions::new("audit", "a")
                    .max_in_flight(500)
                    .batch_size(500),
            )
            .await
            .unwrap(),
        seen: HashSet::new(),
        total: 0,
    };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ 0x9e37_79b9_7f4a_7c15;
    let mut rng = Rng(seed | 1);
    let started = Instant::now();

    for kill in 0..KILLS {
        let mut child = spawn_consumer(&url, &format!("c{kill}"));
        // Kill while messages flow: after it handled something, at a random point.
        let before = audit.total;
        let deadline = Instant::now() + Duration::from_secs(30);
        while audit.total <= before {
            assert!(Instant::now() < deadline, "consumer c{kill} made no progress");
            assert!(
                child.try_wait().unwrap().is_none(),
                "consumer c{kill} exited by itself"
            );
            audit.catch_up(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(50 + rng.below(300))).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    audit.catch_up(Duration::from_millis(50)).await;
    assert!(
        (audit.seen.len() as u64) < MESSAGES,
        "the kills happened while messages were still flowing"
    );

    let mut last = spawn_consumer(&url, "survivor");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        audit.catch_up(Duration::from_millis(20)).await;
        let pending = nats.pending_count(STREAM, "workers").await.unwrap();
        if audit.seen.len() as u64 == MESSAGES && pending == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not finished: {} handled, {pending} pending",
            audit.seen.len()
        );
        assert!(
            last.try_wait().unwrap().is_none(),
            "the surviving consumer exited"
        );
    }
    last.kill().unwrap();
    last.wait().unwrap();
    audit.catch_up(Duration::from_millis(200)).await;
    auditor.close().await.unwrap();

    let duplicates = audit.total - MESSAGES;
    println!(
        "nats crash test: {MESSAGES} messages, {KILLS} SIGKILLs, {duplicates} duplicates, 0 lost, {:.1} s (seed {seed:#x})",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        audit.seen.len() as u64,
        MESSAGES,
        "every message handled at least once"
    );
    // Each killed process could have handled, but not yet acked, its in-flight window.
    let bound = u64::from(KILLS) * 2 * WINDOW as u64;
    assert!(duplicates <= bound, "{duplicates} duplicates, more than {bound}");
    // Everything handled was acknowledged: the group holds nothing, and every message was
    // read (a message the group never delivered would count as unhandled above).
    assert_eq!(nats.pending_count(STREAM, "workers").await.unwrap(), 0);
}
