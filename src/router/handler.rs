//! [`Handler`]: async functions whose arguments are extractors and whose return value turns
//! into an [`Outcome`]; [`HandlerService`], the tower service of a handler with its state; and
//! [`Layered`], a handler in route layers.

use std::future::Future;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tower::layer::util::Stack;
use tower::{Layer, Service};

use super::extract::FromIncoming;
use super::incoming::Incoming;
use super::outcome::{IntoHandlerResult, Outcome};
use crate::error::BoxError;

/// An async function usable as a handler: up to eight [`FromIncoming`] arguments, and a
/// return value that is an outcome (`()`, [`Outcome`], [`Verdict`](super::Verdict),
/// [`Outgoing`](super::Outgoing), `Vec<Outgoing>`) or a `Result` of one.
///
/// `T` lists the argument types; `S` is the state of the routes it is routed in.
///
/// [`with_state`](Self::with_state) makes it a tower service (to call in a unit test, or to
/// wrap in any tower stack for [`Routes::route_service`](super::Routes::route_service));
/// [`layer`](Self::layer) wraps it in route layers for [`Routes::route`](super::Routes::route),
/// which gives it the routes' state.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// use streamwise::Message;
/// use streamwise::router::{Handler, Incoming, Json, Outcome, Routes, State};
/// use tower::ServiceExt;
///
/// async fn within(Json(n): Json<u32>, State(limit): State<u32>) -> Outcome {
///     if n <= limit { Outcome::ack() } else { Outcome::dead_letter("over the limit") }
/// }
///
/// let outcome = within
///     .with_state(10)
///     .oneshot(Incoming::for_test(Message::new("n", &3).unwrap()))
///     .await
///     .unwrap();
/// assert_eq!(outcome, Outcome::ack());
///
/// let routes = Routes::with_state(10)
///     .route("n", within.layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(1))));
/// # let _ = routes;
/// # }
/// ```
///
/// A function whose arguments are not extractors (or whose output is not an outcome) is not
/// a handler, and routing it does not compile:
///
/// ```compile_fail,E0277
/// use streamwise::router::Routes;
///
/// // A bare `u32` is not an extractor: `Json<u32>` would be.
/// async fn wrong(n: u32) {}
///
/// let routes = Routes::new().route("n", wrong);
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a router handler (for routes with state `{S}`)",
    label = "not a handler",
    note = "a handler is an async fn, or a closure returning a future, taking at most 8 arguments that implement `FromIncoming<{S}>` (`Json<T>`, `State<{S}>`, `Metadata`, `DeliveryInfo`, `EventType`, `Message`, `Incoming`) and returning `()`, `Outcome`, `Verdict`, `Outgoing`, `Vec<Outgoing>` or a `Result` of one",
    note = "`State<X>` needs routes whose state is `X`: build them with `Routes::with_state` or `Router::routes`"
)]
pub trait Handler<T, S>: Clone + Send + Sync + Sized + 'static {
    /// Runs the handler on `incoming`.
    fn call(self, incoming: Incoming, state: S) -> BoxFuture<'static, Result<Outcome, BoxError>>;

    /// The handler with `state`, as a tower service from [`Incoming`] to [`Outcome`].
    fn with_state(self, state: S) -> HandlerService<Self, T, S> {
        HandlerService {
            handler: self,
            state,
            _args: PhantomData,
        }
    }

    /// The handler wrapped in `layer`, a route-level layer: route it with
    /// [`Routes::route`](super::Routes::route), which builds the layered service once, with
    /// the routes' state.
    fn layer<L>(self, layer: L) -> Layered<L, Self, T, S> {
        Layered {
            handler: self,
            layer,
            _args: PhantomData,
        }
    }
}

