//! [`NatsSubscriber`]: subscribing (the stream, the durable pull consumer of the group, the
//! consumer name's lease) and the read loop, which pulls only as many messages as the
//! subscription has free slots, and turns each into a [`Delivery`] or, when it cannot be
//! handed out (undecodable, too large, delivered `max_deliveries` times), a dead letter.
//!
//! A pull request asks for as many messages as the subscription has free slots, replying to
//! `<inbox>.<n>` under one inbox subscription that lives as long as the subscription: a
//! message the server sends for a pull this side already counted as ended (expired,
//! unanswered) still arrives, and takes a free slot or goes back at once with a nak. When
//! half of a pull's messages have come and slots are free, a second pull is sent ahead for
//! them, so that the server has the next request before the first is done and a backlog flows
//! without a round trip's pause per batch; each pull is backed by slots taken for it, so no
//! more than `max_in_flight` messages are ever out.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::{self, BatchConfig};
use async_nats::jetstream::consumer::{AckPolicy, Consumer, DeliverPolicy};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio_util::task::TaskTracker;

use super::lease::Lease;
use super::options::NatsSubscriberOptions;
use super::settle::{LedgerFlush, SubState, Write};
use super::{Shared, is_not_found, wire};
use crate::codec::{JsonCodec, decode_entry};
use crate::dead_letter::{DeadLetter, GaveUp};
use crate::delivery::{Delivery, DeliveryInfo, Origin, Settler};
use crate::error::{Error, Result};
use crate::message::EntryId;
use crate::metrics::DeadLetterReason;
use crate::pubsub::{StartFrom, SubscribeOptions, Subscriber, Subscription};
use crate::signal::Signal;

/// Subscribes to JetStream topics as a consumer of a group (a durable pull consumer).
/// Cheap to clone; clones share being closed.
#[derive(Clone)]
pub struct NatsSubscriber {
    shared: Arc<Shared>,
    options: NatsSubscriberOptions,
    closed: Signal,
    subscriptions: Arc<Mutex<Vec<Weak<SubState>>>>,
    tasks: TaskTracker,
}

