//! [`PartitionedSubscriber`]: a member of a consumer group on a partitioned topic, which owns
//! the partitions rendezvous hashing gives it, reads them as one subscription, and hands them
//! over when the group changes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, SelectAll};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;

use crate::lock;
use tokio_util::task::TaskTracker;

use super::{
    Membership, PARTITION_CONSUMER, PartitionCoordinator, assigned_to, partition_stream, validate_topic,
};
use crate::delivery::Delivery;
use crate::error::{Error, Result};
use crate::pubsub::{
    FlushHandle, HealthHandle, HealthProbe, InFlight, SubscribeOptions, Subscriber, Subscription,
    SubscriptionHealth,
};
use crate::signal::Signal;

/// The settings of a [`PartitionedSubscriber`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionOptions {
    /// How long a member's record lives without a heartbeat; members beat every third of it.
    /// A member that stopped is left out of the assignment this long after its last beat.
    /// Default 10 s; 300 ms to 1 hour.
    pub member_ttl: Duration,
    /// How many of a member's partitions read on connections of their own, with blocking
    /// reads (Redis). The partitions it takes past these read in turn, without blocking, on
    /// one connection per server node that the subscriber shares, polled every 100 ms when
    /// they have nothing new: so a process holds at most this many read connections per
    /// member, plus one per node, however many partitions it owns. Default 16; at most 1024.
    pub dedicated_readers: usize,
    /// How long a member that hands a partition off lets the deliveries it has out of that
    /// partition finish. It stops reading the partition at once; past this deadline, a
    /// settlement of the partition's deliveries is refused (their entries go to the next
    /// owner, which handles them again) and the partition is released, so that a stuck
    /// handler cannot hold a partition for ever. Default 30 s; 100 ms to 1 hour.
    pub handoff_deadline: Duration,
}

impl Default for PartitionOptions {
    fn default() -> Self {
        PartitionOptions {
            member_ttl: Duration::from_secs(10),
            dedicated_readers: 16,
            handoff_deadline: Duration::from_secs(30),
        }
    }
}

impl PartitionOptions {
    /// How long a member's record lives without a heartbeat. Default 10 s.
    #[must_use]
    pub fn member_ttl(mut self, ttl: Duration) -> Self {
        self.member_ttl = ttl;
        self
    }

    /// How many of a member's partitions read on connections of their own. Default 16.
    #[must_use]
    pub fn dedicated_readers(mut self, n: usize) -> Self {
        self.dedicated_readers = n;
        self
    }

    /// How long the deliveries of a partition handed off may take to finish. Default 30 s.
    #[must_use]
    pub fn handoff_deadline(mut self, deadline: Duration) -> Self {
        self.handoff_deadline = deadline;
        self
    }

    /// Checks the options.
    pub fn validate(&self) -> Result<()> {
        let (shortest, longest) = (Duration::from_millis(100), Duration::from_secs(3600));
        if self.handoff_deadline < shortest || self.handoff_deadline > longest {
            return Err(Error::invalid(
                "handoff_deadline",
                format_args!(
                    "{:?} is not between {shortest:?} and {longest:?}",
                    self.handoff_deadline
                ),
            ));
        }
        if self.dedicated_readers > 1024 {
            return Err(Error::invalid(
                "dedicated_readers",
                format_args!("{} is more than 1024", self.dedicated_readers),
            ));
        }
        let (least, most) = (Duration::from_millis(300), Duration::from_secs(3600));
        if self.member_ttl < least || self.member_ttl > most {
            return Err(Error::invalid(
                "member_ttl",
                format_args!("{:?} is not between {least:?} and {most:?}", self.member_ttl),
            ));
        }
        Ok(())
    }
}

