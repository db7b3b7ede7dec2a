//! Generated inputs (proptest) for the wire codec, configuration parsing, entry ids and
//! timestamps: round trips hold, and no input makes them panic.
//!
//! Each property runs `PROPTEST_CASES` cases (proptest's default, 256, in CI). For the full
//! run of more than a million cases in total:
//!
//! ```sh
//! PROPTEST_CASES=200000 cargo test --release --test properties
//! ```

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use proptest::prelude::*;
use streamwise::codec::{Codec, JsonCodec, RawEntry, encoded_size, wire_size};
use streamwise::redis::{RedisConnection, redact_url};
use streamwise::redis_streams::Config;
use streamwise::{EntryId, Error, Message, Metadata, format_timestamp, parse_timestamp};

/// Any JSON value, a few levels deep.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| serde_json::json!(f)),
        ".*".prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(".*", inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
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

/// Every place a Redis URL can surface: its redaction, the connection built from it or the
/// error refusing it (`Display` and `Debug`, sources included), the builder, and a YAML
/// configuration holding it (the config or its error).
fn everything_shown_for(url: &str) -> Vec<String> {
    fn error_texts(e: &Error) -> Vec<String> {
        let mut texts = vec![e.to_string(), format!("{e:?}")];
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            texts.push(format!("{s} {s:?}"));
            source = s.source();
        }
        texts
    }
    let mut shown = vec![redact_url(url), format!("{:?}", RedisConnection::builder(url))];
    match RedisConnection::new(url) {
        Ok(conn) => shown.push(format!("{conn:?} {}", conn.url())),
        Err(e) => shown.extend(error_texts(&e)),
    }
    // A JSON string is a YAML double-quoted scalar.
    let quoted = serde_json::to_string(url).expect("a string");
    for yaml in [
        format!("redis_streams:\n  url: {quoted}\n"),
        format!("redis_streams:\n  consumer:\n    redis_url: {quoted}\n    group: g\n"),
    ] {
        match Config::from_yaml_str(&yaml) {
            Ok(config) => shown.push(format!("{config:?}")),
            Err(e) => shown.extend(error_texts(&e)),
        }
    }
    shown
}

