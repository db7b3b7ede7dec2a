//! [`RedisPublisher`]: `XADD` in the wire format, batches in one pipeline, `MAXLEN ~`
//! trimming, `NOMKSTREAM` when streams must exist, and retention (`XTRIM MINID ~`) from the
//! stream's settings.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::Instrument;

use futures::future::BoxFuture;
use redis::Value;
use tokio::time::Instant;

use super::connection::{RedisConnection, is_cluster_change};
use super::dedicated::{BLOCK_REPLY_MARGIN, DedicatedConnection};
use super::keys;
use super::protocol::replies;
use crate::codec::{Codec, DEFAULT_MAX_ENTRY_SIZE, JsonCodec, wire_size};
use crate::error::{Error, Result, validate_stream_name};
use crate::message::{EntryId, Message};
use crate::pubsub::{MAX_CAP, Publisher};

/// How long the publisher trusts the stream settings it read.
const SETTINGS_TTL: Duration = Duration::from_secs(5);

/// How often at most retention trims one stream.
const RETENTION_EVERY: Duration = Duration::from_secs(1);

/// Options of a [`RedisPublisher`]: set with the chained methods, read from the public
/// fields, checked by [`validate`](Self::validate) (which every publish runs first).
///
/// ```
/// use streamwise::redis::PublisherOptions;
/// let options = PublisherOptions::default().max_length(10_000).auto_create(false);
/// assert_eq!(options.max_length, Some(10_000));
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct PublisherOptions {
    /// Trim every stream published to at about this many entries (`XADD MAXLEN ~ n`),
    /// overriding the stream's own `max_length` setting. Default none; 1 to [`MAX_CAP`].
    pub max_length: Option<u64>,
    /// Whether publishing creates a missing stream (default) or fails with
    /// [`Error::StreamNotFound`] (`XADD NOMKSTREAM`).
    pub auto_create: bool,
    /// The limit on the encoded size of an entry. Default 1 MiB; at least 1 byte.
    pub max_entry_size: usize,
    /// The wire layout. Default [`JsonCodec`].
    pub codec: Arc<dyn Codec>,
    /// Wait for replicas: each publish sends its `XADD`s and a `WAIT` together on the
    /// publisher's own connection, and fails with [`Error::NotReplicated`] when fewer replicas
    /// than asked acknowledged it in time. Default none (a publish returns once the master
    /// wrote it).
    pub wait_replicas: Option<WaitReplicas>,
}

/// How many replicas must acknowledge a publish, and how long to wait for them
/// ([`PublisherOptions::wait_replicas`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitReplicas {
    /// Replicas that must have the entries (at least 1).
    pub replicas: u32,
    /// The longest wait (longer than zero, at most [`MAX_REPLICA_WAIT`]).
    pub timeout: Duration,
}

/// The longest [`WaitReplicas::timeout`]: one minute.
pub const MAX_REPLICA_WAIT: Duration = Duration::from_secs(60);

impl Default for PublisherOptions {
    /// No length limit of its own (the stream's `max_length` setting applies), streams created
    /// on first publish, 1 MiB entries, the JSON wire format.
    fn default() -> Self {
        PublisherOptions {
            max_length: None,
            auto_create: true,
            max_entry_size: DEFAULT_MAX_ENTRY_SIZE,
            codec: Arc::new(JsonCodec),
            wait_replicas: None,
        }
    }
}

impl std::fmt::Debug for PublisherOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublisherOptions")
            .field("max_length", &self.max_length)
            .field("auto_create", &self.auto_create)
            .field("max_entry_size", &self.max_entry_size)
            .field("wait_replicas", &self.wait_replicas)
            .finish_non_exhaustive()
    }
}

impl PublisherOptions {
    /// Trim every stream published to at about `n` entries (`XADD MAXLEN ~ n`). Overrides the
    /// stream's own `max_length` setting. At least 1, at most [`MAX_CAP`].
    #[must_use]
    pub fn max_length(mut self, n: u64) -> Self {
        self.max_length = Some(n);
        self
    }

