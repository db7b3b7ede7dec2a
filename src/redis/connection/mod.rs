//! [`RedisConnection`]: the URL, the retry policy and the shared multiplexed connection that
//! publishers, subscribers and admin calls use. Commands retry with exponential backoff and
//! jitter, reconnect transparently, and fail with [`Error::Connection`] only after the retries
//! are spent; the server's refusals come back at once as [`Error::Server`]. Credentials never
//! appear in `Debug`, errors or logs.
//!
//! The server is one Redis (`redis://`, `rediss://`, `unix://`) or a Redis Cluster
//! (`redis-cluster://host:port?node=host:port&...`): then the shared connection is redis-rs's
//! cluster connection, which routes each command to its slot's master and follows `MOVED` and
//! `ASK`, and the connections of one's own ([`RedisConnection::dedicated`]) go to the master of
//! their stream's slot, found in a slot map learned with `CLUSTER SLOTS`.
//!
//! Beside the handle: its settings ([`builder`]), TLS ([`tls`]), what a failure means and
//! the backoff ([`retry`]), the cluster's URL and slots ([`cluster`]), and the hiding of
//! passwords ([`redact`]).

mod builder;
mod cluster;
mod redact;
mod retry;
mod tls;

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{AsyncConnectionConfig, Cmd, ConnectionInfo, Pipeline, RedisError, RedisFuture, Value};
use tokio::time::Instant;

use self::builder::Settings;
pub use self::builder::{MAX_CONNECTION_DURATION, RedisConnectionBuilder};
pub(crate) use self::cluster::slot_of;
use self::cluster::{SlotOwners, at_node, redirect_target};
pub use self::redact::redact_url;
use self::retry::{is_auth_failure, is_server_refusal};
pub(crate) use self::retry::{is_cluster_change, is_transient};
use self::tls::{TlsMaterial, tls_refusal};
use super::dedicated::{DedicatedConnection, TlsSetup};
use super::protocol::replies;
use crate::error::{Error, Result};
use crate::lock;

/// A Redis server to talk to, with the retry policy for every command sent to it.
///
/// Cheap to clone; clones share one multiplexed connection, opened on first use.
///
/// ```
/// use std::time::Duration;
/// use streamwise::redis::RedisConnection;
///
/// let conn = RedisConnection::builder("redis://:secret@localhost:6379")
///     .max_retries(5)
///     .retry_base_delay(Duration::from_millis(100))
///     .retry_max_delay(Duration::from_secs(30))
///     .build()?;
/// assert_eq!(conn.url(), "redis://:***@localhost:6379");
/// assert!(!format!("{conn:?}").contains("secret"));
/// # Ok::<(), streamwise::Error>(())
/// ```
#[derive(Clone)]
pub struct RedisConnection {
    inner: Arc<Inner>,
}

struct Inner {
    target: Target,
    redacted_url: String,
    settings: Settings,
    shared: SharedConnection,
    /// Set once a command got its reply: the credentials worked then, so from then on a
    /// refused login is taken for credentials being rotated, and retried, rather than for a
    /// misconfiguration. (A connection that opened proves nothing: without a password none
    /// is asked for, and the first command is refused.)
    authenticated_once: AtomicBool,
    /// When a refused login on reconnect was last logged as a warning (they are rate-limited).
    auth_warned_at: Mutex<Option<Instant>>,
    /// The certificates given to the builder, for the dedicated connections' TLS.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    tls: TlsMaterial,
    /// The TLS client configuration of the dedicated connections, built on first use.
    #[cfg(feature = "tls")]
    tls_config: std::sync::OnceLock<std::result::Result<TlsSetup, String>>,
}

/// What the connection talks to.
// One per connection handle, so the size of the cluster variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Target {
    Single(redis::Client),
    Cluster(ClusterTarget),
}

