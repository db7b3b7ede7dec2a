//! How streamwise's entries sit in JetStream: the subject and stream of a topic, the entry id
//! of a stream sequence, the key of a consumer's lease, and a message as a NATS message (the
//! payload as its body, the codec's other fields as headers).
//!
//! A field's value goes into its header as it is when it is printable UTF-8 without leading
//! or trailing blanks (event types, metadata JSON, timestamps and UUIDs nearly always are);
//! any other value is written as `%` followed by its bytes percent-encoded, so that nothing a
//! message holds (a line break in an event type, say) can break the header block.

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, HeaderValue};
use bytes::Bytes;

use crate::codec::{Codec, RawEntry};
use crate::error::{Error, Result};
use crate::message::{EntryId, Message};

/// The prefix of the headers that carry a message's fields: `Streamwise-event_type`, ...
pub(crate) const HEADER_PREFIX: &str = "Streamwise-";

/// The codec field that travels as the NATS message's body.
const PAYLOAD: &str = "payload";

/// The subject of `topic`'s entries: `<prefix>.<topic>`.
pub(crate) fn subject(prefix: &str, topic: &str) -> String {
    let mut subject = String::with_capacity(prefix.len() + 1 + topic.len());
    subject.push_str(prefix);
    subject.push('.');
    subject.push_str(topic);
    subject
}

/// The entry id of stream sequence `sequence`: `0-<sequence>`. JetStream numbers a stream's
/// messages 1, 2, 3, ...; the time part of the id is 0 because a publish acknowledgement does
/// not say when the message was stored (its timestamp is in the message itself).
pub(crate) fn entry_id(sequence: u64) -> EntryId {
    EntryId::new(0, sequence)
}

/// The stream sequence of an entry id of this backend, `None` for other ids.
pub(crate) fn sequence_of(id: EntryId) -> Option<u64> {
    (id.ms() == 0).then_some(id.seq())
}

/// The key of a consumer's lease in the lease bucket: `<topic>.<group>.<consumer>`, the topic
/// escaped to the characters a key may hold (`{` becomes `=7B`, `~` `=7E`).
pub(crate) fn lease_key(topic: &str, group: &str, consumer: &str) -> String {
    let mut key = String::with_capacity(topic.len() + group.len() + consumer.len() + 8);
    for b in topic.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            key.push(b as char);
        } else {
            key.push_str(&format!("={b:02X}"));
        }
    }
    key.push('.');
    key.push_str(group);
    key.push('.');
    key.push_str(consumer);
    key
}

/// `message` as a NATS message: its headers and body.
pub(crate) fn encode(codec: &dyn Codec, message: &Message) -> Result<(HeaderMap, Bytes)> {
    let mut headers = HeaderMap::new();
    let mut body = Bytes::new();
    let mut refused = None;
    codec.encode_with(message, &mut |name, value| {
        if refused.is_some() {
            return;
        }
        if name == PAYLOAD {
            // The message's own payload is shared, not copied.
            let payload = message.payload();
            body = if value.as_ptr() == payload.as_ptr() && value.len() == payload.len() {
                payload.clone()
            } else {
                Bytes::copy_from_slice(value)
            };
            return;
        }
        match (header_name(name), header_value(value)) {
            (Ok(header), Some(value)) => headers.insert(header, HeaderValue::from(value)),
            (Err(e), _) => refused = Some(e),
            (_, None) => refused = Some(Error::invalid("codec", "a field value cannot be a NATS header")),
        }
    })?;
    match refused {
        Some(e) => Err(e),
        None => Ok((headers, body)),
    }
}

/// The header of codec field `name`: `Streamwise-<name>`, without building the name for the
/// fields streamwise's codec writes.
fn header_name(name: &'static str) -> Result<HeaderName> {
    Ok(match name {
        "event_type" => HeaderName::from_static("Streamwise-event_type"),
        "timestamp" => HeaderName::from_static("Streamwise-timestamp"),
        "uuid" => HeaderName::from_static("Streamwise-uuid"),
        "metadata" => HeaderName::from_static("Streamwise-metadata"),
        other => {
            let mut header = String::with_capacity(HEADER_PREFIX.len() + other.len());
            header.push_str(HEADER_PREFIX);
            header.push_str(other);
            HeaderName::try_from(header).map_err(|_| {
                Error::invalid(
                    "codec",
                    format_args!("field name {other:?} cannot be a NATS header"),
                )
            })?
        }
    })
}

