//! Middleware written as an async function, like `axum::middleware::from_fn`: the function
//! gets the delivery and [`Next`], the rest of the stack. It can look at the delivery, decide
//! without calling the handler (short-circuit), call [`Next::run`] and change the outcome,
//! or run code after the handler.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), streamwise::BoxError> {
//! use streamwise::{BoxError, Message};
//! use streamwise::router::{Incoming, Outcome, handler_service};
//! use streamwise_middleware::from_fn::{Next, from_fn};
//! use tower::{Layer, ServiceExt};
//!
//! /// Test messages never reach the handlers; everything the handlers publish is audited.
//! async fn audit(incoming: Incoming, next: Next) -> Result<Outcome, BoxError> {
//!     if incoming.message().metadata().get("test") == Some("true") {
//!         return Ok(Outcome::ack());
//!     }
//!     let mut outcome = next.run(incoming).await?;
//!     let published = outcome.messages().len();
//!     if published > 0 {
//!         outcome = outcome.publish("audit", Message::new("audit.published", &published)?);
//!     }
//!     Ok(outcome)
//! }
//!
//! async fn ship() -> Outcome {
//!     Outcome::ack().publish("shipments", Message::new("order.shipped", &7).unwrap())
//! }
//!
//! let svc = from_fn(audit).layer(handler_service(ship, ()));
//! let outcome = svc.clone().oneshot(Incoming::for_test(Message::new("order.paid", &7)?)).await?;
//! assert_eq!(outcome.messages()[1].topic, "audit");
//! let test = Message::new("order.paid", &7)?.with_metadata("test", "true");
//! assert_eq!(svc.oneshot(Incoming::for_test(test)).await?, Outcome::ack());
//! # Ok(()) }
//! ```
//!
//! With state, [`from_fn_with_state`] hands a clone of it to each call:
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use streamwise::BoxError;
//! use streamwise::router::{Incoming, Outcome, Routes, Verdict};
//! use streamwise_middleware::from_fn::{Next, from_fn_with_state};
//!
//! async fn count_nacks(nacks: Arc<AtomicU64>, incoming: Incoming, next: Next) -> Result<Outcome, BoxError> {
//!     let outcome = next.run(incoming).await?;
//!     if matches!(outcome.verdict(), Verdict::Nack { .. }) {
//!         nacks.fetch_add(1, Ordering::Relaxed);
//!     }
//!     Ok(outcome)
//! }
//!
//! let nacks = Arc::new(AtomicU64::new(0));
//! let routes = Routes::new()
//!     .route("order.placed", || async { Outcome::nack() })
//!     .layer(from_fn_with_state(nacks.clone(), count_nacks));
//! ```

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use streamwise::BoxError;
use streamwise::router::{Incoming, Outcome};
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceExt};

use crate::take_ready;

/// The rest of the stack (the inner layers and the handler), for a middleware function to call.
///
/// Cloning it lets a middleware call the rest more than once (to retry, say).
///
/// It boxes the inner service (and its future when run): one type whatever the stack, so that
/// middleware functions need no type parameters, as with axum's `Next`.
#[derive(Clone)]
pub struct Next {
    inner: BoxCloneService<Incoming, Outcome, BoxError>,
}

impl Next {
    /// Runs the rest of the stack on `incoming`.
    pub async fn run(self, incoming: Incoming) -> Result<Outcome, BoxError> {
        self.inner.oneshot(incoming).await
    }
}

impl fmt::Debug for Next {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Next").finish_non_exhaustive()
    }
}

/// A middleware made of `f`, an async function taking the delivery and [`Next`]:
/// `async fn(Incoming, Next) -> Result<Outcome, BoxError>`. See the [module docs](self).
pub fn from_fn<F, Fut>(f: F) -> FromFnLayer<F, (), (Incoming, Next)>
where
    F: Fn(Incoming, Next) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Outcome, BoxError>> + Send + 'static,
{
    FromFnLayer {
        f,
        state: (),
        _args: PhantomData,
    }
}

/// A middleware made of `f`, an async function taking a clone of `state`, the delivery and
/// [`Next`]: `async fn(S, Incoming, Next) -> Result<Outcome, BoxError>`.
pub fn from_fn_with_state<S, F, Fut>(state: S, f: F) -> FromFnLayer<F, S, (S, Incoming, Next)>
where
    S: Clone + Send + Sync + 'static,
    F: Fn(S, Incoming, Next) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Outcome, BoxError>> + Send + 'static,
{
    FromFnLayer {
        f,
        state,
        _args: PhantomData,
    }
}