/// A Redis Cluster: redis-rs's client for the shared connection, and what the connections of
/// one's own need to find a slot's master.
struct ClusterTarget {
    client: redis::cluster::ClusterClient,
    /// The first seed node: credentials and TLS settings for the connections of one's own.
    seed: ConnectionInfo,
    /// Which master serves each slot, learned on first use and forgotten when a connection
    /// finds it wrong (`MOVED`, a node that is gone).
    owners: Mutex<Option<SlotOwners>>,
    /// A multiplexed connection per master, shared by the commands that go straight to a
    /// slot's master ([`RedisConnection::master_multiplexed`]).
    masters: Mutex<std::collections::HashMap<(String, u16), MultiplexedConnection>>,
}

/// The shared connection: to one server, or redis-rs's connection to a cluster, which routes
/// each command by its key.
#[derive(Clone)]
pub(crate) enum Shared {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Shared {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Shared::Single(c) => c.req_packed_command(cmd),
            Shared::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Shared::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Shared::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Shared::Single(c) => c.get_db(),
            Shared::Cluster(c) => c.get_db(),
        }
    }
}

/// The shared multiplexed connection, opened on first use and again after it broke.
///
/// Not redis-rs's `ConnectionManager`: it reconnects in the background right when a
/// connection breaks and hands that attempt's outcome to the next command. Retried after a
/// backoff, a command then got the refusal of an attempt made before the backoff, so the
/// last retry never saw a server that came back during it; and a refused login was never
/// attempted again. Here each retry connects anew when there is no connection.
#[derive(Default)]
struct SharedConnection {
    /// The connection in use, with its generation, so that a failure seen on an old
    /// connection does not drop a newer one.
    current: Mutex<Option<(u64, Shared)>>,
    /// Held while connecting, so that one attempt runs at a time; holds that attempt's
    /// failure for the commands that waited for it.
    connecting: tokio::sync::Mutex<Option<RedisError>>,
    /// Connection attempts finished so far (also the generation of the newest connection).
    attempts: AtomicU64,
}

impl RedisConnection {
    /// A connection to `url` with the default retry policy (5 retries, 100 ms doubling up to
    /// 30 s). Fails with [`Error::Invalid`] (`redis_url`) for a malformed URL.
    pub fn new(url: &str) -> Result<Self> {
        Self::builder(url).build()
    }

    /// A builder for a connection to `url`.
    pub fn builder(url: &str) -> RedisConnectionBuilder {
        RedisConnectionBuilder::new(url)
    }

