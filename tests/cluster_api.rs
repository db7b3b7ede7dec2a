//! The router, CQRS (request/reply included), the seed facade (`streamwise::redis_streams`)
//! and retention on a Redis Cluster (three masters, three replicas), through a
//! `redis-cluster://` URL: the single-server tests of tests/router_redis.rs, tests/cqrs.rs,
//! tests/seed_api.rs and tests/retention.rs, ported.
//!
//! One cluster for the whole binary (a cluster per test would take seconds each): one test owns
//! it and runs the scenarios one after another, each on streams of its own, so that the nodes
//! are killed when the test ends (a static cluster would never be dropped).

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use streamwise::cqrs::{Command, Cqrs, Event, Kind, Replies, ReplyError, TopicNaming};
use streamwise::dead_letter::{keys, stream_for};
use streamwise::redis::{RedisBackend, admin};
use streamwise::redis_streams::{
    Backpressure, BackpressureMode, Config, ConsumerGroupManager, ConsumerStatus, ProducerOptions,
    RedisConnection, StreamConsumer, StreamManager, StreamOptions, StreamProducer,
};
use streamwise::router::{DeliveryInfo, Json, Outcome, Permanent, Router, State};
use streamwise::testing::{RedisCluster, recv, unique_topic, wait_until_handled};
use streamwise::{Error, Message, Publisher, StartFrom, SubscribeOptions, Subscriber};
use streamwise_middleware::dead_letter::DeadLetterLayer;
use streamwise_middleware::retry::RetryLayer;
use streamwise_middleware::trace::TraceLayer;
use tokio::time::Instant;

use common::seed::{close_and_join, fast_consumer, next_event, run_consumer};

/// The longest any awaited condition may take.
const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_cqrs_and_seed_facade_work_on_a_cluster() {
    let cluster = RedisCluster::start();
    macro_rules! scenarios {
        ($($name:ident),+ $(,)?) => {$(
            eprintln!("scenario {}", stringify!($name));
            let started = Instant::now();
            $name(&cluster).await;
            eprintln!("  passed in {:?}", started.elapsed());
        )+};
    }
    scenarios!(
        router_handles_produces_retries_and_dead_letters,
        cqrs_commands_events_and_request_reply,
        seed_producer_group_and_consumer_round_trip,
        seed_consumer_keeps_pending_on_false_until_acknowledged,
        seed_producer_backpressure_waits_or_fails_fast,
        seed_config_builds_a_producer_and_consumer_for_the_cluster,
        retention_and_safe_trims_work_across_the_masters,
    );
}

/// Waits until `done` holds, failing the test after [`WAIT`] (polling: the conditions are
/// counters and stream lengths, which nothing signals).
async fn eventually(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The number of entries of `stream` (0 when it does not exist).
async fn stream_len(redis: &RedisBackend, stream: &str) -> u64 {
    match admin::stream_info(redis.connection(), stream).await {
        Ok(info) => info.length,
        Err(Error::StreamNotFound { .. }) => 0,
        Err(e) => panic!("XINFO STREAM {stream}: {e}"),
    }
}

/// The keys matching `pattern` on every master (`redis-cli --scan` on each).
fn keys_on_masters(cluster: &RedisCluster, pattern: &str) -> Vec<String> {
    let mut found = Vec::new();
    for node in cluster.masters() {
        let output = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &node.port().to_string()])
            .args(["--scan", "--pattern", pattern])
            .output()
            .expect("redis-cli runs");
        assert!(output.status.success(), "redis-cli --scan failed: {output:?}");
        found.extend(
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_owned),
        );
    }
    found
}

/// The hash slot of `key`.
fn slot(cluster: &RedisCluster, key: &str) -> String {
    cluster.cli(&["CLUSTER", "KEYSLOT", key]).trim().to_owned()
}

fn sorted(values: &Mutex<Vec<u32>>) -> Vec<u32> {
    let mut values = values.lock().unwrap().clone();
    values.sort_unstable();
    values
}

// ---------------------------------------------------------------------------------------------
// (a) The router.