    /// Whether publishing creates a missing stream (default) or fails with
    /// [`Error::StreamNotFound`] (`XADD NOMKSTREAM`).
    #[must_use]
    pub fn auto_create(mut self, auto_create: bool) -> Self {
        self.auto_create = auto_create;
        self
    }

    /// The limit on the encoded size of an entry. Default [`DEFAULT_MAX_ENTRY_SIZE`] (1 MiB);
    /// at least 1 byte.
    #[must_use]
    pub fn max_entry_size(mut self, bytes: usize) -> Self {
        self.max_entry_size = bytes;
        self
    }

    /// Another wire layout.
    #[must_use]
    pub fn codec(mut self, codec: impl Codec) -> Self {
        self.codec = Arc::new(codec);
        self
    }

    /// Every publish waits until `replicas` replicas have its entries (`WAIT`), at most
    /// `timeout`; fewer is [`Error::NotReplicated`]. The entries exist on the master then, and
    /// may still reach the replicas later, or be lost if the master fails first: a caller
    /// that retries may publish them twice.
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamwise::redis::PublisherOptions;
    /// let options = PublisherOptions::default().wait_replicas(1, Duration::from_millis(500));
    /// assert!(options.validate().is_ok());
    /// ```
    #[must_use]
    pub fn wait_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait_replicas = Some(WaitReplicas { replicas, timeout });
        self
    }

    /// Checks the options; [`Error::Invalid`] names the one at fault. Every publish checks
    /// them before it sends anything.
    pub fn validate(&self) -> Result<()> {
        if let Some(n) = self.max_length
            && !(1..=MAX_CAP).contains(&n)
        {
            return Err(Error::invalid(
                "max_length",
                format_args!("{n} is not between 1 and {MAX_CAP}"),
            ));
        }
        if self.max_entry_size == 0 {
            return Err(Error::invalid("max_entry_size", "must be at least 1 byte"));
        }
        if let Some(wait) = self.wait_replicas {
            if wait.replicas == 0 {
                return Err(Error::invalid("wait_replicas.replicas", "must be at least 1"));
            }
            if wait.timeout.is_zero() || wait.timeout > MAX_REPLICA_WAIT {
                return Err(Error::invalid(
                    "wait_replicas.timeout",
                    format_args!(
                        "{:?} must be longer than zero and at most {MAX_REPLICA_WAIT:?}",
                        wait.timeout
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Publishes to Redis streams.
///
/// A publisher has a connection of its own (on a cluster, one per master), which one publish
/// at a time uses: an awaited publish then costs one write and one read in the caller's task. Publishes made meanwhile
/// by other tasks go through the [`RedisConnection`]'s shared multiplexed connection, which
/// pipelines them; so does a publish after its own connection failed, with the retry policy.
///
/// A publish whose reply was lost to a connection failure is retried, so an entry can, rarely,
/// be written twice; consumers can drop such duplicates by UUID.
pub struct RedisPublisher {
    conn: RedisConnection,
    options: PublisherOptions,
    closed: AtomicBool,
    streams: Mutex<HashMap<String, StreamState>>,
    metrics: crate::metrics::PublishMetrics,
    own: tokio::sync::Mutex<OwnConnection>,
    /// The connections of publishes that wait for replicas (a `WAIT` would hold up every other
    /// user of a shared connection), with a reply timeout above the wait: one per master on a
    /// cluster (the `WAIT` must go to the master that took the `XADD`s), else one.
    waiting: tokio::sync::Mutex<HashMap<Option<(String, u16)>, DedicatedConnection>>,
}

/// The publisher's own connection, opened on first use (on a cluster, one per master,
/// keyed by its address); after a failure to open one, not tried again before `retry_at`
/// (publishes use the shared connection meanwhile).
#[derive(Default)]
struct OwnConnection {
    /// By master (`None`: the one server); a few at most, so a list.
    conns: Vec<(Option<(String, u16)>, DedicatedConnection)>,
    retry_at: Option<Instant>,
}

/// How long a publisher waits before it tries to open its own connection again.
const OWN_CONNECTION_RETRY: Duration = Duration::from_secs(1);

/// What one publish sends: one command, or a pipeline (batches, retention trims).
#[derive(Clone, Copy)]
enum Request<'a> {
    One(&'a redis::Cmd),
    Pipeline(&'a redis::Pipeline),
}

impl Request<'_> {
    /// Sends the request on `conn`; its replies, one per command.
    async fn query<C: redis::aio::ConnectionLike + Send>(
        self,
        conn: &mut C,
    ) -> redis::RedisResult<Vec<Value>> {
        match self {
            Request::One(cmd) => cmd.query_async::<Value>(conn).await.map(|v| vec![v]),
            Request::Pipeline(pipe) => pipe.query_async::<Vec<Value>>(conn).await,
        }
    }
}

/// What the publisher knows of a stream's settings.
#[derive(Clone, Copy, Debug, Default)]
struct StreamState {
    max_length: Option<u64>,
    retention: Option<Duration>,
    /// The topic is partitioned: its entries go to its partitions, not here.
    partitions: Option<u32>,
    read_at: Option<Instant>,
    trimmed_at: Option<Instant>,
}

impl RedisPublisher {
    /// A publisher on `conn`.
    pub fn new(conn: RedisConnection, options: PublisherOptions) -> Self {
        RedisPublisher {
            conn,
            options,
            closed: AtomicBool::new(false),
            streams: Mutex::new(HashMap::new()),
            metrics: crate::metrics::PublishMetrics::default(),
            own: tokio::sync::Mutex::new(OwnConnection::default()),
            waiting: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Sends `request` on the publisher's own connection, if no other publish uses it and it
    /// is (or can be) open. `None` means: send it on the shared connection (which retries
    /// connection failures; a reply lost here may mean a duplicate, as after any retry).
    async fn send_own(&self, topic: &str, request: Request<'_>) -> Option<Result<Vec<Value>>> {
        let mut own = self.own.try_lock().ok()?;
        // The master of the topic's slot, as far as the slot map knows (`None` on one server,
        // or before the map is learned: the connection opened below says where it went).
        let node = self
            .conn
            .is_cluster()
            .then(|| self.conn.known_master(topic))
            .flatten();
        let mut at = own.conns.iter().position(|(n, _)| *n == node);
        if let Some(i) = at
            && !own.conns[i].1.is_idle()
        {
            // An earlier publish was dropped half-way: its reply would be taken for ours.
            own.conns.swap_remove(i);
            at = None;
        }
        let at = match at {
            Some(i) => i,
            None => {
                if own.retry_at.is_some_and(|at| Instant::now() < at) {
                    return None;
                }
                match self.conn.dedicated_once(topic).await {
                    Ok(conn) => {
                        let node = conn.node().cloned();
                        // A connection to that node under another key (the map was not known
                        // then) gives way to this one.
                        own.conns.retain(|(n, _)| *n != node);
                        own.conns.push((node, conn));
                        own.conns.len() - 1
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, url = %self.conn.url(), "publisher's own connection not opened; using the shared one");
                        own.retry_at = Some(Instant::now() + OWN_CONNECTION_RETRY);
                        return None;
                    }
                }
            }
        };
        let conn = &mut own.conns[at].1;
        let sent = request.query(conn).await;
        match sent {
            Ok(replies) => Some(Ok(replies)),
            // Connection trouble, or the slot moved (nothing was written then): the shared
            // connection sends it again, and follows the cluster.
            Err(e) if self.conn.transient(&e) => {
                own.conns.swap_remove(at);
                if is_cluster_change(&e) {
                    // The slot map was wrong about this topic's master.
                    self.conn.forget_slot_map();
                }
                None
            }
            // A refusal: the same on any connection.
            Err(e) => Some(Err(self.conn.failure("publish", e, 0))),
        }
    }

    /// Sends `pipe` (`XADD`s, then `WAIT`) on the connection of waited publishes, one at a
    /// time, opening it when needed. Not resent after a connection failure: the entries may
    /// have been written, and the caller decides.
    async fn send_waited(
        &self,
        topic: &str,
        pipe: &redis::Pipeline,
        wait: WaitReplicas,
    ) -> Result<Vec<Value>> {
        let mut waiting = self.waiting.lock().await;
        let mut attempt = 0;
        loop {
            // As for the own connections: keyed by the topic's master (`None` on one server).
            let mut node = self
                .conn
                .is_cluster()
                .then(|| self.conn.known_master(topic))
                .flatten();
            if waiting.get(&node).is_some_and(|c| !c.is_idle()) {
                // An earlier publish was dropped half-way: its reply would be taken for ours.
                waiting.remove(&node);
            }
            if !waiting.contains_key(&node) {
                let conn = self
                    .conn
                    .dedicated(topic, wait.timeout + BLOCK_REPLY_MARGIN)
                    .await?;
                node = conn.node().cloned();
                waiting.insert(node.clone(), conn);
            }
            let conn = waiting.get_mut(&node).ok_or(Error::Closed("publisher"))?;
            match pipe.query_async::<Vec<Value>>(conn).await {
                Ok(replies) => return Ok(replies),
                Err(e) => {
                    if self.conn.transient(&e) {
                        waiting.remove(&node);
                    }
                    // The slot moved or its master is being replaced: the server refused the
                    // first XADD, so sending the request to the slot's master of now writes
                    // no entry twice (in a batch, entries before a refused one may have been
                    // written: those come twice, as after a lost reply).
                    if self.conn.is_cluster() && is_cluster_change(&e) && attempt < self.conn.max_retries() {
                        self.conn.forget_slot_map();
                        tokio::time::sleep(self.conn.backoff(attempt)).await;
                        attempt += 1;
                        continue;
                    }
                    return Err(self.conn.failure("publish (waiting for replicas)", e, attempt));
                }
            }
        }
    }

    /// On a cluster, concurrent publishes share a multiplexed connection to the topic's
    /// master. `None`: send it on the shared cluster connection (no master known yet, or
    /// trouble there, after which the request is sent again).
    async fn send_to_master(&self, topic: &str, request: Request<'_>) -> Option<Result<Vec<Value>>> {
        if !self.conn.is_cluster() {
            return None;
        }
        let (node, mut conn) = self.conn.master_multiplexed(topic).await?;
        let sent = request.query(&mut conn).await;
        match sent {
            Ok(replies) => Some(Ok(replies)),
            Err(e) if self.conn.transient(&e) => {
                self.conn.drop_master_multiplexed(&node);
                None
            }
            Err(e) => Some(Err(self.conn.failure("publish", e, 0))),
        }
    }

    /// Sends `request`: on the publisher's own connection when free, else on the shared one.
    async fn send(&self, topic: &str, request: Request<'_>) -> Result<Vec<Value>> {
        if let Some(result) = self.send_own(topic, request).await {
            return result;
        }
        // On a cluster, concurrent publishes share a multiplexed connection to the topic's
        // master; after trouble there, the shared cluster connection sends the request again.
        if let Some(result) = self.send_to_master(topic, request).await {
            return result;
        }
        self.conn
            // Borrowed, not cloned: a retry resends the same request.
            .run_mapped("publish", |mut c| async move { request.query(&mut c).await })
            .await
    }

    /// The options.
    pub fn options(&self) -> &PublisherOptions {
        &self.options
    }

    fn state(&self, topic: &str) -> StreamState {
        let streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams.get(topic).copied().unwrap_or_default()
    }

    fn update_state(&self, topic: &str, f: impl FnOnce(&mut StreamState)) {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        f(streams.entry(topic.to_owned()).or_default());
    }

    /// The stream's settings, re-read from its metadata hash when stale.
    async fn settings(&self, topic: &str) -> Result<StreamState> {
        let state = self.state(topic);
        if state.read_at.is_some_and(|t| t.elapsed() < SETTINGS_TTL) {
            return Ok(state);
        }
        let key = keys::meta(topic);
        let (max_length, retention_ms, partitions): (Option<u64>, Option<u64>, Option<u32>) = self
            .conn
            .run_mapped("read stream settings", |mut c| {
                let key = key.clone();
                async move {
                    redis::cmd("HMGET")
                        .arg(&key)
                        .arg("max_length")
                        .arg("retention_ms")
                        .arg("partitions")
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        self.update_state(topic, |s| {
            s.max_length = max_length;
            s.partitions = partitions;
            s.retention = retention_ms.filter(|ms| *ms > 0).map(Duration::from_millis);
            s.read_at = Some(Instant::now());
        });
        Ok(self.state(topic))
    }

    fn too_large(&self, size: usize) -> Result<()> {
        if size > self.options.max_entry_size {
            return Err(Error::PayloadTooLarge {
                size,
                limit: self.options.max_entry_size,
            });
        }
        Ok(())
    }

    /// The `XADD` of `message`, written straight from the codec (no field list in between);
    /// refused when the entry is over the size limit.
    fn xadd(&self, topic: &str, max_length: Option<u64>, message: &Message) -> Result<redis::Cmd> {
        let mut cmd = redis::Cmd::with_capacity(16, topic.len() + wire_size(message) + 64);
        cmd.arg("XADD").arg(topic);
        if !self.options.auto_create {
            cmd.arg("NOMKSTREAM");
        }
        if let Some(n) = max_length {
            cmd.arg("MAXLEN").arg("~").arg(n);
        }
        cmd.arg("*");
        let size = self.options.codec.encode_with(message, &mut |name, value| {
            cmd.arg(name).arg(value);
        })?;
        self.too_large(size)?;
        Ok(cmd)
    }

    /// [`append_unmetered`](Self::append_unmetered), recorded in the publish metrics.
    /// [`append_unmetered`](Self::append_unmetered), recorded in the publish metrics (feature
    /// `metrics`), inside the publish's span with its trace context written into `messages`
    /// (feature `opentelemetry`). Without either, neither a clock read nor a span.
    async fn append(&self, topic: &str, messages: &mut [Message], cap: Option<u64>) -> Result<Vec<EntryId>> {
        if !cfg!(any(feature = "metrics", feature = "opentelemetry")) {
            return self.append_unmetered(topic, messages, cap).await;
        }
        let span = crate::pubsub::publish_trace(super::SYSTEM, topic, messages);
        let messages = &*messages;
        async move {
            if !cfg!(feature = "metrics") {
                return self.append_unmetered(topic, messages, cap).await;
            }
            let started = std::time::Instant::now();
            let result = self.append_unmetered(topic, messages, cap).await;
            self.metrics
                .record(topic, messages.len(), result.is_ok(), started.elapsed());
            result
        }
        .instrument(span)
        .await
    }

    async fn append_unmetered(
        &self,
        topic: &str,
        messages: &[Message],
        cap: Option<u64>,
    ) -> Result<Vec<EntryId>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("publisher"));
        }
        self.options.validate()?;
        validate_stream_name("topic", topic)?;
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        if self
            .state(topic)
            .read_at
            .is_none_or(|t| t.elapsed() >= SETTINGS_TTL)
        {
            // The settings are read before the commands are built; a bad entry is refused
            // before that read, as when they are cached (so without a server too).
            for message in messages {
                self.too_large(self.options.codec.encode_with(message, &mut |_, _| {})?)?;
            }
        }
        let settings = self.settings(topic).await?;
        if let Some(partitions) = settings.partitions {
            return Err(Error::Partitioned {
                topic: topic.to_owned(),
                partitions,
            });
        }
        let max_length = match (self.options.max_length.or(settings.max_length), cap) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let trim_before = settings
            .retention
            .filter(|_| settings.trimmed_at.is_none_or(|t| t.elapsed() >= RETENTION_EVERY))
            .map(|retention| {
                now_ms().saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX))
            });
        let commands = messages
            .iter()
            .map(|m| self.xadd(topic, max_length, m))
            .collect::<Result<Vec<_>>>()?;
        let wait = self.options.wait_replicas;
        let mut replies: Vec<Value> = if let ([xadd], None, None) = (commands.as_slice(), trim_before, wait) {
            // One entry: a plain command, without a pipeline's overhead.
            self.send(topic, Request::One(xadd)).await?
        } else {
            let mut pipe = redis::Pipeline::with_capacity(commands.len() + 1);
            for xadd in commands {
                pipe.add_command(xadd);
            }
            if let Some(min_ms) = trim_before {
                pipe.cmd("XTRIM")
                    .arg(topic)
                    .arg("MINID")
                    .arg("~")
                    .arg(min_ms)
                    .ignore();
            }
            match wait {
                Some(wait) => {
                    let ms = u64::try_from(wait.timeout.as_millis()).unwrap_or(u64::MAX).max(1);
                    pipe.cmd("WAIT").arg(wait.replicas).arg(ms);
                    self.send_waited(topic, &pipe, wait).await?
                }
                None => self.send(topic, Request::Pipeline(&pipe)).await?,
            }
        };
        let acknowledged = match wait {
            Some(_) => Some(
                replies
                    .pop()
                    .ok_or_else(|| replies::unexpected("WAIT gave no reply"))?,
            ),
            None => None,
        };
        if trim_before.is_some() {
            self.update_state(topic, |s| s.trimmed_at = Some(Instant::now()));
        }
        let ids = replies
            .into_iter()
            .map(|reply| match reply {
                Value::Nil => Err(Error::StreamNotFound {
                    stream: topic.to_owned(),
                }),
                other => replies::entry_id(other),
            })
            .collect::<Result<Vec<EntryId>>>()?;
        if let (Some(wait), Some(reply)) = (wait, acknowledged) {
            let acknowledged = match reply {
                Value::Int(n) => u64::try_from(n).unwrap_or(0),
                other => return Err(replies::unexpected(&format!("WAIT replied {other:?}"))),
            };
            if acknowledged < u64::from(wait.replicas) {
                return Err(Error::NotReplicated {
                    stream: topic.to_owned(),
                    ids,
                    acknowledged,
                    wanted: wait.replicas.into(),
                });
            }
        }
        Ok(ids)
    }
}

impl RedisPublisher {
    /// Keeps `message` in `topic`'s schedule until `at` ([`Publisher::publish_at`]).
    async fn schedule(&self, topic: &str, at: std::time::SystemTime, mut message: Message) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("publisher"));
        }
        self.options.validate()?;
        validate_stream_name("topic", topic)?;
        let span = crate::pubsub::publish_trace(super::SYSTEM, topic, std::slice::from_mut(&mut message));
        async move {
            let mut size = Ok(0);
            let member = super::scheduled::member(|field| {
                size = self.options.codec.encode_with(&message, field);
            });
            self.too_large(size?)?;
            if let Some(partitions) = self.settings(topic).await?.partitions {
                return Err(Error::Partitioned {
                    topic: topic.to_owned(),
                    partitions,
                });
            }
            if !self.options.auto_create {
                let exists: i64 = self.conn.command(redis::cmd("EXISTS").arg(topic)).await?;
                if exists == 0 {
                    return Err(Error::StreamNotFound {
                        stream: topic.to_owned(),
                    });
                }
            }
            // Rounded up: the mover compares whole milliseconds of the server's clock, and a
            // score rounded down would move the message before it is due.
            let due_ms = at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| {
                u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
            });
            // Sent again after a lost reply, it adds nothing: the member is the same.
            let schedule = keys::scheduled(topic);
            let zadd = redis::cmd("ZADD").arg(&schedule).arg(due_ms).arg(member).clone();
            // On the publisher's own connection, as a publish (the schedule is in the topic's
            // slot), else on the shared one.
            match self.send_own(topic, Request::One(&zadd)).await {
                Some(sent) => drop(sent?),
                None => {
                    let _: i64 = self.conn.command(&zadd).await?;
                }
            }
            // Due before the subscriptions' movers look again: moved on time from here.
            if at < std::time::SystemTime::now() + super::scheduled::MOVER_POLL {
                // At the stored due time: sooner, the server's clock has not reached it.
                let stored = std::time::UNIX_EPOCH + std::time::Duration::from_millis(due_ms);
                super::scheduled::move_when_due(self.conn.clone(), topic.to_owned(), stored);
            }
            Ok(())
        }
        .instrument(span)
        .await
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Publisher for RedisPublisher {
    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> BoxFuture<'a, Result<EntryId>> {
        Box::pin(async move {
            let mut message = message;
            let mut ids = self
                .append(topic, std::slice::from_mut(&mut message), None)
                .await?;
            ids.pop()
                .ok_or_else(|| replies::unexpected("XADD returned no id"))
        })
    }

    fn publish_batch<'a>(
        &'a self,
        topic: &'a str,
        messages: Vec<Message>,
    ) -> BoxFuture<'a, Result<Vec<EntryId>>> {
        Box::pin(async move {
            let mut messages = messages;
            self.append(topic, &mut messages, None).await
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.closed.store(true, Ordering::Release);
        Box::pin(std::future::ready(Ok(())))
    }

    fn publish_at<'a>(
        &'a self,
        topic: &'a str,
        at: std::time::SystemTime,
        message: Message,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.schedule(topic, at, message))
    }

    fn publish_capped<'a>(
        &'a self,
        topic: &'a str,
        message: Message,
        max_length: u64,
    ) -> BoxFuture<'a, Result<EntryId>> {
        Box::pin(async move {
            crate::pubsub::check_cap(max_length)?;
            let mut message = message;
            let mut ids = self
                .append(topic, std::slice::from_mut(&mut message), Some(max_length))
                .await?;
            ids.pop()
                .ok_or_else(|| replies::unexpected("XADD returned no id"))
        })
    }
}

