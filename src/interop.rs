//! The wire formats of other frameworks' Redis Streams backends (the `interop` cargo
//! feature), so that a streamwise service joins a fleet that already talks over Redis
//! Streams: [`NatricineCodec`] for natricine-redisstream (Python), [`WatermillCodec`] for
//! watermill-redisstream (Go). Set one as the codec of a Redis publisher
//! ([`PublisherOptions::codec`](crate::redis::PublisherOptions::codec)) and subscriber
//! ([`RedisSubscriberOptions::codec`](crate::redis::RedisSubscriberOptions::codec)), or name
//! it in the configuration file (`codec: natricine` or `codec: watermill`).
//!
//! | | natricine (`RedisStreamPublisher` defaults) | Watermill (`DefaultMarshallerUnmarshaller`) |
//! |---|---|---|
//! | message id | `_natricine_message_uuid`, a UUID string | `_watermill_message_uuid`, a string (a UUID or a ULID) |
//! | payload | `payload`, the bytes as they are | `payload`, the bytes as they are |
//! | metadata | `metadata`, a MessagePack map of strings; absent when empty | `metadata`, a MessagePack map of strings; an empty string when empty |
//! | event type | metadata key `event_type` (natricine's CQRS routes by topic instead: use a fixed type per subscription) | metadata key `name` (what Watermill's CQRS marshaler writes) |
//! | timestamp | none: taken from the entry id | none: taken from the entry id |
//!
//! Field names and the event type's key are settings. Neither layout has a field for the event
//! type, so the codec keeps it in a metadata key (written on publish, read on receive, and
//! left in the metadata, where the peer's handlers find it too) or takes a fixed type for
//! every entry ([`EventTypeFrom`]). Metadata is written with its keys sorted, as MessagePack's smallest
//! forms (what both peers write; equal byte for byte when the peer's map is in that order).
//!
//! On receive, an entry without a message id, with metadata that is not a MessagePack map of
//! strings, without an event type, or whose payload is not JSON is refused with the reason and
//! dead-lettered, as every other entry that does not decode. A message id that is not a UUID
//! (Watermill's ULIDs) is kept in the metadata under the id field's name, and written back as
//! the id on publish; the message's own UUID is then derived from the entry id.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use uuid::Uuid;

use crate::codec::{Codec, RawEntry};
use crate::error::{Error, Result};
use crate::message::{Message, Metadata, check_json};

/// Where a peer's entries carry their event type, which neither peer has a field for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventTypeFrom {
    /// A metadata key: written there on publish, read from there on receive (and left in the
    /// metadata). An entry without it gets `fallback`, or is refused without one.
    Metadata {
        /// The metadata key.
        key: String,
        /// The event type of an entry that lacks the key.
        fallback: Option<Arc<str>>,
    },
    /// Every entry is of this type (a stream that carries one event type, as a natricine CQRS
    /// topic does); nothing is written for it.
    Fixed(Arc<str>),
}

/// What an empty metadata map is written as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EmptyMetadata {
    /// No field (natricine).
    Omitted,
    /// The field, with an empty value (Watermill).
    EmptyString,
}

/// A peer's layout of an entry.
#[derive(Clone, Debug)]
struct Layout {
    peer: &'static str,
    uuid_field: &'static str,
    payload_field: &'static str,
    metadata_field: &'static str,
    empty_metadata: EmptyMetadata,
    event_type: EventTypeFrom,
}

/// A field name given at run time, kept for the life of the process (codecs are made once,
/// and the publisher's field names are `&'static str`).
fn field_name(name: &str) -> &'static str {
    Box::leak(name.to_owned().into_boxed_str())
}

macro_rules! peer_codec {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug)]
        pub struct $name(Layout);

        impl $name {
            /// Names the field of the message id (a field name, kept for the life of the
            /// process).
            #[must_use]
            pub fn uuid_field(mut self, name: &str) -> Self {
                self.0.uuid_field = field_name(name);
                self
            }

            /// Names the field of the payload.
            #[must_use]
            pub fn payload_field(mut self, name: &str) -> Self {
                self.0.payload_field = field_name(name);
                self
            }

            /// Names the field of the MessagePack metadata.
            #[must_use]
            pub fn metadata_field(mut self, name: &str) -> Self {
                self.0.metadata_field = field_name(name);
                self
            }

            /// Keeps the event type in metadata key `key`.
            #[must_use]
            pub fn event_type_key(mut self, key: impl Into<String>) -> Self {
                let fallback = match self.0.event_type {
                    EventTypeFrom::Metadata { fallback, .. } => fallback,
                    EventTypeFrom::Fixed(_) => None,
                };
                self.0.event_type = EventTypeFrom::Metadata { key: key.into(), fallback };
                self
            }

            /// The event type of an entry without the event type's metadata key (else such
            /// an entry is refused and dead-lettered).
            #[must_use]
            pub fn fallback_event_type(mut self, event_type: impl Into<Arc<str>>) -> Self {
                if let EventTypeFrom::Metadata { fallback, .. } = &mut self.0.event_type {
                    *fallback = Some(event_type.into());
                }
                self
            }

            /// Every entry is of `event_type`; nothing is written for it on publish.
            #[must_use]
            pub fn fixed_event_type(mut self, event_type: impl Into<Arc<str>>) -> Self {
                self.0.event_type = EventTypeFrom::Fixed(event_type.into());
                self
            }

            /// Where the event type comes from.
            pub fn event_type_from(&self) -> &EventTypeFrom {
                &self.0.event_type
            }
        }

        impl Codec for $name {
            fn encode(&self, message: &Message) -> Result<Vec<(&'static str, Bytes)>> {
                self.0.encode(message)
            }

            fn decode(&self, entry: RawEntry) -> Result<Message> {
                self.0.decode(entry).map_err(|(e, _)| e)
            }

            fn decode_or_return(&self, entry: RawEntry) -> std::result::Result<Message, (Error, RawEntry)> {
                self.0.decode(entry)
            }

            fn checks_json(&self) -> bool {
                true
            }
        }
    };
}

