//! The streamwise benchmark: every workload against the limits of this machine, measured in
//! the same run. Starts its own redis-server on a free loopback port; prints one table and one
//! JSON line per result.
//!
//! ```sh
//! cargo bench --bench streams                      # everything (a few minutes)
//! BENCH_BACKLOG=200000 cargo bench --bench streams # a smaller backlog for the consume workload
//! ```
//!
//! Rows whose system ends in `(replicated)` run the same streamwise workload on a master with
//! one replica, and `(cluster)` on a local Redis Cluster of 3 masters and 3 replicas (one
//! stream lives in one slot, so expect no speed-up on 2 cores; the client's CPU per event is
//! what to compare, the server's counts every node). `BENCH_NO_CLUSTER=1` leaves both out.
//! The partitioned rows (`(P=1)`, `(P=4)`, `(P=16)`) read with the default
//! `PartitionOptions::dedicated_readers`; `BENCH_DEDICATED_READERS=<n>` sets it.
//! `BENCH_MAX_IN_FLIGHT=<n>` sets the routers' `max_in_flight` of the consume rows (256).
//!
//! Baselines: a raw `redis` crate loop written here (XADD awaited one at a time; XREADGROUP
//! COUNT 100 + one XACK per batch), and `redis-benchmark` XADD with `-c 1 -P 1` and
//! `-c 50 -P 64` (the latter in every round, with one field and with streamwise's four).
//! Each workload runs with 1 and with 2 tokio worker threads. A run with more than
//! `BENCH_MAX_STEAL` % (5) of the machine's CPU stolen by the hypervisor is run again, at most
//! `BENCH_STEAL_RETRIES` (2) more times; the least stolen is kept (`steal_pct` in each row).

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    LatencyRouter, Pacing, Row, Spec, env, least_stolen, machine_ticks, measure, message, nothing,
    payload_of, print_table, publish_awaited, router_consume, router_end_to_end, run_child, steal_pct,
    summarize,
};
use streamwise::memory::MemoryBackend;
use streamwise::redis::RedisBackend;
use streamwise::redis::client::{self as redis_client, Value};
use streamwise::testing::{RedisCluster, RedisServer};
use streamwise::{Message, Publisher, StartFrom};

// ----------------------------------------------------------------------------- measurement

/// The server the workloads of this (child) process run against, for its CPU time.
static SERVER_URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// redis-server's CPU time so far (`used_cpu_user` + `used_cpu_sys` of `INFO cpu`); of every
/// server the workload's data lives on (`BENCH_SERVER_NODES`, set by the parent: a cluster's
/// nodes, or a master and its replica), since replicas work too.
fn server_cpu_time() -> Duration {
    let Some(url) = SERVER_URL.get() else {
        return Duration::ZERO;
    };
    let nodes: Vec<String> = match std::env::var("BENCH_SERVER_NODES") {
        Ok(list) => list.split(',').map(str::to_owned).collect(),
        Err(_) => vec![url.clone()],
    };
    nodes.iter().map(|node| cpu_time_of(node)).sum()
}

/// One redis-server's CPU time so far (`used_cpu_user` + `used_cpu_sys`); zero if unreachable.
fn cpu_time_of(node: &str) -> Duration {
    let info: String = redis_client::Client::open(node)
        .and_then(|c| c.get_connection())
        .and_then(|mut c| redis_client::cmd("INFO").arg("cpu").query(&mut c))
        .unwrap_or_default();
    let seconds = info
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| *k == "used_cpu_user" || *k == "used_cpu_sys")
        .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
        .sum::<f64>();
    Duration::from_secs_f64(seconds)
}

