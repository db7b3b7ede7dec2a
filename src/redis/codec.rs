//! The parsing of Redis stream replies (`XREADGROUP`, `XPENDING`) into entries,
//! ids and pending rows. The entry wire format itself is [`crate::codec`], re-exported here.

use bytes::Bytes;
use redis::Value;

pub use crate::codec::{Codec, JsonCodec, RawEntry, encoded_size};
use crate::error::{Error, Result};
use crate::message::EntryId;

/// An entry in a reply: present, or trimmed away while still pending (nil fields).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReplyEntry {
    Present(RawEntry),
    Trimmed(EntryId),
}

impl ReplyEntry {
    pub(crate) fn id(&self) -> EntryId {
        match self {
            ReplyEntry::Present(e) => e.id,
            ReplyEntry::Trimmed(id) => *id,
        }
    }
}

fn protocol(what: &str) -> Error {
    Error::Decode {
        what: "redis reply".into(),
        reason: format!("unexpected shape: {what}"),
    }
}

fn bytes(v: Value) -> Result<Bytes> {
    match v {
        Value::BulkString(b) => Ok(Bytes::from(b)),
        Value::SimpleString(s) => Ok(Bytes::from(s)),
        Value::Int(i) => Ok(Bytes::from(i.to_string())),
        other => Err(protocol(&format!("expected a string, got {other:?}"))),
    }
}

pub(crate) fn entry_id(v: Value) -> Result<EntryId> {
    let raw = bytes(v)?;
    std::str::from_utf8(&raw)
        .map_err(|_| protocol("entry id is not UTF-8"))?
        .parse()
}

fn array(v: Value) -> Result<Vec<Value>> {
    match v {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(protocol(&format!("expected an array, got {other:?}"))),
    }
}

/// Parses `[[id, [field, value, ...]], ...]`, where the fields of a trimmed entry are nil.
pub(crate) fn parse_entries(v: Value) -> Result<Vec<ReplyEntry>> {
    array(v)?
        .into_iter()
        .map(|item| {
            let mut parts = array(item)?.into_iter();
            let id = entry_id(parts.next().ok_or_else(|| protocol("entry without id"))?)?;
            let fields = match parts.next() {
                None | Some(Value::Nil) => return Ok(ReplyEntry::Trimmed(id)),
                Some(Value::Map(pairs)) => pairs
                    .into_iter()
                    .map(|(k, v)| Ok((bytes(k)?, bytes(v)?)))
                    .collect::<Result<Vec<_>>>()?,
                Some(other) => {
                    let flat = array(other)?;
                    if flat.len() % 2 != 0 {
                        return Err(protocol("odd number of field/value items"));
                    }
                    let mut fields = Vec::with_capacity(flat.len() / 2);
                    let mut it = flat.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        fields.push((bytes(k)?, bytes(v)?));
                    }
                    fields
                }
            };
            Ok(ReplyEntry::Present(RawEntry { id, fields }))
        })
        .collect()
}

/// One row of an extended `XPENDING` reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PendingRow {
    pub(crate) id: EntryId,
    pub(crate) consumer: String,
    pub(crate) idle_ms: u64,
    pub(crate) delivery_count: u64,
}

/// Parses an extended `XPENDING stream group start end count [consumer]` reply.
pub(crate) fn parse_pending_rows(v: Value) -> Result<Vec<PendingRow>> {
    let int = |v: Value| -> Result<u64> {
        match v {
            Value::Int(i) => u64::try_from(i).map_err(|_| protocol("negative count")),
            other => std::str::from_utf8(&bytes(other)?)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| protocol("expected an integer")),
        }
    };
    array(v)?
        .into_iter()
        .map(|row| {
            let mut p = array(row)?.into_iter();
            let mut next = || p.next().ok_or_else(|| protocol("short XPENDING row"));
            Ok(PendingRow {
                id: entry_id(next()?)?,
                consumer: String::from_utf8(bytes(next()?)?.into())
                    .map_err(|_| protocol("consumer not UTF-8"))?,
                idle_ms: int(next()?)?,
                delivery_count: int(next()?)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_in_resp2_and_resp3_shapes() {
        let s = |t: &str| Value::BulkString(t.as_bytes().to_vec());
        let fields = [s("event_type"), s("t"), s("payload"), s("1")];
        let resp2 = Value::Array(vec![
            Value::Array(vec![s("1-1"), Value::Array(fields.to_vec())]),
            Value::Array(vec![s("1-2"), Value::Nil]),
        ]);
        let pairs = vec![(s("event_type"), s("t")), (s("payload"), s("1"))];
        let resp3 = Value::Array(vec![
            Value::Array(vec![s("1-1"), Value::Map(pairs)]),
            Value::Array(vec![s("1-2"), Value::Nil]),
        ]);
        for reply in [resp2, resp3] {
            let parsed = parse_entries(reply).unwrap();
            assert_eq!(parsed.len(), 2);
            assert!(
                matches!(&parsed[0], ReplyEntry::Present(e) if e.id == EntryId::new(1, 1) && e.fields.len() == 2)
            );
            assert_eq!(parsed[1], ReplyEntry::Trimmed(EntryId::new(1, 2)));
        }
        let pending = Value::Array(vec![Value::Array(vec![
            s("1-1"),
            s("c"),
            Value::Int(5),
            Value::Int(2),
        ])]);
        assert_eq!(
            parse_pending_rows(pending).unwrap(),
            [PendingRow {
                id: EntryId::new(1, 1),
                consumer: "c".into(),
                idle_ms: 5,
                delivery_count: 2
            }]
        );
        assert!(parse_entries(Value::Array(vec![Value::Int(1)])).is_err());
    }
}
