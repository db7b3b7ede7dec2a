//! What a handler decides about a delivery: [`Outcome`] (a [`Verdict`] plus messages to
//! publish before the delivery is acknowledged), and the conversions from handler return values.

use std::fmt;
use std::time::Duration;

use super::backoff::RetryBackoff;
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
    /// Give up: write the message to `{<stream>}-dead` with `reason`, then acknowledge.
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
    /// Trim the topic to about this many entries when publishing
    /// ([`Publisher::publish_capped`](crate::Publisher::publish_capped)); `None`: the
    /// publisher's own limit.
    pub max_length: Option<u64>,
}

impl Outgoing {
    /// `message` for `topic`.
    pub fn new(topic: impl Into<String>, message: Message) -> Self {
        Outgoing {
            topic: topic.into(),
            message,
            max_length: None,
        }
    }

    /// Trims the topic to about `max_length` entries when this message is published.
    #[must_use]
    pub fn capped(mut self, max_length: u64) -> Self {
        self.max_length = Some(max_length);
        self
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

    /// Adds a message to publish (before the ack), as it is built ([`Outgoing::capped`], say).
    #[must_use]
    pub fn publish_outgoing(mut self, outgoing: Outgoing) -> Self {
        self.messages.push(outgoing);
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
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an outcome of a router handler",
    label = "not an outcome",
    note = "outcomes are `()`, `Outcome`, `Verdict`, `Outgoing` and `Vec<Outgoing>`"
)]
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
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not something a router handler can return",
    label = "not a handler's return value",
    note = "a handler returns `()`, `Outcome`, `Verdict`, `Outgoing`, `Vec<Outgoing>`, or a `Result` of one whose error converts into `BoxError`"
)]
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
/// It is recognised anywhere in an error's [`source`](std::error::Error::source) chain, so it
/// may be wrapped: in `anyhow` (with or without context), in an error type of yours that keeps
/// it as its source, or in a `Box<dyn Error>`.
///
/// ```
/// use streamwise::router::Permanent;
/// async fn handle() -> Result<(), Permanent> {
///     Err(Permanent::new("order 7 refers to an unknown customer"))
/// }
/// ```
#[derive(Debug)]
pub struct Permanent(Cause);

/// The error a [`Permanent`] wraps, given out as its source. It is a type of its own because
/// some wrappers show only the wrapped error's source, never the error itself (anyhow's
/// `Box<dyn Error>` conversion, `io::Error::other`, thiserror's `transparent`): finding it in
/// the chain is how the `Permanent` above it is recognised behind them.
struct Cause(BoxError);

impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// How deep [`Permanent::is_permanent`] looks: a bound, because a faulty `source` could make
/// the chain a loop and hang the handler's task.
const MAX_CHAIN: usize = 64;

impl Permanent {
    /// Marks `error` as permanent.
    pub fn new(error: impl Into<BoxError>) -> Self {
        Permanent(Cause(error.into()))
    }

    /// The error marked permanent (its source is a private wrapper of it, see the type docs).
    pub fn get_ref(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0.0
    }

    /// Whether `error` is a [`Permanent`] error or has one in its source chain.
    pub fn is_permanent(error: &BoxError) -> bool {
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&**error);
        for _ in 0..MAX_CHAIN {
            let Some(error) = next else { return false };
            if error.is::<Permanent>() || error.is::<Cause>() {
                return true;
            }
            next = error.source();
        }
        false
    }
}