    /// A connection to `target`, with checked settings; nothing is opened yet.
    fn with_target(target: Target, redacted_url: String, settings: Settings, tls: TlsMaterial) -> Self {
        RedisConnection {
            inner: Arc::new(Inner {
                target,
                redacted_url,
                settings,
                shared: SharedConnection::default(),
                authenticated_once: AtomicBool::new(false),
                auth_warned_at: Mutex::new(None),
                tls,
                #[cfg(feature = "tls")]
                tls_config: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Whether this is a connection to a Redis Cluster (a `redis-cluster://` URL).
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner.target, Target::Cluster(_))
    }

    /// The URL with any password replaced by `***`.
    pub fn url(&self) -> &str {
        &self.inner.redacted_url
    }

    /// Retries before a command fails.
    pub fn max_retries(&self) -> u32 {
        self.inner.settings.max_retries
    }

    /// The first retry delay.
    pub fn retry_base_delay(&self) -> Duration {
        self.inner.settings.retry_base_delay
    }

    /// The longest retry delay.
    pub fn retry_max_delay(&self) -> Duration {
        self.inner.settings.retry_max_delay
    }

    /// The shared multiplexed connection with its generation; opens it when there is none.
    /// A command that waited while another attempt failed gets that attempt's error (it was
    /// made after the command asked) instead of trying again at once.
    async fn shared(&self) -> std::result::Result<(u64, Shared), RedisError> {
        let shared = &self.inner.shared;
        if let Some(current) = lock(&shared.current).clone() {
            return Ok(current);
        }
        let attempts_seen = shared.attempts.load(Ordering::Acquire);
        let mut last_failure = shared.connecting.lock().await;
        if let Some(current) = lock(&shared.current).clone() {
            return Ok(current);
        }
        if shared.attempts.load(Ordering::Acquire) != attempts_seen
            && let Some(e) = last_failure.as_ref()
        {
            return Err(e.clone());
        }
        let s = self.inner.settings;
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(s.response_timeout))
            .set_connection_timeout(Some(s.connect_timeout));
        let connected = match &self.inner.target {
            Target::Single(client) => client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map(Shared::Single),
            // Timeouts were given to the cluster client when it was built.
            Target::Cluster(cluster) => match cluster.client.get_async_connection().await {
                Ok(conn) => Ok(Shared::Cluster(conn)),
                Err(e) => Err(self.why_cluster_refused(cluster, e).await),
            },
        };
        let generation = shared.attempts.fetch_add(1, Ordering::AcqRel) + 1;
        match connected {
            Ok(conn) => {
                *last_failure = None;
                self.connected();
                *lock(&shared.current) = Some((generation, conn.clone()));
                Ok((generation, conn))
            }
            Err(e) => {
                *last_failure = Some(e.clone());
                Err(e)
            }
        }
    }

    /// The reason a cluster connection could not be opened. redis-rs reports every failed
    /// first connection as I/O trouble, which would be retried; a refused login or an untrusted
    /// certificate must not be, so the first seed node is asked once more, directly, to tell.
    async fn why_cluster_refused(&self, cluster: &ClusterTarget, e: RedisError) -> RedisError {
        let s = self.inner.settings;
        let direct = match self.tls_setup() {
            Ok(tls) => {
                DedicatedConnection::connect(&cluster.seed, tls, s.connect_timeout, s.response_timeout).await
            }
            Err(setup) => Err(setup),
        };
        match direct {
            Err(refused) if is_auth_failure(&refused) || tls_refusal(&refused).is_some() => refused,
            _ => e,
        }
    }

    /// Drops the shared connection of `generation` after it failed for good (the next command
    /// opens a new one); a newer connection stays.
    fn forget_shared(&self, generation: u64) {
        let mut current = lock(&self.inner.shared.current);
        if current.as_ref().is_some_and(|(g, _)| *g == generation) {
            *current = None;
        }
    }

    /// Notes a connection that opened: logs the end of refused logins that were reported.
    fn connected(&self) {
        if lock(&self.inner.auth_warned_at).take().is_some() {
            tracing::info!(url = %self.url(), "logged in again after refused logins");
        }
    }

    /// Whether a failed attempt may be retried: connection trouble, or a refused login by a
    /// client that has logged in before (its credentials are being rotated, or its user
    /// re-created). A client whose first login is refused fails at once: it is misconfigured.
    fn retryable(&self, e: &RedisError) -> bool {
        self.transient(e) || (is_auth_failure(e) && self.inner.authenticated_once.load(Ordering::Acquire))
    }

    /// Whether a new attempt, maybe on a new connection, can cure `e`: connection trouble, and
    /// on a cluster also the answers of a cluster that changes (`MOVED`, `READONLY`, ...),
    /// which on one server stay the server's refusal.
    pub(crate) fn transient(&self, e: &RedisError) -> bool {
        is_transient(e) || (self.is_cluster() && is_cluster_change(e))
    }

    /// Logs a failed attempt before its retry. Refused logins are warnings, at most one per
    /// [`AUTH_WARNING_EVERY`], since every command and task of the client meets them while
    /// the credentials are wrong.
    fn log_retry(&self, what: &str, attempt: u32, delay: Duration, e: &RedisError) {
        if is_auth_failure(e) {
            let now = Instant::now();
            let mut warned_at = lock(&self.inner.auth_warned_at);
            if warned_at.is_none_or(|at| now.duration_since(at) >= AUTH_WARNING_EVERY) {
                *warned_at = Some(now);
                tracing::warn!(what, url = %self.url(),
                    "authentication refused on reconnect; retrying with backoff until the credentials work again");
                return;
            }
        }
        tracing::debug!(what, attempt, ?delay, error = %e, url = %self.url(), "redis command failed; retrying");
    }

    /// Runs `op` on the shared connection, retrying connection failures with backoff.
    /// The server's refusals, which retrying cannot fix, are returned at once as
    /// [`CommandError::Refused`], for the caller to map (`NOGROUP` and the like); retries
    /// spent become [`Error::Connection`].
    pub(crate) async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> std::result::Result<T, CommandError>
    where
        F: FnMut(Shared) -> Fut,
        Fut: Future<Output = std::result::Result<T, RedisError>>,
    {
        let mut attempt = 0;
        loop {
            let result = match self.shared().await {
                Ok((generation, conn)) => {
                    let result = op(conn).await;
                    if let Err(e) = &result
                        && e.is_unrecoverable_error()
                    {
                        self.forget_shared(generation);
                    }
                    result
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(v) => {
                    if !self.inner.authenticated_once.load(Ordering::Relaxed) {
                        self.inner.authenticated_once.store(true, Ordering::Release);
                    }
                    return Ok(v);
                }
                Err(e) if self.retryable(&e) && attempt < self.inner.settings.max_retries => {
                    let delay = self.backoff(attempt);
                    self.log_retry(what, attempt, delay, &e);
                    attempt += 1;
                    tokio::time::sleep(delay).await;
                }
                Err(e) if is_server_refusal(&e) => {
                    return Err(CommandError::Refused {
                        what: what.to_owned(),
                        error: e,
                    });
                }
                Err(e) => return Err(CommandError::Failed(self.connection_error(what, e, attempt))),
            }
        }
    }

    /// Runs one command on the shared connection with the retry policy, for extensions (for
    /// example a deduplication store) that need Redis commands of their own. Error replies
    /// are [`Error::Server`], with the server's code.
    ///
    /// ```no_run
    /// # async fn demo(conn: streamwise::redis::RedisConnection) -> streamwise::Result<()> {
    /// use streamwise::redis::client::cmd;
    /// let fresh: Option<String> = conn
    ///     .command(cmd("SET").arg("seen:42").arg(1).arg("NX").arg("PX").arg(60_000))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn command<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T> {
        self.run_mapped("command", |mut c| {
            let cmd = cmd.clone();
            async move { cmd.query_async(&mut c).await }
        })
        .await
    }

    /// Like [`run`](Self::run), mapping every refusal to [`Error::Server`] (or
    /// [`Error::Decode`] for a reply of another type than asked for).
    pub(crate) async fn run_mapped<T, F, Fut>(&self, what: &str, op: F) -> Result<T>
    where
        F: FnMut(Shared) -> Fut,
        Fut: Future<Output = std::result::Result<T, RedisError>>,
    {
        self.run(what, op).await.map_err(CommandError::into_error)
    }

    /// Sends `cmd` once, without retries, to the cluster node at `node` (`host`, `port`), or to
    /// the one server, giving up after `within`: for best-effort commands about a connection
    /// of that node (`CLIENT UNBLOCK`), which must not hold up their caller when the node is
    /// gone.
    pub(crate) async fn once_on_node(
        &self,
        node: Option<&(String, u16)>,
        cmd: &Cmd,
        within: Duration,
    ) -> std::result::Result<Value, RedisError> {
        let attempt = async {
            let (_, conn) = self.shared().await?;
            let to = node.map(|(host, port)| SingleNodeRoutingInfo::ByAddress {
                host: host.clone(),
                port: *port,
            });
            query_on(conn, cmd.clone(), to).await
        };
        match tokio::time::timeout(within, attempt).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply in time").into()),
        }
    }

