//! The router on the in-memory backend: dispatch, extractors, outcomes, errors and panics,
//! layers at three levels, concurrency and ordering, shutdown.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use streamwise::dead_letter::keys as dl;
use streamwise::memory::MemoryBackend;
use streamwise::router::{
    BoxRoute, BoxRouteLayer, DeliveryInfo, EventType, Fallback, Handler, Incoming, Json, Metadata, OrderKey,
    Outcome, Outgoing, Permanent, RetryBackoff, Router, Routes, State, handler_service,
};
use streamwise::testing::wait_until_handled;
use streamwise::{EntryId, Error, Message, Publisher, Result, SubscribeOptions, Subscriber, Subscription};
use tokio::sync::mpsc;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

const WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Serialize, Deserialize, PartialEq, Clone)]
struct Order {
    id: u32,
    customer: String,
}

fn order(id: u32, customer: &str) -> Message {
    Message::new(
        "order.placed",
        &Order {
            id,
            customer: customer.into(),
        },
    )
    .unwrap()
}

fn opts() -> SubscribeOptions {
    SubscribeOptions::new("svc", "w1")
}

struct Harness {
    backend: MemoryBackend,
}

impl Harness {
    fn new() -> Self {
        Harness {
            backend: MemoryBackend::new(),
        }
    }
    fn subscriber(&self) -> Arc<dyn Subscriber> {
        Arc::new(self.backend.subscriber())
    }
    fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.backend.publisher())
    }
    async fn publish(&self, topic: &str, message: Message) -> EntryId {
        self.backend.publisher().publish(topic, message).await.unwrap()
    }
    async fn watch(&self, topic: &str) -> Subscription {
        self.backend
            .subscriber()
            .subscribe(topic, SubscribeOptions::new("inspector", "i"))
            .await
            .unwrap()
    }
    /// Starts `router` on this backend.
    async fn start<S: Clone + Send + Sync + 'static>(
        &self,
        router: Router<S>,
    ) -> streamwise::router::RunningRouter {
        self.start_publishing_to(router, self.publisher()).await
    }
    /// Starts `router` on this backend, its handlers' messages going to `publisher`.
    async fn start_publishing_to<S: Clone + Send + Sync + 'static>(
        &self,
        router: Router<S>,
        publisher: Arc<dyn Publisher>,
    ) -> streamwise::router::RunningRouter {
        router.start(self.subscriber(), publisher).await.unwrap()
    }
    /// The error that keeps `router` from starting.
    async fn refused<S: Clone + Send + Sync + 'static>(&self, router: Router<S>) -> Error {
        router
            .start(self.subscriber(), self.publisher())
            .await
            .unwrap_err()
    }
}

