//! Tracing across services over real Redis (feature `opentelemetry`): the producer's span is
//! the parent of the consumer's, through a retry and through a command → event hop; with
//! `trace_links` the consumer's span links to it instead. Spans go to the OpenTelemetry SDK's
//! in-memory exporter, through tracing-opentelemetry.
#![cfg(feature = "opentelemetry")]

mod common;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::trace::{SpanKind, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use streamwise::redis::RedisBackend;
use streamwise::router::{DeliveryInfo, Outcome, RetryBackoff, Router};
use streamwise::{BoxError, Message, Publisher, SubscribeOptions};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

use common::RedisServer;

/// The exporter every span of this test binary goes to.
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("streamwise-tests"));
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
            .expect("the only subscriber of this binary");
        // Kept for the whole binary: dropping the provider shuts its pipeline down.
        std::mem::forget(provider);
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        exporter
    })
}

/// The spans of the trace whose root span is named `root`.
fn trace_of(root: &str) -> (SpanData, Vec<SpanData>) {
    let spans = exporter().get_finished_spans().expect("spans");
    let root = spans
        .iter()
        .find(|s| s.name == root)
        .unwrap_or_else(|| panic!("no span {root}"))
        .clone();
    let trace = root.span_context.trace_id();
    let members = spans
        .into_iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .collect();
    (root, members)
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> Vec<&'a SpanData> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_crosses_a_retry_and_a_command_to_event_hop() {
    exporter();
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();

    // The consuming service: a command handler that fails its first try, then emits an event.
    async fn place(info: DeliveryInfo) -> Result<Outcome, BoxError> {
        if info.delivery_count() == 1 {
            return Err("first try fails".into());
        }
        Ok(Outcome::ack().publish("otel-events", Message::new("order.placed", &7)?))
    }
    let router = Router::new().retry_backoff(RetryBackoff::exponential(
        Duration::from_millis(10),
        Duration::from_millis(10),
    ));
    let commands = router.routes().route("order.place", place);
    let events = router.routes().route("order.placed", || async {});
    let options = |group: &str| SubscribeOptions::new(group, "w1").block(Duration::from_millis(100));
    let running = router
        .subscribe("otel-commands", options("orders"), commands)
        .subscribe("otel-events", options("mailer"), events)
        .start(
            Arc::new(backend.subscriber().unwrap()),
            Arc::new(backend.publisher()),
        )
        .await
        .unwrap();

    // The producing service.
    let checkout = tracing::info_span!("checkout");
    backend
        .publisher()
        .publish("otel-commands", Message::new("order.place", &7).unwrap())
        .instrument(checkout)
        .await
        .unwrap();
    streamwise::testing::wait_until_handled(&running, 3).await;
    running.shutdown().await.unwrap();

    let (root, spans) = trace_of("checkout");
    let publish = named(&spans, "publish otel-commands");
    assert_eq!(publish.len(), 1, "{spans:#?}");
    let publish = publish[0];
    assert_eq!(publish.parent_span_id, root.span_context.span_id());
    assert_eq!(publish.span_kind, SpanKind::Producer);
    let processed = named(&spans, "process otel-commands");
    assert_eq!(processed.len(), 2, "the first try and the retry");
    for p in &processed {
        assert_eq!(
            p.parent_span_id,
            publish.span_context.span_id(),
            "each try is the producer's child"
        );
        assert_eq!(p.span_kind, SpanKind::Consumer);
        assert_eq!(
            attribute(p, "messaging.destination.name").as_deref(),
            Some("otel-commands")
        );
        assert_eq!(
            attribute(p, "messaging.consumer.group.name").as_deref(),
            Some("orders")
        );
        assert_eq!(
            attribute(p, "messaging.operation.type").as_deref(),
            Some("process")
        );
        assert_eq!(attribute(p, "messaging.system").as_deref(), Some("redis"));
    }
    // The event the retry emitted: published inside the retry's span, handled in its trace.
    let emitted = named(&spans, "publish otel-events");
    assert_eq!(emitted.len(), 1);
    assert!(
        processed
            .iter()
            .any(|p| p.span_context.span_id() == emitted[0].parent_span_id),
        "the event's publish is a child of a command's processing"
    );
    let handled = named(&spans, "process otel-events");
    assert_eq!(handled.len(), 1);
    assert_eq!(handled[0].parent_span_id, emitted[0].span_context.span_id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_trace_links_the_consumer_span_links_to_the_producer() {
    exporter();
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let router = Router::new().trace_links(true);
    let routes = router.routes().route("t", || async {});
    let running = router
        .subscribe("otel-linked", SubscribeOptions::new("g", "w1"), routes)
        .start(
            Arc::new(backend.subscriber().unwrap()),
            Arc::new(backend.publisher()),
        )
        .await
        .unwrap();
    let sender = tracing::info_span!("sender");
    backend
        .publisher()
        .publish("otel-linked", Message::new("t", &1).unwrap())
        .instrument(sender)
        .await
        .unwrap();
    streamwise::testing::wait_until_handled(&running, 1).await;
    running.shutdown().await.unwrap();

    let (root, spans) = trace_of("sender");
    let publish = named(&spans, "publish otel-linked")[0].clone();
    assert_eq!(publish.parent_span_id, root.span_context.span_id());
    assert!(
        named(&spans, "process otel-linked").is_empty(),
        "not in the producer's trace"
    );
    let all = exporter().get_finished_spans().unwrap();
    let process = all
        .iter()
        .find(|s| s.name == "process otel-linked")
        .expect("the consumer's span");
    assert!(
        process
            .links
            .iter()
            .any(|l| l.span_context.span_id() == publish.span_context.span_id()),
        "it links to the producer's span"
    );
}

/// Two services, each with a tracer provider of its own (as two processes would have): the
/// consumer's span, exported by its provider, is the child of the producer's publish span,
/// exported by the other; the trace context crossed Redis in the message.
#[test]
fn two_services_with_their_own_tracer_providers_share_one_trace() {
    // The propagator (and the binary's global subscriber, which the services' own override).
    exporter();
    let server = RedisServer::start();
    let url = server.url();
    let service = |name: &'static str| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer(name));
        // The provider is kept: dropping it shuts its pipeline down.
        (exporter, provider, tracing_subscriber::registry().with(layer))
    };
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    };
    let (consumer_spans, _consumer_provider, consumer_subscriber) = service("consumer-service");
    let (producer_spans, _producer_provider, producer_subscriber) = service("producer-service");
    let (started_tx, started_rx) = std::sync::mpsc::channel();

    let consumer_url = url.clone();
    let consumer = std::thread::spawn(move || {
        let _service = tracing::subscriber::set_default(consumer_subscriber);
        runtime().block_on(async move {
            let backend = RedisBackend::new(&consumer_url).unwrap();
            let router = Router::new();
            let routes = router.routes().route("order.placed", || async {});
            let running = router
                .subscribe("otel-two", SubscribeOptions::new("mailer", "w1"), routes)
                .start(
                    Arc::new(backend.subscriber().unwrap()),
                    Arc::new(backend.publisher()),
                )
                .await
                .unwrap();
            started_tx.send(()).unwrap();
            streamwise::testing::wait_until_handled(&running, 1).await;
            running.shutdown().await.unwrap();
        });
    });
    started_rx.recv().expect("the consumer service started");
    {
        let _service = tracing::subscriber::set_default(producer_subscriber);
        runtime().block_on(async {
            let backend = RedisBackend::new(&url).unwrap();
            backend
                .publisher()
                .publish("otel-two", Message::new("order.placed", &1).unwrap())
                .instrument(tracing::info_span!("order-service"))
                .await
                .unwrap();
        });
    }
    consumer.join().expect("the consumer service");

    let produced = producer_spans.get_finished_spans().unwrap();
    let publish = produced
        .iter()
        .find(|s| s.name == "publish otel-two")
        .expect("the producer's publish span");
    let consumed = consumer_spans.get_finished_spans().unwrap();
    let process = consumed
        .iter()
        .find(|s| s.name == "process otel-two")
        .expect("the consumer's span");
    assert_eq!(process.span_context.trace_id(), publish.span_context.trace_id());
    assert_eq!(process.parent_span_id, publish.span_context.span_id());
    assert!(
        consumed.iter().all(|s| s.name != "publish otel-two"),
        "each service exports only its own spans"
    );
}

/// The spans name the backend the messages went through: `messaging.system` is `memory` on
/// the in-memory backend (`redis` on Redis, checked above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spans_name_the_in_memory_backend_as_their_messaging_system() {
    exporter();
    let backend = streamwise::memory::MemoryBackend::new();
    let router = Router::new();
    let routes = router.routes().route("t", || async {});
    let running = router
        .subscribe("otel-memory", SubscribeOptions::new("g", "w1"), routes)
        .start(Arc::new(backend.subscriber()), Arc::new(backend.publisher()))
        .await
        .unwrap();
    backend
        .publisher()
        .publish("otel-memory", Message::new("t", &1).unwrap())
        .instrument(tracing::info_span!("memory-sender"))
        .await
        .unwrap();
    streamwise::testing::wait_until_handled(&running, 1).await;
    running.shutdown().await.unwrap();
    let (_, spans) = trace_of("memory-sender");
    for name in ["publish otel-memory", "process otel-memory"] {
        let span = named(&spans, name);
        assert_eq!(span.len(), 1, "{name}");
        assert_eq!(
            attribute(span[0], "messaging.system").as_deref(),
            Some("memory"),
            "{name}"
        );
    }
}
