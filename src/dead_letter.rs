//! Dead-letter records: what a backend or middleware writes to `{<stream>}-dead` when it gives
//! up on an entry (too many deliveries, undecodable, trimmed while pending).
//!
//! A record is an ordinary message, so a dead-letter stream can be consumed like any other.
//! It keeps the original event type, payload and UUID where there is a message, and says why
//! and where from in its metadata, under the [`keys`].

use bytes::Bytes;

use crate::message::{EntryId, Message};

/// The suffix of dead-letter streams.
pub const SUFFIX: &str = "-dead";

/// Event type of the record for an entry that could not be decoded; its payload is a JSON
/// object of the entry's fields (as text, invalid UTF-8 replaced).
pub const UNDECODABLE_EVENT_TYPE: &str = "streamwise.undecodable";

/// Event type of the record for an entry that was trimmed from its stream while pending; its
/// payload is `null`.
pub const TRIMMED_EVENT_TYPE: &str = "streamwise.trimmed";

/// The metadata keys of a record.
pub mod keys {
    /// Why the entry was dead-lettered.
    pub const REASON: &str = "dead_letter.reason";
    /// The entry id in the source stream.
    pub const ORIGINAL_ID: &str = "dead_letter.original_id";
    /// The source stream.
    pub const STREAM: &str = "dead_letter.stream";
    /// The consumer group that gave up.
    pub const GROUP: &str = "dead_letter.group";
    /// How many times the entry had been delivered.
    pub const DELIVERY_COUNT: &str = "dead_letter.delivery_count";
}

/// The metadata keys of a message replayed from a dead-letter stream (the Redis backend's
/// `redis::ops::replay_dead_letters`). A replayed message drops the record's own [`keys`]
/// (a new record, if it fails again, gets fresh ones) and carries these instead.
pub mod replay_keys {
    /// The id the record had in its dead-letter stream.
    pub const RECORD_ID: &str = "replay.record_id";
    /// How many times the message has been replayed, this time included.
    pub const COUNT: &str = "replay.count";
    /// The reason it had been dead-lettered for.
    pub const REASON: &str = "replay.reason";
    /// The group that had dead-lettered it: a replay to the source stream reaches every group
    /// of the stream, and the others may skip it by this key.
    pub const GROUP: &str = "replay.group";
}

/// The stream whose dead letters `dead_letters` holds, when it is named like one
/// (the inverse of [`stream_for`]).
///
/// ```
/// use streamwise::dead_letter::source_of;
/// assert_eq!(source_of("{orders}-dead"), Some("orders"));
/// assert_eq!(source_of("x{orders}-dead"), Some("x{orders}"));
/// assert_eq!(source_of("orders"), None);
/// ```
pub fn source_of(dead_letters: &str) -> Option<&str> {
    let base = dead_letters.strip_suffix(SUFFIX)?;
    let plain = base.strip_prefix('{').and_then(|b| b.strip_suffix('}'));
    [plain, Some(base)]
        .into_iter()
        .flatten()
        .find(|source| !source.is_empty() && stream_for(source) == dead_letters)
}

/// The dead-letter stream of `stream`: `{<stream>}-dead`, in the same Redis Cluster hash slot
/// as `stream` (a stream that carries a hash tag of its own keeps it: `<stream>-dead`).
///
/// ```
/// use streamwise::dead_letter::stream_for;
/// assert_eq!(stream_for("orders"), "{orders}-dead");
/// assert_eq!(stream_for("{orders}-dead"), "{orders}-dead-dead");
/// ```
pub fn stream_for(stream: &str) -> String {
    if crate::error::hash_tag(stream).is_some() {
        format!("{stream}{SUFFIX}")
    } else {
        format!("{{{stream}}}{SUFFIX}")
    }
}

/// Why a backend gives up on an entry by itself (rather than a handler, through
/// [`Delivery::dead_letter`](crate::Delivery::dead_letter)). Its `Display` is the reason
/// the record keeps: the same words on every backend.
#[derive(Clone, Debug, PartialEq, Eq)]
// Entry sizes and lost retries are only the Redis subscriber's to meet.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) enum GaveUp<'a> {
    /// Delivered `delivered` times, and the subscription's `max_deliveries` is `limit`.
    TooManyDeliveries { delivered: u64, limit: u64 },
    /// Trimmed from its stream before it was acknowledged.
    Trimmed,
    /// An entry of `size` bytes, above the subscriber's `max_entry_size`.
    TooLarge { size: usize, limit: usize },
    /// A nacked entry no longer pending in `group` when its retry was due.
    NoLongerPending { group: &'a str },
}

