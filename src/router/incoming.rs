//! [`Incoming`]: the request a handler service receives, one delivery.

use std::sync::Arc;

use crate::delivery::{Delivery, DeliveryInfo, Origin, SettleError, Settlement, Settler};
use crate::message::{EntryId, Message};

/// A delivery on its way through the middleware to a handler. Cheap to clone (retry
/// middleware clones it); the router settles the delivery from the handler's [`Outcome`],
/// so handlers never settle it themselves.
///
/// [`Outcome`]: super::Outcome
#[derive(Clone, Debug)]
pub struct Incoming {
    delivery: Arc<Delivery>,
}

impl Incoming {
    pub(crate) fn new(delivery: Arc<Delivery>) -> Self {
        Incoming { delivery }
    }

    /// A made-up delivery of `message` (stream `test`, group `test`, consumer `test`, id `0-1`,
    /// first delivery), for calling a handler in a unit test without any backend.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use streamwise::Message;
    /// use streamwise::router::{Incoming, Json, Outcome, handler_service};
    /// use tower::ServiceExt;
    ///
    /// async fn double(Json(n): Json<u32>) -> Outcome {
    ///     if n < 10 { Outcome::ack() } else { Outcome::dead_letter("too big") }
    /// }
    ///
    /// let svc = handler_service(double, ());
    /// let outcome = svc.oneshot(Incoming::for_test(Message::new("n", &3).unwrap())).await.unwrap();
    /// assert_eq!(outcome, Outcome::ack());
    /// # }
    /// ```
    pub fn for_test(message: Message) -> Self {
        Self::for_test_with(
            message,
            DeliveryInfo::new(
                EntryId::new(0, 1),
                1,
                Arc::new(Origin::new("test", "test", "test")),
            ),
        )
    }

    /// A made-up delivery of `message` with the given info (for testing redelivery counts,
    /// streams, ...).
    pub fn for_test_with(message: Message, info: DeliveryInfo) -> Self {
        Incoming::new(Arc::new(Delivery::new(message, info, Arc::new(NoBackend))))
    }

    /// The message.
    pub fn message(&self) -> &Message {
        self.delivery.message()
    }

    /// Entry id, stream, group, consumer and delivery count.
    pub fn info(&self) -> &DeliveryInfo {
        self.delivery.info()
    }
}

/// The settler of made-up deliveries: settling them does nothing.
struct NoBackend;

impl Settler for NoBackend {
    fn settle(&self, _: &DeliveryInfo, _: &Message, _: Settlement) -> std::result::Result<(), SettleError> {
        Ok(())
    }
    fn release(&self, _: &DeliveryInfo) {}
}