/// Wraps services in [`FromFn`]; made by [`from_fn`] and [`from_fn_with_state`].
///
/// `S` is the state (`()` for [`from_fn`]); `T` lists the function's arguments.
pub struct FromFnLayer<F, S, T> {
    f: F,
    state: S,
    _args: PhantomData<fn() -> T>,
}

impl<F: Clone, S: Clone, T> Clone for FromFnLayer<F, S, T> {
    fn clone(&self) -> Self {
        FromFnLayer {
            f: self.f.clone(),
            state: self.state.clone(),
            _args: PhantomData,
        }
    }
}

impl<F, S, T> fmt::Debug for FromFnLayer<F, S, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FromFnLayer")
            .field("f", &std::any::type_name::<F>())
            .finish_non_exhaustive()
    }
}

impl<F: Clone, S: Clone, T, I> Layer<I> for FromFnLayer<F, S, T> {
    type Service = FromFn<F, S, I, T>;
    fn layer(&self, inner: I) -> FromFn<F, S, I, T> {
        FromFn {
            f: self.f.clone(),
            state: self.state.clone(),
            inner,
            _args: PhantomData,
        }
    }
}

/// Runs a middleware function around the inner service `I`.
pub struct FromFn<F, S, I, T> {
    f: F,
    state: S,
    inner: I,
    _args: PhantomData<fn() -> T>,
}

impl<F: Clone, S: Clone, I: Clone, T> Clone for FromFn<F, S, I, T> {
    fn clone(&self) -> Self {
        FromFn {
            f: self.f.clone(),
            state: self.state.clone(),
            inner: self.inner.clone(),
            _args: PhantomData,
        }
    }
}

impl<F, S, I: fmt::Debug, T> fmt::Debug for FromFn<F, S, I, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FromFn")
            .field("f", &std::any::type_name::<F>())
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<F, S, I, T> FromFn<F, S, I, T>
where
    I: Service<Incoming, Response = Outcome> + Clone + Send + 'static,
    I::Error: Into<BoxError>,
    I::Future: Send + 'static,
{
    /// The inner service, polled ready, as the [`Next`] of one call.
    fn next(&mut self) -> Next {
        Next {
            inner: BoxCloneService::new(take_ready(&mut self.inner).map_err(Into::into)),
        }
    }
}

/// An async function that is a middleware: `async fn(Incoming, Next)`, without state (`S` is
/// `()`), or `async fn(S, Incoming, Next)`, which gets a clone of the state. `T` lists its
/// arguments (it tells the two apart).
pub trait MiddlewareFn<S, T>: Clone + Send + Sync + 'static {
    /// The function's future.
    type Future: Future<Output = Result<Outcome, BoxError>> + Send + 'static;

    /// Calls the function on `incoming` and `next`, with `state` if it takes it.
    fn run(&self, state: &S, incoming: Incoming, next: Next) -> Self::Future;
}

impl<F, Fut> MiddlewareFn<(), (Incoming, Next)> for F
where
    F: Fn(Incoming, Next) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Outcome, BoxError>> + Send + 'static,
{
    type Future = Fut;

    fn run(&self, _: &(), incoming: Incoming, next: Next) -> Fut {
        self(incoming, next)
    }
}

impl<F, Fut, S> MiddlewareFn<S, (S, Incoming, Next)> for F
where
    S: Clone + Send + Sync + 'static,
    F: Fn(S, Incoming, Next) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Outcome, BoxError>> + Send + 'static,
{
    type Future = Fut;

    fn run(&self, state: &S, incoming: Incoming, next: Next) -> Fut {
        self(state.clone(), incoming, next)
    }
}

