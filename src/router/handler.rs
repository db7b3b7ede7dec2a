//! [`Handler`]: async functions whose arguments are extractors and whose return value turns
//! into an [`Outcome`], and [`HandlerService`], the tower service made of one.

use std::future::Future;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tower::Service;

use super::extract::FromIncoming;
use super::incoming::Incoming;
use super::outcome::{IntoHandlerResult, Outcome};
use crate::error::BoxError;

/// An async function usable as a handler: up to eight [`FromIncoming`] arguments, and a
/// return value that is an outcome (`()`, [`Outcome`], [`Verdict`](super::Verdict),
/// [`Outgoing`](super::Outgoing), `Vec<Outgoing>`) or a `Result` of one.
///
/// `T` lists the argument types; `S` is the router state.
pub trait Handler<T, S>: Clone + Send + Sync + Sized + 'static {
    /// Runs the handler on `incoming`.
    fn call(self, incoming: Incoming, state: S) -> BoxFuture<'static, Result<Outcome, BoxError>>;
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

impl_handler!();
impl_handler!(T1);
impl_handler!(T1, T2);
impl_handler!(T1, T2, T3);
impl_handler!(T1, T2, T3, T4);
impl_handler!(T1, T2, T3, T4, T5);
impl_handler!(T1, T2, T3, T4, T5, T6);
impl_handler!(T1, T2, T3, T4, T5, T6, T7);
impl_handler!(T1, T2, T3, T4, T5, T6, T7, T8);

/// A handler with its state, as a tower [`Service`] from [`Incoming`] to [`Outcome`].
pub struct HandlerService<H, T, S> {
    handler: H,
    state: S,
    _args: PhantomData<fn() -> T>,
}

/// The service of `handler` with `state`: call it in tests, or wrap it in layers for
/// [`Routes::route_service`](super::Routes::route_service).
pub fn handler_service<H: Handler<T, S>, T, S: Clone>(handler: H, state: S) -> HandlerService<H, T, S> {
    HandlerService {
        handler,
        state,
        _args: PhantomData,
    }
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
