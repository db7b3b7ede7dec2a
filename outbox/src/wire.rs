//! A message as an outbox row stores it: streamwise's wire format ([`JsonCodec`]'s fields) as
//! one JSON object whose values are strings, and back. The payload stays the exact JSON text
//! the producer wrote; the UUID and timestamp survive the trip, so every send of a row
//! carries the same message.

use bytes::Bytes;
use serde_json::{Map, Value};
use streamwise::codec::{Codec, JsonCodec, RawEntry};
use streamwise::{EntryId, Message};

use crate::error::{Error, Result};

/// The row form of `message`.
pub(crate) fn encode(message: &Message) -> Result<Value> {
    let mut object = Map::with_capacity(5);
    let mut bad = None;
    JsonCodec.encode_with(message, &mut |name, value| match std::str::from_utf8(value) {
        Ok(text) => {
            object.insert(name.to_owned(), Value::String(text.to_owned()));
        }
        Err(e) => bad = Some(format!("its {name} is not UTF-8: {e}")),
    })?;
    match bad {
        // Only a payload can be other than UTF-8, and publish checks it is JSON first.
        Some(reason) => Err(streamwise::Error::invalid("payload", reason).into()),
        None => Ok(Value::Object(object)),
    }
}

/// The message stored in row `id`.
pub(crate) fn decode(id: i64, value: Value) -> Result<Message> {
    let bad = |reason: String| Error::Decode { id, reason };
    let Value::Object(object) = value else {
        return Err(bad("its message is not a JSON object".into()));
    };
    let mut fields = Vec::with_capacity(object.len());
    for (name, value) in object {
        match value {
            Value::String(text) => fields.push((Bytes::from(name), Bytes::from(text))),
            other => {
                return Err(bad(format!(
                    "its message field {name:?} is not a string but {other}"
                )));
            }
        }
    }
    let entry = RawEntry {
        id: EntryId::new(0, u64::try_from(id).unwrap_or(0)),
        fields,
    };
    JsonCodec.decode(entry).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_survives_the_row_form_whole() {
        let message = Message::from_json_bytes("order.placed", r#"{"id": 7,  "total":1.50}"#)
            .unwrap()
            .with_metadata("tenant", "a\"b\u{0}c");
        let row = encode(&message).unwrap();
        assert_eq!(
            row["payload"], r#"{"id": 7,  "total":1.50}"#,
            "the JSON text is kept as written"
        );
        let back = decode(3, row).unwrap();
        assert_eq!(back.uuid(), message.uuid());
        assert_eq!(back.event_type(), "order.placed");
        assert_eq!(back.payload(), message.payload());
        assert_eq!(back.metadata(), message.metadata());
        assert_eq!(back.timestamp_rfc3339(), message.timestamp_rfc3339());
    }

    #[test]
    fn rows_not_in_the_wire_format_are_decode_errors() {
        for (row, says) in [
            (serde_json::json!([1]), "not a JSON object"),
            (
                serde_json::json!({"event_type": "t", "payload": 1}),
                "not a string",
            ),
            (serde_json::json!({"event_type": "t"}), "no payload"),
            (serde_json::json!({"event_type": "t", "payload": "{"}), "not JSON"),
        ] {
            let err = decode(9, row).unwrap_err();
            assert!(matches!(err, Error::Decode { id: 9, .. }), "{err}");
            assert!(err.to_string().contains(says), "{err}");
        }
    }
}
