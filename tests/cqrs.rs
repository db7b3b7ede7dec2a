//! CQRS on the in-memory backend: typed handlers, one handler per command, fan-out of events,
//! event groups in order, topic naming, middleware, request/reply, and the scenario helper.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use streamwise::cqrs::testing::Scenario;
use streamwise::cqrs::{Command, Cqrs, Emit, Event, Kind, Replies, ReplyError, TopicNaming};
use streamwise::memory::MemoryBackend;
use streamwise::router::{Permanent, RetryBackoff, Router, RunningRouter};
use streamwise::{Message, Publisher};
use streamwise_middleware::dead_letter::DeadLetterLayer;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PlaceOrder {
    id: u32,
    customer: String,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderShipped {
    id: u32,
}
impl Event for OrderShipped {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Renamed;
impl Event for Renamed {
    fn name() -> std::borrow::Cow<'static, str> {
        "orders.renamed.v2".into()
    }
}

fn place(id: u32) -> PlaceOrder {
    PlaceOrder {
        id,
        customer: "ada".into(),
    }
}

async fn until_idle(backend: &MemoryBackend) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !backend.is_idle() {
        assert!(tokio::time::Instant::now() < deadline, "messages never settled");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn start(router: Router, backend: &MemoryBackend) -> RunningRouter {
    router
        .start(Arc::new(backend.subscriber()), Arc::new(backend.publisher()))
        .await
        .unwrap()
}

#[tokio::test]
async fn commands_are_typed_and_their_events_published_under_their_names() {
    let cqrs = Cqrs::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let commands = cqrs.command_processor("orders").handle(move |cmd: PlaceOrder| {
        let log = log.clone();
        async move {
            log.lock().unwrap().push(cmd.clone());
            Ok::<_, Infallible>(
                Emit::new()
                    .event(OrderPlaced { id: cmd.id })
                    .event(OrderShipped { id: cmd.id }),
            )
        }
    });
    let produced = Scenario::new(cqrs.clone())
        .commands(commands)
        .unwrap()
        .when(&place(7))
        .await
        .unwrap();
    assert_eq!(*seen.lock().unwrap(), [place(7)]);
    assert_eq!(produced.events::<OrderPlaced>().unwrap(), [OrderPlaced { id: 7 }]);
    assert_eq!(
        produced.events::<OrderShipped>().unwrap(),
        [OrderShipped { id: 7 }]
    );
    let command_entries = produced.backend().messages("commands-PlaceOrder").unwrap();
    assert_eq!(
        command_entries[0].1.event_type(),
        "PlaceOrder",
        "the type name travels in event_type"
    );
    assert_eq!(cqrs.event_topic::<Renamed>().unwrap(), "events-orders-renamed-v2");
}

#[tokio::test]
async fn a_command_type_has_exactly_one_handler() {
    let cqrs = Cqrs::new();
    let twice = cqrs
        .command_processor("orders")
        .handle(|_: PlaceOrder| async { Ok::<_, Infallible>(()) })
        .handle(|_: PlaceOrder| async { Ok::<_, Infallible>(()) });
    let err = twice.register(Router::new(), "w1").unwrap_err();
    assert_eq!(err.invalid_field(), Some("command"));
    assert!(
        err.to_string().contains("PlaceOrder has a handler already"),
        "{err}"
    );
}

#[tokio::test]
async fn commands_go_to_one_of_the_competing_consumers() {
    let backend = MemoryBackend::new();
    let cqrs = Cqrs::new();
    let handled = Arc::new(Mutex::new(Vec::new()));
    let processor = |who: &'static str| {
        let handled = handled.clone();
        cqrs.command_processor("orders").handle(move |cmd: PlaceOrder| {
            let handled = handled.clone();
            async move {
                handled.lock().unwrap().push((who, cmd.id));
                Ok::<_, Infallible>(())
            }
        })
    };
    let a = start(processor("a").register(Router::new(), "a").unwrap(), &backend).await;
    let b = start(processor("b").register(Router::new(), "b").unwrap(), &backend).await;
    let bus = cqrs.command_bus(Arc::new(backend.publisher()));
    for id in 0..50 {
        bus.send(&place(id)).await.unwrap();
    }
    until_idle(&backend).await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    let mut ids: Vec<u32> = handled.lock().unwrap().iter().map(|(_, id)| *id).collect();
    ids.sort();
    assert_eq!(
        ids,
        (0..50).collect::<Vec<_>>(),
        "each command handled exactly once"
    );
}

#[tokio::test]
async fn every_event_handler_gets_every_event() {
    let cqrs = Cqrs::new();
    let (emails, stats) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let (e, s) = (emails.clone(), stats.clone());
    let events = cqrs
        .event_processor()
        .handle("send-email", move |_: OrderPlaced| {
            let e = e.clone();
            async move {
                e.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Infallible>(())
            }
        })
        .handle("update-stats", move |_: OrderPlaced| {
            let s = s.clone();
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Infallible>(())
            }
        });
    let commands = cqrs
        .command_processor("orders")
        .handle(|c: PlaceOrder| async move { Ok::<_, Infallible>(OrderPlaced { id: c.id }) });
    Scenario::new(cqrs)
        .commands(commands)
        .unwrap()
        .events(events)
        .unwrap()
        .given([OrderPlaced { id: 1 }, OrderPlaced { id: 2 }])
        .unwrap()
        .when(&place(3))
        .await
        .unwrap();
    assert_eq!(emails.load(Ordering::SeqCst), 3);
    assert_eq!(stats.load(Ordering::SeqCst), 3);

    let cqrs = Cqrs::new();
    let same_name = cqrs
        .event_processor()
        .handle("dup", |_: OrderPlaced| async { Ok::<_, Infallible>(()) })
        .handle("dup", |_: OrderShipped| async { Ok::<_, Infallible>(()) });
    assert_eq!(
        same_name
            .register(Router::new(), "w")
            .unwrap_err()
            .invalid_field(),
        Some("handler_name")
    );
}

