//! What the CLI's tests share: running the built `streamwise` binary, reading Redis directly
//! to check what it printed, and making data with the library (workers that ack, dead-letter
//! or crash).

#![allow(dead_code, unreachable_pub)] // each test binary uses part of this module

use std::future::Future;
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use serde_json::Value as Json;
use streamwise::partition::PartitionedSubscriber;
use streamwise::redis::client::{Value, cmd};
use streamwise::redis::{RedisBackend, RedisConnection, RedisSubscriber, RedisSubscriberOptions};
use streamwise::{Delivery, Message, Publisher, SubscribeOptions, Subscriber};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use streamwise::testing::RedisServer;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_streamwise");

/// What one run of the binary gave.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn of(output: Output) -> Run {
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Stdout as JSON.
    pub fn json(&self) -> Json {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Runs `streamwise --url <url> args...` to its end.
pub async fn cli(url: &str, args: &[&str]) -> Run {
    let output = tokio::process::Command::new(BIN)
        .arg("--url")
        .arg(url)
        .args(args)
        .env_remove("REDIS_URL")
        .output()
        .await
        .expect("the binary runs");
    Run::of(output)
}

/// Runs `streamwise --url <url> --output json args...`, checks its exit code and parses stdout.
pub async fn cli_json(url: &str, args: &[&str], code: i32) -> Json {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let run = cli(url, &all).await;
    assert_eq!(run.code, code, "{args:?}: {run:#?}");
    run.json()
}

/// Starts `streamwise --url <url> --output json args...` without waiting for its end.
pub fn spawn_cli(url: &str, args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(BIN)
        .args(["--url", url, "--output", "json"])
        .args(args)
        .env_remove("REDIS_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary runs")
}

/// Sends SIGINT to `child` and waits for its end: what it printed, with stdout as JSON.
pub async fn interrupt(child: tokio::process::Child) -> (Run, Json) {
    let pid = child.id().expect("still running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let run = Run::of(child.wait_with_output().await.unwrap());
    let report = run.json();
    (run, report)
}

/// The name of the key where an unfinished replay of `topic`'s dead letters stops.
pub fn resume_key(stream: &str) -> String {
    format!(
        "streamwise:replay:{}",
        streamwise::dead_letter::stream_for(stream)
    )
}

/// A server with a backend and a plain connection on it.
pub struct Env {
    pub server: RedisServer,
    pub url: String,
    pub redis: RedisBackend,
}

impl Env {
    pub fn start() -> Env {
        let server = RedisServer::start();
        let url = server.url();
        let redis = RedisBackend::new(&url).expect("url");
        Env { server, url, redis }
    }

    pub fn conn(&self) -> &RedisConnection {
        self.redis.connection()
    }

    /// Any command's reply.
    pub async fn cmd(&self, args: &[&str]) -> Value {
        let mut c = cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        self.conn().command(&c).await.expect("command")
    }

    pub async fn xlen(&self, stream: &str) -> u64 {
        self.conn().command(cmd("XLEN").arg(stream)).await.expect("XLEN")
    }

    pub async fn exists(&self, key: &str) -> bool {
        int(&self.cmd(&["EXISTS", key]).await) == 1
    }

    /// Adds `message` to `stream` in the wire format under `id` (`*`: the next id) and
    /// returns its id.
    pub async fn add(&self, stream: &str, id: &str, message: &Message) -> String {
        use streamwise::codec::Codec;
        let mut c = cmd("XADD");
        c.arg(stream).arg(id);
        for (field, value) in streamwise::codec::JsonCodec.encode(message).unwrap() {
            c.arg(field).arg(&value[..]);
        }
        self.conn().command(&c).await.expect("XADD")
    }

    /// Publishes `n` messages `order.placed` `{"n": i}` to `topic`.
    pub async fn publish(&self, topic: &str, n: u64) {
        let publisher = self.redis.publisher();
        for i in 0..n {
            publisher
                .publish(
                    topic,
                    Message::new("order.placed", &serde_json::json!({ "n": i })).unwrap(),
                )
                .await
                .expect("publish");
        }
    }

    /// The records of a dead-letter stream, decoded, oldest first.
    pub async fn dead_letters(&self, topic: &str) -> Vec<(String, Message)> {
        self.entries(&streamwise::dead_letter::stream_for(topic)).await
    }

    /// The entries of a stream, decoded, oldest first.
    pub async fn entries(&self, stream: &str) -> Vec<(String, Message)> {
        let reply = self.cmd(&["XRANGE", stream, "-", "+"]).await;
        let Value::Array(entries) = reply else {
            return Vec::new();
        };
        entries
            .into_iter()
            .map(|e| {
                let Value::Array(parts) = e else { panic!("entry") };
                let [Value::BulkString(id), Value::Array(fields)] = parts.as_slice() else {
                    panic!("entry shape")
                };
                let fields: Vec<(bytes::Bytes, bytes::Bytes)> = fields
                    .chunks(2)
                    .map(|kv| match kv {
                        [Value::BulkString(k), Value::BulkString(v)] => {
                            (bytes::Bytes::from(k.clone()), bytes::Bytes::from(v.clone()))
                        }
                        _ => panic!("field"),
                    })
                    .collect();
                let id = String::from_utf8(id.clone()).unwrap();
                let raw = streamwise::codec::RawEntry {
                    id: id.parse().unwrap(),
                    fields,
                };
                use streamwise::codec::Codec;
                (
                    id,
                    streamwise::codec::JsonCodec
                        .decode(raw)
                        .expect("a streamwise entry"),
                )
            })
            .collect()
    }
}

/// Waits until `condition` holds, polling every 20 ms, at most `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a worker does with each delivery.
pub type Handler = fn(Delivery) -> BoxFuture<'static, ()>;

/// A handler that acks.
pub fn acks(d: Delivery) -> BoxFuture<'static, ()> {
    Box::pin(async move { d.ack().await.expect("ack") })
}

/// A handler that still fails: it dead-letters every delivery.
pub fn fails(d: Delivery) -> BoxFuture<'static, ()> {
    Box::pin(async move { d.dead_letter("payment service down").await.expect("dead letter") })
}

