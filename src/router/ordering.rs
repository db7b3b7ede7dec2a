//! Per-key ordering: with [`Routes::order_by`](super::Routes::order_by), a delivery waits for
//! the previous one with the same [`OrderKey`] to be settled before its handler runs.
//! (How many deliveries run at once is the subscription's `max_in_flight`: the subscription
//! hands out no more than that.)

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use futures::future::{FutureExt, Shared};
use tokio::sync::oneshot;

use crate::message::Message;

/// Where the ordering key of a delivery comes from, for [`Routes::order_by`](super::Routes::order_by).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrderKey {
    /// A metadata field.
    Metadata(String),
    /// A field of the JSON payload, as a JSON pointer (`/customer/id`).
    Payload(String),
}

impl OrderKey {
    fn of(&self, message: &Message) -> Option<String> {
        match self {
            OrderKey::Metadata(field) => message.metadata().get(field).map(str::to_owned),
            OrderKey::Payload(pointer) => {
                let json = message.json().ok()?;
                json.pointer(pointer).map(|v| match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
            }
        }
    }
}

/// The tail of each ordering key: completes when the last delivery with that key is settled.
type Tail = Shared<oneshot::Receiver<()>>;

/// The ordering of one subscription's deliveries by key.
pub(crate) struct KeyOrder {
    key: OrderKey,
    /// Per key: the sequence number of its last delivery, and that delivery's tail.
    tails: Arc<Mutex<HashMap<String, (u64, Tail)>>>,
    /// The sequence number of the last delivery ordered.
    sequence: u64,
}

impl KeyOrder {
    pub(crate) fn new(key: OrderKey) -> Self {
        KeyOrder {
            key,
            tails: Arc::new(Mutex::new(HashMap::new())),
            sequence: 0,
        }
    }

    /// The ordering key of `message`; `None` when it has none (its delivery is not ordered).
    pub(crate) fn key_of(&self, message: &Message) -> Option<String> {
        self.key.of(message)
    }

    /// `handle`, the handling of a delivery with `key`, run once the delivery before it with
    /// that key is settled (at once if there is none).
    pub(crate) fn after_previous<F: Future<Output = ()>>(
        &mut self,
        key: String,
        handle: F,
    ) -> impl Future<Output = ()> + use<F> {
        self.sequence += 1;
        let sequence = self.sequence;
        let (done, tail) = oneshot::channel::<()>();
        let previous = self
            .tails
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), (sequence, tail.shared()));
        let tails = self.tails.clone();
        async move {
            if let Some((_, previous)) = previous {
                // Settled, or its future is gone (sender dropped): our turn.
                let _ = previous.await;
            }
            handle.await;
            let _ = done.send(());
            let mut tails = tails.lock().unwrap_or_else(|p| p.into_inner());
            if tails.get(&key).is_some_and(|(seq, _)| *seq == sequence) {
                tails.remove(&key);
            }
        }
    }
}
