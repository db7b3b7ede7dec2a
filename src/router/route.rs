//! One route: what a subscription calls for one event type. [`Route`] is a handler with its
//! state, or a service (a layered handler, or any tower service); [`IntoRoute`] is what
//! [`Routes::route`](super::Routes::route) accepts; [`BoxRoute`], [`RouteLayer`] and
//! [`BoxRouteLayer`] are the type-erased forms that routes and layers take.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use futures::future::BoxFuture;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt};

use super::handler::{Handler, HandlerService, Layered};
use super::incoming::Incoming;
use super::outcome::Outcome;
use crate::error::BoxError;

/// A route's service once type-erased: what layers wrap and the router calls.
pub type BoxRoute = BoxCloneSyncService<Incoming, Outcome, BoxError>;

/// `service` type-erased. A service that is a [`BoxRoute`] already is taken as it is:
/// boxing it again would cost a box per delivery.
pub(crate) fn boxed<Svc>(service: Svc) -> BoxRoute
where
    Svc: Service<Incoming, Response = Outcome> + Clone + Send + Sync + 'static,
    Svc::Error: Into<BoxError>,
    Svc::Future: Send + 'static,
{
    if let Some(route) = (&service as &dyn Any).downcast_ref::<BoxRoute>() {
        return route.clone();
    }
    BoxCloneSyncService::new(service.map_err(Into::into))
}

/// A route of a subscription, as its dispatch calls it.
#[derive(Clone)]
pub struct Route(Call);

#[derive(Clone)]
enum Call {
    /// A plain handler, called through a shared reference: no clone of a boxed service and
    /// no box around its future per delivery.
    Handler(Arc<dyn CallHandler>),
    /// A service (layered, or given as one), called as tower services are.
    Service(BoxRoute),
}

impl Route {
    /// The route of a handler with its state.
    pub(crate) fn handler<H, T, S>(service: HandlerService<H, T, S>) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
        S: Clone + Send + Sync + 'static,
    {
        Route(Call::Handler(Arc::new(service)))
    }

    /// The route of any service from [`Incoming`] to [`Outcome`].
    pub(crate) fn service<Svc>(service: Svc) -> Self
    where
        Svc: Service<Incoming, Response = Outcome> + Clone + Send + Sync + 'static,
        Svc::Error: Into<BoxError>,
        Svc::Future: Send + 'static,
    {
        Route(Call::Service(boxed(service)))
    }

    /// Runs the route on `incoming`.
    pub(crate) fn call(&self, incoming: Incoming) -> BoxFuture<'static, Result<Outcome, BoxError>> {
        match &self.0 {
            Call::Handler(handler) => handler.call(incoming),
            Call::Service(service) => Box::pin(service.clone().oneshot(incoming)),
        }
    }
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Call::Handler(_) => "Route::Handler",
            Call::Service(_) => "Route::Service",
        })
    }
}

/// A handler with its state, callable through a shared reference.
trait CallHandler: Send + Sync + 'static {
    fn call(&self, incoming: Incoming) -> BoxFuture<'static, Result<Outcome, BoxError>>;
}

impl<H, T, S> CallHandler for HandlerService<H, T, S>
where
    H: Handler<T, S>,
    T: 'static,
    S: Clone + Send + Sync + 'static,
{
    fn call(&self, incoming: Incoming) -> BoxFuture<'static, Result<Outcome, BoxError>> {
        self.call_ref(incoming)
    }
}

/// What [`Routes::route`](super::Routes::route) routes: a [`Handler`], or a handler in
/// route layers ([`Handler::layer`]), given the routes' state `S`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be routed as a handler (for routes with state `{S}`)",
    label = "not a handler",
    note = "a handler is an async fn, or a closure returning a future, taking at most 8 arguments that implement `FromIncoming<{S}>` (`Json<T>`, `State<{S}>`, `Metadata`, `DeliveryInfo`, `EventType`, `Message`, `Incoming`) and returning `()`, `Outcome`, `Verdict`, `Outgoing`, `Vec<Outgoing>` or a `Result` of one",
    note = "`State<X>` needs routes whose state is `X`: build them with `Routes::with_state` or `Router::routes`",
    note = "a tower service is routed with `Routes::route_service`"
)]
pub trait IntoRoute<T, S> {
    /// The route, with `state`.
    fn into_route(self, state: S) -> Route;
}

// For handlers that are functions (not for any `Handler`, which a downstream crate could
// implement for `Layered` too), as the `Handler` impls are.
macro_rules! impl_into_route {
    ($($ty:ident),*) => {
        impl<F, Fut, S, $($ty,)*> IntoRoute<($($ty,)*), S> for F
        where
            F: FnOnce($($ty,)*) -> Fut + Handler<($($ty,)*), S>,
            S: Clone + Send + Sync + 'static,
            $($ty: 'static,)*
        {
            fn into_route(self, state: S) -> Route {
                Route::handler(self.with_state(state))
            }
        }
    };
}

for_each_arity!(impl_into_route);

impl<L, H, T, S> IntoRoute<T, S> for Layered<L, H, T, S>
where
    H: Handler<T, S>,
    L: Layer<HandlerService<H, T, S>>,
    L::Service: Service<Incoming, Response = Outcome> + Clone + Send + Sync + 'static,
    <L::Service as Service<Incoming>>::Error: Into<BoxError>,
    <L::Service as Service<Incoming>>::Future: Send + 'static,
{
    fn into_route(self, state: S) -> Route {
        Route::service(self.with_state(state))
    }
}

/// A [`RouteLayer`] boxed: cloneable, so that one layer can wrap several subscriptions (a
/// CQRS processor wraps each of its subscriptions in its layers). It is a tower [`Layer`]
/// itself, and a [`RouteLayer`].
#[derive(Clone)]
pub struct BoxRouteLayer(Arc<dyn Fn(BoxRoute) -> BoxRoute + Send + Sync>);

impl BoxRouteLayer {
    /// `layer`, boxed.
    pub fn new(layer: impl RouteLayer) -> Self {
        layer.into_box_layer()
    }
}

impl Layer<BoxRoute> for BoxRouteLayer {
    type Service = BoxRoute;

    fn layer(&self, inner: BoxRoute) -> BoxRoute {
        (self.0)(inner)
    }
}

impl fmt::Debug for BoxRouteLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BoxRouteLayer")
    }
}

/// A tower [`Layer`] that fits the router: it wraps a [`BoxRoute`] into another cloneable
/// service from [`Incoming`] to [`Outcome`]. Every such layer implements it (tower's own,
/// `streamwise-middleware`'s, yours).
pub trait RouteLayer: Send + Sync + 'static {
    /// The layer, boxed.
    fn into_box_layer(self) -> BoxRouteLayer;
}

impl<L> RouteLayer for L
where
    L: Layer<BoxRoute> + Send + Sync + 'static,
    L::Service: Service<Incoming, Response = Outcome> + Clone + Send + Sync + 'static,
    <L::Service as Service<Incoming>>::Error: Into<BoxError>,
    <L::Service as Service<Incoming>>::Future: Send + 'static,
{
    fn into_box_layer(self) -> BoxRouteLayer {
        BoxRouteLayer(Arc::new(move |inner| boxed(self.layer(inner))))
    }
}
