//! [`Relay`]: the task that moves committed outbox rows to a [`Publisher`], topic by topic in
//! `id` order, and marks them sent; woken by `LISTEN/NOTIFY`, polling as a fallback, deleting
//! sent rows after the retention.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::poll_fn;
use streamwise::{Message, Publisher};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::types::{Json, Type};
use tokio_postgres::{AsyncMessage, Client, Socket};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::outbox::NOTIFY_CHANNEL;
use crate::wire;

/// The advisory lock class under which a relay holds a topic while it sends it
/// (`pg_try_advisory_lock(RELAY_LOCK, hashtext(topic))`, on its session). Avoid this first key
/// in advisory locks of your own.
pub const RELAY_LOCK: i32 = 0x7377_6f02;

/// The topics with unsent rows, each found with one index probe (a loose index scan over the
/// partial index `streamwise_outbox_unsent`) however many rows wait.
const UNSENT_TOPICS: &str = "WITH RECURSIVE t(topic) AS ( \
       (SELECT topic FROM streamwise_outbox WHERE sent_at IS NULL ORDER BY topic LIMIT 1) \
       UNION ALL \
       SELECT (SELECT o.topic FROM streamwise_outbox o \
               WHERE o.sent_at IS NULL AND o.topic > t.topic ORDER BY o.topic LIMIT 1) \
       FROM t WHERE t.topic IS NOT NULL) \
     SELECT topic FROM t WHERE topic IS NOT NULL";

const NEXT_BATCH: &str = "SELECT id, message FROM streamwise_outbox \
     WHERE topic = $1 AND sent_at IS NULL ORDER BY id LIMIT $2";

const MARK_SENT: &str = "UPDATE streamwise_outbox SET sent_at = now() WHERE id = ANY($1)";

const TRY_LOCK: &str = "SELECT pg_try_advisory_lock(1937207042, hashtext($1))";
const UNLOCK: &str = "SELECT pg_advisory_unlock(1937207042, hashtext($1))";

/// Deletes at most 10,000 sent rows older than the retention (in seconds) per statement, so
/// that a large cleanup never holds one long transaction.
const CLEANUP: &str = "DELETE FROM streamwise_outbox WHERE id IN ( \
       SELECT id FROM streamwise_outbox \
       WHERE sent_at IS NOT NULL AND sent_at < now() - make_interval(secs => $1) LIMIT 10000)";
const CLEANUP_CHUNK: u64 = 10_000;

/// How a relay works. Build it with [`RelayOptions::default`] and the setters.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RelayOptions {
    /// Rows read, published (one [`Publisher::publish_batch`]) and marked at a time. Default
    /// 100; 1 to 10,000.
    pub batch_size: usize,
    /// Batches of one topic sent in a row before the relay looks at the other topics. Default
    /// 10; at least 1.
    pub batches_per_turn: usize,
    /// How often the relay looks for rows without a notification. Default 1 s; at least 1 ms.
    pub poll_interval: Duration,
    /// Sent rows older than this are deleted. Default 24 hours; `None` keeps them.
    pub retention: Option<Duration>,
    /// How often the retention cleanup runs. Default 1 minute; at least 1 ms.
    pub cleanup_interval: Duration,
    /// The longest wait between retries after a failure (the wait doubles from 50 ms up to
    /// it). Default 5 s; at least 1 ms.
    pub max_backoff: Duration,
    /// How long [`RelayHandle::stop`] waits for the batch in flight (a server or broker that
    /// stopped answering) before it abandons it: its rows stay unsent, or were published and
    /// not marked, and go out again (the same messages) from the next relay. Default 30 s; at
    /// least 1 ms.
    pub stop_deadline: Duration,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            batch_size: 100,
            batches_per_turn: 10,
            poll_interval: Duration::from_secs(1),
            retention: Some(Duration::from_secs(24 * 3600)),
            cleanup_interval: Duration::from_secs(60),
            max_backoff: Duration::from_secs(5),
            stop_deadline: Duration::from_secs(30),
        }
    }
}

