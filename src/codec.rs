//! The wire format of a stream entry: how a [`Message`] becomes field/value pairs and back,
//! whatever backend stores them (the Redis backend writes them as stream entries; the
//! in-memory backend uses the same checks, so that both refuse the same input).
//!
//! | field | content |
//! |---|---|
//! | `event_type` | non-empty string, the routing key |
//! | `payload` | JSON text |
//! | `metadata` | JSON object of string values; omitted when empty |
//! | `timestamp` | ISO 8601 UTC, e.g. `2026-11-22T10:00:00.123Z` |
//! | `uuid` | producer-assigned UUID v7 |
//!
//! Entries written by other clients decode as long as they have `event_type` and a JSON
//! `payload`; a missing `timestamp` is taken from the entry id, a missing `uuid` is derived
//! from the entry id, and unknown fields are ignored. [`Codec`] lets another layout plug in.
//!
//! The size limit of an entry is counted here too ([`encoded_size`], [`wire_size`]), with its
//! default ([`DEFAULT_MAX_ENTRY_SIZE`]), the same on every backend.

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::message::{EntryId, Message, Metadata, check_json, parse_timestamp};

/// The default limit on the encoded size of one entry ([`encoded_size`]): 1 MiB, on every
/// backend.
pub const DEFAULT_MAX_ENTRY_SIZE: usize = 1024 * 1024;

// The field names of the standard layout.
const EVENT_TYPE: &str = "event_type";
const PAYLOAD: &str = "payload";
const METADATA: &str = "metadata";
const TIMESTAMP: &str = "timestamp";
const UUID: &str = "uuid";

/// The length of a `timestamp` value (`2026-11-22T10:00:00.123Z`) and of a `uuid` value.
const TIMESTAMP_LEN: usize = 24;
const UUID_LEN: usize = 36;

/// An entry as read from a stream: its id and its field/value pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawEntry {
    /// The entry id.
    pub id: EntryId,
    /// Field/value pairs in stream order. Read from Redis, they are slices of the reply they
    /// came in (no copy); a value kept (a message's payload) keeps that reply's buffer alive.
    pub fields: Vec<(Bytes, Bytes)>,
}

