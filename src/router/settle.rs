//! Settlement: how a delivery is settled from its handler's [`Outcome`]. The outgoing
//! messages are published first, then the delivery is acknowledged (a publish that fails
//! nacks after the subscription's backoff instead); a nack or a [`Verdict::DeadLetter`] goes
//! to the delivery as it is ([`Delivery::dead_letter`]: the backend writes the record).

use super::backoff::RetryBackoff;
use super::outcome::{Outcome, Outgoing, Verdict};
use crate::delivery::{Delivery, SettleError, Settlement};
use crate::metrics::DeliveryOutcome;
use crate::pubsub::Publisher;

/// Settles `delivery` from `outcome`: the handler's messages first, then the ack (a failed
/// publish nacks after the subscription's backoff); a nack or a dead letter goes to the
/// delivery as it is, and the backend writes it. Returns how it was settled.
pub(crate) async fn settle(
    delivery: &Delivery,
    outcome: Outcome,
    publisher: &dyn Publisher,
    backoff: &RetryBackoff,
) -> DeliveryOutcome {
    let (verdict, messages) = outcome.into_parts();
    let result = match verdict {
        Verdict::Ack if messages.is_empty() => {
            delivery.settle(Settlement::Ack).map(|()| DeliveryOutcome::Ack)
        }
        // (Publishing is boxed, so that its state does not make every handler's future larger.)
        Verdict::Ack => Box::pin(publish_then_ack(delivery, messages, publisher, backoff)).await,
        // A verdict built by hand may ask for more than a delivery accepts.
        Verdict::Nack { delay } => delivery
            .settle(Settlement::Nack {
                delay: delay.min(crate::MAX_NACK_DELAY),
            })
            .map(|()| DeliveryOutcome::Nack),
        Verdict::DeadLetter { reason } => delivery
            .settle(Settlement::DeadLetter { reason })
            .map(|()| DeliveryOutcome::DeadLetter),
    };
    result.unwrap_or_else(|e| {
        tracing::warn!(id = %delivery.id(), error = %e, "settling the delivery failed; it stays pending");
        DeliveryOutcome::Error
    })
}

/// Publishes the handler's messages, then acks; nacks when publishing failed.
async fn publish_then_ack(
    delivery: &Delivery,
    messages: Vec<Outgoing>,
    publisher: &dyn Publisher,
    backoff: &RetryBackoff,
) -> std::result::Result<DeliveryOutcome, SettleError> {
    for out in messages {
        let sent = match out.max_length {
            Some(max) => publisher.publish_capped(&out.topic, out.message, max).await,
            None => publisher.publish(&out.topic, out.message).await,
        };
        if let Err(e) = sent {
            // A failed publish is an error like a handler's: retried after the backoff.
            let retry_in = backoff.delay(delivery.delivery_count());
            tracing::warn!(id = %delivery.id(), error = %e, redelivery_in = ?retry_in, "publishing the handler's messages failed; the delivery is nacked");
            return delivery
                .nack_after(retry_in)
                .await
                .map(|()| DeliveryOutcome::Nack);
        }
    }
    delivery.ack().await.map(|()| DeliveryOutcome::Ack)
}
