//! [`NatsPublisher`]: publishes to a topic's subject and waits for JetStream's publish
//! acknowledgement of every message, whose stream sequence becomes the entry id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use futures::future::BoxFuture;

use super::options::NatsPublisherOptions;
use super::{Shared, wire};
use crate::codec::{JsonCodec, wire_size};
use crate::error::{Error, Result, validate_stream_name};
use crate::message::{EntryId, Message};
use crate::pubsub::{Publisher, check_cap};

/// Publishes to JetStream. Cheap to clone (clones share the connection, the options and
/// being closed).
#[derive(Clone)]
pub struct NatsPublisher {
    shared: Arc<Shared>,
    options: NatsPublisherOptions,
    closed: Arc<AtomicBool>,
    /// The `max_messages` this publisher set on each topic it published capped to.
    caps: Arc<Mutex<HashMap<String, u64>>>,
    metrics: Arc<crate::metrics::PublishMetrics>,
}

impl std::fmt::Debug for NatsPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsPublisher")
            .field("url", &self.shared.url)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl NatsPublisher {
    pub(super) fn new(shared: Arc<Shared>, options: NatsPublisherOptions) -> Self {
        NatsPublisher {
            shared,
            options,
            closed: Arc::default(),
            caps: Arc::default(),
            metrics: Arc::default(),
        }
    }

    /// The options it publishes with.
    pub fn options(&self) -> &NatsPublisherOptions {
        &self.options
    }

    async fn send(&self, topic: &str, mut messages: Vec<Message>, cap: Option<u64>) -> Result<Vec<EntryId>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("publisher"));
        }
        validate_stream_name("topic", topic)?;
        for m in &messages {
            let size = wire_size(m);
            if size > self.options.max_entry_size {
                return Err(Error::PayloadTooLarge {
                    size,
                    limit: self.options.max_entry_size,
                });
            }
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let span = crate::pubsub::publish_trace(super::SYSTEM, topic, &mut messages);
        let started = cfg!(feature = "metrics").then(std::time::Instant::now);
        let n = messages.len();
        let result = tracing::Instrument::instrument(self.send_checked(topic, messages, cap), span).await;
        if let Some(started) = started {
            self.metrics.record(topic, n, result.is_ok(), started.elapsed());
        }
        result
    }

    async fn send_checked(
        &self,
        topic: &str,
        messages: Vec<Message>,
        cap: Option<u64>,
    ) -> Result<Vec<EntryId>> {
        // Encoded before anything is sent: a message that cannot be encoded fails the call
        // with nothing published.
        let mut batch = Batch::new(&messages)?;
        match cap {
            Some(cap) => self.apply_cap(topic, cap).await?,
            None => {
                if self.options.auto_create && !self.shared.known().contains(topic) {
                    self.shared.ensure_stream(topic).await?;
                }
            }
        }
        let subject = async_nats::Subject::from(wire::subject(&self.shared.options.subject_prefix, topic));
        let mut ids = Vec::with_capacity(messages.len());
        let mut recreated = false;
        let (mut retries, mut backoff) = (0, Duration::from_millis(50));
        while ids.len() < messages.len() {
            batch.encode_again(ids.len())?;
            match self.send_from(&subject, &mut batch, &mut ids).await {
                Ok(()) => {}
                // The stream went away (deleted) since it was known: once more after
                // creating it, from the first message it did not take.
                Err(e)
                    if e.kind() == PublishErrorKind::StreamNotFound
                        && self.options.auto_create
                        && !recreated =>
                {
                    recreated = true;
                    self.shared.known().remove(topic);
                    self.shared.ensure_stream(topic).await?;
                }
                // No acknowledgement (a connection lost, a server restarting): again from the
                // first message not acknowledged; those the stream took already are dropped
                // as duplicates and acknowledged with their first sequence.
                Err(e)
                    if matches!(
                        e.kind(),
                        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe
                    ) && retries < self.options.max_retries =>
                {
                    retries += 1;
                    tracing::debug!(topic, error = %e, retries, "a publish was not acknowledged; sending it again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(self.publish_error(topic, e, &messages[ids.len()..])),
            }
        }
        Ok(ids)
    }

    /// Sends the messages of `batch` from the first one not acknowledged (`ids.len()`) and
    /// waits for their acknowledgements, pushing the id of each one acknowledged onto `ids`,
    /// in order.
    async fn send_from(
        &self,
        subject: &async_nats::Subject,
        batch: &mut Batch<'_>,
        ids: &mut Vec<EntryId>,
    ) -> std::result::Result<(), PublishError> {
        let mut acks = Vec::with_capacity(batch.ready.len() - ids.len());
        for ready in &mut batch.ready[ids.len()..] {
            // Taken, not cloned: a retry encodes the message again (`Batch::encode_again`).
            // (All are there: `encode_again` ran before; were one not, the attempt would end
            // there, the ones before it in order.)
            let Some((headers, body)) = ready.take() else {
                break;
            };
            acks.push(
                self.shared
                    .js
                    .publish_with_headers(subject.clone(), headers, body)
                    .await?,
            );
        }
        for ack in acks {
            ids.push(wire::entry_id(ack.await?.sequence));
        }
        Ok(())
    }

    fn publish_error(&self, topic: &str, e: PublishError, unsent: &[Message]) -> Error {
        match e.kind() {
            PublishErrorKind::StreamNotFound => Error::StreamNotFound {
                stream: topic.to_owned(),
            },
            PublishErrorKind::MaxPayloadExceeded => Error::PayloadTooLarge {
                size: unsent.iter().map(wire_size).max().unwrap_or(0),
                limit: self.shared.client.server_info().max_payload,
            },
            _ => self.shared.failed("PUBLISH", e),
        }
    }

    /// Sets the stream's `max_messages` to `cap` (the oldest messages go first), unless this
    /// publisher did so already.
    async fn apply_cap(&self, topic: &str, cap: u64) -> Result<()> {
        if self.caps.lock().unwrap_or_else(|p| p.into_inner()).get(topic) == Some(&cap) {
            return Ok(());
        }
        let mut stream = if self.options.auto_create {
            self.shared.ensure_stream(topic).await?
        } else {
            self.shared
                .stream(topic)
                .await?
                .ok_or_else(|| Error::StreamNotFound {
                    stream: topic.to_owned(),
                })?
        };
        let info = stream
            .info()
            .await
            .map_err(|e| self.shared.failed("STREAM.INFO", e))?;
        let max = i64::try_from(cap).unwrap_or(i64::MAX);
        if info.config.max_messages != max {
            let mut config = info.config.clone();
            config.max_messages = max;
            config.discard = async_nats::jetstream::stream::DiscardPolicy::Old;
            self.shared
                .js
                .update_stream(config)
                .await
                .map_err(|e| self.shared.failed("STREAM.UPDATE", e))?;
        }
        self.caps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(topic.to_owned(), cap);
        Ok(())
    }
}

/// The messages of one publish call, each with the id of this publish (`Nats-Msg-Id`; not
/// the message's UUID: publishing one message twice stores it twice, as on Redis), so that
/// JetStream drops the copies a retry sends within its duplicate window (2 minutes by
/// default) and acknowledges the first.
struct Batch<'a> {
    messages: &'a [Message],
    /// The publish ids, as the lowercase hex of a UUIDv7.
    publish_ids: Vec<[u8; uuid::fmt::Simple::LENGTH]>,
    /// Each message's headers and body for the next attempt; an attempt takes those it sends.
    ready: Vec<Option<(async_nats::HeaderMap, bytes::Bytes)>>,
}

