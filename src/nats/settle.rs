//! One subscription's settlements: the ledger of what it holds and what it is writing, the
//! [`Settler`] its deliveries call, the writer task that sends the settlements to the server
//! and waits for each confirmation, and the heartbeat task (in-progress acks for what it
//! holds, the lease's renewal).
//!
//! Every settlement is confirmed by the server: naks, terms and in-progress acks each as a
//! request on the message's ack subject (what JetStream calls a double ack); acks go out at
//! once without a reply and are confirmed a batch at a time, by a request for the last of the
//! batch, on a server that takes one connection's acks in order (one not in a cluster; else
//! each is a request). A flush that returned means the acks before it were applied, and a
//! close that flushed leaves nothing acked behind. A dead
//! letter is a publish of the record to `{<topic>}-dead`, acknowledged by the stream, then a
//! `+TERM`; until the record is in, the message stays held (heartbeated) and the write is
//! retried, so at no moment is a message neither pending nor kept.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::Subject;
use async_nats::client::RequestErrorKind;
use async_nats::jetstream::AckKind;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{Notify, mpsc};

use super::lease::{Lease, Renewed};
use super::{Shared, wire};
use crate::codec::JsonCodec;
use crate::dead_letter::{self, DeadLetter};
use crate::delivery::{DeliveryInfo, Origin, SettleError, Settlement, Settler};
use crate::error::{Error, Result};
use crate::message::Message;
use crate::metrics::{DeadLetterReason, SubscriptionMetrics};
use crate::pubsub::{Flush, HealthProbe, InFlight, SubscriptionHealth};
use crate::signal::Signal;

/// A delivery's key in the ledger: its stream sequence and delivery count (a message
/// delivered again while an earlier delivery is still held is another delivery).
pub(crate) type Key = (u64, u64);

/// The most settlements one subscription has on their way to the server at once.
const MAX_WRITES: usize = 1024;

/// What a subscription holds and what it is writing.
#[derive(Default)]
pub(crate) struct Ledger {
    inner: Mutex<LedgerInner>,
    /// Woken when a write ends.
    ended: Notify,
    /// Told when a flush waits: acks sent without a reply are confirmed at once then.
    flush_wanted: Notify,
}

#[derive(Default)]
struct LedgerInner {
    /// Deliveries handed out and not settled, and dead letters not yet written: their ack
    /// subjects, for the in-progress heartbeat and the settlement.
    held: HashMap<Key, Subject>,
    /// The number the next write gets.
    next: u64,
    /// Writes under way.
    running: BTreeSet<u64>,
    /// The first write that failed since the last flush.
    error: Option<String>,
    /// Set by the subscriber's close: no write begins after it, so that the close's flush
    /// waits for every settlement that was accepted.
    closed: bool,
    /// Naks sent and not yet confirmed: the read loop waits for them before its next pull,
    /// so that a nacked message is back in the server's queue (ahead of newer ones, as on
    /// Redis) when it asks for more.
    naks: usize,
}

