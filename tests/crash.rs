//! Crashes: a consumer process is killed with SIGKILL 20 times at random points while 100,000
//! messages flow; the next processes (reclaiming the dead ones' entries) finish the work.
//! Every message is handled at least once, duplicates stay within the in-flight windows of
//! the killed processes, and nothing is left pending.
//!
//! The consumer process is this test binary run again with `STREAMWISE_CRASH_URL` set (see
//! [`consumer_process_entry_point`]).

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use streamwise::redis::client::cmd;
use streamwise::redis::{RedisBackend, RedisConnection, RedisSubscriber, RedisSubscriberOptions};
use streamwise::router::{Json, Router, State};
use streamwise::{Message, Publisher, ReclaimOptions, SubscribeOptions};

use common::RedisServer;

const MESSAGES: u64 = 100_000;
const KILLS: u32 = 20;
const STREAM: &str = "work";
const HANDLED: &str = "crash-test:handled";
/// Per consumer process: deliveries in flight and entries per read.
const WINDOW: usize = 50;

/// Not a test of its own: the body of the consumer processes that
/// [`twenty_sigkills_lose_nothing`] starts. Without `STREAMWISE_CRASH_URL` it does nothing.
#[test]
fn consumer_process_entry_point() {
    let (Ok(url), Ok(name)) = (
        std::env::var("STREAMWISE_CRASH_URL"),
        std::env::var("STREAMWISE_CRASH_NAME"),
    ) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let conn = RedisConnection::new(&url).expect("url");
        // A short lease: a killed process counts as crashed after a second, and the next
        // process takes its entries at once.
        let subscriber = RedisSubscriber::new(
            conn.clone(),
            RedisSubscriberOptions::default().lease_ttl(Duration::from_secs(1)),
        )
        .expect("subscriber");
        async fn handle(Json(n): Json<u64>, State(conn): State<RedisConnection>) -> streamwise::Result<()> {
            // Some work first, as real handlers do: a kill often lands in the middle of it.
            tokio::time::sleep(Duration::from_millis(2)).await;
            // Recorded before the ack: a crash after this line is a duplicate, never a loss.
            conn.command::<i64>(cmd("HINCRBY").arg(HANDLED).arg(n).arg(1))
                .await?;
            Ok(())
        }
        let options = SubscribeOptions::new("workers", &name)
            .max_in_flight(WINDOW)
            .batch_size(WINDOW)
            .block(Duration::from_millis(200))
            .reclaim(ReclaimOptions::new(
                Duration::from_millis(200),
                Duration::from_secs(30),
            ));
        let router = Router::with_state(conn.clone());
        let routes = router.routes().route("n", handle);
        let router = router.subscribe(STREAM, options, routes);
        let publisher = Arc::new(RedisBackend::with_connection(conn).publisher());
        if std::env::var("STREAMWISE_CRASH_MODE").as_deref() == Ok("run") {
            // As a service's main runs it: until SIGTERM, or until the router gives up.
            let deadline = std::env::var("STREAMWISE_CRASH_DEADLINE_MS")
                .ok()
                .and_then(|ms| ms.parse().ok())
                .map_or(Duration::from_secs(30), Duration::from_millis);
            let stopped = router
                .shutdown_deadline(deadline)
                .run(
                    Arc::new(subscriber),
                    publisher,
                    streamwise::router::shutdown_signal(),
                )
                .await;
            eprintln!("router stopped: {stopped:?}");
            std::process::exit(if stopped.is_err() { 3 } else { 0 });
        }
        let _running = router
            .start(Arc::new(subscriber), publisher)
            .await
            .expect("router");
        println!("consumer {name} running");
        // Runs until killed.
        std::future::pending::<()>().await;
    });
}

fn spawn_consumer(url: &str, name: &str) -> Child {
    consumer_command(url, name)
        .spawn()
        .expect("start a consumer process")
}