impl RelayOptions {
    /// Sets [`batch_size`](Self::batch_size).
    #[must_use]
    pub fn batch_size(mut self, rows: usize) -> Self {
        self.batch_size = rows;
        self
    }
    /// Sets [`batches_per_turn`](Self::batches_per_turn).
    #[must_use]
    pub fn batches_per_turn(mut self, batches: usize) -> Self {
        self.batches_per_turn = batches;
        self
    }
    /// Sets [`poll_interval`](Self::poll_interval).
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }
    /// Sets [`retention`](Self::retention).
    #[must_use]
    pub fn retention(mut self, retention: Option<Duration>) -> Self {
        self.retention = retention;
        self
    }
    /// Sets [`cleanup_interval`](Self::cleanup_interval).
    #[must_use]
    pub fn cleanup_interval(mut self, interval: Duration) -> Self {
        self.cleanup_interval = interval;
        self
    }
    /// Sets [`max_backoff`](Self::max_backoff).
    #[must_use]
    pub fn max_backoff(mut self, max: Duration) -> Self {
        self.max_backoff = max;
        self
    }

    /// Sets [`stop_deadline`](Self::stop_deadline).
    #[must_use]
    pub fn stop_deadline(mut self, deadline: Duration) -> Self {
        self.stop_deadline = deadline;
        self
    }

    /// Checks the options; [`Error::Invalid`] names the one at fault.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field, reason: &str| {
            Err(Error::Invalid {
                field,
                reason: reason.to_owned(),
            })
        };
        if !(1..=10_000).contains(&self.batch_size) {
            return invalid("batch_size", "must be between 1 and 10000");
        }
        if self.batches_per_turn == 0 {
            return invalid("batches_per_turn", "must be at least 1");
        }
        for (field, value) in [
            ("poll_interval", self.poll_interval),
            ("cleanup_interval", self.cleanup_interval),
            ("max_backoff", self.max_backoff),
            ("stop_deadline", self.stop_deadline),
        ] {
            if value < Duration::from_millis(1) {
                return invalid(field, "must be at least 1 ms");
            }
        }
        Ok(())
    }
}

/// Opens a connection and starts the task that drives it, which wakes the relay on each
/// notification. The task ends when the connection does.
type Connect = Arc<
    dyn Fn(Arc<Notify>) -> Pin<Box<dyn Future<Output = Result<(Client, JoinHandle<()>)>> + Send>>
        + Send
        + Sync,
>;

/// Moves committed outbox rows to a publisher, and marks them sent.
///
/// - **Order:** a topic's rows go out in `id` order, which [`Outbox::publish`]'s topic lock
///   makes the order of their commits. A relay holds a topic (a session advisory lock,
///   [`RELAY_LOCK`]) while it sends it, so two relays never send one topic at once: run as
///   many relays as you like, for availability; a topic is sent by one at a time.
/// - **At least once:** rows are marked sent after the publisher returned. A relay that
///   dies between the two sends the rows again when it (or another) resumes, each with the
///   same message UUID: an [`InboxLayer`](crate::InboxLayer) downstream, or any dedup by
///   UUID, removes the duplicate. A relay never skips a row: a publish that fails is retried
///   (after a backoff growing to [`RelayOptions::max_backoff`]), holding up that topic only.
/// - **Wake-up:** a `LISTEN` connection of its own hears [`Outbox::publish`]'s notification
///   at each commit; without one (lost connection, notifications off), the relay polls every
///   [`RelayOptions::poll_interval`].
/// - **Retention:** sent rows are deleted once older than [`RelayOptions::retention`].
///
/// It opens two connections of its own (one to listen, one to work) from the
/// `tokio_postgres::Config` and TLS connector it is given, and opens them again after a
/// failure.
///
/// [`Outbox::publish`]: crate::Outbox::publish
pub struct Relay {
    connect: Connect,
    publisher: Arc<dyn Publisher>,
    options: RelayOptions,
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay reading the outbox of the database `config` points to (connecting with `tls`,
    /// e.g. [`tokio_postgres::NoTls`]) and sending to `publisher`.
    pub fn new<T>(config: tokio_postgres::Config, tls: T, publisher: Arc<dyn Publisher>) -> Self
    where
        T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
        T::Stream: Send + Sync + 'static,
        T::TlsConnect: Send + Sync,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        let connect: Connect = Arc::new(move |wake: Arc<Notify>| {
            let (config, tls) = (config.clone(), tls.clone());
            Box::pin(async move {
                let (client, mut connection) = config.connect(tls).await?;
                let task = tokio::spawn(async move {
                    while let Some(message) = poll_fn(|cx| connection.poll_message(cx)).await {
                        match message {
                            Ok(AsyncMessage::Notification(_)) => wake.notify_one(),
                            Ok(_) => {}
                            Err(e) => {
                                tracing::debug!(error = %e, "outbox relay connection ended");
                                break;
                            }
                        }
                    }
                });
                Ok((client, task))
            })
        });
        Relay {
            connect,
            publisher,
            options: RelayOptions::default(),
        }
    }

    /// Sets the options (checked by [`start`](Self::start)).
    #[must_use]
    pub fn options(mut self, options: RelayOptions) -> Self {
        self.options = options;
        self
    }