peer_codec! {
    /// natricine-redisstream's layout (`RedisStreamPublisher`'s defaults): `_natricine_message_uuid`,
    /// `payload`, `metadata` (MessagePack, absent when empty); the event type in metadata key
    /// `event_type` (see [the module](self)).
    ///
    /// ```
    /// use streamwise::interop::NatricineCodec;
    /// use streamwise::redis::RedisSubscriberOptions;
    ///
    /// // A natricine CQRS topic carries one event type.
    /// let codec = NatricineCodec::default().fixed_event_type("order.placed");
    /// let options = RedisSubscriberOptions::default().codec(codec);
    /// ```
    NatricineCodec
}

peer_codec! {
    /// watermill-redisstream's layout (`DefaultMarshallerUnmarshaller`): `_watermill_message_uuid`,
    /// `payload`, `metadata` (MessagePack, an empty string when empty); the event type in
    /// metadata key `name`, as Watermill's CQRS writes it (see [the module](self)).
    ///
    /// ```
    /// use streamwise::interop::WatermillCodec;
    /// use streamwise::redis::PublisherOptions;
    ///
    /// let options = PublisherOptions::default().codec(WatermillCodec::default());
    /// ```
    WatermillCodec
}

impl Default for NatricineCodec {
    fn default() -> Self {
        NatricineCodec(Layout {
            peer: "natricine",
            uuid_field: "_natricine_message_uuid",
            payload_field: "payload",
            metadata_field: "metadata",
            empty_metadata: EmptyMetadata::Omitted,
            event_type: EventTypeFrom::Metadata {
                key: "event_type".into(),
                fallback: None,
            },
        })
    }
}

impl Default for WatermillCodec {
    fn default() -> Self {
        WatermillCodec(Layout {
            peer: "watermill",
            uuid_field: "_watermill_message_uuid",
            payload_field: "payload",
            metadata_field: "metadata",
            empty_metadata: EmptyMetadata::EmptyString,
            event_type: EventTypeFrom::Metadata {
                key: "name".into(),
                fallback: None,
            },
        })
    }
}

impl Layout {
    fn encode(&self, message: &Message) -> Result<Vec<(&'static str, Bytes)>> {
        let mut map: BTreeMap<&str, &str> = message.metadata().iter().collect();
        // An id that was not a UUID travels in the metadata, and goes back out as the id.
        let kept_id = map.remove(self.uuid_field);
        if let EventTypeFrom::Metadata { key, .. } = &self.event_type {
            map.insert(key, message.event_type());
        }
        let id = match kept_id {
            Some(id) => Bytes::copy_from_slice(id.as_bytes()),
            None => Bytes::from(message.uuid().hyphenated().to_string()),
        };
        let mut fields = vec![
            (self.uuid_field, id),
            (self.payload_field, message.payload().clone()),
        ];
        match (map.is_empty(), self.empty_metadata) {
            (true, EmptyMetadata::Omitted) => {}
            (true, EmptyMetadata::EmptyString) => fields.push((self.metadata_field, Bytes::new())),
            (false, _) => fields.push((self.metadata_field, Bytes::from(write_string_map(&map)))),
        }
        Ok(fields)
    }

    fn decode(&self, mut entry: RawEntry) -> std::result::Result<Message, (Error, RawEntry)> {
        match self.check(&entry) {
            Err(reason) => {
                let error = Error::Decode {
                    what: format!("{} entry {}", self.peer, entry.id).into(),
                    reason,
                };
                Err((error, entry))
            }
            Ok(checked) => {
                let payload = std::mem::take(&mut entry.fields[checked.payload].1);
                let timestamp = std::time::UNIX_EPOCH + std::time::Duration::from_millis(entry.id.ms());
                Ok(Message::from_parts(
                    checked.uuid,
                    checked.event_type,
                    payload,
                    checked.metadata,
                    timestamp,
                ))
            }
        }
    }