impl RawEntry {
    /// The entry's size as [`encoded_size`] counts it: field names and values, in bytes.
    pub fn size(&self) -> usize {
        self.fields.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

/// Turns messages into stream entries and back. Implement it for another layout (for example
/// Watermill's or natricine's field names).
pub trait Codec: Send + Sync + 'static {
    /// The field/value pairs to append for `message`.
    fn encode(&self, message: &Message) -> Result<Vec<(&'static str, Bytes)>>;

    /// Hands the field/value pairs of `message` to `field`, in order, and returns their size
    /// as [`encoded_size`] counts it. The publisher uses this; the default goes through
    /// [`encode`](Self::encode). Override it to write the fields without building them first.
    fn encode_with(&self, message: &Message, field: &mut dyn FnMut(&'static str, &[u8])) -> Result<usize> {
        let fields = self.encode(message)?;
        for (name, value) in &fields {
            field(name, value);
        }
        Ok(encoded_size(&fields))
    }

    /// The message stored in `entry`. Errors are [`Error::Decode`] with the reason; the
    /// subscriber dead-letters such entries.
    fn decode(&self, entry: RawEntry) -> Result<Message>;

    /// Like [`decode`](Self::decode), but hands the entry back on failure, for the subscriber's
    /// dead-letter record. The default keeps a copy of the entry while decoding; override it
    /// when the codec can check an entry before taking it apart, to save that copy.
    fn decode_or_return(&self, entry: RawEntry) -> std::result::Result<Message, (Error, RawEntry)> {
        let copy = entry.clone();
        self.decode(entry).map_err(|e| (e, copy))
    }

    /// Whether [`decode`](Self::decode) refuses every payload that is not valid JSON (UTF-8
    /// included), as [`JsonCodec`] does. Default `false`: the subscriber then checks each
    /// decoded payload itself, so that nothing that is not JSON reaches a handler whatever
    /// the codec. Return `true` only when `decode` makes that check already.
    fn checks_json(&self) -> bool {
        false
    }
}

/// The standard layout: `event_type`, `payload` (JSON), `metadata` (a JSON object of strings, left
/// out when empty), `timestamp` (ISO 8601 UTC, milliseconds), `uuid`.
#[derive(Clone, Copy, Debug, Default)]
pub struct JsonCodec;

/// The size of an encoded entry: the sum of its field names and values.
pub fn encoded_size(fields: &[(&'static str, Bytes)]) -> usize {
    fields.iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// The size in bytes of `message` as an entry in the standard layout ([`JsonCodec`]), as
/// [`encoded_size`] counts it, without encoding it: the field names and values of
/// `event_type`, `payload`, `metadata` when not empty, `timestamp` and `uuid`. This is the
/// size the entry limit applies to.
///
/// ```
/// use streamwise::{Message, codec::{Codec, JsonCodec, encoded_size, wire_size}};
/// let message = Message::new("price.update", &150.25)?.with_metadata("source", "feed");
/// assert_eq!(wire_size(&message), encoded_size(&JsonCodec.encode(&message)?));
/// # Ok::<(), streamwise::Error>(())
/// ```
pub fn wire_size(message: &Message) -> usize {
    const FIXED: usize =
        EVENT_TYPE.len() + PAYLOAD.len() + TIMESTAMP.len() + TIMESTAMP_LEN + UUID.len() + UUID_LEN;
    let metadata = if message.metadata().is_empty() {
        0
    } else {
        let mut counter = ByteCounter(0);
        // Writing a map of strings into a counter cannot fail.
        let _ = serde_json::to_writer(&mut counter, message.metadata());
        METADATA.len() + counter.0
    };
    FIXED + message.event_type().len() + message.payload().len() + metadata
}

/// Counts the bytes written to it.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Codec for JsonCodec {
    fn encode(&self, message: &Message) -> Result<Vec<(&'static str, Bytes)>> {
        // The layout lives in `encode_with`; the payload is shared, not copied.
        let mut fields = Vec::with_capacity(5);
        self.encode_with(message, &mut |name, value| {
            let value = match name {
                PAYLOAD => message.payload().clone(),
                _ => Bytes::copy_from_slice(value),
            };
            fields.push((name, value));
        })?;
        Ok(fields)
    }

    fn encode_with(&self, message: &Message, field: &mut dyn FnMut(&'static str, &[u8])) -> Result<usize> {
        // The wire layout, from stack buffers instead of an allocation each.
        field(EVENT_TYPE, message.event_type().as_bytes());
        field(PAYLOAD, message.payload());
        let mut size = EVENT_TYPE.len() + message.event_type().len() + PAYLOAD.len();
        size += message.payload().len();
        if !message.metadata().is_empty() {
            let json = serde_json::to_vec(message.metadata()).map_err(Error::Encode)?;
            field(METADATA, &json);
            size += METADATA.len() + json.len();
        }
        let mut time = [0u8; TIMESTAMP_LEN];
        let owned;
        let timestamp = match crate::message::format_fast(message.timestamp(), &mut time) {
            Some(text) => text,
            None => {
                owned = message.timestamp_rfc3339();
                &owned
            }
        };
        field(TIMESTAMP, timestamp.as_bytes());
        let mut uuid = Uuid::encode_buffer();
        let uuid = message.uuid().hyphenated().encode_lower(&mut uuid);
        field(UUID, uuid.as_bytes());
        Ok(size + TIMESTAMP.len() + timestamp.len() + UUID.len() + uuid.len())
    }

    fn decode(&self, entry: RawEntry) -> Result<Message> {
        self.decode_or_return(entry).map_err(|(e, _)| e)
    }

    fn checks_json(&self) -> bool {
        true
    }

    fn decode_or_return(&self, mut entry: RawEntry) -> std::result::Result<Message, (Error, RawEntry)> {
        // Everything is checked on the borrowed entry first, so that a bad one goes back
        // whole and a good one gives up its payload without a copy.
        match check_entry(&entry) {
            Err(reason) => {
                let error = Error::Decode {
                    what: format!("entry {}", entry.id).into(),
                    reason,
                };
                Err((error, entry))
            }
            Ok(checked) => {
                let payload = std::mem::take(&mut entry.fields[checked.payload].1);
                Ok(Message::from_parts(
                    checked.uuid,
                    checked.event_type.into(),
                    payload,
                    checked.metadata,
                    checked.timestamp,
                ))
            }
        }
    }
}

/// What [`check_entry`] found in a well-formed entry; the payload stays in place (by index).
struct CheckedEntry {
    event_type: String,
    payload: usize,
    metadata: Metadata,
    timestamp: std::time::SystemTime,
    uuid: Uuid,
}

/// Checks an entry of the standard layout without taking it apart; the error is the reason.
fn check_entry(entry: &RawEntry) -> std::result::Result<CheckedEntry, String> {
    let id = entry.id;
    let (mut event_type, mut payload, mut metadata, mut timestamp, mut uuid) = (None, None, None, None, None);
    for (index, (name, value)) in entry.fields.iter().enumerate() {
        match std::str::from_utf8(name) {
            Ok(EVENT_TYPE) => event_type = Some(value),
            Ok(PAYLOAD) => payload = Some(index),
            Ok(METADATA) => metadata = Some(value),
            Ok(TIMESTAMP) => timestamp = Some(value),
            Ok(UUID) => uuid = Some(value),
            _ => {}
        }
    }
    let event_type = match event_type {
        None => return Err("it has no event_type field".into()),
        Some(v) if v.is_empty() => return Err("its event_type is empty".into()),
        Some(v) => std::str::from_utf8(v).map_err(|_| "its event_type is not UTF-8".to_owned())?,
    };
    let payload = payload.ok_or_else(|| "it has no payload field".to_owned())?;
    check_json(&entry.fields[payload].1).map_err(payload_not_json)?;
    let metadata = match metadata {
        None => Metadata::new(),
        Some(raw) => decode_metadata(raw)?,
    };
    let timestamp = timestamp
        .and_then(|t| std::str::from_utf8(t).ok().and_then(|t| parse_timestamp(t).ok()))
        .unwrap_or_else(|| UNIX_EPOCH + Duration::from_millis(id.ms()));
    let uuid = uuid
        .and_then(|u| std::str::from_utf8(u).ok().and_then(|u| Uuid::parse_str(u).ok()))
        .unwrap_or_else(|| uuid_for_entry(id));
    Ok(CheckedEntry {
        event_type: event_type.to_owned(),
        payload,
        metadata,
        timestamp,
        uuid,
    })
}

/// Decodes `entry` with `codec`, and refuses a payload that is not JSON even when the codec
/// does not check it ([`Codec::checks_json`]): what a backend hands out always decodes with
/// [`Message::json`]. A refused entry comes back whole, for its dead-letter record.
#[cfg(any(feature = "redis", feature = "nats"))]
pub(crate) fn decode_entry(
    codec: &dyn Codec,
    entry: RawEntry,
) -> std::result::Result<Message, (Error, RawEntry)> {
    if codec.checks_json() {
        return codec.decode_or_return(entry);
    }
    let copy = entry.clone();
    let message = codec.decode_or_return(entry)?;
    match check_json(message.payload()) {
        Ok(()) => Ok(message),
        Err(e) => Err((not_json(copy.id, e), copy)),
    }
}

/// The error for entry `id` whose payload is not JSON, the same on every backend.
pub(crate) fn not_json(id: EntryId, error: serde_json::Error) -> Error {
    Error::Decode {
        what: format!("entry {id}").into(),
        reason: payload_not_json(error),
    }
}

/// The reason given for an entry whose payload is not JSON, by every backend alike.
fn payload_not_json(error: serde_json::Error) -> String {
    format!("its payload is not JSON: {error}")
}

/// Metadata is a JSON object of strings; numbers and booleans written by other clients are
/// taken as their JSON text.
fn decode_metadata(raw: &[u8]) -> std::result::Result<Metadata, String> {
    let value: serde_json::Value =
        serde_json::from_slice(raw).map_err(|e| format!("its metadata is not JSON: {e}"))?;
    let serde_json::Value::Object(map) = value else {
        return Err("its metadata is not a JSON object".into());
    };
    map.into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k, s)),
            serde_json::Value::Number(n) => Ok((k, n.to_string())),
            serde_json::Value::Bool(b) => Ok((k, b.to_string())),
            other => Err(format!("its metadata value for {k:?} is not a string: {other}")),
        })
        .collect()
}

/// A stable UUID (version 8) for an entry that carries none, so that every redelivery of the
/// entry has the same one.
pub(crate) fn uuid_for_entry(id: EntryId) -> Uuid {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&id.ms().to_be_bytes());
    bytes[8..].copy_from_slice(&id.seq().to_be_bytes());
    Uuid::new_v8(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(id: EntryId, fields: &[(&str, &str)]) -> RawEntry {
        RawEntry {
            id,
            fields: fields
                .iter()
                .map(|(k, v)| {
                    (
                        Bytes::copy_from_slice(k.as_bytes()),
                        Bytes::copy_from_slice(v.as_bytes()),
                    )
                })
                .collect(),
        }
    }

    fn to_raw(id: EntryId, fields: Vec<(&'static str, Bytes)>) -> RawEntry {
        RawEntry {
            id,
            fields: fields
                .into_iter()
                .map(|(k, v)| (Bytes::from_static(k.as_bytes()), v))
                .collect(),
        }
    }

    #[test]
    fn encode_then_decode_keeps_everything() {
        let msg = Message::new("price.update", &serde_json::json!({"p": 1.5}))
            .unwrap()
            .with_metadata("source", "feed");
        let fields = JsonCodec.encode(&msg).unwrap();
        assert_eq!(encoded_size(&fields), wire_size(&msg));
        let raw = to_raw(EntryId::new(1, 0), fields);
        assert_eq!(raw.size(), wire_size(&msg), "read and write count sizes alike");
        let back = JsonCodec.decode(raw).unwrap();
        assert_eq!(back.event_type(), "price.update");
        assert_eq!(back.payload(), msg.payload());
        assert_eq!(back.metadata(), msg.metadata());
        assert_eq!(back.uuid(), msg.uuid());
        assert_eq!(back.timestamp_rfc3339(), msg.timestamp_rfc3339());
    }

    #[test]
    fn a_bad_entry_comes_back_whole_and_a_good_one_keeps_its_payload() {
        let id = EntryId::new(5, 1);
        for bad in [
            raw(id, &[("event_type", "t"), ("payload", "not json"), ("x", "y")]),
            raw(id, &[("payload", "1")]),
            raw(id, &[("event_type", "t"), ("payload", "1"), ("metadata", "[1]")]),
        ] {
            let (error, back) = JsonCodec.decode_or_return(bad.clone()).unwrap_err();
            assert!(matches!(error, Error::Decode { .. }), "{error:?}");
            assert_eq!(back, bad);
        }
        let good = raw(
            id,
            &[("x-extra", "ignored"), ("event_type", "t"), ("payload", "[1,2]")],
        );
        let message = JsonCodec.decode_or_return(good).unwrap();
        assert_eq!(message.event_type(), "t");
        assert_eq!(&message.payload()[..], b"[1,2]");

        // A codec that only implements `decode` gets the entry back through the default.
        struct DecodeOnly;
        impl Codec for DecodeOnly {
            fn encode(&self, message: &Message) -> Result<Vec<(&'static str, Bytes)>> {
                JsonCodec.encode(message)
            }
            fn decode(&self, _: RawEntry) -> Result<Message> {
                Err(Error::Decode {
                    what: "entry".into(),
                    reason: "never".into(),
                })
            }
        }
        let entry = raw(id, &[("a", "b")]);
        assert_eq!(DecodeOnly.decode_or_return(entry.clone()).unwrap_err().1, entry);
    }

    #[test]
    fn encode_with_writes_what_encode_builds() {
        let plain = Message::new("t", &1).unwrap();
        let rich = Message::new("price.update", &serde_json::json!({"p": 1.5}))
            .unwrap()
            .with_metadata("source", "feed")
            // Before 1970: outside the fast timestamp format.
            .with_timestamp(UNIX_EPOCH - Duration::from_secs(1));
        for message in [plain, rich] {
            let built = JsonCodec.encode(&message).unwrap();
            let mut written = Vec::new();
            let size = JsonCodec
                .encode_with(&message, &mut |name, value| {
                    written.push((name, Bytes::copy_from_slice(value)))
                })
                .unwrap();
            assert_eq!(written, built);
            assert_eq!(size, encoded_size(&built));
            assert_eq!(size, wire_size(&message));
        }
    }

    #[test]
    fn wire_size_counts_every_field() {
        let msg = Message::from_json_bytes("ab", "[1]").unwrap();
        let base = "event_type".len() + 2 + "payload".len() + 3 + "timestamp".len() + 24 + "uuid".len() + 36;
        assert_eq!(wire_size(&msg), base);
        let msg = msg.with_metadata("k", "v\"");
        // {"k":"v\""}
        assert_eq!(wire_size(&msg), base + "metadata".len() + 11);
    }

    #[test]
    fn empty_metadata_is_omitted() {
        let msg = Message::new("t", &1).unwrap();
        let names: Vec<_> = JsonCodec
            .encode(&msg)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(names, ["event_type", "payload", "timestamp", "uuid"]);
    }

    #[test]
    fn foreign_entries_decode_with_defaults() {
        let id = EntryId::new(1_795_341_600_123, 4);
        let m = JsonCodec
            .decode(raw(
                id,
                &[
                    ("payload", "{\"a\":1}"),
                    ("event_type", "x.y"),
                    ("extra", "ignored"),
                ],
            ))
            .unwrap();
        assert_eq!(m.event_type(), "x.y");
        assert_eq!(m.timestamp_rfc3339(), "2026-11-22T10:00:00.123Z");
        assert_eq!(m.uuid(), uuid_for_entry(id));
        assert!(m.metadata().is_empty());
        let m = JsonCodec
            .decode(raw(
                id,
                &[
                    ("event_type", "t"),
                    ("payload", "1"),
                    ("metadata", "{\"n\":2,\"b\":true}"),
                ],
            ))
            .unwrap();
        assert_eq!(m.metadata().get("n"), Some("2"));
        assert_eq!(m.metadata().get("b"), Some("true"));
    }

    #[test]
    fn malformed_entries_say_why() {
        let id = EntryId::new(1, 0);
        let cases: [(&[(&str, &str)], &str); 6] = [
            (&[("payload", "{}")], "no event_type"),
            (&[("event_type", ""), ("payload", "{}")], "event_type is empty"),
            (&[("event_type", "t")], "no payload"),
            (
                &[("event_type", "t"), ("payload", "not json")],
                "payload is not JSON",
            ),
            (
                &[("event_type", "t"), ("payload", "{}"), ("metadata", "[1]")],
                "not a JSON object",
            ),
            (
                &[
                    ("event_type", "t"),
                    ("payload", "{}"),
                    ("metadata", "{\"k\":[1]}"),
                ],
                "not a string",
            ),
        ];
        for (fields, why) in cases {
            let err = JsonCodec.decode(raw(id, fields)).unwrap_err();
            assert!(err.to_string().contains(why), "{fields:?}: {err}");
        }
        let binary = RawEntry {
            id,
            fields: vec![
                (
                    Bytes::from_static(b"event_type"),
                    Bytes::from_static(&[0xff, 0xfe]),
                ),
                (Bytes::from_static(b"payload"), Bytes::from_static(b"{}")),
            ],
        };
        assert!(
            JsonCodec
                .decode(binary)
                .unwrap_err()
                .to_string()
                .contains("not UTF-8")
        );
        // JSON whose only fault is inside a string: invalid UTF-8, a lone surrogate escape.
        for payload in [&b"\"\xff\""[..], b"{\"k\":\"\\udc00\"}", b"[1e999]"] {
            let entry = RawEntry {
                id,
                fields: vec![
                    (Bytes::from_static(b"event_type"), Bytes::from_static(b"t")),
                    (Bytes::from_static(b"payload"), Bytes::copy_from_slice(payload)),
                ],
            };
            let err = JsonCodec.decode(entry).unwrap_err().to_string();
            assert!(err.contains("payload is not JSON"), "{payload:?}: {err}");
        }
    }
}