#[tokio::test]
async fn an_event_group_sees_its_types_in_order_on_a_shared_topic() {
    let shared = TopicNaming::Shared {
        commands: "commands".into(),
        events: "order-events".into(),
    };
    let cqrs = Cqrs::new().with_naming(shared);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (a, b) = (seen.clone(), seen.clone());
    let group = cqrs
        .event_group("shipping")
        .handle(move |e: OrderPlaced| {
            let a = a.clone();
            async move {
                a.lock().unwrap().push(format!("placed {}", e.id));
                Ok::<_, Infallible>(())
            }
        })
        .handle(move |e: OrderShipped| {
            let b = b.clone();
            async move {
                b.lock().unwrap().push(format!("shipped {}", e.id));
                Ok::<_, Infallible>(())
            }
        });
    let commands = cqrs
        .command_processor("orders")
        .handle(|c: PlaceOrder| async move {
            Ok::<_, Infallible>(
                Emit::new()
                    .event(OrderPlaced { id: c.id })
                    .event(OrderShipped { id: c.id }),
            )
        });
    let produced = Scenario::new(cqrs.clone())
        .commands(commands)
        .unwrap()
        .event_group(group)
        .unwrap()
        .when(&place(1))
        .await
        .unwrap();
    assert_eq!(*seen.lock().unwrap(), ["placed 1", "shipped 1"]);
    assert_eq!(produced.backend().stream_len("order-events").unwrap(), 2);

    // Per-type topics cannot be read in order together.
    let err = Cqrs::new()
        .event_group("shipping")
        .handle(|_: OrderPlaced| async { Ok::<_, Infallible>(()) })
        .handle(|_: OrderShipped| async { Ok::<_, Infallible>(()) })
        .register(Router::new(), "w")
        .unwrap_err();
    assert_eq!(err.invalid_field(), Some("event_group"));
}

#[tokio::test]
async fn topic_naming_is_pluggable_and_checked() {
    let custom = TopicNaming::Custom(Arc::new(|kind, name| match kind {
        Kind::Command => format!("svc_{}", name.to_lowercase()),
        Kind::Event => "svc_events".into(),
    }));
    let cqrs = Cqrs::new().with_naming(custom);
    assert_eq!(cqrs.command_topic::<PlaceOrder>().unwrap(), "svc_placeorder");
    assert_eq!(cqrs.event_topic::<OrderPlaced>().unwrap(), "svc_events");
    let bad = Cqrs::new().with_naming(TopicNaming::Custom(Arc::new(|_, n| format!("bad topic {n}"))));
    assert_eq!(
        bad.command_topic::<PlaceOrder>().unwrap_err().invalid_field(),
        Some("topic")
    );
    let err = bad
        .command_processor("orders")
        .handle(|_: PlaceOrder| async { Ok::<_, Infallible>(()) })
        .register(Router::new(), "w")
        .unwrap_err();
    assert_eq!(err.invalid_field(), Some("topic"));
}