impl std::fmt::Debug for NatsSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSubscriber")
            .field("url", &self.shared.url)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl NatsSubscriber {
    pub(super) fn new(shared: Arc<Shared>, options: NatsSubscriberOptions) -> Self {
        NatsSubscriber {
            shared,
            options,
            closed: Signal::new(),
            subscriptions: Arc::default(),
            tasks: TaskTracker::new(),
        }
    }

    /// The options it subscribes with.
    pub fn options(&self) -> &NatsSubscriberOptions {
        &self.options
    }

    fn live(&self) -> Vec<Arc<SubState>> {
        let mut subs = self.subscriptions.lock().unwrap_or_else(|p| p.into_inner());
        subs.retain(|s| s.strong_count() > 0);
        subs.iter().filter_map(Weak::upgrade).collect()
    }

    async fn start(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        if self.closed.is_cancelled() {
            return Err(Error::Closed("subscriber"));
        }
        options.validate(topic)?;
        let deliver_policy = match options.start_from {
            StartFrom::Beginning => DeliverPolicy::All,
            StartFrom::Latest => DeliverPolicy::New,
            StartFrom::After(id) => DeliverPolicy::ByStartSequence {
                start_sequence: wire::sequence_of(id)
                    .and_then(|seq| seq.checked_add(1))
                    .ok_or_else(|| {
                        Error::invalid(
                            "start_from",
                            format_args!("{id} is not an entry id of this backend (0-<stream sequence>)"),
                        )
                    })?,
            },
        };
        let group = options.group.as_str();
        let missing = || Error::GroupNotFound {
            stream: topic.to_owned(),
            group: group.to_owned(),
        };
        let stream = if options.create_group {
            self.shared.ensure_stream(topic).await?
        } else {
            self.shared.stream(topic).await?.ok_or_else(missing)?
        };
        if !options.create_group {
            match stream.consumer_info(group).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => return Err(missing()),
                Err(e) => return Err(self.shared.failed("CONSUMER.INFO", e)),
            }
        }
        let config = pull::Config {
            durable_name: Some(group.to_owned()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.options.ack_wait,
            deliver_policy,
            // Unlimited: the subscription dead-letters past `max_deliveries` itself, with a
            // record; a server limit would drop the message from the group without one.
            max_deliver: -1,
            // No limit of the server's on what a group holds: each subscription keeps its
            // own, `max_in_flight`.
            max_ack_pending: -1,
            ..Default::default()
        };
        let recreate_config = config.clone();
        let consumer: Consumer<pull::Config> =
            match stream.get_or_create_consumer(group, config.clone()).await {
                Ok(consumer) => consumer,
                // Created by another process between the look and the create: look again.
                Err(first) => match stream.get_or_create_consumer(group, config).await {
                    Ok(consumer) => consumer,
                    Err(_) => {
                        return Err(match first.kind() {
                            async_nats::jetstream::stream::ConsumerErrorKind::JetStream(js) => {
                                super::refused("CONSUMER.CREATE", &js)
                            }
                            _ => self.shared.failed("CONSUMER.CREATE", first),
                        });
                    }
                },
            };
        let ack_wait = consumer.cached_info().config.ack_wait;
        let lease = Lease::acquire(
            &self.shared,
            self.options.lease_ttl,
            topic,
            group,
            &options.consumer,
        )
        .await?;
        if self.closed.is_cancelled() {
            lease.release().await;
            return Err(Error::Closed("subscriber"));
        }
        let origin =
            Arc::new(Origin::new(topic, group, options.consumer.as_str()).with_system(super::SYSTEM));
        let state = SubState::start(
            self.shared.clone(),
            origin,
            options.in_flight_limit(),
            self.closed.clone(),
            lease,
            ack_wait,
            &self.tasks,
        );
        self.subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&state));
        // One inbox for all the subscription's pull requests (each replies to `<inbox>.<n>`):
        // a message the server sends for a pull that ended on this side still arrives, and
        // is handed out or given back, never left to wait for `ack_wait`.
        let inbox_prefix = self.shared.client.new_inbox();
        let inbox = self
            .shared
            .client
            .subscribe(format!("{inbox_prefix}.*"))
            .await
            .map_err(|e| self.shared.failed("SUB", e))?;
        let flush = Arc::new(LedgerFlush(state.ledger.clone(), state.ended.clone()));
        let health = state.health.clone();
        let reader = Reader {
            settler: state.clone(),
            state,
            consumer,
            js: self.shared.js.clone(),
            inbox_prefix,
            inbox,
            pulls_under_way: VecDeque::with_capacity(PULLS_UNDER_WAY),
            pulls: 0,
            batch_size: options.batch_size,
            block: options.block,
            max_deliveries: options.max_deliveries,
            max_entry_size: self.options.max_entry_size,
            failures: 0,
            recreate: options.create_group.then(|| Recreate {
                shared: self.shared.clone(),
                config: recreate_config,
            }),
        };
        Ok(Subscription::from_reader(reader)
            .with_flush(flush)
            .with_health(health))
    }
}

impl Subscriber for NatsSubscriber {
    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<Subscription>> {
        Box::pin(self.start(topic, options))
    }

