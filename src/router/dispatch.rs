//! Dispatch by event type: [`Dispatch`] finds a delivery's route by its event type and calls
//! it, or settles it as the subscription's [`Fallback`] says when there is none.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tower::Service;

use super::incoming::Incoming;
use super::outcome::Outcome;
use super::route::Route;
use crate::error::BoxError;

/// What to do with a delivery whose event type has no route.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Fallback {
    /// Acknowledge and skip it (for streams that carry types this service does not handle).
    AckAndSkip,
    /// Nack it (it comes back; after `max_deliveries` it is dead-lettered).
    Nack,
    /// Write it to `{<stream>}-dead` with the reason, then acknowledge (the default: nothing is
    /// dropped unseen).
    #[default]
    DeadLetter,
}

impl Fallback {
    /// The outcome of a delivery of `event_type`, which has no route.
    fn outcome(&self, event_type: &str) -> Outcome {
        match self {
            Fallback::AckAndSkip => {
                tracing::debug!(event_type, "no route; acknowledged and skipped");
                Outcome::ack()
            }
            Fallback::Nack => Outcome::nack(),
            Fallback::DeadLetter => Outcome::dead_letter(format!("no route for event type {event_type:?}")),
        }
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
    pub(crate) fn new(routes: HashMap<String, Route>, fallback: Fallback) -> Self {
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
    type Future = BoxFuture<'static, Result<Outcome, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, incoming: Incoming) -> Self::Future {
        match self.route(incoming.message().event_type()) {
            Some(route) => route.call(incoming),
            None => {
                let outcome = self.fallback.outcome(incoming.message().event_type());
                Box::pin(std::future::ready(Ok(outcome)))
            }
        }
    }
}
