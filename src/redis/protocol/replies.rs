//! Replies as redis-rs parsed them ([`Value`]), turned into typed rows: stream entries
//! (`XREADGROUP`, `XRANGE`, `XINFO STREAM`), pending rows and counts (`XPENDING`), `XINFO`
//! records, the claim script's results, and the id an `XADD` returns. Error replies become
//! [`Error::Server`], carrying the server's code. RESP2 and RESP3 shapes are both accepted.

use bytes::Bytes;
use redis::{ErrorKind, RedisError, Value};

use crate::codec::RawEntry;
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

/// A reply of another shape than the command returns.
pub(crate) fn unexpected(what: &str) -> Error {
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
        other => Err(unexpected(&format!("expected a string, got {other:?}"))),
    }
}

fn array(v: Value) -> Result<Vec<Value>> {
    match v {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(unexpected(&format!("expected an array, got {other:?}"))),
    }
}

/// An entry id, as `XADD` returns it and as entries and pending rows carry it.
pub(crate) fn entry_id(v: Value) -> Result<EntryId> {
    let raw = bytes(v)?;
    std::str::from_utf8(&raw)
        .map_err(|_| unexpected("entry id is not UTF-8"))?
        .parse()
        .map_err(|_| unexpected("entry id is not of the form <ms>-<seq>"))
}

/// Parses `[[id, [field, value, ...]], ...]`, where the fields of a trimmed entry are nil.
pub(crate) fn parse_entries(v: Value) -> Result<Vec<ReplyEntry>> {
    array(v)?.into_iter().map(parse_entry).collect()
}

/// Parses one `[id, [field, value, ...]]`.
fn parse_entry(item: Value) -> Result<ReplyEntry> {
    let mut parts = array(item)?.into_iter();
    let id = entry_id(parts.next().ok_or_else(|| unexpected("entry without id"))?)?;
    let fields = match parts.next() {
        None | Some(Value::Nil) => return Ok(ReplyEntry::Trimmed(id)),
        Some(Value::Map(pairs)) => pairs
            .into_iter()
            .map(|(k, v)| Ok((bytes(k)?, bytes(v)?)))
            .collect::<Result<Vec<_>>>()?,
        Some(other) => {
            let flat = array(other)?;
            if flat.len() % 2 != 0 {
                return Err(unexpected("odd number of field/value items"));
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
}

/// One entry where a reply may hold nil instead (`first-entry` of an empty stream's
/// `XINFO STREAM`): `None` for nil.
pub(crate) fn parse_optional_entry(v: Value) -> Result<Option<ReplyEntry>> {
    match v {
        Value::Nil => Ok(None),
        item => parse_entry(item).map(Some),
    }
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
            Value::Int(i) => u64::try_from(i).map_err(|_| unexpected("negative count")),
            other => std::str::from_utf8(&bytes(other)?)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| unexpected("expected an integer")),
        }
    };
    array(v)?
        .into_iter()
        .map(|row| {
            let mut p = array(row)?.into_iter();
            let mut next = || p.next().ok_or_else(|| unexpected("short XPENDING row"));
            Ok(PendingRow {
                id: entry_id(next()?)?,
                consumer: String::from_utf8(bytes(next()?)?.into())
                    .map_err(|_| unexpected("consumer not UTF-8"))?,
                idle_ms: int(next()?)?,
                delivery_count: int(next()?)?,
            })
        })
        .collect()
}

/// The count in an `XPENDING stream group` summary (`[count, first, last, consumers]`).
pub(crate) fn parse_pending_count(v: Value) -> Result<u64> {
    match v {
        Value::Array(summary) => match summary.into_iter().next() {
            Some(Value::Int(n)) => Ok(u64::try_from(n).unwrap_or(0)),
            _ => Err(unexpected("XPENDING summary")),
        },
        other => Err(unexpected(&format!("XPENDING summary {other:?}"))),
    }
}

/// What the claim script ([`CLAIM`](crate::redis::scripts::CLAIM)) says of one id.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Claimed {
    /// Claimed, with its delivery count (this delivery included); an entry trimmed from the
    /// stream comes with count 0.
    Entry(ReplyEntry, u64),
    /// In no pending list (acknowledged, or its group was re-created).
    NotPending(EntryId),
}

