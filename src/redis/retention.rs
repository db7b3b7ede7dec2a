//! Retention that keeps its promise: [`trim`] applies a stream's retention and length limit
//! now, safely by choice (never below an entry a group still needs); [`Retention`] applies
//! every stream's settings in the background, whether or not anyone publishes, each stream at
//! most once per interval and by one process at a time.
//!
//! | setting | deletes | when |
//! |---|---|---|
//! | `retention_ms` (seed default 24 h) | entries older than it | on publish (about, at most once a second per stream, `XTRIM MINID ~`) and, with a [`Retention`] task running, also while the stream is quiet |
//! | `max_length` | the oldest entries past that count | on publish (about, `XADD MAXLEN ~`) and with a [`Retention`] task |
//! | [`TrimPolicy::safe`] (a [`Retention`] task's default) | nothing a group still needs: below its oldest pending entry, or (a group with live consumers) below the first entry it has not been delivered; a group without live consumers whose consumers all idled past `idle_group_age` (7 days) no longer holds back | each trim of the task |
//!
//! The publish-time trims stay what the seed API promised (time and length, whatever groups
//! still need); a safe [`Retention`] task is the way to keep lagging groups whole.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Value;

use super::connection::RedisConnection;
use super::protocol::replies;
use super::{keys, scripts};
use crate::error::{Result, validate_stream_name};
use crate::signal::Signal;

/// How long a group's consumers may all idle before the group stops holding a safe trim back,
/// unless told otherwise: 7 days.
pub const DEFAULT_IDLE_GROUP_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// What one trim applies.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TrimPolicy {
    /// Entries older than this go.
    pub retention: Option<Duration>,
    /// The oldest entries past this count go.
    pub max_length: Option<u64>,
    /// Never below an entry a group still needs (see [the module](self)). Default on.
    pub safe: bool,
    /// A group without live consumers whose consumers have all been idle this long no
    /// longer holds a safe trim back (one with a live consumer always does). Default 7 days.
    pub idle_group_age: Duration,
}

impl Default for TrimPolicy {
    fn default() -> Self {
        TrimPolicy {
            retention: None,
            max_length: None,
            safe: true,
            idle_group_age: DEFAULT_IDLE_GROUP_AGE,
        }
    }
}

impl TrimPolicy {
    /// Entries older than `retention` go.
    #[must_use]
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = Some(retention);
        self
    }

    /// The oldest entries past `n` go.
    #[must_use]
    pub fn max_length(mut self, n: u64) -> Self {
        self.max_length = Some(n);
        self
    }

    /// Whether groups hold the trim back (default on).
    #[must_use]
    pub fn safe(mut self, safe: bool) -> Self {
        self.safe = safe;
        self
    }

    /// How long a group's consumers may all idle before it stops holding back.
    #[must_use]
    pub fn idle_group_age(mut self, age: Duration) -> Self {
        self.idle_group_age = age;
        self
    }
}

/// What one trim did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Trimmed {
    /// Entries removed.
    pub removed: u64,
    /// A group still needed entries the policy would have removed: the trim stopped there.
    pub held_back: bool,
    /// Groups whose consumers had all idled past the policy's age, and did not hold back.
    pub idle_groups: Vec<String>,
}

/// Applies `policy` to `stream` now, in one script step.
pub async fn trim(conn: &RedisConnection, stream: &str, policy: &TrimPolicy) -> Result<Trimmed> {
    validate_stream_name("stream", stream)?;
    let first_kept = policy.retention.map(|retention| {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let cut = now.saturating_sub(retention).as_millis();
        format!("{cut}-0")
    });
    let idle_ms = u64::try_from(policy.idle_group_age.as_millis()).unwrap_or(u64::MAX);
    let reply: Vec<Value> = conn
        .run_mapped("trim", |mut c| {
            let mut call = scripts::SAFE_TRIM.key(stream);
            call.arg(first_kept.clone().unwrap_or_default())
                .arg(policy.max_length.unwrap_or(0))
                .arg(if policy.safe { "0" } else { "1" })
                .arg(idle_ms)
                .arg(keys::registries_of(stream))
                .arg(keys::leases_of(stream));
            async move { call.invoke_async(&mut c).await }
        })
        .await?;
    match reply.as_slice() {
        [Value::Int(removed), Value::Int(held), idle] => {
            let idle_groups: Vec<String> =
                redis::from_redis_value(idle.clone()).map_err(|e| replies::refusal("trim", e.into()))?;
            if !idle_groups.is_empty() {
                tracing::info!(stream, groups = ?idle_groups, "groups idle past their age no longer hold retention back");
            }
            Ok(Trimmed {
                removed: u64::try_from(*removed).unwrap_or(0),
                held_back: *held == 1,
                idle_groups,
            })
        }
        _ => Err(replies::unexpected("trim")),
    }
}

/// What a [`Retention`] task did so far.
#[derive(Debug, Default)]
pub struct RetentionStats {
    trims: AtomicU64,
    removed: AtomicU64,
    held_back: AtomicU64,
    idle_groups_ignored: AtomicU64,
    failures: AtomicU64,
}