macro_rules! impl_handler {
    ($($ty:ident),*) => {
        #[allow(non_snake_case, unused_variables)]
        impl<F, Fut, Res, S, $($ty,)*> Handler<($($ty,)*), S> for F
        where
            F: FnOnce($($ty,)*) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = Res> + Send + 'static,
            Res: IntoHandlerResult,
            S: Send + Sync + 'static,
            $($ty: FromIncoming<S> + Send + 'static,)*
        {
            fn call(self, incoming: Incoming, state: S) -> BoxFuture<'static, Result<Outcome, BoxError>> {
                $(
                    let $ty = match $ty::from_incoming(&incoming, &state) {
                        Ok(value) => value,
                        Err(outcome) => return Box::pin(std::future::ready(Ok(outcome))),
                    };
                )*
                let future = self($($ty,)*);
                Box::pin(async move { future.await.into_handler_result() })
            }
        }
    };
}

for_each_arity!(impl_handler);

/// A handler with its state, as a tower [`Service`] from [`Incoming`] to [`Outcome`]
/// ([`Handler::with_state`]).
pub struct HandlerService<H, T, S> {
    handler: H,
    state: S,
    _args: PhantomData<fn() -> T>,
}

/// The service of `handler` with `state` (the same as
/// [`handler.with_state(state)`](Handler::with_state)): call it in tests, or wrap it in
/// layers for [`Routes::route_service`](super::Routes::route_service).
pub fn handler_service<H: Handler<T, S>, T, S>(handler: H, state: S) -> HandlerService<H, T, S> {
    handler.with_state(state)
}

impl<H: Clone, T, S: Clone> Clone for HandlerService<H, T, S> {
    fn clone(&self) -> Self {
        HandlerService {
            handler: self.handler.clone(),
            state: self.state.clone(),
            _args: PhantomData,
        }
    }
}

impl<H, T, S> std::fmt::Debug for HandlerService<H, T, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerService")
            .field("handler", &std::any::type_name::<H>())
            .finish_non_exhaustive()
    }
}

impl<H, T, S> Service<Incoming> for HandlerService<H, T, S>
where
    H: Handler<T, S>,
    S: Clone + Send + Sync + 'static,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Outcome, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, incoming: Incoming) -> Self::Future {
        self.call_ref(incoming)
    }
}

impl<H, T, S> HandlerService<H, T, S>
where
    H: Handler<T, S>,
    S: Clone + Send + Sync + 'static,
{
    /// Runs the handler on `incoming` (it needs no exclusive access).
    pub(crate) fn call_ref(&self, incoming: Incoming) -> BoxFuture<'static, Result<Outcome, BoxError>> {
        self.handler.clone().call(incoming, self.state.clone())
    }
}

/// A handler in route layers ([`Handler::layer`]). Unlike a handler, it is not called with the
/// state at each delivery: [`Routes::route`](super::Routes::route) (or
/// [`with_state`](Self::with_state)) builds its layered service once, so that a layer with
/// state of its own (a concurrency limit, a circuit breaker) keeps it across deliveries.
pub struct Layered<L, H, T, S> {
    handler: H,
    layer: L,
    _args: PhantomData<fn() -> (T, S)>,
}

impl<L, H, T, S> Layered<L, H, T, S> {
    /// Wraps in one more layer, outside the others.
    pub fn layer<Outer>(self, outer: Outer) -> Layered<Stack<L, Outer>, H, T, S> {
        Layered {
            handler: self.handler,
            layer: Stack::new(self.layer, outer),
            _args: PhantomData,
        }
    }

    /// The handler with `state`, inside its layers: a tower service from [`Incoming`] to
    /// [`Outcome`].
    pub fn with_state(self, state: S) -> L::Service
    where
        H: Handler<T, S>,
        L: Layer<HandlerService<H, T, S>>,
    {
        self.layer.layer(self.handler.with_state(state))
    }
}

impl<L: Clone, H: Clone, T, S> Clone for Layered<L, H, T, S> {
    fn clone(&self) -> Self {
        Layered {
            handler: self.handler.clone(),
            layer: self.layer.clone(),
            _args: PhantomData,
        }
    }
}

impl<L, H, T, S> std::fmt::Debug for Layered<L, H, T, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layered")
            .field("handler", &std::any::type_name::<H>())
            .field("layer", &std::any::type_name::<L>())
            .finish()
    }
}
