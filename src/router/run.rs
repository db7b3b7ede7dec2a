//! Running a router: one task per subscription pulls deliveries (only as fast as
//! `max_in_flight` lets the subscription hand them out) and runs each through its service
//! stack (after the one before it with its key, when the subscription is ordered:
//! `ordering`): first in place, as soon as it is taken, and, if it has to wait, on as one of
//! the task's concurrent futures. It turns a handler's error or panic into an outcome and has
//! the delivery settled from the outcome (`settle`). (Handlers of one subscription share its
//! task: they run concurrently, not in parallel; CPU-heavy handlers should use
//! `spawn_blocking`. Subscriptions run in parallel.) Shutdown has two phases: stop fetching,
//! then let in-flight handlers finish until the deadline, settle them, and close the
//! subscriber (which flushes acks and checkpoints).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::future::{Either, FutureExt};
use futures::stream::FuturesUnordered;
use tokio::task::JoinHandle;
use tower::{Service, ServiceExt};

use super::backoff::RetryBackoff;
use super::dispatch::Dispatch;
use super::health::RouterHealth;
use super::incoming::Incoming;
use super::ordering::{KeyOrder, OrderKey};
use super::outcome::{Outcome, outcome_of_error};
use super::route::BoxRoute;
use super::settle::settle;
use crate::delivery::Delivery;
use crate::error::{Error, Result};
use crate::metrics::DeliveryMetrics;
use crate::pubsub::{Publisher, SubscribeOptions, Subscriber, Subscription};
use crate::signal::Signal;

/// What runs a subscription's deliveries.
#[derive(Clone)]
pub(crate) enum PlanService {
    /// No layers: the dispatch itself, called directly (it is always ready).
    Dispatch(Dispatch),
    /// The dispatch inside the subscription's and the router's layers.
    Layered(BoxRoute),
}

/// One subscription of a router, ready to run.
pub(crate) struct Plan {
    pub(crate) topic: String,
    pub(crate) options: SubscribeOptions,
    pub(crate) service: PlanService,
    pub(crate) order_by: Option<OrderKey>,
    pub(crate) retry_backoff: RetryBackoff,
    /// The event types the routes handle (the metrics' `event_type` labels).
    pub(crate) event_types: Vec<String>,
    /// See [`Router::trace_links`](super::Router::trace_links).
    pub(crate) trace_links: bool,
}

/// What a shutdown did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Deliveries handled and settled over the router's life.
    pub handled: u64,
    /// Handlers still running at the deadline; their deliveries stay pending and come back.
    pub abandoned: u64,
    /// Settlements (acks) not written to the backend by the deadline; their entries stay
    /// pending and come back.
    pub unflushed: u64,
}

/// A started router; [`shutdown`](Self::shutdown) stops it gracefully.
pub struct RunningRouter {
    stop_fetching: Signal,
    failure: Arc<Failure>,
    abandon: Signal,
    loops: Vec<JoinHandle<()>>,
    subscriber: Arc<dyn Subscriber>,
    deadline: Duration,
    handled: Arc<AtomicU64>,
    in_flight: Arc<AtomicU64>,
    health: RouterHealth,
}

impl std::fmt::Debug for RunningRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningRouter")
            .field("subscriptions", &self.loops.len())
            .field("handled", &self.handled())
            .field("in_flight", &self.in_flight())
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

/// Completes on ctrl-c or, on Unix, SIGTERM: pass it to [`Router::run`](super::Router::run).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}

