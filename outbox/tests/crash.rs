//! Crashes: the relay process is killed with SIGKILL 20 times at random points while writers
//! commit rows into the outbox; the next relays resume. Nothing is lost (every row reaches
//! Redis), each topic keeps its order (a resent run repeats rows already sent, never
//! reorders them), and a consumer behind an [`InboxLayer`] applies each message's effect
//! exactly once, duplicates included.
//!
//! The relay process is this test binary run again with `STREAMWISE_OUTBOX_CRASH_PG` set (see
//! [`relay_process_entry_point`]). `STREAMWISE_OUTBOX_CRASH_ROWS` sets the number of rows
//! (default 20,000; the run is 100,000).
//!
//! And the consumer: a router with an [`InboxLayer`] in processes killed with SIGKILL 20
//! times while they work through a Redis stream (the next ones take the killed ones' entries
//! over): each message's effect, and the follow-up event it writes through the outbox, is
//! there exactly once ([`consumer_process_entry_point`]).

mod common;

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use streamwise::codec::{Codec, JsonCodec};
use streamwise::redis::client::cmd;
use streamwise::redis::{RedisBackend, RedisConnection, admin};
use streamwise::redis::{RedisSubscriber, RedisSubscriberOptions};
use streamwise::router::{Handler, Json, Outcome, Router, Routes};
use streamwise::testing::RedisServer;
use streamwise::{Message, Publisher, ReclaimOptions, SubscribeOptions, Uuid};
use streamwise_outbox::tokio_postgres::{self, NoTls};
use streamwise_outbox::{InboxLayer, InboxTx, Outbox, Relay, RelayOptions};

use common::{count, database, wait_for};

const TOPICS: [&str; 4] = ["crash0", "crash1", "crash2", "crash3"];
const KILLS: u32 = 20;
const WRITERS: usize = 4;
/// Rows per writer transaction.
const PER_TX: usize = 50;

fn rows() -> usize {
    std::env::var("STREAMWISE_OUTBOX_CRASH_ROWS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000)
}

fn relay_options() -> RelayOptions {
    RelayOptions::default()
        .batch_size(100)
        .poll_interval(Duration::from_millis(50))
        .retention(None)
}

fn pg_config(port: u16) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .dbname("postgres");
    config
}

/// Not a test of its own: the body of the relay processes that
/// [`twenty_sigkills_of_the_relay_lose_nothing_and_the_inbox_removes_the_duplicates`]
/// starts and kills. Without `STREAMWISE_OUTBOX_CRASH_PG` it does nothing.
#[test]
fn relay_process_entry_point() {
    let (Ok(port), Ok(url)) = (
        std::env::var("STREAMWISE_OUTBOX_CRASH_PG"),
        std::env::var("STREAMWISE_OUTBOX_CRASH_REDIS"),
    ) else {
        return;
    };
    let port: u16 = port.parse().expect("port");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let publisher = RedisBackend::with_connection(RedisConnection::new(&url).expect("url")).publisher();
        let _relay = Relay::new(pg_config(port), NoTls, Arc::new(publisher))
            .options(relay_options())
            .start()
            .expect("relay");
        // Until killed.
        std::future::pending::<()>().await;
    });
}

