//! [`RedisSubscriber`]: consumer-group subscriptions on Redis Streams.
//!
//! Each subscription reads on a connection of its own with `XREADGROUP COUNT n BLOCK t` (a
//! blocking read would stall a shared connection), with a response timeout above `BLOCK`. On
//! start and after every read error it first drains its own pending list, then reads `>`;
//! entries it owns already are never handed out twice. Acks and dead letters go to a flusher
//! task, the one writer of settlements, which also records the checkpoint. A nacked entry
//! waits in the subscription's ledger and is claimed back when due, if this consumer still
//! owns it. A heartbeat task keeps the consumer's lease and the entries it holds alive.
//!
//! The map of this module (this file wires them together for each subscription):
//!
//! | Module | Owns |
//! |---|---|
//! | [`options`] | [`RedisSubscriberOptions`], their limits and validation |
//! | [`stats`] | [`SubscriberStats`] and [`StatsSnapshot`] |
//! | [`group`] | the subscription's consumer group: ensured on start, re-created at its checkpoint |
//! | [`lease`] | the consumer lease: acquire, extend, release |
//! | [`heartbeat`] | the task that renews the lease and touches owned entries |
//! | [`lanes`] | read connections shared by subscriptions that read without blocking |
//! | [`health`] | the subscription's health, from its reads and lease renewals |
//! | [`shared`] | the state a subscription shares with its deliveries and tasks: ledger, capacity, settling |
//! | [`plan`] | the read loop's decisions: the next step, block time, read-ahead, drain cursor |
//! | [`read_loop`] | the reader: takes capacity, sends each step's commands, admits entries |
//! | [`flusher`] | the task that writes acks, dead letters and checkpoints |
//! | [`member_tasks`] | one task per group member, in which its partitions' flushers run |
//! | [`warnings`] | repeated warnings logged once with a count |

mod flusher;
mod group;
mod health;
mod heartbeat;
mod lanes;
mod lease;
mod member_tasks;
mod options;
mod plan;
mod read_loop;
mod shared;
mod stats;
mod warnings;

use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use self::flusher::Flusher;
use self::heartbeat::Heartbeat;
use self::lease::Lease;
use self::read_loop::Reader;
use self::shared::{Ledger, Op, Shared};
use crate::checkpoint::CheckpointStore;
use crate::delivery::Origin;
use crate::error::{Error, Result};
use crate::pubsub::{SubscribeOptions, Subscriber, Subscription};
use crate::redis::connection::RedisConnection;
use crate::signal::Signal;

pub use self::options::{Checkpoints, MAX_ACK_FLUSH_INTERVAL, MAX_LEASE_TTL, RedisSubscriberOptions};
pub use self::stats::{StatsSnapshot, SubscriberStats};

/// Subscribes to Redis streams in consumer groups.
pub struct RedisSubscriber {
    conn: RedisConnection,
    options: RedisSubscriberOptions,
    store: Option<Arc<dyn CheckpointStore>>,
    closed: Signal,
    /// Every subscription's flusher and heartbeat, waited for on close.
    tasks: TaskTracker,
    stats: Arc<SubscriberStats>,
    /// Every subscription's ledger, for [`Subscriber::unflushed`].
    ledgers: Mutex<Vec<std::sync::Weak<Mutex<Ledger>>>>,
    /// The read connections shared by the subscriptions that read without blocking.
    lanes: lanes::ReadLanes,
    /// The flushers of a member's partitions, run in one task per member.
    member_tasks: member_tasks::MemberTasks,
}