    /// Checks `entry` without taking it apart; the error is the reason.
    fn check(&self, entry: &RawEntry) -> std::result::Result<Checked, String> {
        let (mut id, mut payload, mut metadata) = (None, None, None);
        for (index, (name, value)) in entry.fields.iter().enumerate() {
            let name = &name[..];
            if name == self.uuid_field.as_bytes() {
                id = Some(value);
            } else if name == self.payload_field.as_bytes() {
                payload = Some(index);
            } else if name == self.metadata_field.as_bytes() {
                metadata = Some(value);
            }
        }
        let id = id.ok_or_else(|| format!("it has no {} field", self.uuid_field))?;
        let id = std::str::from_utf8(id).map_err(|_| format!("its {} is not UTF-8", self.uuid_field))?;
        let payload = payload.ok_or_else(|| format!("it has no {} field", self.payload_field))?;
        check_json(&entry.fields[payload].1).map_err(|e| format!("its payload is not JSON: {e}"))?;
        let mut map = match metadata {
            None => BTreeMap::new(),
            Some(raw) if raw.is_empty() => BTreeMap::new(),
            Some(raw) => read_string_map(raw).map_err(|why| {
                format!(
                    "its {} is not a MessagePack map of strings: {why}",
                    self.metadata_field
                )
            })?,
        };
        let event_type: Arc<str> = match &self.event_type {
            EventTypeFrom::Fixed(t) => t.clone(),
            EventTypeFrom::Metadata { key, fallback } => match (map.get(key), fallback) {
                (Some(t), _) if !t.is_empty() => t.as_str().into(),
                (_, Some(fallback)) => fallback.clone(),
                (Some(_), None) => return Err(format!("its event type (metadata key {key:?}) is empty")),
                (None, None) => return Err(format!("it has no event type (metadata key {key:?})")),
            },
        };
        let uuid = match Uuid::parse_str(id) {
            Ok(uuid) if id.len() == 36 => uuid,
            // Not in the hyphenated form a peer reads back: kept as it is.
            _ => {
                map.insert(self.uuid_field.to_owned(), id.to_owned());
                crate::codec::uuid_for_entry(entry.id)
            }
        };
        let mut metadata = Metadata::new();
        for (k, v) in map {
            metadata.insert(k, v);
        }
        Ok(Checked {
            uuid,
            event_type,
            payload,
            metadata,
        })
    }
}

/// What [`Layout::check`] found; the payload stays in place (by index).
struct Checked {
    uuid: Uuid,
    event_type: Arc<str>,
    payload: usize,
    metadata: Metadata,
}

/// `map` as a MessagePack map of strings, in its (sorted) order, in the smallest forms.
fn write_string_map(map: &BTreeMap<&str, &str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(map.iter().map(|(k, v)| k.len() + v.len() + 2).sum::<usize>() + 5);
    // Writing into a Vec cannot fail.
    let _ = rmp::encode::write_map_len(&mut out, map.len() as u32);
    for (k, v) in map {
        let _ = rmp::encode::write_str(&mut out, k);
        let _ = rmp::encode::write_str(&mut out, v);
    }
    out
}

/// Reads a MessagePack map of strings, all of `raw`; the error is the reason.
fn read_string_map(raw: &[u8]) -> std::result::Result<BTreeMap<String, String>, String> {
    let mut rest = raw;
    let len = rmp::decode::read_map_len(&mut rest).map_err(|e| format!("{e}"))?;
    let mut map = BTreeMap::new();
    for _ in 0..len {
        let key = read_str(&mut rest)?;
        let value = read_str(&mut rest)?;
        map.insert(key, value);
    }
    if !rest.is_empty() {
        return Err(format!("{} bytes after the map", rest.len()));
    }
    Ok(map)
}

/// Reads one MessagePack string from `rest` (UTF-8 checked), advancing it.
fn read_str(rest: &mut &[u8]) -> std::result::Result<String, String> {
    let len = rmp::decode::read_str_len(rest).map_err(|e| format!("{e}"))? as usize;
    if rest.len() < len {
        return Err("a string runs past the end".into());
    }
    let (text, tail) = rest.split_at(len);
    *rest = tail;
    String::from_utf8(text.to_vec()).map_err(|_| "a string is not UTF-8".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_maps_round_trip_and_bad_bytes_are_reasons() {
        let map: BTreeMap<&str, &str> = [("a", "1"), ("event_type", "x".repeat(40).leak() as &str)].into();
        let bytes = write_string_map(&map);
        let back = read_string_map(&bytes).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back["event_type"].len(), 40);
        for bad in [
            &b""[..],
            b"\x81",
            b"\x81\xa1a",
            b"\x81\xa1a\x01",
            b"\x81\xa1a\xa2\xff\xfe",
            b"\xc0",
            b"\xdf\xff\xff\xff\xff",
        ] {
            assert!(read_string_map(bad).is_err(), "{bad:?}");
        }
        assert!(
            read_string_map(&[bytes.clone(), vec![0]].concat()).is_err(),
            "trailing bytes"
        );
    }
}