    /// Starts the relay's task on the current Tokio runtime. Fails only on invalid options;
    /// connection failures are retried by the task.
    pub fn start(self) -> Result<RelayHandle> {
        self.options.validate()?;
        let stop_deadline = self.options.stop_deadline;
        let stop = CancellationToken::new();
        let stats = Arc::new(Counters::default());
        let task = tokio::spawn(
            Worker {
                relay: self,
                stop: stop.clone(),
                stats: stats.clone(),
                wake: Arc::new(Notify::new()),
                listener: None,
                work: None,
            }
            .run(),
        );
        Ok(RelayHandle {
            stop,
            stop_deadline,
            task,
            stats,
        })
    }

    /// Sends every row committed and unsent now (and those committed meanwhile) on a
    /// connection of its own, then returns how many it sent; topics another relay holds are
    /// left to it. For tests and one-shot tools; a service runs [`start`](Self::start).
    pub async fn drain(&self) -> Result<u64> {
        self.options.validate()?;
        let (client, task) = (self.connect)(Arc::new(Notify::new())).await?;
        let counters = Counters::default();
        let never = CancellationToken::new();
        let result = async {
            while send_pass(&client, &*self.publisher, &self.options, &counters, &never, None)
                .await?
                .more
            {}
            Ok(counters.sent.load(Ordering::Relaxed))
        }
        .await;
        drop(client);
        task.abort();
        result
    }
}

/// What a relay did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// Rows published and marked sent.
    pub sent: u64,
    /// Rows deleted by the retention cleanup.
    pub deleted: u64,
    /// Failures (connections, statements, publishes), each retried.
    pub errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    deleted: AtomicU64,
    errors: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> RelayStats {
        RelayStats {
            sent: self.sent.load(Ordering::Relaxed),
            deleted: self.deleted.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

/// A running relay ([`Relay::start`]).
#[derive(Debug)]
pub struct RelayHandle {
    stop: CancellationToken,
    stop_deadline: Duration,
    task: JoinHandle<()>,
    stats: Arc<Counters>,
}

impl RelayHandle {
    /// What the relay did so far.
    pub fn stats(&self) -> RelayStats {
        self.stats.snapshot()
    }

    /// Stops the relay gracefully: a batch being sent is published and marked first (or, if
    /// its publish fails, left unsent), a connection being opened is given up, then the relay
    /// releases its topics and closes its connections. A batch still not done after
    /// [`RelayOptions::stop_deadline`] is abandoned (its rows go out again from the next
    /// relay, the same messages). Returns what it did.
    pub async fn stop(mut self) -> RelayStats {
        self.stop.cancel();
        let finished = match tokio::time::timeout(self.stop_deadline, &mut self.task).await {
            Ok(finished) => finished,
            Err(_) => {
                tracing::warn!(deadline = ?self.stop_deadline, "the outbox relay's batch did not finish by the stop deadline; abandoned");
                self.task.abort();
                (&mut self.task).await
            }
        };
        if let Err(e) = finished
            && e.is_panic()
        {
            tracing::error!(error = %e, "the outbox relay panicked");
        }
        self.stats.snapshot()
    }
}

/// The relay's task.
struct Worker {
    relay: Relay,
    stop: CancellationToken,
    stats: Arc<Counters>,
    wake: Arc<Notify>,
    listener: Option<(Client, JoinHandle<()>)>,
    work: Option<(Client, JoinHandle<()>)>,
}

impl Worker {
    async fn run(mut self) {
        let options = self.relay.options.clone();
        let mut failures = 0u32;
        let mut retries = Retries::new();
        let mut next_cleanup = tokio::time::Instant::now();
        let stop = self.stop.clone();
        while !stop.is_cancelled() {
            // Connecting may take long (a server that does not answer): a stop does not wait.
            tokio::select! {
                () = self.ensure_listener() => {}
                () = stop.cancelled() => break,
            }
            let opened = tokio::select! {
                opened = open_work(&self.relay.connect, &mut self.work) => opened,
                () = stop.cancelled() => break,
            };
            let outcome = match opened {
                Ok(client) => {
                    send_pass(
                        client,
                        &*self.relay.publisher,
                        &options,
                        &self.stats,
                        &self.stop,
                        Some(&mut retries),
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            let more = match outcome {
                Ok(pass) => {
                    failures = 0;
                    pass.more
                }
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    failures = failures.saturating_add(1);
                    let wait = backoff(failures, options.max_backoff);
                    tracing::warn!(error = %e, retry_in = ?wait, "outbox relay pass failed");
                    // A closed connection is opened again; on a live one, a failed unlock
                    // must not leave a topic held by this session.
                    let reopen = match &self.work {
                        Some((client, _)) => {
                            client.is_closed()
                                || client
                                    .batch_execute("SELECT pg_advisory_unlock_all()")
                                    .await
                                    .is_err()
                        }
                        None => false,
                    };
                    if reopen {
                        self.work = None;
                    }
                    self.sleep(wait).await;
                    continue;
                }
            };
            if let Some(retention) = options.retention
                && tokio::time::Instant::now() >= next_cleanup
            {
                next_cleanup = tokio::time::Instant::now() + options.cleanup_interval;
                if let Some((client, _)) = &self.work {
                    match cleanup(client, retention).await {
                        Ok(n) => {
                            self.stats.deleted.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(e) => {
                            self.stats.errors.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(error = %e, "outbox retention cleanup failed");
                        }
                    }
                }
            }
            if more {
                continue;
            }
            // A notification that came during the pass left a permit: the wait ends at once.
            let mut wait = options.poll_interval;
            let now = tokio::time::Instant::now();
            if let Some(at) = retries.values().map(|(_, at)| *at).filter(|at| *at > now).min() {
                wait = wait.min(at - now);
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
                () = self.stop.cancelled() => {}
            }
        }
        // Dropping the connections ends the sessions, which releases any topic still held.
        for (client, task) in [self.listener.take(), self.work.take()].into_iter().flatten() {
            drop(client);
            // The connection task sends the termination and ends once the client is gone.
            if tokio::time::timeout(Duration::from_secs(5), task).await.is_err() {
                tracing::warn!("an outbox relay connection did not close within 5 s");
            }
        }
    }

    /// Opens the `LISTEN` connection when there is none. A failure is logged: the relay polls
    /// meanwhile.
    async fn ensure_listener(&mut self) {
        if self.listener.as_ref().is_some_and(|(c, _)| !c.is_closed()) {
            return;
        }
        self.listener = None;
        let opened = async {
            let (client, task) = (self.relay.connect)(self.wake.clone()).await?;
            client.batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}")).await?;
            Ok::<_, Error>((client, task))
        };
        match opened.await {
            Ok(listener) => {
                self.listener = Some(listener);
                // Rows committed while nobody listened: look now.
                self.wake.notify_one();
            }
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "the outbox relay cannot listen for notifications; it polls");
            }
        }
    }

    async fn sleep(&self, wait: Duration) {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = self.stop.cancelled() => {}
        }
    }
}

/// The work connection, opened when there is none (or it closed).
async fn open_work<'w>(
    connect: &Connect,
    work: &'w mut Option<(Client, JoinHandle<()>)>,
) -> Result<&'w Client> {
    if work.as_ref().is_some_and(|(c, _)| c.is_closed()) {
        *work = None;
    }
    if work.is_none() {
        // Notifications are not asked for on this connection.
        *work = Some(connect(Arc::new(Notify::new())).await?);
    }
    match work {
        Some((client, _)) => Ok(client),
        None => unreachable!("set above"),
    }
}