fn consumer_command(url: &str, name: &str) -> Command {
    let mut command = Command::new(std::env::current_exe().expect("own path"));
    command
        .args([
            "consumer_process_entry_point",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("STREAMWISE_CRASH_URL", url)
        .env("STREAMWISE_CRASH_NAME", name)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .expect("kill(1)");
    assert!(status.success(), "kill -{name} failed");
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

/// How many entries the workers group has pending (-1 when the reply is not a count).
async fn group_pending(conn: &RedisConnection) -> i64 {
    let summary: Vec<streamwise::redis::client::Value> = conn
        .command(cmd("XPENDING").arg(STREAM).arg("workers"))
        .await
        .unwrap();
    match summary.first() {
        Some(streamwise::redis::client::Value::Int(n)) => *n,
        _ => -1,
    }
}

/// The checkpoint a killed consumer left lies below every entry still pending for it (checked
/// before another consumer takes them over), so a group re-created from checkpoints would
/// deliver them again.
async fn assert_checkpoint_below_pending(conn: &RedisConnection, consumer: &str) {
    let saved: Option<String> = conn
        .command(
            cmd("HGET")
                .arg("streamwise:checkpoint:{work}")
                .arg(format!("workers:{consumer}")),
        )
        .await
        .unwrap();
    let Some(saved) = saved else {
        return;
    };
    let saved: serde_json::Value = serde_json::from_str(&saved).unwrap();
    let checkpoint: streamwise::EntryId = saved["message_id"].as_str().unwrap().parse().unwrap();
    let oldest: Vec<(String, String, u64, u64)> = conn
        .command(
            cmd("XPENDING")
                .arg(STREAM)
                .arg("workers")
                .arg("-")
                .arg("+")
                .arg(1)
                .arg(consumer),
        )
        .await
        .unwrap();
    if let Some((oldest, ..)) = oldest.first() {
        let oldest: streamwise::EntryId = oldest.parse().unwrap();
        assert!(
            checkpoint < oldest,
            "{consumer} was killed with its checkpoint {checkpoint} past {oldest}, still pending"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sigkills_lose_nothing() {
    let server = RedisServer::start();
    let url = server.url();
    let conn = RedisConnection::new(&url).unwrap();
    let publisher = RedisBackend::with_connection(conn.clone()).publisher();
    for batch in 0..MESSAGES / 1000 {
        let messages = (batch * 1000..(batch + 1) * 1000)
            .map(|n| Message::new("n", &n).unwrap())
            .collect();
        publisher.publish_batch(STREAM, messages).await.unwrap();
    }
    let handled = || async {
        conn.command::<u64>(&cmd("HLEN").arg(HANDLED).clone())
            .await
            .unwrap()
    };
    let seed = Instant::now().elapsed().as_nanos() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let mut rng = Rng(seed | 1);
    let started = Instant::now();

    for kill in 0..KILLS {
        let mut child = spawn_consumer(&url, &format!("c{kill}"));
        // Kill while messages flow: after it handled something, at a random point.
        let before = handled().await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while handled().await <= before {
            assert!(Instant::now() < deadline, "consumer c{kill} made no progress");
            assert!(
                child.try_wait().unwrap().is_none(),
                "consumer c{kill} exited by itself"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(50 + rng.below(300))).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert_checkpoint_below_pending(&conn, &format!("c{kill}")).await;
    }
    let at_last_kill = handled().await;
    assert!(
        at_last_kill < MESSAGES,
        "the kills happened while messages were still flowing"
    );

    let mut last = spawn_consumer(&url, "survivor");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let pending = group_pending(&conn).await;
        let done = handled().await;
        if done == MESSAGES && pending == 0 {
            break;
        }
        // Everything delivered and acknowledged, yet not everything handled: lost for good.
        let lag = streamwise::redis::admin::group_info(&conn, STREAM, "workers")
            .await
            .unwrap()
            .lag;
        if pending == 0 && lag == Some(0) && handled().await < MESSAGES {
            panic!(
                "{} messages were acknowledged without being handled: lost",
                MESSAGES - handled().await
            );
        }
        assert!(
            Instant::now() < deadline,
            "not finished: {} handled, {pending} pending",
            handled().await
        );
        assert!(
            last.try_wait().unwrap().is_none(),
            "the surviving consumer exited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    last.kill().unwrap();
    last.wait().unwrap();

    let counts: Vec<u64> = conn.command(cmd("HVALS").arg(HANDLED)).await.unwrap();
    let total: u64 = counts.iter().sum();
    let duplicates = total - MESSAGES;
    println!(
        "crash test: {MESSAGES} messages, {KILLS} SIGKILLs, {duplicates} duplicates, 0 lost, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        counts.len() as u64,
        MESSAGES,
        "every message handled at least once"
    );
    // Each killed process could have handled, but not yet acked, its in-flight window, plus
    // the acks of the last flush interval.
    let bound = u64::from(KILLS) * 2 * WINDOW as u64;
    assert!(duplicates <= bound, "{duplicates} duplicates, more than {bound}");
}

/// A consumer killed with SIGKILL and restarted at once under the same name (as systemd or a
/// StatefulSet does) takes over its own lease once it runs out, instead of failing with
/// `ConsumerActive`, and finishes the work, the entries it held first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_consumer_restarts_under_its_own_name() {
    const BACKLOG: u64 = 3000;
    let server = RedisServer::start();
    let url = server.url();
    let conn = RedisConnection::new(&url).unwrap();
    let publisher = RedisBackend::with_connection(conn.clone()).publisher();
    let messages = (0..BACKLOG).map(|n| Message::new("n", &n).unwrap()).collect();
    publisher.publish_batch(STREAM, messages).await.unwrap();
    let handled = || async {
        conn.command::<u64>(&cmd("HLEN").arg(HANDLED).clone())
            .await
            .unwrap()
    };
    let mut first = spawn_consumer(&url, "same");
    let deadline = Instant::now() + Duration::from_secs(30);
    while handled().await == 0 {
        assert!(Instant::now() < deadline, "the first process made no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let at_kill = handled().await;
    assert!(at_kill < BACKLOG, "killed while messages were flowing");

    let mut restarted = spawn_consumer(&url, "same");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pending = group_pending(&conn).await;
        if handled().await == BACKLOG && pending == 0 {
            break;
        }
        assert!(
            restarted.try_wait().unwrap().is_none(),
            "the restarted process exited (refused its own name?)"
        );
        assert!(
            Instant::now() < deadline,
            "not finished: {} of {BACKLOG} handled, {pending} pending",
            handled().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    restarted.kill().unwrap();
    restarted.wait().unwrap();
}

/// Polls `done` until it holds (bounded).
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A consumer paused (SIGSTOP) past its lease, whose name another process took meanwhile,
/// does not stay up doing nothing once resumed: its router stops with an error and the
/// process exits (non-zero), for its supervisor to restart it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_lost_its_lease_while_paused_exits() {
    let server = RedisServer::start();
    let url = server.url();
    let conn = RedisConnection::new(&url).unwrap();
    let publisher = RedisBackend::with_connection(conn.clone()).publisher();
    let messages = (0..200u64).map(|n| Message::new("n", &n).unwrap()).collect();
    publisher.publish_batch(STREAM, messages).await.unwrap();
    let holder = || {
        let reply = server.command_lines("GET streamwise:lease:{work}:workers:paused", 1);
        if reply[0] == "$-1" {
            None
        } else {
            Some(
                server
                    .command_lines("GET streamwise:lease:{work}:workers:paused", 2)
                    .remove(1),
            )
        }
    };

    let mut paused = consumer_command(&url, "paused")
        .env("STREAMWISE_CRASH_MODE", "run")
        .spawn()
        .unwrap();
    wait_until("the first process to take its lease", || holder().is_some()).await;
    let first_holder = holder();
    signal(&paused, "STOP");
    // Its lease (1 s) runs out; a second process of the same name takes it over.
    let mut second = spawn_consumer(&url, "paused");
    wait_until("the second process to hold the name", || {
        holder().is_some_and(|h| Some(&h) != first_holder.as_ref())
    })
    .await;
    signal(&paused, "CONT");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = paused.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the resumed process stayed up without its lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(3), "the router returned an error: {status:?}");
    assert!(
        second.try_wait().unwrap().is_none(),
        "the new holder keeps running"
    );
    second.kill().unwrap();
    second.wait().unwrap();
}

/// SIGTERM to a router whose Redis stopped answering (SIGSTOP): the process exits within its
/// shutdown deadline, flush included, and reports the handlers it abandoned and the acks it
/// could not write (their entries stay pending and come back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_when_redis_stops_answering() {
    let server = RedisServer::start();
    let url = server.url();
    let conn = RedisConnection::new(&url).unwrap();
    let publisher = RedisBackend::with_connection(conn.clone()).publisher();
    let messages = (0..20_000u64).map(|n| Message::new("n", &n).unwrap()).collect();
    publisher.publish_batch(STREAM, messages).await.unwrap();
    let mut child = consumer_command(&url, "frozen")
        .env("STREAMWISE_CRASH_MODE", "run")
        .env("STREAMWISE_CRASH_DEADLINE_MS", "2000")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let handled = || async {
        conn.command::<u64>(&cmd("HLEN").arg(HANDLED).clone())
            .await
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while handled().await < 500 {
        assert!(Instant::now() < deadline, "the consumer made no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.freeze();
    signal(&child, "TERM");
    let asked = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(10),
            "shutdown with a 2 s deadline is still running after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = asked.elapsed();
    server.thaw();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{status:?}: {stderr}");
    // The 2 s deadline, plus the process's own start-up of the signal handling and exit.
    assert!(took < Duration::from_secs(4), "shutdown took {took:?}: {stderr}");
    let count = |name: &str| -> u64 {
        stderr
            .split(&format!("{name}: "))
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {name} count in the report: {stderr}"))
    };
    // The handlers write to Redis too: the freeze leaves them hanging (abandoned) or their
    // acks unwritten (unflushed), depending on where it caught them; never nothing.
    assert!(
        count("abandoned") + count("unflushed") > 0,
        "the report says what the frozen server cut off: {stderr}"
    );
}
