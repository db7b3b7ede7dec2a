//! The outbox and inbox rows of BENCHMARKS.md (run by `scripts/bench`, or
//! `cargo bench -p streamwise-outbox --bench outbox`): on a private PostgreSQL and a private
//! Redis it starts, each workload beside its baseline in the same run:
//!
//! - a plain publish to Redis, awaited one at a time, beside a transaction (one insert and the
//!   commit) without and with an outbox publish in it;
//! - the relay moving a backlog of rows to Redis;
//! - a router handler writing one row, without and with the inbox around it (memory backend).
//!
//! Rates are per second of wall time; CPU is this process's (the client: streamwise, tokio-
//! postgres, the runtime), not the servers'. `BENCH_OUTBOX_N` sets the count per workload
//! (default 5,000; the relay moves four times as many); `BENCH_ONLY=<substring>` runs only
//! the workloads whose name holds it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use streamwise::memory::MemoryBackend;
use streamwise::redis::{RedisBackend, RedisConnection};
use streamwise::router::{Handler, Json, Outcome, Router, Routes, State};
use streamwise::testing::RedisServer;
use streamwise::{Message, Publisher, SubscribeOptions};
use streamwise_outbox::deadpool_postgres::Pool;
use streamwise_outbox::testing::PostgresServer;
use streamwise_outbox::tokio_postgres::NoTls;
use streamwise_outbox::{InboxLayer, InboxTx, Outbox, Relay, RelayOptions, migrate};

/// CPU time of this process (user + system), from /proc/self/stat (clock ticks of 10 ms).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which is in parentheses and may hold spaces).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line, 11 and 12 after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

struct Row {
    workload: &'static str,
    system: &'static str,
    events: usize,
    wall: Duration,
    cpu: Duration,
    latencies: Vec<Duration>,
}

impl Row {
    fn print(&self) {
        let rate = self.events as f64 / self.wall.as_secs_f64();
        let cpu_us = self.cpu.as_secs_f64() * 1e6 / self.events as f64;
        let (p50, p99) = if self.latencies.is_empty() {
            ("-".to_owned(), "-".to_owned())
        } else {
            let mut l = self.latencies.clone();
            l.sort();
            let at = |q: f64| {
                l[((l.len() as f64 * q) as usize).min(l.len() - 1)]
                    .as_micros()
                    .to_string()
            };
            (at(0.50), at(0.99))
        };
        println!(
            "{:<36} {:<34} {:>9.0} {:>7} {:>7} {:>9.1}",
            self.workload, self.system, rate, p50, p99, cpu_us
        );
    }
}

fn wanted(workload: &str) -> bool {
    std::env::var("BENCH_ONLY").map_or(true, |only| workload.contains(&only))
}

/// Times a loop of awaited operations: the wall time, this process's CPU and each latency.
struct Timing {
    cpu: Duration,
    wall: Instant,
    latencies: Vec<Duration>,
}

impl Timing {
    fn start(events: usize) -> Self {
        Timing {
            cpu: cpu_time(),
            wall: Instant::now(),
            latencies: Vec::with_capacity(events),
        }
    }

    fn lap(&mut self, since: Instant) {
        self.latencies.push(since.elapsed());
    }

    fn row(self, workload: &'static str, system: &'static str) -> Row {
        Row {
            workload,
            system,
            events: self.latencies.len(),
            wall: self.wall.elapsed(),
            cpu: cpu_time() - self.cpu,
            latencies: self.latencies,
        }
    }
}

async fn handler_plain(Json(n): Json<i32>, State(pool): State<Pool>) -> Result<(), streamwise_outbox::Error> {
    let client = pool.get().await?;
    client
        .execute("INSERT INTO handled (n) VALUES ($1)", &[&n])
        .await?;
    Ok(())
}

async fn handler_inbox(Json(n): Json<i32>, tx: InboxTx) -> Result<(), streamwise_outbox::Error> {
    tx.execute("INSERT INTO handled (n) VALUES ($1)", &[&n]).await?;
    Ok(())
}

