//! A test helper in the spirit of given/when/then: run processors on the in-memory backend,
//! publish the given events, send a command, wait until everything settled, and look at the
//! events that were produced.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> streamwise::Result<()> {
//! use serde::{Deserialize, Serialize};
//! use streamwise::cqrs::{Command, Cqrs, Event, testing::Scenario};
//!
//! #[derive(Serialize, Deserialize)] struct PlaceOrder { id: u32 }
//! impl Command for PlaceOrder {}
//! #[derive(Serialize, Deserialize, Debug, PartialEq)] struct OrderPlaced { id: u32 }
//! impl Event for OrderPlaced {}
//!
//! let cqrs = Cqrs::new();
//! let commands = cqrs
//!     .command_processor("orders")
//!     .handle(|c: PlaceOrder| async move { Ok::<_, std::convert::Infallible>(OrderPlaced { id: c.id }) });
//! let produced = Scenario::new(cqrs).commands(commands)?.when(&PlaceOrder { id: 7 }).await?;
//! assert_eq!(produced.events::<OrderPlaced>()?, [OrderPlaced { id: 7 }]);
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use super::marshal;
use super::{Command, CommandProcessor, Cqrs, Event, EventGroupProcessor, EventProcessor};
use crate::error::{Error, Result};
use crate::memory::MemoryBackend;
use crate::message::Message;
use crate::router::Router;

/// How long a scenario waits for its messages to settle.
const SETTLE: Duration = Duration::from_secs(10);

/// Processors on an in-memory backend, ready for a `when`.
#[derive(Debug)]
pub struct Scenario {
    cqrs: Cqrs,
    backend: MemoryBackend,
    router: Router,
    given: Vec<(String, Message)>,
}

impl Scenario {
    /// A scenario for `cqrs`, on a fresh in-memory backend.
    pub fn new(cqrs: Cqrs) -> Self {
        Scenario {
            cqrs,
            backend: MemoryBackend::new(),
            router: Router::new(),
            given: Vec::new(),
        }
    }

    /// How long failed deliveries wait before they come back (the router's
    /// [`RetryBackoff`](crate::router::RetryBackoff)): for a scenario whose handlers fail
    /// until dead-lettered, [`RetryBackoff::none`](crate::router::RetryBackoff::none) keeps it
    /// within the time a scenario waits to settle (10 s).
    #[must_use]
    pub fn retry_backoff(mut self, backoff: crate::router::RetryBackoff) -> Self {
        self.router = self.router.retry_backoff(backoff);
        self
    }

    /// Runs these command handlers.
    pub fn commands(mut self, processor: CommandProcessor) -> Result<Self> {
        self.router = processor.register(self.router, "scenario")?;
        Ok(self)
    }

    /// Runs these event handlers.
    pub fn events(mut self, processor: EventProcessor) -> Result<Self> {
        self.router = processor.register(self.router, "scenario")?;
        Ok(self)
    }

    /// Runs this event group.
    pub fn event_group(mut self, group: EventGroupProcessor) -> Result<Self> {
        self.router = group.register(self.router, "scenario")?;
        Ok(self)
    }

    /// Events published before the command.
    pub fn given<E: Event>(mut self, events: impl IntoIterator<Item = E>) -> Result<Self> {
        for event in events {
            let out = self
                .cqrs
                .encode(super::Kind::Event, &E::name(), marshal::to_value(&event)?)?;
            self.given.push((out.topic, out.message));
        }
        Ok(self)
    }

    /// Publishes the given events, sends `command`, waits until every subscription has handled
    /// everything, and stops.
    pub async fn when<C: Command>(self, command: &C) -> Result<Produced> {
        let backend = self.backend;
        let running = self
            .router
            .start(Arc::new(backend.subscriber()), Arc::new(backend.publisher()))
            .await?;
        let publisher = crate::memory::MemoryPublisher::clone(&backend.publisher());
        for (topic, message) in self.given {
            crate::Publisher::publish(&publisher, &topic, message).await?;
        }
        self.cqrs.command_bus(Arc::new(publisher)).send(command).await?;
        let deadline = tokio::time::Instant::now() + SETTLE;
        while !backend.is_idle() {
            if tokio::time::Instant::now() >= deadline {
                running.shutdown().await?;
                return Err(Error::invalid(
                    "scenario",
                    format_args!("did not settle within {SETTLE:?}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        running.shutdown().await?;
        Ok(Produced {
            cqrs: self.cqrs,
            backend,
        })
    }
}

/// What a scenario left behind.
#[derive(Debug)]
pub struct Produced {
    cqrs: Cqrs,
    backend: MemoryBackend,
}

impl Produced {
    /// The events of type `E` on their topic (given ones included), in order.
    pub fn events<E: Event>(&self) -> Result<Vec<E>> {
        let topic = self.cqrs.event_topic::<E>()?;
        let name = E::name();
        let messages = match self.backend.messages(&topic) {
            Ok(m) => m,
            Err(Error::StreamNotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        messages
            .into_iter()
            .filter(|(_, m)| m.event_type() == name)
            .map(|(_, m)| self.cqrs.marshaler().unmarshal(&m).and_then(marshal::from_value))
            .collect()
    }

    /// The dead-letter records of `topic` (e.g. a command topic), in order.
    pub fn dead_letters(&self, topic: &str) -> Result<Vec<Message>> {
        match self.backend.messages(&crate::dead_letter::stream_for(topic)) {
            Ok(m) => Ok(m.into_iter().map(|(_, m)| m).collect()),
            Err(Error::StreamNotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// The backend, to look at anything else.
    pub fn backend(&self) -> &MemoryBackend {
        &self.backend
    }
}