    /// Like [`run_mapped`](Self::run_mapped) for a command about `key`: on a cluster, first
    /// once on the multiplexed connection to `key`'s master
    /// ([`master_multiplexed`](Self::master_multiplexed); redis-rs' cluster connection costs
    /// the client more per command), and on the shared cluster connection, with the retry
    /// policy, after any trouble there. The command must be safe to send twice (`XACK`).
    pub(crate) async fn run_mapped_at<T, F, Fut>(&self, what: &str, key: &str, mut op: F) -> Result<T>
    where
        F: FnMut(Shared) -> Fut,
        Fut: Future<Output = std::result::Result<T, RedisError>>,
    {
        if let Some((node, conn)) = self.master_multiplexed(key).await {
            match op(Shared::Single(conn)).await {
                Ok(v) => return Ok(v),
                Err(e) if is_server_refusal(&e) && !is_cluster_change(&e) => {
                    return Err(replies::refusal(what, e));
                }
                Err(_) => self.drop_master_multiplexed(&node),
            }
        }
        self.run_mapped(what, op).await
    }

    /// Runs `cmd` on the master that serves `key`'s slot (on the one server, just runs it),
    /// for keyless commands about a key (`SCAN` for a stream's keys).
    pub(crate) async fn run_for_key(&self, what: &str, key: &str, cmd: &Cmd) -> Result<Value> {
        let route = redis::cluster_routing::Route::with_key(key, redis::cluster_routing::SlotAddr::Master);
        self.run_mapped(what, |c| {
            let to = SingleNodeRoutingInfo::SpecificNode(route);
            query_on(c, cmd.clone(), Some(to))
        })
        .await
    }