/// A [`Subscriber`] for partitioned topics. Subscribing to one makes this process a member of
/// the group: the subscription delivers the entries of the partitions the member owns, which
/// change as members come and go (see [the module](super)). Topics that are not partitioned
/// pass through to the subscriber it wraps, so it can stand wherever a subscriber goes (a
/// router's, a CQRS bus's).
///
/// The consumer name of the [`SubscribeOptions`] is the member's name, unique in its group;
/// `max_in_flight` bounds the deliveries out across all the member's partitions, `batch_size`,
/// `block`, `start_from`, `create_group` and `max_deliveries` apply to each partition, and
/// `reclaim` is not used (a partition's next owner takes its pending entries over).
///
/// Keep `max_in_flight` at least the number of partitions a member may own: each partition
/// waiting for new entries holds a share of the limit.
pub struct PartitionedSubscriber {
    inner: Arc<dyn Subscriber>,
    coordinator: Arc<dyn PartitionCoordinator>,
    options: PartitionOptions,
    declared: HashMap<String, u32>,
    closed: Signal,
    tasks: TaskTracker,
}

impl std::fmt::Debug for PartitionedSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionedSubscriber")
            .field("options", &self.options)
            .field("declared", &self.declared)
            .finish_non_exhaustive()
    }
}

impl PartitionedSubscriber {
    /// Subscribes through `inner`, with the partition counts and group members `coordinator`
    /// keeps (the same backend's).
    pub fn new(inner: Arc<dyn Subscriber>, coordinator: Arc<dyn PartitionCoordinator>) -> Self {
        PartitionedSubscriber {
            inner,
            coordinator,
            options: PartitionOptions::default(),
            declared: HashMap::new(),
            closed: Signal::new(),
            tasks: TaskTracker::new(),
        }
    }

    /// Sets the options; invalid ones are reported by `subscribe`.
    #[must_use]
    pub fn options(mut self, options: PartitionOptions) -> Self {
        self.options = options;
        self
    }

    /// Declares `topic` with `partitions`: created so when it has no count yet, and
    /// [`Error::PartitionMismatch`] from `subscribe` when it has another.
    #[must_use]
    pub fn topic(mut self, topic: &str, partitions: u32) -> Self {
        self.declared.insert(topic.to_owned(), partitions);
        self
    }

    async fn partitions(&self, topic: &str) -> Result<Option<u32>> {
        let declared = self.declared.get(topic).copied();
        super::resolve_count(&*self.coordinator, topic, declared).await
    }

    async fn start(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        if self.closed.is_cancelled() {
            return Err(Error::Closed("subscriber"));
        }
        options.validate(topic)?;
        self.options.validate()?;
        let Some(partitions) = self.partitions(topic).await? else {
            return self.inner.subscribe(topic, options).await;
        };
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (ended_tx, ended_rx) = mpsc::unbounded_channel();
        let dropped = Signal::new();
        let flushes = Arc::new(Mutex::new(HashMap::new()));
        let healths = Arc::new(Mutex::new(HashMap::new()));
        let member_issue: Arc<Mutex<Option<String>>> = Arc::default();
        let member = Member {
            inner: self.inner.clone(),
            coordinator: self.coordinator.clone(),
            topic: topic.to_owned(),
            partitions,
            in_flight: InFlight::new(options.max_in_flight),
            share: Arc::new(AtomicUsize::new(options.max_in_flight)),
            options,
            ttl: self.options.member_ttl,
            dedicated_readers: self.options.dedicated_readers,
            handoff_deadline: self.options.handoff_deadline,
            token: uuid::Uuid::now_v7().to_string(),
            control: control_tx,
            ended: ended_rx,
            issue: member_issue.clone(),
        };
        self.tasks.spawn(member.run(self.closed.clone(), dropped.clone()));
        let merged = Merged {
            control: control_rx,
            control_open: true,
            reported: VecDeque::new(),
            parts: SelectAll::new(),
            cursor: 0,
            aborts: HashMap::new(),
            flushes: flushes.clone(),
            healths: healths.clone(),
            ended: ended_tx,
            _dropped: CancelOnDrop(dropped),
        };
        Ok(Subscription::from_buffered(merged)
            .with_flush(Arc::new(FlushAll(flushes)))
            .with_health(Arc::new(WorstHealth {
                member: member_issue,
                partitions: healths,
            })))
    }
}