/// What the order handlers share: where invoices go, and what each handler saw.
#[derive(Clone)]
struct Shop {
    invoices: String,
    placed: Arc<Mutex<Vec<u32>>>,
    invoiced: Arc<Mutex<Vec<u32>>>,
    flaky_calls: Arc<AtomicU32>,
    /// The delivery count of each call of the broken handler.
    broken_calls: Arc<Mutex<Vec<u64>>>,
}

async fn placed(State(shop): State<Shop>, Json(id): Json<u32>) -> Outcome {
    shop.placed.lock().unwrap().push(id);
    Outcome::ack().publish(
        shop.invoices.clone(),
        Message::new("invoice.requested", &id).unwrap(),
    )
}

async fn flaky(State(shop): State<Shop>, info: DeliveryInfo) -> Result<(), String> {
    // Fails on its first two calls (retried in-process by the RetryLayer), then works.
    if shop.flaky_calls.fetch_add(1, Ordering::SeqCst) < 2 {
        return Err(format!("busy (delivery {})", info.delivery_count()));
    }
    Ok(())
}

async fn broken(State(shop): State<Shop>, info: DeliveryInfo) -> Result<(), &'static str> {
    shop.broken_calls.lock().unwrap().push(info.delivery_count());
    Err("always broken")
}

async fn invoiced(State(shop): State<Shop>, Json(id): Json<u32>) {
    shop.invoiced.lock().unwrap().push(id);
}

/// A router with two subscriptions: orders (three routes under retry and dead-letter
/// middleware) consumed from a batch published before it started, and the invoices its
/// `order.placed` handler produces, consumed by the same router.
async fn router_handles_produces_retries_and_dead_letters(cluster: &RedisCluster) {
    let redis = RedisBackend::new(&cluster.url()).unwrap();
    let orders = unique_topic("orders");
    let shop = Shop {
        invoices: unique_topic("invoices"),
        placed: Arc::default(),
        invoiced: Arc::default(),
        flaky_calls: Arc::default(),
        broken_calls: Arc::default(),
    };
    const PLACED: u32 = 20;
    let mut batch: Vec<Message> = (0..PLACED)
        .map(|id| Message::new("order.placed", &id).unwrap())
        .collect();
    batch.insert(7, Message::new("order.flaky", &100u32).unwrap());
    batch.insert(13, Message::new("order.broken", &101u32).unwrap());
    let ids = redis.publisher().publish_batch(&orders, batch).await.unwrap();
    assert_eq!(ids.len(), PLACED as usize + 2);
    let broken_id = ids[13];

    let router = Router::with_state(shop.clone());
    let order_routes = router
        .routes()
        .route("order.placed", placed)
        .route("order.flaky", flaky)
        .route("order.broken", broken)
        .layer(
            RetryLayer::new(2)
                .unwrap()
                .backoff(Duration::from_millis(5), Duration::from_millis(20))
                .unwrap(),
        )
        .layer(DeadLetterLayer::new(2).unwrap());
    let invoice_routes = router.routes().route("invoice.requested", invoiced);
    let options = |group: &str| {
        SubscribeOptions::new(group, "w1")
            .start_from(StartFrom::Beginning)
            .block(Duration::from_millis(200))
    };
    let running = router
        .layer(TraceLayer::new())
        .subscribe(&orders, options("billing"), order_routes)
        .subscribe(&shop.invoices, options("mailer"), invoice_routes)
        .start(Arc::new(redis.subscriber().unwrap()), Arc::new(redis.publisher()))
        .await
        .unwrap();

    // placed: 20 deliveries; flaky: 1 (3 calls); broken: 2, then dead-lettered; invoices: 20.
    let expected = u64::from(PLACED) + 1 + 2 + u64::from(PLACED);
    wait_until_handled(&running, expected).await;
    let report = running.shutdown().await.unwrap();
    assert_eq!(
        (report.handled, report.abandoned, report.unflushed),
        (expected, 0, 0),
        "every delivery handled once, none more"
    );

    let all: Vec<u32> = (0..PLACED).collect();
    assert_eq!(
        sorted(&shop.placed),
        all,
        "each order.placed handled exactly once"
    );
    assert_eq!(
        sorted(&shop.invoiced),
        all,
        "each produced invoice consumed exactly once"
    );
    assert_eq!(
        shop.flaky_calls.load(Ordering::SeqCst),
        3,
        "two in-process retries"
    );
    assert_eq!(
        *shop.broken_calls.lock().unwrap(),
        [1, 1, 1, 2, 2, 2],
        "three calls on each of two deliveries"
    );
    assert_eq!(stream_len(&redis, &shop.invoices).await, u64::from(PLACED));
    assert_eq!(redis.pending_count(&orders, "billing").await.unwrap(), 0);
    assert_eq!(redis.pending_count(&shop.invoices, "mailer").await.unwrap(), 0);

    let dead_stream = stream_for(&orders);
    assert_eq!(dead_stream, format!("{{{orders}}}-dead"));
    assert_eq!(
        slot(cluster, &dead_stream),
        slot(cluster, &orders),
        "the dead letters share the slot of their stream"
    );
    let dead = admin::stream_info(redis.connection(), &dead_stream)
        .await
        .unwrap();
    assert_eq!(dead.length, 1);
    let record = dead.first_entry.unwrap().message().unwrap();
    assert_eq!(record.event_type(), "order.broken");
    assert_eq!(record.decode::<u32>().unwrap(), 101);
    let m = record.metadata();
    assert_eq!(m.get(keys::ORIGINAL_ID), Some(broken_id.to_string().as_str()));
    assert_eq!(m.get(keys::STREAM), Some(orders.as_str()));
    assert_eq!(m.get(keys::GROUP), Some("billing"));
    assert_eq!(
        m.get(keys::REASON),
        Some("failed on delivery 2 of 2: always broken")
    );
}