impl<F, S, I, T> Service<Incoming> for FromFn<F, S, I, T>
where
    F: MiddlewareFn<S, T>,
    I: Service<Incoming, Response = Outcome> + Clone + Send + 'static,
    I::Error: Into<BoxError>,
    I::Future: Send + 'static,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = F::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, incoming: Incoming) -> F::Future {
        let next = self.next();
        self.f.run(&self.state, incoming, next)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use streamwise::Message;
    use streamwise::router::{Incoming, Outcome, Permanent, State, Verdict, handler_service};
    use tower::{Layer, ServiceExt};

    use super::*;

    fn incoming(event_type: &str) -> Incoming {
        Incoming::for_test(Message::new(event_type, &1).unwrap())
    }

    async fn counted(State(calls): State<Arc<AtomicU32>>) -> Outcome {
        calls.fetch_add(1, Ordering::SeqCst);
        Outcome::ack()
    }

    fn assert_clone_send_sync<T: Clone + Send + Sync + 'static>(_: &T) {}

    #[tokio::test]
    async fn a_middleware_can_decide_without_calling_the_handler() {
        async fn block_legacy(incoming: Incoming, next: Next) -> Result<Outcome, BoxError> {
            if incoming.message().event_type().starts_with("legacy.") {
                return Ok(Outcome::dead_letter("legacy events are no longer handled"));
            }
            next.run(incoming).await
        }
        let calls = Arc::new(AtomicU32::new(0));
        let svc = from_fn(block_legacy).layer(handler_service(counted, calls.clone()));
        assert_clone_send_sync(&svc);
        let blocked = svc.clone().oneshot(incoming("legacy.order")).await.unwrap();
        assert_eq!(
            blocked,
            Outcome::dead_letter("legacy events are no longer handled")
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0, "the handler was not called");
        let passed = svc.oneshot(incoming("order.placed")).await.unwrap();
        assert_eq!(passed, Outcome::ack());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_middleware_can_change_the_outcome() {
        let svc = from_fn(|incoming: Incoming, next: Next| async move {
            let id = incoming.info().id().to_string();
            let outcome = next.run(incoming).await?;
            Ok(outcome.publish("processed", Message::new("processed", &id)?))
        })
        .layer(handler_service(|| async {}, ()));
        let outcome = svc.oneshot(incoming("t")).await.unwrap();
        assert_eq!(outcome.verdict(), &Verdict::Ack);
        assert_eq!(outcome.messages().len(), 1);
        assert_eq!(outcome.messages()[0].topic, "processed");
        assert_eq!(outcome.messages()[0].message.decode::<String>().unwrap(), "0-1");
    }

    #[tokio::test]
    async fn code_after_next_runs_after_the_handler() {
        let log = Arc::new(Mutex::new(Vec::new()));
        async fn around(
            log: Arc<Mutex<Vec<String>>>,
            incoming: Incoming,
            next: Next,
        ) -> Result<Outcome, BoxError> {
            log.lock().unwrap().push("before".into());
            let result = next.run(incoming).await;
            let what = match &result {
                Ok(outcome) => format!("after: {:?}", outcome.verdict()),
                Err(e) => format!("after: error {e}"),
            };
            log.lock().unwrap().push(what);
            result
        }
        async fn handler(State(log): State<Arc<Mutex<Vec<String>>>>) -> Result<(), &'static str> {
            log.lock().unwrap().push("handler".into());
            Err("down")
        }
        let svc = from_fn_with_state(log.clone(), around).layer(handler_service(handler, log.clone()));
        assert_clone_send_sync(&svc);
        let err = svc.oneshot(incoming("t")).await.unwrap_err();
        assert_eq!(err.to_string(), "down");
        assert_eq!(*log.lock().unwrap(), ["before", "handler", "after: error down"]);
    }

    #[tokio::test]
    async fn errors_pass_unchanged_and_a_middleware_can_turn_them_into_outcomes() {
        async fn permanent() -> Result<(), Permanent> {
            Err(Permanent::new("unknown customer"))
        }
        let passthrough =
            from_fn(|incoming, next: Next| next.run(incoming)).layer(handler_service(permanent, ()));
        let err = passthrough.oneshot(incoming("t")).await.unwrap_err();
        assert!(Permanent::is_permanent(&err));

        async fn later(incoming: Incoming, next: Next) -> Result<Outcome, BoxError> {
            match next.run(incoming).await {
                Err(e) if !Permanent::is_permanent(&e) => Ok(Outcome::nack_after(Duration::from_secs(30))),
                other => other,
            }
        }
        let svc = from_fn(later).layer(handler_service(|| async { Err::<(), _>("busy") }, ()));
        assert_eq!(
            svc.oneshot(incoming("t")).await.unwrap(),
            Outcome::nack_after(Duration::from_secs(30))
        );
    }

    #[tokio::test]
    async fn next_can_be_run_more_than_once() {
        async fn twice(incoming: Incoming, next: Next) -> Result<Outcome, BoxError> {
            match next.clone().run(incoming.clone()).await {
                Ok(outcome) if outcome.verdict() == &Verdict::Ack => Ok(outcome),
                _ => next.run(incoming).await,
            }
        }
        let calls = Arc::new(AtomicU32::new(0));
        async fn second_time_lucky(State(calls): State<Arc<AtomicU32>>) -> Outcome {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                Outcome::nack()
            } else {
                Outcome::ack()
            }
        }
        let svc = from_fn(twice).layer(handler_service(second_time_lucky, calls.clone()));
        assert_eq!(svc.oneshot(incoming("t")).await.unwrap(), Outcome::ack());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_inner_concurrency_limit_holds_through_the_middleware() {
        // A concurrency limit of one below the middleware: the second call waits for the first.
        let gate = Arc::new(tokio::sync::Notify::new());
        let running = Arc::new(AtomicU32::new(0));
        async fn held(State((gate, running)): State<(Arc<tokio::sync::Notify>, Arc<AtomicU32>)>) {
            running.fetch_add(1, Ordering::SeqCst);
            gate.notified().await;
        }
        let svc = from_fn(|incoming, next: Next| next.run(incoming)).layer(
            tower::limit::ConcurrencyLimitLayer::new(1)
                .layer(handler_service(held, (gate.clone(), running.clone()))),
        );
        let first = tokio::spawn(svc.clone().oneshot(incoming("t")));
        let second = tokio::spawn(svc.oneshot(incoming("t")));
        while running.load(Ordering::SeqCst) < 1 {
            tokio::task::yield_now().await;
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            running.load(Ordering::SeqCst),
            1,
            "the limit holds through the middleware"
        );
        gate.notify_one();
        while running.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn inside_a_router_middleware_functions_shape_what_is_settled_and_published() {
        use streamwise::memory::MemoryBackend;
        use streamwise::router::{Router, Routes};
        use streamwise::{Publisher, SubscribeOptions, Subscriber};

        /// Skips (acks) `ping`s without a handler; tags what handlers publish with the input id.
        async fn tag(seen: Arc<AtomicU32>, incoming: Incoming, next: Next) -> Result<Outcome, BoxError> {
            seen.fetch_add(1, Ordering::SeqCst);
            if incoming.message().event_type() == "ping" {
                return Ok(Outcome::ack());
            }
            let cause = incoming.info().id().to_string();
            let mut outcome = next.run(incoming).await?;
            for out in outcome.messages_mut() {
                out.message.metadata_mut().insert("caused_by", cause.clone());
            }
            Ok(outcome)
        }
        async fn placed(message: Message) -> Outcome {
            Outcome::ack().publish(
                "invoices",
                Message::new("invoice.requested", &message.json().unwrap()).unwrap(),
            )
        }
        let backend = MemoryBackend::new();
        let seen = Arc::new(AtomicU32::new(0));
        let routes = Routes::new()
            .route("order.placed", placed)
            .layer(from_fn_with_state(seen.clone(), tag));
        let running = Router::new()
            .subscribe("orders", SubscribeOptions::new("g", "c"), routes)
            .start(Arc::new(backend.subscriber()), Arc::new(backend.publisher()))
            .await
            .unwrap();
        let publisher = backend.publisher();
        publisher
            .publish("orders", Message::new("ping", &0).unwrap())
            .await
            .unwrap();
        let order_id = publisher
            .publish("orders", Message::new("order.placed", &7).unwrap())
            .await
            .unwrap();

        let mut invoices = backend
            .subscriber()
            .subscribe("invoices", SubscribeOptions::new("inspector", "i"))
            .await
            .unwrap();
        let invoice = tokio::time::timeout(Duration::from_secs(20), futures::StreamExt::next(&mut invoices))
            .await
            .expect("an invoice")
            .unwrap()
            .unwrap();
        assert_eq!(
            invoice.message().metadata().get("caused_by"),
            Some(order_id.to_string().as_str())
        );
        assert_eq!(invoice.message().decode::<u32>().unwrap(), 7);

        streamwise::testing::wait_until_handled(&running, 2).await;
        running.shutdown().await.unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 2);
        assert_eq!(
            backend.pending_count("orders", "g").unwrap(),
            0,
            "the ping was acked too"
        );
        assert_eq!(
            backend.stream_len("{orders}-dead").unwrap_or(0),
            0,
            "nothing dead-lettered"
        );
        assert_eq!(backend.stream_len("invoices").unwrap(), 1);
    }
}