    /// Stops every subscription's reads, waits (up to the request timeout) for the
    /// settlements made so far to be confirmed, and gives the consumer names back.
    /// Unsettled deliveries stay pending: the group gets them again after `ack_wait`.
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.closed.cancel();
            let timeout = self.shared.options.request_timeout;
            let subs = self.live();
            for s in &subs {
                s.ledger.close();
            }
            futures::future::join_all(subs.iter().map(|s| async move {
                match tokio::time::timeout(timeout, s.ledger.flush()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(stream = s.origin.stream(), error = %e, "a settlement failed before close"),
                    Err(_) => tracing::warn!(stream = s.origin.stream(), "settlements still unconfirmed at close"),
                }
                s.ended.cancel();
                s.lease.release().await;
            }))
            .await;
            self.tasks.close();
            Ok(())
        })
    }

    fn unflushed(&self) -> u64 {
        self.live().iter().map(|s| s.ledger.unflushed()).sum()
    }

    /// Deletes the topic's stream (its consumers go with it).
    fn delete_topic<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            crate::error::validate_stream_name("topic", topic)?;
            self.shared.known().remove(topic);
            match self.shared.js.delete_stream(topic).await {
                Ok(_) => Ok(()),
                Err(e) => match self.shared.stream(topic).await? {
                    None => Ok(()),
                    Some(_) => Err(self.shared.failed("STREAM.DELETE", e)),
                },
            }
        })
    }
}

/// Why and from where the subscription gives up on entry `id`.
fn dead_letter<'a>(state: &'a SubState, id: EntryId, reason: &'a str, delivery_count: u64) -> DeadLetter<'a> {
    DeadLetter {
        reason,
        original_id: id,
        stream: state.origin.stream(),
        group: state.origin.group(),
        delivery_count,
    }
}

/// The read loop of one subscription.
struct Reader {
    state: Arc<SubState>,
    settler: Arc<dyn Settler>,
    consumer: Consumer<pull::Config>,
    js: async_nats::jetstream::Context,
    /// The subject prefix of the pull requests' replies, and the subscription to them.
    inbox_prefix: String,
    inbox: async_nats::Subscriber,
    /// The pull requests under way, oldest first: at most [`PULLS_UNDER_WAY`].
    pulls_under_way: VecDeque<Pull>,
    /// Pull requests sent (the last one's number).
    pulls: u64,
    batch_size: usize,
    block: Duration,
    max_deliveries: u64,
    max_entry_size: usize,
    /// Pull requests that failed in a row.
    failures: u32,
    /// How to re-create the consumer (and stream) when they were deleted under the
    /// subscription, if it may create them (`create_group`).
    recreate: Option<Recreate>,
}

/// The most pull requests under way at once: one, and one sent ahead of it.
const PULLS_UNDER_WAY: usize = 2;

/// How much longer than its `block` a pull may take before it counts as unanswered.
const UNANSWERED_MARGIN: Duration = Duration::from_secs(3);

/// A pull request under way.
struct Pull {
    /// Its reply subject, `<inbox>.<n>`.
    reply: String,
    /// Slots taken for it that no message has used yet.
    slots: usize,
    /// Slots taken for it when it was sent.
    asked: usize,
    /// When it counts as unanswered: its `expires` plus a margin.
    deadline: tokio::time::Instant,
}

/// What the read loop needs to re-create its consumer.
struct Recreate {
    shared: Arc<Shared>,
    config: pull::Config,
}

impl crate::pubsub::BackendReader for Reader {
    fn ready(&mut self) -> Option<Delivery> {
        if self.stopped() {
            return None;
        }
        // Messages that arrived already; but first a pull sent ahead when one is due (a pull's
        // messages come together, and would all be taken here before `next` looked).
        if self.pull_ahead_due() {
            return None;
        }
        loop {
            let message = self.inbox.next().now_or_never()??;
            if let Some(delivery) = self.on_message(message) {
                return Some(delivery);
            }
            if self.pull_ahead_due() {
                return None;
            }
        }
    }

    async fn next(mut self) -> (Self, Option<Result<Delivery>>) {
        let item = self.next_item().await;
        (self, item.map(Ok))
    }
}

impl Reader {
    fn stopped(&self) -> bool {
        self.state.closed.is_cancelled() || self.state.ended.is_cancelled()
    }