/// The node URLs of a `redis-cluster://` URL, `None` for another URL.
fn cluster_nodes(url: &str) -> Option<Vec<String>> {
    let rest = url.strip_prefix("redis-cluster://")?;
    let (first, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut nodes = vec![format!("redis://{first}")];
    nodes.extend(
        query
            .split('&')
            .filter_map(|p| p.strip_prefix("node="))
            .map(|n| format!("redis://{n}")),
    );
    Some(nodes)
}

// ----------------------------------------------------------------------------- redis-server

/// Empties the benchmark's server between workloads, so that each starts from nothing.
fn flush(server: &RedisServer) {
    assert_eq!(server.command("FLUSHALL"), "+OK", "FLUSHALL");
}

// ----------------------------------------------------------------------------- workloads

async fn raw_conn(url: &str) -> redis_client::aio::MultiplexedConnection {
    redis_client::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

/// `XREADGROUP GROUP g c COUNT 100 [BLOCK block_ms] STREAMS stream >`, the raw baselines' read.
fn xreadgroup(stream: &str, block_ms: Option<u64>) -> redis_client::Cmd {
    let mut cmd = redis_client::cmd("XREADGROUP");
    cmd.arg("GROUP").arg("g").arg("c").arg("COUNT").arg(100);
    if let Some(ms) = block_ms {
        cmd.arg("BLOCK").arg(ms);
    }
    cmd.arg("STREAMS").arg(stream).arg(">");
    cmd
}

/// One `XACK` of `ids` in group `g` of `stream`.
async fn xack<Id: redis_client::ToRedisArgs>(
    c: &mut redis_client::aio::MultiplexedConnection,
    stream: &str,
    ids: &[Id],
) {
    let _: u64 = redis_client::cmd("XACK")
        .arg(stream)
        .arg("g")
        .arg(ids)
        .query_async(c)
        .await
        .expect("XACK");
}

/// XADD of the same fields streamwise writes, awaited one at a time.
async fn raw_publish_awaited(url: String, n: u64, size: usize) -> (u64, Vec<Duration>) {
    let mut c = raw_conn(&url).await;
    let body = serde_json::to_vec(&payload_of(size)).expect("json");
    let mut lat = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let t = Instant::now();
        let _: String = redis_client::cmd("XADD")
            .arg("raw-pub")
            .arg("*")
            .arg("event_type")
            .arg("bench.event")
            .arg("payload")
            .arg(&body[..])
            .arg("timestamp")
            .arg("2026-11-22T10:00:00.123Z")
            .arg("uuid")
            .arg("01935f4e-0000-7000-8000-000000000000")
            .query_async(&mut c)
            .await
            .expect("XADD");
        lat.push(t.elapsed());
    }
    (n, lat)
}

async fn streamwise_publish_awaited(url: String, n: u64, size: usize) -> (u64, Vec<Duration>) {
    let publisher = RedisBackend::new(&url).expect("url").publisher();
    publish_awaited(&publisher, "sw-pub", n, size).await
}

/// 50 tasks publishing batches of 64, on one shared connection.
async fn streamwise_publish_batched(url: String, n: u64, size: usize) -> (u64, Vec<Duration>) {
    let publisher = Arc::new(RedisBackend::new(&url).expect("url").publisher());
    let tasks = 50u64;
    let batch = 64u64;
    let per_task = n / tasks / batch;
    let base = message(size);
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let publisher = publisher.clone();
        let base = base.clone();
        handles.push(tokio::spawn(async move {
            for _ in 0..per_task {
                let batch: Vec<Message> = (0..batch).map(|_| base.clone()).collect();
                publisher
                    .publish_batch("sw-batch", batch)
                    .await
                    .expect("publish_batch");
            }
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
    (tasks * per_task * batch, Vec::new())
}

/// Delayed publishes awaited one at a time, due in an hour (so nothing moves meanwhile): what
/// scheduling costs.
async fn streamwise_publish_delayed(url: String, n: u64, size: usize) -> (u64, Vec<Duration>) {
    let publisher = RedisBackend::new(&url).expect("url").publisher();
    let base = message(size);
    let mut lat = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let m = base.clone();
        let t = Instant::now();
        publisher
            .publish_after("sw-delayed", Duration::from_secs(3600), m)
            .await
            .expect("publish_after");
        lat.push(t.elapsed());
    }
    (n, lat)
}

/// The raw crate's nearest loop: `ZADD` of a member as large as streamwise's (a 16-byte
/// token, then the entry's fields), awaited one at a time.
async fn raw_publish_delayed(url: String, n: u64, size: usize) -> (u64, Vec<Duration>) {
    let mut c = raw_conn(&url).await;
    let body = serde_json::to_vec(&payload_of(size)).expect("json");
    let due = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
        + 3_600_000;
    let mut lat = Vec::with_capacity(n as usize);
    for i in 0..n {
        let mut member = format!("{i:016}10:event_type11:bench.event7:payload{}:", body.len()).into_bytes();
        member.extend_from_slice(&body);
        member.extend_from_slice(
            b"9:timestamp24:2026-11-22T10:00:00.123Z4:uuid36:01935f4e-0000-7000-8000-000000000000",
        );
        let t = Instant::now();
        let _: i64 = redis_client::cmd("ZADD")
            .arg("raw-delayed")
            .arg(due)
            .arg(member)
            .query_async(&mut c)
            .await
            .expect("ZADD");
        lat.push(t.elapsed());
    }
    (n, lat)
}

/// `n` messages published with delays spread evenly over 2 s, read by the router as they come
/// due; the latencies are how late each reached its handler (arrival minus due time).
async fn streamwise_delayed_delivery(url: String, n: u64, size: usize) -> (u64, Vec<Duration>) {
    const SPREAD: Duration = Duration::from_secs(2);
    let redis = RedisBackend::new(&url).expect("url");
    let base = Instant::now();
    let router = LatencyRouter::start(
        Arc::new(redis.subscriber().expect("subscriber")),
        Arc::new(redis.publisher()),
        "delayed",
        StartFrom::Beginning,
        "due_ns",
        base,
    )
    .await;
    let publisher = redis.publisher();
    let scheduled = Instant::now();
    for i in 0..n {
        // Due times spread over the window from when scheduling started, so that a slow
        // scheduling loop does not shorten the delays.
        let due = scheduled + SPREAD.mul_f64(i as f64 / n as f64);
        let delay = due.saturating_duration_since(Instant::now());
        let due_ns = (base.elapsed() + delay).as_nanos().to_string();
        let m = message(size).with_metadata("due_ns", due_ns);
        publisher
            .publish_after("delayed", delay, m)
            .await
            .expect("publish_after");
    }
    (n, router.finish(n).await)
}

/// Fills `stream` with `n` entries in the wire format, pipelined, for the consume workloads.
async fn preload(url: &str, stream: &str, n: u64, size: usize) {
    match cluster_nodes(url) {
        Some(nodes) => {
            let client = redis_client::cluster::ClusterClient::new(nodes).expect("cluster url");
            let mut c = client.get_async_connection().await.expect("connect");
            preload_on(&mut c, stream, n, size).await;
        }
        None => preload_on(&mut raw_conn(url).await, stream, n, size).await,
    }
}

async fn preload_on<C: redis_client::aio::ConnectionLike + Send>(
    c: &mut C,
    stream: &str,
    n: u64,
    size: usize,
) {
    let messages: Vec<Vec<(&'static str, bytes::Bytes)>> = (0..1000)
        .map(|_| {
            use streamwise::codec::Codec;
            streamwise::codec::JsonCodec
                .encode(&message(size))
                .expect("encode")
        })
        .collect();
    let mut left = n;
    while left > 0 {
        let k = left.min(1000);
        let mut pipe = redis_client::pipe();
        for fields in messages.iter().take(k as usize) {
            let cmd = pipe.cmd("XADD").arg(stream).arg("*");
            for (name, value) in fields {
                cmd.arg(*name).arg(&value[..]);
            }
            cmd.ignore();
        }
        let _: () = pipe.query_async(c).await.expect("preload");
        left -= k;
    }
    let _: () = redis_client::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("g")
        .arg("0")
        .query_async(c)
        .await
        .expect("group");
}

/// XREADGROUP COUNT 100, then one XACK for the batch, in a loop.
async fn raw_consume(url: String, stream: &'static str, n: u64) -> (u64, Vec<Duration>) {
    let mut c = raw_conn(&url).await;
    let mut done = 0u64;
    while done < n {
        let reply: Value = xreadgroup(stream, None)
            .query_async(&mut c)
            .await
            .expect("XREADGROUP");
        let ids = ids_of(reply);
        if ids.is_empty() {
            break;
        }
        xack(&mut c, stream, &ids).await;
        done += ids.len() as u64;
    }
    (done, Vec::new())
}

fn ids_of(reply: Value) -> Vec<String> {
    let mut ids = Vec::new();
    if let Value::Array(streams) = reply {
        for s in streams {
            if let Value::Array(mut parts) = s
                && let Some(Value::Array(entries)) = parts.pop()
            {
                for e in entries {
                    if let Value::Array(mut f) = e
                        && !f.is_empty()
                        && let Value::BulkString(id) = f.swap_remove(0)
                    {
                        ids.push(String::from_utf8_lossy(&id).into_owned());
                    }
                }
            }
        }
    }
    ids
}

/// End to end at `rate` events/s (0 = as fast as possible) for `n` events, latency from
/// publish to handler, both in this process.
async fn streamwise_end_to_end(
    url: String,
    stream: &'static str,
    n: u64,
    rate: u64,
    size: usize,
) -> (u64, Vec<Duration>) {
    let redis = RedisBackend::new(&url).expect("url");
    router_end_to_end(
        Arc::new(redis.subscriber().expect("subscriber")),
        Arc::new(redis.publisher()),
        Arc::new(redis.publisher()),
        stream,
        n,
        rate,
        size,
    )
    .await
}

/// The same with the raw crate: paced XADD; a reader with XREADGROUP BLOCK + XACK.
async fn raw_end_to_end(
    url: String,
    stream: &'static str,
    n: u64,
    rate: u64,
    size: usize,
) -> (u64, Vec<Duration>) {
    let mut setup = raw_conn(&url).await;
    let _: () = redis_client::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("g")
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut setup)
        .await
        .expect("group");
    let base = Instant::now();
    let reader_url = url.clone();
    let reader = tokio::spawn(async move {
        let mut c = raw_conn(&reader_url).await;
        let mut lat = Vec::with_capacity(n as usize);
        while (lat.len() as u64) < n {
            let reply: Value = xreadgroup(stream, Some(1000))
                .query_async(&mut c)
                .await
                .expect("XREADGROUP");
            let now = base.elapsed().as_nanos() as u64;
            let entries = sent_of(reply);
            let ids: Vec<&String> = entries.iter().map(|(id, _)| id).collect();
            if ids.is_empty() {
                continue;
            }
            xack(&mut c, stream, &ids).await;
            lat.extend(
                entries
                    .iter()
                    .map(|(_, sent)| Duration::from_nanos(now.saturating_sub(*sent))),
            );
        }
        lat
    });
    let mut c = raw_conn(&url).await;
    let body = serde_json::to_vec(&payload_of(size)).expect("json");
    let pacing = Pacing::new(rate);
    for i in 0..n {
        pacing.wait_for(i).await;
        let _: String = redis_client::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("event_type")
            .arg("bench.event")
            .arg("payload")
            .arg(&body[..])
            .arg("sent_ns")
            .arg(base.elapsed().as_nanos() as u64)
            .query_async(&mut c)
            .await
            .expect("XADD");
    }
    let lat = reader.await.expect("reader");
    (n, lat)
}

fn sent_of(reply: Value) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    if let Value::Array(streams) = reply {
        for s in streams {
            let Value::Array(mut parts) = s else { continue };
            let Some(Value::Array(entries)) = parts.pop() else {
                continue;
            };
            for e in entries {
                let Value::Array(mut f) = e else { continue };
                let (Some(Value::Array(fields)), Some(Value::BulkString(id))) = (f.pop(), f.pop()) else {
                    continue;
                };
                let mut sent = 0;
                for pair in fields.chunks(2) {
                    if let [Value::BulkString(k), Value::BulkString(v)] = pair
                        && k == b"sent_ns"
                    {
                        sent = String::from_utf8_lossy(v).parse().unwrap_or(0);
                    }
                }
                out.push((String::from_utf8_lossy(&id).into_owned(), sent));
            }
        }
    }
    out
}

/// The fields `redis-benchmark`'s `XADD` writes: one field of `size` bytes (its physical limit),
/// or, with `as_streamwise`, the four fields a streamwise entry of that payload has (the same
/// limit for the entries streamwise writes).
fn benchmark_fields(size: usize, as_streamwise: bool) -> Vec<String> {
    if !as_streamwise {
        return vec!["payload".into(), "x".repeat(size)];
    }
    let m = message(size);
    vec![
        "event_type".into(),
        m.event_type().to_owned(),
        "payload".into(),
        String::from_utf8(m.payload().to_vec()).expect("JSON is UTF-8"),
        "timestamp".into(),
        m.timestamp_rfc3339(),
        "uuid".into(),
        m.uuid().hyphenated().to_string(),
    ]
}

/// The system name of the `redis-benchmark` row writing streamwise's fields.
const BENCHMARK_AS_STREAMWISE: &str = "redis-benchmark, streamwise fields";

fn redis_benchmark(
    server: &RedisServer,
    clients: u32,
    pipeline: u32,
    n: u64,
    size: usize,
    as_streamwise: bool,
) -> Row {
    let server_cpu = cpu_time_of(&server.url());
    let machine = machine_ticks();
    let started = Instant::now();
    let out = Command::new("redis-benchmark")
        .args([
            "-p",
            &server.port().to_string(),
            "-c",
            &clients.to_string(),
            "-P",
            &pipeline.to_string(),
        ])
        .args(["-n", &n.to_string(), "-q"])
        .args(["XADD", "rb-stream", "*"])
        .args(benchmark_fields(size, as_streamwise))
        .output()
        .expect("redis-benchmark is installed with redis-server");
    let seconds = started.elapsed().as_secs_f64();
    let steal = steal_pct(machine, machine_ticks());
    let server_cpu = cpu_time_of(&server.url()).saturating_sub(server_cpu);
    let text = String::from_utf8_lossy(&out.stdout);
    // "XADD rb-stream * payload ...: 123456.79 requests per second, p50=0.391 msec"
    let rps = text
        .split("requests per second")
        .next()
        .and_then(|head| head.rsplit(": ").next())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(n as f64 / seconds);
    Row {
        workload: format!("redis-benchmark XADD -c {clients} -P {pipeline}"),
        system: if as_streamwise {
            BENCHMARK_AS_STREAMWISE.into()
        } else {
            "redis-benchmark".into()
        },
        threads: 0,
        payload: size,
        events: n,
        seconds: n as f64 / rps,
        latency_us: None,
        cpu_us_per_event: 0.0,
        server_cpu_us_per_event: server_cpu.as_secs_f64() * 1e6 / n as f64,
        peak_rss_mb: 0.0,
        steal_pct: steal,
    }
}

/// The row of `runs` in `round` with this workload, system, threads and payload.
fn row_of<'a>(
    runs: &'a [(u64, Row)],
    round: u64,
    workload: &str,
    system: &str,
    threads: usize,
    payload: usize,
) -> Option<&'a Row> {
    runs.iter()
        .find(|(q, r)| {
            *q == round
                && r.workload == workload
                && r.system == system
                && r.threads == threads
                && r.payload == payload
        })
        .map(|(_, r)| r)
}