    /// The nodes a keyless command must visit to see every key (`SCAN`): `[None]`, the one
    /// server, or each master of the cluster (from `CLUSTER SLOTS`, asked anew).
    pub(crate) async fn key_nodes(&self) -> Result<Vec<Option<(String, u16)>>> {
        let Target::Cluster(cluster) = &self.inner.target else {
            return Ok(vec![None]);
        };
        let reply: Value = self.command(redis::cmd("CLUSTER").arg("SLOTS")).await?;
        let owners = SlotOwners::from_reply(&reply, cluster.seed_host())
            .ok_or_else(|| replies::unexpected("CLUSTER SLOTS"))?;
        Ok(owners.masters().into_iter().map(Some).collect())
    }

    /// Runs `cmd` on `node` (one of [`key_nodes`](Self::key_nodes)) with the retry policy.
    pub(crate) async fn run_on_node(
        &self,
        what: &str,
        node: Option<&(String, u16)>,
        cmd: &Cmd,
    ) -> Result<Value> {
        self.run_mapped(what, |c| {
            let to = node.map(|(host, port)| SingleNodeRoutingInfo::ByAddress {
                host: host.clone(),
                port: *port,
            });
            query_on(c, cmd.clone(), to)
        })
        .await
    }

    /// Opens a connection of its own (for blocking reads, which would stall a shared one, and
    /// for reads sent ahead), retrying connection failures with backoff. `response_timeout`
    /// must exceed the longest `BLOCK` sent on it. On a cluster it goes to the master that
    /// serves `key`'s slot.
    pub(crate) async fn dedicated(
        &self,
        key: &str,
        response_timeout: Duration,
    ) -> Result<DedicatedConnection> {
        let mut attempt = 0;
        loop {
            match self.open_dedicated(key, response_timeout).await {
                Ok(conn) => {
                    self.connected();
                    return Ok(conn);
                }
                Err(e) if self.retryable(&e) && attempt < self.inner.settings.max_retries => {
                    let delay = self.backoff(attempt);
                    self.log_retry("connect", attempt, delay, &e);
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(self.connection_error("connect", e, attempt)),
            }
        }
    }

    /// Opens a connection of its own once, without retries (for a caller that falls back to
    /// the shared connection when it fails), with the configured response timeout; on a
    /// cluster, to the master of `key`'s slot.
    pub(crate) async fn dedicated_once(
        &self,
        key: &str,
    ) -> std::result::Result<DedicatedConnection, RedisError> {
        let conn = self
            .open_dedicated(key, self.inner.settings.response_timeout)
            .await?;
        self.connected();
        Ok(conn)
    }

    /// A multiplexed connection to the master of `key`'s slot, opened on first use and shared:
    /// for pipelines that redis-rs' cluster connection would route and gather command by
    /// command, at about twice the client's CPU per entry. `None` on one server, before the
    /// slot map is known, or when the master cannot be reached now (the caller then uses the
    /// shared connection, which retries and follows the cluster).
    pub(crate) async fn master_multiplexed(
        &self,
        key: &str,
    ) -> Option<((String, u16), MultiplexedConnection)> {
        let Target::Cluster(cluster) = &self.inner.target else {
            return None;
        };
        let node = cluster.known_owner(slot_of(key))?;
        if let Some(conn) = lock(&cluster.masters).get(&node) {
            return Some((node, conn.clone()));
        }
        let info = at_node(&cluster.seed, &node.0, node.1);
        let client = tls::open_client(info, self.inner.tls.clone(), self.url()).ok()?;
        let s = self.inner.settings;
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(s.response_timeout))
            .set_connection_timeout(Some(s.connect_timeout));
        // A master that cannot be reached is likely gone: the map is learned again.
        let conn = match client.get_multiplexed_async_connection_with_config(&config).await {
            Ok(conn) => conn,
            Err(_) => {
                cluster.forget_owners();
                return None;
            }
        };
        lock(&cluster.masters).insert(node.clone(), conn.clone());
        Some((node, conn))
    }