impl Subscriber for PartitionedSubscriber {
    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<Subscription>> {
        Box::pin(self.start(topic, options))
    }

    fn unflushed(&self) -> u64 {
        self.inner.unflushed()
    }

    /// Deletes a partitioned topic's partition streams (with their groups, pending lists and
    /// keys) and its partition count; other topics pass through.
    fn delete_topic<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let partitions = match validate_topic(topic) {
                Ok(()) => self.coordinator.partitions(topic).await?,
                Err(_) => None,
            };
            let Some(partitions) = partitions else {
                return self.inner.delete_topic(topic).await;
            };
            for p in 0..partitions {
                self.inner.delete_topic(&partition_stream(topic, p)).await?;
            }
            self.coordinator.delete_partitions(topic).await
        })
    }

    /// Stops every member (each leaves its group, so the others take its partitions over at
    /// once), then closes the wrapped subscriber, which flushes.
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.closed.cancel();
        self.tasks.close();
        Box::pin(async move {
            self.tasks.wait().await;
            self.inner.close().await
        })
    }
}

/// What the member task tells the merged stream.
enum Control {
    /// A partition is owned now: read it.
    Add(u32, Subscription),
    /// A partition went to another member: stop reading it.
    Remove(u32),
    /// A problem to report on the subscription.
    Error(Error),
}

/// One member of a group: heartbeats, computes its partitions, takes and gives them up.
struct Member {
    inner: Arc<dyn Subscriber>,
    coordinator: Arc<dyn PartitionCoordinator>,
    topic: String,
    partitions: u32,
    options: SubscribeOptions,
    in_flight: InFlight,
    /// The most slots one read of a partition takes: the member's limit over its partitions.
    share: Arc<AtomicUsize>,
    ttl: Duration,
    /// How many partitions read on connections of their own.
    dedicated_readers: usize,
    /// How long the deliveries of a partition handed off may take.
    handoff_deadline: Duration,
    token: String,
    control: mpsc::UnboundedSender<Control>,
    /// Partitions whose subscription ended by itself (its lease was lost, say).
    ended: mpsc::UnboundedReceiver<u32>,
    /// What keeps the member from working, for its health: a failing heartbeat, its name
    /// held by another process.
    issue: Arc<Mutex<Option<String>>>,
}

type Acquiring = FuturesUnordered<BoxFuture<'static, (u32, Result<Subscription>)>>;

