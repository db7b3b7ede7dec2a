//! Settlement: how a delivery is settled from its handler's [`Outcome`]. The outgoing
//! messages are published first, then the delivery is acknowledged; a [`Verdict::DeadLetter`]
//! writes the dead-letter record, then acknowledges; a publish that fails nacks after the
//! subscription's backoff instead.

use super::backoff::RetryBackoff;
use super::outcome::{Outcome, Outgoing, Verdict};
use crate::dead_letter::{self, DeadLetter};
use crate::delivery::{Delivery, Settlement};
use crate::error::Result;
use crate::pubsub::Publisher;

/// Settles `delivery` from `outcome`: messages first, then the ack; a failed publish nacks
/// after the subscription's backoff.
pub(crate) async fn settle(
    delivery: &Delivery,
    outcome: Outcome,
    publisher: &dyn Publisher,
    backoff: &RetryBackoff,
) {
    let (verdict, messages) = outcome.into_parts();
    let result = match verdict {
        // Nothing to publish: settled at once. (Publishing is boxed, so that its state does
        // not make every handler's future larger.)
        Verdict::Ack if messages.is_empty() => delivery.settle(Settlement::Ack),
        // A verdict built by hand may ask for more than a delivery accepts.
        Verdict::Nack { delay } => delivery.settle(Settlement::Nack {
            delay: delay.min(crate::MAX_NACK_DELAY),
        }),
        verdict => {
            Box::pin(publish_then_settle(
                delivery, verdict, messages, publisher, backoff,
            ))
            .await
        }
    };
    if let Err(e) = result {
        tracing::warn!(id = %delivery.id(), error = %e, "settling the delivery failed; it stays pending");
    }
}

/// Publishes what the outcome carries (the handler's messages, or the dead-letter record),
/// then acks; nacks when publishing failed.
async fn publish_then_settle(
    delivery: &Delivery,
    verdict: Verdict,
    messages: Vec<Outgoing>,
    publisher: &dyn Publisher,
    backoff: &RetryBackoff,
) -> Result<()> {
    // A publish that failed is an error like a handler's: retried after the backoff.
    let retry_in = backoff.delay(delivery.delivery_count());
    match verdict {
        Verdict::Ack => {
            let mut published = Ok(());
            for out in messages {
                let sent = match out.max_length {
                    Some(max) => publisher.publish_capped(&out.topic, out.message, max).await,
                    None => publisher.publish(&out.topic, out.message).await,
                };
                if let Err(e) = sent {
                    published = Err(e);
                    break;
                }
            }
            match published {
                Ok(()) => delivery.ack().await,
                Err(e) => {
                    tracing::warn!(id = %delivery.id(), error = %e, redelivery_in = ?retry_in, "publishing the handler's messages failed; the delivery is nacked");
                    delivery.nack_after(retry_in).await
                }
            }
        }
        Verdict::Nack { delay } => delivery.nack_after(delay.min(crate::MAX_NACK_DELAY)).await,
        Verdict::DeadLetter { reason } => {
            let info = delivery.info();
            let record = DeadLetter {
                reason: &reason,
                original_id: info.id(),
                stream: info.stream(),
                group: info.group(),
                delivery_count: info.delivery_count(),
            }
            .for_message(delivery.message());
            match publisher
                .publish(&dead_letter::stream_for(info.stream()), record)
                .await
            {
                Ok(_) => {
                    tracing::warn!(id = %info.id(), stream = info.stream(), reason, "dead-lettered");
                    delivery.ack().await
                }
                Err(e) => {
                    tracing::error!(id = %info.id(), error = %e, redelivery_in = ?retry_in, "dead-letter record not written; the delivery is nacked");
                    delivery.nack_after(retry_in).await
                }
            }
        }
    }
}
