//! Retention that keeps its promise (issue 20): a quiet stream is trimmed by its settings, by
//! one of three processes (this test binary run again: `retention_process_entry_point`);
//! safe trims never remove what a group still needs, and a group idle past its age stops
//! holding them back.

mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;
use streamwise::redis::admin::{self, StreamSettings};
use streamwise::redis::client::cmd;
use streamwise::redis::retention::{Retention, TrimPolicy, trim};
use streamwise::redis::{RedisBackend, RedisConnection};
use streamwise::{Message, Publisher, SubscribeOptions, Subscriber};

use common::{RedisServer, hold_three};

async fn len(conn: &RedisConnection, stream: &str) -> u64 {
    conn.command(cmd("XLEN").arg(stream)).await.unwrap()
}

/// Waits until every consumer of `group` has been idle longer than `age`.
async fn idle_past(conn: &RedisConnection, stream: &str, group: &str, age: Duration) {
    let since = Instant::now();
    loop {
        let consumers = admin::consumers(conn, stream, group, Duration::MAX)
            .await
            .unwrap();
        if consumers.iter().all(|c| u128::from(c.idle_ms) > age.as_millis()) {
            return;
        }
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "{group} never idled past {age:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Not a test of its own: the body of the retention processes the test below starts. A
/// `Retention` task with its defaults (each stream at most once a second), printing `ready`,
/// then `stats <trims> <removed>` whenever its counts grow.
#[test]
fn retention_process_entry_point() {
    let Ok(url) = std::env::var("STREAMWISE_RETENTION_URL") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let task = Retention::new(RedisConnection::new(&url).expect("url")).spawn();
        println!("ready");
        let mut reported = (0, 0);
        loop {
            let counts = (task.stats().trims(), task.stats().removed());
            if counts != reported {
                reported = counts;
                println!("stats {} {}", counts.0, counts.1);
            }
            std::io::Write::flush(&mut std::io::stdout()).expect("flush");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
}

/// A retention process: this test binary run again with `STREAMWISE_RETENTION_URL` set; each
/// line it prints is sent on with the process's number. Killed on drop.
struct RetentionProcess(std::process::Child);

impl RetentionProcess {
    fn start(url: &str, number: usize, lines: tokio::sync::mpsc::UnboundedSender<(usize, String)>) -> Self {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "retention_process_entry_point",
                "--exact",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("STREAMWISE_RETENTION_URL", url)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("a retention process");
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                // The test harness's own `test ... ` may come first on the line.
                let line = line.rsplit("... ").next().unwrap_or_default().trim_end();
                if lines.send((number, line.to_owned())).is_err() {
                    return;
                }
            }
        });
        RetentionProcess(child)
    }
}

