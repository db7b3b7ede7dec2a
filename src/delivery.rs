//! Deliveries: a message handed to a consumer, with where it came from, and its settlement
//! (ack, nack, nack after a delay), which happens exactly once.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::message::{EntryId, Message};

/// Where deliveries of one subscription come from: stream, consumer group and consumer name.
///
/// Backends build one per subscription and share it between all its deliveries.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    stream: Arc<str>,
    group: Arc<str>,
    consumer: Arc<str>,
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
        }
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Processed: remove the entry from the pending list.
    Ack,
    /// Not processed: deliver it again, no sooner than `delay` from now.
    Nack {
        /// The least time before redelivery (zero for "as soon as possible").
        delay: Duration,
    },
}

/// The backend side of settlement. A [`Delivery`] calls exactly one of these methods,
/// exactly once.
///
/// Implement it when writing a backend; users never call it.
pub trait Settler: Send + Sync + 'static {
    /// Records the settlement of the entry described by `info`.
    fn settle(&self, info: &DeliveryInfo, settlement: Settlement) -> Result<()>;

    /// The delivery was dropped without being settled: the entry stays pending (it will be
    /// redelivered on restart or reclaimed), and the subscription may hand out another one.
    fn release(&self, info: &DeliveryInfo);
}

/// A message delivered to a consumer, which must settle it once with [`ack`](Self::ack),
/// [`nack`](Self::nack) or [`nack_after`](Self::nack_after).
///
/// Settling a second time returns [`Error::AlreadySettled`] and changes nothing. A delivery
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

    /// Whether the delivery was already acked or nacked.
    pub fn is_settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }

    /// Acknowledges the delivery: the entry leaves the pending list.
    ///
    /// Backends may batch acknowledgements; an ack that returned `Ok` is flushed at the
    /// latest when the subscriber closes.
    pub async fn ack(&self) -> Result<()> {
        self.settle(Settlement::Ack)
    }

    /// Rejects the delivery: the entry is delivered again, with a higher delivery count.
    pub async fn nack(&self) -> Result<()> {
        self.settle(Settlement::Nack {
            delay: Duration::ZERO,
        })
    }

    /// Rejects the delivery: the entry is delivered again, no sooner than `delay` from now.
    pub async fn nack_after(&self, delay: Duration) -> Result<()> {
        self.settle(Settlement::Nack { delay })
    }

    /// Settles synchronously; the async methods are thin wrappers over this.
    ///
    /// A nack delay longer than [`MAX_NACK_DELAY`] is refused with [`Error::Invalid`]
    /// (`delay`) and leaves the delivery unsettled.
    pub fn settle(&self, settlement: Settlement) -> Result<()> {
        if let Settlement::Nack { delay } = settlement
            && delay > MAX_NACK_DELAY
        {
            return Err(Error::invalid(
                "delay",
                format_args!("{delay:?} is longer than the longest nack delay, {MAX_NACK_DELAY:?}"),
            ));
        }
        if self.settled.swap(true, Ordering::AcqRel) {
            return Err(Error::AlreadySettled { id: self.info.id });
        }
        self.settler.settle(&self.info, settlement)
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
        fn settle(&self, info: &DeliveryInfo, settlement: Settlement) -> Result<()> {
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
        assert!(matches!(d.nack().await, Err(Error::AlreadySettled { .. })));
        assert!(matches!(d.ack().await, Err(Error::AlreadySettled { .. })));
        drop(d);
        assert_eq!(*recorder.0.lock().unwrap(), ["1-0 Ack"]);
    }

    #[tokio::test]
    async fn an_absurd_nack_delay_is_refused_and_leaves_the_delivery_unsettled() {
        let recorder = Arc::new(Recorder::default());
        let d = delivery(&recorder, 3);
        let err = d.nack_after(Duration::MAX).await.unwrap_err();
        assert_eq!(err.invalid_field(), Some("delay"));
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
