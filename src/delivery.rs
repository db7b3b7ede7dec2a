//! Deliveries: a message handed to a consumer, with where it came from, and its settlement
//! (ack, nack, nack after a delay, dead letter), which happens exactly once.
//!
//! This module owns the settlement contract every backend implements ([`Settler`]); its
//! error, [`SettleError`], lives with the other error types in [`crate::error`]. Each backend writes settlements in one
//! place: the Redis subscription's flusher, the memory backend's settler.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use crate::error::SettleError;
use crate::message::{EntryId, Message};

/// Where deliveries of one subscription come from: stream, consumer group and consumer name.
///
/// Backends build one per subscription and share it between all its deliveries.
///
/// Two origins are equal when their stream, group and consumer are: the messaging system
/// (a label for traces) does not tell them apart.
#[derive(Clone, Debug)]
pub struct Origin {
    stream: Arc<str>,
    group: Arc<str>,
    consumer: Arc<str>,
    system: &'static str,
}

impl PartialEq for Origin {
    fn eq(&self, other: &Self) -> bool {
        (&self.stream, &self.group, &self.consumer) == (&other.stream, &other.group, &other.consumer)
    }
}

impl Eq for Origin {}

impl std::hash::Hash for Origin {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (&self.stream, &self.group, &self.consumer).hash(state);
    }
}

impl Origin {
    /// An origin from its names.
    pub fn new(
        stream: impl Into<Arc<str>>,
        group: impl Into<Arc<str>>,
        consumer: impl Into<Arc<str>>,
    ) -> Self {
        Origin {
            stream: stream.into(),
            group: group.into(),
            consumer: consumer.into(),
            system: "unknown",
        }
    }

    /// Names the messaging system the deliveries come from (`redis`, `memory`; the
    /// OpenTelemetry attribute `messaging.system` of their spans). Default `unknown`.
    #[must_use]
    pub fn with_system(mut self, system: &'static str) -> Self {
        self.system = system;
        self
    }

    /// The messaging system the deliveries come from.
    pub fn system(&self) -> &'static str {
        self.system
    }

    /// The stream (topic).
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The consumer within the group.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }
}

/// What a handler may want to know about a delivery besides the message: entry id, stream,
/// group, consumer, and how many times the entry has been delivered (1 on first delivery).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryInfo {
    id: EntryId,
    delivery_count: u64,
    origin: Arc<Origin>,
}

impl DeliveryInfo {
    /// Info for entry `id`, delivered `delivery_count` times, from `origin`.
    pub fn new(id: EntryId, delivery_count: u64, origin: Arc<Origin>) -> Self {
        DeliveryInfo {
            id,
            delivery_count,
            origin,
        }
    }

    /// The backend's id of the entry.
    pub fn id(&self) -> EntryId {
        self.id
    }

    /// How many times this entry has been delivered, this time included.
    pub fn delivery_count(&self) -> u64 {
        self.delivery_count
    }

    /// The stream the entry was read from.
    pub fn stream(&self) -> &str {
        self.origin.stream()
    }

    /// The consumer group it was read in.
    pub fn group(&self) -> &str {
        self.origin.group()
    }

    /// The consumer it was delivered to.
    pub fn consumer(&self) -> &str {
        self.origin.consumer()
    }

    /// The shared origin (stream, group, consumer).
    pub fn origin(&self) -> &Arc<Origin> {
        &self.origin
    }
}

/// The longest delay [`Delivery::nack_after`] accepts: 30 days.
pub const MAX_NACK_DELAY: Duration = Duration::from_secs(30 * 24 * 3600);

/// How a delivery was settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Processed: remove the entry from the pending list.
    Ack,
    /// Not processed: deliver it again, no sooner than `delay` from now.
    Nack {
        /// The least time before redelivery (zero for "as soon as possible").
        delay: Duration,
    },
    /// Given up on: the backend writes the message, with `reason` and where it came from, to
    /// the dead-letter stream `{<stream>}-dead` (a [`crate::dead_letter`] record) and removes the
    /// entry from the pending list. Until the record is written the entry stays pending, so a
    /// crash in between redelivers it rather than lose it.
    DeadLetter {
        /// Why, in words (kept in the record's metadata under
        /// [`dead_letter::keys::REASON`](crate::dead_letter::keys::REASON)).
        reason: String,
    },
}