impl Ledger {
    fn lock(&self) -> MutexGuard<'_, LedgerInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn hold(&self, key: Key, reply: Subject) {
        self.lock().held.insert(key, reply);
    }

    fn forget(&self, key: Key) -> Option<Subject> {
        self.lock().held.remove(&key)
    }

    fn reply(&self, key: Key) -> Option<Subject> {
        self.lock().held.get(&key).cloned()
    }

    fn held_replies(&self) -> Vec<Subject> {
        self.lock().held.values().cloned().collect()
    }

    /// The number of a new write (a nak when `nak`), `None` once closed.
    fn begin(&self, nak: bool) -> Option<u64> {
        let mut inner = self.lock();
        if inner.closed {
            return None;
        }
        if nak {
            inner.naks += 1;
        }
        let n = inner.next;
        inner.next += 1;
        inner.running.insert(n);
        Some(n)
    }

    /// Refuses writes from now on; those begun before still end (and a flush waits for them).
    pub(crate) fn close(&self) {
        self.lock().closed = true;
    }

    fn end(&self, n: u64, error: Option<String>) {
        {
            let mut inner = self.lock();
            inner.running.remove(&n);
            if inner.error.is_none() {
                inner.error = error;
            }
        }
        self.ended.notify_waiters();
    }

    /// Whether a nak sent is not confirmed (or given up on) yet.
    pub(crate) fn naks_pending(&self) -> bool {
        self.lock().naks > 0
    }

    /// Waits until every nak sent so far is confirmed (or given up on).
    pub(crate) async fn naks_confirmed(&self) {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.lock().naks == 0 {
                return;
            }
            ended.await;
        }
    }

    fn nak_done(&self) {
        {
            let mut inner = self.lock();
            inner.naks = inner.naks.saturating_sub(1);
        }
        self.ended.notify_waiters();
    }

    /// Writes under way.
    pub(crate) fn unflushed(&self) -> u64 {
        self.lock().running.len() as u64
    }

    /// Waits until every write begun before the call has ended; the first that failed since
    /// the last flush is the error.
    pub(crate) async fn flush(&self) -> Result<()> {
        let target = self.lock().next;
        self.flush_wanted.notify_one();
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            {
                let mut inner = self.lock();
                if inner.running.first().is_none_or(|&n| n >= target) {
                    return match inner.error.take() {
                        None => Ok(()),
                        Some(message) => Err(Error::Connection {
                            message,
                            source: None,
                        }),
                    };
                }
            }
            ended.await;
        }
    }
}

/// A settlement on its way to the server.
pub(crate) enum Write {
    Ack(Subject),
    Nak(Subject, Duration),
    /// Publish `record`, then terminate the message (whose key it is).
    DeadLetter {
        key: Key,
        reply: Subject,
        record: Message,
    },
}

/// One subscription, as its deliveries, its reader and its subscriber's close see it.
pub(crate) struct SubState {
    pub(crate) origin: Arc<Origin>,
    pub(crate) in_flight: InFlight,
    /// The subscriber's close.
    pub(crate) closed: Signal,
    /// This subscription's end: the subscriber closed it (after its last flush) or its
    /// lease went to another holder.
    pub(crate) ended: Signal,
    /// Set when the last reference goes (the subscription and all its deliveries dropped):
    /// the heartbeat then gives the lease back.
    dropped: Signal,
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) lease: Arc<Lease>,
    pub(crate) health: Arc<Health>,
    pub(crate) metrics: SubscriptionMetrics,
    writes: mpsc::UnboundedSender<(u64, Write)>,
}

impl Drop for SubState {
    fn drop(&mut self) {
        self.dropped.cancel();
    }
}

impl SubState {
    /// The state of a new subscription, with its writer and heartbeat started in `tasks`.
    pub(crate) fn start(
        shared: Arc<Shared>,
        origin: Arc<Origin>,
        in_flight: InFlight,
        closed: Signal,
        lease: Lease,
        ack_wait: Duration,
        tasks: &tokio_util::task::TaskTracker,
    ) -> Arc<SubState> {
        let (writes, rx) = mpsc::unbounded_channel();
        let state = Arc::new(SubState {
            metrics: SubscriptionMetrics::new(origin.stream(), origin.group()),
            origin,
            in_flight,
            closed,
            ended: Signal::new(),
            dropped: Signal::new(),
            ledger: Arc::default(),
            lease: Arc::new(lease),
            health: Arc::new(Health::new(shared.client.clone())),
            writes,
        });
        let writer = Writer {
            shared: shared.clone(),
            ledger: state.ledger.clone(),
            dead_topic: dead_letter::stream_for(state.origin.stream()),
            ended: state.ended.clone(),
        };
        tasks.spawn(writer.run(rx));
        tasks.spawn(heartbeat(
            shared,
            state.ledger.clone(),
            state.lease.clone(),
            state.health.clone(),
            state.ended.clone(),
            state.dropped.clone(),
            (ack_wait / 3).max(Duration::from_millis(30)),
        ));
        state
    }

