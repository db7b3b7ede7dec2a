//! The builders: [`Routes`], the route table of one subscription (a route per event type, and
//! the subscription's fallback, layers, ordering and retry backoff), and [`Router`], its
//! subscriptions and router-wide settings. Starting a router checks them and builds each
//! subscription's service stack.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower::{Layer, Service};

use super::backoff::RetryBackoff;
use super::dispatch::{Dispatch, Fallback};
use super::handler::{Handler, HandlerService};
use super::incoming::Incoming;
use super::ordering::OrderKey;
use super::outcome::Outcome;
use super::route::{BoxRouteLayer, IntoRoute, Route, RouteLayer, boxed};
use super::run::{self, Plan, PlanService, RunningRouter, ShutdownReport};
use crate::error::{BoxError, Error, Result, validate_event_type};
use crate::pubsub::{Publisher, SubscribeOptions, Subscriber};

/// The routes of one subscription: a handler per event type, a fallback, layers and ordering.
///
/// Its handlers get its state `S` through [`State`](super::State): the state is given when the
/// routes are made ([`Routes::with_state`], [`Router::routes`]), and each route is built
/// with it as it is added.
pub struct Routes<S = ()> {
    routes: HashMap<String, Route>,
    fallback: Fallback,
    layers: Vec<BoxRouteLayer>,
    order_by: Option<OrderKey>,
    retry_backoff: Option<RetryBackoff>,
    state: S,
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
    /// Routes whose handlers get `state` through [`State`](super::State).
    pub fn with_state(state: S) -> Self {
        Routes {
            routes: HashMap::new(),
            fallback: Fallback::default(),
            layers: Vec::new(),
            order_by: None,
            retry_backoff: None,
            state,
            errors: Vec::new(),
        }
    }

    /// Routes `event_type` to `handler`: a [`Handler`], or one in route layers
    /// ([`Handler::layer`]). Routing the same type twice is an error when the router starts.
    #[must_use]
    pub fn route<H, T>(self, event_type: &str, handler: H) -> Self
    where
        H: IntoRoute<T, S>,
    {
        let route = handler.into_route(self.state.clone());
        self.add_route(event_type, route)
    }

    /// Routes `event_type` to `handler` wrapped in `layer` (a route-level layer); the same as
    /// `route(event_type, handler.layer(layer))`.
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
        self.route(event_type, handler.layer(layer))
    }

    /// Routes `event_type` to any service from [`Incoming`] to [`Outcome`] (a handler with
    /// its state, [`Handler::with_state`], in a tower stack, say).
    #[must_use]
    pub fn route_service<Svc>(self, event_type: &str, service: Svc) -> Self
    where
        Svc: Service<Incoming, Response = Outcome> + Clone + Send + Sync + 'static,
        Svc::Error: Into<BoxError>,
        Svc::Future: Send + 'static,
    {
        self.add_route(event_type, Route::service(service))
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
        self.layers.push(layer.into_box_layer());
        self
    }

    /// Keeps deliveries with the same key in order when `max_in_flight` is above 1: a delivery
    /// waits for the previous one with its key to be settled. Deliveries without the key are
    /// not ordered. (Across keys, and across consumers of a group, there is no order.)
    ///
    /// Unset, the key is the partition key ([`KEY_METADATA`](crate::partition::KEY_METADATA),
    /// set by [`PartitionedPublisher::publish_keyed`](crate::partition::PartitionedPublisher::publish_keyed)):
    /// on a partitioned topic, each key's messages are handled one at a time, in order, across
    /// the whole group.
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

/// Dispatches deliveries of one or more subscriptions to handlers; see the [module
/// docs](super).
pub struct Router<S = ()> {
    state: S,
    subscriptions: Vec<(String, SubscribeOptions, Routes<S>)>,
    layers: Vec<BoxRouteLayer>,
    shutdown_deadline: Duration,
    retry_backoff: RetryBackoff,
    health: super::health::RouterHealth,
    trace_links: bool,
}

impl<S> fmt::Debug for Router<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field(
                "subscriptions",
                &self
                    .subscriptions
                    .iter()
                    .map(|(t, o, r)| (t, o.group.as_str(), r))
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
    /// A router whose handlers get `state` through [`State`](super::State).
    pub fn with_state(state: S) -> Self {
        Router {
            state,
            subscriptions: Vec::new(),
            layers: Vec::new(),
            shutdown_deadline: Duration::from_secs(30),
            retry_backoff: RetryBackoff::default(),
            health: super::health::RouterHealth::default(),
            trace_links: false,
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
        self.layers.push(layer.into_box_layer());
        self
    }

    /// With the `opentelemetry` feature ([`crate::otel`]): a delivery's CONSUMER span links to
    /// the producer's span instead of being its child (for consumers whose work should be a
    /// trace of its own). Default `false`: a child.
    #[must_use]
    pub fn trace_links(mut self, links: bool) -> Self {
        self.trace_links = links;
        self
    }

    /// The router's health, [`Health::Starting`](super::Health::Starting) until it runs; the
    /// same handle reports it while it runs and after it stopped (a readiness check can hold
    /// it from before the start).
    pub fn health(&self) -> super::health::RouterHealth {
        self.health.clone()
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
            let mut event_types: Vec<String> = routes.routes.keys().cloned().collect();
            event_types.sort_unstable();
            let dispatch = Dispatch::new(routes.routes, routes.fallback);
            let mut layers = routes.layers.iter().chain(self.layers.iter()).peekable();
            let service = if layers.peek().is_none() {
                PlanService::Dispatch(dispatch)
            } else {
                PlanService::Layered(layers.fold(boxed(dispatch), |service, layer| layer.layer(service)))
            };
            plans.push(Plan {
                topic,
                options,
                service,
                // Deliveries of a partitioned topic keep their key's order by default.
                order_by: Some(
                    routes
                        .order_by
                        .unwrap_or_else(|| OrderKey::Metadata(crate::partition::KEY_METADATA.to_owned())),
                ),
                retry_backoff,
                event_types,
                trace_links: self.trace_links,
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
        let health = self.health.clone();
        let started = match self.plan() {
            Ok((plans, deadline)) => run::start(plans, deadline, subscriber, publisher, health.clone()).await,
            Err(e) => Err(e),
        };
        if let Err(e) = &started {
            health.start_failed(e.to_string());
        }
        started
    }

    /// Runs until `shutdown` completes (for example [`shutdown_signal`](super::shutdown_signal):
    /// ctrl-c or SIGTERM), then shuts down gracefully.
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