impl RetentionStats {
    /// Trims made (each with this task's lease on the stream).
    pub fn trims(&self) -> u64 {
        self.trims.load(Ordering::Relaxed)
    }
    /// Entries removed.
    pub fn removed(&self) -> u64 {
        self.removed.load(Ordering::Relaxed)
    }
    /// Trims that stopped short because a group still needed entries.
    pub fn held_back(&self) -> u64 {
        self.held_back.load(Ordering::Relaxed)
    }
    /// Times a group idle past its age was passed over.
    pub fn idle_groups_ignored(&self) -> u64 {
        self.idle_groups_ignored.load(Ordering::Relaxed)
    }
    /// Trims or looks at settings that failed (each retried at the next round).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// Applies every stream's `retention_ms` and `max_length` (its settings hash,
/// [`create_stream`](super::admin::create_stream)) in the background, whether or not anyone
/// publishes: each stream at most once per `interval` (jittered), and, with several processes
/// running one, by one of them at a time (a short lease in the stream's slot). Streams are
/// found by their settings, looked for again every `discover_every`.
///
/// ```no_run
/// # async fn demo(conn: streamwise::redis::RedisConnection) {
/// use streamwise::redis::retention::Retention;
///
/// let retention = Retention::new(conn).spawn();
/// // ... later
/// println!("{} entries trimmed", retention.stats().removed());
/// retention.stop().await;
/// # }
/// ```
#[derive(Debug)]
pub struct Retention {
    conn: RedisConnection,
    policy: TrimPolicy,
    interval: Duration,
    discover_every: Duration,
}

impl Retention {
    /// A task on `conn`, trimming safely (see [`TrimPolicy`]), each stream once a second.
    pub fn new(conn: RedisConnection) -> Self {
        Retention {
            conn,
            policy: TrimPolicy::default(),
            interval: Duration::from_secs(1),
            discover_every: Duration::from_secs(10),
        }
    }

    /// Whether groups hold trims back (default on).
    #[must_use]
    pub fn safe(mut self, safe: bool) -> Self {
        self.policy.safe = safe;
        self
    }

    /// How long a group's consumers may all idle before it stops holding back (7 days).
    #[must_use]
    pub fn idle_group_age(mut self, age: Duration) -> Self {
        self.policy.idle_group_age = age;
        self
    }

    /// How often at most one stream is trimmed (default 1 s; at least 100 ms).
    #[must_use]
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(100));
        self
    }

    /// Starts the task.
    pub fn spawn(self) -> RetentionHandle {
        let stats = Arc::new(RetentionStats::default());
        let stop = Signal::new();
        let task = tokio::spawn(self.run(stats.clone(), stop.clone()));
        RetentionHandle { stats, stop, task }
    }

    async fn run(self, stats: Arc<RetentionStats>, stop: Signal) {
        let token = uuid::Uuid::now_v7().to_string();
        let mut streams: Vec<String> = Vec::new();
        let mut discovered: Option<tokio::time::Instant> = None;
        let mut settings: HashMap<String, TrimPolicy> = HashMap::new();
        loop {
            if discovered.is_none_or(|at| at.elapsed() >= self.discover_every) {
                match self.discover().await {
                    Ok(found) => {
                        streams = found;
                        settings.clear();
                        discovered = Some(tokio::time::Instant::now());
                    }
                    Err(e) => {
                        stats.failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "retention: streams not listed; retrying");
                    }
                }
            }
            fastrand::shuffle(&mut streams);
            for stream in &streams {
                if stop.is_cancelled() {
                    return;
                }
                if let Err(e) = self.round(stream, &token, &stats, &mut settings).await {
                    stats.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(stream = %stream, error = %e, "retention: trim failed; retrying");
                }
            }
            // Jittered, so that processes started together spread their rounds.
            let wait = self.interval.mul_f64(0.8 + 0.4 * fastrand::f64());
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The streams with settings.
    async fn discover(&self) -> Result<Vec<String>> {
        let pattern = format!("{}*", keys::prefix::META);
        let found = super::admin::scan_with(&self.conn, &pattern, Some("hash"), None).await?;
        Ok(found.iter().filter_map(|key| keys::stream_of_meta(key)).collect())
    }

    /// Trims `stream` by its settings, if this task gets the stream's lease for this round.
    async fn round(
        &self,
        stream: &str,
        token: &str,
        stats: &RetentionStats,
        settings: &mut HashMap<String, TrimPolicy>,
    ) -> Result<()> {
        let policy = match settings.get(stream) {
            Some(policy) => policy.clone(),
            None => {
                let (retention_ms, max_length) = super::admin::stream_settings(&self.conn, stream)
                    .await
                    .map(|(s, _)| (s.retention_ms, s.max_length))?;
                let mut policy = self.policy.clone();
                policy.retention = retention_ms.map(Duration::from_millis);
                policy.max_length = max_length;
                settings.insert(stream.to_owned(), policy.clone());
                policy
            }
        };
        if policy.retention.is_none() && policy.max_length.is_none() {
            return Ok(());
        }
        let lease_ms = u64::try_from(self.interval.as_millis()).unwrap_or(1000);
        let taken: Option<String> = self
            .conn
            .command(
                redis::cmd("SET")
                    .arg(keys::trim_lease(stream))
                    .arg(token)
                    .arg("NX")
                    .arg("PX")
                    .arg(lease_ms),
            )
            .await?;
        if taken.is_none() {
            return Ok(());
        }
        let trimmed = trim(&self.conn, stream, &policy).await?;
        stats.trims.fetch_add(1, Ordering::Relaxed);
        stats.removed.fetch_add(trimmed.removed, Ordering::Relaxed);
        if trimmed.held_back {
            stats.held_back.fetch_add(1, Ordering::Relaxed);
        }
        stats
            .idle_groups_ignored
            .fetch_add(trimmed.idle_groups.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// A running [`Retention`] task.
#[derive(Debug)]
pub struct RetentionHandle {
    stats: Arc<RetentionStats>,
    stop: Signal,
    task: tokio::task::JoinHandle<()>,
}

impl RetentionHandle {
    /// What the task did so far.
    pub fn stats(&self) -> &RetentionStats {
        &self.stats
    }

    /// Stops the task after the trim under way.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}