/// Two targets that compare rows of one round other than against the raw loop, median
/// [min-max] of the rounds: the partitioned consume rows against the single stream (issue 15:
/// client CPU per event of P = 16 within 10 %, rate of P = 1 within 5 %), and the 200 B
/// consume row against the server's limit (issue 23: 1e6 / the raw loop's server µs per event).
fn against_same_round(runs: &[(u64, Row)]) -> String {
    use std::fmt::Write;
    const CONSUME: &str = "consume backlog";
    const SINGLE: &str = "streamwise router";
    let mut out = String::new();
    let rounds = runs.iter().map(|(q, _)| q + 1).max().unwrap_or(0);
    for threads in [1, 2] {
        let ratios = |f: &dyn Fn(u64) -> Option<f64>| -> Vec<f64> { (0..rounds).filter_map(f).collect() };
        let bound = ratios(&|q| {
            let raw = row_of(
                runs,
                q,
                CONSUME,
                "raw redis loop (COUNT 100 + XACK)",
                threads,
                200,
            )?;
            let framework = row_of(runs, q, CONSUME, SINGLE, threads, 200)?;
            (raw.server_cpu_us_per_event > 0.0).then(|| framework.rate() * raw.server_cpu_us_per_event / 1e6)
        });
        if !bound.is_empty() {
            let _ = writeln!(
                out,
                "consume 200 B, {threads} thread(s), x the server bound (1e6 / raw loop's srv us/ev): {}",
                common::spread(&bound)
            );
        }
        for partitioned in [
            "streamwise router (P=1)",
            "streamwise router (P=4)",
            "streamwise router (P=16)",
        ] {
            let pair = |q| {
                Some((
                    row_of(runs, q, CONSUME, partitioned, threads, 200)?,
                    row_of(runs, q, CONSUME, SINGLE, threads, 200)?,
                ))
            };
            let cpu = ratios(&|q| pair(q).map(|(p, s)| p.cpu_us_per_event / s.cpu_us_per_event));
            let rate = ratios(&|q| pair(q).map(|(p, s)| p.rate() / s.rate()));
            if !cpu.is_empty() {
                let _ = writeln!(
                    out,
                    "consume 200 B, {threads} thread(s), {partitioned} x the single stream: cpu/ev {}, rate {}",
                    common::spread(&cpu),
                    common::spread(&rate)
                );
            }
        }
    }
    out
}