/// The backend side of settlement. A [`Delivery`] calls exactly one of these methods,
/// exactly once.
///
/// Implement it when writing a backend; users never call it.
pub trait Settler: Send + Sync + 'static {
    /// Records the settlement of the entry described by `info`, whose message is `message`
    /// (a [`Settlement::DeadLetter`] record keeps it).
    fn settle(
        &self,
        info: &DeliveryInfo,
        message: &Message,
        settlement: Settlement,
    ) -> Result<(), SettleError>;

    /// The delivery was dropped without being settled: the entry stays pending (it will be
    /// redelivered on restart or reclaimed), and the subscription may hand out another one.
    fn release(&self, info: &DeliveryInfo);
}

/// A message delivered to a consumer, which must settle it once with [`ack`](Self::ack),
/// [`nack`](Self::nack), [`nack_after`](Self::nack_after) or
/// [`dead_letter`](Self::dead_letter).
///
/// Settling a second time returns [`SettleError::AlreadySettled`] and changes nothing. A delivery
/// dropped without being settled stays pending in the backend: it is redelivered when the
/// consumer restarts or reclaimed by another consumer, never lost.
pub struct Delivery {
    message: Message,
    info: DeliveryInfo,
    settled: AtomicBool,
    settler: Arc<dyn Settler>,
}

impl Delivery {
    /// A delivery of `message`, settled through `settler`. For backends.
    pub fn new(message: Message, info: DeliveryInfo, settler: Arc<dyn Settler>) -> Self {
        Delivery {
            message,
            info,
            settled: AtomicBool::new(false),
            settler,
        }
    }

    /// The message.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// Entry id, stream, group, consumer and delivery count.
    pub fn info(&self) -> &DeliveryInfo {
        &self.info
    }

    /// The backend's id of the entry.
    pub fn id(&self) -> EntryId {
        self.info.id
    }

    /// How many times this entry has been delivered, this time included.
    pub fn delivery_count(&self) -> u64 {
        self.info.delivery_count
    }

