//! Processors: typed handlers for commands and events, registered on a [`Router`] as ordinary
//! subscriptions.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::future::Future;

use tower::service_fn;

use super::marshal::{self, Command, Event};
use super::{CORRELATION_ID, Cqrs, DEFAULT_REPLY_MAX_LENGTH, IntoEmit, Kind, REPLY_TO, RemoteError};
use crate::error::{BoxError, Error, Result, validate_name};
use crate::pubsub::SubscribeOptions;
use crate::router::{
    BoxRoute, BoxRouteLayer, Fallback, Incoming, Outcome, Outgoing, RouteLayer, Router, Routes,
};

/// One typed handler, ready to route.
struct Entry {
    /// The command or event name (its `event_type`).
    name: String,
    topic: Result<String>,
    service: BoxRoute,
}

impl Entry {
    fn new(cqrs: &Cqrs, kind: Kind, name: String, service: BoxRoute) -> Self {
        Entry {
            topic: cqrs.topic(kind, &name),
            name,
            service,
        }
    }

    /// The entry of `handler` for the command or event type `T`: each delivery is decoded into
    /// a `T`, and the events the handler returns are published before the acknowledgement.
    fn typed<T, F, Fut, R, E>(cqrs: &Cqrs, kind: Kind, name: String, handler: F) -> Self
    where
        T: serde::de::DeserializeOwned + Send + 'static,
        F: Fn(T) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<R, E>> + Send + 'static,
        R: IntoEmit + 'static,
        E: Into<BoxError> + 'static,
    {
        let service_cqrs = cqrs.clone();
        let service = BoxRoute::new(service_fn(move |incoming: Incoming| {
            let (cqrs, handler) = (service_cqrs.clone(), handler.clone());
            async move {
                let value = match decode::<T>(&cqrs, &incoming) {
                    Ok(v) => v,
                    Err(outcome) => return Ok::<_, BoxError>(outcome),
                };
                match handler(value).await {
                    Ok(emit) => Ok(ack_with(&cqrs, emit)),
                    Err(e) => Err(e.into()),
                }
            }
        }));
        Entry::new(cqrs, kind, name, service)
    }
}

/// The names of `entries`, for `Debug`.
fn names(entries: &[Entry]) -> Vec<&str> {
    entries.iter().map(|e| e.name.as_str()).collect()
}

/// Decodes the typed value of a delivery, or the dead-letter outcome when it does not decode.
fn decode<T: serde::de::DeserializeOwned>(
    cqrs: &Cqrs,
    incoming: &Incoming,
) -> std::result::Result<T, Outcome> {
    cqrs.marshaler()
        .unmarshal(incoming.message())
        .and_then(marshal::from_value::<T>)
        .map_err(|e| Outcome::dead_letter(format!("cannot decode {}: {e}", marshal::short_type_name::<T>())))
}

/// Acknowledges, publishing `emit`'s events first.
fn ack_with<R: IntoEmit>(cqrs: &Cqrs, emit: R) -> Outcome {
    match emit.into_emit().into_outgoing(cqrs) {
        Ok(events) => events
            .into_iter()
            .fold(Outcome::ack(), |o, e| o.publish(e.topic, e.message)),
        Err(e) => Outcome::dead_letter(format!("the handler's events cannot be encoded: {e}")),
    }
}

/// What a processor puts around every subscription it registers: its layers (subscription-level
/// layers, fallback included) and how many deliveries one consumer handles at once.
struct SubscriptionSetup {
    layers: Vec<BoxRouteLayer>,
    max_in_flight: usize,
}

impl SubscriptionSetup {
    fn new(max_in_flight: usize) -> Self {
        SubscriptionSetup {
            layers: Vec::new(),
            max_in_flight,
        }
    }

    fn add_layer(&mut self, layer: impl RouteLayer) {
        self.layers.push(layer.into_box_layer());
    }

    /// `router` with a subscription to `topic` as `consumer` of `group`, dispatching to
    /// `routes` in this setup's layers.
    fn subscribe<S: Clone + Send + Sync + 'static>(
        &self,
        router: Router<S>,
        topic: &str,
        group: &str,
        consumer: &str,
        routes: Routes<S>,
    ) -> Router<S> {
        let routes = self.layers.iter().cloned().fold(routes, Routes::layer);
        let options = SubscribeOptions::new(group, consumer).max_in_flight(self.max_in_flight);
        router.subscribe(topic, options, routes)
    }
}

/// Handles commands: one handler per command type, consumed by one consumer group.
pub struct CommandProcessor {
    cqrs: Cqrs,
    group: String,
    entries: Vec<Entry>,
    setup: SubscriptionSetup,
}

impl fmt::Debug for CommandProcessor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandProcessor")
            .field("group", &self.group)
            .field("commands", &names(&self.entries))
            .finish_non_exhaustive()
    }
}

impl CommandProcessor {
    pub(crate) fn new(cqrs: Cqrs, group: &str) -> Self {
        CommandProcessor {
            cqrs,
            group: group.to_owned(),
            entries: Vec::new(),
            setup: SubscriptionSetup::new(10),
        }
    }

