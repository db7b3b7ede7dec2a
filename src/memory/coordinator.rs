//! The in-memory backend's [`PartitionCoordinator`]: partition counts and group members kept
//! in the broker, with the same semantics as on Redis.

use std::collections::HashMap;
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;

use super::Broker;
use crate::error::{Error, Result};
use crate::partition::{Membership, PartitionCoordinator, validate_partitions, validate_topic};

/// The partition state of one broker.
#[derive(Debug, Default)]
pub(super) struct Partitions {
    counts: HashMap<String, u32>,
    /// Per topic and group: member name to (token, live until).
    members: HashMap<(String, String), HashMap<String, (String, Instant)>>,
}

impl Partitions {
    /// The partition count of `topic`, if it is partitioned.
    pub(super) fn count(&self, topic: &str) -> Option<u32> {
        self.counts.get(topic).copied()
    }
}

/// Keeps partition counts and group members for a [`MemoryBackend`](super::MemoryBackend)'s
/// partitioned topics.
#[derive(Clone, Debug)]
pub struct MemoryCoordinator {
    pub(super) broker: Arc<Broker>,
}

impl MemoryCoordinator {
    fn state(&self) -> MutexGuard<'_, Partitions> {
        self.broker.partitions()
    }
}

fn check_member(topic: &str, group: &str, member: &str) -> Result<()> {
    validate_topic(topic)?;
    crate::validate_name("group", group)?;
    crate::validate_name("consumer", member)
}

impl PartitionCoordinator for MemoryCoordinator {
    fn partitions<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Option<u32>>> {
        let result = validate_topic(topic).map(|()| self.state().count(topic));
        Box::pin(std::future::ready(result))
    }

    fn create_partitions<'a>(&'a self, topic: &'a str, partitions: u32) -> BoxFuture<'a, Result<u32>> {
        let result = validate_topic(topic)
            .and_then(|()| validate_partitions(partitions))
            .and_then(|()| {
                let mut state = self.state();
                if !state.counts.contains_key(topic) && self.broker.get(topic).is_some() {
                    return Err(crate::partition::stream_in_the_way(topic));
                }
                let stored = *state.counts.entry(topic.to_owned()).or_insert(partitions);
                self.broker
                    .any_partitioned
                    .store(true, std::sync::atomic::Ordering::Release);
                Ok(stored)
            });
        Box::pin(std::future::ready(result))
    }

    fn delete_partitions<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<()>> {
        let result = validate_topic(topic).map(|()| {
            self.state().counts.remove(topic);
        });
        Box::pin(std::future::ready(result))
    }

    fn heartbeat<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        member: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Membership>> {
        let result = check_member(topic, group, member).map(|()| {
            let now = Instant::now();
            let mut state = self.state();
            let members = state
                .members
                .entry((topic.to_owned(), group.to_owned()))
                .or_default();
            members.retain(|_, (_, until)| *until > now);
            if members.get(member).is_some_and(|(holder, _)| holder != token) {
                return Membership::Taken;
            }
            members.insert(member.to_owned(), (token.to_owned(), now + ttl));
            let mut live: Vec<String> = members.keys().cloned().collect();
            live.sort_unstable();
            Membership::Live(live)
        });
        Box::pin(std::future::ready(result))
    }

    fn leave<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        member: &'a str,
        token: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        let result = check_member(topic, group, member).map(|()| {
            let mut state = self.state();
            if let Some(members) = state.members.get_mut(&(topic.to_owned(), group.to_owned()))
                && members.get(member).is_some_and(|(holder, _)| holder == token)
            {
                members.remove(member);
            }
        });
        Box::pin(std::future::ready(result))
    }
}

/// [`Error::Partitioned`] when `topic` is a partitioned topic of `partitions`.
pub(super) fn refuse_partitioned(broker: &Broker, topic: &str) -> Result<()> {
    if !broker.any_partitioned.load(std::sync::atomic::Ordering::Acquire) {
        return Ok(());
    }
    match broker.partitions().count(topic) {
        Some(partitions) => Err(Error::Partitioned {
            topic: topic.to_owned(),
            partitions,
        }),
        None => Ok(()),
    }
}