    /// Hands `write` to the writer; `false` when the subscription is closed (nothing sent).
    pub(crate) fn submit(&self, write: Write) -> bool {
        let nak = matches!(write, Write::Nak(..));
        let Some(n) = self.ledger.begin(nak) else {
            return false;
        };
        if self.writes.send((n, write)).is_err() {
            self.ledger
                .end(n, Some("the subscription's writer stopped".to_owned()));
        }
        true
    }

    /// Dead-letters a message the subscription gives up on by itself (key `key`, ack subject
    /// `reply`): the record is written, then the message terminated.
    pub(crate) fn give_up(&self, key: Key, reply: Subject, record: Message, why: DeadLetterReason) {
        self.metrics.dead_lettered(why);
        tracing::warn!(stream = self.origin.stream(), group = self.origin.group(), id = %wire::entry_id(key.0),
            reason = record.metadata().get(dead_letter::keys::REASON).unwrap_or(""), "dead-lettering");
        self.ledger.hold(key, reply.clone());
        if !self.submit(Write::DeadLetter { key, reply, record }) {
            // Closed meanwhile: it stays pending, and is given up on again when read again.
            self.ledger.forget(key);
        }
    }

    fn key(info: &DeliveryInfo) -> Key {
        (info.id().seq(), info.delivery_count())
    }
}

impl Settler for SubState {
    fn settle(
        &self,
        info: &DeliveryInfo,
        message: &Message,
        settlement: Settlement,
    ) -> std::result::Result<(), SettleError> {
        if self.closed.is_cancelled() || self.ended.is_cancelled() {
            self.release(info);
            return Err(SettleError::Closed { id: info.id() });
        }
        let key = Self::key(info);
        let write = match settlement {
            Settlement::Ack => self.ledger.forget(key).map(Write::Ack),
            Settlement::Nack { delay } => self.ledger.forget(key).map(|reply| Write::Nak(reply, delay)),
            Settlement::DeadLetter { reason } => self.ledger.reply(key).map(|reply| {
                let record = DeadLetter {
                    reason: &reason,
                    original_id: info.id(),
                    stream: self.origin.stream(),
                    group: self.origin.group(),
                    delivery_count: info.delivery_count(),
                }
                .for_message(message);
                Write::DeadLetter { key, reply, record }
            }),
        };
        if let Some(write) = write {
            let dead_letter = matches!(write, Write::DeadLetter { .. });
            if !self.submit(write) {
                // The subscriber's close came first: nothing is written.
                self.release(info);
                return Err(SettleError::Closed { id: info.id() });
            }
            if dead_letter {
                self.metrics.dead_lettered(DeadLetterReason::Handler);
            }
        }
        self.in_flight.release(1);
        Ok(())
    }

    fn release(&self, info: &DeliveryInfo) {
        // No more heartbeats: the server gives it to the group again after `ack_wait`.
        self.ledger.forget(Self::key(info));
        self.in_flight.release(1);
    }
}

/// The [`Flush`] of a subscription: its ledger, and its end (after which a flush is
/// [`Error::Closed`], as the trait says).
pub(crate) struct LedgerFlush(pub(crate) Arc<Ledger>, pub(crate) Signal);

impl Flush for LedgerFlush {
    fn flush(&self) -> futures::future::BoxFuture<'static, Result<()>> {
        let (ledger, ended) = (self.0.clone(), self.1.clone());
        Box::pin(async move {
            if ended.is_cancelled() {
                return Err(Error::Closed("subscription"));
            }
            ledger.flush().await
        })
    }
}