impl Drop for RetentionProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_stream_is_trimmed_by_its_retention_by_one_of_three_processes() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let conn = backend.connection().clone();
    let settings = StreamSettings {
        retention_ms: Some(2_000),
        max_length: None,
    };
    admin::create_stream(&conn, "quiet", settings).await.unwrap();
    let publisher = backend.publisher();
    // One batch: the entries age together, so one trim takes them all.
    let batch = (0..10).map(|n| Message::new("t", &n).unwrap()).collect();
    publisher.publish_batch("quiet", batch).await.unwrap();
    let published = Instant::now();
    let (lines, mut from_processes) = tokio::sync::mpsc::unbounded_channel();
    let _processes: Vec<_> = (0..3)
        .map(|number| RetentionProcess::start(&server.url(), number, lines.clone()))
        .collect();
    let mut removed = [0u64; 3];
    let mut trims = [0u64; 3];
    let mut ready = 0;
    // Trimmed within a few seconds of the entries' age passing 2 s: the next round of a task
    // (each stream at most once a second, jittered by up to a fifth) after they aged, and the
    // processes' start.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    while ready < 3 || removed.iter().sum::<u64>() < 10 {
        let (number, line) = tokio::time::timeout_at(deadline, from_processes.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("not trimmed 6 s after the publish: {ready} ready, removed {removed:?}")
            })
            .expect("the processes' output");
        match line.split(' ').collect::<Vec<_>>()[..] {
            ["stats", t, r] => {
                trims[number] = t.parse().unwrap();
                removed[number] = r.parse().unwrap();
            }
            ["ready"] => ready += 1,
            _ => {}
        }
    }
    let took = published.elapsed();
    eprintln!(
        "trimmed {took:?} after the last publish (retention 2 s): removed {removed:?}, trims {trims:?}"
    );
    assert!(
        took >= Duration::from_millis(1_900),
        "trimmed after {took:?}, before the entries aged"
    );
    assert_eq!(len(&conn, "quiet").await, 0);
    assert_eq!(
        removed.iter().filter(|r| **r > 0).count(),
        1,
        "one process trimmed: {removed:?}"
    );
    // The stream's trim lease (one interval long) lets one trim through per second between
    // the three: not the three a second that three processes without it would make.
    let seconds = took.as_secs_f64().ceil() as u64;
    assert!(
        trims.iter().sum::<u64>() <= seconds + 1,
        "{trims:?} trims in {took:?}: the processes multiplied the work"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_safe_trim_keeps_what_groups_need_until_they_idle_past_their_age() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let conn = backend.connection().clone();
    let publisher = backend.publisher();
    for n in 0..20 {
        publisher
            .publish("needed", Message::new("t", &n).unwrap())
            .await
            .unwrap();
    }
    // A group with a live consumer that has read nothing yet (it lags behind everything) ...
    let subscriber = backend.subscriber().unwrap();
    let lagging = subscriber
        .subscribe("needed", SubscribeOptions::new("lagging", "w1"))
        .await
        .unwrap();
    // ... and a group of another client holding the first three entries pending.
    hold_three(&conn, "needed").await;
    let by_length = TrimPolicy::default().max_length(5);
    let by_time = TrimPolicy::default().retention(Duration::ZERO);
    for policy in [&by_length, &by_time] {
        let trimmed = trim(&conn, "needed", policy).await.unwrap();
        assert_eq!(trimmed.removed, 0, "{policy:?}");
        assert!(trimmed.held_back);
    }
    assert_eq!(len(&conn, "needed").await, 20);

    // The lagging group reads and acknowledges everything: the pending three still hold.
    let mut lagging = lagging;
    for _ in 0..20 {
        lagging.next().await.unwrap().unwrap().ack().await.unwrap();
    }
    lagging.flush().await.unwrap();
    let trimmed = trim(&conn, "needed", &by_length).await.unwrap();
    assert_eq!((trimmed.removed, trimmed.held_back), (0, true));

    // Once the holding group's consumer idles past the age, it no longer holds back.
    let age = Duration::from_millis(300);
    idle_past(&conn, "needed", "holding", age).await;
    let trimmed = trim(&conn, "needed", &by_length.clone().idle_group_age(age))
        .await
        .unwrap();
    // (The other group may have idled that long too: it needs nothing any more.)
    assert!(
        trimmed.idle_groups.iter().any(|g| g == "holding"),
        "{:?}",
        trimmed.idle_groups
    );
    assert_eq!(trimmed.removed, 15);
    assert_eq!(len(&conn, "needed").await, 5);
    // Unsafe (the seed's time and length limits): whatever groups need.
    publisher
        .publish("needed", Message::new("t", &20).unwrap())
        .await
        .unwrap();
    let trimmed = trim(&conn, "needed", &by_length.clone().safe(false))
        .await
        .unwrap();
    assert_eq!(trimmed.removed, 1);
    drop(lagging);
    subscriber.close().await.unwrap();
}

