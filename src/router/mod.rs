//! The router: takes deliveries from any [`Subscriber`](crate::Subscriber), dispatches each by event type to a
//! handler, and settles it from the handler's [`Outcome`].
//!
//! Handlers are async functions taking extractors ([`Json`], [`State`], [`Metadata`],
//! [`DeliveryInfo`], ...) and returning an outcome, like axum handlers. Each becomes a tower
//! [`Service`](tower::Service) ([`Handler::with_state`]), so any tower
//! [`Layer`](tower::Layer) wraps it, at three levels:
//!
//! | level | added with | wraps |
//! |---|---|---|
//! | route | [`Handler::layer`] (routed with [`Routes::route`]) / [`Routes::route_service`] | one event type's handler |
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

//!
//! # Where things are
//!
//! | file | owns |
//! |---|---|
//! | `routes` | the builders: [`Routes`] (one subscription's route table, fallback, layers, ordering, backoff) and [`Router`] |
//! | `route` | one route: [`Route`], [`IntoRoute`], and the boxed forms [`BoxRoute`], [`RouteLayer`], [`BoxRouteLayer`] |
//! | `handler` | [`Handler`] (async fns as handlers), [`HandlerService`], [`Layered`] |
//! | `extract` | the extractors ([`FromIncoming`]) |
//! | `incoming` | [`Incoming`], the request a handler service receives |
//! | `outcome` | [`Outcome`], [`Verdict`], [`Outgoing`], [`Permanent`], and handler return values |
//! | `dispatch` | dispatch by event type, and the [`Fallback`] |
//! | `ordering` | per-key ordering ([`OrderKey`]) |
//! | `settle` | settling a delivery from its outcome |
//! | `backoff` | [`RetryBackoff`] |
//! | `run` | running: the fetch loop per subscription, [`RunningRouter`], shutdown |
//! | `health` | [`RouterHealth`]: the router's and each subscription's [`Health`] |

/// Expands `$impl_for!` once per handler arity, from no argument to eight (a handler takes at
/// most eight extractors): the one list of arities that the handler and route impls share.
macro_rules! for_each_arity {
    ($impl_for:ident) => {
        $impl_for!();
        $impl_for!(T1);
        $impl_for!(T1, T2);
        $impl_for!(T1, T2, T3);
        $impl_for!(T1, T2, T3, T4);
        $impl_for!(T1, T2, T3, T4, T5);
        $impl_for!(T1, T2, T3, T4, T5, T6);
        $impl_for!(T1, T2, T3, T4, T5, T6, T7);
        $impl_for!(T1, T2, T3, T4, T5, T6, T7, T8);
    };
}

mod backoff;
mod dispatch;
mod extract;
mod handler;
mod health;
mod incoming;
mod ordering;
mod outcome;
mod route;
mod routes;
mod run;
mod settle;

pub use self::backoff::RetryBackoff;
pub use self::dispatch::Fallback;
pub use self::extract::{EventType, FromIncoming, Json, State};
pub use self::handler::{Handler, HandlerService, Layered, handler_service};
pub use self::health::{Health, RouterHealth, SubscriptionReport};
pub use self::incoming::Incoming;
pub use self::ordering::OrderKey;
pub use self::outcome::{
    IntoHandlerResult, IntoOutcome, Outcome, Outgoing, Permanent, Verdict, outcome_of_error,
};
pub use self::route::{BoxRoute, BoxRouteLayer, IntoRoute, Route, RouteLayer};
pub use self::routes::{Router, Routes};
pub use self::run::{RunningRouter, ShutdownReport, shutdown_signal};
pub use crate::delivery::DeliveryInfo;
pub use crate::message::Metadata;
