//! Request/reply over streams: [`Replies`] listens on a reply topic of its own; a request
//! carries `reply_to` and `correlation_id` in its metadata, and the handler's result comes back
//! on the reply topic. [`Replies::close`] deletes the reply topic when the requester is done.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{CORRELATION_ID, REPLY_TO, marshal};
use crate::error::{BoxError, Error, Result};
use crate::pubsub::{Publisher, SubscribeOptions, Subscriber};
use crate::router::{Outgoing, Permanent};

/// How many entries a reply topic keeps at most (it is trimmed as replies are published);
/// replies are read at once, so this only bounds what a requester that went away leaves.
pub const DEFAULT_REPLY_MAX_LENGTH: u64 = 1_000;

/// The error a command handler returned, as its reply carries it back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
#[non_exhaustive]
pub struct RemoteError {
    /// The error's text.
    pub message: String,
    /// Whether it was [`Permanent`] (retrying the command cannot help).
    #[serde(default)]
    pub permanent: bool,
    /// The texts of its sources, outermost first.
    #[serde(default)]
    pub causes: Vec<String>,
}

impl RemoteError {
    /// The reply error for a handler's `error`.
    pub fn from_error(error: impl Into<BoxError>) -> Self {
        let error: BoxError = error.into();
        let mut causes = Vec::new();
        let mut source = error.source();
        while let Some(cause) = source.filter(|_| causes.len() < 16) {
            causes.push(cause.to_string());
            source = cause.source();
        }
        RemoteError {
            message: error.to_string(),
            permanent: Permanent::is_permanent(&error),
            causes,
        }
    }

    /// A reply error with just a message (what other clients send as `{"error": "text"}`).
    pub fn message(message: impl Into<String>) -> Self {
        RemoteError {
            message: message.into(),
            permanent: false,
            causes: Vec::new(),
        }
    }
}

/// Why [`send_and_wait`](super::CommandBus::send_and_wait) gave no result.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplyError {
    /// The handler returned an error.
    #[error("the command handler failed: {0}")]
    Handler(RemoteError),
    /// No reply came in time (the command may still be handled later).
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The bus was made without [`with_replies`](super::CommandBus::with_replies).
    #[error("this command bus does not listen for replies; use CommandBus::with_replies")]
    NotListening,
    /// The [`Replies`] were closed while the request waited.
    #[error("the replies were closed while the request waited")]
    Closed,
    /// The reply did not decode into the expected type.
    #[error("the reply does not decode: {0}")]
    Decode(Error),
    /// The reply is neither a result nor an error (not written by streamwise's processor).
    #[error("the reply is malformed: {0}")]
    Malformed(String),
    /// Sending the command failed.
    #[error("sending the command failed: {0}")]
    Transport(Error),
}

/// A reply as it comes back: the handler's value or error, or why it is unreadable.
enum Reply {
    Ok(serde_json::Value),
    Err(RemoteError),
    Malformed(String),
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Reply>>>>;

/// The listening end of request/reply: a reply topic of its own (`replies-<uuid>`) and the
/// requests waiting on it. Cheap to clone. [`close`](Self::close) stops listening and
/// deletes the reply topic with what the backend keeps beside it; dropping the last clone
/// does the same in the background, as well as it can.
#[derive(Clone)]
pub struct Replies {
    topic: String,
    waiting: Waiters,
    listener: Arc<Listener>,
}

struct Listener {
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    subscriber: Arc<dyn Subscriber>,
    topic: String,
}

impl Listener {
    fn stop(&self) -> Option<tokio::task::JoinHandle<()>> {
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        task.abort();
        Some(task)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if self.stop().is_some() {
            // Not closed: delete the topic in the background if a runtime is still there.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let (subscriber, topic) = (self.subscriber.clone(), std::mem::take(&mut self.topic));
                runtime.spawn(async move {
                    if let Err(e) = subscriber.delete_topic(&topic).await {
                        tracing::warn!(topic, error = %e, "reply topic not deleted");
                    }
                });
            }
        }
    }
}

impl fmt::Debug for Replies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replies")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

fn lock(waiting: &Waiters) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Reply>>> {
    waiting.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a reply message says.
fn read_reply(message: &crate::Message) -> Reply {
    let Ok(serde_json::Value::Object(mut reply)) = message.json() else {
        return Reply::Malformed("not a JSON object".to_owned());
    };
    match (reply.remove("ok"), reply.remove("error")) {
        (Some(value), _) => Reply::Ok(value),
        (None, Some(serde_json::Value::String(text))) => Reply::Err(RemoteError::message(text)),
        (None, Some(error)) => match serde_json::from_value::<RemoteError>(error.clone()) {
            Ok(error) => Reply::Err(error),
            Err(_) => Reply::Err(RemoteError::message(error.to_string())),
        },
        (None, None) => Reply::Malformed("neither \"ok\" nor \"error\"".to_owned()),
    }
}

impl Replies {
    /// Starts listening for replies with `subscriber`, on a new reply topic.
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
                if let Some(waiter) = message
                    .metadata()
                    .get(CORRELATION_ID)
                    .and_then(|id| lock(&routed).remove(id))
                {
                    // The requester may have timed out and gone; nothing to do then.
                    let _ = waiter.send(read_reply(message));
                }
                let _ = delivery.ack().await;
            }
        });
        Ok(Replies {
            topic: topic.clone(),
            waiting,
            listener: Arc::new(Listener {
                task: Mutex::new(Some(task)),
                subscriber,
                topic,
            }),
        })
    }

    /// Stops listening (for every clone: requests still waiting end with
    /// [`ReplyError::Closed`]) and deletes the reply topic, its group and checkpoints
    /// ([`Subscriber::delete_topic`]). Idempotent.
    pub async fn close(&self) -> Result<()> {
        let Some(task) = self.listener.stop() else {
            return Ok(());
        };
        // Its subscription is dropped with it, before the topic goes.
        let _ = task.await;
        lock(&self.waiting).clear();
        self.listener.subscriber.delete_topic(&self.topic).await
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
        max_length: u64,
    ) -> std::result::Result<T, ReplyError> {
        let correlation = uuid::Uuid::now_v7().to_string();
        let (tx, rx) = oneshot::channel();
        if self
            .listener
            .task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
        {
            return Err(ReplyError::Closed);
        }
        lock(&self.waiting).insert(correlation.clone(), tx);
        let metadata = request.message.metadata_mut();
        metadata.insert(REPLY_TO, self.topic.clone());
        metadata.insert(CORRELATION_ID, correlation.clone());
        if let Err(e) = publisher
            .publish_capped(&request.topic, request.message, max_length)
            .await
        {
            lock(&self.waiting).remove(&correlation);
            return Err(ReplyError::Transport(e));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Reply::Ok(value))) => marshal::from_value(value).map_err(ReplyError::Decode),
            Ok(Ok(Reply::Err(error))) => Err(ReplyError::Handler(error)),
            Ok(Ok(Reply::Malformed(why))) => Err(ReplyError::Malformed(why)),
            Ok(Err(_)) => Err(ReplyError::Closed),
            Err(_) => {
                lock(&self.waiting).remove(&correlation);
                Err(ReplyError::Timeout(timeout))
            }
        }
    }
}