/// The background task counts what it did: a trim a group held back, then, once the group's
/// consumer idled past the task's age, the group passed over (and the trim done).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_task_counts_held_back_trims_and_the_idle_groups_it_passes_over() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let conn = backend.connection().clone();
    let settings = StreamSettings {
        retention_ms: None,
        max_length: Some(2),
    };
    admin::create_stream(&conn, "counted", settings).await.unwrap();
    let batch = (0..5).map(|n| Message::new("t", &n).unwrap()).collect();
    backend.publisher().publish_batch("counted", batch).await.unwrap();
    hold_three(&conn, "counted").await;
    let patient = Retention::new(RedisConnection::new(&server.url()).unwrap())
        .interval(Duration::from_millis(50))
        .spawn();
    let since = Instant::now();
    while patient.stats().held_back() == 0 {
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "no held-back trim counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(patient.stats().idle_groups_ignored(), 0);
    assert_eq!(patient.stats().removed(), 0);
    assert_eq!(len(&conn, "counted").await, 5);
    patient.stop().await;

    // The holding group's one consumer idles past 100 ms: a task with that age passes it over.
    let age = Duration::from_millis(100);
    idle_past(&conn, "counted", "holding", age).await;
    let lenient = Retention::new(RedisConnection::new(&server.url()).unwrap())
        .interval(Duration::from_millis(50))
        .idle_group_age(age)
        .spawn();
    let since = Instant::now();
    // Both counts, which a round adds one after the other.
    while lenient.stats().removed() < 3 || lenient.stats().idle_groups_ignored() == 0 {
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "the idle group still held back, or was not counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(len(&conn, "counted").await, 2);
    lenient.stop().await;
}

/// The seed facade: the configuration's `retention:` section starts the task, which trims a
/// quiet stream made by `StreamManager::create_stream`; `apply_retention` trims one stream
/// now, safely unless told otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_facade_and_its_configuration_run_retention() {
    use streamwise::redis_streams::{
        Config, ConsumerGroupManager, RetentionOptions, StreamManager, StreamOptions,
    };
    let server = RedisServer::start();
    let url = server.url();
    let manager = StreamManager::new(&url).unwrap();
    let conn = RedisConnection::new(&url).unwrap();
    let publisher = RedisBackend::new(&url).unwrap().publisher();
    let aging = StreamOptions {
        retention_ms: Some(500),
        max_length: None,
    };
    for stream in ["quiet", "held"] {
        manager.create_stream(stream, aging).await.unwrap();
        let batch = (0..5).map(|n| Message::new("t", &n).unwrap()).collect();
        publisher.publish_batch(stream, batch).await.unwrap();
    }

    // Disabled by default: nothing is started.
    let off = Config::from_yaml_str("redis_streams:\n  retention:\n    interval_ms: 100\n").unwrap();
    assert!(off.start_retention().unwrap().is_none());

    // `held` has a group holding all five entries pending: a safe trim leaves them.
    let groups = ConsumerGroupManager::new(&url).unwrap();
    groups.create_group("held", "g", "0").await.unwrap();
    let _: redis::Value = conn
        .command(
            cmd("XREADGROUP")
                .arg("GROUP")
                .arg("g")
                .arg("c")
                .arg("STREAMS")
                .arg("held")
                .arg(">"),
        )
        .await
        .unwrap();

    let yaml =
        format!("redis_streams:\n  url: {url}\n  retention:\n    enabled: true\n    interval_ms: 100\n");
    let task = Config::from_yaml_str(&yaml)
        .unwrap()
        .start_retention()
        .unwrap()
        .expect("enabled");
    let started = Instant::now();
    while len(&conn, "quiet").await > 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "never trimmed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Trims of `held` ran meanwhile and were held back; the task counts a trim a moment after
    // the stream emptied, so its count is awaited too.
    while task.stats().held_back() == 0 || task.stats().removed() < 5 {
        assert!(started.elapsed() < Duration::from_secs(10), "held was not tried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(len(&conn, "held").await, 5);
    assert_eq!(task.stats().removed(), 5);
    task.stop().await;

    let safe = manager
        .apply_retention("held", RetentionOptions::default())
        .await
        .unwrap();
    assert!(safe.held_back && safe.removed == 0, "{safe:?}");
    let unsafe_trim = RetentionOptions {
        safe: false,
        ..RetentionOptions::default()
    };
    let forced = manager.apply_retention("held", unsafe_trim).await.unwrap();
    assert_eq!(forced.removed, 5, "{forced:?}");
    let bad = RetentionOptions {
        interval_ms: 10,
        ..RetentionOptions::default()
    };
    assert_eq!(
        manager.start_retention(bad).unwrap_err().invalid_field(),
        Some("interval_ms")
    );
}
