//! The router: takes deliveries from any [`Subscriber`], dispatches each by event type to a
//! handler, and settles it from the handler's [`Outcome`].
//!
//! Handlers are async functions taking extractors ([`Json`], [`State`], [`Metadata`],
//! [`DeliveryInfo`], ...) and returning an outcome, like axum handlers. Each becomes a tower
//! [`Service`], so any tower [`Layer`] wraps it, at three levels:
//!
//! | level | added with | wraps |
//! |---|---|---|
//! | route | [`Routes::route_service`] / [`Routes::route_layered`] | one event type's handler |
//! | subscription | [`Routes::layer`] | every delivery of one subscription, fallback included |
//! | router | [`Router::layer`] | every delivery of every subscription |
//!
//! A delivery passes router layers first (outermost), then subscription layers, then route
//! layers, then the handler; within one level, the layer added last is outermost, as with
//! tower's `ServiceBuilder` read bottom-up.
//!
//! A handler's error or panic nacks the delivery after a delay that grows with its delivery
//! count ([`RetryBackoff`], set per subscription or for the router); an error with
//! [`Permanent`] in its source chain dead-letters it at once.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> streamwise::Result<()> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use serde::Deserialize;
//! use streamwise::memory::MemoryBackend;
//! use streamwise::router::{Json, Outcome, Router, Routes};
//! use streamwise::{Message, Publisher, SubscribeOptions};
//!
//! #[derive(Deserialize)]
//! struct PriceUpdate { symbol: String, price: f64 }
//!
//! async fn on_price(Json(update): Json<PriceUpdate>) -> Outcome {
//!     if update.price < 0.0 { return Outcome::dead_letter("negative price"); }
//!     Outcome::ack().publish("audit", Message::new("price.seen", &update.symbol).unwrap())
//! }
//!
//! let backend = MemoryBackend::new();
//! let router = Router::new().subscribe(
//!     "data-updates",
//!     SubscribeOptions::new("processors", "worker-1"),
//!     Routes::new().route("price.update", on_price),
//! );
//! let running = router
//!     .start(Arc::new(backend.subscriber()), Arc::new(backend.publisher()))
//!     .await?;
//! let msg = Message::new("price.update", &serde_json::json!({"symbol": "AAPL", "price": 150.25}))?;
//! backend.publisher().publish("data-updates", msg).await?;
//! # let deadline = std::time::Instant::now() + Duration::from_secs(10);
//! # while backend.stream_len("audit").unwrap_or(0) == 0 && std::time::Instant::now() < deadline {
//! #     tokio::time::sleep(Duration::from_millis(5)).await;
//! # }
//! running.shutdown().await?;
//! assert_eq!(backend.stream_len("audit")?, 1);
//! # Ok(()) }
//! ```

mod backoff;
mod extract;
mod handler;
mod incoming;
mod outcome;
mod run;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt};

pub use self::backoff::RetryBackoff;
pub use self::extract::{EventType, FromIncoming, Json, State};
pub use self::handler::{Handler, HandlerService, handler_service};
pub use self::incoming::Incoming;
pub use self::outcome::{
    IntoHandlerResult, IntoOutcome, Outcome, Outgoing, Permanent, Verdict, outcome_of_error,
};
pub use self::run::{RunningRouter, ShutdownReport, shutdown_signal};
pub use crate::delivery::DeliveryInfo;
pub use crate::message::Metadata;

use crate::error::{BoxError, Error, Result, validate_event_type};
use crate::pubsub::{Publisher, SubscribeOptions, Subscriber};

/// A route's service once type-erased: what layers wrap and the router calls.
pub type BoxRoute = BoxCloneSyncService<Incoming, Outcome, BoxError>;

pub(crate) type LayerFn = Arc<dyn Fn(BoxRoute) -> BoxRoute + Send + Sync>;

pub(crate) fn boxed<Svc>(service: Svc) -> BoxRoute
where
    Svc: Service<Incoming, Response = Outcome> + Clone + Send + Sync + 'static,
    Svc::Error: Into<BoxError>,
    Svc::Future: Send + 'static,
{
    BoxCloneSyncService::new(service.map_err(Into::into))
}

pub(crate) fn layer_fn<L>(layer: L) -> LayerFn
where
    L: Layer<BoxRoute> + Send + Sync + 'static,
    L::Service: Service<Incoming, Response = Outcome> + Clone + Send + Sync + 'static,
    <L::Service as Service<Incoming>>::Error: Into<BoxError>,
    <L::Service as Service<Incoming>>::Future: Send + 'static,
{
    Arc::new(move |inner| boxed(layer.layer(inner)))
}