/// A processor's layer wraps each of its subscriptions: here an event with two handlers, a
/// consumer group each, passes the one layer twice.
#[tokio::test]
async fn a_processor_layer_wraps_every_subscription_of_the_processor() {
    let cqrs = Cqrs::new();
    let through_layer = Arc::new(AtomicU32::new(0));
    let counter = through_layer.clone();
    let count = tower::util::MapRequestLayer::new(move |incoming: streamwise::router::Incoming| {
        counter.fetch_add(1, Ordering::SeqCst);
        incoming
    });
    let events = cqrs
        .event_processor()
        .handle("mailer", |_: OrderPlaced| async { Ok::<_, Infallible>(()) })
        .handle("billing", |_: OrderPlaced| async { Ok::<_, Infallible>(()) })
        .layer(count);
    let backend = MemoryBackend::new();
    let running = start(events.register(Router::new(), "w").unwrap(), &backend).await;
    cqrs.event_bus(Arc::new(backend.publisher()))
        .publish(&OrderPlaced { id: 1 })
        .await
        .unwrap();
    streamwise::testing::wait_until_handled(&running, 2).await;
    running.shutdown().await.unwrap();
    assert_eq!(through_layer.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn handlers_get_middleware_and_bad_commands_are_dead_lettered() {
    let cqrs = Cqrs::new();
    let attempts = Arc::new(AtomicU32::new(0));
    let counter = attempts.clone();
    let commands = cqrs
        .command_processor("orders")
        .handle(move |_: PlaceOrder| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>("the warehouse is unreachable")
            }
        })
        .layer(DeadLetterLayer::new(2).unwrap());
    let produced = Scenario::new(cqrs.clone())
        .commands(commands)
        .unwrap()
        .when(&place(9))
        .await
        .unwrap();
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        2,
        "nacked once, dead-lettered on the second delivery"
    );
    let dead = produced.dead_letters("commands-PlaceOrder").unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0]
            .metadata()
            .get(streamwise::dead_letter::keys::REASON)
            .unwrap()
            .contains("the warehouse is unreachable")
    );

    // A payload that is not a PlaceOrder never reaches the handler.
    let backend = MemoryBackend::new();
    let commands = cqrs
        .command_processor("orders")
        .handle(|_: PlaceOrder| async { panic!("not called") as Result<(), Infallible> });
    let running = start(commands.register(Router::new(), "w").unwrap(), &backend).await;
    backend
        .publisher()
        .publish(
            "commands-PlaceOrder",
            Message::new("PlaceOrder", &"not an order").unwrap(),
        )
        .await
        .unwrap();
    until_idle(&backend).await;
    running.shutdown().await.unwrap();
    let dead = backend.messages("{commands-PlaceOrder}-dead").unwrap();
    assert!(
        dead[0]
            .1
            .metadata()
            .get(streamwise::dead_letter::keys::REASON)
            .unwrap()
            .contains("cannot decode PlaceOrder")
    );
}

/// The times of each call of a handler that fails its first call.
#[derive(Clone, Default)]
struct FailsOnce(Arc<Mutex<Vec<tokio::time::Instant>>>);

impl FailsOnce {
    fn call(&self) -> Result<(), &'static str> {
        let mut calls = self.0.lock().unwrap();
        calls.push(tokio::time::Instant::now());
        if calls.len() == 1 {
            Err("the database is down")
        } else {
            Ok(())
        }
    }

    /// The wait between the failed call and the next.
    fn gap(&self) -> Duration {
        let calls = self.0.lock().unwrap();
        assert_eq!(calls.len(), 2, "failed once, then handled");
        calls[1] - calls[0]
    }
}