/// The batched publish rows against the `redis-benchmark -c 50 -P 64` rows of the same round
/// (issue 23's target: 80 % of the one-field row), median [min-max] of the rounds.
fn batched_against_benchmark(runs: &[(u64, Row)]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    const BATCHED: &str = "publish batched (50 tasks x 64)";
    let rounds = runs.iter().map(|(q, _)| q + 1).max().unwrap_or(0);
    for threads in [1, 2] {
        for system in ["redis-benchmark", BENCHMARK_AS_STREAMWISE] {
            let ratios: Vec<f64> = (0..rounds)
                .filter_map(|q| {
                    let batched = row_of(runs, q, BATCHED, "streamwise", threads, 200)?;
                    let bench = row_of(runs, q, "redis-benchmark XADD -c 50 -P 64", system, 0, 200)?;
                    Some(batched.rate() / bench.rate())
                })
                .collect();
            if !ratios.is_empty() {
                let _ = writeln!(
                    out,
                    "publish batched, {threads} thread(s), x {system} -c 50 -P 64: {}",
                    common::spread(&ratios)
                );
            }
        }
    }
    out
}

/// Runs one workload in this (child) process and returns its row.
fn run_spec(spec: &Spec, url: &str) -> Row {
    let (n, size, url) = (spec.events, spec.size, url.to_owned());
    let (w, sys, t) = (spec.workload, spec.system, spec.threads);
    let raw = sys.starts_with("raw");
    if !w.starts_with("in-memory") {
        let _ = SERVER_URL.set(url.clone());
    }
    match w {
        "publish awaited" if raw => measure(w, sys, t, size, nothing, || raw_publish_awaited(url, n, size)),
        "publish awaited" => measure(w, sys, t, size, nothing, || {
            streamwise_publish_awaited(url, n, size)
        }),
        "publish delayed (awaited)" if raw => {
            measure(w, sys, t, size, nothing, || raw_publish_delayed(url, n, size))
        }
        "publish delayed (awaited)" => measure(w, sys, t, size, nothing, || {
            streamwise_publish_delayed(url, n, size)
        }),
        "delayed delivery (lateness)" => measure(w, sys, t, size, nothing, || {
            streamwise_delayed_delivery(url, n, size)
        }),
        "publish batched (50 tasks x 64)" => measure(w, sys, t, size, nothing, || {
            streamwise_publish_batched(url, n, size)
        }),
        "consume backlog" if sys.contains("(P=") => {
            let partitions: u32 = sys
                .split("(P=")
                .nth(1)
                .and_then(|rest| rest.trim_end_matches(')').parse().ok())
                .expect("a partition count");
            let u = url.clone();
            let setup = move || async move {
                use streamwise::partition::PartitionCoordinator;
                let redis = RedisBackend::new(&u).expect("url");
                redis
                    .coordinator()
                    .create_partitions("pbacklog", partitions)
                    .await
                    .expect("partitions");
                let per = n / u64::from(partitions);
                for p in 0..partitions {
                    let stream = streamwise::partition::partition_stream("pbacklog", p);
                    preload(&u, &stream, per, size).await;
                }
            };
            let n = n / u64::from(partitions) * u64::from(partitions);
            measure(w, sys, t, size, setup, || {
                let redis = RedisBackend::new(&url).expect("url");
                let mut options = streamwise::partition::PartitionOptions::default();
                if let Ok(n) = std::env::var("BENCH_DEDICATED_READERS") {
                    options = options.dedicated_readers(n.parse().expect("a reader count"));
                }
                let subscriber = streamwise::partition::PartitionedSubscriber::new(
                    Arc::new(redis.subscriber().expect("subscriber")),
                    Arc::new(redis.coordinator()),
                )
                .options(options);
                router_consume(Arc::new(subscriber), Arc::new(redis.publisher()), "pbacklog", n)
            })
        }
        "consume backlog" => {
            let u = url.clone();
            let setup = move || async move { preload(&u, "backlog", n, size).await };
            if raw {
                measure(w, sys, t, size, setup, || raw_consume(url, "backlog", n))
            } else {
                measure(w, sys, t, size, setup, || {
                    let redis = RedisBackend::new(&url).expect("url");
                    let subscriber = redis.subscriber().expect("subscriber");
                    router_consume(Arc::new(subscriber), Arc::new(redis.publisher()), "backlog", n)
                })
            }
        }
        "end to end at 1000/s" if raw => measure(w, sys, t, size, nothing, || {
            raw_end_to_end(url, "e2e", n, 1000, size)
        }),
        "end to end at 1000/s" => measure(w, sys, t, size, nothing, || {
            streamwise_end_to_end(url, "e2e", n, 1000, size)
        }),
        "end to end, max rate" if raw => measure(w, sys, t, size, nothing, || {
            raw_end_to_end(url, "e2e", n, 0, size)
        }),
        "end to end, max rate" => measure(w, sys, t, size, nothing, || {
            streamwise_end_to_end(url, "e2e", n, 0, size)
        }),
        "in-memory through the router" => {
            // With the metrics feature, the same workload with an exporter's recorder
            // installed (issue 16: within 10 % of the row without).
            #[cfg(feature = "metrics")]
            if sys.ends_with("(recorder)") {
                // Configured as examples/observability.rs is: Prometheus histograms (buckets),
                // which the Grafana dashboard's quantiles need.
                let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
                    .set_buckets(&[0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0])
                    .expect("buckets")
                    .install_recorder()
                    .expect("the only recorder of this process");
                // As the exporter's own HTTP listener does (every 5 s by default), and as a
                // scraped service does: histograms fold their samples into summaries on upkeep
                // instead of keeping every one.
                std::thread::spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        handle.run_upkeep();
                    }
                });
            }
            let backend = MemoryBackend::new();
            let b = backend.clone();
            let n = n / 1000 * 1000;
            let setup = move || async move {
                let publisher = b.publisher();
                let m = message(size);
                for _ in 0..n / 1000 {
                    publisher
                        .publish_batch("mem", vec![m.clone(); 1000])
                        .await
                        .expect("publish");
                }
            };
            let kept = backend.clone();
            let row = measure(w, sys, t, size, setup, move || {
                let publisher = backend.publisher();
                router_consume(Arc::new(backend.subscriber()), Arc::new(publisher), "mem", n)
            });
            // Freeing the million entries is not part of consuming them.
            drop(kept);
            row
        }
        other => panic!("unknown workload {other:?}"),
    }
}