/// The wait after `failures` failures in a row: 50 ms doubling, up to `max`.
fn backoff(failures: u32, max: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    Duration::from_millis(50).saturating_mul(1 << exp).min(max)
}

/// What one pass over the topics found.
struct Pass {
    /// Some topic had more rows than a turn sends: go again at once.
    more: bool,
}

/// Topics whose last turn failed: how many times in a row, and when to try again. A failing
/// topic (its publish refused, a row that does not decode) waits out its own backoff while
/// the other topics go on.
type Retries = HashMap<String, (u32, tokio::time::Instant)>;

/// One pass: each topic with unsent rows that no other relay holds and that is not waiting
/// out a failure, a turn each. With `retries`, a topic's failure is recorded there and the
/// pass goes on; without, the pass ends with it. A failure of the connection itself always
/// ends the pass.
async fn send_pass(
    client: &Client,
    publisher: &dyn Publisher,
    options: &RelayOptions,
    counters: &Counters,
    stop: &CancellationToken,
    mut retries: Option<&mut Retries>,
) -> Result<Pass> {
    let topics = client
        .query(UNSENT_TOPICS, &[])
        .await?
        .iter()
        .map(|row| row.try_get::<_, String>(0))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if let Some(retries) = retries.as_deref_mut() {
        // A topic with nothing left to send (its rows deleted by hand) waits for nothing.
        retries.retain(|topic, _| topics.contains(topic));
    }
    let mut more = false;
    let now = tokio::time::Instant::now();
    for topic in topics {
        if stop.is_cancelled() {
            break;
        }
        if let Some(retries) = retries.as_deref()
            && retries.get(&topic).is_some_and(|(_, at)| *at > now)
        {
            continue;
        }
        let held: bool = client
            .query_typed_one(TRY_LOCK, &[(&topic, Type::TEXT)])
            .await?
            .try_get(0)?;
        if !held {
            // Another relay sends this topic; it is woken by the same notifications.
            continue;
        }
        let turn = send_topic(client, publisher, options, counters, stop, &topic).await;
        // Released whatever happened (a lost connection releases it anyway).
        let released = client.query_typed_one(UNLOCK, &[(&topic, Type::TEXT)]).await;
        match turn {
            Ok(left) => {
                more |= left;
                if let Some(retries) = retries.as_deref_mut() {
                    retries.remove(&topic);
                }
            }
            Err(e) => match retries.as_deref_mut() {
                Some(retries) if !client.is_closed() => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    let failures = retries.get(&topic).map_or(1, |(n, _)| n.saturating_add(1));
                    let wait = backoff(failures, options.max_backoff);
                    tracing::warn!(topic, error = %e, retry_in = ?wait, "outbox relay could not send a topic's rows; they wait");
                    retries.insert(topic, (failures, tokio::time::Instant::now() + wait));
                }
                _ => return Err(e),
            },
        }
        released?;
    }
    Ok(Pass { more })
}