/// A handler that keeps every delivery pending.
pub fn holds(d: Delivery) -> BoxFuture<'static, ()> {
    Box::pin(async move { std::mem::forget(d) })
}

/// A consumer that runs `handler` on every delivery until stopped.
pub struct Worker {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Worker {
    pub async fn start(
        url: &str,
        topic: &str,
        options: SubscribeOptions,
        subscriber_options: RedisSubscriberOptions,
        handler: Handler,
    ) -> Worker {
        let conn = RedisConnection::new(url).unwrap();
        let subscriber = RedisSubscriber::new(conn, subscriber_options).unwrap();
        Worker::on(Arc::new(subscriber), topic, options, handler).await
    }

    /// A member of `options`' group on the partitioned `topic` (of `partitions`), alone in
    /// it, so that it reads every partition.
    pub async fn start_partitioned(
        url: &str,
        topic: &str,
        partitions: u32,
        options: SubscribeOptions,
        handler: Handler,
    ) -> Worker {
        let redis = RedisBackend::new(url).unwrap();
        let subscriber = PartitionedSubscriber::new(
            Arc::new(redis.subscriber().unwrap()),
            Arc::new(redis.coordinator()),
        )
        .topic(topic, partitions);
        Worker::on(Arc::new(subscriber), topic, options, handler).await
    }

    async fn on(
        subscriber: Arc<dyn Subscriber>,
        topic: &str,
        options: SubscribeOptions,
        handler: Handler,
    ) -> Worker {
        let mut deliveries = subscriber.subscribe(topic, options).await.expect("subscribe");
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    next = deliveries.next() => match next {
                        Some(Ok(d)) => handler(d).await,
                        Some(Err(e)) => panic!("delivery error: {e}"),
                        None => break,
                    },
                }
            }
            deliveries.flush().await.expect("flush");
            subscriber.close().await.expect("close");
        });
        Worker {
            stop: Some(stop),
            task,
        }
    }

    /// Stops reading, flushes and closes (releasing the lease).
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.expect("worker task");
    }
}

/// A consumer that takes `n` deliveries of `topic` in `group` and then dies without closing
/// (its runtime is shut down): its lease runs out after `lease_ttl` and its entries stay
/// pending, as after a SIGKILL.
pub async fn crash_a_consumer(
    url: &str,
    topic: &str,
    group: &str,
    consumer: &str,
    n: usize,
    lease_ttl: Duration,
) {
    let (url, topic, group, consumer) = (
        url.to_owned(),
        topic.to_owned(),
        group.to_owned(),
        consumer.to_owned(),
    );
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let conn = RedisConnection::new(&url).unwrap();
            let subscriber =
                RedisSubscriber::new(conn, RedisSubscriberOptions::default().lease_ttl(lease_ttl)).unwrap();
            let mut deliveries = subscriber
                .subscribe(&topic, SubscribeOptions::new(&group, &consumer).max_in_flight(n))
                .await
                .unwrap();
            for _ in 0..n {
                std::mem::forget(deliveries.next().await.unwrap().unwrap());
            }
            std::mem::forget(deliveries);
            std::mem::forget(subscriber);
        });
        runtime.shutdown_background();
    });
    tokio::task::spawn_blocking(move || thread.join().unwrap())
        .await
        .unwrap();
}

/// The `XINFO GROUPS` records of a stream, as maps.
pub async fn xinfo(env: &Env, args: &[&str]) -> Vec<std::collections::BTreeMap<String, Value>> {
    let Value::Array(records) = env.cmd(args).await else {
        panic!("XINFO")
    };
    records
        .into_iter()
        .map(|r| match r {
            Value::Array(kv) => kv
                .chunks(2)
                .map(|kv| match kv {
                    [Value::BulkString(k), v] => (String::from_utf8(k.clone()).unwrap(), v.clone()),
                    [Value::SimpleString(k), v] => (k.clone(), v.clone()),
                    _ => panic!("record"),
                })
                .collect(),
            Value::Map(kv) => kv
                .into_iter()
                .map(|(k, v)| match k {
                    Value::BulkString(k) => (String::from_utf8(k).unwrap(), v),
                    Value::SimpleString(k) => (k, v),
                    _ => panic!("record key"),
                })
                .collect(),
            _ => panic!("record"),
        })
        .collect()
}

/// A reply value as text.
pub fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).unwrap(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Nil => "nil".to_owned(),
        other => format!("{other:?}"),
    }
}

/// A reply value as a number.
pub fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        other => text(other).parse().unwrap(),
    }
}
