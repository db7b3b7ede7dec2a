//! CQRS on top of the router: typed commands and events, [`CommandBus`] and [`EventBus`] to send
//! them, and processors that turn typed handlers into router subscriptions, so handlers get the
//! same middleware as any other.
//!
//! - A command type has exactly one handler ([`CommandProcessor::handle`]; registering a second
//!   is an error when the processor is registered), processed by one consumer group: the
//!   processor's consumers compete.
//! - An event type has any number of handlers ([`EventProcessor::handle`]), each in a consumer
//!   group of its own, so every handler gets every event. An [`EventGroupProcessor`] handles
//!   several event types on one subscription, in order.
//! - Handlers are async fns typed by their argument. They may return events (an [`Event`], an
//!   [`Emit`] of several, or `()`), published **before** the command or event is acknowledged.
//! - The type name travels in `event_type`: the router dispatches without decoding payloads.
//! - [`CommandBus::send_and_wait`] sends a command and waits for the handler's typed reply.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> streamwise::Result<()> {
//! use std::sync::Arc;
//! use serde::{Deserialize, Serialize};
//! use streamwise::cqrs::{Command, Cqrs, Event};
//! use streamwise::memory::MemoryBackend;
//! use streamwise::router::Router;
//!
//! #[derive(Serialize, Deserialize)]
//! struct PlaceOrder { id: u32 }
//! impl Command for PlaceOrder {}
//!
//! #[derive(Serialize, Deserialize)]
//! struct OrderPlaced { id: u32 }
//! impl Event for OrderPlaced {}
//!
//! let backend = MemoryBackend::new();
//! let cqrs = Cqrs::new();
//! let commands = cqrs
//!     .command_processor("orders")
//!     .handle(|cmd: PlaceOrder| async move { Ok::<_, std::convert::Infallible>(OrderPlaced { id: cmd.id }) });
//! let router = commands.register(Router::new(), "worker-1")?;
//! let running = router.start(Arc::new(backend.subscriber()), Arc::new(backend.publisher())).await?;
//!
//! cqrs.command_bus(Arc::new(backend.publisher())).send(&PlaceOrder { id: 7 }).await?;
//! # while running.handled() < 1 { tokio::time::sleep(std::time::Duration::from_millis(2)).await; }
//! running.shutdown().await?;
//! assert_eq!(backend.stream_len(&cqrs.event_topic::<OrderPlaced>()?)?, 1);
//! # Ok(()) }
//! ```

mod marshal;
mod processors;
mod reply;
pub mod testing;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

pub use self::marshal::{Command, Event, JsonMarshaler, Marshaler, short_type_name};
pub use self::processors::{CommandProcessor, EventGroupProcessor, EventProcessor};
pub use self::reply::{DEFAULT_REPLY_MAX_LENGTH, RemoteError, Replies, ReplyError};

use crate::error::{Result, validate_stream_name};
use crate::message::{EntryId, Message};
use crate::pubsub::Publisher;
use crate::router::Outgoing;

/// Whether a topic carries commands or events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Commands.
    Command,
    /// Events.
    Event,
}

/// A topic naming rule: the topic of a command or event name.
pub type NamingRule = Arc<dyn Fn(Kind, &str) -> String + Send + Sync>;

/// How commands and events are mapped to topics (streams).
#[derive(Clone, Default)]
pub enum TopicNaming {
    /// One topic per type: `commands-<Name>` and `events-<Name>` (characters outside
    /// `[A-Za-z0-9_-]` become `-`). The default.
    #[default]
    PerType,
    /// All commands on one topic and all events on another (needed for an
    /// [`EventGroupProcessor`] over several event types).
    Shared {
        /// The command topic.
        commands: String,
        /// The event topic.
        events: String,
    },
    /// Your own rule; its topics must satisfy the stream-name rule.
    Custom(NamingRule),
}

impl fmt::Debug for TopicNaming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicNaming::PerType => f.write_str("PerType"),
            TopicNaming::Shared { commands, events } => f
                .debug_struct("Shared")
                .field("commands", commands)
                .field("events", events)
                .finish(),
            TopicNaming::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

impl TopicNaming {
    /// The topic of `kind` named `name`, checked against the stream-name rule.
    pub fn topic(&self, kind: Kind, name: &str) -> Result<String> {
        let topic = match self {
            TopicNaming::PerType => {
                let prefix = match kind {
                    Kind::Command => "commands",
                    Kind::Event => "events",
                };
                let safe: String = name
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                            c
                        } else {
                            '-'
                        }
                    })
                    .collect();
                format!("{prefix}-{safe}")
            }
            TopicNaming::Shared { commands, events } => match kind {
                Kind::Command => commands.clone(),
                Kind::Event => events.clone(),
            },
            TopicNaming::Custom(rule) => rule(kind, name),
        };
        validate_stream_name("topic", &topic)?;
        Ok(topic)
    }
}