async fn recv(sub: &mut Subscription) -> streamwise::Delivery {
    match tokio::time::timeout(WAIT, sub.next()).await {
        Ok(Some(Ok(d))) => d,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

#[tokio::test]
async fn deliveries_are_dispatched_by_event_type_with_extractors() {
    let h = Harness::new();
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    async fn placed(
        Json(order): Json<Order>,
        metadata: Metadata,
        info: DeliveryInfo,
        EventType(t): EventType,
        State(tx): State<mpsc::UnboundedSender<String>>,
    ) {
        let source = metadata.get("source").unwrap_or("-").to_owned();
        tx.send(format!(
            "{t} {} {} {source} {}#{}",
            order.id,
            order.customer,
            info.stream(),
            info.delivery_count()
        ))
        .unwrap();
    }
    async fn cancelled(message: Message, State(tx): State<mpsc::UnboundedSender<String>>) {
        tx.send(format!("cancelled {}", message.json().unwrap())).unwrap();
    }
    let router = Router::with_state(tx);
    let routes = router
        .routes()
        .route("order.placed", placed)
        .route("order.cancelled", cancelled);
    let running = h.start(router.subscribe("orders", opts(), routes)).await;
    h.publish("orders", order(7, "ada").with_metadata("source", "web"))
        .await;
    h.publish("orders", Message::new("order.cancelled", &7).unwrap())
        .await;
    let got = vec![
        tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap(),
        tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap(),
    ];
    assert!(
        got.contains(&"order.placed 7 ada web orders#1".to_owned()),
        "{got:?}"
    );
    assert!(got.contains(&"cancelled 7".to_owned()), "{got:?}");
    wait_until_handled(&running, 2).await;
    let report = running.shutdown().await.unwrap();
    assert_eq!((report.handled, report.abandoned), (2, 0));
    assert_eq!(h.backend.pending_count("orders", "svc").unwrap(), 0);
}

#[tokio::test]
async fn fallback_policies() {
    for (fallback, dead, pending) in [
        (Fallback::AckAndSkip, 0, 0),
        (Fallback::DeadLetter, 1, 0),
        (Fallback::Nack, 0, 1),
    ] {
        let h = Harness::new();
        let routes = Routes::new()
            .route("known", || async {})
            .fallback(fallback.clone());
        // A nacked entry comes back at once, again and again until the shutdown: never
        // dead-lettered, however many redeliveries fit in before it.
        let options = opts().max_deliveries(u64::MAX);
        let running = h.start(Router::new().subscribe("t", options, routes)).await;
        h.publish("t", Message::new("unknown", &1).unwrap()).await;
        h.publish("t", Message::new("known", &2).unwrap()).await;
        wait_until_handled(&running, 2).await;
        running.shutdown().await.unwrap();
        let dead_len = h.backend.stream_len("{t}-dead").unwrap_or(0);
        assert_eq!(dead_len, dead, "{fallback:?}");
        assert_eq!(
            h.backend.pending_count("t", "svc").unwrap(),
            pending,
            "{fallback:?}"
        );
    }
    let h = Harness::new();
    let running = h.start(Router::new().subscribe("t", opts(), Routes::new())).await;
    h.publish("t", Message::new("unknown", &1).unwrap()).await;
    let mut dead = h.watch("{t}-dead").await;
    let record = recv(&mut dead).await;
    assert!(
        record
            .message()
            .metadata()
            .get(dl::REASON)
            .unwrap()
            .contains("no route for event type \"unknown\"")
    );
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_payload_that_does_not_decode_is_dead_lettered_with_the_reason() {
    let h = Harness::new();
    async fn placed(Json(_): Json<Order>) -> Outcome {
        panic!("never called with a bad payload");
    }
    let running = h
        .start(Router::new().subscribe("orders", opts(), Routes::new().route("order.placed", placed)))
        .await;
    let id = h
        .publish("orders", Message::new("order.placed", &"not an order").unwrap())
        .await;
    let mut dead = h.watch("{orders}-dead").await;
    let record = recv(&mut dead).await;
    let m = record.message().metadata();
    assert!(
        m.get(dl::REASON).unwrap().contains("payload does not decode"),
        "{m:?}"
    );
    assert_eq!(m.get(dl::ORIGINAL_ID), Some(id.to_string().as_str()));
    assert_eq!(m.get(dl::STREAM), Some("orders"));
    wait_until_handled(&running, 1).await;
    running.shutdown().await.unwrap();
    assert_eq!(h.backend.pending_count("orders", "svc").unwrap(), 0);
}

/// A publisher that records, at each publish, whether the input entry was still pending.
struct Witness {
    inner: streamwise::memory::MemoryPublisher,
    backend: MemoryBackend,
    seen_pending: Mutex<Vec<usize>>,
    fail: bool,
}

impl Witness {
    /// A witness publishing to `h`'s backend, or failing every publish when `fail`.
    fn on(h: &Harness, fail: bool) -> Arc<Witness> {
        Arc::new(Witness {
            inner: h.backend.publisher(),
            backend: h.backend.clone(),
            seen_pending: Mutex::new(Vec::new()),
            fail,
        })
    }
}

impl Publisher for Witness {
    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> BoxFuture<'a, Result<EntryId>> {
        self.seen_pending
            .lock()
            .unwrap()
            .push(self.backend.pending_count("orders", "svc").unwrap());
        if self.fail {
            return Box::pin(async { Err(Error::connection("the broker is away", None)) });
        }
        self.inner.publish(topic, message)
    }
    fn publish_batch<'a>(
        &'a self,
        topic: &'a str,
        messages: Vec<Message>,
    ) -> BoxFuture<'a, Result<Vec<EntryId>>> {
        self.inner.publish_batch(topic, messages)
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.inner.close()
    }
}