pub(crate) async fn start(
    plans: Vec<Plan>,
    deadline: Duration,
    subscriber: Arc<dyn Subscriber>,
    publisher: Arc<dyn Publisher>,
    health: RouterHealth,
) -> Result<RunningRouter> {
    let stop_fetching = Signal::new();
    let abandon = Signal::new();
    let failure = Arc::new(Failure {
        health: health.clone(),
        ..Failure::default()
    });
    let handled = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(AtomicU64::new(0));
    // Subscribe everything first, so that a bad subscription fails the start as a whole.
    let mut subscriptions = Vec::new();
    for plan in plans {
        let subscription = subscriber.subscribe(&plan.topic, plan.options.clone()).await?;
        health.watch(&plan.topic, &plan.options.group, subscription.health_handle());
        subscriptions.push((plan, subscription));
    }
    let loops = subscriptions
        .into_iter()
        .map(|(plan, subscription)| {
            let worker = Worker {
                service: plan.service,
                common: Arc::new(Common {
                    publisher: publisher.clone(),
                    handled: handled.clone(),
                    in_flight: in_flight.clone(),
                    retry_backoff: plan.retry_backoff,
                    metrics: DeliveryMetrics::new(&plan.options.group, plan.event_types),
                    trace_links: plan.trace_links,
                }),
            };
            let ordering = plan.order_by.map(KeyOrder::new);
            tokio::spawn(fetch_loop(
                plan.topic,
                subscription,
                worker,
                ordering,
                stop_fetching.clone(),
                abandon.clone(),
                failure.clone(),
            ))
        })
        .collect();
    health.running();
    Ok(RunningRouter {
        stop_fetching,
        failure,
        abandon,
        loops,
        subscriber,
        deadline,
        handled,
        in_flight,
        health,
    })
}

impl RunningRouter {
    /// Deliveries handled and settled so far.
    pub fn handled(&self) -> u64 {
        self.handled.load(Ordering::Relaxed)
    }

    /// Handlers running right now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The router's health and each subscription's (the same handle as
    /// [`Router::health`](super::Router::health)).
    pub fn health(&self) -> RouterHealth {
        self.health.clone()
    }

    /// Completes when a subscription ended by itself (not through
    /// [`shutdown`](Self::shutdown)): its consumer lost its lease to another process, for
    /// example. The others keep running until `shutdown`. [`Router::run`](super::Router::run)
    /// waits for this beside its shutdown signal and returns the error.
    pub async fn failed(&self) -> Error {
        self.failure.signal.cancelled().await;
        let taken = self
            .failure
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        taken.unwrap_or_else(|| Error::SubscriptionEnded {
            topic: String::new(),
            reason: "reported already".into(),
            source: None,
        })
    }

    /// Stops fetching, lets in-flight handlers finish and settles them, then closes the
    /// subscriber, which flushes acks and checkpoints; all of it within the shutdown deadline.
    /// Handlers get the deadline less a reserve for the flush (a quarter of it, at most 2 s);
    /// those still running then are dropped, and their deliveries stay pending and come back
    /// later. A flush that cannot finish in time (the server does not answer) is given up:
    /// its acks stay pending too (redelivered later), and the report counts them.
    pub async fn shutdown(self) -> Result<ShutdownReport> {
        let started = tokio::time::Instant::now();
        let reserve = (self.deadline / 4).min(Duration::from_secs(2));
        self.health.stopping();
        self.stop_fetching.cancel();
        // Each subscription task stops fetching and ends once its handlers are done.
        let all = futures::future::join_all(self.loops);
        tokio::pin!(all);
        let handlers_until = started + self.deadline.saturating_sub(reserve);
        let abandoned = match tokio::time::timeout_at(handlers_until, &mut all).await {
            Ok(_) => 0,
            Err(_) => {
                let n = self.in_flight.load(Ordering::Relaxed);
                tracing::warn!(abandoned = n, deadline = ?self.deadline, "handlers still running at the shutdown deadline; their deliveries stay pending");
                self.abandon.cancel();
                all.await;
                n
            }
        };
        let unflushed = match tokio::time::timeout_at(started + self.deadline, self.subscriber.close()).await
        {
            Ok(closed) => {
                closed?;
                0
            }
            Err(_) => {
                let n = self.subscriber.unflushed();
                tracing::error!(unflushed = n, deadline = ?self.deadline, "settlements not written by the shutdown deadline; those entries stay pending and come back");
                n
            }
        };
        self.health.stopped();
        Ok(ShutdownReport {
            handled: self.handled.load(Ordering::Relaxed),
            abandoned,
            unflushed,
        })
    }
}