fn specs() -> Vec<Spec> {
    let backlog = env("BENCH_BACKLOG", 1_000_000);
    let publish_n = env("BENCH_PUBLISH", 20_000);
    let latency_n = env("BENCH_LATENCY_EVENTS", 5_000);
    let memory_n = env("BENCH_MEMORY", 1_000_000);
    let delayed_n = env("BENCH_DELAYED", 5_000);
    let mut specs = Vec::new();
    for threads in [1, 2] {
        let spec = |workload, system, size, events| Spec {
            workload,
            system,
            threads,
            size,
            events,
        };
        for (size, n) in [(200, publish_n), (16 * 1024, publish_n / 4)] {
            specs.push(spec("publish awaited", "raw redis loop", size, n));
            specs.push(spec("publish awaited", "streamwise", size, n));
        }
        specs.push(spec(
            "publish delayed (awaited)",
            "raw redis loop (ZADD)",
            200,
            publish_n,
        ));
        specs.push(spec("publish delayed (awaited)", "streamwise", 200, publish_n));
        specs.push(spec(
            "delayed delivery (lateness)",
            "streamwise router",
            200,
            delayed_n,
        ));
        specs.push(spec(
            "publish batched (50 tasks x 64)",
            "streamwise",
            200,
            320_000,
        ));
        for (size, n) in [(200, backlog), (16 * 1024, (backlog / 10).max(1000))] {
            specs.push(spec(
                "consume backlog",
                "raw redis loop (COUNT 100 + XACK)",
                size,
                n,
            ));
            specs.push(spec("consume backlog", "streamwise router", size, n));
        }
        specs.push(spec("end to end at 1000/s", "raw redis loop", 200, latency_n));
        specs.push(spec("end to end at 1000/s", "streamwise router", 200, latency_n));
        specs.push(spec("end to end, max rate", "raw redis loop", 200, latency_n * 4));
        specs.push(spec(
            "end to end, max rate",
            "streamwise router",
            200,
            latency_n * 4,
        ));
        specs.push(spec(
            "in-memory through the router",
            "streamwise router",
            200,
            memory_n,
        ));
        if cfg!(feature = "metrics") {
            specs.push(spec(
                "in-memory through the router",
                "streamwise router (recorder)",
                200,
                memory_n,
            ));
        }
    }
    // The same streamwise workloads on a master with one replica, and on the cluster, beside
    // the single node: the replica shows what replication costs on these two cores, apart from
    // what the cluster itself costs.
    let on_redis: Vec<Spec> = specs
        .iter()
        .filter(|s| s.system.starts_with("streamwise") && !s.workload.starts_with("in-memory"))
        .cloned()
        .collect();
    for (plain, router) in [
        ("streamwise (replicated)", "streamwise router (replicated)"),
        ("streamwise (cluster)", "streamwise router (cluster)"),
    ] {
        specs.extend(on_redis.iter().map(|s| Spec {
            system: if s.system == "streamwise" { plain } else { router },
            ..*s
        }));
    }
    // A partitioned topic read by one member, beside the single stream (issue 15): P = 1
    // costs the partition layer alone, P = 16 sixteen reads in turn.
    let backlog_rows: Vec<Spec> = specs
        .iter()
        .filter(|s| s.workload == "consume backlog" && s.system == "streamwise router" && s.size == 200)
        .cloned()
        .collect();
    for s in backlog_rows {
        for system in [
            "streamwise router (P=1)",
            "streamwise router (P=4)",
            "streamwise router (P=16)",
        ] {
            specs.push(Spec { system, ..s.clone() });
        }
    }
    if let Ok(only) = std::env::var("BENCH_ONLY") {
        specs.retain(|s| s.workload.contains(only.as_str()));
    }
    if let Ok(system) = std::env::var("BENCH_SYSTEM") {
        specs.retain(|s| s.system.contains(system.as_str()));
    }
    if std::env::var_os("BENCH_NO_CLUSTER").is_some() {
        specs.retain(|s| !on_cluster_system(s.system) && !on_replicated_system(s.system));
    }
    specs
}