/// A tower [`Layer`] that fits the router: it wraps a [`BoxRoute`] into another cloneable
/// service from [`Incoming`] to [`Outcome`]. Every such layer implements it (tower's own,
/// `streamwise-middleware`'s, yours).
pub trait RouteLayer: Send + Sync + 'static {
    /// The layer as a function on boxed routes.
    #[doc(hidden)]
    fn into_route_fn(self) -> Arc<dyn Fn(BoxRoute) -> BoxRoute + Send + Sync>;
}

impl<L> RouteLayer for L
where
    L: Layer<BoxRoute> + Send + Sync + 'static,
    L::Service: Service<Incoming, Response = Outcome> + Clone + Send + Sync + 'static,
    <L::Service as Service<Incoming>>::Error: Into<BoxError>,
    <L::Service as Service<Incoming>>::Future: Send + 'static,
{
    fn into_route_fn(self) -> LayerFn {
        layer_fn(self)
    }
}

/// What to do with a delivery whose event type has no route.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Fallback {
    /// Acknowledge and skip it (for streams that carry types this service does not handle).
    AckAndSkip,
    /// Nack it (it comes back; after `max_deliveries` it is dead-lettered).
    Nack,
    /// Write it to `<stream>-dead` with the reason, then acknowledge (the default: nothing is
    /// dropped unseen).
    #[default]
    DeadLetter,
}

/// Where the ordering key of a delivery comes from, for [`Routes::order_by`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrderKey {
    /// A metadata field.
    Metadata(String),
    /// A field of the JSON payload, as a JSON pointer (`/customer/id`).
    Payload(String),
}

impl OrderKey {
    fn of(&self, incoming: &Incoming) -> Option<String> {
        let message = incoming.message();
        match self {
            OrderKey::Metadata(field) => message.metadata().get(field).map(str::to_owned),
            OrderKey::Payload(pointer) => {
                let json = message.json().ok()?;
                json.pointer(pointer).map(|v| match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
            }
        }
    }
}

/// A route as [`Dispatch`] calls it.
#[derive(Clone)]
pub(crate) enum Route {
    /// A plain handler, called through a shared reference: no clone of a boxed service and
    /// no box around its future per delivery.
    Handler(Arc<dyn CallHandler>),
    /// A service (layered, or given as one), called as tower services are.
    Service(BoxRoute),
}

/// A handler with its state, callable through a shared reference.
pub(crate) trait CallHandler: Send + Sync + 'static {
    fn call(&self, incoming: Incoming) -> futures::future::BoxFuture<'static, Result<Outcome, BoxError>>;
}

impl<H, T, S> CallHandler for HandlerService<H, T, S>
where
    H: Handler<T, S>,
    T: 'static,
    S: Clone + Send + Sync + 'static,
{
    fn call(&self, incoming: Incoming) -> futures::future::BoxFuture<'static, Result<Outcome, BoxError>> {
        self.call_ref(incoming)
    }
}

/// The routes of one subscription: a handler per event type, a fallback, layers and ordering.
pub struct Routes<S = ()> {
    routes: HashMap<String, Route>,
    fallback: Fallback,
    pub(crate) layers: Vec<LayerFn>,
    order_by: Option<OrderKey>,
    retry_backoff: Option<RetryBackoff>,
    state: Option<S>,
    errors: Vec<Error>,
}

impl<S> fmt::Debug for Routes<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut types: Vec<&String> = self.routes.keys().collect();
        types.sort();
        f.debug_struct("Routes")
            .field("event_types", &types)
            .field("fallback", &self.fallback)
            .field("layers", &self.layers.len())
            .field("order_by", &self.order_by)
            .field("retry_backoff", &self.retry_backoff)
            .finish()
    }
}

impl Routes<()> {
    /// Routes without state.
    pub fn new() -> Self {
        Routes::with_state(())
    }
}

impl Default for Routes<()> {
    fn default() -> Self {
        Routes::new()
    }
}