#[tokio::test]
async fn failed_commands_and_events_come_back_after_the_default_backoff() {
    let cqrs = Cqrs::new();
    let (command, event) = (FailsOnce::default(), FailsOnce::default());
    let c = command.clone();
    let commands = cqrs.command_processor("orders").handle(move |p: PlaceOrder| {
        let c = c.clone();
        async move { c.call().map(|()| OrderPlaced { id: p.id }) }
    });
    let e = event.clone();
    let events = cqrs.event_processor().handle("notify", move |_: OrderPlaced| {
        let e = e.clone();
        async move { e.call() }
    });
    let produced = Scenario::new(cqrs)
        .commands(commands)
        .unwrap()
        .events(events)
        .unwrap()
        .when(&place(4))
        .await
        .unwrap();
    // The router's default: the first redelivery no sooner than 100 ms after the failure.
    assert!(command.gap() >= Duration::from_millis(100), "{:?}", command.gap());
    assert!(event.gap() >= Duration::from_millis(100), "{:?}", event.gap());
    assert_eq!(produced.events::<OrderPlaced>().unwrap(), [OrderPlaced { id: 4 }]);
    assert!(produced.dead_letters("commands-PlaceOrder").unwrap().is_empty());
}

#[tokio::test]
async fn a_scenario_sets_the_retry_backoff() {
    let cqrs = Cqrs::new();
    let commands = cqrs
        .command_processor("orders")
        .handle(|_: PlaceOrder| async { Err::<(), _>("the warehouse is unreachable") });
    // All ten deliveries at once: dead-lettered within the scenario's wait, which the
    // default's 32.7 s of backoff would not be.
    let produced = Scenario::new(cqrs)
        .retry_backoff(RetryBackoff::none())
        .commands(commands)
        .unwrap()
        .when(&place(5))
        .await
        .unwrap();
    let dead = produced.dead_letters("commands-PlaceOrder").unwrap();
    assert_eq!(dead.len(), 1);
    let count = dead[0]
        .metadata()
        .get(streamwise::dead_letter::keys::DELIVERY_COUNT);
    assert_eq!(count, Some("10"));
}

#[tokio::test]
async fn send_and_wait_returns_the_typed_result_or_error() {
    let backend = MemoryBackend::new();
    let cqrs = Cqrs::new();
    let commands = cqrs
        .command_processor("pricing")
        .handle_with_reply(|q: GetPrice| async move {
            match q.sku.as_str() {
                "apple" => Ok(120u32),
                "plum" => Err(streamwise::BoxError::from(Permanent::new(
                    "plums are discontinued",
                ))),
                other => Err(format!("unknown sku {other}").into()),
            }
        });
    let running = start(commands.register(Router::new(), "w").unwrap(), &backend).await;
    let replies = Replies::listen(Arc::new(backend.subscriber())).await.unwrap();
    let bus = cqrs
        .command_bus(Arc::new(backend.publisher()))
        .with_replies(replies);
    let price: u32 = bus
        .send_and_wait(&GetPrice { sku: "apple".into() }, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(price, 120);
    match bus
        .send_and_wait::<_, u32>(&GetPrice { sku: "pear".into() }, Duration::from_secs(10))
        .await
    {
        Err(ReplyError::Handler(error)) => {
            assert_eq!(
                (error.message.as_str(), error.permanent),
                ("unknown sku pear", false)
            )
        }
        other => panic!("expected the handler's error, got {other:?}"),
    }
    match bus
        .send_and_wait::<_, u32>(&GetPrice { sku: "plum".into() }, Duration::from_secs(10))
        .await
    {
        Err(ReplyError::Handler(error)) => {
            assert_eq!(error.message, "plums are discontinued");
            assert!(error.permanent, "the reply says the error was permanent");
        }
        other => panic!("expected the handler's permanent error, got {other:?}"),
    }
    match bus
        .send_and_wait::<_, String>(&GetPrice { sku: "apple".into() }, Duration::from_secs(10))
        .await
    {
        Err(ReplyError::Decode(_)) => {}
        other => panic!("expected a decode error for the wrong reply type, got {other:?}"),
    }
    running.shutdown().await.unwrap();
    // Nobody handles the command now: the wait times out.
    let started = tokio::time::Instant::now();
    match bus
        .send_and_wait::<_, u32>(&GetPrice { sku: "apple".into() }, Duration::from_millis(200))
        .await
    {
        Err(ReplyError::Timeout(d)) => assert_eq!(d, Duration::from_millis(200)),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(200));
    let plain = cqrs.command_bus(Arc::new(backend.publisher()));
    assert!(matches!(
        plain
            .send_and_wait::<_, u32>(&GetPrice { sku: "x".into() }, Duration::from_secs(1))
            .await,
        Err(ReplyError::NotListening)
    ));
}

#[tokio::test]
async fn closing_replies_deletes_the_reply_topic_and_command_topics_are_capped() {
    let backend = MemoryBackend::new();
    let cqrs = Cqrs::new();
    let commands = cqrs
        .command_processor("pricing")
        .handle_with_reply(|_: GetPrice| async move { Ok::<_, Infallible>(1u32) });
    let running = start(commands.register(Router::new(), "w").unwrap(), &backend).await;
    let replies = Replies::listen(Arc::new(backend.subscriber())).await.unwrap();
    let topic = replies.topic().to_owned();
    let bus = cqrs
        .command_bus(Arc::new(backend.publisher()))
        .with_replies(replies.clone())
        .with_max_length(5);
    for _ in 0..8 {
        let one: u32 = bus
            .send_and_wait(&GetPrice { sku: "apple".into() }, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(one, 1);
    }
    assert_eq!(
        backend.stream_len("commands-GetPrice").unwrap(),
        5,
        "trimmed as sent"
    );
    assert_eq!(backend.stream_len(&topic).unwrap(), 8);
    replies.close().await.unwrap();
    assert!(backend.stream_len(&topic).is_err(), "the reply topic is gone");
    replies.close().await.unwrap();
    assert!(matches!(
        bus.send_and_wait::<_, u32>(&GetPrice { sku: "apple".into() }, Duration::from_secs(1))
            .await,
        Err(ReplyError::Closed)
    ));
    running.shutdown().await.unwrap();

    // Dropped without close: deleted in the background.
    let replies = Replies::listen(Arc::new(backend.subscriber())).await.unwrap();
    let topic = replies.topic().to_owned();
    drop(replies);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while backend.stream_len(&topic).is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dropped reply topic stayed"
        );
        tokio::task::yield_now().await;
    }
}