    /// Drops the multiplexed connection to `node` after it failed or found the slot moved,
    /// and forgets the slot map, which may name a node that is gone or no longer the master.
    pub(crate) fn drop_master_multiplexed(&self, node: &(String, u16)) {
        if let Target::Cluster(cluster) = &self.inner.target {
            lock(&cluster.masters).remove(node);
            cluster.forget_owners();
        }
    }

    /// Forgets the slot map (after a connection found it wrong); the next connection of one's
    /// own learns it again.
    pub(crate) fn forget_slot_map(&self) {
        if let Target::Cluster(cluster) = &self.inner.target {
            cluster.forget_owners();
        }
    }

    /// The master of `key`'s slot, from the slot map (learned with `CLUSTER SLOTS` when there
    /// is none); `None` on one server.
    pub(crate) async fn master_of(&self, key: &str) -> Result<Option<(String, u16)>> {
        let Target::Cluster(cluster) = &self.inner.target else {
            return Ok(None);
        };
        match self.slot_owner(cluster, slot_of(key)).await {
            Ok(owner) => Ok(Some(owner)),
            Err(e) => Err(self.connection_error("CLUSTER SLOTS", e, 0)),
        }
    }

    /// The master of `key`'s slot as the slot map knows it (`None` on one server, or before
    /// the map is learned).
    pub(crate) fn known_master(&self, key: &str) -> Option<(String, u16)> {
        let Target::Cluster(cluster) = &self.inner.target else {
            return None;
        };
        cluster.known_owner(slot_of(key))
    }