/// Parses the claim script's reply: per id, `[entry, count]`, `[id, -1]` (trimmed) or
/// `[id, -2]` (not pending). Ids another consumer owns now are not in it.
pub(crate) fn parse_claimed(v: Value) -> Result<Vec<Claimed>> {
    let mut claimed = Vec::new();
    for item in array(v)? {
        let mut parts = array(item)?.into_iter();
        let (Some(entry), Some(Value::Int(count))) = (parts.next(), parts.next()) else {
            continue;
        };
        if count == -2 {
            claimed.push(Claimed::NotPending(entry_id(entry)?));
        } else if count < 0 {
            claimed.push(Claimed::Entry(ReplyEntry::Trimmed(entry_id(entry)?), 0));
        } else {
            claimed.push(Claimed::Entry(parse_entry(entry)?, count as u64));
        }
    }
    Ok(claimed)
}

/// One `XINFO` record (a RESP2 flat array or a RESP3 map), read by field name.
pub(crate) struct Record(Vec<(String, Value)>);

impl Record {
    /// The record in `record`.
    pub(crate) fn parse(record: Value) -> Result<Self> {
        let pairs: Vec<(Value, Value)> = match record {
            Value::Map(pairs) => pairs,
            Value::Array(flat) => {
                let mut it = flat.into_iter();
                let mut pairs = Vec::new();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    pairs.push((k, v));
                }
                pairs
            }
            other => return Err(unexpected(&format!("expected a record, got {other:?}"))),
        };
        pairs
            .into_iter()
            .map(|(k, v)| match k {
                Value::BulkString(b) => Ok((String::from_utf8_lossy(&b).into_owned(), v)),
                Value::SimpleString(s) => Ok((s, v)),
                other => Err(unexpected(&format!("record key {other:?}"))),
            })
            .collect::<Result<_>>()
            .map(Record)
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// The field as a number (an integer, or text of one).
    pub(crate) fn int(&self, name: &str) -> Option<u64> {
        match self.get(name)? {
            Value::Int(i) => u64::try_from(*i).ok(),
            Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            Value::SimpleString(s) => s.parse().ok(),
            _ => None,
        }
    }

    /// The field as text (invalid UTF-8 replaced).
    pub(crate) fn text(&self, name: &str) -> Option<String> {
        match self.get(name)? {
            Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Value::SimpleString(s) => Some(s.clone()),
            Value::Int(i) => Some(i.to_string()),
            _ => None,
        }
    }

    /// The field as an entry id.
    pub(crate) fn entry_id(&self, name: &str) -> Option<EntryId> {
        self.text(name)?.parse().ok()
    }

    /// The field's value, taken out of the record (nil when it has none).
    pub(crate) fn take(&mut self, name: &str) -> Value {
        match self.0.iter().position(|(k, _)| k == name) {
            Some(at) => self.0.swap_remove(at).1,
            None => Value::Nil,
        }
    }
}

/// The records of an `XINFO GROUPS` or `XINFO CONSUMERS` reply (`what` names it).
pub(crate) fn parse_records(reply: Value, what: &str) -> Result<Vec<Record>> {
    match reply {
        Value::Array(records) => records.into_iter().map(Record::parse).collect(),
        other => Err(unexpected(&format!("{what} {other:?}"))),
    }
}

/// The group names in an `XINFO GROUPS` reply.
pub(crate) fn group_names(reply: Value) -> Result<Vec<String>> {
    parse_records(reply, "XINFO GROUPS")?
        .into_iter()
        .map(|group| group.text("name").ok_or_else(|| unexpected("group without name")))
        .collect()
}

/// The code and the message of the error reply in `error`, if it holds one (for a pipeline,
/// of its first failed command).
fn error_reply(error: &RedisError) -> Option<(String, String)> {
    let first = error
        .clone()
        .into_server_errors()
        .and_then(|errors| errors.first().map(|(_, reply)| reply.clone()));
    match first {
        Some(reply) => Some((reply.code().to_owned(), reply.details().unwrap_or("").to_owned())),
        None => Some((error.code()?.to_owned(), error.detail().unwrap_or("").to_owned())),
    }
}