#[tokio::test]
async fn produced_messages_are_published_before_the_input_is_acked() {
    let h = Harness::new();
    let witness = Witness::on(&h, false);
    async fn placed(Json(order): Json<Order>) -> Vec<Outgoing> {
        vec![
            Outgoing::new("invoices", Message::new("invoice.requested", &order.id).unwrap()),
            Outgoing::new(
                "emails",
                Message::new("email.requested", &order.customer).unwrap(),
            ),
        ]
    }
    let running = h
        .start_publishing_to(
            Router::new().subscribe("orders", opts(), Routes::new().route("order.placed", placed)),
            witness.clone(),
        )
        .await;
    h.publish("orders", order(1, "ada")).await;
    wait_until_handled(&running, 1).await;
    running.shutdown().await.unwrap();
    assert_eq!(
        *witness.seen_pending.lock().unwrap(),
        [1, 1],
        "the input was pending at each publish"
    );
    assert_eq!(h.backend.pending_count("orders", "svc").unwrap(), 0, "then acked");
    assert_eq!(h.backend.stream_len("invoices").unwrap(), 1);
    assert_eq!(h.backend.stream_len("emails").unwrap(), 1);

    // When publishing fails, the input is nacked, not acked: nothing is lost.
    let h = Harness::new();
    let failing = Witness::on(&h, true);
    let running = h
        .start_publishing_to(
            Router::new().subscribe(
                "orders",
                // Redelivered after the backoff until the shutdown, never dead-lettered meanwhile.
                opts().max_deliveries(u64::MAX),
                Routes::new().route("order.placed", placed),
            ),
            failing.clone(),
        )
        .await;
    h.publish("orders", order(2, "bob")).await;
    wait_until_handled(&running, 3).await;
    running.shutdown().await.unwrap();
    assert_eq!(
        h.backend.pending_count("orders", "svc").unwrap(),
        1,
        "nacked, still pending"
    );

    // A failed publish waits out the subscription's backoff, like a handler's error.
    let h = Harness::new();
    let failing = Witness::on(&h, true);
    let hour = Duration::from_secs(3600);
    let running = h
        .start_publishing_to(
            Router::new().subscribe(
                "orders",
                opts(),
                Routes::new()
                    .route("order.placed", placed)
                    .retry_backoff(streamwise::router::RetryBackoff::exponential(hour, hour)),
            ),
            failing.clone(),
        )
        .await;
    h.publish("orders", order(3, "cy")).await;
    wait_until_handled(&running, 1).await;
    tokio::time::sleep(streamwise::testing::QUIET).await; // an observation window, not a sync
    assert_eq!(running.handled(), 1, "redelivered before its backoff");
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn outcomes_errors_and_panics_settle_as_documented() {
    let h = Harness::new();
    let calls = Arc::new(AtomicUsize::new(0));
    async fn flaky(
        info: DeliveryInfo,
        State(calls): State<Arc<AtomicUsize>>,
    ) -> std::result::Result<(), String> {
        calls.fetch_add(1, Ordering::SeqCst);
        if info.delivery_count() < 3 {
            Err("not yet".into())
        } else {
            Ok(())
        }
    }
    async fn hopeless() -> std::result::Result<(), Permanent> {
        Err(Permanent::new("unknown customer"))
    }
    async fn later(info: DeliveryInfo) -> Outcome {
        if info.delivery_count() == 1 {
            Outcome::nack_after(Duration::from_millis(300))
        } else {
            Outcome::ack()
        }
    }
    async fn boom(info: DeliveryInfo) {
        if info.delivery_count() == 1 {
            panic!("handler bug");
        }
    }
    let router = Router::with_state(calls.clone());
    let routes = router
        .routes()
        .route("flaky", flaky)
        .route("hopeless", hopeless)
        .route("later", later)
        .route("boom", boom)
        // Panics when called, before it returns its future.
        .route("eager", |info: DeliveryInfo| {
            assert!(info.delivery_count() > 1, "handler bug before the future");
            async {}
        });
    let running = h
        .start(router.subscribe("t", opts().max_in_flight(4), routes))
        .await;
    h.publish("t", Message::new("flaky", &1).unwrap()).await;
    h.publish("t", Message::new("hopeless", &2).unwrap()).await;
    let started = tokio::time::Instant::now();
    h.publish("t", Message::new("later", &3).unwrap()).await;
    h.publish("t", Message::new("boom", &4).unwrap()).await;
    h.publish("t", Message::new("eager", &5).unwrap()).await;
    // flaky: 3 runs; hopeless: 1; later: 2; boom and eager: 2 each (the panic is nacked, the
    // router goes on).
    wait_until_handled(&running, 10).await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "nack_after waited"
    );
    running.shutdown().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(h.backend.pending_count("t", "svc").unwrap(), 0);
    let mut dead = h.watch("{t}-dead").await;
    let record = recv(&mut dead).await;
    assert_eq!(record.message().event_type(), "hopeless");
    assert!(
        record
            .message()
            .metadata()
            .get(dl::REASON)
            .unwrap()
            .contains("unknown customer")
    );
}

