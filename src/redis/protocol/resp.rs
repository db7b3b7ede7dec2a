//! RESP2, as spoken on a connection of one's own ([`crate::redis::dedicated`]): where a reply ends,
//! and stream replies (`XREAD`, `XREADGROUP`) parsed straight into entries whose fields are
//! slices of the reply buffer: no value tree, no copy and no allocation per field. Every other
//! reply goes to redis-rs's own parser ([`value`]).
//!
//! RESP2 has five kinds of reply: `+simple`, `-error`, `:integer`, `$len` bulk strings
//! (`$-1` is nil) and `*count` arrays (`*-1` is nil), each header ending in CRLF.

use bytes::Bytes;
use redis::{ErrorKind, RedisError, RedisResult, Value};

use super::replies::ReplyEntry;
use crate::codec::RawEntry;
use crate::message::EntryId;

/// The longest bulk string accepted: Redis's own `proto-max-bulk-len` default (512 MiB).
const MAX_BULK: usize = 512 * 1024 * 1024;

/// What [`scan`] found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Scan {
    /// A whole reply of this many bytes.
    Complete(usize),
    /// Not yet a whole reply; the buffer must grow to at least this many bytes first.
    Incomplete(usize),
}

fn protocol_error(what: &'static str, detail: String) -> RedisError {
    RedisError::from((ErrorKind::Parse, what, detail))
}

/// The longest header or simple line accepted (an error message from a script, say).
const MAX_LINE: usize = 1024 * 1024;

/// The header line starting at `pos`: its content (without the type byte and CRLF) and where
/// the next item starts, or `None` when the line is not complete yet.
fn line(buf: &[u8], pos: usize) -> RedisResult<Option<(&[u8], usize)>> {
    let Some(offset) = buf[pos..].iter().position(|&b| b == b'\n') else {
        if buf.len() - pos > MAX_LINE {
            return Err(protocol_error("malformed reply", "a line without end".into()));
        }
        return Ok(None);
    };
    let end = pos + offset;
    // A type byte, then CR, then LF at `end`.
    if offset < 2 || buf[end - 1] != b'\r' {
        return Err(protocol_error(
            "malformed reply",
            "a line does not end in CRLF".into(),
        ));
    }
    Ok(Some((&buf[pos + 1..end - 1], end + 1)))
}

/// A header's number: a count, a length or an integer reply.
fn number(text: &[u8]) -> RedisResult<i64> {
    let (negative, digits) = match text {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, text),
    };
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(protocol_error(
            "malformed reply",
            format!("{:?} is not a number", String::from_utf8_lossy(text)),
        ));
    }
    let value = digits.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
    Ok(if negative { -value } else { value })
}

/// A length or count: `None` for the nil marker `-1`.
fn length(text: &[u8]) -> RedisResult<Option<usize>> {
    match number(text)? {
        -1 => Ok(None),
        n => usize::try_from(n)
            .map(Some)
            .map_err(|_| protocol_error("malformed reply", format!("length {n}"))),
    }
}

/// How far [`scan`] got into a reply that is not complete yet, so that the next call, with
/// more bytes, goes on from there instead of from the start (a reply of a hundred 16 KiB
/// entries arrives in many reads).
#[derive(Debug, Default)]
pub(crate) struct ScanState {
    /// Where the next item starts.
    pos: usize,
    /// Items still to read, the one at `pos` included; zero before a reply starts.
    remaining: usize,
}

/// Finds the end of the reply at the start of `buf`, skipping bulk strings by their length.
/// `state` carries the progress over calls on the same, growing, buffer; it is reset when a
/// reply is complete (and must be reset by the caller when the buffer is replaced).
pub(crate) fn scan(buf: &[u8], state: &mut ScanState) -> RedisResult<Scan> {
    if state.remaining == 0 {
        *state = ScanState { pos: 0, remaining: 1 };
    }
    while state.remaining > 0 {
        let pos = state.pos;
        if pos >= buf.len() {
            return Ok(Scan::Incomplete(pos + 1));
        }
        let Some((header, next)) = line(buf, pos)? else {
            return Ok(Scan::Incomplete(buf.len() + 1));
        };
        // Each item is one; an array's items come after its header.
        let (after, items) = match buf[pos] {
            b'+' | b'-' | b':' => (next, 0),
            b'$' => match length(header)? {
                None => (next, 0),
                Some(len) if len > MAX_BULK => {
                    return Err(protocol_error("malformed reply", format!("bulk of {len} bytes")));
                }
                Some(len) => {
                    let end = next + len + 2;
                    if buf.len() < end {
                        return Ok(Scan::Incomplete(end));
                    }
                    if &buf[end - 2..end] != b"\r\n" {
                        return Err(protocol_error(
                            "malformed reply",
                            "a bulk string does not end in CRLF".into(),
                        ));
                    }
                    (end, 0)
                }
            },
            b'*' => (next, length(header)?.unwrap_or(0)),
            other => {
                return Err(protocol_error(
                    "malformed reply",
                    format!("unknown reply type {:?}", other as char),
                ));
            }
        };
        state.pos = after;
        state.remaining = (state.remaining - 1).saturating_add(items);
    }
    let len = state.pos;
    *state = ScanState::default();
    Ok(Scan::Complete(len))
}