/// Up to `batches_per_turn` batches of `topic`, published and marked one after the other.
/// Returns whether rows are left.
async fn send_topic(
    client: &Client,
    publisher: &dyn Publisher,
    options: &RelayOptions,
    counters: &Counters,
    stop: &CancellationToken,
    topic: &str,
) -> Result<bool> {
    let limit = i64::try_from(options.batch_size).unwrap_or(i64::MAX);
    for _ in 0..options.batches_per_turn {
        if stop.is_cancelled() {
            return Ok(false);
        }
        let rows = client
            .query_typed(NEXT_BATCH, &[(&topic, Type::TEXT), (&limit, Type::INT8)])
            .await?;
        if rows.is_empty() {
            return Ok(false);
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut messages: Vec<Message> = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: i64 = row.try_get(0)?;
            let Json(value): Json<serde_json::Value> = row.try_get(1)?;
            messages.push(wire::decode(id, value)?);
            ids.push(id);
        }
        publisher.publish_batch(topic, messages).await?;
        client.query_typed(MARK_SENT, &[(&ids, Type::INT8_ARRAY)]).await?;
        counters.sent.fetch_add(ids.len() as u64, Ordering::Relaxed);
        if rows.len() < options.batch_size {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Deletes sent rows older than `retention`, a chunk at a time. Returns how many.
async fn cleanup(client: &Client, retention: Duration) -> Result<u64> {
    let secs = retention.as_secs_f64();
    let mut deleted = 0;
    loop {
        let n = client.execute_typed(CLEANUP, &[(&secs, Type::FLOAT8)]).await?;
        deleted += n;
        if n < CLEANUP_CHUNK {
            return Ok(deleted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_class_in_the_sql_is_the_documented_one() {
        for sql in [TRY_LOCK, UNLOCK] {
            assert!(sql.contains(&format!("({RELAY_LOCK}, hashtext($1))")), "{sql}");
        }
    }

    #[test]
    fn options_out_of_range_are_refused_by_name() {
        RelayOptions::default().validate().unwrap();
        for (options, field) in [
            (RelayOptions::default().batch_size(0), "batch_size"),
            (RelayOptions::default().batch_size(10_001), "batch_size"),
            (RelayOptions::default().batches_per_turn(0), "batches_per_turn"),
            (
                RelayOptions::default().poll_interval(Duration::ZERO),
                "poll_interval",
            ),
            (
                RelayOptions::default().cleanup_interval(Duration::ZERO),
                "cleanup_interval",
            ),
            (RelayOptions::default().max_backoff(Duration::ZERO), "max_backoff"),
            (
                RelayOptions::default().stop_deadline(Duration::ZERO),
                "stop_deadline",
            ),
        ] {
            match options.validate() {
                Err(Error::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_backoff_doubles_up_to_its_cap() {
        let max = Duration::from_secs(5);
        assert_eq!(backoff(1, max), Duration::from_millis(50));
        assert_eq!(backoff(2, max), Duration::from_millis(100));
        assert_eq!(backoff(7, max), Duration::from_millis(3200));
        assert_eq!(backoff(8, max), max);
        assert_eq!(backoff(u32::MAX, max), max);
    }
}