    /// One attempt at a connection of one's own for `key`: to the one server, or to the master
    /// of `key`'s slot, checked with a keyed command (a node that does not serve the slot
    /// answers `MOVED`, which is followed a few times while the cluster changes).
    async fn open_dedicated(
        &self,
        key: &str,
        response_timeout: Duration,
    ) -> std::result::Result<DedicatedConnection, RedisError> {
        let s = self.inner.settings;
        let cluster = match &self.inner.target {
            Target::Single(client) => {
                let info = client.get_connection_info();
                let tls = self.tls_setup()?;
                return DedicatedConnection::connect(info, tls, s.connect_timeout, response_timeout).await;
            }
            Target::Cluster(cluster) => cluster,
        };
        let slot = slot_of(key);
        let mut redirect = None;
        for _ in 0..MAX_REDIRECTS {
            let (host, port) = match redirect.take() {
                Some(node) => node,
                None => self.slot_owner(cluster, slot).await?,
            };
            let info = at_node(&cluster.seed, &host, port);
            // Built once per connection handle: each attempt clones an `Arc`.
            let tls = self.tls_setup()?;
            let opened = DedicatedConnection::connect(&info, tls, s.connect_timeout, response_timeout).await;
            let mut conn = opened.inspect_err(|_| cluster.forget_owners())?;
            match redis::cmd("EXISTS").arg(key).query_async::<i64>(&mut conn).await {
                Ok(_) => return Ok(conn.at_node(host, port)),
                // `ASK`: the slot is being migrated. Every command would need `ASKING` first,
                // so the caller backs off until the migration ends and the slot has one master.
                Err(e) if matches!(e.retry_method(), redis::RetryMethod::AskRedirect) => {
                    cluster.forget_owners();
                    return Err(e);
                }
                Err(e) => {
                    cluster.forget_owners();
                    redirect = Some(redirect_target(&e).ok_or(e)?);
                }
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::NotConnected,
            format!("slot {slot} moved more than {MAX_REDIRECTS} times while connecting"),
        )
        .into())
    }

    /// The master serving `slot`, from the slot map (learned with `CLUSTER SLOTS` when there
    /// is none).
    async fn slot_owner(
        &self,
        cluster: &ClusterTarget,
        slot: u16,
    ) -> std::result::Result<(String, u16), RedisError> {
        if let Some(owner) = cluster.known_owner(slot) {
            return Ok(owner);
        }
        let (generation, mut conn) = self.shared().await?;
        let reply = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async::<Value>(&mut conn)
            .await;
        if reply.as_ref().is_err_and(|e| e.is_unrecoverable_error()) {
            self.forget_shared(generation);
        }
        let reply = reply?;
        let unknown = || {
            RedisError::from(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                format!("no master serves slot {slot} (yet)"),
            ))
        };
        let owners = SlotOwners::from_reply(&reply, cluster.seed_host()).ok_or_else(unknown)?;
        let owner = owners
            .owner(slot)
            .map(|(h, p)| (h.to_owned(), p))
            .ok_or_else(unknown)?;
        *lock(&cluster.owners) = Some(owners);
        Ok(owner)
    }

    /// The TLS client configuration for a `rediss://` URL (`None` for other URLs).
    #[cfg(feature = "tls")]
    fn tls_setup(&self) -> std::result::Result<Option<TlsSetup>, RedisError> {
        let info = match &self.inner.target {
            Target::Single(client) => client.get_connection_info(),
            Target::Cluster(cluster) => &cluster.seed,
        };
        if !matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) {
            return Ok(None);
        }
        match self
            .inner
            .tls_config
            .get_or_init(|| tls::client_config(&self.inner.tls))
        {
            Ok(config) => Ok(Some(config.clone())),
            Err(reason) => Err(RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "TLS configuration",
                reason.clone(),
            ))),
        }
    }

    #[cfg(not(feature = "tls"))]
    fn tls_setup(&self) -> std::result::Result<Option<TlsSetup>, RedisError> {
        Ok(None)
    }

    /// The delay before retry number `attempt` (0-based), by the connection's retry policy
    /// ([`retry::backoff`]).
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let s = self.inner.settings;
        retry::backoff(s.retry_base_delay, s.retry_max_delay, attempt)
    }

    /// The error for a failed attempt at `what`, after `retries` retries: the server's refusal
    /// as the server said it ([`Error::Server`]), anything else as [`Error::Connection`].
    pub(crate) fn failure(&self, what: &str, e: RedisError, retries: u32) -> Error {
        if is_server_refusal(&e) {
            replies::refusal(what, e)
        } else {
            self.connection_error(what, e, retries)
        }
    }

    fn connection_error(&self, what: &str, e: RedisError, retries: u32) -> Error {
        let message = if is_auth_failure(&e) {
            format!("authentication to {} failed during {what}", self.url())
        } else if let Some(reason) = tls_refusal(&e) {
            format!("TLS handshake with {} failed during {what}: {reason}", self.url())
        } else {
            // Connection errors (refused, reset, timed out) hold no credentials.
            format!("{what} on {} failed after {retries} retries: {e}", self.url())
        };
        Error::connection(message, Some(Box::new(e)))
    }
}

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConnection")
            .field("url", &self.inner.redacted_url)
            .field("settings", &self.inner.settings)
            .finish()
    }
}