/// The entry a NATS message holds, with id `id`: its `Streamwise-` headers as fields, its
/// body as the payload.
pub(crate) fn decode(id: EntryId, headers: Option<&HeaderMap>, body: &Bytes) -> RawEntry {
    let mut fields = Vec::with_capacity(5);
    if let Some(headers) = headers {
        for (name, values) in headers.iter() {
            let name: &str = name.as_ref();
            if let (Some(field), Some(value)) = (name.strip_prefix(HEADER_PREFIX), values.first()) {
                fields.push((field_name(field), header_bytes(value.as_str())));
            }
        }
    }
    fields.push((Bytes::from_static(PAYLOAD.as_bytes()), body.clone()));
    RawEntry { id, fields }
}

/// A field's name, not copied for the fields streamwise's codec writes.
fn field_name(field: &str) -> Bytes {
    match field {
        "event_type" => Bytes::from_static(b"event_type"),
        "timestamp" => Bytes::from_static(b"timestamp"),
        "uuid" => Bytes::from_static(b"uuid"),
        "metadata" => Bytes::from_static(b"metadata"),
        other => Bytes::copy_from_slice(other.as_bytes()),
    }
}

/// A field's value as a header's: as it is, or `%` and its bytes percent-encoded (see the
/// module's documentation); `None` only if that held a line break, which it never does (the
/// header map would refuse it).
fn header_value(value: &[u8]) -> Option<String> {
    let text = header_text(value);
    (!text.contains(['\r', '\n'])).then_some(text)
}

fn header_text(value: &[u8]) -> String {
    if let Ok(text) = std::str::from_utf8(value)
        && !text.starts_with('%')
        && text.trim() == text
        && !text.chars().any(char::is_control)
    {
        return text.to_owned();
    }
    let mut out = String::with_capacity(value.len() * 3 + 1);
    out.push('%');
    for &b in value {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn header_bytes(value: &str) -> Bytes {
    let Some(encoded) = value.strip_prefix('%') else {
        return Bytes::copy_from_slice(value.as_bytes());
    };
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = (bytes[i] == b'%')
            .then(|| encoded.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            // Not written by `header_value`: kept as it is, for the codec to judge.
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::JsonCodec;

    #[test]
    fn a_message_survives_headers_and_body() {
        for event_type in [
            "order.placed",
            "line\r\nbreak",
            " padded ",
            "%literal",
            "ü→✓",
            "tab\there",
        ] {
            let message = Message::new(event_type, &serde_json::json!({"k": "v"}))
                .unwrap()
                .with_metadata("source", "line\nfeed");
            let (headers, body) = encode(&JsonCodec, &message).unwrap();
            for (name, values) in headers.iter() {
                for v in values {
                    let v = v.as_str();
                    assert!(!v.contains(['\r', '\n']) && v.trim() == v, "{name}: {v:?}");
                }
            }
            let entry = decode(entry_id(7), Some(&headers), &body);
            let back = JsonCodec.decode(entry).unwrap();
            assert_eq!(back.event_type(), event_type);
            assert_eq!(back.payload(), message.payload());
            assert_eq!(back.metadata(), message.metadata());
            assert_eq!(back.uuid(), message.uuid());
            assert_eq!(back.timestamp_rfc3339(), message.timestamp_rfc3339());
        }
    }

    #[test]
    fn names_and_ids() {
        assert_eq!(subject("streamwise", "orders~p1"), "streamwise.orders~p1");
        assert_eq!(lease_key("{orders}-dead", "g", "c-1"), "=7Borders=7D-dead.g.c-1");
        assert_eq!(entry_id(42).to_string(), "0-42");
        assert_eq!(sequence_of(entry_id(42)), Some(42));
        assert_eq!(sequence_of(EntryId::new(1, 42)), None);
        assert_eq!(&header_bytes("%%zz%41")[..], b"%zzA");
    }
}