/// The CQRS configuration shared by buses and processors: the marshaler and the topic naming.
/// Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Cqrs {
    inner: Arc<Config>,
}

#[derive(Debug, Default)]
struct Config {
    marshaler: MarshalerBox,
    naming: TopicNaming,
}

struct MarshalerBox(Arc<dyn Marshaler>);

impl Default for MarshalerBox {
    fn default() -> Self {
        MarshalerBox(Arc::new(JsonMarshaler))
    }
}

impl fmt::Debug for MarshalerBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Marshaler")
    }
}

impl Cqrs {
    /// JSON payloads, one topic per type.
    pub fn new() -> Self {
        Self::default()
    }

    /// Another marshaler.
    #[must_use]
    pub fn with_marshaler(self, marshaler: impl Marshaler) -> Self {
        Cqrs {
            inner: Arc::new(Config {
                marshaler: MarshalerBox(Arc::new(marshaler)),
                naming: self.inner.naming.clone(),
            }),
        }
    }

    /// Another topic naming.
    #[must_use]
    pub fn with_naming(self, naming: TopicNaming) -> Self {
        Cqrs {
            inner: Arc::new(Config {
                marshaler: MarshalerBox(self.inner.marshaler.0.clone()),
                naming,
            }),
        }
    }

    pub(crate) fn marshaler(&self) -> &Arc<dyn Marshaler> {
        &self.inner.marshaler.0
    }

    /// The topic of command type `C`.
    pub fn command_topic<C: Command>(&self) -> Result<String> {
        self.inner.naming.topic(Kind::Command, &C::name())
    }

    /// The topic of event type `E`.
    pub fn event_topic<E: Event>(&self) -> Result<String> {
        self.inner.naming.topic(Kind::Event, &E::name())
    }

    pub(crate) fn topic(&self, kind: Kind, name: &str) -> Result<String> {
        self.inner.naming.topic(kind, name)
    }

    /// A bus that sends commands with `publisher`.
    pub fn command_bus(&self, publisher: Arc<dyn Publisher>) -> CommandBus {
        CommandBus {
            cqrs: self.clone(),
            publisher,
            replies: None,
            max_length: DEFAULT_COMMAND_MAX_LENGTH,
        }
    }

    /// A bus that publishes events with `publisher`.
    pub fn event_bus(&self, publisher: Arc<dyn Publisher>) -> EventBus {
        EventBus {
            cqrs: self.clone(),
            publisher,
        }
    }

    /// A processor for commands, consumed by consumer group `group`.
    pub fn command_processor(&self, group: &str) -> CommandProcessor {
        CommandProcessor::new(self.clone(), group)
    }

    /// A processor for events; each handler gets a consumer group of its own.
    pub fn event_processor(&self) -> EventProcessor {
        EventProcessor::new(self.clone())
    }

    /// A processor handling several event types in order on one subscription, as consumer
    /// group `group`.
    pub fn event_group(&self, group: &str) -> EventGroupProcessor {
        EventGroupProcessor::new(self.clone(), group)
    }

    pub(crate) fn encode(&self, kind: Kind, name: &str, value: serde_json::Value) -> Result<Outgoing> {
        let topic = self.topic(kind, name)?;
        let message = self.marshaler().marshal(name, value)?;
        Ok(Outgoing::new(topic, message))
    }

    fn command_message<C: Command>(&self, command: &C) -> Result<Outgoing> {
        self.encode(Kind::Command, &C::name(), marshal::to_value(command)?)
    }
}

/// How many entries a command topic keeps at most by default: a [`CommandBus`] trims it to
/// about this many as it sends ([`CommandBus::with_max_length`] to change). Commands beyond
/// it that were not handled yet are dead-lettered as trimmed by their subscriber.
pub const DEFAULT_COMMAND_MAX_LENGTH: u64 = 100_000;

/// Sends commands.
#[derive(Clone)]
pub struct CommandBus {
    cqrs: Cqrs,
    publisher: Arc<dyn Publisher>,
    replies: Option<Replies>,
    max_length: u64,
}

impl fmt::Debug for CommandBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandBus")
            .field("cqrs", &self.cqrs)
            .finish_non_exhaustive()
    }
}

impl CommandBus {
    /// Sends `command` to its topic; returns the entry id.
    pub async fn send<C: Command>(&self, command: &C) -> Result<EntryId> {
        let out = self.cqrs.command_message(command)?;
        self.publisher
            .publish_capped(&out.topic, out.message, self.max_length)
            .await
    }

    /// Trims command topics to about `max_length` entries as commands are sent. Default
    /// [`DEFAULT_COMMAND_MAX_LENGTH`].
    #[must_use]
    pub fn with_max_length(mut self, max_length: u64) -> Self {
        self.max_length = max_length;
        self
    }

    /// Lets this bus wait for replies ([`send_and_wait`](Self::send_and_wait)): it listens on
    /// a reply topic of its own through `replies`.
    #[must_use]
    pub fn with_replies(mut self, replies: Replies) -> Self {
        self.replies = Some(replies);
        self
    }