    /// Handles command `C` with `handler`, an async fn of the command returning
    /// `Result<R, E>`: `R` is `()`, an [`Event`] or an [`Emit`](super::Emit) of events to
    /// publish before the command is acknowledged; an error nacks after the router's
    /// [`RetryBackoff`](crate::router::RetryBackoff) (or goes to the middleware).
    #[must_use]
    pub fn handle<C, F, Fut, R, E>(mut self, handler: F) -> Self
    where
        C: Command,
        F: Fn(C) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<R, E>> + Send + 'static,
        R: IntoEmit + 'static,
        E: Into<BoxError> + 'static,
    {
        let entry = Entry::typed(&self.cqrs, Kind::Command, C::name().into_owned(), handler);
        self.entries.push(entry);
        self
    }

    /// Handles command `C` with a handler whose typed result (or error) goes back to a caller
    /// waiting in [`CommandBus::send_and_wait`](super::CommandBus::send_and_wait). The command
    /// is acknowledged either way: the error belongs to the caller. Sent without waiting, an
    /// error nacks as usual.
    #[must_use]
    pub fn handle_with_reply<C, F, Fut, T, E>(mut self, handler: F) -> Self
    where
        C: Command,
        F: Fn(C) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<T, E>> + Send + 'static,
        T: serde::Serialize + 'static,
        E: fmt::Display + Into<BoxError> + 'static,
    {
        let name = C::name().into_owned();
        let cqrs = self.cqrs.clone();
        let service = BoxRoute::new(service_fn(move |incoming: Incoming| {
            let (cqrs, handler) = (cqrs.clone(), handler.clone());
            async move {
                let command = match decode::<C>(&cqrs, &incoming) {
                    Ok(c) => c,
                    Err(outcome) => return Ok::<_, BoxError>(outcome),
                };
                let metadata = incoming.message().metadata();
                let reply_to = metadata.get(REPLY_TO).zip(metadata.get(CORRELATION_ID));
                let result = handler(command).await;
                let Some((topic, correlation)) = reply_to else {
                    return result.map(|_| Outcome::ack()).map_err(Into::into);
                };
                let reply = match result {
                    Ok(value) => marshal::to_value(&value).map_err(RemoteError::from_error),
                    Err(e) => Err(RemoteError::from_error(e)),
                };
                match super::reply_message(correlation, reply) {
                    Ok(message) => Ok(Outcome::ack()
                        .publish_outgoing(Outgoing::new(topic, message).capped(DEFAULT_REPLY_MAX_LENGTH))),
                    Err(e) => Ok(Outcome::dead_letter(format!("the reply cannot be encoded: {e}"))),
                }
            }
        }));
        self.entries
            .push(Entry::new(&self.cqrs, Kind::Command, name, service));
        self
    }

    /// Wraps every command handler of this processor (like [`Routes::layer`](crate::router::Routes::layer)).
    #[must_use]
    pub fn layer(mut self, layer: impl RouteLayer) -> Self {
        self.setup.add_layer(layer);
        self
    }

    /// The most commands handled at once by one consumer. Default 10.
    #[must_use]
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.setup.max_in_flight = n;
        self
    }

    /// Adds this processor's subscriptions to `router`, as consumer `consumer` of the group.
    /// Fails when a command type has two handlers or a name or topic is invalid.
    pub fn register<S: Clone + Send + Sync + 'static>(
        self,
        router: Router<S>,
        consumer: &str,
    ) -> Result<Router<S>> {
        validate_name("group", &self.group)?;
        let mut seen = HashSet::new();
        let mut by_topic: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
        for entry in self.entries {
            if !seen.insert(entry.name.clone()) {
                return Err(Error::invalid(
                    "command",
                    format_args!(
                        "{} has a handler already; a command type has exactly one",
                        entry.name
                    ),
                ));
            }
            let topic = match &entry.topic {
                Ok(t) => t.clone(),
                Err(e) => return Err(Error::invalid("topic", e.to_string())),
            };
            by_topic.entry(topic).or_default().push(entry);
        }
        let mut router = router;
        for (topic, entries) in by_topic {
            let mut routes = router.routes().fallback(Fallback::DeadLetter);
            for entry in entries {
                routes = routes.route_service(&entry.name, entry.service);
            }
            router = self
                .setup
                .subscribe(router, &topic, &self.group, consumer, routes);
        }
        Ok(router)
    }
}

/// Handles events: any number of handlers per event type, each in a consumer group of its own
/// (named after the handler), so every handler gets every event.
pub struct EventProcessor {
    cqrs: Cqrs,
    /// (handler name, entry)
    entries: Vec<(String, Entry)>,
    setup: SubscriptionSetup,
}