    /// Whether the delivery was already settled.
    pub fn is_settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }

    /// Acknowledges the delivery: the entry leaves the pending list.
    ///
    /// Backends may batch acknowledgements; an ack that returned `Ok` is flushed at the
    /// latest when the subscriber closes.
    pub async fn ack(&self) -> Result<(), SettleError> {
        self.settle(Settlement::Ack)
    }

    /// Rejects the delivery: the entry is delivered again, with a higher delivery count.
    pub async fn nack(&self) -> Result<(), SettleError> {
        self.settle(Settlement::Nack {
            delay: Duration::ZERO,
        })
    }

    /// Rejects the delivery: the entry is delivered again, no sooner than `delay` from now.
    pub async fn nack_after(&self, delay: Duration) -> Result<(), SettleError> {
        self.settle(Settlement::Nack { delay })
    }

    /// Gives up on the delivery: the backend writes the message, with `reason`, its entry
    /// id, stream, group and delivery count, to `{<stream>}-dead`, then removes the entry from
    /// the pending list (the counterpart of a NATS JetStream `Term`).
    ///
    /// Like an ack, the write may happen after this returns; until it succeeded the entry
    /// stays pending (the backend retries it), so nothing is lost.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> streamwise::Result<()> {
    /// use futures::StreamExt;
    /// use streamwise::prelude::*;
    /// use streamwise::memory::MemoryBackend;
    ///
    /// let backend = MemoryBackend::new();
    /// let mut orders = backend.subscriber().subscribe("orders", SubscribeOptions::new("billing", "w1")).await?;
    /// backend.publisher().publish("orders", Message::new("order.placed", &"not an order")?).await?;
    ///
    /// let delivery = orders.next().await.expect("open")?;
    /// delivery.dead_letter("schema mismatch").await?;
    ///
    /// let dead = backend.messages("{orders}-dead")?;
    /// let (_, record) = &dead[0];
    /// assert_eq!(record.metadata().get("dead_letter.reason"), Some("schema mismatch"));
    /// assert_eq!(backend.pending_count("orders", "billing")?, 0);
    /// # Ok(()) }
    /// ```
    pub async fn dead_letter(&self, reason: impl Into<String>) -> Result<(), SettleError> {
        self.settle(Settlement::DeadLetter {
            reason: reason.into(),
        })
    }

    /// Settles synchronously; the async methods are thin wrappers over this.
    ///
    /// A nack delay longer than [`MAX_NACK_DELAY`] is refused with
    /// [`SettleError::DelayTooLong`] and leaves the delivery unsettled.
    pub fn settle(&self, settlement: Settlement) -> Result<(), SettleError> {
        if let Settlement::Nack { delay } = settlement
            && delay > MAX_NACK_DELAY
        {
            return Err(SettleError::DelayTooLong {
                delay,
                longest: MAX_NACK_DELAY,
            });
        }
        if self.settled.swap(true, Ordering::AcqRel) {
            return Err(SettleError::AlreadySettled { id: self.info.id });
        }
        self.settler.settle(&self.info, &self.message, settlement)
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if !*self.settled.get_mut() {
            self.settler.release(&self.info);
        }
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("info", &self.info)
            .field("message", &self.message)
            .field("settled", &self.is_settled())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Settler for Recorder {
        fn settle(
            &self,
            info: &DeliveryInfo,
            _: &Message,
            settlement: Settlement,
        ) -> Result<(), SettleError> {
            self.0
                .lock()
                .unwrap()
                .push(format!("{} {settlement:?}", info.id()));
            Ok(())
        }
        fn release(&self, info: &DeliveryInfo) {
            self.0.lock().unwrap().push(format!("{} released", info.id()));
        }
    }

    fn delivery(recorder: &Arc<Recorder>, seq: u64) -> Delivery {
        let origin = Arc::new(Origin::new("s", "g", "c"));
        let info = DeliveryInfo::new(EntryId::new(1, seq), 1, origin);
        Delivery::new(Message::new("t", &()).unwrap(), info, recorder.clone())
    }

    #[tokio::test]
    async fn a_delivery_settles_once_and_a_second_settlement_is_an_error() {
        let recorder = Arc::new(Recorder::default());
        let d = delivery(&recorder, 0);
        d.ack().await.unwrap();
        assert!(matches!(d.nack().await, Err(SettleError::AlreadySettled { .. })));
        assert!(matches!(d.ack().await, Err(SettleError::AlreadySettled { .. })));
        assert!(matches!(
            d.dead_letter("late").await,
            Err(SettleError::AlreadySettled { .. })
        ));
        drop(d);
        assert_eq!(*recorder.0.lock().unwrap(), ["1-0 Ack"]);
    }

    #[tokio::test]
    async fn an_absurd_nack_delay_is_refused_and_leaves_the_delivery_unsettled() {
        let recorder = Arc::new(Recorder::default());
        let d = delivery(&recorder, 3);
        let err = d.nack_after(Duration::MAX).await.unwrap_err();
        assert_eq!(
            err,
            SettleError::DelayTooLong {
                delay: Duration::MAX,
                longest: MAX_NACK_DELAY
            }
        );
        assert_eq!(crate::Error::from(err).invalid_field(), Some("delay"));
        assert!(!d.is_settled());
        d.nack_after(MAX_NACK_DELAY).await.unwrap();
        assert_eq!(*recorder.0.lock().unwrap(), ["1-3 Nack { delay: 2592000s }"]);
    }

    #[tokio::test]
    async fn dropping_an_unsettled_delivery_releases_it() {
        let recorder = Arc::new(Recorder::default());
        drop(delivery(&recorder, 1));
        let d = delivery(&recorder, 2);
        d.nack_after(Duration::from_secs(1)).await.unwrap();
        drop(d);
        assert_eq!(
            *recorder.0.lock().unwrap(),
            ["1-1 released", "1-2 Nack { delay: 1s }"]
        );
    }
}
