//! Extractors: what a handler takes as arguments. Each implements [`FromIncoming`]; one that
//! cannot be extracted (a payload that does not decode into the type) makes the delivery a
//! dead letter with the reason, never a crash.

use std::ops::{Deref, DerefMut};

use serde::de::DeserializeOwned;

use super::incoming::Incoming;
use super::outcome::Outcome;
use crate::delivery::DeliveryInfo;
use crate::message::{Message, Metadata};

/// Something a handler can take as an argument, built from the delivery and the router state.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a router handler's argument (with routes whose state is `{S}`)",
    label = "not an extractor",
    note = "handler arguments are extractors: `Json<T>`, `State<{S}>`, `Metadata`, `DeliveryInfo`, `EventType`, `Message`, `Incoming`, or a type of yours implementing `FromIncoming<{S}>`"
)]
pub trait FromIncoming<S>: Sized {
    /// Extracts the value, or gives the outcome to settle with instead of calling the handler.
    fn from_incoming(incoming: &Incoming, state: &S) -> Result<Self, Outcome>;
}

/// The payload decoded from JSON into `T`. A payload that does not decode is dead-lettered
/// with the serde error as the reason.
///
/// ```
/// # use serde::Deserialize;
/// use streamwise::router::Json;
///
/// #[derive(Deserialize)]
/// struct PriceUpdate { symbol: String, price: f64 }
///
/// async fn on_price(Json(update): Json<PriceUpdate>) {
///     println!("{} is now {}", update.symbol, update.price);
/// }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S> FromIncoming<S> for Json<T> {
    fn from_incoming(incoming: &Incoming, _: &S) -> Result<Self, Outcome> {
        incoming.message().decode().map(Json).map_err(|e| {
            Outcome::dead_letter(format!(
                "payload does not decode as {}: {e}",
                std::any::type_name::<T>()
            ))
        })
    }
}

impl<T> Deref for Json<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for Json<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

/// The router's shared state (set with [`Router::with_state`](super::Router::with_state)).
#[derive(Clone, Copy, Debug, Default)]
pub struct State<S>(pub S);

impl<S: Clone> FromIncoming<S> for State<S> {
    fn from_incoming(_: &Incoming, state: &S) -> Result<Self, Outcome> {
        Ok(State(state.clone()))
    }
}

impl<S> Deref for State<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.0
    }
}

/// The event type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventType(pub String);

impl<S> FromIncoming<S> for EventType {
    fn from_incoming(incoming: &Incoming, _: &S) -> Result<Self, Outcome> {
        Ok(EventType(incoming.message().event_type().to_owned()))
    }
}

impl<S> FromIncoming<S> for Metadata {
    fn from_incoming(incoming: &Incoming, _: &S) -> Result<Self, Outcome> {
        Ok(incoming.message().metadata().clone())
    }
}

impl<S> FromIncoming<S> for DeliveryInfo {
    fn from_incoming(incoming: &Incoming, _: &S) -> Result<Self, Outcome> {
        Ok(incoming.info().clone())
    }
}

impl<S> FromIncoming<S> for Message {
    fn from_incoming(incoming: &Incoming, _: &S) -> Result<Self, Outcome> {
        Ok(incoming.message().clone())
    }
}

impl<S> FromIncoming<S> for Incoming {
    fn from_incoming(incoming: &Incoming, _: &S) -> Result<Self, Outcome> {
        Ok(incoming.clone())
    }
}
