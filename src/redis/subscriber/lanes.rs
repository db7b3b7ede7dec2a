//! Read lanes: connections shared by the subscriptions that read without blocking, one per
//! server node for the whole subscriber. A member of a partitioned topic reads its first
//! partitions on connections of their own (blocking reads); the partitions past that bound
//! read here in turn, so the connections a process opens stay bounded however many
//! partitions it owns.
//!
//! A lane is held for one step (a read, a claim, a page of the pending list), never while
//! waiting for new entries: a subscription on a lane reads without `BLOCK` and, when it found
//! nothing, waits [`LANE_POLL`] before it asks again. Tokio's mutex is fair, so the
//! subscriptions waiting for a lane take it in turn.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;

use crate::error::Result;
use crate::redis::connection::RedisConnection;
use crate::redis::dedicated::DedicatedConnection;

/// How long a subscription on a lane waits after a read found nothing new, before it reads
/// again (the latency a new entry may see on a partition read this way).
pub(crate) const LANE_POLL: Duration = Duration::from_millis(100);

/// One lane: the shared connection, opened on first use and again after it broke.
pub(super) type Lane = tokio::sync::Mutex<Option<DedicatedConnection>>;

/// The lane held for one step.
pub(super) type LaneGuard = OwnedMutexGuard<Option<DedicatedConnection>>;

/// Lanes by server node (`None`: the one server).
type ByNode = HashMap<Option<(String, u16)>, Arc<Lane>>;

/// The lanes of one subscriber.
#[derive(Clone, Default)]
pub(super) struct ReadLanes(Arc<Mutex<ByNode>>);

impl ReadLanes {
    fn lane(&self, node: Option<(String, u16)>) -> Arc<Lane> {
        let mut lanes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        lanes.entry(node).or_default().clone()
    }

    /// Takes the lane to the node that serves `stream` (connecting it when it has no
    /// connection), waiting for the subscriptions ahead. The lane is returned with the
    /// guard; its connection is in it.
    pub(super) async fn take(
        &self,
        conn: &RedisConnection,
        stream: &str,
        response_timeout: Duration,
    ) -> Result<(Arc<Lane>, LaneGuard)> {
        let mut fresh = None;
        let node = if conn.is_cluster() {
            match conn.known_master(stream) {
                Some(node) => Some(node),
                None => {
                    // The slot map is learned by connecting to the slot's master.
                    let c = conn.dedicated(stream, response_timeout).await?;
                    let node = c.node().cloned();
                    fresh = Some(c);
                    node
                }
            }
        } else {
            None
        };
        let lane = self.lane(node);
        let mut guard = lane.clone().lock_owned().await;
        if guard.is_none() {
            *guard = Some(match fresh {
                Some(c) => c,
                None => conn.dedicated(stream, response_timeout).await?,
            });
        }
        Ok((lane, guard))
    }
}