fn spawn_relay(pg_port: u16, redis_url: &str) -> Child {
    Command::new(std::env::current_exe().expect("own path"))
        .args([
            "relay_process_entry_point",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("STREAMWISE_OUTBOX_CRASH_PG", pg_port.to_string())
        .env("STREAMWISE_OUTBOX_CRASH_REDIS", redis_url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a relay process")
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

/// Every message of `topic` in Redis, in stream order, read a page at a time.
async fn stream_uuids(conn: &RedisConnection, topic: &str) -> Vec<Uuid> {
    let mut uuids = Vec::new();
    let mut from = "-".to_owned();
    loop {
        let page = admin::range(conn, topic, &from, "+", 10_000, false)
            .await
            .unwrap();
        let Some(last) = page.last() else { return uuids };
        from = format!("({}", last.id);
        for entry in page {
            uuids.push(JsonCodec.decode(entry).unwrap().uuid());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sigkills_of_the_relay_lose_nothing_and_the_inbox_removes_the_duplicates() {
    let rows = rows();
    let started = Instant::now();
    let (pg, client) = database().await;
    client
        .batch_execute("CREATE TABLE effects (n int PRIMARY KEY, times int NOT NULL)")
        .await
        .unwrap();
    let redis = RedisServer::start();
    let redis_url = redis.url();
    let conn = RedisConnection::new(&redis_url).unwrap();

    // The writers commit their rows while relays come and go.
    let pool = pg.pool(WRITERS);
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let pool = pool.clone();
        writers.push(tokio::spawn(async move {
            let outbox = Outbox::new();
            let mut client = pool.get().await.unwrap();
            let mine: Vec<usize> = (w..rows).step_by(WRITERS).collect();
            for chunk in mine.chunks(PER_TX) {
                let tx = client.transaction().await.unwrap();
                for &n in chunk {
                    let message = Message::new("n", &n).unwrap();
                    outbox
                        .publish(&*tx, TOPICS[n % TOPICS.len()], &message)
                        .await
                        .unwrap();
                }
                tx.commit().await.unwrap();
            }
        }));
    }

    let sent = "SELECT count(*) FROM streamwise_outbox WHERE sent_at IS NOT NULL";
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Each relay is killed after it sent its share of the rows, give or take (a random point
    // in the second half of the share, then up to 20 ms more): the kills spread over the whole
    // run, and the last share is left to the relay that finishes.
    let share = (rows / (KILLS as usize + 1)) as u64;
    for kill in 0..KILLS {
        let before = count(&client, sent).await;
        let target = (before + (share / 2 + rng.below(share / 2 + 1)) as i64).min(rows as i64 - 1);
        let mut child = spawn_relay(pg.port(), &redis_url);
        let deadline = Instant::now() + Duration::from_secs(120);
        while count(&client, sent).await < target {
            assert!(
                Instant::now() < deadline,
                "relay {kill} did not send its share in 120 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.below(20))).await;
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let killed_at = count(&client, sent).await;

    // The next relay resumes and finishes.
    let publisher = RedisBackend::with_connection(conn.clone()).publisher();
    let relay = Relay::new(pg.config(), NoTls, Arc::new(publisher))
        .options(relay_options())
        .start()
        .unwrap();
    wait_for("every row sent", Duration::from_secs(300), || async {
        count(
            &client,
            "SELECT count(*) FROM streamwise_outbox WHERE sent_at IS NULL",
        )
        .await
            == 0
    })
    .await;
    relay.stop().await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM streamwise_outbox").await as usize,
        rows
    );

    // Nothing lost, order kept: a topic's stream, duplicates aside, is its rows in id order.
    let mut in_redis = 0;
    for topic in TOPICS {
        let expected: Vec<Uuid> = client
            .query(
                "SELECT message_uuid FROM streamwise_outbox WHERE topic = $1 ORDER BY id",
                &[&topic],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let got = stream_uuids(&conn, topic).await;
        in_redis += got.len();
        let mut seen = HashSet::new();
        let firsts: Vec<Uuid> = got.iter().copied().filter(|u| seen.insert(*u)).collect();
        assert_eq!(firsts.len(), expected.len(), "{topic}: a row is missing in Redis");
        assert!(firsts == expected, "{topic}: out of order");
    }
    let duplicates = in_redis - rows;
    // Not asserted above 0: a kill lands between a batch's publish and its mark only now and
    // then (50 and 200 rows resent in two runs of 20,000, 400 in one of 100,000: one to eight
    // batches of twenty kills). `tests/outbox.rs` `a_row_sent_again_after_a_lost_mark_is_the_same_message`
    // and `tests/inbox.rs` make the duplicate on purpose.

    // A consumer with the inbox: each effect once, duplicates skipped.
    async fn apply(Json(n): Json<i32>, tx: InboxTx) -> Result<(), streamwise_outbox::Error> {
        tx.execute(
            "INSERT INTO effects (n, times) VALUES ($1, 1) ON CONFLICT (n) DO UPDATE SET times = effects.times + 1",
            &[&n],
        )
        .await?;
        Ok(())
    }
    let completed = Arc::new(AtomicUsize::new(0));
    let done = completed.clone();
    let inbox = InboxLayer::new(pg.pool(32));
    let mut router = Router::new();
    for topic in TOPICS {
        let done = done.clone();
        let routes =
            Routes::new()
                .route("n", apply.layer(inbox.clone()))
                .layer(tower::util::MapResponseLayer::new(move |outcome: Outcome| {
                    done.fetch_add(1, Ordering::SeqCst);
                    outcome
                }));
        router = router.subscribe(
            topic,
            SubscribeOptions::new("effects", "worker-1").max_in_flight(32),
            routes,
        );
    }
    let backend = RedisBackend::with_connection(conn.clone());
    let running = router
        .start(
            Arc::new(backend.subscriber().unwrap()),
            Arc::new(backend.publisher()),
        )
        .await
        .unwrap();
    wait_for("every delivery handled", Duration::from_secs(300), || async {
        completed.load(Ordering::SeqCst) >= in_redis
    })
    .await;
    running.shutdown().await.unwrap();
    assert_eq!(
        count(&client, "SELECT count(*) FROM effects").await as usize,
        rows,
        "every effect"
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM effects WHERE times <> 1").await,
        0,
        "no effect twice"
    );
    println!(
        "{rows} rows, {KILLS} relay SIGKILLs ({killed_at} sent by the killed relays), \
         {duplicates} resent after a kill and skipped by the inbox; {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

const CONSUMED: &str = "consumed";

/// The consumer's handler: the effect and a follow-up event, in the delivery's transaction.
async fn count_once(Json(n): Json<i32>, tx: InboxTx) -> Result<(), streamwise_outbox::Error> {
    // Some work first, as real handlers do: a kill often lands in the middle of it.
    tokio::time::sleep(Duration::from_millis(1)).await;
    tx.execute(
        "INSERT INTO effects (n, times) VALUES ($1, 1) ON CONFLICT (n) DO UPDATE SET times = effects.times + 1",
        &[&n],
    )
    .await?;
    tx.publish("receipts", &Message::new("receipt", &n)?).await?;
    Ok(())
}

/// The consumer as the processes and the final in-process run build it: short leases, so a
/// killed process counts as crashed after a second and its entries are taken over.
async fn consumer_router(
    pg_port: u16,
    redis_url: &str,
    name: &str,
) -> (Router, Arc<RedisSubscriber>, Arc<dyn Publisher>) {
    let conn = RedisConnection::new(redis_url).expect("url");
    let subscriber = RedisSubscriber::new(
        conn.clone(),
        RedisSubscriberOptions::default().lease_ttl(Duration::from_secs(1)),
    )
    .expect("subscriber");
    let pool = streamwise_outbox::deadpool_postgres::Pool::builder(
        streamwise_outbox::deadpool_postgres::Manager::new(pg_config(pg_port), NoTls),
    )
    .max_size(16)
    .build()
    .expect("pool");
    let routes = Routes::new().route("n", count_once.layer(InboxLayer::new(pool)));
    let options = SubscribeOptions::new("counters", name)
        .max_in_flight(16)
        .batch_size(16)
        .block(Duration::from_millis(200))
        .max_deliveries(1000)
        .reclaim(ReclaimOptions::new(
            Duration::from_millis(200),
            Duration::from_secs(30),
        ));
    let router = Router::new().subscribe(CONSUMED, options, routes);
    let publisher: Arc<dyn Publisher> = Arc::new(RedisBackend::with_connection(conn).publisher());
    (router, Arc::new(subscriber), publisher)
}

/// Not a test of its own: the body of the consumer processes that
/// [`twenty_sigkills_of_the_inbox_consumer_apply_each_effect_once`] starts and kills.
/// Without `STREAMWISE_OUTBOX_CONSUMER_PG` it does nothing.
#[test]
fn consumer_process_entry_point() {
    let (Ok(port), Ok(url), Ok(name)) = (
        std::env::var("STREAMWISE_OUTBOX_CONSUMER_PG"),
        std::env::var("STREAMWISE_OUTBOX_CONSUMER_REDIS"),
        std::env::var("STREAMWISE_OUTBOX_CONSUMER_NAME"),
    ) else {
        return;
    };
    let port: u16 = port.parse().expect("port");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let (router, subscriber, publisher) = consumer_router(port, &url, &name).await;
        let _running = router.start(subscriber, publisher).await.expect("router");
        // Until killed.
        std::future::pending::<()>().await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sigkills_of_the_inbox_consumer_apply_each_effect_once() {
    let messages = rows();
    let started = Instant::now();
    let (pg, client) = database().await;
    client
        .batch_execute("CREATE TABLE effects (n int PRIMARY KEY, times int NOT NULL)")
        .await
        .unwrap();
    let redis = RedisServer::start();
    let redis_url = redis.url();
    let conn = RedisConnection::new(&redis_url).unwrap();
    let publisher = RedisBackend::with_connection(conn.clone()).publisher();
    for chunk in (0..messages).collect::<Vec<_>>().chunks(1000) {
        let batch = chunk.iter().map(|&n| Message::new("n", &n).unwrap()).collect();
        publisher.publish_batch(CONSUMED, batch).await.unwrap();
    }

    let effects = "SELECT count(*) FROM effects";
    let share = (messages / (KILLS as usize + 1)) as u64;
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for kill in 0..KILLS {
        let before = count(&client, effects).await;
        let target = (before + (share / 2 + rng.below(share / 2 + 1)) as i64).min(messages as i64 - 1);
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .args([
                "consumer_process_entry_point",
                "--exact",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("STREAMWISE_OUTBOX_CONSUMER_PG", pg.port().to_string())
            .env("STREAMWISE_OUTBOX_CONSUMER_REDIS", &redis_url)
            .env("STREAMWISE_OUTBOX_CONSUMER_NAME", format!("consumer-{kill}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a consumer process");
        let deadline = Instant::now() + Duration::from_secs(120);
        while count(&client, effects).await < target {
            assert!(
                Instant::now() < deadline,
                "consumer {kill} did not get through its share in 120 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.below(20))).await;
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }
    let killed_at = count(&client, effects).await;

    // The last consumer finishes, taking over what the killed ones held.
    let (router, subscriber, publisher) = consumer_router(pg.port(), &redis_url, "consumer-last").await;
    let running = router.start(subscriber, publisher).await.unwrap();
    wait_for(
        "every message handled and acknowledged",
        Duration::from_secs(300),
        || async {
            let pending: Vec<streamwise::redis::client::Value> = conn
                .command(cmd("XPENDING").arg(CONSUMED).arg("counters"))
                .await
                .unwrap();
            let pending = matches!(pending.first(), Some(streamwise::redis::client::Value::Int(0)));
            pending && count(&client, effects).await as usize == messages
        },
    )
    .await;
    running.shutdown().await.unwrap();
    assert_eq!(count(&client, effects).await as usize, messages, "every effect");
    assert_eq!(
        count(&client, "SELECT count(*) FROM effects WHERE times <> 1").await,
        0,
        "no effect twice"
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM streamwise_outbox WHERE topic = 'receipts'"
        )
        .await as usize,
        messages,
        "every follow-up event once"
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(DISTINCT message_uuid) FROM streamwise_inbox"
        )
        .await as usize,
        messages
    );
    println!(
        "{messages} messages, {KILLS} consumer SIGKILLs ({killed_at} effects by the killed consumers); {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