#[tokio::test]
async fn permanent_errors_inside_anyhow_are_dead_lettered_on_the_first_delivery() {
    let h = Harness::new();
    let calls = Arc::new(AtomicUsize::new(0));
    async fn plain(State(calls): State<Arc<AtomicUsize>>) -> anyhow::Result<()> {
        calls.fetch_add(1, Ordering::SeqCst);
        Err(Permanent::new("unknown customer"))?;
        Ok(())
    }
    async fn with_context(State(calls): State<Arc<AtomicUsize>>) -> anyhow::Result<()> {
        calls.fetch_add(1, Ordering::SeqCst);
        Err(anyhow::anyhow!(Permanent::new("unknown product")).context("while pricing order 7"))
    }
    let router = Router::with_state(calls.clone());
    let routes = router
        .routes()
        .route("plain", plain)
        .route("context", with_context);
    let running = h.start(router.subscribe("t", opts(), routes)).await;
    h.publish("t", Message::new("plain", &1).unwrap()).await;
    h.publish("t", Message::new("context", &2).unwrap()).await;
    let mut dead = h.watch("{t}-dead").await;
    let mut reasons = Vec::new();
    for _ in 0..2 {
        let record = recv(&mut dead).await;
        let metadata = record.message().metadata();
        assert_eq!(metadata.get(dl::DELIVERY_COUNT), Some("1"), "{metadata:?}");
        reasons.push(metadata.get(dl::REASON).unwrap().to_owned());
    }
    running.shutdown().await.unwrap();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "permanent error: unknown customer",
            "permanent error: while pricing order 7"
        ]
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2, "each handler ran once");
    assert_eq!(h.backend.pending_count("t", "svc").unwrap(), 0);
}

/// A handler that fails until `OUTAGE` has passed since its first call (a database that is
/// down for a few seconds), recording each call's delivery count and time.
#[derive(Clone, Default)]
struct Outage {
    first_call: Arc<Mutex<Option<std::time::Instant>>>,
    calls: Arc<Mutex<Vec<(u64, Duration)>>>,
}

const OUTAGE: Duration = Duration::from_secs(3);

impl Outage {
    fn call(&self, info: &DeliveryInfo) -> std::result::Result<(), String> {
        let since = self
            .first_call
            .lock()
            .unwrap()
            .get_or_insert_with(std::time::Instant::now)
            .elapsed();
        self.calls.lock().unwrap().push((info.delivery_count(), since));
        if since < OUTAGE {
            Err(format!("the database is down ({since:?} into the outage)"))
        } else {
            Ok(())
        }
    }

