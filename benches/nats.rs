//! The NATS JetStream benchmark: streamwise's NATS backend beside a raw `async-nats` loop
//! written here, workload by workload, in the same run. Each workload runs in a child process
//! of its own against a fresh `nats-server -js` (`streamwise::testing::NatsServer`: a free
//! loopback port, never 4222, its own store directory), so that each starts from an empty
//! store as the Redis workloads start from `FLUSHALL`; prints one JSON line per result, the
//! table and the ratios against the raw loop, as `benches/streams.rs` does.
//!
//! ```sh
//! cargo bench --features nats --bench nats                  # everything (a few minutes)
//! BENCH_NATS_BACKLOG=20000 cargo bench --features nats --bench nats
//! ```
//!
//! Baselines, the simplest fair equivalents with `async-nats` itself:
//!
//! - publish: one JetStream publish awaited at a time (the publish, then its acknowledgement),
//!   with the headers and body streamwise writes (`Streamwise-event_type`, `-timestamp`,
//!   `-uuid`, a fresh `Nats-Msg-Id`; the JSON payload as the body), to a stream configured
//!   as streamwise configures its own (file storage, one replica);
//! - consume: the durable pull consumer streamwise makes (explicit acks, no `max_deliver`,
//!   no `max_ack_pending`), read with the client's pull stream in batches of 100
//!   (`consumer.stream().max_messages_per_batch(100)`), each message acknowledged with
//!   `ack()` (a plain `+ACK`, not confirmed by the server: streamwise confirms each one);
//! - end to end: the same publish, paced, and the same consumer in a task of its own,
//!   latency from before the publish to the message's arrival.
//!
//! Knobs: `BENCH_PUBLISH` (20,000), `BENCH_NATS_BACKLOG` (200,000),
//! `BENCH_LATENCY_EVENTS` (5,000; four times as many at max rate), `BENCH_REPEAT` (3),
//! `BENCH_ONLY=<workload substring>`, `BENCH_SYSTEM=<system substring>`,
//! `BENCH_PERF_CTL=<fifo>` (as in `benches/streams.rs`; the child runs with
//! `--run <index> <nats url>` and `BENCH_SERVER_PID`).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;

use common::{
    Pacing, Row, Spec, env, least_stolen, measure, message, nothing, payload_of, print_table,
    process_cpu_time, publish_awaited, router_consume, router_end_to_end, run_child, summarize,
};
use streamwise::Publisher;
use streamwise::nats::NatsBackend;
use streamwise::testing::NatsServer;

// ----------------------------------------------------------------------------- measurement

/// nats-server's CPU time so far (user + system, from `/proc/<pid>/stat`), its pid given by
/// the parent in `BENCH_SERVER_PID`; zero without it.
fn server_cpu_time() -> Duration {
    match std::env::var("BENCH_SERVER_PID") {
        Ok(pid) => process_cpu_time(&pid),
        Err(_) => Duration::ZERO,
    }
}

// ----------------------------------------------------------------------------- raw async-nats

/// The subject of a topic's stream, as streamwise names it.
fn subject(topic: &str) -> String {
    format!("streamwise.{topic}")
}

/// A JetStream context on a new connection.
async fn raw_js(url: &str) -> (async_nats::Client, jetstream::Context) {
    let client = async_nats::connect(url).await.expect("connect");
    (client.clone(), jetstream::new(client))
}

/// The stream of `topic`, configured as streamwise creates its streams.
async fn raw_stream(js: &jetstream::Context, topic: &str) -> stream::Stream {
    js.get_or_create_stream(stream::Config {
        name: topic.to_owned(),
        subjects: vec![subject(topic)],
        storage: stream::StorageType::File,
        num_replicas: 1,
        ..Default::default()
    })
    .await
    .expect("stream")
}

/// The durable pull consumer `g` streamwise makes for a group.
async fn raw_consumer(
    stream: &stream::Stream,
    deliver_policy: consumer::DeliverPolicy,
) -> consumer::Consumer<consumer::pull::Config> {
    stream
        .get_or_create_consumer(
            "g",
            consumer::pull::Config {
                durable_name: Some("g".to_owned()),
                ack_policy: consumer::AckPolicy::Explicit,
                deliver_policy,
                max_deliver: -1,
                max_ack_pending: -1,
                ..Default::default()
            },
        )
        .await
        .expect("consumer")
}

