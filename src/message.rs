//! The message: what a producer publishes and a consumer receives, independent of any backend.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use crate::entry_id::EntryId;
use crate::error::{Error, Result, validate_event_type};

/// String key/value pairs that travel with a message (routing hints, correlation ids, ...).
///
/// Ordered by key, so that the encoded form is stable. Empty metadata costs no allocation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Metadata(BTreeMap<String, String>);

impl Metadata {
    /// Empty metadata.
    pub const fn new() -> Self {
        Metadata(BTreeMap::new())
    }

    /// The value for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Sets `key` to `value`, returning the old value.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) -> Option<String> {
        self.0.insert(key.into(), value.into())
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.0.remove(key)
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The pairs in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The pairs as a map.
    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Metadata {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Metadata(iter.into_iter().map(|(k, v)| (k.into(), v.into())).collect())
    }
}

impl<K: Into<String>, V: Into<String>, const N: usize> From<[(K, V); N]> for Metadata {
    /// ```
    /// let m = streamwise::Metadata::from([("source", "market-feed")]);
    /// assert_eq!(m.get("source"), Some("market-feed"));
    /// ```
    fn from(pairs: [(K, V); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl From<BTreeMap<String, String>> for Metadata {
    fn from(map: BTreeMap<String, String>) -> Self {
        Metadata(map)
    }
}

impl From<std::collections::HashMap<String, String>> for Metadata {
    fn from(map: std::collections::HashMap<String, String>) -> Self {
        Metadata(map.into_iter().collect())
    }
}

impl IntoIterator for Metadata {
    type Item = (String, String);
    type IntoIter = std::collections::btree_map::IntoIter<String, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// One event: a type to route by, a JSON payload, string metadata, a UUID v7 and the time it
/// was produced. Cloning is cheap: the payload is shared [`Bytes`], the event type an `Arc<str>`.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use streamwise::Message;
///
/// #[derive(Serialize, Deserialize, Debug, PartialEq)]
/// struct PriceUpdate { symbol: String, price: f64 }
///
/// let msg = Message::new("price.update", &PriceUpdate { symbol: "AAPL".into(), price: 150.25 })?
///     .with_metadata("source", "market-feed");
/// assert_eq!(msg.event_type(), "price.update");
/// assert_eq!(msg.metadata().get("source"), Some("market-feed"));
/// let back: PriceUpdate = msg.decode()?;
/// assert_eq!(back.price, 150.25);
/// # Ok::<(), streamwise::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    uuid: Uuid,
    event_type: Arc<str>,
    payload: Bytes,
    metadata: Metadata,
    timestamp: SystemTime,
}

impl Message {
    /// A message of `event_type` whose payload is `payload` serialized as JSON.
    ///
    /// Fails with [`Error::Invalid`] (`event_type`) when the type is empty and with
    /// [`Error::Encode`] when the value cannot be serialized.
    pub fn new<T: Serialize + ?Sized>(event_type: impl Into<Arc<str>>, payload: &T) -> Result<Self> {
        let payload = serde_json::to_vec(payload).map_err(Error::Encode)?;
        Self::from_json_bytes(event_type, payload)
    }

    /// A message whose payload is already JSON text. The bytes are not parsed here; a
    /// consumer that cannot decode them dead-letters the message.
    pub fn from_json_bytes(event_type: impl Into<Arc<str>>, payload: impl Into<Bytes>) -> Result<Self> {
        let event_type = event_type.into();
        validate_event_type(&event_type)?;
        Ok(Message {
            uuid: Uuid::now_v7(),
            event_type,
            payload: payload.into(),
            metadata: Metadata::new(),
            timestamp: SystemTime::now(),
        })
    }

    /// A message from all its parts, as a codec decodes it (no validation, no clock read).
    pub(crate) fn from_parts(
        uuid: Uuid,
        event_type: Arc<str>,
        payload: Bytes,
        metadata: Metadata,
        timestamp: SystemTime,
    ) -> Self {
        Message {
            uuid,
            event_type,
            payload,
            metadata,
            timestamp,
        }
    }

    /// Adds one metadata pair.
    #[must_use]
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key, value);
        self
    }

    /// Replaces all metadata.
    #[must_use]
    pub fn with_metadata_map(mut self, metadata: impl Into<Metadata>) -> Self {
        self.metadata = metadata.into();
        self
    }

    /// Replaces the UUID (for example when re-publishing a message under its original id).
    #[must_use]
    pub fn with_uuid(mut self, uuid: Uuid) -> Self {
        self.uuid = uuid;
        self
    }

    /// Replaces the production time.
    #[must_use]
    pub fn with_timestamp(mut self, timestamp: SystemTime) -> Self {
        self.timestamp = timestamp;
        self
    }

    /// The producer-assigned UUID (v7 unless replaced), for deduplication and tracing.
    pub fn uuid(&self) -> Uuid {
        self.uuid
    }

    /// The routing key.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The routing key as a shared string.
    pub fn event_type_arc(&self) -> &Arc<str> {
        &self.event_type
    }

    /// The JSON payload bytes.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// The metadata, to change.
    pub fn metadata_mut(&mut self) -> &mut Metadata {
        &mut self.metadata
    }

    /// When the message was produced.
    pub fn timestamp(&self) -> SystemTime {
        self.timestamp
    }

    /// The production time in the wire format: ISO 8601 UTC with milliseconds,
    /// e.g. `2026-11-22T10:00:00.123Z`.
    pub fn timestamp_rfc3339(&self) -> String {
        format_timestamp(self.timestamp)
    }

    /// Decodes the payload into `T`.
    ///
    /// Fails with [`Error::Decode`] naming the payload and the serde error.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.payload).map_err(|e| Error::Decode {
            what: "payload".into(),
            reason: e.to_string(),
        })
    }

    /// Decodes the payload into a JSON value.
    pub fn json(&self) -> Result<serde_json::Value> {
        self.decode()
    }
}