impl std::fmt::Display for GaveUp<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GaveUp::TooManyDeliveries { delivered, limit } => {
                write!(f, "delivered {delivered} times, the limit is {limit}")
            }
            GaveUp::Trimmed => f.write_str("trimmed from the stream while pending"),
            GaveUp::TooLarge { size, limit } => {
                write!(f, "entry of {size} bytes is larger than max_entry_size {limit}")
            }
            // Most often its group was re-created past it; it may also have been taken over
            // and settled by another consumer while this one was cut off past its lease.
            GaveUp::NoLongerPending { group } => write!(
                f,
                "no longer pending in group {group} when its retry was due: the group was re-created past it \
                 (it would not be delivered again), or another consumer took it over while this one \
                 was cut off"
            ),
        }
    }
}

/// Why and from where an entry is dead-lettered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter<'a> {
    /// Why.
    pub reason: &'a str,
    /// The entry id in the source stream.
    pub original_id: EntryId,
    /// The source stream.
    pub stream: &'a str,
    /// The consumer group.
    pub group: &'a str,
    /// Deliveries so far.
    pub delivery_count: u64,
}

impl DeadLetter<'_> {
    fn annotate(&self, message: Message) -> Message {
        message
            .with_metadata(keys::REASON, self.reason)
            .with_metadata(keys::ORIGINAL_ID, self.original_id.to_string())
            .with_metadata(keys::STREAM, self.stream)
            .with_metadata(keys::GROUP, self.group)
            .with_metadata(keys::DELIVERY_COUNT, self.delivery_count.to_string())
    }

    /// The record for a message that was decoded: the message itself, annotated.
    pub fn for_message(&self, original: &Message) -> Message {
        self.annotate(original.clone())
    }

    /// The record for an entry that could not be decoded, keeping its raw fields.
    pub fn for_undecodable<K: AsRef<[u8]>, V: AsRef<[u8]>>(&self, fields: &[(K, V)]) -> Message {
        let object: serde_json::Map<String, serde_json::Value> = fields
            .iter()
            .map(|(k, v)| {
                let text = String::from_utf8_lossy(v.as_ref()).into_owned();
                (
                    String::from_utf8_lossy(k.as_ref()).into_owned(),
                    serde_json::Value::String(text),
                )
            })
            .collect();
        let payload = serde_json::to_vec(&object).unwrap_or_else(|_| b"{}".to_vec());
        self.annotate(Self::record(UNDECODABLE_EVENT_TYPE, payload))
    }

    /// The record for an entry that was trimmed away while pending (nothing left of it).
    pub fn for_trimmed(&self) -> Message {
        self.annotate(Self::record(TRIMMED_EVENT_TYPE, b"null".to_vec()))
    }

    fn record(event_type: &'static str, payload: Vec<u8>) -> Message {
        match Message::from_json_bytes(event_type, Bytes::from(payload)) {
            Ok(m) => m,
            // The event types above are constants, never empty.
            Err(_) => unreachable!("dead-letter event types are not empty"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn why() -> DeadLetter<'static> {
        DeadLetter {
            reason: "exceeded 3 deliveries",
            original_id: EntryId::new(5, 1),
            stream: "orders",
            group: "billing",
            delivery_count: 3,
        }
    }

    #[test]
    fn records_carry_the_reason_and_origin() {
        let original = Message::new("order.placed", &1).unwrap().with_metadata("k", "v");
        let record = why().for_message(&original);
        assert_eq!(record.event_type(), "order.placed");
        assert_eq!(record.uuid(), original.uuid());
        let m = record.metadata();
        assert_eq!(m.get("k"), Some("v"));
        assert_eq!(m.get(keys::REASON), Some("exceeded 3 deliveries"));
        assert_eq!(m.get(keys::ORIGINAL_ID), Some("5-1"));
        assert_eq!(m.get(keys::STREAM), Some("orders"));
        assert_eq!(m.get(keys::GROUP), Some("billing"));
        assert_eq!(m.get(keys::DELIVERY_COUNT), Some("3"));
    }

    #[test]
    fn undecodable_and_trimmed_records_are_valid_messages() {
        let raw = vec![(b"payload".to_vec(), vec![0xff, b'x'])];
        let record = why().for_undecodable(&raw);
        assert_eq!(record.event_type(), UNDECODABLE_EVENT_TYPE);
        assert_eq!(
            record.json().unwrap(),
            serde_json::json!({"payload": "\u{fffd}x"})
        );
        let record = why().for_trimmed();
        assert_eq!(record.event_type(), TRIMMED_EVENT_TYPE);
        assert_eq!(record.json().unwrap(), serde_json::Value::Null);
    }
}