/// Whether one confirmation may stand for the acks sent before it: the client talks to a
/// server that is not part of a cluster (nor, as far as it says, reaches JetStream in another
/// domain through a leaf node). Across servers, an ack can be lost on a route that reconnects,
/// or with a consumer leader that moves, while a later one is answered. Looked up again after
/// each connect (the client may have gone to another server).
#[derive(Default)]
struct InOrder {
    /// The connect count it was looked up at, and what it said.
    seen: Option<(u64, bool)>,
}

impl InOrder {
    fn get(&mut self, writer: &Writer) -> bool {
        let connects = writer.connects();
        match self.seen {
            Some((at, in_order)) if at == connects => in_order,
            _ => {
                let info = writer.shared.client.server_info();
                let in_order = info.cluster.is_none() && info.domain.is_none();
                self.seen = Some((connects, in_order));
                in_order
            }
        }
    }
}

/// Acks sent without a reply each, waiting for one confirmation ([`Writer::confirm_acks`]).
#[derive(Default)]
struct Unconfirmed {
    acks: Vec<(u64, Subject)>,
    /// The client's connect count when the first was sent.
    connects: u64,
    /// When the first was sent.
    since: Option<tokio::time::Instant>,
}

/// Acks sent without a reply are confirmed at the latest this long after the first of them
/// was sent, or once there are [`CONFIRM_EVERY`] of them, or when a flush waits.
const CONFIRM_AFTER: Duration = Duration::from_millis(20);

/// See [`CONFIRM_AFTER`].
const CONFIRM_EVERY: usize = 256;

