//! [`GroupMonitor`]: polls how far consumer groups lag and what they hold pending, and records
//! it as gauges (with the `metrics` feature): what only the server knows, and no delivery
//! passing through a process tells.

use std::time::Duration;

use tokio::task::JoinHandle;

use super::admin;
use super::connection::RedisConnection;
use crate::error::{Error, Result, validate_name, validate_stream_name};
use crate::message::EntryId;
use crate::metrics::GroupGauges;

/// The most entries [`GroupMonitor`] counts for a group's lag where the server cannot tell.
pub const LAG_COUNT_CAP: u64 = 10_000;

/// One group on one stream, as [`GroupMonitor::poll`] found it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupFigures {
    /// The topic.
    pub topic: String,
    /// The partition, on a partitioned topic.
    pub partition: Option<u32>,
    /// The group.
    pub group: String,
    /// Entries not delivered to the group yet (counted up to [`LAG_COUNT_CAP`] where the
    /// server cannot tell).
    pub lag: u64,
    /// How long the oldest of those has waited (zero when there is none).
    pub lag_age: Duration,
    /// Entries delivered and not acknowledged.
    pub pending: u64,
    /// Since the oldest pending entry was last delivered.
    pub oldest_pending_idle: Option<Duration>,
    /// Entries in the stream.
    pub length: u64,
}

/// How long ago the entry `id` was added (its id's time against this machine's clock).
fn age_of(id: EntryId) -> Duration {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Duration::from_millis(now_ms.saturating_sub(id.ms()))
}

/// The shortest [`GroupMonitor::interval`].
pub const MIN_MONITOR_INTERVAL: Duration = Duration::from_millis(100);

/// Polls the groups it watches every [`interval`](Self::interval) (default 5 s) with
/// `XINFO GROUPS`, `XPENDING` and `XLEN`, and records per topic and group (and partition, on a
/// partitioned topic):
///
/// | gauge | what |
/// |---|---|
/// | `streamwise_group_lag_entries` | entries not delivered to the group yet (counted up to [`LAG_COUNT_CAP`] where the server cannot tell, as after a failover on Redis 7.0) |
/// | `streamwise_group_lag_seconds` | how long the oldest of those has waited |
/// | `streamwise_group_pending_entries` | entries delivered and not acknowledged |
/// | `streamwise_oldest_pending_seconds` | since the oldest pending entry was last delivered |
/// | `streamwise_stream_length_entries` | entries in the stream |
///
/// ```no_run
/// # async fn demo() -> streamwise::Result<()> {
/// use std::time::Duration;
/// use streamwise::redis::{GroupMonitor, RedisConnection};
///
/// let conn = RedisConnection::new("redis://127.0.0.1:6379")?;
/// let monitor = GroupMonitor::new(conn)
///     .watch("orders", "billing")?
///     .interval(Duration::from_secs(5))?
///     .spawn();
/// // ... until shutdown; dropping the handle stops it.
/// drop(monitor);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct GroupMonitor {
    conn: RedisConnection,
    interval: Duration,
    watched: Vec<(String, String)>,
}

impl GroupMonitor {
    /// A monitor on `conn`, watching nothing yet.
    pub fn new(conn: RedisConnection) -> Self {
        GroupMonitor {
            conn,
            interval: Duration::from_secs(5),
            watched: Vec::new(),
        }
    }

    /// Watches `group` on `topic` (a stream, or a partitioned topic: every partition).
    pub fn watch(mut self, topic: &str, group: &str) -> Result<Self> {
        validate_stream_name("topic", topic)?;
        validate_name("group", group)?;
        self.watched.push((topic.to_owned(), group.to_owned()));
        Ok(self)
    }

    /// How often it polls. Default 5 s; at least [`MIN_MONITOR_INTERVAL`].
    pub fn interval(mut self, interval: Duration) -> Result<Self> {
        if interval < MIN_MONITOR_INTERVAL {
            return Err(Error::invalid(
                "interval",
                format_args!("{interval:?} is shorter than {MIN_MONITOR_INTERVAL:?}"),
            ));
        }
        self.interval = interval;
        Ok(self)
    }