// ---------------------------------------------------------------------------------------------
// (b) CQRS.

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PlaceOrder {
    id: u32,
}
impl Command for PlaceOrder {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct GetPrice {
    sku: String,
}
impl Command for GetPrice {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderPlaced {
    id: u32,
}
impl Event for OrderPlaced {}

/// A service worker of the order service: handles `PlaceOrder` (emitting `OrderPlaced`) and
/// answers `GetPrice`; `handled` records each order it placed.
fn order_service(cqrs: &Cqrs, handled: Arc<Mutex<Vec<u32>>>) -> streamwise::cqrs::CommandProcessor {
    cqrs.command_processor("orders")
        .handle(move |cmd: PlaceOrder| {
            let handled = handled.clone();
            async move {
                handled.lock().unwrap().push(cmd.id);
                Ok::<_, Infallible>(OrderPlaced { id: cmd.id })
            }
        })
        .handle_with_reply(|q: GetPrice| async move {
            match q.sku.as_str() {
                "apple" => Ok(120u32),
                "plum" => Err(streamwise::BoxError::from(Permanent::new(
                    "plums are discontinued",
                ))),
                other => Err(format!("unknown sku {other}").into()),
            }
        })
}

/// An event handler recording the ids it saw.
fn recorder(
    seen: &Arc<Mutex<Vec<u32>>>,
) -> impl Fn(OrderPlaced) -> std::future::Ready<Result<(), Infallible>> + Clone + Send + Sync + 'static {
    let seen = seen.clone();
    move |e: OrderPlaced| {
        seen.lock().unwrap().push(e.id);
        std::future::ready(Ok(()))
    }
}

/// Two competing workers of a command processor and an event processor with two handlers, on
/// topics of this scenario's own: every command handled once, every event by every handler,
/// request/reply with results and errors, undecodable commands dead-lettered, and closed
/// replies leave nothing behind.
async fn cqrs_commands_events_and_request_reply(cluster: &RedisCluster) {
    let url = cluster.url();
    let prefix = unique_topic("cqrs");
    let naming = {
        let prefix = prefix.clone();
        TopicNaming::Custom(Arc::new(move |kind, name| match kind {
            Kind::Command => format!("{prefix}-commands-{name}"),
            Kind::Event => format!("{prefix}-events-{name}"),
        }))
    };
    let cqrs = Cqrs::new().with_naming(naming);
    let command_topic = cqrs.command_topic::<PlaceOrder>().unwrap();
    assert_eq!(command_topic, format!("{prefix}-commands-PlaceOrder"));

    // Two workers, each with a connection of its own, as two processes would be.
    let (by_a, by_b) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
    let (mailed, counted) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
    let events = cqrs
        .event_processor()
        .handle("mailer", recorder(&mailed))
        .handle("stats", recorder(&counted));
    let worker_a = RedisBackend::new(&url).unwrap();
    let router_a = order_service(&cqrs, by_a.clone())
        .register(Router::new(), "a")
        .unwrap();
    let router_a = events.register(router_a, "a").unwrap();
    let running_a = router_a
        .start(
            Arc::new(worker_a.subscriber().unwrap()),
            Arc::new(worker_a.publisher()),
        )
        .await
        .unwrap();
    let worker_b = RedisBackend::new(&url).unwrap();
    let running_b = order_service(&cqrs, by_b.clone())
        .register(Router::new(), "b")
        .unwrap()
        .start(
            Arc::new(worker_b.subscriber().unwrap()),
            Arc::new(worker_b.publisher()),
        )
        .await
        .unwrap();

    let client = RedisBackend::new(&url).unwrap();
    let replies = Replies::listen(Arc::new(client.subscriber().unwrap()))
        .await
        .unwrap();
    let reply_topic = replies.topic().to_owned();
    let bus = cqrs
        .command_bus(Arc::new(client.publisher()))
        .with_replies(replies.clone());
    const ORDERS: u32 = 20;
    for id in 0..ORDERS {
        bus.send(&PlaceOrder { id }).await.unwrap();
    }
    // An event published directly, not emitted by a command.
    cqrs.event_bus(Arc::new(client.publisher()))
        .publish(&OrderPlaced { id: 1000 })
        .await
        .unwrap();
    // A command that is not a PlaceOrder: dead-lettered without reaching a handler.
    client
        .publisher()
        .publish(
            &command_topic,
            Message::new("PlaceOrder", &"not an order").unwrap(),
        )
        .await
        .unwrap();

    // Request/reply, answered by whichever worker takes the command.
    let price: u32 = bus
        .send_and_wait(&GetPrice { sku: "apple".into() }, WAIT)
        .await
        .unwrap();
    assert_eq!(price, 120);
    match bus
        .send_and_wait::<_, u32>(&GetPrice { sku: "pear".into() }, WAIT)
        .await
    {
        Err(ReplyError::Handler(error)) => assert_eq!(
            (error.message.as_str(), error.permanent),
            ("unknown sku pear", false)
        ),
        other => panic!("expected the handler's error, got {other:?}"),
    }
    match bus
        .send_and_wait::<_, u32>(&GetPrice { sku: "plum".into() }, WAIT)
        .await
    {
        Err(ReplyError::Handler(error)) => {
            assert_eq!(error.message, "plums are discontinued");
            assert!(error.permanent, "the reply says the error was permanent");
        }
        other => panic!("expected the handler's permanent error, got {other:?}"),
    }
    match bus
        .send_and_wait::<_, String>(&GetPrice { sku: "apple".into() }, WAIT)
        .await
    {
        Err(ReplyError::Decode(_)) => {}
        other => panic!("expected a decode error for the wrong reply type, got {other:?}"),
    }

    let handled = || by_a.lock().unwrap().len() + by_b.lock().unwrap().len();
    let dead_commands = stream_for(&command_topic);
    eventually("every command and event handled", async || {
        handled() == ORDERS as usize
            && mailed.lock().unwrap().len() == ORDERS as usize + 1
            && counted.lock().unwrap().len() == ORDERS as usize + 1
            && stream_len(&client, &dead_commands).await == 1
    })
    .await;
    let report_a = running_a.shutdown().await.unwrap();
    let report_b = running_b.shutdown().await.unwrap();
    assert_eq!((report_a.abandoned, report_b.abandoned), (0, 0));
    eprintln!(
        "  commands placed by worker a: {}, by worker b: {}",
        by_a.lock().unwrap().len(),
        by_b.lock().unwrap().len()
    );

    let mut all_placed: Vec<u32> = by_a.lock().unwrap().clone();
    all_placed.extend(by_b.lock().unwrap().iter());
    all_placed.sort_unstable();
    assert_eq!(
        all_placed,
        (0..ORDERS).collect::<Vec<_>>(),
        "each command handled by exactly one worker, once"
    );
    let events_expected: Vec<u32> = (0..ORDERS).chain([1000]).collect();
    assert_eq!(
        sorted(&mailed),
        events_expected,
        "the mailer got every event once"
    );
    assert_eq!(sorted(&counted), events_expected, "stats got every event once");
    let event_topic = cqrs.event_topic::<OrderPlaced>().unwrap();
    assert_eq!(stream_len(&client, &event_topic).await, u64::from(ORDERS) + 1);
    assert_eq!(client.pending_count(&command_topic, "orders").await.unwrap(), 0);
    let price_topic = cqrs.command_topic::<GetPrice>().unwrap();
    assert_eq!(client.pending_count(&price_topic, "orders").await.unwrap(), 0);

    let dead = admin::stream_info(client.connection(), &dead_commands)
        .await
        .unwrap();
    let record = dead.first_entry.unwrap().message().unwrap();
    let reason = record.metadata().get(keys::REASON).unwrap_or_default();
    assert!(reason.contains("cannot decode PlaceOrder"), "{reason}");

    // Nobody handles commands now: the wait times out.
    let started = Instant::now();
    match bus
        .send_and_wait::<_, u32>(&GetPrice { sku: "apple".into() }, Duration::from_millis(200))
        .await
    {
        Err(ReplyError::Timeout(d)) => assert_eq!(d, Duration::from_millis(200)),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(200));

    // Closed replies delete the reply stream and everything beside it.
    assert!(
        stream_len(&client, &reply_topic).await >= 4,
        "the replies went through it"
    );
    let pattern = format!("*{reply_topic}*");
    assert!(
        !keys_on_masters(cluster, &pattern).is_empty(),
        "the reply stream is there"
    );
    replies.close().await.unwrap();
    assert!(matches!(
        admin::stream_info(client.connection(), &reply_topic).await,
        Err(Error::StreamNotFound { .. })
    ));
    let left = keys_on_masters(cluster, &pattern);
    assert!(left.is_empty(), "left behind by the closed replies: {left:?}");
    assert!(matches!(
        bus.send_and_wait::<_, u32>(&GetPrice { sku: "apple".into() }, WAIT)
            .await,
        Err(ReplyError::Closed)
    ));
}

// ---------------------------------------------------------------------------------------------
// (c) The seed facade.

/// The quickstart's flow: a stream created, events published with metadata, a group created,
/// a consumer filtering by event type and acknowledging, nothing left pending, its checkpoint
/// in Redis; then the stream deleted with every key beside it.
async fn seed_producer_group_and_consumer_round_trip(cluster: &RedisCluster) {
    let url = cluster.url();
    let stream = unique_topic("data-updates");
    let manager = StreamManager::new(&url).unwrap();
    let options = StreamOptions {
        max_length: Some(10_000),
        ..StreamOptions::default()
    };
    assert!(manager.create_stream(&stream, options).await.unwrap());
    assert!(
        !manager.create_stream(&stream, options).await.unwrap(),
        "it exists"
    );

    let producer = StreamProducer::new(&url, &stream).unwrap();
    // 0..9: even numbers are price updates, odd ones heartbeats; the last is a price update.
    let mut published = Vec::new();
    for n in 0..9u32 {
        let event_type = if n % 2 == 0 { "price.update" } else { "heartbeat" };
        let id = producer
            .publish(
                event_type,
                &serde_json::json!({"symbol": "AAPL", "n": n}),
                Some([("source", "market-feed")].into()),
            )
            .await
            .unwrap();
        published.push((n, event_type, id));
    }
    producer.close().await.unwrap();

    let groups = ConsumerGroupManager::new(&url).unwrap();
    assert!(groups.create_group(&stream, "processors", "0").await.unwrap());
    assert!(
        !groups.create_group(&stream, "processors", "0").await.unwrap(),
        "idempotent"
    );
    assert_eq!(groups.list_groups(&stream).await.unwrap(), ["processors"]);
    let info = groups.get_group_info(&stream, "processors").await.unwrap();
    assert_eq!((info.pending, info.lag), (0, Some(9)));

    let consumer = Arc::new(
        StreamConsumer::with_options(
            RedisConnection::new(&url).unwrap(),
            &stream,
            "processors",
            "worker-1",
            fast_consumer(),
        )
        .unwrap(),
    );
    let (mut events, task) = run_consumer(consumer.clone(), Some(vec!["price.update"]), |_| true);
    for (n, _, id) in published.iter().filter(|(_, t, _)| *t == "price.update") {
        let msg = next_event(&mut events).await;
        assert_eq!(msg.id, *id);
        assert_eq!(msg.stream, stream);
        assert_eq!(msg.event_type, "price.update");
        assert_eq!(msg.payload, serde_json::json!({"symbol": "AAPL", "n": n}));
        assert_eq!(msg.metadata.get("source"), Some("market-feed"));
        assert_eq!(msg.delivery_count, 1);
    }
    eventually("the heartbeats skipped", async || consumer.skipped() == 4).await;
    assert_eq!(
        groups
            .check_consumer(&stream, "processors", "worker-1")
            .await
            .unwrap()
            .status,
        ConsumerStatus::Active
    );
    close_and_join(&consumer, task).await;
    assert!(events.try_recv().is_err(), "heartbeats never reach the callback");
    assert_eq!(consumer.skipped(), 4);
    assert!(
        consumer.get_pending().await.unwrap().is_empty(),
        "all acknowledged"
    );
    let info = groups.get_group_info(&stream, "processors").await.unwrap();
    assert_eq!((info.pending, info.lag), (0, Some(0)));
    assert_eq!(consumer.lag().await.unwrap(), Some(0));
    let last = &published.last().unwrap().2;
    assert_eq!(
        consumer.position().await.unwrap().unwrap().message_id.to_string(),
        *last,
        "the checkpoint is at the last entry"
    );

    let pattern = format!("*{stream}*");
    let before = keys_on_masters(cluster, &pattern);
    assert!(
        before.len() >= 3,
        "the stream, its settings and checkpoints: {before:?}"
    );
    assert_eq!(manager.delete_stream(&stream).await.unwrap(), before.len() as u64);
    assert!(matches!(
        manager.get_stream_info(&stream).await,
        Err(Error::StreamNotFound { .. })
    ));
    let left = keys_on_masters(cluster, &pattern);
    assert!(left.is_empty(), "left behind by delete_stream: {left:?}");
}

/// `false` keeps an event pending until `acknowledge`.
async fn seed_consumer_keeps_pending_on_false_until_acknowledged(cluster: &RedisCluster) {
    let url = cluster.url();
    let stream = unique_topic("jobs");
    let groups = ConsumerGroupManager::new(&url).unwrap();
    assert!(groups.create_group(&stream, "workers", "0").await.unwrap());
    let producer = StreamProducer::new(&url, &stream).unwrap();
    let keep = producer
        .publish("job", &serde_json::json!({"keep": true}), None)
        .await
        .unwrap();
    let done = producer
        .publish("job", &serde_json::json!({"keep": false}), None)
        .await
        .unwrap();
    let consumer = Arc::new(
        StreamConsumer::with_options(
            RedisConnection::new(&url).unwrap(),
            &stream,
            "workers",
            "w1",
            fast_consumer(),
        )
        .unwrap(),
    );
    let (mut events, task) = run_consumer(consumer.clone(), None, |m| m.payload["keep"] == false);
    assert_eq!(next_event(&mut events).await.id, keep);
    assert_eq!(next_event(&mut events).await.id, done);
    close_and_join(&consumer, task).await;

    let pending = consumer.get_pending().await.unwrap();
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(
        (pending[0].id.as_str(), pending[0].consumer.as_str()),
        (keep.as_str(), "w1")
    );
    assert_eq!(pending[0].delivered, 1);
    assert_eq!(consumer.acknowledge(&keep).await.unwrap(), 1);
    assert_eq!(
        consumer.acknowledge(&keep).await.unwrap(),
        0,
        "already acknowledged"
    );
    assert!(consumer.get_pending().await.unwrap().is_empty());
    assert_eq!(
        groups.get_group_info(&stream, "workers").await.unwrap().pending,
        0
    );
}

/// A producer watching a group's lag fails fast, waits until the group catches up, or gives
/// up after its `max_wait`.
async fn seed_producer_backpressure_waits_or_fails_fast(cluster: &RedisCluster) {
    let url = cluster.url();
    let stream = unique_topic("busy");
    let groups = ConsumerGroupManager::new(&url).unwrap();
    assert!(groups.create_group(&stream, "slow", "$").await.unwrap());
    let plain = StreamProducer::new(&url, &stream).unwrap();
    for n in 0..5 {
        plain.publish("t", &n, None).await.unwrap();
    }
    let with_backpressure = |mode| {
        let options = ProducerOptions {
            backpressure: Some(Backpressure::new("slow", 3, mode)),
            ..ProducerOptions::default()
        };
        StreamProducer::with_options(RedisConnection::new(&url).unwrap(), &stream, options).unwrap()
    };
    let fail_fast = with_backpressure(BackpressureMode::FailFast);
    match fail_fast.publish("t", &9, None).await {
        Err(Error::Backpressure {
            lag, limit, group, ..
        }) => assert_eq!((lag, limit, group.as_str()), (5, 3, "slow")),
        other => panic!("expected Backpressure, got {other:?}"),
    }

    let waiting = with_backpressure(BackpressureMode::Wait { max_wait: WAIT });
    let mut publish = tokio::spawn(async move { waiting.publish("t", &10, None).await });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut publish)
            .await
            .is_err(),
        "the publish waits while the group lags"
    );
    assert_eq!(groups.get_group_info(&stream, "slow").await.unwrap().lag, Some(5));
    // The group catches up: the waiting publish goes through.
    let read = cluster.cli(&[
        "XREADGROUP",
        "GROUP",
        "slow",
        "c",
        "COUNT",
        "100",
        "STREAMS",
        &stream,
        ">",
    ]);
    assert!(!read.trim().is_empty(), "the group read the backlog");
    let id = tokio::time::timeout(WAIT, publish)
        .await
        .expect("the waiting publish goes through once the group caught up")
        .unwrap()
        .unwrap();
    assert!(id.contains('-'), "{id}");
    assert_eq!(groups.get_group_info(&stream, "slow").await.unwrap().lag, Some(1));

    let give_up = with_backpressure(BackpressureMode::Wait {
        max_wait: Duration::from_millis(300),
    });
    for n in 0..5 {
        plain.publish("t", &n, None).await.unwrap();
    }
    let started = Instant::now();
    assert!(matches!(
        give_up.publish("t", &1, None).await,
        Err(Error::Backpressure { .. })
    ));
    assert!(started.elapsed() >= Duration::from_millis(300));
}

