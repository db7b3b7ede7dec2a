//! What a handler decides about a delivery: [`Outcome`] (a [`Verdict`] plus messages to
//! publish before the delivery is acknowledged), and the conversions from handler return values.

use std::fmt;
use std::time::Duration;

use crate::error::BoxError;
use crate::message::Message;

/// How the router settles a delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Processed: publish the outgoing messages, then acknowledge.
    Ack,
    /// Not processed: deliver again, no sooner than `delay`.
    Nack {
        /// The least time before redelivery.
        delay: Duration,
    },
    /// Give up: write the message to `<stream>-dead` with `reason`, then acknowledge.
    DeadLetter {
        /// Why.
        reason: String,
    },
}

/// A message a handler wants published to `topic`.
#[derive(Clone, Debug, PartialEq)]
pub struct Outgoing {
    /// The topic (stream) to publish to.
    pub topic: String,
    /// The message.
    pub message: Message,
}

impl Outgoing {
    /// `message` for `topic`.
    pub fn new(topic: impl Into<String>, message: Message) -> Self {
        Outgoing {
            topic: topic.into(),
            message,
        }
    }
}

/// What a handler decided: a verdict, and messages to publish. The messages are published
/// **before** the delivery is acknowledged, and only when the verdict is [`Verdict::Ack`]; if
/// publishing fails, the delivery is nacked instead (so nothing is lost, though a message may
/// be published twice).
///
/// ```
/// use streamwise::Message;
/// use streamwise::router::{Outcome, Verdict};
///
/// let shipped = Message::new("order.shipped", &7)?;
/// let outcome = Outcome::ack().publish("shipments", shipped);
/// assert_eq!(outcome.verdict(), &Verdict::Ack);
/// assert_eq!(outcome.messages().len(), 1);
/// # Ok::<(), streamwise::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    verdict: Verdict,
    messages: Vec<Outgoing>,
}

impl Outcome {
    /// Acknowledge.
    pub fn ack() -> Self {
        Self::from(Verdict::Ack)
    }

    /// Deliver again as soon as possible.
    pub fn nack() -> Self {
        Self::nack_after(Duration::ZERO)
    }

    /// Deliver again, no sooner than `delay` (at most [`MAX_NACK_DELAY`](crate::MAX_NACK_DELAY);
    /// longer delays are cut to it).
    pub fn nack_after(delay: Duration) -> Self {
        Self::from(Verdict::Nack {
            delay: delay.min(crate::MAX_NACK_DELAY),
        })
    }

    /// Write to the dead-letter stream with `reason`, then acknowledge.
    pub fn dead_letter(reason: impl fmt::Display) -> Self {
        Self::from(Verdict::DeadLetter {
            reason: reason.to_string(),
        })
    }

    /// Adds a message to publish (before the ack).
    #[must_use]
    pub fn publish(mut self, topic: impl Into<String>, message: Message) -> Self {
        self.messages.push(Outgoing::new(topic, message));
        self
    }

    /// The verdict.
    pub fn verdict(&self) -> &Verdict {
        &self.verdict
    }

    /// The messages to publish.
    pub fn messages(&self) -> &[Outgoing] {
        &self.messages
    }

    /// The messages to publish, to change (for middleware, e.g. correlation ids).
    pub fn messages_mut(&mut self) -> &mut Vec<Outgoing> {
        &mut self.messages
    }

    /// The verdict and the messages.
    pub fn into_parts(self) -> (Verdict, Vec<Outgoing>) {
        (self.verdict, self.messages)
    }
}

impl From<Verdict> for Outcome {
    fn from(verdict: Verdict) -> Self {
        Outcome {
            verdict,
            messages: Vec::new(),
        }
    }
}

/// Turns a handler's return value into an [`Outcome`].
pub trait IntoOutcome {
    /// The outcome.
    fn into_outcome(self) -> Outcome;
}

impl IntoOutcome for Outcome {
    fn into_outcome(self) -> Outcome {
        self
    }
}

impl IntoOutcome for Verdict {
    fn into_outcome(self) -> Outcome {
        Outcome::from(self)
    }
}

/// `()`: acknowledge.
impl IntoOutcome for () {
    fn into_outcome(self) -> Outcome {
        Outcome::ack()
    }
}

/// One message to publish, then acknowledge.
impl IntoOutcome for Outgoing {
    fn into_outcome(self) -> Outcome {
        Outcome {
            verdict: Verdict::Ack,
            messages: vec![self],
        }
    }
}

/// Messages to publish, then acknowledge.
impl IntoOutcome for Vec<Outgoing> {
    fn into_outcome(self) -> Outcome {
        Outcome {
            verdict: Verdict::Ack,
            messages: self,
        }
    }
}

/// Turns what a handler returns into the result of its service: values that are outcomes are
/// `Ok`; `Result::Err` is an error, which the router (or a retry middleware) handles.
pub trait IntoHandlerResult {
    /// The service result.
    fn into_handler_result(self) -> Result<Outcome, BoxError>;
}

impl<T: IntoOutcome> IntoHandlerResult for T {
    fn into_handler_result(self) -> Result<Outcome, BoxError> {
        Ok(self.into_outcome())
    }
}

impl<T: IntoOutcome, E: Into<BoxError>> IntoHandlerResult for Result<T, E> {
    fn into_handler_result(self) -> Result<Outcome, BoxError> {
        self.map(IntoOutcome::into_outcome).map_err(Into::into)
    }
}

/// An error that retrying cannot fix: the router dead-letters the delivery at once instead of
/// nacking it, and retry middleware does not retry.
///
/// ```
/// use streamwise::router::Permanent;
/// async fn handle() -> Result<(), Permanent> {
///     Err(Permanent::new("order 7 refers to an unknown customer"))
/// }
/// ```
#[derive(Debug)]
pub struct Permanent(BoxError);

impl Permanent {
    /// Marks `error` as permanent.
    pub fn new(error: impl Into<BoxError>) -> Self {
        Permanent(error.into())
    }

    /// Whether `error` is (or wraps, at the top) a [`Permanent`] error.
    pub fn is_permanent(error: &BoxError) -> bool {
        error.is::<Permanent>()
    }
}

impl fmt::Display for Permanent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Permanent {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// The outcome of a handler error: dead-letter for a [`Permanent`] error, otherwise nack
/// (redelivery, until `max_deliveries` sends it to the dead-letter stream).
pub fn outcome_of_error(error: &BoxError) -> Outcome {
    if Permanent::is_permanent(error) {
        Outcome::dead_letter(format!("permanent error: {error}"))
    } else {
        Outcome::nack()
    }
}