    /// Polls every watched group once, records the gauges and returns what it found. A group
    /// (or stream) not there is left out and its gauges read zero; a stream whose figures
    /// cannot be read is logged and left out, the others recorded. A few commands per stream
    /// and group, none of which walks the keyspace. An error only when a topic's partition
    /// count cannot be read.
    pub async fn poll(&self) -> Result<Vec<GroupFigures>> {
        let mut found = Vec::new();
        for (topic, group) in &self.watched {
            let partitions = match crate::partition::validate_topic(topic) {
                Ok(()) => super::coordinator::stored_partitions(&self.conn, topic).await?,
                Err(_) => None,
            };
            let streams: Vec<(Option<u32>, String)> = match partitions {
                Some(n) => (0..n)
                    .map(|p| (Some(p), crate::partition::partition_stream(topic, p)))
                    .collect(),
                None => vec![(None, topic.clone())],
            };
            for (partition, stream) in streams {
                let label = partition.map(|p| p.to_string());
                let gauges = GroupGauges::new(topic, group, label.as_deref());
                match self.figures(topic, &stream, partition, group).await {
                    Ok(Some(figures)) => {
                        gauges.record(
                            figures.lag,
                            figures.lag_age,
                            figures.pending,
                            figures.oldest_pending_idle,
                            figures.length,
                        );
                        found.push(figures);
                    }
                    // Gone (or not there yet): nothing lags, so no alert keeps firing.
                    Ok(None) => gauges.record(0, Duration::ZERO, 0, None, 0),
                    // One stream's trouble leaves the others' gauges current.
                    Err(e) => {
                        tracing::warn!(stream = %stream, group = %group, error = %e, "group monitor: this stream's figures could not be read");
                    }
                }
            }
        }
        Ok(found)
    }

    async fn figures(
        &self,
        topic: &str,
        stream: &str,
        partition: Option<u32>,
        group: &str,
    ) -> Result<Option<GroupFigures>> {
        let conn = &self.conn;
        let info = match admin::groups(conn, stream).await {
            Ok(groups) => groups.into_iter().find(|g| g.name == group),
            Err(Error::StreamNotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        let Some(info) = info else {
            return Ok(None);
        };
        let lag = match info.lag {
            Some(lag) => lag,
            None => admin::entries_after(conn, stream, info.last_delivered_id, LAG_COUNT_CAP).await?,
        };
        let after = format!("({}", info.last_delivered_id);
        let lag_age = admin::range(conn, stream, &after, "+", 1, false)
            .await?
            .first()
            .map_or(Duration::ZERO, |next| age_of(next.id));
        let oldest = admin::pending_page(conn, stream, group, "-", 1, None, 0).await?;
        Ok(Some(GroupFigures {
            topic: topic.to_owned(),
            partition,
            group: group.to_owned(),
            lag,
            lag_age,
            pending: info.pending,
            oldest_pending_idle: oldest.first().map(|p| Duration::from_millis(p.idle_ms)),
            length: admin::stream_length(conn, stream).await?,
        }))
    }

    /// Polls in a task of its own until the handle is dropped (or
    /// [`stopped`](MonitorHandle::stop)); a failed poll is logged and the next one tried.
    pub fn spawn(self) -> MonitorHandle {
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = self.poll().await {
                    tracing::warn!(error = %e, "group monitor poll failed; trying again next interval");
                }
            }
        });
        MonitorHandle(task)
    }
}

/// A running [`GroupMonitor`]; dropping it stops the monitor.
#[derive(Debug)]
pub struct MonitorHandle(JoinHandle<()>);

impl MonitorHandle {
    /// Stops the monitor.
    pub fn stop(self) {}
}

impl Drop for MonitorHandle {
    fn drop(&mut self) {
        self.0.abort();
    }
}