/// A YAML configuration with the cluster URL gives a producer and a consumer that work.
async fn seed_config_builds_a_producer_and_consumer_for_the_cluster(cluster: &RedisCluster) {
    let url = cluster.url();
    let stream = unique_topic("configured");
    let yaml = format!(
        "redis_streams:\n  producer:\n    redis_url: \"{url}\"\n    stream_name: \"{stream}\"\n  \
         consumer:\n    redis_url: \"{url}\"\n    streams:\n      - name: \"{stream}\"\n        \
         group: \"g\"\n        consumer: \"c1\"\n    block_ms: 100\n"
    );
    let config = Config::from_yaml_str(&yaml).unwrap();
    assert_eq!(config.redis_url, url);
    ConsumerGroupManager::new(&url)
        .unwrap()
        .create_group(&stream, "g", "0")
        .await
        .unwrap();
    let producer = config.stream_producer().unwrap();
    let id = producer.publish("configured", &7, None).await.unwrap();
    let consumer = Arc::new(config.stream_consumer(0).unwrap());
    let (mut events, task) = run_consumer(consumer.clone(), None, |_| true);
    let msg = next_event(&mut events).await;
    assert_eq!(
        (msg.id.as_str(), msg.payload.clone()),
        (id.as_str(), serde_json::json!(7))
    );
    close_and_join(&consumer, task).await;
    assert!(consumer.get_pending().await.unwrap().is_empty());

    // The same stream read through the backend API: the entry is the configured producer's.
    let redis = RedisBackend::new(&url).unwrap();
    let subscriber = redis.subscriber().unwrap();
    let mut deliveries = subscriber
        .subscribe(
            &stream,
            SubscribeOptions::new("audit", "a").block(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    let delivery = recv(&mut deliveries).await;
    assert_eq!(delivery.id().to_string(), id);
    delivery.ack().await.unwrap();
    subscriber.close().await.unwrap();
    assert_eq!(redis.pending_count(&stream, "audit").await.unwrap(), 0);
}

/// The background retention task finds streams with settings on every master, trims one by
/// its length limit and holds back on another whose group has entries pending; the safe trim
/// and the operators' guarded trim hold back the same way (their scripts read the stream's
/// lease keys, in its slot).
async fn retention_and_safe_trims_work_across_the_masters(cluster: &RedisCluster) {
    use streamwise::redis::ops::{self, Mode, TrimGuard, TrimTo};
    use streamwise::redis::retention::{Retention, TrimPolicy, trim};

    let redis = RedisBackend::new(&cluster.url()).unwrap();
    let conn = redis.connection().clone();
    let settings = admin::StreamSettings {
        retention_ms: None,
        max_length: Some(2),
    };
    // Streams on every master.
    let mut free: Vec<String> = Vec::new();
    let mut masters = std::collections::HashSet::new();
    while masters.len() < cluster.masters().len() {
        let topic = unique_topic("kept-short");
        if masters.insert(cluster.master_of(&topic).unwrap().port()) {
            free.push(topic);
        }
    }
    let held = unique_topic("held");
    for topic in free.iter().chain([&held]) {
        admin::create_stream(&conn, topic, settings).await.unwrap();
        let batch = (0..5).map(|n| Message::new("t", &n).unwrap()).collect();
        redis.publisher().publish_batch(topic, batch).await.unwrap();
    }
    common::hold_three(&conn, &held).await;

    let task = Retention::new(conn.clone())
        .interval(Duration::from_millis(100))
        .spawn();
    for topic in &free {
        eventually("each stream trimmed to its length limit", async || {
            stream_len(&redis, topic).await == 2
        })
        .await;
    }
    eventually("the held stream's trim held back", async || {
        task.stats().held_back() >= 1
    })
    .await;
    task.stop().await;
    assert_eq!(stream_len(&redis, &held).await, 5);

    let trimmed = trim(&conn, &held, &TrimPolicy::default().max_length(2))
        .await
        .unwrap();
    assert_eq!((trimmed.removed, trimmed.held_back), (0, true));
    let report = ops::trim(
        &conn,
        &held,
        TrimTo::MaxLen(2),
        Mode::Execute,
        TrimGuard::default(),
    )
    .await
    .unwrap();
    assert!(report.refused, "{report:?}");
    assert_eq!(report.streams[0].protected_for, ["holding"]);
    assert_eq!(stream_len(&redis, &held).await, 5);
}
