//! Names of the keys streamwise keeps beside a stream.
//!
//! Every key of a stream carries the stream's Redis Cluster hash tag ([`in_slot`]), so that
//! the stream, its settings, checkpoints, leases and dead letters all live in one hash slot
//! and one script may touch them together on a cluster. The `streamwise:`-prefixed names
//! (with `:`) can never collide with a stream, whose name has no `:`.
//!
//! Release 0.1 wrote the same keys without braces (`streamwise:meta:orders`);
//! [`super::admin::migrate_key_names`] renames them once.

use crate::error::hash_tag;

/// The prefixes of the key names, for finding them with `SCAN`.
pub(crate) mod prefix {
    pub(crate) const META: &str = "streamwise:meta:";
    pub(crate) const CHECKPOINT: &str = "streamwise:checkpoint:";
    pub(crate) const LEASE: &str = "streamwise:lease:";
    pub(crate) const CONSUMERS: &str = "streamwise:consumers:";
    /// All of them, for the key-name migration.
    pub(crate) const ALL: [&str; 4] = [META, CHECKPOINT, LEASE, CONSUMERS];
    /// The members of a partitioned topic's groups (new in 0.2: nothing to migrate).
    pub(crate) const MEMBERS: &str = "streamwise:members:";
    /// Where an interrupted dead-letter replay stops (new in 0.2: nothing to migrate).
    pub(crate) const REPLAY: &str = "streamwise:replay:";
    /// A topic's delayed messages (new in 0.2: nothing to migrate).
    pub(crate) const SCHEDULED: &str = "streamwise:scheduled:";
    /// Held by the process that trims a stream now (new in 0.2: nothing to migrate).
    pub(crate) const TRIM_LEASE: &str = "streamwise:trim-lease:";
}

/// `stream` as it is written inside its keys: in braces, unless it carries a hash tag of its
/// own (a dead-letter stream `{orders}-dead`), so that the keys hash like the stream.
pub(crate) fn in_slot(stream: &str) -> std::borrow::Cow<'_, str> {
    if hash_tag(stream).is_some() {
        stream.into()
    } else {
        format!("{{{stream}}}").into()
    }
}

/// Hash of stream settings: `created_at`, `retention_ms`, `max_length`.
pub(crate) fn meta(stream: &str) -> String {
    format!("{}{}", prefix::META, in_slot(stream))
}

/// Sorted set of a topic's delayed messages ([`crate::Publisher::publish_at`]), scored by
/// their due time in milliseconds since the epoch; each member is one entry's fields, after a
/// token that keeps equal messages apart (see [`super::scheduled`]).
pub(crate) fn scheduled(stream: &str) -> String {
    format!("{}{}", prefix::SCHEDULED, in_slot(stream))
}

/// String key held for a moment by the process trimming `stream` ([`super::retention`]).
pub(crate) fn trim_lease(stream: &str) -> String {
    format!("{}{}", prefix::TRIM_LEASE, in_slot(stream))
}

/// The stream a settings hash ([`meta`]) belongs to, from the hash's name.
pub(crate) fn stream_of_meta(key: &str) -> Option<String> {
    let inner = key.strip_prefix(prefix::META)?;
    // `{orders}` for a plain name; a stream with a hash tag of its own is written as it is.
    match inner.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
        Some(plain) if !plain.contains(['{', '}']) => Some(plain.to_owned()),
        _ => Some(inner.to_owned()),
    }
}

/// Hash of checkpoints: field `<group>:<consumer>`, value `{"message_id", "timestamp"}`.
pub(crate) fn checkpoints(stream: &str) -> String {
    format!("{}{}", prefix::CHECKPOINT, in_slot(stream))
}

/// The field of one consumer in [`checkpoints`].
pub(crate) fn checkpoint_field(group: &str, consumer: &str) -> String {
    format!("{group}:{consumer}")
}

/// String key held (with a TTL) by the live consumer of that name.
pub(crate) fn lease(stream: &str, group: &str, consumer: &str) -> String {
    format!("{}{}:{group}:{consumer}", prefix::LEASE, in_slot(stream))
}

/// Set of consumer names of a group that hold leases, for telling crashed consumers apart
/// from consumers of other clients.
pub(crate) fn leased_consumers(stream: &str, group: &str) -> String {
    format!("{}{}:{group}", prefix::CONSUMERS, in_slot(stream))
}

/// What the lease keys of every group of `stream` start with: [`lease`] is this, then
/// `<group>:<consumer>` (for the scripts that look at each group's leases).
pub(crate) fn leases_of(stream: &str) -> String {
    format!("{}{}:", prefix::LEASE, in_slot(stream))
}

/// What the lease registries of every group of `stream` start with: [`leased_consumers`] is
/// this, then the group.
pub(crate) fn registries_of(stream: &str) -> String {
    format!("{}{}:", prefix::CONSUMERS, in_slot(stream))
}

/// Sorted set of the live members of `group` on the partitioned `topic`, scored by the
/// server time (ms) their record expires; [`member_tokens`] beside it.
pub(crate) fn members(topic: &str, group: &str) -> String {
    format!("{}{}:{group}", prefix::MEMBERS, in_slot(topic))
}

/// Hash of member name to the token of the process that holds it.
pub(crate) fn member_tokens(topic: &str, group: &str) -> String {
    format!("{}{}:{group}:tokens", prefix::MEMBERS, in_slot(topic))
}

/// String key, with a TTL, holding the last record id an unfinished replay of the
/// dead-letter stream `dead_letters` goes up to, so that a rerun resumes that run
/// (`ops::replay_dead_letters`).
pub(crate) fn replay(dead_letters: &str) -> String {
    format!("{}{}", prefix::REPLAY, in_slot(dead_letters))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_stream_carries_its_hash_tag() {
        for (stream, tag) in [("orders", "orders"), ("{orders}-dead", "orders"), ("a{b}", "b")] {
            let keys = [
                meta(stream),
                checkpoints(stream),
                lease(stream, "g", "c"),
                leased_consumers(stream, "g"),
                crate::dead_letter::stream_for(stream),
                replay(&crate::dead_letter::stream_for(stream)),
            ];
            for key in keys {
                assert_eq!(hash_tag(&key), Some(tag), "{key}");
            }
        }
        assert_eq!(meta("orders"), "streamwise:meta:{orders}");
        assert_eq!(
            lease("orders", "billing", "w-1"),
            "streamwise:lease:{orders}:billing:w-1"
        );
        assert_eq!(
            leased_consumers("orders", "billing"),
            "streamwise:consumers:{orders}:billing"
        );
        assert_eq!(
            format!("{}billing:w-1", leases_of("orders")),
            lease("orders", "billing", "w-1")
        );
        assert_eq!(
            format!("{}billing", registries_of("orders")),
            leased_consumers("orders", "billing")
        );
    }

    #[test]
    fn keys_of_different_streams_differ() {
        let streams = ["orders", "{orders}-dead", "orders-dead", "{orders}x", "x{orders}"];
        let metas: std::collections::HashSet<_> = streams.iter().map(|s| meta(s)).collect();
        assert_eq!(metas.len(), streams.len());
    }
}