impl std::fmt::Debug for RedisSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSubscriber")
            .field("conn", &self.conn)
            .field("options", &self.options)
            .field("closed", &self.closed.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl RedisSubscriber {
    /// A subscriber on `conn`. Fails when an option is invalid.
    pub fn new(conn: RedisConnection, options: RedisSubscriberOptions) -> Result<Self> {
        options.validate()?;
        Ok(RedisSubscriber {
            store: options.open_store(&conn),
            conn,
            options,
            closed: Signal::new(),
            tasks: TaskTracker::new(),
            stats: Arc::new(SubscriberStats::default()),
            ledgers: Mutex::new(Vec::new()),
            lanes: lanes::ReadLanes::default(),
            member_tasks: member_tasks::MemberTasks::default(),
        })
    }

    /// What this subscriber had to deal with so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    async fn start(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        if self.closed.is_cancelled() {
            return Err(Error::Closed("subscriber"));
        }
        options.validate(topic)?;
        let origin = Arc::new(
            Origin::new(topic, options.group.as_str(), options.consumer.as_str()).with_system(super::SYSTEM),
        );
        if crate::partition::parse_partition_stream(topic).is_none() {
            crate::redis::coordinator::refuse_partitioned(&self.conn, topic).await?;
        }
        group::ensure(&self.conn, self.store.as_deref(), &origin, &options).await?;
        let lease = Lease::acquire(
            &self.conn,
            &origin,
            self.options.lease_ttl,
            options.member.as_deref(),
        )
        .await?;

        let ledger = Arc::new(Mutex::new(Ledger::default()));
        {
            let mut ledgers = self.ledgers.lock().unwrap_or_else(|p| p.into_inner());
            ledgers.retain(|l| l.strong_count() > 0);
            ledgers.push(Arc::downgrade(&ledger));
        }
        let (ops_tx, ops_rx) = mpsc::unbounded_channel();
        let ops_weak = ops_tx.downgrade();
        let released = Signal::new();
        let lease_lost = Signal::new();
        // What ends this subscription's reads, settlements, flusher and heartbeat: the
        // subscriber's close, or its abandonment (a partition handed off past its deadline).
        let stop = match &options.abandon {
            None => self.closed.clone(),
            Some(abandon) => {
                let (stop, abandon, closed) = (Signal::new(), abandon.0.clone(), self.closed.clone());
                let (stopping, gone) = (stop.clone(), released.clone());
                self.tasks.spawn(async move {
                    tokio::select! {
                        _ = closed.cancelled() => stopping.cancel(),
                        _ = abandon.cancelled() => stopping.cancel(),
                        // Everything settled and dropped: nothing left to stop.
                        _ = gone.cancelled() => {}
                    }
                });
                stop
            }
        };
        let shared = Arc::new(Shared::new(
            self.conn.clone(),
            origin.clone(),
            options.in_flight_limit(),
            ledger.clone(),
            ops_tx,
            stop.clone(),
            released.clone(),
        ));
        let flusher = Flusher::new(
            ledger,
            self.conn.clone(),
            origin,
            self.store.clone(),
            self.stats.clone(),
            self.options.codec.clone(),
            self.options.ack_flush_interval,
        )
        .fenced(options.fenced.then(|| lease.clone()));
        let health = shared.health().clone();
        let heartbeat = Heartbeat::new(
            lease.clone(),
            Arc::downgrade(&shared),
            lease_lost.clone(),
            health.clone(),
        );
        // The lease is released only after the last acks are written: the next holder of the
        // name (a partition's next owner) then finds them acknowledged, not pending.
        let flushed = Signal::new();
        let (flusher_done, closed) = (flushed.clone(), stop.clone());
        let flushing = async move {
            // Set however the flusher ends (a panic included), or the heartbeat would hold
            // the lease, and close would wait, forever.
            let _done = CancelOnDrop(flusher_done);
            flusher.run(ops_rx, closed).await;
        };
        match options.member.as_deref() {
            // A member's partitions settle together: their flushers share one task.
            Some(member) => self
                .member_tasks
                .run(&self.tasks, options.group.as_str(), member, flushing),
            None => {
                self.tasks.spawn(flushing);
            }
        }
        // Every subscription of a topic moves its due delayed messages into it.
        self.tasks.spawn(crate::redis::scheduled::move_due(
            self.conn.clone(),
            topic.to_owned(),
            stop.clone(),
            released.clone(),
        ));
        self.tasks.spawn(heartbeat.run(stop, released, flushed));
        let lanes = options.shared_read.then(|| self.lanes.clone());
        let reader = Reader::new(
            shared,
            lease,
            lease_lost,
            options,
            &self.options,
            self.store.clone(),
            self.stats.clone(),
        )
        .reading_on(lanes);
        let flush = Arc::new(FlushAcks(ops_weak));
        Ok(Subscription::from_reader(reader)
            .with_flush(flush)
            .with_health(health))
    }
}

/// Sets its signal when dropped.
struct CancelOnDrop(Signal);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// [`Subscription::flush`] for a Redis subscription: a request to its flusher, in line with
/// the acks sent before it. Holds no sender, so it keeps neither flusher nor lease alive.
struct FlushAcks(mpsc::WeakUnboundedSender<Op>);

impl crate::pubsub::Flush for FlushAcks {
    fn flush(&self) -> BoxFuture<'static, Result<()>> {
        let ops = self.0.upgrade();
        Box::pin(async move {
            let (tx, rx) = tokio::sync::oneshot::channel();
            ops.and_then(|ops| ops.send(Op::Flush(tx)).ok())
                .ok_or(Error::Closed("subscription"))?;
            rx.await.map_err(|_| Error::Closed("subscription"))?
        })
    }
}

impl Subscriber for RedisSubscriber {
    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<Subscription>> {
        Box::pin(self.start(topic, options))
    }

    fn unflushed(&self) -> u64 {
        let ledgers = self.ledgers.lock().unwrap_or_else(|p| p.into_inner());
        ledgers
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .map(|ledger| {
                let ledger = shared::lock(&ledger);
                (ledger.acking.len() + ledger.dead_lettering.len()) as u64
            })
            .sum()
    }

    fn delete_topic<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { super::admin::delete_stream(&self.conn, topic).await.map(drop) })
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.closed.cancel();
        self.member_tasks.close();
        self.tasks.close();
        Box::pin(async move {
            // A task that panicked has nothing left to flush; closing still succeeds.
            self.tasks.wait().await;
            Ok(())
        })
    }
}