impl fmt::Display for Permanent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Permanent {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// The outcome of a handler error on the delivery numbered `delivery_count`, as the router
/// settles it: dead-letter for a [`Permanent`] error, otherwise nack after `backoff`'s delay
/// (redelivery, until `max_deliveries` sends it to the dead-letter stream).
pub fn outcome_of_error(error: &BoxError, delivery_count: u64, backoff: &RetryBackoff) -> Outcome {
    if Permanent::is_permanent(error) {
        Outcome::dead_letter(format!("permanent error: {error}"))
    } else {
        Outcome::nack_after(backoff.delay(delivery_count))
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as StdError;
    use std::fmt;

    use super::*;

    /// A store's error as a thiserror enum: a cause kept as `#[source]`, as a boxed source, or
    /// forwarded whole (`transparent`, which shows the wrapped error's own source, not it).
    #[derive(Debug, thiserror::Error)]
    enum StoreError {
        #[error("the store refused the write")]
        Refused(#[source] Permanent),
        #[error("the store failed")]
        Boxed(#[source] BoxError),
        #[error(transparent)]
        Transparent(Permanent),
        #[error("the store is busy")]
        Busy,
    }

    fn permanent() -> Permanent {
        Permanent::new("order 7 refers to an unknown customer")
    }

    /// What a handler returning `anyhow::Result` hands the router: `?` on a `Permanent`.
    fn anyhow_handler() -> anyhow::Result<()> {
        Err(permanent())?;
        Ok(())
    }

    fn is_dead_lettered(error: &BoxError) -> bool {
        matches!(
            outcome_of_error(error, 1, &RetryBackoff::default()).verdict(),
            Verdict::DeadLetter { .. }
        )
    }

    #[test]
    fn permanent_is_found_anywhere_in_the_source_chain() {
        let shapes: Vec<(&str, BoxError)> = vec![
            ("itself", permanent().into()),
            ("a Box<dyn Error> of it", Box::new(permanent()) as BoxError),
            ("anyhow::Error::from", anyhow::Error::from(permanent()).into()),
            ("anyhow!", anyhow::anyhow!(permanent()).into()),
            (
                "? in an anyhow::Result handler",
                anyhow_handler().unwrap_err().into(),
            ),
            (
                "anyhow! with context",
                anyhow::anyhow!(permanent()).context("while doing x").into(),
            ),
            ("thiserror #[source]", StoreError::Refused(permanent()).into()),
            (
                "thiserror #[source] holding a Box<dyn Error>",
                StoreError::Boxed(Box::new(permanent())).into(),
            ),
            (
                "thiserror transparent",
                StoreError::Transparent(permanent()).into(),
            ),
            ("io::Error::other", std::io::Error::other(permanent()).into()),
            (
                "anyhow context around a thiserror wrapper",
                anyhow::Error::from(StoreError::Refused(permanent()))
                    .context("while doing x")
                    .into(),
            ),
        ];
        for (shape, error) in shapes {
            assert!(Permanent::is_permanent(&error), "{shape}: {error:?}");
            assert!(is_dead_lettered(&error), "{shape}");
        }
    }

    #[test]
    fn anyhow_into_box_hides_the_permanent_itself() {
        // Why a check of the chain's types alone is not enough: anyhow's boxed error is a
        // private wrapper whose source is the Permanent's source, never the Permanent.
        let boxed: BoxError = anyhow::anyhow!(permanent()).into();
        assert!(!boxed.is::<Permanent>());
        let mut chain = Some(&*boxed as &(dyn StdError + 'static));
        while let Some(e) = chain {
            assert!(!e.is::<Permanent>(), "{e:?}");
            chain = e.source();
        }
        assert!(Permanent::is_permanent(&boxed));
    }

    /// An error that is its own source: a loop in the chain.
    #[derive(Debug)]
    struct Loop;

    impl fmt::Display for Loop {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("loop")
        }
    }

    impl StdError for Loop {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(self)
        }
    }

    #[test]
    fn other_errors_are_not_permanent() {
        let shapes: Vec<(&str, BoxError)> = vec![
            ("a string", "database busy".into()),
            ("thiserror", StoreError::Busy.into()),
            (
                "thiserror with a boxed source",
                StoreError::Boxed("timeout".into()).into(),
            ),
            (
                "anyhow with context",
                anyhow::anyhow!("timeout").context("while doing x").into(),
            ),
            ("io::Error::other", std::io::Error::other("reset").into()),
            ("a loop in the chain", Box::new(Loop)),
        ];
        for (shape, error) in shapes {
            assert!(!Permanent::is_permanent(&error), "{shape}");
            assert!(!is_dead_lettered(&error), "{shape}");
        }
    }

    #[test]
    fn other_errors_nack_after_the_backoff_of_their_delivery() {
        let error: BoxError = "database busy".into();
        let backoff =
            RetryBackoff::exponential(Duration::from_millis(100), Duration::from_secs(10)).jitter(0.0);
        let delays: Vec<Verdict> = (1..=3)
            .map(|n| outcome_of_error(&error, n, &backoff).verdict().clone())
            .collect();
        let expected = [100, 200, 400].map(|ms| Verdict::Nack {
            delay: Duration::from_millis(ms),
        });
        assert_eq!(delays, expected);
        assert_eq!(
            outcome_of_error(&error, 3, &RetryBackoff::none()),
            Outcome::nack()
        );
    }

    #[test]
    fn a_permanent_error_shows_its_cause() {
        let error = Permanent::new(StoreError::Busy);
        assert_eq!(error.to_string(), "the store is busy");
        assert_eq!(error.source().unwrap().to_string(), "the store is busy");
        assert!(error.get_ref().is::<StoreError>());
        assert_eq!(
            outcome_of_error(&(Box::new(error) as BoxError), 1, &RetryBackoff::default()).verdict(),
            &Verdict::DeadLetter {
                reason: "permanent error: the store is busy".into()
            }
        );
    }
}