/// The headers streamwise writes for the bench's message (a fixed timestamp and UUID, as the
/// raw redis loop writes), `metadata` as `Streamwise-metadata` when given, and a fresh
/// `Nats-Msg-Id` as each publish of streamwise's has.
fn headers(metadata: Option<String>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Streamwise-event_type", "bench.event");
    if let Some(metadata) = metadata {
        headers.insert("Streamwise-metadata", metadata.as_str());
    }
    headers.insert("Streamwise-timestamp", "2026-11-22T10:00:00.123Z");
    headers.insert("Streamwise-uuid", "01935f4e-0000-7000-8000-000000000000");
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        uuid::Uuid::now_v7().simple().to_string().as_str(),
    );
    headers
}

/// A JetStream publish awaited one at a time: the publish, then its acknowledgement.
async fn raw_publish_awaited(url: String, n: u64, size: usize) -> (u64, Vec<Duration>) {
    let (_client, js) = raw_js(&url).await;
    raw_stream(&js, "raw-pub").await;
    let subject = subject("raw-pub");
    let body = Bytes::from(serde_json::to_vec(&payload_of(size)).expect("json"));
    let mut lat = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let t = Instant::now();
        js.publish_with_headers(subject.clone(), headers(None), body.clone())
            .await
            .expect("publish")
            .await
            .expect("acknowledgement");
        lat.push(t.elapsed());
    }
    (n, lat)
}

/// The durable consumer's messages in batches of 100 from the client's pull stream, each
/// acknowledged (`+ACK`), until `n`.
async fn raw_consume(url: String, topic: &'static str, n: u64) -> (u64, Vec<Duration>) {
    let (client, js) = raw_js(&url).await;
    let stream = raw_stream(&js, topic).await;
    let consumer = raw_consumer(&stream, consumer::DeliverPolicy::All).await;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(100)
        .messages()
        .await
        .expect("pull");
    let mut done = 0u64;
    while done < n {
        let m = messages.next().await.expect("open").expect("message");
        m.ack().await.expect("ack");
        done += 1;
    }
    client.flush().await.expect("flush");
    (done, Vec::new())
}