/// Checks that `payload` is one JSON value, exactly as strict as [`Message::json`]: UTF-8
/// everywhere (also inside strings, which a skipping parser would not look at), no lone
/// surrogate escapes, numbers within range, nesting within serde_json's limit. A payload that
/// passes always decodes with [`Message::json`]; backends refuse (dead-letter) one that fails.
pub(crate) fn check_json(payload: &[u8]) -> std::result::Result<(), serde_json::Error> {
    serde_json::from_slice::<AnyJson>(payload).map(|_| ())
}

/// A JSON value parsed and thrown away as it is read (nothing is kept or allocated).
struct AnyJson;

impl<'de> Deserialize<'de> for AnyJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(AnyJson)
    }
}

impl<'de> serde::de::Visitor<'de> for AnyJson {
    type Value = AnyJson;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> std::result::Result<AnyJson, E> {
        Ok(AnyJson)
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<AnyJson, E> {
        Ok(AnyJson)
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<AnyJson, E> {
        Ok(AnyJson)
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<AnyJson, E> {
        Ok(AnyJson)
    }
    // Strings reach the visitor only after serde_json checked their UTF-8 and escapes.
    fn visit_str<E>(self, _: &str) -> std::result::Result<AnyJson, E> {
        Ok(AnyJson)
    }
    fn visit_unit<E>(self) -> std::result::Result<AnyJson, E> {
        Ok(AnyJson)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<AnyJson, A::Error> {
        while seq.next_element::<AnyJson>()?.is_some() {}
        Ok(AnyJson)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<AnyJson, A::Error> {
        while map.next_entry::<AnyJson, AnyJson>()?.is_some() {}
        Ok(AnyJson)
    }
}

/// Formats a time as ISO 8601 UTC with milliseconds, the wire format of `timestamp`.
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// let t = UNIX_EPOCH + Duration::from_millis(1_795_341_600_123);
/// assert_eq!(streamwise::format_timestamp(t), "2026-11-22T10:00:00.123Z");
/// ```
pub fn format_timestamp(time: SystemTime) -> String {
    let mut buf = [0u8; 24];
    if let Some(text) = format_fast(time, &mut buf) {
        return text.to_owned();
    }
    let ms = match time.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    };
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(ts) => ts.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        Err(_) => "1970-01-01T00:00:00.000Z".to_owned(),
    }
}

/// `d` in whole milliseconds, `u64::MAX` when it is longer than that holds (a duration a
/// user gives, `Duration::MAX`, must not wrap around to a short one).
#[cfg(feature = "redis")]
pub(crate) fn saturating_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Parses an ISO 8601 / RFC 3339 time as other producers write it: with `Z`, with an
/// offset (`+00:00`), or without a zone (taken as UTC), with any fraction of a second.
///
/// ```
/// let t = streamwise::parse_timestamp("2026-11-22T10:00:00.123456+00:00")?;
/// assert_eq!(streamwise::format_timestamp(t), "2026-11-22T10:00:00.123Z");
/// # Ok::<(), streamwise::Error>(())
/// ```
pub fn parse_timestamp(text: &str) -> Result<SystemTime> {
    if let Some(time) = parse_fast(text) {
        return Ok(time);
    }
    let bad = |e: jiff::Error| Error::Decode {
        what: "timestamp".into(),
        reason: format!("{text:?} is not an ISO 8601 time: {e}"),
    };
    let ts = match text.parse::<jiff::Timestamp>() {
        Ok(ts) => ts,
        Err(first) => text
            .parse::<jiff::civil::DateTime>()
            .and_then(|dt| jiff::tz::Offset::UTC.to_timestamp(dt))
            .map_err(|_| bad(first))?,
    };
    let nanos = ts.as_nanosecond();
    let magnitude = Duration::new(
        u64::try_from(nanos.unsigned_abs() / 1_000_000_000).unwrap_or(u64::MAX),
        (nanos.unsigned_abs() % 1_000_000_000) as u32,
    );
    let time = if nanos >= 0 {
        UNIX_EPOCH.checked_add(magnitude)
    } else {
        UNIX_EPOCH.checked_sub(magnitude)
    };
    time.ok_or_else(|| Error::Decode {
        what: "timestamp".into(),
        reason: format!("{text:?} is outside the range of system time"),
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The wire format for the common case (years 1970 to 9999), written into `buf` without a
/// general formatter; `None` for other times.
pub(crate) fn format_fast(time: SystemTime, buf: &mut [u8; 24]) -> Option<&str> {
    let ms = u64::try_from(time.duration_since(UNIX_EPOCH).ok()?.as_millis()).ok()?;
    let (days, ms_of_day) = (ms / 86_400_000, ms % 86_400_000);
    let (y, m, d) = civil_from_days(i64::try_from(days).ok()?);
    if y > 9999 {
        return None;
    }
    let fields: [(u64, usize, usize); 7] = [
        (y as u64, 0, 4),
        (m as u64, 5, 2),
        (d as u64, 8, 2),
        (ms_of_day / 3_600_000, 11, 2),
        (ms_of_day / 60_000 % 60, 14, 2),
        (ms_of_day / 1000 % 60, 17, 2),
        (ms_of_day % 1000, 20, 3),
    ];
    *buf = *b"0000-00-00T00:00:00.000Z";
    for (mut value, at, width) in fields {
        for i in (at..at + width).rev() {
            buf[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    std::str::from_utf8(buf).ok()
}

/// Parses exactly `YYYY-MM-DDTHH:MM:SS.mmmZ` (what streamwise writes); anything else goes to
/// the general parser.
fn parse_fast(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    if b.len() != 24
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'.'
        || b[23] != b'Z'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        b[r].iter().try_fold(0i64, |n, c| {
            c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
        })
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, min, s, ms) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
    let days_in_month = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => return None,
    };
    if y < 1970 || d < 1 || d > days_in_month || h > 23 || min > 59 || s > 59 {
        return None;
    }
    let total_ms = ((days_from_civil(y, m, d) * 24 + h) * 60 + min) * 60_000 + s * 1000 + ms;
    Some(UNIX_EPOCH + Duration::from_millis(u64::try_from(total_ms).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_timestamp_paths_agree_with_jiff() {
        for ms in [
            0u64,
            1,
            951_782_400_000,
            1_795_341_600_123,
            4_107_542_399_999,
            253_402_207_199_999,
        ] {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            let mut buf = [0; 24];
            let fast = format_fast(t, &mut buf).unwrap();
            let slow = jiff::Timestamp::from_millisecond(ms as i64)
                .unwrap()
                .strftime("%Y-%m-%dT%H:%M:%S%.3fZ")
                .to_string();
            assert_eq!(fast, slow, "{ms}");
            assert_eq!(parse_fast(fast), Some(t), "{fast}");
        }
        for not_fast in [
            "2026-02-30T00:00:00.000Z",
            "2026-13-01T00:00:00.000Z",
            "2026-11-22T10:00:00.123+00:00",
            "1969-12-31T23:59:59.999Z",
        ] {
            assert_eq!(parse_fast(not_fast), None, "{not_fast}");
        }
        assert!(
            parse_timestamp("2026-02-30T00:00:00.000Z").is_err(),
            "an impossible date is an error"
        );
    }

    #[test]
    fn message_round_trips_typed_and_untyped_payloads() {
        let msg = Message::new("t", &serde_json::json!({"a": [1, 2]})).unwrap();
        assert_eq!(msg.json().unwrap(), serde_json::json!({"a": [1, 2]}));
        assert_eq!(msg.uuid().get_version_num(), 7);
        let err = msg.decode::<u32>().unwrap_err();
        assert!(matches!(err, Error::Decode { .. }), "{err}");
    }

    #[test]
    fn the_json_check_refuses_what_json_cannot_decode() {
        let refused: [&[u8]; 9] = [
            b"\"\xff\"",
            b"{\"k\":\"\xc3\"}",
            b"[\"\xed\xa0\x80\"]",
            b"\"\\ud800\"",
            b"1e400",
            b"this is not json",
            b"",
            b"{} {}",
            b"{\"a\":}",
        ];
        for payload in refused {
            assert!(
                check_json(payload).is_err(),
                "{:?}",
                String::from_utf8_lossy(payload)
            );
            let m = Message::from_json_bytes("t", payload.to_vec()).unwrap();
            assert!(m.json().is_err(), "json() agrees on {payload:?}");
        }
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(check_json(deep.as_bytes()).is_err(), "deeper than json() decodes");
        let accepted: [&[u8]; 8] = [
            b"null",
            b" 1 ",
            b"-0.5e10",
            b"\"\\ud83d\\ude00 \xc3\xa9\"",
            b"{\"a\":[1,{\"b\":null}],\"c\":\"\\n\"}",
            b"18446744073709551616",
            b"[]",
            "\"\u{1F600}\"".as_bytes(),
        ];
        for payload in accepted {
            check_json(payload).unwrap();
            let m = Message::from_json_bytes("t", payload.to_vec()).unwrap();
            m.json().unwrap();
        }
        let nested = format!("{}{}", "[".repeat(100), "]".repeat(100));
        check_json(nested.as_bytes()).unwrap();
    }

    #[test]
    fn empty_event_type_is_refused() {
        let err = Message::new("", &1).unwrap_err();
        assert_eq!(err.invalid_field(), Some("event_type"));
    }

    #[test]
    fn timestamps_format_and_parse_leniently() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_341_600_123);
        assert_eq!(format_timestamp(t), "2026-11-22T10:00:00.123Z");
        for text in [
            "2026-11-22T10:00:00.123Z",
            "2026-11-22T10:00:00.123+00:00",
            "2026-11-22T11:00:00.123+01:00",
            "2026-11-22T10:00:00.123",
        ] {
            assert_eq!(parse_timestamp(text).unwrap(), t, "{text}");
        }
        assert!(matches!(parse_timestamp("yesterday"), Err(Error::Decode { .. })));
        // Far dates keep their value (no silent clamping).
        let far = parse_timestamp("9999-01-01T00:00:00Z").unwrap();
        assert_eq!(format_timestamp(far), "9999-01-01T00:00:00.000Z");
        let early = parse_timestamp("1000-01-01T00:00:00Z").unwrap();
        assert_eq!(format_timestamp(early), "1000-01-01T00:00:00.000Z");
    }
}