impl<'a> Batch<'a> {
    fn new(messages: &'a [Message]) -> Result<Self> {
        let mut batch = Batch {
            messages,
            publish_ids: Vec::with_capacity(messages.len()),
            ready: Vec::with_capacity(messages.len()),
        };
        for message in messages {
            let mut id = [0u8; uuid::fmt::Simple::LENGTH];
            uuid::Uuid::now_v7().simple().encode_lower(&mut id);
            batch.ready.push(Some(encode(message, &id)?));
            batch.publish_ids.push(id);
        }
        Ok(batch)
    }

    /// Encodes again, for a retry, the messages from `from` on that an attempt took.
    fn encode_again(&mut self, from: usize) -> Result<()> {
        for (i, ready) in self.ready.iter_mut().enumerate().skip(from) {
            if ready.is_none() {
                *ready = Some(encode(&self.messages[i], &self.publish_ids[i])?);
            }
        }
        Ok(())
    }
}

/// `message`'s headers (with the publish id, hex digits) and body.
fn encode(message: &Message, publish_id: &[u8]) -> Result<(async_nats::HeaderMap, bytes::Bytes)> {
    let (mut headers, body) = wire::encode(&JsonCodec, message)?;
    let id = String::from_utf8_lossy(publish_id).into_owned();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        async_nats::HeaderValue::from(id),
    );
    Ok((headers, body))
}

impl Publisher for NatsPublisher {
    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> BoxFuture<'a, Result<EntryId>> {
        Box::pin(async move {
            let ids = self.send(topic, vec![message], None).await?;
            ids.into_iter().next().ok_or(Error::Closed("publisher"))
        })
    }

    fn publish_batch<'a>(
        &'a self,
        topic: &'a str,
        messages: Vec<Message>,
    ) -> BoxFuture<'a, Result<Vec<EntryId>>> {
        Box::pin(self.send(topic, messages, None))
    }

    /// Sets the stream's `max_messages` to `max_length` (JetStream drops the oldest beyond
    /// it), then publishes. The limit stays on the stream: it is the stream's, not the
    /// publish's.
    fn publish_capped<'a>(
        &'a self,
        topic: &'a str,
        message: Message,
        max_length: u64,
    ) -> BoxFuture<'a, Result<EntryId>> {
        Box::pin(async move {
            check_cap(max_length)?;
            let ids = self.send(topic, vec![message], Some(max_length)).await?;
            ids.into_iter().next().ok_or(Error::Closed("publisher"))
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.closed.store(true, Ordering::Release);
        Box::pin(std::future::ready(Ok(())))
    }
}