/// The publish time in a raw end-to-end message: `Streamwise-metadata: {"sent_ns":"<ns>"}`.
fn sent_ns(m: &async_nats::Message) -> u64 {
    m.headers
        .as_ref()
        .and_then(|h| h.get("Streamwise-metadata"))
        .and_then(|v| {
            v.as_str()
                .strip_prefix(r#"{"sent_ns":""#)?
                .strip_suffix(r#""}"#)?
                .parse()
                .ok()
        })
        .expect("sent_ns")
}

/// The same with the raw client: paced publishes; a reader task on the durable consumer's
/// pull stream, acknowledging each message.
async fn raw_end_to_end(
    url: String,
    topic: &'static str,
    n: u64,
    rate: u64,
    size: usize,
) -> (u64, Vec<Duration>) {
    let (_client, js) = raw_js(&url).await;
    let stream = raw_stream(&js, topic).await;
    let consumer = raw_consumer(&stream, consumer::DeliverPolicy::New).await;
    let base = Instant::now();
    let reader = tokio::spawn(async move {
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(100)
            .messages()
            .await
            .expect("pull");
        let mut lat = Vec::with_capacity(n as usize);
        while (lat.len() as u64) < n {
            let m = messages.next().await.expect("open").expect("message");
            let now = base.elapsed().as_nanos() as u64;
            lat.push(Duration::from_nanos(now.saturating_sub(sent_ns(&m))));
            m.ack().await.expect("ack");
        }
        lat
    });
    let subject = subject(topic);
    let body = Bytes::from(serde_json::to_vec(&payload_of(size)).expect("json"));
    let pacing = Pacing::new(rate);
    for i in 0..n {
        pacing.wait_for(i).await;
        let metadata = format!(r#"{{"sent_ns":"{}"}}"#, base.elapsed().as_nanos());
        js.publish_with_headers(subject.clone(), headers(Some(metadata)), body.clone())
            .await
            .expect("publish")
            .await
            .expect("acknowledgement");
    }
    let lat = reader.await.expect("reader");
    (n, lat)
}

// ----------------------------------------------------------------------------- streamwise

async fn connect(url: &str) -> NatsBackend {
    NatsBackend::connect(url).await.expect("connect")
}

async fn streamwise_publish_awaited(url: String, n: u64, size: usize) -> (u64, Vec<Duration>) {
    let publisher = connect(&url).await.publisher();
    publish_awaited(&publisher, "sw-pub", n, size).await
}

/// Fills `topic` with `n` messages through streamwise's publisher, 1,000 a batch (each batch
/// sent at once, then its acknowledgements awaited), for the consume workloads.
async fn preload(url: &str, topic: &str, n: u64, size: usize) {
    let publisher = connect(url).await.publisher();
    let m = message(size);
    let mut left = n;
    while left > 0 {
        let k = left.min(1000);
        publisher
            .publish_batch(topic, vec![m.clone(); k as usize])
            .await
            .expect("preload");
        left -= k;
    }
}

// ----------------------------------------------------------------------------- the run

/// Runs one workload in this (child) process and returns its row.
fn run_spec(spec: &Spec, url: &str) -> Row {
    let (n, size, url) = (spec.events, spec.size, url.to_owned());
    let (w, sys, t) = (spec.workload, spec.system, spec.threads);
    let raw = sys.starts_with("raw");
    match w {
        "publish awaited" if raw => measure(w, sys, t, size, nothing, || raw_publish_awaited(url, n, size)),
        "publish awaited" => measure(w, sys, t, size, nothing, || {
            streamwise_publish_awaited(url, n, size)
        }),
        "consume backlog" => {
            let u = url.clone();
            let setup = move || async move { preload(&u, "backlog", n, size).await };
            if raw {
                measure(w, sys, t, size, setup, || raw_consume(url, "backlog", n))
            } else {
                measure(w, sys, t, size, setup, || async move {
                    let nats = connect(&url).await;
                    router_consume(
                        Arc::new(nats.subscriber()),
                        Arc::new(nats.publisher()),
                        "backlog",
                        n,
                    )
                    .await
                })
            }
        }
        "end to end at 1000/s" | "end to end, max rate" => {
            let rate = if w == "end to end at 1000/s" { 1000 } else { 0 };
            if raw {
                measure(w, sys, t, size, nothing, || {
                    raw_end_to_end(url, "e2e", n, rate, size)
                })
            } else {
                measure(w, sys, t, size, nothing, || async move {
                    let nats = connect(&url).await;
                    router_end_to_end(
                        Arc::new(nats.subscriber()),
                        Arc::new(nats.publisher()),
                        Arc::new(nats.publisher()),
                        "e2e",
                        n,
                        rate,
                        size,
                    )
                    .await
                })
            }
        }
        other => panic!("unknown workload {other:?}"),
    }
}

fn specs() -> Vec<Spec> {
    let publish_n = env("BENCH_PUBLISH", 20_000);
    let backlog = env("BENCH_NATS_BACKLOG", 200_000);
    let latency_n = env("BENCH_LATENCY_EVENTS", 5_000);
    let mut specs = Vec::new();
    for threads in [1, 2] {
        let spec = |workload, system, events| Spec {
            workload,
            system,
            threads,
            size: 200,
            events,
        };
        specs.push(spec("publish awaited", "raw async-nats loop", publish_n));
        specs.push(spec("publish awaited", "streamwise", publish_n));
        specs.push(spec(
            "consume backlog",
            "raw async-nats (pull 100 + ack)",
            backlog,
        ));
        specs.push(spec("consume backlog", "streamwise router", backlog));
        specs.push(spec("end to end at 1000/s", "raw async-nats loop", latency_n));
        specs.push(spec("end to end at 1000/s", "streamwise router", latency_n));
        specs.push(spec("end to end, max rate", "raw async-nats loop", latency_n * 4));
        specs.push(spec("end to end, max rate", "streamwise router", latency_n * 4));
    }
    if let Ok(only) = std::env::var("BENCH_ONLY") {
        specs.retain(|s| s.workload.contains(only.as_str()));
    }
    if let Ok(system) = std::env::var("BENCH_SYSTEM") {
        specs.retain(|s| s.system.contains(system.as_str()));
    }
    specs
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
    let mut rows = Vec::new();
    // Every workload `BENCH_REPEAT` times (default 3), round after round, as in
    // benches/streams.rs.
    let repeat = env("BENCH_REPEAT", 3).max(1);
    let mut runs: Vec<(u64, Row)> = Vec::new();
    for (round, (index, spec)) in
        (0..repeat).flat_map(|round| specs().into_iter().enumerate().map(move |s| (round, s)))
    {
        let attempt = || {
            // A fresh server for each run: an empty store, and its CPU the workload's alone.
            let server = NatsServer::start();
            run_child(
                &spec,
                index,
                &server.url(),
                ("BENCH_SERVER_PID", &server.pid().to_string()),
            )
        };
        if let Some(row) = least_stolen(&spec, attempt) {
            println!("{}", row.json());
            runs.push((round, row.clone()));
            rows.push(row);
        }
    }
    let summary = summarize(&runs);

    print_table(&rows);
    println!("{summary}");
}