impl Member {
    async fn run(mut self, closed: Signal, dropped: Signal) {
        let beat = self.ttl / 3;
        // How soon a partition another member still holds is asked for again.
        let retry = beat.min(Duration::from_millis(250));
        let mut owned: HashSet<u32> = HashSet::new();
        let mut pending: HashSet<u32> = HashSet::new();
        // The partitions (owned or being taken) that read on connections of their own.
        let mut dedicated: HashSet<u32> = HashSet::new();
        // What abandons each partition's subscription (owned or being taken).
        let mut abandons: HashMap<u32, Signal> = HashMap::new();
        let mut acquiring = Acquiring::new();
        let mut target: Vec<u32> = Vec::new();
        let mut next_beat = tokio::time::Instant::now();
        let mut next_retry: Option<tokio::time::Instant> = None;
        let mut failing_since: Option<tokio::time::Instant> = None;
        let mut taken_since: Option<tokio::time::Instant> = None;
        loop {
            let now = tokio::time::Instant::now();
            if now >= next_beat {
                next_beat = now + beat;
                match self.beat().await {
                    Ok(Some(members)) => {
                        failing_since = None;
                        taken_since = None;
                        *lock(&self.issue) = None;
                        target = assigned_to(&self.options.consumer, &members, self.partitions);
                    }
                    Ok(None) => {
                        // A process that died under this name (a restart after a crash) leaves
                        // a record that runs out within a TTL; one that stays longer is live.
                        let since = *taken_since.get_or_insert(now);
                        if since.elapsed() > self.ttl + beat {
                            let _ = self.control.send(Control::Error(Error::ConsumerActive {
                                stream: self.topic.clone(),
                                group: self.options.group.clone(),
                                consumer: self.options.consumer.clone(),
                            }));
                            break;
                        }
                        if since == now {
                            tracing::info!(topic = %self.topic, member = %self.options.consumer, "member name held; waiting to see whether its holder is alive");
                        }
                        *lock(&self.issue) =
                            Some("the member name is held by another process; waiting".into());
                    }
                    Err(e) => {
                        *lock(&self.issue) = Some(format!("group membership heartbeat failing: {e}"));
                        let since = *failing_since.get_or_insert(now);
                        tracing::warn!(topic = %self.topic, group = %self.options.group, error = %e, "group membership heartbeat failed");
                        if since.elapsed() >= self.ttl {
                            // The others count this member gone by now: give its partitions up.
                            target.clear();
                        }
                    }
                }
                let wanted = target.len().max(1);
                self.share.store(
                    (self.options.max_in_flight / wanted).max(1),
                    std::sync::atomic::Ordering::Relaxed,
                );
                for p in owned
                    .iter()
                    .copied()
                    .filter(|p| !target.contains(p))
                    .collect::<Vec<_>>()
                {
                    owned.remove(&p);
                    dedicated.remove(&p);
                    tracing::info!(topic = %self.topic, partition = p, member = %self.options.consumer, "partition handed off");
                    let _ = self.control.send(Control::Remove(p));
                    self.abandon_after_deadline(abandons.remove(&p));
                }
            }
            if next_retry.is_none_or(|at| now >= at) {
                next_retry = None;
                for &p in &target {
                    if !owned.contains(&p) && pending.insert(p) {
                        let own_reader = dedicated.len() < self.dedicated_readers;
                        if own_reader {
                            dedicated.insert(p);
                        }
                        let abandon = Signal::new();
                        abandons.insert(p, abandon.clone());
                        acquiring.push(self.acquire(p, own_reader, abandon));
                    }
                }
            }
            let wake = next_retry.map_or(next_beat, |at| at.min(next_beat));
            tokio::select! {
                biased;
                _ = closed.cancelled() => break,
                _ = dropped.cancelled() => break,
                Some(p) = self.ended.recv() => {
                    owned.remove(&p);
                    dedicated.remove(&p);
                    // Its lease went to another member: the settlements of its deliveries
                    // still go to its flusher, which the fence refuses, until the deadline.
                    self.abandon_after_deadline(abandons.remove(&p));
                    next_retry.get_or_insert(tokio::time::Instant::now() + retry);
                }
                Some((p, result)) = acquiring.next(), if !acquiring.is_empty() => {
                    pending.remove(&p);
                    if !(result.is_ok() && target.contains(&p)) {
                        dedicated.remove(&p);
                        if let Some(abandon) = abandons.remove(&p) {
                            abandon.cancel();
                        }
                    }
                    match result {
                        Ok(subscription) if target.contains(&p) => {
                            tracing::info!(topic = %self.topic, partition = p, member = %self.options.consumer, "partition taken");
                            owned.insert(p);
                            let _ = self.control.send(Control::Add(p, subscription));
                        }
                        // Assigned elsewhere meanwhile: dropping it gives it up again.
                        Ok(_) => {}
                        // The previous owner still finishes its deliveries.
                        Err(Error::ConsumerActive { .. }) => {
                            next_retry.get_or_insert(tokio::time::Instant::now() + retry);
                        }
                        Err(e) => {
                            next_retry.get_or_insert(tokio::time::Instant::now() + retry);
                            let _ = self.control.send(Control::Error(e));
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
        // Stop reading everything; the partitions are released as their deliveries settle,
        // or at the hand-off deadline.
        for p in owned {
            let _ = self.control.send(Control::Remove(p));
            self.abandon_after_deadline(abandons.remove(&p));
        }
        drop(acquiring);
        for (_, abandon) in abandons {
            abandon.cancel();
        }
        let left = self
            .coordinator
            .leave(
                &self.topic,
                &self.options.group,
                &self.options.consumer,
                &self.token,
            )
            .await;
        if let Err(e) = left {
            tracing::warn!(topic = %self.topic, error = %e, "leaving the group failed; the member's record expires by itself");
        }
    }

    /// One heartbeat: the live members, or `None` when another process has this member name.
    async fn beat(&self) -> Result<Option<Vec<String>>> {
        let membership = self
            .coordinator
            .heartbeat(
                &self.topic,
                &self.options.group,
                &self.options.consumer,
                &self.token,
                self.ttl,
            )
            .await?;
        Ok(match membership {
            Membership::Live(members) => Some(members),
            Membership::Taken => None,
        })
    }

    /// Abandons a partition's subscription at the hand-off deadline, if its deliveries have
    /// not all settled by then (else it is a no-op).
    fn abandon_after_deadline(&self, abandon: Option<Signal>) {
        if let Some(abandon) = abandon {
            let deadline = self.handoff_deadline;
            tokio::spawn(async move {
                tokio::time::sleep(deadline).await;
                abandon.cancel();
            });
        }
    }

    /// Subscribes to partition `p` as its owner, reading on a connection of its own when
    /// `own_reader`; `abandon` ends the subscription whatever its deliveries are doing.
    fn acquire(
        &self,
        p: u32,
        own_reader: bool,
        abandon: Signal,
    ) -> BoxFuture<'static, (u32, Result<Subscription>)> {
        let inner = self.inner.clone();
        let stream = partition_stream(&self.topic, p);
        let mut options = self.options.clone();
        options.member = Some(std::mem::replace(
            &mut options.consumer,
            PARTITION_CONSUMER.to_owned(),
        ));
        options.reclaim = None;
        options.in_flight = Some(self.in_flight.share(self.share.clone()));
        options.fenced = true;
        options.shared_read = !own_reader;
        options.abandon = Some(crate::pubsub::Abandon(abandon));
        Box::pin(async move { (p, inner.subscribe(&stream, options).await) })
    }
}

/// An item of one partition's stream: a delivery, or the end of the stream.
enum PartItem {
    Item(Result<Delivery>),
    Ended(u32),
}

/// Stops one partition's part of the merged stream: the merged stream drops it when next
/// polled, which the abort wakes it for.
#[derive(Default)]
struct PartAbort {
    aborted: std::sync::atomic::AtomicBool,
    waker: futures::task::AtomicWaker,
}

impl PartAbort {
    fn abort(&self) {
        self.aborted.store(true, std::sync::atomic::Ordering::Release);
        self.waker.wake();
    }

    fn is_aborted(&self) -> bool {
        self.aborted.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// One partition's subscription in the merged stream: its items, then `Ended` once; nothing
/// once aborted (given up).
struct PartStream {
    partition: u32,
    subscription: Subscription,
    ended: bool,
    abort: Arc<PartAbort>,
}

impl PartStream {
    fn take_buffered(&mut self) -> Option<Delivery> {
        if self.ended || self.abort.is_aborted() {
            return None;
        }
        self.subscription.take_buffered()
    }
}

impl Stream for PartStream {
    type Item = PartItem;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<PartItem>> {
        self.abort.waker.register(cx.waker());
        if self.ended || self.abort.is_aborted() {
            return Poll::Ready(None);
        }
        match std::task::ready!(self.subscription.poll_next_unpin(cx)) {
            Some(item) => Poll::Ready(Some(PartItem::Item(item))),
            None => {
                self.ended = true;
                Poll::Ready(Some(PartItem::Ended(self.partition)))
            }
        }
    }
}

/// The deliveries of every partition the member owns, as one stream.
struct Merged {
    control: mpsc::UnboundedReceiver<Control>,
    control_open: bool,
    /// Errors the member task reported, for the next polls (found while controls were
    /// applied ahead of deliveries).
    reported: VecDeque<Error>,
    parts: SelectAll<PartStream>,
    /// Where the last buffered delivery was taken: the next look starts there, so that a
    /// partition's batch is drained without scanning the others for each delivery.
    cursor: usize,
    aborts: HashMap<u32, Arc<PartAbort>>,
    flushes: Arc<Mutex<HashMap<u32, FlushHandle>>>,
    healths: Arc<Mutex<HashMap<u32, HealthHandle>>>,
    ended: mpsc::UnboundedSender<u32>,
    _dropped: CancelOnDrop,
}

impl Merged {
    fn add(&mut self, p: u32, subscription: Subscription) {
        lock(&self.flushes).insert(p, subscription.flush_handle());
        lock(&self.healths).insert(p, subscription.health_handle());
        let abort = Arc::new(PartAbort::default());
        self.parts.push(PartStream {
            partition: p,
            subscription,
            ended: false,
            abort: abort.clone(),
        });
        if let Some(old) = self.aborts.insert(p, abort) {
            old.abort();
        }
    }

    fn remove(&mut self, p: u32) {
        if let Some(handle) = self.aborts.remove(&p) {
            handle.abort();
        }
        lock(&self.flushes).remove(&p);
        lock(&self.healths).remove(&p);
    }

    /// Applies what the member task sent: partitions taken and given up, an error.
    fn apply(&mut self, control: Control) {
        match control {
            Control::Add(p, subscription) => self.add(p, subscription),
            Control::Remove(p) => self.remove(p),
            Control::Error(e) => self.reported.push_back(e),
        }
    }
}

impl Stream for Merged {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        while this.control_open {
            match this.control.poll_recv(cx) {
                Poll::Ready(Some(control)) => this.apply(control),
                Poll::Ready(None) => this.control_open = false,
                Poll::Pending => break,
            }
        }
        if let Some(e) = this.reported.pop_front() {
            return Poll::Ready(Some(Err(e)));
        }
        loop {
            match this.parts.poll_next_unpin(cx) {
                Poll::Ready(Some(PartItem::Item(item))) => return Poll::Ready(Some(item)),
                Poll::Ready(Some(PartItem::Ended(p))) => {
                    this.aborts.remove(&p);
                    lock(&this.flushes).remove(&p);
                    lock(&this.healths).remove(&p);
                    let _ = this.ended.send(p);
                }
                // No partition right now: the member task adds them, or ends.
                Poll::Ready(None) if this.control_open => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl crate::pubsub::Buffered for Merged {
    fn take_buffered(&mut self) -> Option<Delivery> {
        // What the member task sent comes first, as in a poll: a partition given up hands
        // out nothing more.
        while self.control_open {
            match self.control.try_recv() {
                Ok(control) => self.apply(control),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => self.control_open = false,
            }
        }
        if !self.reported.is_empty() {
            return None;
        }
        // From the cursor to the end, then from the start up to it.
        let cursor = self.cursor;
        let found = self
            .parts
            .iter_mut()
            .enumerate()
            .skip(cursor)
            .find_map(|(at, part)| part.take_buffered().map(|d| (at, d)))
            .or_else(|| {
                self.parts
                    .iter_mut()
                    .take(cursor)
                    .enumerate()
                    .find_map(|(at, part)| part.take_buffered().map(|d| (at, d)))
            });
        if let Some((at, delivery)) = found {
            self.cursor = at;
            return Some(delivery);
        }
        None
    }
}

/// Stops the member task when the subscription is dropped.
struct CancelOnDrop(Signal);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Flushes every partition the member reads.
struct FlushAll(Arc<Mutex<HashMap<u32, FlushHandle>>>);

impl crate::pubsub::Flush for FlushAll {
    fn flush(&self) -> BoxFuture<'static, Result<()>> {
        let handles: Vec<FlushHandle> = lock(&self.0).values().cloned().collect();
        Box::pin(async move {
            for result in futures::future::join_all(handles.iter().map(FlushHandle::flush)).await {
                result?;
            }
            Ok(())
        })
    }
}

/// The health of a member's subscription: what keeps the member itself from working, else
/// the first partition that is not ready, if any.
struct WorstHealth {
    member: Arc<Mutex<Option<String>>>,
    partitions: Arc<Mutex<HashMap<u32, HealthHandle>>>,
}

impl HealthProbe for WorstHealth {
    fn health(&self) -> SubscriptionHealth {
        if let Some(reason) = lock(&self.member).clone() {
            return SubscriptionHealth::Degraded { reason };
        }
        let mut parts: Vec<(u32, HealthHandle)> = lock(&self.partitions)
            .iter()
            .map(|(p, h)| (*p, h.clone()))
            .collect();
        parts.sort_by_key(|(p, _)| *p);
        for (p, handle) in parts {
            if let SubscriptionHealth::Degraded { reason } = handle.health() {
                return SubscriptionHealth::Degraded {
                    reason: format!("partition {p}: {reason}"),
                };
            }
        }
        SubscriptionHealth::Ready
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use futures::StreamExt;

    use super::PartitionedSubscriber;
    use crate::memory::MemoryBackend;
    use crate::partition::{PartitionCoordinator, partition_stream};
    use crate::{Error, Message, Publisher, SubscribeOptions, Subscriber};

    const WAIT: Duration = Duration::from_secs(10);

    /// The errors of partitions that cannot be read come out of the merged stream one by one,
    /// and the partitions that can be read go on: through a poll, and through the buffered
    /// deliveries the router takes without one.
    #[tokio::test]
    async fn a_partition_that_cannot_be_read_reports_and_the_others_go_on() {
        let backend = MemoryBackend::new();
        let coordinator = Arc::new(backend.coordinator());
        coordinator.create_partitions("t", 2).await.unwrap();
        let publisher = backend.publisher();
        let readable = partition_stream("t", 0);
        let batch = (0..5u32).map(|n| Message::new("n", &n).unwrap()).collect();
        publisher.publish_batch(&readable, batch).await.unwrap();
        publisher
            .publish(&partition_stream("t", 1), Message::new("n", &99).unwrap())
            .await
            .unwrap();
        // The group exists on partition 0 only.
        let other = backend.subscriber();
        drop(
            other
                .subscribe(&readable, SubscribeOptions::new("g", "other").batch_size(1))
                .await
                .unwrap(),
        );
        other.close().await.unwrap();

        let subscriber = PartitionedSubscriber::new(Arc::new(backend.subscriber()), coordinator);
        let options = SubscribeOptions::new("g", "m")
            .create_group(false)
            .batch_size(5)
            .max_in_flight(5);
        let mut merged = subscriber.subscribe("t", options).await.unwrap();
        let (mut seen, mut errors) = (Vec::new(), 0);
        while seen.len() < 5 {
            let item = tokio::time::timeout(WAIT, merged.next())
                .await
                .expect("an item in time")
                .expect("open");
            match item {
                Ok(delivery) => {
                    seen.push(delivery.message().decode::<u32>().unwrap());
                    delivery.ack().await.unwrap();
                    // What partition 0's read brought with it is taken without a poll.
                    while let Some(buffered) = merged.take_buffered() {
                        seen.push(buffered.message().decode::<u32>().unwrap());
                        buffered.ack().await.unwrap();
                    }
                }
                Err(Error::GroupNotFound { stream, .. }) => {
                    assert_eq!(stream, partition_stream("t", 1));
                    errors += 1;
                }
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(seen, [0, 1, 2, 3, 4]);
        // The member keeps trying partition 1, and says so each time.
        while errors < 2 {
            match tokio::time::timeout(WAIT, merged.next()).await.expect("in time") {
                Some(Err(Error::GroupNotFound { .. })) => errors += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        subscriber.close().await.unwrap();
    }
}