/// Command processors on a partitioned command topic are members of one group: each command
/// is handled once, and both members take part (each owns some partitions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_processors_share_a_partitioned_command_topic() {
    use streamwise::partition::{
        PartitionCoordinator, PartitionOptions, PartitionedPublisher, PartitionedSubscriber,
    };
    let backend = MemoryBackend::new();
    let coordinator: Arc<dyn PartitionCoordinator> = Arc::new(backend.coordinator());
    let cqrs = Cqrs::new();
    let topic = cqrs.command_topic::<PlaceOrder>().unwrap();
    assert_eq!(coordinator.create_partitions(&topic, 8).await.unwrap(), 8);
    let publisher = || -> Arc<dyn Publisher> {
        Arc::new(PartitionedPublisher::new(
            Arc::new(backend.publisher()),
            coordinator.clone(),
        ))
    };
    let handled = Arc::new(Mutex::new(Vec::new()));
    let member = |who: &'static str| {
        let handled = handled.clone();
        let router = cqrs
            .command_processor("orders")
            .handle(move |cmd: PlaceOrder| {
                let handled = handled.clone();
                async move {
                    handled.lock().unwrap().push((who, cmd.id));
                    Ok::<_, Infallible>(())
                }
            })
            .register(Router::new(), who)
            .unwrap();
        let subscriber = PartitionedSubscriber::new(Arc::new(backend.subscriber()), coordinator.clone())
            .options(PartitionOptions::default().member_ttl(Duration::from_millis(600)));
        router.start(Arc::new(subscriber), publisher())
    };
    let a = member("a").await.unwrap();
    let b = member("b").await.unwrap();
    let bus = cqrs.command_bus(publisher());
    let mut sent = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    // Until both members handled some: the second one's partitions are handed over once the
    // first sees it.
    while {
        let h = handled.lock().unwrap();
        !(h.iter().any(|(w, _)| *w == "a") && h.iter().any(|(w, _)| *w == "b"))
    } {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a member never got a partition"
        );
        for _ in 0..10 {
            bus.send(&place(sent)).await.unwrap();
            sent += 1;
        }
        until_idle(&backend).await;
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    let mut ids: Vec<u32> = handled.lock().unwrap().iter().map(|(_, id)| *id).collect();
    ids.sort();
    assert_eq!(
        ids,
        (0..sent).collect::<Vec<_>>(),
        "each command handled exactly once"
    );
}