/// Whether the server answered `error` itself: an error reply, or a reply of another type
/// than asked for. Either comes again on any connection.
pub(crate) fn is_answer(error: &RedisError) -> bool {
    error.kind() == ErrorKind::UnexpectedReturnType || error_reply(error).is_some()
}

/// The error for `what` (the command, or what a script was for) that the server refused:
/// [`Error::Server`] with the reply's code for an error reply, [`Error::Decode`] for a reply of
/// another type than asked for.
pub(crate) fn refusal(what: &str, error: RedisError) -> Error {
    match error_reply(&error) {
        Some((code, message)) => Error::Server {
            command: what.to_owned(),
            code,
            message,
        },
        None => Error::Decode {
            what: format!("the reply to {what}").into(),
            reason: error.to_string(),
        },
    }
}

/// The server said the stream does not exist (`XINFO`: "no such key"; `XGROUP`: "requires the
/// key to exist").
pub(crate) fn is_no_such_key(error: &RedisError) -> bool {
    let text = error.to_string();
    text.contains("no such key") || text.contains("requires the key to exist")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: &str) -> Value {
        Value::BulkString(t.as_bytes().to_vec())
    }

    #[test]
    fn replies_parse_in_resp2_and_resp3_shapes() {
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

    #[test]
    fn claim_results_say_claimed_trimmed_or_not_pending() {
        let entry = Value::Array(vec![s("1-1"), Value::Array(vec![s("payload"), s("1")])]);
        let reply = Value::Array(vec![
            Value::Array(vec![entry, Value::Int(3)]),
            Value::Array(vec![s("1-2"), Value::Int(-1)]),
            Value::Array(vec![s("1-3"), Value::Int(-2)]),
        ]);
        let claimed = parse_claimed(reply).unwrap();
        assert!(
            matches!(&claimed[0], Claimed::Entry(ReplyEntry::Present(e), 3) if e.id == EntryId::new(1, 1))
        );
        assert_eq!(
            claimed[1],
            Claimed::Entry(ReplyEntry::Trimmed(EntryId::new(1, 2)), 0)
        );
        assert_eq!(claimed[2], Claimed::NotPending(EntryId::new(1, 3)));
    }

    #[test]
    fn records_read_by_name_in_both_shapes() {
        let flat = Value::Array(vec![
            s("name"),
            s("g"),
            s("pending"),
            Value::Int(4),
            s("lag"),
            Value::Nil,
        ]);
        let map = Value::Map(vec![
            (s("name"), s("g")),
            (s("pending"), s("4")),
            (s("lag"), Value::Nil),
        ]);
        for record in [flat, map] {
            let mut record = Record::parse(record).unwrap();
            assert_eq!(record.text("name").as_deref(), Some("g"));
            assert_eq!(record.int("pending"), Some(4));
            assert_eq!(record.int("lag"), None);
            assert_eq!(record.take("missing"), Value::Nil);
        }
        let groups = Value::Array(vec![Value::Array(vec![s("name"), s("a")])]);
        assert_eq!(group_names(groups).unwrap(), ["a"]);
        assert!(group_names(Value::Int(1)).is_err());
    }

    #[test]
    fn error_replies_keep_their_code_and_other_answers_decode_errors() {
        let reply = redis::parse_redis_value(b"-NOPERM User alice has no permissions\r\n")
            .unwrap()
            .extract_error()
            .unwrap_err();
        assert!(is_answer(&reply));
        let err = refusal("XADD", reply);
        assert_eq!(err.server_code(), Some("NOPERM"));
        assert!(
            matches!(&err, Error::Server { command, message, .. }
                if command == "XADD" && message == "User alice has no permissions"),
            "{err:?}"
        );
        let script = redis::parse_redis_value(b"-CUTOFF lease ran out\r\n")
            .unwrap()
            .extract_error()
            .unwrap_err();
        assert_eq!(refusal("claim script", script).server_code(), Some("CUTOFF"));
        let wrong_type = RedisError::from((ErrorKind::UnexpectedReturnType, "not a number"));
        assert!(is_answer(&wrong_type));
        assert!(matches!(refusal("GET", wrong_type), Error::Decode { .. }));
        let dropped = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(!is_answer(&dropped));
    }
}