async fn sleep_until_or_never(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Sends the settlements of one subscription, several at once, each retried on its own.
struct Writer {
    shared: Arc<Shared>,
    ledger: Arc<Ledger>,
    dead_topic: String,
    ended: Signal,
}

impl Writer {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<(u64, Write)>) {
        // Naks go out several at once; dead letters one after the other, so that their
        // records keep the order the subscription gave up on the messages in. Acks are sent at
        // once without a reply each, and confirmed a batch at a time (`Unconfirmed`).
        let mut running: FuturesUnordered<futures::future::BoxFuture<'_, ()>> = FuturesUnordered::new();
        let mut dead_letters: VecDeque<(u64, Write)> = VecDeque::new();
        let mut dead_letter: Option<futures::future::BoxFuture<'_, ()>> = None;
        let mut unconfirmed = Unconfirmed::default();
        let mut confirming: Option<futures::future::BoxFuture<'_, ()>> = None;
        let mut flush_wanted = false;
        let mut in_order = InOrder::default();
        loop {
            if dead_letter.is_none()
                && let Some((n, write)) = dead_letters.pop_front()
            {
                dead_letter = Some(Box::pin(self.write(n, write)));
            }
            let confirm_at = unconfirmed
                .since
                .filter(|_| !unconfirmed.acks.is_empty())
                .map(|since| since + CONFIRM_AFTER);
            if confirming.is_none()
                && !unconfirmed.acks.is_empty()
                && (flush_wanted
                    || unconfirmed.acks.len() >= CONFIRM_EVERY
                    || confirm_at.is_some_and(|at| at <= tokio::time::Instant::now()))
            {
                flush_wanted = false;
                confirming = Some(Box::pin(self.confirm_acks(std::mem::take(&mut unconfirmed))));
            }
            let confirm_due = confirming.is_none() && confirm_at.is_some();
            tokio::select! {
                () = self.ledger.flush_wanted.notified() => flush_wanted = true,
                () = sleep_until_or_never(confirm_at), if confirm_due => {}
                next = rx.recv(), if running.len() < MAX_WRITES => match next {
                    Some((n, write @ Write::DeadLetter { .. })) => dead_letters.push_back((n, write)),
                    Some((n, Write::Ack(reply))) if in_order.get(&self) => {
                        let connects = self.connects();
                        let payload: Bytes = AckKind::Ack.into();
                        if self.shared.client.publish(reply.clone(), payload).await.is_ok() {
                            if unconfirmed.acks.is_empty() {
                                unconfirmed.connects = connects;
                                unconfirmed.since = Some(tokio::time::Instant::now());
                            }
                            unconfirmed.acks.push((n, reply));
                        } else {
                            // Not sent (the client is closing): confirmed on its own, retried.
                            running.push(Box::pin(self.write(n, Write::Ack(reply))));
                        }
                    }
                    Some((n, write)) => running.push(Box::pin(self.write(n, write))),
                    None => break,
                },
                Some(()) = running.next(), if !running.is_empty() => {}
                Some(()) = futures::future::OptionFuture::from(confirming.as_mut()), if confirming.is_some() => {
                    confirming = None;
                }
                Some(()) = futures::future::OptionFuture::from(dead_letter.as_mut()), if dead_letter.is_some() => {
                    dead_letter = None;
                }
            }
        }
        if let Some(confirmation) = confirming {
            confirmation.await;
        }
        self.confirm_acks(unconfirmed).await;
        if let Some(write) = dead_letter {
            write.await;
        }
        for (n, write) in dead_letters {
            self.write(n, write).await;
        }
        while running.next().await.is_some() {}
    }

    /// How many times the client has connected so far.
    fn connects(&self) -> u64 {
        self.shared
            .client
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Confirms acks that were sent without a reply: the last is sent again, as a request.
    /// The server takes a connection's acks of one consumer in order, so its reply says the
    /// others were taken too, unless the client connected anew since the first was sent (one
    /// may have been lost with the old connection): then, or when the request failed, each is
    /// confirmed on its own (acking a message twice does nothing more).
    async fn confirm_acks(&self, batch: Unconfirmed) {
        let Some((_, last)) = batch.acks.last() else {
            return;
        };
        let confirmed = self.confirm(last.clone(), AckKind::Ack).await;
        if confirmed.is_ok() && self.connects() == batch.connects {
            for (n, _) in batch.acks {
                self.ledger.end(n, None);
            }
            return;
        }
        // Each on its own, all at once (as acks went before batches).
        futures::stream::iter(batch.acks)
            .for_each_concurrent(MAX_WRITES, |(n, reply)| async move {
                let result = self.confirm(reply, AckKind::Ack).await;
                self.ledger.end(n, result.err());
            })
            .await;
    }

    async fn write(&self, n: u64, write: Write) {
        let result = match write {
            Write::Ack(reply) => self.confirm(reply, AckKind::Ack).await,
            Write::Nak(reply, delay) => {
                let delay = (!delay.is_zero()).then_some(delay);
                let result = self.confirm(reply, AckKind::Nak(delay)).await;
                self.ledger.nak_done();
                result
            }
            Write::DeadLetter { key, reply, record } => {
                let result = match self.write_record(&record).await {
                    Ok(()) => self.confirm(reply, AckKind::Term).await,
                    Err(e) => Err(e),
                };
                self.ledger.forget(key);
                result
            }
        };
        self.ledger.end(n, result.err());
    }

    /// Sends `kind` on the ack subject `reply` and waits for the server's confirmation,
    /// trying again a few times when it does not come.
    async fn confirm(&self, reply: Subject, kind: AckKind) -> std::result::Result<(), String> {
        let payload: Bytes = kind.into();
        let mut backoff = Duration::from_millis(50);
        let mut attempt = 1;
        loop {
            match self.shared.client.request(reply.clone(), payload.clone()).await {
                Ok(_) => return Ok(()),
                // Nobody answers on the ack subject: the consumer (or its stream) is gone,
                // and with it what there was to settle.
                Err(e) if e.kind() == RequestErrorKind::NoResponders => {
                    return Err(format!("settling on {}: the consumer is gone", self.shared.url));
                }
                Err(e) if attempt >= 5 || self.ended.is_cancelled() => {
                    return Err(format!("settling on {}: {e}", self.shared.url));
                }
                Err(e) => {
                    tracing::debug!(error = %e, attempt, "a settlement was not confirmed; sending it again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    attempt += 1;
                }
            }
        }
    }

    /// Publishes a dead-letter record, retrying until the stream takes it or the
    /// subscription ends (the message then stays pending and comes back).
    async fn write_record(&self, record: &Message) -> std::result::Result<(), String> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.try_record(record).await {
                Ok(()) => return Ok(()),
                Err(e) if self.ended.is_cancelled() => return Err(e.to_string()),
                Err(e) => {
                    tracing::warn!(stream = %self.dead_topic, error = %e, "a dead-letter record was not written; trying again");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.ended.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn try_record(&self, record: &Message) -> Result<()> {
        if !self.shared.known().contains(&self.dead_topic) {
            self.shared.ensure_stream(&self.dead_topic).await?;
        }
        let (headers, body) = wire::encode(&JsonCodec, record)?;
        let subject = wire::subject(&self.shared.options.subject_prefix, &self.dead_topic);
        let ack = self
            .shared
            .js
            .publish_with_headers(subject, headers, body)
            .await
            .map_err(|e| self.shared.failed("PUBLISH", e))?;
        match ack.await {
            Ok(_) => Ok(()),
            Err(e) => {
                // It may have been deleted since: look again next time.
                self.shared.known().remove(&self.dead_topic);
                Err(self.shared.failed("PUBLISH", e))
            }
        }
    }
}

/// Keeps what the subscription holds from being redelivered (`+WPI` every third of
/// `ack_wait`) and renews its lease; gives the lease back when the subscription is dropped.
async fn heartbeat(
    shared: Arc<Shared>,
    ledger: Arc<Ledger>,
    lease: Arc<Lease>,
    health: Arc<Health>,
    ended: Signal,
    dropped: Signal,
    progress_every: Duration,
) {
    let mut progress = tokio::time::interval(progress_every);
    let mut renew = tokio::time::interval(lease.period);
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let in_progress: Bytes = AckKind::Progress.into();
    loop {
        tokio::select! {
            _ = ended.cancelled() => return,
            _ = dropped.cancelled() => {
                lease.release().await;
                return;
            }
            _ = progress.tick() => {
                for reply in ledger.held_replies() {
                    if let Err(e) = shared.client.publish(reply, in_progress.clone()).await {
                        tracing::debug!(error = %e, "an in-progress ack was not sent");
                    }
                }
            }
            _ = renew.tick() => match lease.renew().await {
                Ok(Renewed::Held) => health.lease(None),
                Ok(Renewed::Lost) => {
                    tracing::warn!("this consumer's name was taken over by another process (its lease ran out); the subscription ends");
                    health.lease(Some("the lease was taken over".to_owned()));
                    ended.cancel();
                    return;
                }
                Err(e) => health.lease(Some(format!("the lease could not be renewed: {e}"))),
            },
        }
    }
}

/// The subscription's health: the connection, its reads, its lease.
pub(crate) struct Health {
    client: async_nats::Client,
    problem: Mutex<HealthProblems>,
}

#[derive(Default)]
struct HealthProblems {
    read: Option<String>,
    lease: Option<String>,
}

impl Health {
    fn new(client: async_nats::Client) -> Self {
        Health {
            client,
            problem: Mutex::default(),
        }
    }

    fn problems(&self) -> MutexGuard<'_, HealthProblems> {
        self.problem.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A read failed (`Some`), or went through (`None`).
    pub(crate) fn read(&self, problem: Option<String>) {
        self.problems().read = problem;
    }

    fn lease(&self, problem: Option<String>) {
        self.problems().lease = problem;
    }
}

impl HealthProbe for Health {
    fn health(&self) -> SubscriptionHealth {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return SubscriptionHealth::Degraded {
                reason: "not connected to the NATS server".to_owned(),
            };
        }
        let problems = self.problems();
        match problems.read.as_ref().or(problems.lease.as_ref()) {
            Some(reason) => SubscriptionHealth::Degraded {
                reason: reason.clone(),
            },
            None => SubscriptionHealth::Ready,
        }
    }
}