impl std::fmt::Debug for RedisPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPublisher")
            .field("conn", &self.conn)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_options_are_refused_before_anything_is_sent() {
        // Nothing listens there: an option that got as far as Redis would fail otherwise.
        let conn = RedisConnection::builder("redis://127.0.0.1:1")
            .max_retries(0)
            .build()
            .unwrap();
        let o = PublisherOptions::default;
        let cases = [
            (o().max_length(u64::MAX), "max_length"),
            (o().max_length(MAX_CAP + 1), "max_length"),
            (o().max_length(0), "max_length"),
            (o().max_entry_size(0), "max_entry_size"),
            (
                o().wait_replicas(0, Duration::from_secs(1)),
                "wait_replicas.replicas",
            ),
            (o().wait_replicas(1, Duration::ZERO), "wait_replicas.timeout"),
            (
                o().wait_replicas(1, MAX_REPLICA_WAIT + Duration::from_millis(1)),
                "wait_replicas.timeout",
            ),
        ];
        for (options, field) in cases {
            assert_eq!(options.validate().unwrap_err().invalid_field(), Some(field));
            let publisher = RedisPublisher::new(conn.clone(), options);
            let message = Message::new("t", &1).unwrap();
            let err = publisher.publish("s", message).await.unwrap_err();
            assert_eq!(err.invalid_field(), Some(field), "{err}");
        }
        o().max_length(MAX_CAP)
            .max_entry_size(usize::MAX)
            .wait_replicas(u32::MAX, MAX_REPLICA_WAIT)
            .validate()
            .unwrap();
    }
}