impl<S: Clone + Send + Sync + 'static> Routes<S> {
    /// Routes whose handlers get `state` through [`State`].
    pub fn with_state(state: S) -> Self {
        Routes {
            routes: HashMap::new(),
            fallback: Fallback::default(),
            layers: Vec::new(),
            order_by: None,
            retry_backoff: None,
            state: Some(state),
            errors: Vec::new(),
        }
    }

    /// Routes `event_type` to `handler`. Routing the same type twice is an error when the
    /// router starts.
    #[must_use]
    pub fn route<H, T>(self, event_type: &str, handler: H) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
    {
        let state = self.state.clone().expect("routes always carry their state");
        let route = Route::Handler(Arc::new(handler_service(handler, state)));
        self.add_route(event_type, route)
    }

    /// Routes `event_type` to `handler` wrapped in `layer` (a route-level layer).
    #[must_use]
    pub fn route_layered<H, T, L>(self, event_type: &str, handler: H, layer: L) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
        L: Layer<HandlerService<H, T, S>>,
        L::Service: Service<Incoming, Response = Outcome> + Clone + Send + Sync + 'static,
        <L::Service as Service<Incoming>>::Error: Into<BoxError>,
        <L::Service as Service<Incoming>>::Future: Send + 'static,
    {
        let state = self.state.clone().expect("routes always carry their state");
        self.route_service(event_type, layer.layer(handler_service(handler, state)))
    }

    /// Routes `event_type` to any service from [`Incoming`] to [`Outcome`].
    #[must_use]
    pub fn route_service<Svc>(self, event_type: &str, service: Svc) -> Self
    where
        Svc: Service<Incoming, Response = Outcome> + Clone + Send + Sync + 'static,
        Svc::Error: Into<BoxError>,
        Svc::Future: Send + 'static,
    {
        self.add_route(event_type, Route::Service(boxed(service)))
    }

    fn add_route(mut self, event_type: &str, route: Route) -> Self {
        if let Err(e) = validate_event_type(event_type) {
            self.errors.push(e);
        } else if self.routes.insert(event_type.to_owned(), route).is_some() {
            self.errors.push(Error::invalid(
                "event_type",
                format_args!("{event_type:?} is routed twice in one subscription"),
            ));
        }
        self
    }

    /// What to do with event types that have no route. Default [`Fallback::DeadLetter`].
    #[must_use]
    pub fn fallback(mut self, fallback: Fallback) -> Self {
        self.fallback = fallback;
        self
    }

    /// Wraps every delivery of this subscription (a subscription-level layer).
    #[must_use]
    pub fn layer(mut self, layer: impl RouteLayer) -> Self {
        self.layers.push(layer.into_route_fn());
        self
    }

    /// Keeps deliveries with the same key in order when `max_in_flight` is above 1: a delivery
    /// waits for the previous one with its key to be settled. Deliveries without the key are
    /// not ordered. (Across keys, and across consumers of a group, there is no order.)
    #[must_use]
    pub fn order_by(mut self, key: OrderKey) -> Self {
        self.order_by = Some(key);
        self
    }

    /// How long a delivery whose handler returned an error or panicked waits before it comes
    /// back, by its delivery count. Unset, the router's ([`Router::retry_backoff`]) applies.
    #[must_use]
    pub fn retry_backoff(mut self, backoff: RetryBackoff) -> Self {
        self.retry_backoff = Some(backoff);
        self
    }
}

/// Dispatches a delivery to its route, or applies the fallback.
#[derive(Clone)]
pub(crate) struct Dispatch {
    /// Sorted by event type: a binary search costs less per delivery than hashing the type.
    routes: Arc<[(String, Route)]>,
    fallback: Fallback,
}

impl Dispatch {
    fn new(routes: HashMap<String, Route>, fallback: Fallback) -> Self {
        let mut routes: Vec<(String, Route)> = routes.into_iter().collect();
        routes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Dispatch {
            routes: routes.into(),
            fallback,
        }
    }

    fn route(&self, event_type: &str) -> Option<&Route> {
        let found = self.routes.binary_search_by(|(t, _)| t.as_str().cmp(event_type));
        found.ok().map(|i| &self.routes[i].1)
    }
}

impl Service<Incoming> for Dispatch {
    type Response = Outcome;
    type Error = BoxError;
    type Future = futures::future::BoxFuture<'static, Result<Outcome, BoxError>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, incoming: Incoming) -> Self::Future {
        match self.route(incoming.message().event_type()) {
            Some(Route::Handler(handler)) => handler.call(incoming),
            Some(Route::Service(route)) => Box::pin(route.clone().oneshot(incoming)),
            None => {
                let event_type = incoming.message().event_type().to_owned();
                let outcome = match self.fallback {
                    Fallback::AckAndSkip => {
                        tracing::debug!(event_type, "no route; acknowledged and skipped");
                        Outcome::ack()
                    }
                    Fallback::Nack => Outcome::nack(),
                    Fallback::DeadLetter => {
                        Outcome::dead_letter(format!("no route for event type {event_type:?}"))
                    }
                };
                Box::pin(std::future::ready(Ok(outcome)))
            }
        }
    }
}

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
    topic: String,
    options: SubscribeOptions,
    service: PlanService,
    order_by: Option<OrderKey>,
    retry_backoff: RetryBackoff,
}

/// Dispatches deliveries of one or more subscriptions to handlers; see the [module
/// docs](self).
pub struct Router<S = ()> {
    state: S,
    subscriptions: Vec<(String, SubscribeOptions, Routes<S>)>,
    layers: Vec<LayerFn>,
    shutdown_deadline: Duration,
    retry_backoff: RetryBackoff,
}