fn on_cluster_system(system: &str) -> bool {
    system.ends_with("(cluster)")
}

fn on_replicated_system(system: &str) -> bool {
    system.ends_with("(replicated)")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // A child: `--run <index> <url>` runs one workload and prints its JSON line.
    if let Some(pos) = args.iter().position(|a| a == "--run") {
        let index: usize = args[pos + 1].parse().expect("index");
        let row = run_spec(&specs()[index], &args[pos + 2]);
        println!("{}", row.json());
        return;
    }
    let server = RedisServer::start();
    let url = server.url();
    let cluster = specs()
        .iter()
        .any(|s| on_cluster_system(s.system))
        .then(RedisCluster::start);
    let cluster_url = cluster.as_ref().map(RedisCluster::url).unwrap_or_default();
    let cluster_nodes: Vec<String> = cluster
        .as_ref()
        .map(|c| c.nodes().iter().map(RedisServer::url).collect())
        .unwrap_or_default();
    let replicated = specs().iter().any(|s| on_replicated_system(s.system)).then(|| {
        let master = RedisServer::start();
        let port = master.port().to_string();
        let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
        (master, replica)
    });
    let mut rows = Vec::new();
    if std::env::var_os("BENCH_ONLY").is_none() {
        let row = redis_benchmark(&server, 1, 1, env("BENCH_PUBLISH", 20_000), 200, false);
        println!("{}", row.json());
        rows.push(row);
        flush(&server);
    }
    // The server's own limit for batched publishes, measured again in every round (beside
    // the batched rows it is the baseline of): one field, and streamwise's four.
    let batched_rows = specs()
        .iter()
        .any(|s| s.workload.starts_with("publish batched") && s.system == "streamwise");
    // Every workload `BENCH_REPEAT` times (default 3), round after round: the framework's
    // runs and their baselines alternate, so that the machine's drift falls on both alike.
    let repeat = env("BENCH_REPEAT", 3).max(1);
    let mut runs: Vec<(u64, Row)> = Vec::new();
    for (round, (index, spec)) in
        (0..repeat).flat_map(|round| specs().into_iter().enumerate().map(move |s| (round, s)))
    {
        if index == 0 && batched_rows {
            for as_streamwise in [false, true] {
                flush(&server);
                let row = redis_benchmark(&server, 50, 64, 1_000_000, 200, as_streamwise);
                println!("{}", row.json());
                runs.push((round, row.clone()));
                rows.push(row);
            }
        }
        let (target, nodes) = match &replicated {
            Some((master, replica)) if on_replicated_system(spec.system) => {
                (master.url(), vec![master.url(), replica.url()])
            }
            _ if on_cluster_system(spec.system) => (cluster_url.clone(), cluster_nodes.clone()),
            _ => (url.clone(), vec![url.clone()]),
        };
        let attempt = || {
            flush(&server);
            if let Some(cluster) = &cluster {
                for master in cluster.masters() {
                    flush(master);
                }
            }
            if let Some((master, _)) = &replicated {
                flush(master);
            }
            run_child(&spec, index, &target, ("BENCH_SERVER_NODES", &nodes.join(",")))
        };
        if let Some(row) = least_stolen(&spec, attempt) {
            println!("{}", row.json());
            runs.push((round, row.clone()));
            rows.push(row);
        }
    }
    flush(&server);
    let summary = summarize(&runs) + "\n" + &batched_against_benchmark(&runs) + &against_same_round(&runs);

    print_table(&rows);
    println!("{summary}");
}