/// Any complete reply as a redis-rs [`Value`] (server errors included, as
/// [`Value::ServerError`]).
pub(crate) fn value(frame: &[u8]) -> RedisResult<Value> {
    redis::parse_redis_value(frame)
}

/// The server error in an error reply.
fn server_error(frame: &[u8]) -> RedisError {
    match value(frame).and_then(Value::extract_error) {
        Err(e) => e,
        Ok(v) => protocol_error("malformed reply", format!("expected an error, got {v:?}")),
    }
}

/// Reads the items of one complete reply (checked by [`scan`] first).
struct Reader<'a> {
    frame: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    fn header(&mut self, kind: u8) -> RedisResult<&[u8]> {
        let frame: &[u8] = self.frame;
        let found = frame.get(self.pos).copied();
        if found == Some(b'-') {
            let end = line(frame, self.pos)?.map_or(frame.len(), |(_, next)| next);
            return Err(server_error(&frame[self.pos..end]));
        }
        if found != Some(kind) {
            return Err(protocol_error(
                "unexpected reply",
                format!(
                    "expected {:?}, got {:?} in a stream reply",
                    kind as char,
                    found.map(char::from)
                ),
            ));
        }
        let (text, next) = line(frame, self.pos)?
            .ok_or_else(|| protocol_error("malformed reply", "reply ends early".into()))?;
        self.pos = next;
        Ok(text)
    }

    /// An array's item count; `None` for a nil array.
    fn array(&mut self) -> RedisResult<Option<usize>> {
        let text = self.header(b'*')?;
        length(text)
    }

    /// Where the content of the bulk string at the cursor lies; moves past it.
    fn bulk_range(&mut self) -> RedisResult<std::ops::Range<usize>> {
        let text = self.header(b'$')?;
        let len = length(text)?.ok_or_else(|| protocol_error("unexpected reply", "nil string".into()))?;
        let start = self.pos;
        if start + len + 2 > self.frame.len() {
            return Err(protocol_error("malformed reply", "reply ends early".into()));
        }
        self.pos = start + len + 2;
        Ok(start..start + len)
    }

    /// A bulk string, as a slice of the frame.
    fn bulk(&mut self) -> RedisResult<Bytes> {
        let range = self.bulk_range()?;
        Ok(self.frame.slice(range))
    }

    fn entry_id(&mut self) -> RedisResult<EntryId> {
        let range = self.bulk_range()?;
        let raw = &self.frame[range];
        std::str::from_utf8(raw)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                protocol_error(
                    "unexpected reply",
                    format!("{:?} is not an entry id", String::from_utf8_lossy(raw)),
                )
            })
    }

    /// `[id, [field, value, ...]]`, where the fields of an entry trimmed while pending are nil.
    fn entry(&mut self) -> RedisResult<ReplyEntry> {
        if self.array()? != Some(2) {
            return Err(protocol_error(
                "unexpected reply",
                "an entry is not [id, fields]".into(),
            ));
        }
        let id = self.entry_id()?;
        // Redis sends a nil array; a nil string means nil as well.
        if self.frame.get(self.pos) == Some(&b'$') {
            let text = self.header(b'$')?;
            if length(text)?.is_none() {
                return Ok(ReplyEntry::Trimmed(id));
            }
            return Err(protocol_error(
                "unexpected reply",
                "entry fields are a string".into(),
            ));
        }
        let Some(items) = self.array()? else {
            return Ok(ReplyEntry::Trimmed(id));
        };
        if items % 2 != 0 {
            return Err(protocol_error(
                "unexpected reply",
                "odd number of field/value items".into(),
            ));
        }
        let mut fields = Vec::with_capacity(items / 2);
        for _ in 0..items / 2 {
            let name = self.bulk()?;
            let value = self.bulk()?;
            fields.push((name, value));
        }
        Ok(ReplyEntry::Present(RawEntry { id, fields }))
    }
}