impl<S> fmt::Debug for Router<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field(
                "subscriptions",
                &self
                    .subscriptions
                    .iter()
                    .map(|(t, o, r)| (t, o.group(), r))
                    .collect::<Vec<_>>(),
            )
            .field("layers", &self.layers.len())
            .field("shutdown_deadline", &self.shutdown_deadline)
            .field("retry_backoff", &self.retry_backoff)
            .finish()
    }
}

impl Router<()> {
    /// A router without state.
    pub fn new() -> Self {
        Router::with_state(())
    }
}

impl Default for Router<()> {
    fn default() -> Self {
        Router::new()
    }
}

impl<S: Clone + Send + Sync + 'static> Router<S> {
    /// A router whose handlers get `state` through [`State`].
    pub fn with_state(state: S) -> Self {
        Router {
            state,
            subscriptions: Vec::new(),
            layers: Vec::new(),
            shutdown_deadline: Duration::from_secs(30),
            retry_backoff: RetryBackoff::default(),
        }
    }

    /// Empty routes carrying this router's state.
    pub fn routes(&self) -> Routes<S> {
        Routes::with_state(self.state.clone())
    }

    /// Consumes `topic` as `options` says (group, consumer, `max_in_flight`, ...), with
    /// `routes`.
    #[must_use]
    pub fn subscribe(mut self, topic: &str, options: SubscribeOptions, routes: Routes<S>) -> Self {
        self.subscriptions.push((topic.to_owned(), options, routes));
        self
    }

    /// Wraps every delivery of every subscription (a router-level layer, outermost).
    #[must_use]
    pub fn layer(mut self, layer: impl RouteLayer) -> Self {
        self.layers.push(layer.into_route_fn());
        self
    }

    /// How long shutdown lets in-flight handlers finish before it stops waiting (their
    /// deliveries then stay pending and come back). Default 30 s.
    #[must_use]
    pub fn shutdown_deadline(mut self, deadline: Duration) -> Self {
        self.shutdown_deadline = deadline;
        self
    }

    /// The retry backoff of every subscription whose routes set none
    /// ([`Routes::retry_backoff`]). Default [`RetryBackoff::default`]: 100 ms doubling to 10 s.
    #[must_use]
    pub fn retry_backoff(mut self, backoff: RetryBackoff) -> Self {
        self.retry_backoff = backoff;
        self
    }

    /// Checks the routes and builds each subscription's service stack.
    fn plan(self) -> Result<(Vec<Plan>, Duration)> {
        if self.subscriptions.is_empty() {
            return Err(Error::invalid("subscriptions", "the router has none"));
        }
        self.retry_backoff.validate()?;
        let mut plans = Vec::new();
        for (topic, options, mut routes) in self.subscriptions {
            options.validate(&topic)?;
            if let Some(e) = routes.errors.drain(..).next() {
                return Err(e);
            }
            let retry_backoff = routes.retry_backoff.unwrap_or(self.retry_backoff);
            retry_backoff.validate()?;
            let dispatch = Dispatch::new(routes.routes, routes.fallback);
            let mut layers = routes.layers.iter().chain(self.layers.iter()).peekable();
            let service = if layers.peek().is_none() {
                PlanService::Dispatch(dispatch)
            } else {
                PlanService::Layered(layers.fold(boxed(dispatch), |service, layer| layer(service)))
            };
            plans.push(Plan {
                topic,
                options,
                service,
                order_by: routes.order_by,
                retry_backoff,
            });
        }
        Ok((plans, self.shutdown_deadline))
    }

    /// Subscribes and starts dispatching; returns a handle to shut down with.
    pub async fn start(
        self,
        subscriber: Arc<dyn Subscriber>,
        publisher: Arc<dyn Publisher>,
    ) -> Result<RunningRouter> {
        let (plans, deadline) = self.plan()?;
        run::start(plans, deadline, subscriber, publisher).await
    }

    /// Runs until `shutdown` completes (for example [`shutdown_signal`]: ctrl-c or SIGTERM),
    /// then shuts down gracefully.
    ///
    /// A subscription that ends by itself meanwhile (its consumer lost its lease to another
    /// process after a pause longer than the lease, say) stops the router too: it shuts down
    /// gracefully and returns [`Error::SubscriptionEnded`], so that the process exits and its
    /// supervisor restarts it, instead of staying up doing nothing.
    pub async fn run(
        self,
        subscriber: Arc<dyn Subscriber>,
        publisher: Arc<dyn Publisher>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<ShutdownReport> {
        let running = self.start(subscriber, publisher).await?;
        let failed = tokio::select! {
            _ = shutdown => None,
            error = running.failed() => Some(error),
        };
        let report = running.shutdown().await;
        match failed {
            Some(error) => Err(error),
            None => report,
        }
    }
}