proptest! {
    /// Passwords of any characters (unencoded `/`, `?`, `#`, `@`, `&`, `:`, spaces, control
    /// characters, non-ASCII), in every URL form, never show: not in redactions, errors,
    /// `Debug` or configs, whether the URL is accepted or refused.
    #[test]
    fn passwords_never_show(secret in "(?s).{0,24}", form in 0usize..7) {
        // Markers at both ends: neither may appear anywhere.
        let password = format!("S3cr{secret}q7Zt");
        let url = match form {
            0 => format!("redis://user:{password}@127.0.0.1:6390/0"),
            1 => format!("redis://:{password}@localhost"),
            2 => format!("rediss://admin:{password}@cache.internal:6380/2"),
            3 => format!("redis+unix:///tmp/r.sock?db=1&pass={password}"),
            4 => format!("redis+unix:///tmp/r.sock?password={password}&db=2"),
            5 => format!("redis://u:{password}@"),
            _ => format!("user:{password}@host:6379"),
        };
        for text in everything_shown_for(&url) {
            prop_assert!(!text.contains("S3cr") && !text.contains("q7Zt"), "{url:?} shows: {text}");
        }
    }

    #[test]
    fn the_wire_codec_round_trips(
        event_type in ".+",
        payload in json(),
        metadata in prop::collection::btree_map(".*", ".*", 0..6),
        ms in 0u64..253_402_207_199_999,
        uuid in any::<u128>(),
        seq in any::<u64>(),
    ) {
        let message = Message::new(event_type.clone(), &payload)
            .unwrap()
            .with_metadata_map(Metadata::from(metadata.clone()))
            .with_timestamp(UNIX_EPOCH + Duration::from_millis(ms))
            .with_uuid(streamwise::Uuid::from_u128(uuid));
        let fields = JsonCodec.encode(&message).unwrap();
        prop_assert_eq!(encoded_size(&fields), wire_size(&message));
        let back = JsonCodec.decode(to_raw(EntryId::new(ms, seq), fields)).unwrap();
        prop_assert_eq!(back.event_type(), event_type.as_str());
        prop_assert_eq!(back.json().unwrap(), message.json().unwrap());
        prop_assert_eq!(back.metadata().as_map(), &metadata);
        prop_assert_eq!(back.uuid(), message.uuid());
        prop_assert_eq!(back.timestamp(), message.timestamp());
    }

    #[test]
    fn decoding_any_field_map_never_panics(
        fields in prop::collection::vec(
            (
                prop_oneof![
                    Just(b"event_type".to_vec()), Just(b"payload".to_vec()), Just(b"metadata".to_vec()),
                    Just(b"timestamp".to_vec()), Just(b"uuid".to_vec()), prop::collection::vec(any::<u8>(), 0..12),
                ],
                prop::collection::vec(any::<u8>(), 0..64),
            ),
            0..8,
        ),
        ms in any::<u64>(),
        seq in any::<u64>(),
    ) {
        let fields = fields.into_iter().map(|(k, v)| (Bytes::from(k), Bytes::from(v))).collect();
        match JsonCodec.decode(RawEntry { id: EntryId::new(ms, seq), fields }) {
            Ok(m) => prop_assert!(!m.event_type().is_empty()),
            Err(Error::Decode { what, reason }) => {
                prop_assert!(what.starts_with("entry "));
                prop_assert!(!reason.is_empty());
            }
            Err(other) => prop_assert!(false, "unexpected error kind: {other:?}"),
        }
    }

    #[test]
    fn any_text_as_config_never_panics(text in "(?s).{0,200}") {
        match Config::from_yaml_str(&text) {
            Ok(_) => {}
            Err(e) => prop_assert!(e.invalid_field().is_some(), "not a named validation error: {e}"),
        }
    }

    #[test]
    fn config_errors_name_a_real_key(
        key in prop_oneof![
            Just("url"), Just("producer.stream"), Just("producer.max_length"), Just("producer.auto_create_stream"),
            Just("consumer.group"), Just("consumer.block_ms"), Just("consumer.count"), Just("consumer.auto_ack"),
            Just("consumer.start_id"), Just("consumer.reclaim_interval_ms"), Just("consumer.streams"),
            Just("consumer.nonsense"), Just("producer.typo"),
        ],
        value in prop_oneof![
            Just("0".to_owned()), Just("-1".to_owned()), Just("true".to_owned()), Just("'a b'".to_owned()),
            Just("[]".to_owned()), Just("{}".to_owned()), Just("99999999999999999999".to_owned()),
            "[a-z0-9_-]{1,12}", any::<u32>().prop_map(|n| n.to_string()),
        ],
    ) {
        let (section, leaf) = key.split_once('.').map_or((None, key), |(s, l)| (Some(s), l));
        let yaml = match section {
            Some(s) => format!("redis_streams:\n  {s}:\n    {leaf}: {value}\n"),
            None => format!("redis_streams:\n  {leaf}: {value}\n"),
        };
        match Config::from_yaml_str(&yaml) {
            Ok(_) => {}
            Err(e) => {
                let field = e.invalid_field().unwrap_or_default().to_owned();
                // A value that breaks the YAML syntax itself is the document's fault.
                let syntax = field == "config" && e.to_string().contains("not valid YAML");
                prop_assert!(syntax || field.starts_with(&format!("redis_streams.{key}")), "{yaml:?} -> {field}: {e}");
            }
        }
    }

    #[test]
    fn entry_ids_round_trip_and_never_panic(ms in any::<u64>(), seq in any::<u64>(), junk in ".{0,30}") {
        let id = EntryId::new(ms, seq);
        prop_assert_eq!(id.to_string().parse::<EntryId>().unwrap(), id);
        if let Err(e) = junk.parse::<EntryId>() {
            prop_assert_eq!(e.invalid_field(), Some("id"));
        }
    }

    #[test]
    fn timestamps_round_trip_and_never_panic(ms in 0u64..253_402_207_199_999, junk in ".{0,40}") {
        let t = UNIX_EPOCH + Duration::from_millis(ms);
        prop_assert_eq!(parse_timestamp(&format_timestamp(t)).unwrap(), t);
        if let Err(e) = parse_timestamp(&junk) {
            let is_decode = matches!(e, Error::Decode { .. });
            prop_assert!(is_decode, "not a decode error: {e}");
        }
    }
}