    /// Sends `command` to a handler registered with
    /// [`CommandProcessor::handle_with_reply`] and waits up to `timeout` for its typed result.
    pub async fn send_and_wait<C: Command, T: serde::de::DeserializeOwned>(
        &self,
        command: &C,
        timeout: std::time::Duration,
    ) -> std::result::Result<T, ReplyError> {
        let replies = self.replies.as_ref().ok_or(ReplyError::NotListening)?;
        let out = self
            .cqrs
            .command_message(command)
            .map_err(ReplyError::Transport)?;
        replies
            .request(&*self.publisher, out, timeout, self.max_length)
            .await
    }
}

/// Publishes events.
#[derive(Clone)]
pub struct EventBus {
    cqrs: Cqrs,
    publisher: Arc<dyn Publisher>,
}

impl fmt::Debug for EventBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBus")
            .field("cqrs", &self.cqrs)
            .finish_non_exhaustive()
    }
}

impl EventBus {
    /// Publishes `event` to its topic; returns the entry id.
    pub async fn publish<E: Event>(&self, event: &E) -> Result<EntryId> {
        let out = self
            .cqrs
            .encode(Kind::Event, &E::name(), marshal::to_value(event)?)?;
        self.publisher.publish(&out.topic, out.message).await
    }
}

/// Events a handler produces, published before its input is acknowledged.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use streamwise::cqrs::{Emit, Event};
///
/// #[derive(Serialize, Deserialize)] struct OrderPlaced { id: u32 }
/// impl Event for OrderPlaced {}
/// #[derive(Serialize, Deserialize)] struct StockReserved { id: u32 }
/// impl Event for StockReserved {}
///
/// let emit = Emit::new().event(OrderPlaced { id: 1 }).event(StockReserved { id: 1 });
/// assert_eq!(emit.len(), 2);
/// ```
#[derive(Default)]
pub struct Emit {
    events: Vec<(Cow<'static, str>, Result<serde_json::Value>)>,
}

impl fmt::Debug for Emit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.events.iter().map(|(n, _)| n))
            .finish()
    }
}

impl Emit {
    /// No events.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `event`.
    #[must_use]
    pub fn event<E: Event>(mut self, event: E) -> Self {
        self.push(event);
        self
    }

    /// Adds `event`.
    pub fn push<E: Event>(&mut self, event: E) {
        self.events.push((E::name(), marshal::to_value(&event)));
    }

    /// How many events.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub(crate) fn into_outgoing(self, cqrs: &Cqrs) -> Result<Vec<Outgoing>> {
        self.events
            .into_iter()
            .map(|(name, value)| cqrs.encode(Kind::Event, &name, value?))
            .collect()
    }
}

/// What a handler may return on success: `()`, an [`Event`], or an [`Emit`].
pub trait IntoEmit {
    /// The events.
    fn into_emit(self) -> Emit;
}

impl IntoEmit for () {
    fn into_emit(self) -> Emit {
        Emit::new()
    }
}

impl IntoEmit for Emit {
    fn into_emit(self) -> Emit {
        self
    }
}

impl<E: Event> IntoEmit for E {
    fn into_emit(self) -> Emit {
        Emit::new().event(self)
    }
}

/// Metadata key of the topic a reply goes to.
pub const REPLY_TO: &str = "reply_to";
/// Metadata key matching a reply to its request.
pub const CORRELATION_ID: &str = "correlation_id";
/// Event type of replies.
pub const REPLY_EVENT_TYPE: &str = "streamwise.reply";

pub(crate) fn reply_message(
    correlation_id: &str,
    result: std::result::Result<serde_json::Value, RemoteError>,
) -> Result<Message> {
    let payload = match result {
        Ok(value) => serde_json::json!({ "ok": value }),
        Err(error) => serde_json::json!({ "error": error }),
    };
    Ok(Message::new(REPLY_EVENT_TYPE, &payload)?.with_metadata(CORRELATION_ID, correlation_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_type_topics_satisfy_the_stream_name_rule() {
        let naming = TopicNaming::PerType;
        assert_eq!(
            naming.topic(Kind::Command, "PlaceOrder").unwrap(),
            "commands-PlaceOrder"
        );
        assert_eq!(
            naming.topic(Kind::Event, "order.placed v2").unwrap(),
            "events-order-placed-v2"
        );
        let shared = TopicNaming::Shared {
            commands: "cmds".into(),
            events: "evts".into(),
        };
        assert_eq!(shared.topic(Kind::Event, "X").unwrap(), "evts");
        let custom = TopicNaming::Custom(Arc::new(|kind, name| format!("{kind:?}:{name}")));
        assert_eq!(
            custom.topic(Kind::Event, "X").unwrap_err().invalid_field(),
            Some("topic")
        );
    }
}