    async fn next_item(&mut self) -> Option<Delivery> {
        loop {
            if self.stopped() {
                self.stop();
                return None;
            }
            if self.pulls_under_way.is_empty() && !self.send_pull().await {
                continue;
            }
            self.send_pull_ahead().await;
            let Some(deadline) = self.pulls_under_way.iter().map(|p| p.deadline).min() else {
                continue;
            };
            let message = tokio::select! {
                biased;
                _ = self.state.closed.cancelled() => continue,
                _ = self.state.ended.cancelled() => continue,
                message = self.inbox.next() => message,
                () = tokio::time::sleep_until(deadline) => {
                    // Unanswered: the server or the network is stuck. What it sends for these
                    // pulls later still arrives, and finds a slot or goes back.
                    self.end_pulls();
                    self.read_failed(format!(
                        "a pull request was not answered within {:?}",
                        self.block + UNANSWERED_MARGIN
                    ));
                    continue;
                }
            };
            let Some(message) = message else {
                // The client closed the subscription: the connection is closed for good.
                self.stop();
                return None;
            };
            if let Some(delivery) = self.on_message(message) {
                return Some(delivery);
            }
        }
    }

    /// Takes free slots (waiting for one) and asks the server for that many messages;
    /// `false` when it did not get to send the request.
    async fn send_pull(&mut self) -> bool {
        if self.failures > 0 {
            let backoff = Duration::from_millis(100 << self.failures.min(6)).min(Duration::from_secs(5));
            tokio::select! {
                _ = self.state.closed.cancelled() => return false,
                _ = self.state.ended.cancelled() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            // Pulls fail: the consumer (or its stream) may have been deleted. Looked at on
            // the first failure and every fifth after it.
            if self.failures % 5 == 1 {
                self.recreate_if_deleted().await;
            }
        }
        let taken = tokio::select! {
            biased;
            _ = self.state.closed.cancelled() => return false,
            _ = self.state.ended.cancelled() => return false,
            n = self.state.in_flight.acquire(self.batch_size) => n,
        };
        // A nack on its way first (it may have freed the slot just taken): the message must be
        // back in the server's queue before the next pull asks for more.
        let confirmed = tokio::select! {
            biased;
            _ = self.state.closed.cancelled() => false,
            _ = self.state.ended.cancelled() => false,
            () = self.state.ledger.naks_confirmed() => true,
        };
        if !confirmed {
            self.state.in_flight.release(taken);
            return false;
        }
        self.request(taken).await
    }

    /// Sends a second pull while the one under way still brings messages, once half of them
    /// came, for slots free right now (a quarter of a batch at least: smaller pulls cost the
    /// server more than the pause they save). Only behind a pull of half a batch or more: a
    /// reader held to a small share of a limit (a partition's) does not take more of it
    /// ahead. Not while a nak is on its way (looked at after the slots are taken, as the nak
    /// may have freed one of them): the message must be back in the server's queue before
    /// more is asked for.
    async fn send_pull_ahead(&mut self) {
        if !self.pull_ahead_due() {
            return;
        }
        let taken = self.state.in_flight.try_acquire(self.batch_size);
        if taken < self.least_ahead() || self.state.ledger.naks_pending() {
            self.state.in_flight.release(taken);
            return;
        }
        self.request(taken).await;
    }

    /// Whether [`send_pull_ahead`](Self::send_pull_ahead) would send a pull now.
    fn pull_ahead_due(&self) -> bool {
        let half_came = match self.pulls_under_way.back() {
            Some(last) => {
                self.pulls_under_way.len() < PULLS_UNDER_WAY
                    && last.asked * 2 >= self.batch_size
                    && last.slots * 2 <= last.asked
            }
            None => false,
        };
        // The ledger's lock last: this runs for each message taken from the buffer.
        half_came
            && self.failures == 0
            && self.state.in_flight.available() >= self.least_ahead()
            && !self.state.ledger.naks_pending()
    }

    fn least_ahead(&self) -> usize {
        (self.batch_size / 4).max(1)
    }

    /// Asks the server for `taken` messages, slots taken for them; `false` when the request
    /// could not be sent (the slots then go back).
    async fn request(&mut self, taken: usize) -> bool {
        self.pulls += 1;
        let reply = format!("{}.{}", self.inbox_prefix, self.pulls);
        let request = BatchConfig {
            batch: taken,
            expires: Some(self.block),
            ..Default::default()
        };
        match self.consumer.request_batch(request, reply.clone().into()).await {
            Ok(()) => {
                self.pulls_under_way.push_back(Pull {
                    reply,
                    slots: taken,
                    asked: taken,
                    deadline: tokio::time::Instant::now() + self.block + UNANSWERED_MARGIN,
                });
                true
            }
            Err(e) => {
                self.state.in_flight.release(taken);
                self.read_failed(format!("a pull request failed: {e}"));
                false
            }
        }
    }

    /// Re-creates the consumer (and its stream) when they no longer exist and the
    /// subscription may create them, as the Redis backend re-creates a deleted group.
    async fn recreate_if_deleted(&mut self) {
        let Some(recreate) = &self.recreate else { return };
        let topic = self.state.origin.stream();
        let stream = match recreate.shared.stream(topic).await {
            Ok(Some(stream)) => match stream.consumer_info(self.state.origin.group()).await {
                Ok(_) => return,
                Err(e) if is_not_found(&e) => stream,
                Err(_) => return,
            },
            Ok(None) => match recreate.shared.ensure_stream(topic).await {
                Ok(stream) => stream,
                Err(_) => return,
            },
            Err(_) => return,
        };
        match stream
            .get_or_create_consumer(self.state.origin.group(), recreate.config.clone())
            .await
        {
            Ok(consumer) => {
                tracing::warn!(
                    stream = topic,
                    group = self.state.origin.group(),
                    "the consumer was gone (deleted); created it again"
                );
                self.consumer = consumer;
            }
            Err(e) => tracing::debug!(error = %e, "the consumer could not be created again"),
        }
    }

    fn read_failed(&mut self, problem: String) {
        self.failures = self.failures.saturating_add(1);
        if self.failures == 1 || self.failures.is_multiple_of(10) {
            tracing::warn!(
                stream = self.state.origin.stream(),
                group = self.state.origin.group(),
                failures = self.failures,
                "{problem}"
            );
        }
        self.state.health.read(Some(problem));
    }

    /// The pull under way at `at` ended (answered, or given up on): its unused slots go back.
    fn end_pull(&mut self, at: usize) {
        if let Some(pull) = self.pulls_under_way.remove(at) {
            self.state.in_flight.release(pull.slots);
        }
    }

    /// Every pull under way ended (unanswered, or the subscription stops).
    fn end_pulls(&mut self) {
        while !self.pulls_under_way.is_empty() {
            self.end_pull(0);
        }
    }

    /// A read went through: the failures in a row are over.
    fn recovered(&mut self) {
        if self.failures > 0 {
            self.failures = 0;
            self.state.health.read(None);
        }
    }

    /// One message on the inbox: a status of a pull (expired, no messages, an error), or a
    /// delivery, which becomes a [`Delivery`] when there is a slot for it.
    fn on_message(&mut self, message: async_nats::Message) -> Option<Delivery> {
        use async_nats::StatusCode;
        // A status comes on the reply subject of its pull (a delivery on its own subject).
        let current = self
            .pulls_under_way
            .iter()
            .position(|p| p.reply == message.subject.as_str());
        match message.status {
            None | Some(StatusCode::OK) => {}
            Some(StatusCode::IDLE_HEARTBEAT) => return None,
            // The pull ended, fulfilled or expired (a status of an earlier pull means nothing
            // any more).
            Some(StatusCode::TIMEOUT | StatusCode::NOT_FOUND) => {
                if let Some(at) = current {
                    self.end_pull(at);
                    self.recovered();
                }
                return None;
            }
            Some(status) => {
                if let Some(at) = current {
                    self.end_pull(at);
                    let description = message.description.as_deref().unwrap_or("");
                    self.read_failed(format!("a pull request failed: {status} {description}"));
                }
                return None;
            }
        }
        // A delivery: counted against the oldest pull under way, or a late one of a pull that
        // ended here. (The server may share messages out between two waiting pulls, so the
        // count per pull can be off; every delivery still holds a slot taken for some pull or
        // taken here, and each pull's end gives back what is counted against it.)
        let slot = match self.pulls_under_way.front_mut() {
            Some(pull) => {
                pull.slots -= 1;
                if pull.slots == 0 {
                    self.pulls_under_way.pop_front();
                }
                true
            }
            None => self.state.in_flight.try_acquire(1) == 1,
        };
        self.recovered();
        if !slot {
            // No room for it: back to the server at once (no delivery beyond max_in_flight).
            if let Some(reply) = message.reply {
                self.state.submit(Write::Nak(reply, Duration::ZERO));
            }
            return None;
        }
        self.admit(async_nats::jetstream::Message {
            message,
            context: self.js.clone(),
        })
    }

    /// The delivery of `message`, or `None` when it is dead-lettered instead (its slot then
    /// goes back at once).
    fn admit(&mut self, message: async_nats::jetstream::Message) -> Option<Delivery> {
        let state = &self.state;
        let (Ok(info), Some(reply)) = (message.info(), message.message.reply.clone()) else {
            tracing::warn!(
                stream = state.origin.stream(),
                "a message without JetStream metadata was ignored"
            );
            state.in_flight.release(1);
            return None;
        };
        let delivered = u64::try_from(info.delivered).unwrap_or(1).max(1);
        let key = (info.stream_sequence, delivered);
        let id = wire::entry_id(info.stream_sequence);
        let entry = wire::decode(id, message.message.headers.as_ref(), &message.message.payload);
        if delivered > self.max_deliveries {
            // Delivered `max_deliveries` times already: given up on before a handler sees it
            // again, with the count of the deliveries handlers saw, as on Redis.
            let count = delivered - 1;
            let reason = GaveUp::TooManyDeliveries {
                delivered: count,
                limit: self.max_deliveries,
            }
            .to_string();
            let record = match decode_entry(&JsonCodec, entry) {
                Ok(m) => dead_letter(state, id, &reason, count).for_message(&m),
                Err((_, entry)) => dead_letter(state, id, &reason, count).for_undecodable(&entry.fields),
            };
            state.give_up(key, reply, record, DeadLetterReason::MaxDeliveries);
            state.in_flight.release(1);
            return None;
        }
        let size = entry.size();
        if size > self.max_entry_size {
            let reason = GaveUp::TooLarge {
                size,
                limit: self.max_entry_size,
            }
            .to_string();
            let record = dead_letter(state, id, &reason, delivered).for_undecodable(&entry.fields);
            state.give_up(key, reply, record, DeadLetterReason::Oversize);
            state.in_flight.release(1);
            return None;
        }
        match decode_entry(&JsonCodec, entry) {
            Ok(m) => {
                state.ledger.hold(key, reply);
                let info = DeliveryInfo::new(id, delivered, state.origin.clone());
                Some(Delivery::new(m, info, self.settler.clone()))
            }
            Err((e, entry)) => {
                let reason = e.to_string();
                let record = dead_letter(state, id, &reason, delivered).for_undecodable(&entry.fields);
                state.give_up(key, reply, record, DeadLetterReason::Decode);
                state.in_flight.release(1);
                None
            }
        }
    }

    /// After close: no more reads; what the pull under way would still bring stays with the
    /// server (redelivered after `ack_wait`).
    fn stop(&mut self) {
        self.end_pulls();
    }
}
