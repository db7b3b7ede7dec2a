//! Names of the keys streamwise keeps beside a stream. Stream names match `[A-Za-z0-9_-]+`, so
//! these `streamwise:`-prefixed names (with `:`) can never collide with a stream.

/// Hash of stream settings: `created_at`, `retention_ms`, `max_length`.
pub(crate) fn meta(stream: &str) -> String {
    format!("streamwise:meta:{stream}")
}

/// Hash of checkpoints: field `<group>:<consumer>`, value `{"message_id", "timestamp"}`.
pub(crate) fn checkpoints(stream: &str) -> String {
    format!("streamwise:checkpoint:{stream}")
}

/// The field of one consumer in [`checkpoints`].
pub(crate) fn checkpoint_field(group: &str, consumer: &str) -> String {
    format!("{group}:{consumer}")
}

/// String key held (with a TTL) by the live consumer of that name.
pub(crate) fn lease(stream: &str, group: &str, consumer: &str) -> String {
    format!("streamwise:lease:{stream}:{group}:{consumer}")
}

/// Set of consumer names of a group that hold leases, for telling crashed consumers apart
/// from consumers of other clients.
pub(crate) fn leased_consumers(stream: &str, group: &str) -> String {
    format!("streamwise:consumers:{stream}:{group}")
}