/// The first subscription that ended by itself, and why.
#[derive(Default)]
struct Failure {
    signal: Signal,
    error: Mutex<Option<Error>>,
    health: RouterHealth,
}

impl Failure {
    fn report(&self, topic: &str, last_error: Option<Error>) {
        let reason = match &last_error {
            Some(e) => e.to_string(),
            None => "the subscription's stream ended".to_owned(),
        };
        tracing::error!(
            topic,
            reason,
            "a subscription ended while the router ran; the router stops"
        );
        self.health.ended(topic, &reason);
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if !self.signal.is_cancelled() {
            *slot = Some(Error::SubscriptionEnded {
                topic: topic.to_owned(),
                reason,
                source: last_error.map(Box::new),
            });
            self.signal.cancel();
        }
    }
}

/// The most deliveries taken from a subscription in one go when they are ready at once
/// (buffered by the backend), before the loop looks at handlers and shutdown again.
const READY_BATCH: usize = 64;

async fn fetch_loop(
    topic: String,
    subscription: Subscription,
    worker: Worker,
    mut ordering: Option<KeyOrder>,
    stop_fetching: Signal,
    abandon: Signal,
    failure: Arc<Failure>,
) {
    let mut subscription = Some(subscription);
    let mut last_error = None;
    let mut handlers: FuturesUnordered<HandlerFuture> = FuturesUnordered::new();
    // Waited on across iterations, at the cost of one atomic load per poll.
    let abandoned = abandon.wait();
    let stopped = stop_fetching.wait();
    tokio::pin!(abandoned, stopped);
    loop {
        if subscription.is_none() && handlers.is_empty() {
            break;
        }
        let mut next = tokio::select! {
            biased;
            _ = &mut abandoned => break,
            Some(()) = handlers.next(), if !handlers.is_empty() => continue,
            _ = &mut stopped, if subscription.is_some() => {
                // Stop fetching: deliveries the subscription still buffered go back to
                // pending. In-flight ones keep it alive in the backend until settled.
                subscription = None;
                continue;
            }
            next = next_delivery(&mut subscription), if subscription.is_some() => next,
        };
        for taken in 1.. {
            match next {
                Some(Ok(delivery)) => {
                    let mut handler: HandlerFuture = Box::pin(handling(&worker, ordering.as_mut(), delivery));
                    // Run at once: one that finishes without waiting (most, in a backlog) costs
                    // no place among the concurrent futures; one that waits takes one.
                    if poll_once(handler.as_mut()).await.is_pending() {
                        handlers.push(handler);
                    }
                }
                Some(Err(e)) => {
                    tracing::error!(topic, error = %e, "subscription error; the router keeps going");
                    last_error = Some(e);
                }
                None => {
                    subscription = None;
                    if !stop_fetching.is_cancelled() {
                        failure.report(&topic, last_error.take());
                    }
                    break;
                }
            }
            if taken == READY_BATCH || stop_fetching.is_cancelled() {
                break;
            }
            // Only what the subscription holds already: a fetch would send the next read
            // before the handlers just started have run.
            match subscription.as_mut().and_then(|s| s.take_buffered()) {
                Some(delivery) => next = Some(Ok(delivery)),
                None => break,
            }
        }
    }
    // Handlers abandoned at the shutdown deadline never reach their `done`.
    #[cfg(feature = "metrics")]
    if !handlers.is_empty() {
        drop(handlers);
        worker.common.metrics.none_in_flight();
    }
}

/// A delivery's handling, boxed: run once in place, and kept among the concurrent futures
/// only when it waits.
type HandlerFuture = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Polls `future` once with the calling task's context.
async fn poll_once(mut future: std::pin::Pin<&mut (dyn Future<Output = ()> + Send)>) -> std::task::Poll<()> {
    std::future::poll_fn(|cx| std::task::Poll::Ready(future.as_mut().poll(cx))).await
}