    fn calls(&self) -> Vec<(u64, Duration)> {
        self.calls.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn a_handler_failing_for_three_seconds_recovers_without_dead_letters_by_default() {
    let h = Harness::new();
    let outage = Outage::default();
    async fn store(info: DeliveryInfo, State(outage): State<Outage>) -> std::result::Result<(), String> {
        outage.call(&info)
    }
    let router = Router::with_state(outage.clone());
    let routes = router.routes().route("order.placed", store);
    // Default options: max_deliveries 10, no middleware.
    let running = h.start(router.subscribe("orders", opts(), routes)).await;
    h.publish("orders", order(1, "ada")).await;
    let deadline = tokio::time::Instant::now() + OUTAGE + WAIT;
    while outage.calls().last().is_none_or(|(_, at)| *at < OUTAGE) {
        assert_eq!(
            h.backend.stream_len("{orders}-dead").unwrap_or(0),
            0,
            "dead-lettered during the outage: {:?}",
            outage.calls()
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "never recovered: {:?}",
            outage.calls()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_until_handled(&running, outage.calls().len() as u64).await;
    running.shutdown().await.unwrap();
    let calls = outage.calls();
    assert_eq!(h.backend.stream_len("{orders}-dead").unwrap_or(0), 0, "{calls:?}");
    assert_eq!(h.backend.pending_count("orders", "svc").unwrap(), 0, "acked");
    let counts: Vec<u64> = calls.iter().map(|(count, _)| *count).collect();
    assert_eq!(counts, (1..=calls.len() as u64).collect::<Vec<_>>(), "{calls:?}");
    assert!(calls.len() < 10, "room to spare under max_deliveries: {calls:?}");
    // Each redelivery waited at least the default schedule: 100 ms, doubling.
    let mut least = Duration::ZERO;
    for (n, (_, at)) in calls.iter().enumerate().skip(1) {
        least += Duration::from_millis(100) * 2u32.pow(n as u32 - 1);
        assert!(*at >= least, "delivery {} came at {at:?}: {calls:?}", n + 1);
    }
}

#[tokio::test]
async fn the_retry_backoff_is_set_per_subscription_and_covers_panics() {
    let h = Harness::new();
    let times = Arc::new(Mutex::new(Vec::new()));
    async fn down() -> std::result::Result<(), &'static str> {
        Err("down")
    }
    async fn shaky(
        info: DeliveryInfo,
        State(times): State<Arc<Mutex<Vec<tokio::time::Instant>>>>,
    ) -> std::result::Result<(), &'static str> {
        times.lock().unwrap().push(tokio::time::Instant::now());
        match info.delivery_count() {
            1 => panic!("handler bug"),
            2 => Err("not yet"),
            _ => Ok(()),
        }
    }
    const STEADY: Duration = Duration::from_millis(300);
    let steady = RetryBackoff::exponential(STEADY, STEADY)
        .multiplier(1.0)
        .jitter(0.0);
    let router = Router::with_state(times.clone()).retry_backoff(RetryBackoff::none());
    let running = h
        .start(
            router
                .subscribe(
                    "fast",
                    opts(),
                    Routes::with_state(times.clone()).route("down", down),
                )
                .subscribe(
                    "steady",
                    opts(),
                    Routes::with_state(times.clone())
                        .route("shaky", shaky)
                        .retry_backoff(steady),
                ),
        )
        .await;
    h.publish("fast", Message::new("down", &1).unwrap()).await;
    h.publish("steady", Message::new("shaky", &2).unwrap()).await;
    // Ten deliveries without backoff: dead-lettered sooner than the default schedule's
    // 32.7 s of waits would allow.
    let mut dead = h.watch("{fast}-dead").await;
    let record = recv(&mut dead).await;
    assert_eq!(record.message().metadata().get(dl::DELIVERY_COUNT), Some("10"));
    let deadline = tokio::time::Instant::now() + WAIT;
    while times.lock().unwrap().len() < 3 || h.backend.pending_count("steady", "svc").unwrap() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "steady never acked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.shutdown().await.unwrap();
    let times = times.lock().unwrap().clone();
    assert_eq!(times.len(), 3);
    // After the panic and after the error alike, the subscription's own 300 ms (not the
    // router's none, nor the default's 100 ms).
    assert!(times[1] - times[0] >= STEADY, "{:?}", times[1] - times[0]);
    assert!(times[2] - times[1] >= STEADY, "{:?}", times[2] - times[1]);
    assert_eq!(h.backend.stream_len("{steady}-dead").unwrap_or(0), 0);
}

/// A layer that records its name on the way in.
#[derive(Clone)]
struct Mark(&'static str, Arc<Mutex<Vec<&'static str>>>);

impl<S> Layer<S> for Mark {
    type Service = Marked<S>;
    fn layer(&self, inner: S) -> Marked<S> {
        Marked(self.clone(), inner)
    }
}

#[derive(Clone)]
struct Marked<S>(Mark, S);

impl<S: Service<Incoming>> Service<Incoming> for Marked<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;
    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<(), S::Error>> {
        self.1.poll_ready(cx)
    }
    fn call(&mut self, req: Incoming) -> S::Future {
        self.0.1.lock().unwrap().push(self.0.0);
        self.1.call(req)
    }
}

#[tokio::test]
async fn layers_at_three_levels_run_in_the_documented_order() {
    let h = Harness::new();
    let log = Arc::new(Mutex::new(Vec::new()));
    let mark = |name| Mark(name, log.clone());
    let handler_log = log.clone();
    let handler = move || {
        let log = handler_log.clone();
        async move { log.lock().unwrap().push("handler") }
    };
    let routes = Routes::new()
        .route("t", handler.layer(mark("route-1")).layer(mark("route-2")))
        .layer(mark("subscription-1"))
        .layer(BoxRouteLayer::new(mark("subscription-2")));
    let running = h
        .start(
            Router::new()
                .layer(mark("router-1"))
                .layer(mark("router-2"))
                .subscribe("t", opts(), routes),
        )
        .await;
    h.publish("t", Message::new("t", &1).unwrap()).await;
    wait_until_handled(&running, 1).await;
    running.shutdown().await.unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        [
            "router-2",
            "router-1",
            "subscription-2",
            "subscription-1",
            "route-2",
            "route-1",
            "handler"
        ]
    );
}