impl fmt::Debug for EventProcessor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventProcessor")
            .field(
                "handlers",
                &self.entries.iter().map(|(h, e)| (h, &e.name)).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl EventProcessor {
    pub(crate) fn new(cqrs: Cqrs) -> Self {
        EventProcessor {
            cqrs,
            entries: Vec::new(),
            setup: SubscriptionSetup::new(10),
        }
    }

    /// Handles event `E` with `handler`, in consumer group `handler_name` (unique, a valid
    /// group name). The handler may return further events (`()`, an [`Event`], an
    /// [`Emit`](super::Emit)).
    #[must_use]
    pub fn handle<E, F, Fut, R, Err>(mut self, handler_name: &str, handler: F) -> Self
    where
        E: Event,
        F: Fn(E) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<R, Err>> + Send + 'static,
        R: IntoEmit + 'static,
        Err: Into<BoxError> + 'static,
    {
        let entry = Entry::typed(&self.cqrs, Kind::Event, E::name().into_owned(), handler);
        self.entries.push((handler_name.to_owned(), entry));
        self
    }

    /// Wraps every event handler of this processor.
    #[must_use]
    pub fn layer(mut self, layer: impl RouteLayer) -> Self {
        self.setup.add_layer(layer);
        self
    }

    /// The most events one handler handles at once. Default 10.
    #[must_use]
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.setup.max_in_flight = n;
        self
    }

    /// Adds one subscription per handler to `router`, as consumer `consumer`. Fails when two
    /// handlers share a name, or a name or topic is invalid.
    pub fn register<S: Clone + Send + Sync + 'static>(
        self,
        router: Router<S>,
        consumer: &str,
    ) -> Result<Router<S>> {
        let mut names = HashSet::new();
        let mut router = router;
        for (handler_name, entry) in self.entries {
            validate_name("handler_name", &handler_name)?;
            if !names.insert(handler_name.clone()) {
                return Err(Error::invalid(
                    "handler_name",
                    format_args!(
                        "{handler_name:?} is used by two event handlers; each needs a group of its own"
                    ),
                ));
            }
            let topic = entry.topic?;
            // The topic may carry other event types (shared naming): they are not this handler's.
            let routes = router
                .routes()
                .fallback(Fallback::AckAndSkip)
                .route_service(&entry.name, entry.service);
            router = self
                .setup
                .subscribe(router, &topic, &handler_name, consumer, routes);
        }
        Ok(router)
    }
}

/// Handles several event types on one subscription, one at a time, in stream order (for
/// handlers that must see, say, `OrderPlaced` before `OrderShipped`). The types must share a
/// topic ([`TopicNaming::Shared`](super::TopicNaming::Shared) or a custom rule).
pub struct EventGroupProcessor {
    cqrs: Cqrs,
    group: String,
    entries: Vec<Entry>,
    /// One delivery at a time, so that the group's events are handled in stream order.
    setup: SubscriptionSetup,
}

impl fmt::Debug for EventGroupProcessor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventGroupProcessor")
            .field("group", &self.group)
            .field("events", &names(&self.entries))
            .finish_non_exhaustive()
    }
}

impl EventGroupProcessor {
    pub(crate) fn new(cqrs: Cqrs, group: &str) -> Self {
        EventGroupProcessor {
            cqrs,
            group: group.to_owned(),
            entries: Vec::new(),
            setup: SubscriptionSetup::new(1),
        }
    }

    /// Handles event `E` within the group.
    #[must_use]
    pub fn handle<E, F, Fut, R, Err>(mut self, handler: F) -> Self
    where
        E: Event,
        F: Fn(E) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<R, Err>> + Send + 'static,
        R: IntoEmit + 'static,
        Err: Into<BoxError> + 'static,
    {
        let entry = Entry::typed(&self.cqrs, Kind::Event, E::name().into_owned(), handler);
        self.entries.push(entry);
        self
    }

    /// Wraps every handler of the group.
    #[must_use]
    pub fn layer(mut self, layer: impl RouteLayer) -> Self {
        self.setup.add_layer(layer);
        self
    }

    /// Adds the group's subscription to `router`, as consumer `consumer`, one event at a time.
    /// Fails when the event types do not share a topic, or a type is handled twice.
    pub fn register<S: Clone + Send + Sync + 'static>(
        self,
        router: Router<S>,
        consumer: &str,
    ) -> Result<Router<S>> {
        validate_name("group", &self.group)?;
        let mut topic: Option<String> = None;
        let mut seen = HashSet::new();
        let mut routes = router.routes().fallback(Fallback::AckAndSkip);
        for entry in self.entries {
            let t = entry.topic?;
            match &topic {
                None => topic = Some(t),
                Some(first) if *first != t => {
                    return Err(Error::invalid(
                        "event_group",
                        format_args!(
                            "{} is on topic {t}, the group's other events on {first}; use a shared topic naming",
                            entry.name
                        ),
                    ));
                }
                Some(_) => {}
            }
            if !seen.insert(entry.name.clone()) {
                return Err(Error::invalid(
                    "event",
                    format_args!("{} is handled twice in one group", entry.name),
                ));
            }
            routes = routes.route_service(&entry.name, entry.service);
        }
        let Some(topic) = topic else {
            return Err(Error::invalid("event_group", "has no handlers"));
        };
        Ok(self
            .setup
            .subscribe(router, &topic, &self.group, consumer, routes))
    }
}