/// The future that handles `delivery`: at once, or after the one before it with the same
/// ordering key.
fn handling(
    worker: &Worker,
    ordering: Option<&mut KeyOrder>,
    delivery: Delivery,
) -> Either<impl Future<Output = ()> + use<>, impl Future<Output = ()> + use<>> {
    let keyed = ordering.and_then(|o| Some((o.key_of(delivery.message())?, o)));
    let handle = worker.clone().handle(Arc::new(delivery));
    match keyed {
        Some((key, ordering)) => Either::Left(ordering.after_previous(key, handle)),
        None => Either::Right(handle),
    }
}

async fn next_delivery(subscription: &mut Option<Subscription>) -> Option<Result<Delivery>> {
    match subscription {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Runs deliveries of one subscription through its service and settles them.
#[derive(Clone)]
struct Worker {
    service: PlanService,
    /// One reference count per delivery for all of them.
    common: Arc<Common>,
}

struct Common {
    publisher: Arc<dyn Publisher>,
    handled: Arc<AtomicU64>,
    in_flight: Arc<AtomicU64>,
    /// The subscription's delay before failed deliveries come back.
    retry_backoff: RetryBackoff,
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    metrics: DeliveryMetrics,
    /// A delivery's span links to the producer's instead of being its child.
    #[cfg_attr(not(feature = "opentelemetry"), allow(dead_code))]
    trace_links: bool,
}

impl Worker {
    /// Handles `delivery` inside its CONSUMER span ([`crate::otel`]).
    #[cfg(feature = "opentelemetry")]
    fn handle(self, delivery: Arc<Delivery>) -> impl Future<Output = ()> + Send + 'static {
        use tracing::Instrument;
        let info = delivery.info();
        let span = crate::otel::process_span(
            info.origin().system(),
            info.origin().stream(),
            info.origin().group(),
            &info.id().to_string(),
            delivery.message(),
            self.common.trace_links,
        );
        self.handle_in_span(delivery).instrument(span)
    }

    /// Handles `delivery`.
    #[cfg(not(feature = "opentelemetry"))]
    fn handle(self, delivery: Arc<Delivery>) -> impl Future<Output = ()> + Send + 'static {
        self.handle_in_span(delivery)
    }

    /// Handles `delivery`: runs its service, turns an error or a panic into an outcome, and
    /// settles it.
    async fn handle_in_span(self, delivery: Arc<Delivery>) {
        let Worker { service, common } = self;
        common.in_flight.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        let handling = {
            let message = delivery.message();
            common.metrics.start(
                delivery.info().origin().stream(),
                message.event_type(),
                delivery.delivery_count(),
                message.timestamp(),
            )
        };
        let incoming = Incoming::new(delivery.clone());
        // Called inside the future, so that a handler panicking before it returns its
        // future is caught like one panicking while it runs.
        let call = async move {
            match service {
                PlanService::Dispatch(mut dispatch) => dispatch.call(incoming).await,
                PlanService::Layered(service) => service.oneshot(incoming).await,
            }
        };
        let run = AssertUnwindSafe(call).catch_unwind();
        let outcome = match run.await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(error)) => {
                let outcome = outcome_of_error(&error, delivery.delivery_count(), &common.retry_backoff);
                tracing::warn!(id = %delivery.id(), delivery = delivery.delivery_count(), error = %error, verdict = ?outcome.verdict(), "handler failed");
                outcome
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a non-string panic".into());
                let delay = common.retry_backoff.delay(delivery.delivery_count());
                tracing::error!(id = %delivery.id(), delivery = delivery.delivery_count(), panic = what, redelivery_in = ?delay, "handler panicked; the delivery is nacked");
                Outcome::nack_after(delay)
            }
        };
        let settled = settle(&delivery, outcome, &*common.publisher, &common.retry_backoff).await;
        #[cfg(feature = "metrics")]
        common.metrics.done(handling, settled);
        #[cfg(not(feature = "metrics"))]
        let _ = settled;
        common.handled.fetch_add(1, Ordering::Relaxed);
        // (A future dropped at the shutdown deadline never gets here: its delivery stays
        // pending, and the count is reported as abandoned.)
        common.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