/// Runs `events` deliveries through a router with `routes` on the memory backend; returns the
/// row once every delivery finished.
async fn run_router(
    workload: &'static str,
    system: &'static str,
    events: usize,
    routes: Routes<Pool>,
    pool: Pool,
    done: Arc<AtomicUsize>,
) -> Row {
    let backend = MemoryBackend::new();
    let publisher = backend.publisher();
    for chunk in (0..events).collect::<Vec<_>>().chunks(1000) {
        let batch = chunk.iter().map(|&n| Message::new("n", &n).unwrap()).collect();
        publisher.publish_batch("bench", batch).await.unwrap();
    }
    let router = Router::with_state(pool).subscribe(
        "bench",
        SubscribeOptions::new("bench", "worker-1").max_in_flight(16),
        routes,
    );
    let (cpu, wall) = (cpu_time(), Instant::now());
    let running = router
        .start(Arc::new(backend.subscriber()), Arc::new(backend.publisher()))
        .await
        .unwrap();
    while done.load(Ordering::SeqCst) < events {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let row = Row {
        workload,
        system,
        events,
        wall: wall.elapsed(),
        cpu: cpu_time() - cpu,
        latencies: Vec::new(),
    };
    running.shutdown().await.unwrap();
    row
}

fn counting(done: Arc<AtomicUsize>) -> tower::util::MapResponseLayer<impl Fn(Outcome) -> Outcome + Clone> {
    tower::util::MapResponseLayer::new(move |outcome: Outcome| {
        done.fetch_add(1, Ordering::SeqCst);
        outcome
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("BENCH_OUTBOX_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let pg = PostgresServer::start().expect("a private PostgreSQL");
    let redis = RedisServer::start();
    let mut client = pg.connect().await.unwrap();
    migrate(&mut client).await.unwrap();
    client
        .batch_execute("CREATE TABLE orders (n int); CREATE TABLE handled (n int)")
        .await
        .unwrap();
    let conn = RedisConnection::new(&redis.url()).unwrap();
    let redis_publisher = Arc::new(RedisBackend::with_connection(conn).publisher());
    println!(
        "PostgreSQL {} (fsync off), redis-server on loopback, {n} events per row",
        pg.port()
    );
    println!(
        "{:<36} {:<34} {:>9} {:>7} {:>7} {:>9}",
        "workload", "system", "events/s", "p50 us", "p99 us", "cpu us/ev"
    );

    if wanted("publish") {
        let message = Message::new("order.placed", &serde_json::json!({"id": 1, "total": 1999})).unwrap();
        let mut timing = Timing::start(n);
        for _ in 0..n {
            let t = Instant::now();
            redis_publisher.publish("plain", message.clone()).await.unwrap();
            timing.lap(t);
        }
        timing.row("publish awaited", "plain publish (Redis)").print();

        let mut timing = Timing::start(n);
        for i in 0..n {
            let t = Instant::now();
            let tx = client.transaction().await.unwrap();
            tx.execute("INSERT INTO orders (n) VALUES ($1)", &[&(i as i32)])
                .await
                .unwrap();
            tx.commit().await.unwrap();
            timing.lap(t);
        }
        timing
            .row("publish awaited", "tx: insert + commit, no event")
            .print();

        let outbox = Outbox::new();
        let mut timing = Timing::start(n);
        for i in 0..n {
            let t = Instant::now();
            let tx = client.transaction().await.unwrap();
            tx.execute("INSERT INTO orders (n) VALUES ($1)", &[&(i as i32)])
                .await
                .unwrap();
            outbox.publish(&tx, "relayed", &message).await.unwrap();
            tx.commit().await.unwrap();
            timing.lap(t);
        }
        timing
            .row("publish awaited", "tx: insert + outbox publish + commit")
            .print();
    }

    if wanted("relay") {
        client.batch_execute("TRUNCATE streamwise_outbox").await.unwrap();
        let outbox = Outbox::new().notify(false);
        let message = Message::new("order.placed", &serde_json::json!({"id": 1, "total": 1999})).unwrap();
        let backlog = 4 * n;
        for chunk in (0..backlog).collect::<Vec<_>>().chunks(500) {
            let tx = client.transaction().await.unwrap();
            for _ in chunk {
                outbox
                    .publish(
                        &tx,
                        "backlog",
                        &message.clone().with_uuid(streamwise::Uuid::now_v7()),
                    )
                    .await
                    .unwrap();
            }
            tx.commit().await.unwrap();
        }
        let relay = Relay::new(pg.config(), NoTls, redis_publisher.clone())
            .options(RelayOptions::default().batch_size(100));
        let (cpu, wall) = (cpu_time(), Instant::now());
        let sent = relay.drain().await.unwrap() as usize;
        assert_eq!(sent, backlog);
        Row {
            workload: "relay a backlog to Redis",
            system: "relay, batches of 100",
            events: sent,
            wall: wall.elapsed(),
            cpu: cpu_time() - cpu,
            latencies: Vec::new(),
        }
        .print();
    }

    if wanted("inbox") {
        let pool = pg.pool(16);
        let done = Arc::new(AtomicUsize::new(0));
        let routes = Routes::with_state(pool.clone())
            .route("n", handler_plain)
            .layer(counting(done.clone()));
        run_router(
            "handler writing a row",
            "router, own connection, autocommit",
            n,
            routes,
            pool.clone(),
            done,
        )
        .await
        .print();
        let done = Arc::new(AtomicUsize::new(0));
        let routes = Routes::with_state(pool.clone())
            .route("n", handler_inbox.layer(InboxLayer::new(pool.clone())))
            .layer(counting(done.clone()));
        run_router(
            "handler writing a row",
            "router + InboxLayer (tx + record)",
            n,
            routes,
            pool,
            done,
        )
        .await
        .print();
    }
}
