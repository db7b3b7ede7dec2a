//! Request/reply over streams: [`Replies`] listens on a reply topic of its own; a request
//! carries `reply_to` and `correlation_id` in its metadata, and the handler's result comes back
//! on the reply topic.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;

use super::{CORRELATION_ID, REPLY_TO, marshal};
use crate::error::{Error, Result};
use crate::pubsub::{Publisher, SubscribeOptions, Subscriber};
use crate::router::Outgoing;

/// Why [`send_and_wait`](super::CommandBus::send_and_wait) gave no result.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplyError {
    /// The handler returned an error; this is its text.
    #[error("the command handler failed: {0}")]
    Handler(String),
    /// No reply came in time (the command may still be handled later).
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The bus was made without [`with_replies`](super::CommandBus::with_replies).
    #[error("this command bus does not listen for replies; use CommandBus::with_replies")]
    NotListening,
    /// The reply did not decode into the expected type.
    #[error("the reply does not decode: {0}")]
    Decode(Error),
    /// Sending the command failed.
    #[error("sending the command failed: {0}")]
    Transport(Error),
}

/// A reply: the handler's value, or its error text.
type ReplyResult = std::result::Result<serde_json::Value, String>;
type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<ReplyResult>>>>;

/// The listening end of request/reply: a reply topic of its own (`replies-<uuid>`) and the
/// requests waiting on it. Cheap to clone; listening stops when the last clone is dropped.
#[derive(Clone)]
pub struct Replies {
    topic: String,
    waiting: Waiters,
    _listener: Arc<Listener>,
}

struct Listener(tokio::task::JoinHandle<()>);

impl Drop for Listener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl fmt::Debug for Replies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replies")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

fn lock(
    waiting: &Waiters,
) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<std::result::Result<serde_json::Value, String>>>>
{
    waiting.lock().unwrap_or_else(|p| p.into_inner())
}

impl Replies {
    /// Starts listening for replies with `subscriber`.
    pub async fn listen(subscriber: Arc<dyn Subscriber>) -> Result<Self> {
        let topic = format!("replies-{}", uuid::Uuid::now_v7().simple());
        let mut deliveries = subscriber
            .subscribe(&topic, SubscribeOptions::new("replies", "bus"))
            .await?;
        let waiting: Waiters = Arc::default();
        let routed = waiting.clone();
        let task = tokio::spawn(async move {
            while let Some(delivery) = deliveries.next().await {
                let Ok(delivery) = delivery else { continue };
                let message = delivery.message();
                let result = match message.json() {
                    Ok(serde_json::Value::Object(mut reply)) => {
                        match (reply.remove("ok"), reply.remove("error")) {
                            (Some(value), _) => Ok(value),
                            (None, Some(error)) => Err(error
                                .as_str()
                                .map(str::to_owned)
                                .unwrap_or_else(|| error.to_string())),
                            (None, None) => Err("an empty reply".to_owned()),
                        }
                    }
                    _ => Err("a reply that is not a JSON object".to_owned()),
                };
                if let Some(waiter) = message
                    .metadata()
                    .get(CORRELATION_ID)
                    .and_then(|id| lock(&routed).remove(id))
                {
                    // The requester may have timed out and gone; nothing to do then.
                    let _ = waiter.send(result);
                }
                let _ = delivery.ack().await;
            }
        });
        Ok(Replies {
            topic,
            waiting,
            _listener: Arc::new(Listener(task)),
        })
    }

    /// The reply topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub(crate) async fn request<T: DeserializeOwned>(
        &self,
        publisher: &dyn Publisher,
        mut request: Outgoing,
        timeout: Duration,
    ) -> std::result::Result<T, ReplyError> {
        let correlation = uuid::Uuid::now_v7().to_string();
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).insert(correlation.clone(), tx);
        let metadata = request.message.metadata_mut();
        metadata.insert(REPLY_TO, self.topic.clone());
        metadata.insert(CORRELATION_ID, correlation.clone());
        if let Err(e) = publisher.publish(&request.topic, request.message).await {
            lock(&self.waiting).remove(&correlation);
            return Err(ReplyError::Transport(e));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(value))) => marshal::from_value(value).map_err(ReplyError::Decode),
            Ok(Ok(Err(error))) => Err(ReplyError::Handler(error)),
            Ok(Err(_)) => Err(ReplyError::Timeout(timeout)),
            Err(_) => {
                lock(&self.waiting).remove(&correlation);
                Err(ReplyError::Timeout(timeout))
            }
        }
    }
}