/// A route layer wraps its handler once, when the route is built: a layer with state of its
/// own (here a concurrency limit of 1) keeps it across deliveries, though the handler gets
/// the routes' state at each.
#[tokio::test]
async fn a_layered_handler_is_built_once_with_the_routes_state() {
    let h = Harness::new();
    #[derive(Default)]
    struct Seen {
        running: AtomicUsize,
        peak: AtomicUsize,
        done: AtomicUsize,
    }
    async fn work(State(seen): State<Arc<Seen>>) {
        let now = seen.running.fetch_add(1, Ordering::SeqCst) + 1;
        seen.peak.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(5)).await;
        seen.running.fetch_sub(1, Ordering::SeqCst);
        seen.done.fetch_add(1, Ordering::SeqCst);
    }
    let seen = Arc::new(Seen::default());
    let router = Router::with_state(seen.clone());
    let routes = router
        .routes()
        .route("n", work.layer(tower::limit::ConcurrencyLimitLayer::new(1)));
    let running = h
        .start(router.subscribe("t", opts().max_in_flight(8), routes))
        .await;
    for n in 0..8 {
        h.publish("t", Message::new("n", &n).unwrap()).await;
    }
    wait_until_handled(&running, 8).await;
    running.shutdown().await.unwrap();
    assert_eq!(seen.done.load(Ordering::SeqCst), 8);
    assert_eq!(
        seen.peak.load(Ordering::SeqCst),
        1,
        "one limit for all deliveries"
    );

    // Outside a router, `with_state` gives the same layered service, and the plain handler's.
    let seen = Arc::new(Seen::default());
    let layered = work
        .layer(tower::limit::ConcurrencyLimitLayer::new(1))
        .with_state(seen.clone());
    let message = || Incoming::for_test(Message::new("n", &1).unwrap());
    assert_eq!(layered.oneshot(message()).await.unwrap(), Outcome::ack());
    assert_eq!(
        work.with_state(seen.clone()).oneshot(message()).await.unwrap(),
        Outcome::ack()
    );
    assert_eq!(seen.done.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn stock_tower_layers_wrap_handlers() {
    let h = Harness::new();
    async fn slow(info: DeliveryInfo) {
        if info.delivery_count() == 1 {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
    }
    let routes = Routes::new()
        .route_layered(
            "slow",
            slow,
            tower::timeout::TimeoutLayer::new(Duration::from_millis(100)),
        )
        .layer(tower::limit::ConcurrencyLimitLayer::new(1));
    let running = h.start(Router::new().subscribe("t", opts(), routes)).await;
    h.publish("t", Message::new("slow", &1).unwrap()).await;
    // The timeout turns the first run into an error (nack); the second run succeeds.
    wait_until_handled(&running, 2).await;
    running.shutdown().await.unwrap();
    assert_eq!(h.backend.pending_count("t", "svc").unwrap(), 0);
}

#[tokio::test]
async fn max_in_flight_bounds_concurrency_and_order_by_keeps_key_order() {
    let h = Harness::new();
    #[derive(Default)]
    struct Seen {
        running: AtomicUsize,
        peak: AtomicUsize,
        order: Mutex<Vec<(String, u32)>>,
    }
    let seen = Arc::new(Seen::default());
    async fn work(Json(order): Json<Order>, State(seen): State<Arc<Seen>>) {
        let now = seen.running.fetch_add(1, Ordering::SeqCst) + 1;
        seen.peak.fetch_max(now, Ordering::SeqCst);
        // Later orders of a customer finish faster: without ordering they would overtake.
        tokio::time::sleep(Duration::from_millis(u64::from(20 - order.id % 20))).await;
        seen.order
            .lock()
            .unwrap()
            .push((order.customer.clone(), order.id));
        seen.running.fetch_sub(1, Ordering::SeqCst);
    }
    let router = Router::with_state(seen.clone());
    let routes = router
        .routes()
        .route("order.placed", work)
        .order_by(OrderKey::Payload("/customer".into()));
    let running = h
        .start(router.subscribe("orders", opts().max_in_flight(8).batch_size(8), routes))
        .await;
    let customers = ["ada", "bob", "cy", "dee"];
    for id in 0..40 {
        h.publish("orders", order(id, customers[id as usize % 4])).await;
    }
    wait_until_handled(&running, 40).await;
    running.shutdown().await.unwrap();
    let peak = seen.peak.load(Ordering::SeqCst);
    assert!(peak <= 8, "{peak} handlers at once with max_in_flight 8");
    assert!(peak >= 2, "different customers ran concurrently (peak {peak})");
    let order = seen.order.lock().unwrap();
    for c in customers {
        let ids: Vec<u32> = order
            .iter()
            .filter(|(who, _)| who == c)
            .map(|(_, id)| *id)
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{c}: {ids:?}");
        assert_eq!(ids.len(), 10);
    }
}

#[tokio::test]
async fn shutdown_lets_in_flight_handlers_finish_and_abandons_them_at_the_deadline() {
    let h = Harness::new();
    let (started_tx, mut started) = mpsc::unbounded_channel::<u32>();
    async fn work(Json(n): Json<u32>, State(started): State<mpsc::UnboundedSender<u32>>) {
        started.send(n).unwrap();
        let pause = if n == 1 { 200 } else { 60_000 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    let router = Router::with_state(started_tx).shutdown_deadline(Duration::from_millis(800));
    let routes = router.routes().route("n", work);
    let running = h
        .start(router.subscribe("t", opts().max_in_flight(2), routes))
        .await;
    h.publish("t", Message::new("n", &1u32).unwrap()).await;
    h.publish("t", Message::new("n", &2u32).unwrap()).await;
    for _ in 0..2 {
        tokio::time::timeout(WAIT, started.recv()).await.unwrap().unwrap();
    }
    // Fetching stops at once: this one is never handled by this router.
    h.publish("t", Message::new("n", &3u32).unwrap()).await;
    let report = running.shutdown().await.unwrap();
    assert_eq!((report.handled, report.abandoned), (1, 1));
    assert!(
        started.try_recv().is_err(),
        "nothing new started after shutdown began"
    );
    // The finished one is acked; the abandoned one stays pending; the third was never taken.
    assert_eq!(h.backend.pending_count("t", "svc").unwrap(), 1);
    let next = h.backend.subscriber();
    let mut sub = next.subscribe("t", opts()).await.unwrap();
    let mut rest = Vec::new();
    for _ in 0..2 {
        let d = recv(&mut sub).await;
        rest.push(d.message().decode::<u32>().unwrap());
        d.ack().await.unwrap();
    }
    rest.sort();
    assert_eq!(rest, [2, 3]);
}

#[tokio::test]
async fn handlers_are_unit_tested_as_services_without_a_backend() {
    async fn price(Json(p): Json<f64>) -> Outcome {
        if p < 0.0 {
            Outcome::dead_letter("negative")
        } else {
            Outcome::ack().publish("audit", Message::new("seen", &p).unwrap())
        }
    }
    let svc = handler_service(price, ());
    let ok = svc
        .clone()
        .oneshot(Incoming::for_test(Message::new("p", &1.5).unwrap()))
        .await
        .unwrap();
    assert_eq!(ok.messages().len(), 1);
    let bad = svc
        .clone()
        .oneshot(Incoming::for_test(Message::new("p", &-1.0).unwrap()))
        .await
        .unwrap();
    assert_eq!(bad, Outcome::dead_letter("negative"));
    let garbage = svc
        .oneshot(Incoming::for_test(Message::new("p", &"x").unwrap()))
        .await
        .unwrap();
    assert!(matches!(
        garbage.verdict(),
        streamwise::router::Verdict::DeadLetter { .. }
    ));
    // Layers too: a whole stack is a service.
    let stacked = ServiceBuilder::new()
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(1)))
        .service(handler_service(price, ()));
    let out = stacked
        .oneshot(Incoming::for_test(Message::new("p", &2.0).unwrap()))
        .await
        .unwrap();
    assert_eq!(out.messages()[0].topic, "audit");
}

#[tokio::test]
async fn misconfigured_routers_do_not_start() {
    let h = Harness::new();
    let twice = Routes::new().route("a", || async {}).route("a", || async {});
    let err = h.refused(Router::new().subscribe("t", opts(), twice)).await;
    assert_eq!(err.invalid_field(), Some("event_type"));
    let empty_type = Routes::new().route("", || async {});
    let err = h.refused(Router::new().subscribe("t", opts(), empty_type)).await;
    assert_eq!(err.invalid_field(), Some("event_type"));
    let err = h.refused(Router::new()).await;
    assert_eq!(err.invalid_field(), Some("subscriptions"));
    let err = h
        .refused(Router::new().subscribe("bad topic", opts(), Routes::new()))
        .await;
    assert_eq!(err.invalid_field(), Some("topic"));
    let bad_jitter = Routes::new().retry_backoff(RetryBackoff::default().jitter(2.0));
    let err = h.refused(Router::new().subscribe("t", opts(), bad_jitter)).await;
    assert_eq!(err.invalid_field(), Some("retry_backoff.jitter"));
    let err = h
        .refused(
            Router::new()
                .retry_backoff(RetryBackoff::default().multiplier(0.5))
                .subscribe("t", opts(), Routes::new()),
        )
        .await;
    assert_eq!(err.invalid_field(), Some("retry_backoff.multiplier"));
}

#[tokio::test]
async fn several_subscriptions_run_side_by_side() {
    let h = Harness::new();
    let count = Arc::new(AtomicUsize::new(0));
    let router = Router::with_state(count.clone());
    async fn bump(State(c): State<Arc<AtomicUsize>>) {
        c.fetch_add(1, Ordering::SeqCst);
    }
    let running = h
        .start(
            router
                .subscribe(
                    "a",
                    SubscribeOptions::new("svc", "w1"),
                    Routes::with_state(count.clone()).route("x", bump),
                )
                .subscribe(
                    "b",
                    SubscribeOptions::new("svc", "w1"),
                    Routes::with_state(count.clone()).route("y", bump),
                ),
        )
        .await;
    h.publish("a", Message::new("x", &1).unwrap()).await;
    h.publish("b", Message::new("y", &1).unwrap()).await;
    wait_until_handled(&running, 2).await;
    running.shutdown().await.unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_boxed_route_is_a_plain_tower_service() {
    fn assert_service<S: Service<Incoming, Response = Outcome> + Clone + Send + Sync>(_: &S) {}
    let route: BoxRoute = BoxRoute::new(handler_service(|| async {}, ()));
    assert_service(&route);
}

#[tokio::test]
async fn shutdown_with_nothing_in_flight_does_not_wait_for_the_deadline() {
    let h = Harness::new();
    let running = h
        .start(
            Router::new()
                .shutdown_deadline(Duration::from_secs(60))
                .subscribe("t", opts(), Routes::new().route("t", || async {})),
        )
        .await;
    h.publish("t", Message::new("t", &1).unwrap()).await;
    wait_until_handled(&running, 1).await;
    let started = tokio::time::Instant::now();
    let report = running.shutdown().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert_eq!((report.handled, report.abandoned), (1, 0));
}

/// A backlog far larger than what the router takes in one go (a batch of ready deliveries)
/// is handled whole, each message once, none left pending.
#[tokio::test]
async fn a_large_backlog_is_handled_whole_and_once() {
    let h = Harness::new();
    let messages: Vec<Message> = (0..5000u32).map(|n| order(n, "ada")).collect();
    h.backend
        .publisher()
        .publish_batch("orders", messages)
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let handler = move |Json(o): Json<Order>| {
        let s = s.clone();
        async move { s.lock().unwrap().push(o.id) }
    };
    let options = opts()
        .batch_size(100)
        .max_in_flight(256)
        .start_from(streamwise::StartFrom::Beginning);
    let running = h
        .start(Router::new().subscribe("orders", options, Routes::new().route("order.placed", handler)))
        .await;
    wait_until_handled(&running, 5000).await;
    let report = running.shutdown().await.unwrap();
    assert_eq!(report.handled, 5000);
    let mut ids = std::mem::take(&mut *seen.lock().unwrap());
    ids.sort_unstable();
    assert_eq!(ids, (0..5000).collect::<Vec<_>>(), "each message once");
    assert_eq!(h.backend.pending_count("orders", "svc").unwrap(), 0);
}

#[tokio::test]
async fn a_subscription_that_ends_by_itself_stops_run_with_the_reason() {
    let backend = MemoryBackend::new();
    let subscriber = backend.subscriber();
    async fn ignore(_: Message) {}
    let router = Router::new().subscribe("t", opts(), Routes::new().route("e", ignore));
    let run = tokio::spawn(router.run(
        Arc::new(subscriber.clone()),
        Arc::new(backend.publisher()),
        std::future::pending(),
    ));
    // Closed from outside the router: its subscription ends, and nothing would consume.
    let deadline = tokio::time::Instant::now() + WAIT;
    while backend.pending_count("t", "svc").is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the router never subscribed"
        );
        tokio::task::yield_now().await;
    }
    subscriber.close().await.unwrap();
    match tokio::time::timeout(WAIT, run)
        .await
        .expect("run returns")
        .unwrap()
    {
        Err(Error::SubscriptionEnded { topic, .. }) => assert_eq!(topic, "t"),
        other => panic!("expected SubscriptionEnded, got {other:?}"),
    }
}
