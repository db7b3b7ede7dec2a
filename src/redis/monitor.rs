//! [`GroupMonitor`]: polls how far consumer groups lag and what they hold pending, and records
//! it as gauges (with the `metrics` feature): what only the server knows, and no delivery
//! passing through a process tells.

use std::time::Duration;

use tokio::task::JoinHandle;

use super::connection::RedisConnection;
use super::ops::{GroupOverview, groups};
use crate::error::{Error, Result, validate_name, validate_stream_name};
use crate::metrics::GroupGauges;

/// The shortest [`GroupMonitor::interval`].
pub const MIN_MONITOR_INTERVAL: Duration = Duration::from_millis(100);

/// Polls the groups it watches every [`interval`](Self::interval) (default 5 s) with
/// `XINFO GROUPS`, `XPENDING` and `XLEN`, and records per topic and group (and partition, on a
/// partitioned topic):
///
/// | gauge | what |
/// |---|---|
/// | `streamwise_group_lag_entries` | entries not delivered to the group yet (counted up to 10,000 where the server cannot tell, as after a failover on Redis 7.0) |
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

    /// Polls every watched group once, records the gauges and returns what it found (a group
    /// not created yet, or on a topic not created yet, is left out).
    pub async fn poll(&self) -> Result<Vec<GroupOverview>> {
        let mut found = Vec::new();
        for (topic, group) in &self.watched {
            let overview = match groups(&self.conn, topic).await {
                Ok(overview) => overview,
                Err(Error::StreamNotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            for g in overview.groups.into_iter().filter(|g| &g.group == group) {
                let length = super::admin::stream_length(&self.conn, &g.stream).await?;
                let partition = g.partition.map(|p| p.to_string());
                let gauges = GroupGauges::new(topic, group, partition.as_deref());
                gauges.record(
                    g.lag.unwrap_or(0),
                    Duration::from_millis(g.lag_ms),
                    g.pending,
                    g.oldest_pending_idle_ms.map(Duration::from_millis),
                    length,
                );
                found.push(g);
            }
        }
        Ok(found)
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