/// Parses an `XREAD`/`XREADGROUP` reply for one stream: `[[stream, [entry, ...]]]`, or nil
/// when the block timed out. A server error reply is returned as the error. `frame` must be
/// one complete reply ([`scan`]).
pub(crate) fn stream_reply(frame: &Bytes) -> RedisResult<Vec<ReplyEntry>> {
    let mut reader = Reader { frame, pos: 0 };
    let Some(streams) = reader.array()? else {
        return Ok(Vec::new());
    };
    let mut entries = Vec::new();
    for index in 0..streams {
        if reader.array()? != Some(2) {
            return Err(protocol_error(
                "unexpected reply",
                "a stream is not [name, entries]".into(),
            ));
        }
        reader.bulk()?;
        let count = reader.array()?.unwrap_or(0);
        if index == 0 {
            entries.reserve(count);
        }
        for _ in 0..count {
            let entry = reader.entry()?;
            // One stream is read at a time; any other would belong to another caller.
            if index == 0 {
                entries.push(entry);
            }
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(v: &Value, out: &mut Vec<u8>) {
        match v {
            Value::Nil => out.extend_from_slice(b"$-1\r\n"),
            Value::Int(i) => out.extend_from_slice(format!(":{i}\r\n").as_bytes()),
            Value::BulkString(b) => {
                out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Value::SimpleString(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
            Value::Okay => out.extend_from_slice(b"+OK\r\n"),
            Value::Array(items) => {
                out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                for item in items {
                    encode(item, out);
                }
            }
            other => unreachable!("not generated: {other:?}"),
        }
    }

    fn resp_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Nil),
            any::<i64>().prop_map(Value::Int),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::BulkString),
            // (`+OK` parses as `Value::Okay`.)
            "[a-zA-Z0-9 ]{1,12}"
                .prop_filter("not OK", |s| s != "OK")
                .prop_map(Value::SimpleString),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            proptest::collection::vec(inner, 0..8).prop_map(Value::Array)
        })
    }

    proptest! {
        /// `scan` finds exactly the end of every reply redis-rs parses, and never claims a
        /// reply complete before its last byte.
        #[test]
        fn scan_finds_the_end_of_any_reply(v in resp_value(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut bytes = Vec::new();
            encode(&v, &mut bytes);
            let len = bytes.len();
            bytes.extend_from_slice(&tail);
            prop_assert_eq!(scan(&bytes, &mut ScanState::default()).unwrap(), Scan::Complete(len));
            prop_assert_eq!(value(&bytes[..len]).unwrap(), v);
            for cut in 0..len {
                match scan(&bytes[..cut], &mut ScanState::default()).unwrap() {
                    Scan::Incomplete(at_least) => prop_assert!(at_least > cut && at_least <= len),
                    Scan::Complete(n) => prop_assert!(false, "complete at {} of {}", n, len),
                }
            }
        }

        /// Scanning a reply as it arrives, piece by piece with one state, ends where scanning
        /// it whole does, and the state is ready for the next reply.
        #[test]
        fn scanning_as_it_arrives_ends_where_scanning_whole_does(
            v in resp_value(),
            pieces in proptest::collection::vec(1usize..9, 1..200),
        ) {
            let mut bytes = Vec::new();
            encode(&v, &mut bytes);
            bytes.extend_from_slice(b"+NEXT\r\n");
            let whole = match scan(&bytes, &mut ScanState::default()).unwrap() {
                Scan::Complete(n) => n,
                other => return Err(TestCaseError::fail(format!("{other:?}"))),
            };
            let mut state = ScanState::default();
            let mut have = 0;
            let mut piece = pieces.iter().cycle();
            loop {
                have = (have + piece.next().unwrap()).min(bytes.len());
                match scan(&bytes[..have], &mut state).unwrap() {
                    Scan::Complete(n) => {
                        prop_assert_eq!(n, whole);
                        break;
                    }
                    Scan::Incomplete(at_least) => prop_assert!(at_least > have),
                }
            }
            prop_assert_eq!(scan(&bytes[whole..], &mut state).unwrap(), Scan::Complete(7));
        }

        /// Stream replies parse to the same entries as through redis-rs's value tree.
        #[test]
        fn stream_replies_match_the_value_parser(
            entries in proptest::collection::vec(
                (1u64..u64::MAX / 2, any::<u64>(), proptest::option::of(proptest::collection::vec(
                    (proptest::collection::vec(any::<u8>(), 0..12), proptest::collection::vec(any::<u8>(), 0..60)),
                    0..6,
                ))),
                0..20,
            )
        ) {
            let s = |b: &[u8]| Value::BulkString(b.to_vec());
            let items: Vec<Value> = entries
                .iter()
                .map(|(ms, seq, fields)| {
                    let id = s(format!("{ms}-{seq}").as_bytes());
                    let fields = match fields {
                        None => Value::Nil,
                        Some(pairs) => Value::Array(
                            pairs.iter().flat_map(|(k, v)| [s(k), s(v)]).collect(),
                        ),
                    };
                    Value::Array(vec![id, fields])
                })
                .collect();
            let reply = Value::Array(vec![Value::Array(vec![s(b"stream"), Value::Array(items)])]);
            let mut bytes = Vec::new();
            encode(&reply, &mut bytes);
            let frame = Bytes::from(bytes);
            let fast = stream_reply(&frame).unwrap();
            let slow = super::super::replies::parse_entries(match reply {
                Value::Array(mut streams) => match streams.pop() {
                    Some(Value::Array(mut parts)) => parts.pop().unwrap(),
                    _ => unreachable!(),
                },
                _ => unreachable!(),
            })
            .unwrap();
            prop_assert_eq!(fast, slow);
        }
    }

    proptest! {
        /// Whatever bytes arrive (here: pieces of RESP in any order), scanning and parsing
        /// return a value or an error, never panic.
        #[test]
        fn any_bytes_are_scanned_and_parsed_without_panic(
            pieces in proptest::collection::vec(
                prop_oneof![
                    Just(&b"*"[..]), Just(&b"$"[..]), Just(&b":"[..]), Just(&b"+"[..]),
                    Just(&b"-"[..]), Just(&b"\r\n"[..]), Just(&b"\r"[..]), Just(&b"\n"[..]),
                    Just(&b"-1"[..]), Just(&b"0"[..]), Just(&b"1"[..]), Just(&b"2"[..]),
                    Just(&b"3"[..]), Just(&b"1-1"[..]), Just(&b"x"[..]),
                ],
                0..40,
            ),
        ) {
            let bytes: Vec<u8> = pieces.concat();
            if let Ok(Scan::Complete(len)) = scan(&bytes, &mut ScanState::default()) {
                let frame = Bytes::copy_from_slice(&bytes[..len]);
                let _ = stream_reply(&frame);
                let _ = value(&frame);
            }
        }
    }

    #[test]
    fn nil_replies_and_errors() {
        assert_eq!(stream_reply(&Bytes::from_static(b"*-1\r\n")).unwrap(), []);
        assert_eq!(stream_reply(&Bytes::from_static(b"*0\r\n")).unwrap(), []);
        let err = stream_reply(&Bytes::from_static(
            b"-NOGROUP No such key 's' or consumer group 'g'\r\n",
        ))
        .unwrap_err();
        assert_eq!(err.code(), Some("NOGROUP"), "{err}");
        let err = stream_reply(&Bytes::from_static(b":1\r\n")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Parse, "{err}");
    }

    #[test]
    fn a_trimmed_pending_entry_has_nil_fields() {
        let frame = Bytes::from_static(b"*1\r\n*2\r\n$1\r\ns\r\n*2\r\n*2\r\n$3\r\n1-1\r\n*-1\r\n*2\r\n$3\r\n1-2\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n");
        let entries = stream_reply(&frame).unwrap();
        assert_eq!(entries[0], ReplyEntry::Trimmed(EntryId::new(1, 1)));
        assert_eq!(
            entries[1],
            ReplyEntry::Present(RawEntry {
                id: EntryId::new(1, 2),
                fields: vec![(Bytes::from_static(b"a"), Bytes::from_static(b"b"))],
            })
        );
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        for bad in [
            &b"\r\n"[..],
            b"\n",
            b"*1\r\n\r\n",
            b"*2\r\n:1\r\n\n",
            &b"?x\r\n"[..],
            b"$3\r\nabcd\r\n",
            b"*x\r\n",
            b"$-2\r\n",
            b":12\n",
            b"$99999999999999999999\r\n",
            b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\nnot\r\n*0\r\n",
        ] {
            let scanned = scan(bad, &mut ScanState::default());
            let parsed =
                matches!(scanned, Ok(Scan::Complete(_))).then(|| stream_reply(&Bytes::copy_from_slice(bad)));
            assert!(
                scanned.is_err() || parsed.is_some_and(|p| p.is_err()),
                "{:?}: {scanned:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