/// A command that failed: either for good on the connection (retries spent, authentication)
/// or refused by the server, which the caller may want to map.
#[derive(Debug)]
pub(crate) enum CommandError {
    Failed(Error),
    /// An error reply (or a reply of another type than asked for) to `what`: the command, or
    /// what a script was for (a script's error names only its SHA).
    Refused {
        what: String,
        error: RedisError,
    },
}

impl CommandError {
    /// The error as it is: [`Error::Server`] for an error reply, naming the command or script.
    pub(crate) fn into_error(self) -> Error {
        match self {
            CommandError::Failed(e) => e,
            CommandError::Refused { what, error } => replies::refusal(&what, error),
        }
    }

    /// The server error code (`NOGROUP`, `BUSYGROUP`, ...), if the server refused.
    pub(crate) fn code(&self) -> Option<&str> {
        match self {
            CommandError::Refused { error, .. } => error.code(),
            CommandError::Failed(_) => None,
        }
    }

    /// Whether the server refused because the stream does not exist.
    pub(crate) fn is_no_such_key(&self) -> bool {
        matches!(self, CommandError::Refused { error, .. } if replies::is_no_such_key(error))
    }
}

impl ClusterTarget {
    fn forget_owners(&self) {
        *lock(&self.owners) = None;
    }

    /// Where nodes that announce no endpoint are: the seed's host.
    fn seed_host(&self) -> &str {
        match self.seed.addr() {
            redis::ConnectionAddr::Tcp(host, _) => host.as_str(),
            #[cfg(feature = "tls")]
            redis::ConnectionAddr::TcpTls { host, .. } => host.as_str(),
            _ => "",
        }
    }

    /// The master of `slot` as the slot map knows it.
    fn known_owner(&self, slot: u16) -> Option<(String, u16)> {
        let owners = lock(&self.owners);
        owners.as_ref()?.owner(slot).map(|(h, p)| (h.to_owned(), p))
    }
}

/// `cmd` on `conn`: on a cluster to the node `to` names, when given; else routed as usual.
async fn query_on(conn: Shared, cmd: Cmd, to: Option<SingleNodeRoutingInfo>) -> redis::RedisResult<Value> {
    match (conn, to) {
        (Shared::Cluster(mut c), Some(to)) => c.route_command(cmd, RoutingInfo::SingleNode(to)).await,
        (mut c, _) => cmd.query_async(&mut c).await,
    }
}

/// How many `MOVED` replies a connection of one's own follows while it connects.
const MAX_REDIRECTS: usize = 5;

/// How often at most a refused login on reconnect is logged as a warning.
const AUTH_WARNING_EVERY: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        let conn = RedisConnection::new("redis://admin:s3cr3t@localhost:6379/2").unwrap();
        assert_eq!(conn.url(), "redis://admin:***@localhost:6379/2");
        assert!(!format!("{conn:?}").contains("s3cr3t"));
        let builder = RedisConnection::builder("redis://admin:s3cr3t@localhost");
        assert!(!format!("{builder:?}").contains("s3cr3t"));
    }
}
