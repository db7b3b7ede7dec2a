//! Mixed fleets (feature `interop`): entries natricine wrote (tests/fixtures, captured from
//! natricine-redisstream) decode to what natricine meant, and what streamwise writes with
//! these codecs is what the peers write; Watermill's layout as its marshaller reads and
//! writes it; a router over real Redis consumes Watermill entries; no bytes in any field
//! make a codec panic.
#![cfg(feature = "interop")]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use proptest::prelude::*;
use streamwise::codec::{Codec, RawEntry};
use streamwise::interop::{NatricineCodec, WatermillCodec};
use streamwise::redis::client::cmd;
use streamwise::redis::{
    PublisherOptions, RedisBackend, RedisConnection, RedisPublisher, RedisSubscriber, RedisSubscriberOptions,
};
use streamwise::router::{Json, Metadata, Router, State};
use streamwise::{EntryId, Error, Message, Publisher};

use common::RedisServer;

/// The fixture's bytes are base64: decoded here rather than with one more dependency.
fn base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(value).collect();
    let mut out = Vec::new();
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, d)| n | (u32::from(*d) << (18 - 6 * i)));
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

struct FixtureEntry {
    id: EntryId,
    fields: Vec<(Bytes, Bytes)>,
    uuid: String,
    payload: Vec<u8>,
    metadata: BTreeMap<String, String>,
}

fn natricine_fixture() -> Vec<FixtureEntry> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/natricine-redisstream.json"
    ))
    .expect("the fixture");
    let json: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    json["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| FixtureEntry {
            id: e["entry_id"].as_str().unwrap().parse().expect("an entry id"),
            fields: e["fields"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| {
                    let name = f[0].as_str().unwrap();
                    (
                        Bytes::copy_from_slice(name.as_bytes()),
                        Bytes::from(base64(f[1].as_str().unwrap())),
                    )
                })
                .collect(),
            uuid: e["expect"]["uuid"].as_str().unwrap().to_owned(),
            payload: e["expect"]["payload"].as_str().unwrap().as_bytes().to_vec(),
            metadata: serde_json::from_value(e["expect"]["metadata"].clone()).unwrap(),
        })
        .collect()
}

/// An entry as `XRANGE` gives it, fields and values as bytes.
type RawStreamEntry = (String, Vec<(Vec<u8>, Vec<u8>)>);

fn metadata_map(message: &Message) -> BTreeMap<String, String> {
    message
        .metadata()
        .iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Writes an entry as a Watermill service does (raw `XADD` of its layout).
async fn xadd_watermill(
    conn: &RedisConnection,
    stream: &str,
    uuid: &str,
    payload: &[u8],
    metadata: &[(&str, &str)],
) {
    let _: String = conn
        .command(
            cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("_watermill_message_uuid")
                .arg(uuid)
                .arg("payload")
                .arg(payload)
                .arg("metadata")
                .arg(fixmap(metadata)),
        )
        .await
        .unwrap();
}

/// A subscriber and a publisher on `conn` that read and write Watermill's layout, as a Rust
/// service in a Watermill fleet runs them.
fn watermill_pair(conn: &RedisConnection) -> (Arc<RedisSubscriber>, Arc<RedisPublisher>) {
    let codec = WatermillCodec::default();
    let subscriber = RedisSubscriber::new(
        conn.clone(),
        RedisSubscriberOptions::default().codec(codec.clone()),
    )
    .unwrap();
    let publisher = RedisPublisher::new(conn.clone(), PublisherOptions::default().codec(codec));
    (Arc::new(subscriber), Arc::new(publisher))
}

/// The fields of the first entry of `stream`.
async fn first_entry(conn: &RedisConnection, stream: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let written: Vec<RawStreamEntry> = conn
        .command(cmd("XRANGE").arg(stream).arg("-").arg("+").arg("COUNT").arg(1))
        .await
        .unwrap();
    written.into_iter().next().expect("an entry").1
}

fn sorted(mut fields: Vec<(Bytes, Bytes)>) -> Vec<(Bytes, Bytes)> {
    fields.sort();
    fields
}

fn encoded(codec: &dyn Codec, message: &Message) -> Vec<(Bytes, Bytes)> {
    codec
        .encode(message)
        .expect("encodes")
        .into_iter()
        .map(|(name, value)| (Bytes::from_static(name.as_bytes()), value))
        .collect()
}

#[test]
fn entries_natricine_wrote_decode_to_what_it_meant() {
    // Two of the three carry no event type: a subscription names one for them.
    let codec = NatricineCodec::default().fallback_event_type("natricine.message");
    for entry in natricine_fixture() {
        let message = codec
            .decode(RawEntry {
                id: entry.id,
                fields: entry.fields.clone(),
            })
            .unwrap_or_else(|e| panic!("entry {}: {e}", entry.id));
        assert_eq!(message.uuid().to_string(), entry.uuid, "entry {}", entry.id);
        assert_eq!(&message.payload()[..], &entry.payload[..], "entry {}", entry.id);
        assert_eq!(metadata_map(&message), entry.metadata, "entry {}", entry.id);
        let expected_type = entry
            .metadata
            .get("event_type")
            .map_or("natricine.message", String::as_str);
        assert_eq!(message.event_type(), expected_type, "entry {}", entry.id);
        message.json().expect("a JSON payload");
    }
}

#[test]
fn what_streamwise_writes_with_the_natricine_codec_is_what_natricine_wrote() {
    for entry in natricine_fixture() {
        let uuid = entry.uuid.parse().unwrap();
        let mut message = Message::from_json_bytes("unused", entry.payload.clone())
            .unwrap()
            .with_uuid(uuid);
        for (k, v) in &entry.metadata {
            message = message.with_metadata(k, v);
        }
        // An entry whose metadata names its event type comes from a message of that type;
        // the others from a stream of one type, whose codec writes no key for it.
        let codec = match entry.metadata.get("event_type") {
            Some(t) => {
                message = Message::from_json_bytes(t.as_str(), entry.payload.clone())
                    .unwrap()
                    .with_uuid(uuid)
                    .with_metadata_map(message.metadata().clone());
                NatricineCodec::default()
            }
            None => NatricineCodec::default().fixed_event_type("unused"),
        };
        assert_eq!(
            sorted(encoded(&codec, &message)),
            sorted(entry.fields.clone()),
            "entry {}",
            entry.id
        );
    }
}

/// MessagePack of a map of short strings, as any encoder writes it (fixmap, fixstr).
fn fixmap(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut out = vec![0x80 | pairs.len() as u8];
    for (k, v) in pairs {
        for s in [k, v] {
            out.push(0xa0 | s.len() as u8);
            out.extend_from_slice(s.as_bytes());
        }
    }
    out
}

#[test]
fn the_watermill_layout_round_trips_and_keeps_ids_that_are_not_uuids() {
    let codec = WatermillCodec::default();
    let message = Message::new("OrderPlaced", &serde_json::json!({"id": 7}))
        .unwrap()
        .with_metadata("tenant", "acme");
    let fields = encoded(&codec, &message);
    let expected = vec![
        (
            Bytes::from_static(b"_watermill_message_uuid"),
            Bytes::from(message.uuid().to_string()),
        ),
        (Bytes::from_static(b"payload"), message.payload().clone()),
        (
            Bytes::from_static(b"metadata"),
            Bytes::from(fixmap(&[("name", "OrderPlaced"), ("tenant", "acme")])),
        ),
    ];
    assert_eq!(sorted(fields.clone()), sorted(expected));
    let back = codec
        .decode(RawEntry {
            id: EntryId::new(1, 0),
            fields,
        })
        .unwrap();
    assert_eq!(back.uuid(), message.uuid());
    assert_eq!(back.event_type(), "OrderPlaced");
    assert_eq!(back.payload(), message.payload());
    // The event type's key stays in the metadata, where Watermill handlers look for it.
    let mut want = metadata_map(&message);
    want.insert("name".into(), "OrderPlaced".into());
    assert_eq!(metadata_map(&back), want);

    // Empty metadata is an empty string, as Watermill writes it, and reads back as none.
    let typed = WatermillCodec::default().fixed_event_type("OrderPlaced");
    let bare = Message::from_json_bytes("OrderPlaced", &b"{}"[..]).unwrap();
    let fields = encoded(&typed, &bare);
    assert!(fields.contains(&(Bytes::from_static(b"metadata"), Bytes::new())));
    let back = typed
        .decode(RawEntry {
            id: EntryId::new(2, 0),
            fields,
        })
        .unwrap();
    assert!(back.metadata().is_empty());

    // A ULID (Watermill's other id) is kept, and goes back out as the id.
    let ulid = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
    let entry = RawEntry {
        id: EntryId::new(3, 0),
        fields: vec![
            (
                Bytes::from_static(b"_watermill_message_uuid"),
                Bytes::from_static(ulid.as_bytes()),
            ),
            (Bytes::from_static(b"payload"), Bytes::from_static(b"{}")),
            (
                Bytes::from_static(b"metadata"),
                Bytes::from(fixmap(&[("name", "X")])),
            ),
        ],
    };
    let back = codec.decode(entry).unwrap();
    assert_eq!(back.metadata().get("_watermill_message_uuid"), Some(ulid));
    let again = encoded(&codec, &back);
    assert!(again.contains(&(
        Bytes::from_static(b"_watermill_message_uuid"),
        Bytes::from_static(ulid.as_bytes())
    )));
    assert!(again.contains(&(
        Bytes::from_static(b"metadata"),
        Bytes::from(fixmap(&[("name", "X")]))
    )));
}

fn reason(codec: &dyn Codec, fields: Vec<(&'static [u8], Vec<u8>)>) -> String {
    let entry = RawEntry {
        id: EntryId::new(9, 0),
        fields: fields
            .into_iter()
            .map(|(k, v)| (Bytes::from_static(k), Bytes::from(v)))
            .collect(),
    };
    match codec.decode(entry) {
        Err(Error::Decode { reason, .. }) => reason,
        other => panic!("decoded: {other:?}"),
    }
}

#[test]
fn entries_that_do_not_decode_are_refused_with_the_reason() {
    let codec = WatermillCodec::default();
    let id = || {
        (
            &b"_watermill_message_uuid"[..],
            b"0198c2a4-6b1e-7d5c-9a3f-2b8e4c6d1f00".to_vec(),
        )
    };
    let payload = |p: &[u8]| (&b"payload"[..], p.to_vec());
    let metadata = |m: &[u8]| (&b"metadata"[..], m.to_vec());
    let named = fixmap(&[("name", "X")]);
    assert!(reason(&codec, vec![payload(b"{}"), metadata(&named)]).contains("no _watermill_message_uuid"));
    assert!(reason(&codec, vec![id(), metadata(&named)]).contains("no payload"));
    assert!(reason(&codec, vec![id(), payload(b"not json"), metadata(&named)]).contains("not JSON"));
    assert!(
        reason(&codec, vec![id(), payload(b"{}"), metadata(b"\x81\xa1a")]).contains("not a MessagePack map")
    );
    assert!(
        reason(
            &codec,
            vec![id(), payload(b"{}"), metadata(&fixmap(&[("a", "b")]))]
        )
        .contains("no event type")
    );
    assert!(reason(&codec, vec![id(), payload(b"{}"), metadata(b"")]).contains("no event type"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn any_metadata_and_payload_round_trip(
        metadata in proptest::collection::btree_map("\\PC{1,12}", "\\PC{0,40}", 0..6),
        text in "\\PC{0,60}",
        event_type in "\\PC{1,30}",
        key in "\\PC{1,12}",
        watermill in any::<bool>(),
    ) {
        let payload = serde_json::to_vec(&serde_json::json!({ "text": text })).unwrap();
        let mut message = Message::from_json_bytes(event_type.as_str(), payload).unwrap();
        for (k, v) in &metadata {
            message = message.with_metadata(k, v);
        }
        let codec: Box<dyn Codec> = if watermill {
            Box::new(WatermillCodec::default().event_type_key(key.as_str()))
        } else {
            Box::new(NatricineCodec::default().event_type_key(key.as_str()))
        };
        let fields = encoded(&*codec, &message)
            .into_iter()
            .collect();
        let back = codec.decode(RawEntry { id: EntryId::new(5, 0), fields }).unwrap();
        prop_assert_eq!(back.uuid(), message.uuid());
        prop_assert_eq!(back.event_type(), event_type.as_str());
        prop_assert_eq!(back.payload(), message.payload());
        // The event type travels in its key (over a metadata value of that name).
        let mut want = metadata.clone();
        want.insert(key.clone(), event_type.clone());
        prop_assert_eq!(metadata_map(&back), want);
    }

    /// Any bytes in any field, any field missing, extra fields of any name and value: the
    /// entry decodes (to a JSON payload) or is refused with a reason, which the subscriber
    /// turns into a dead letter (`a_router_consumes_what_a_watermill_service_wrote`).
    #[test]
    fn any_bytes_in_any_field_decode_or_give_a_reason(
        id in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..48)),
        payload in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..48)),
        metadata in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..48)),
        extra in proptest::collection::vec(
            (proptest::collection::vec(any::<u8>(), 0..12), proptest::collection::vec(any::<u8>(), 0..12)),
            0..3,
        ),
        watermill in any::<bool>(),
    ) {
        let (codec, id_field): (Box<dyn Codec>, &'static [u8]) = if watermill {
            (Box::new(WatermillCodec::default()), b"_watermill_message_uuid")
        } else {
            (Box::new(NatricineCodec::default()), b"_natricine_message_uuid")
        };
        let mut fields = Vec::new();
        for (name, value) in [(id_field, id), (&b"payload"[..], payload), (&b"metadata"[..], metadata)] {
            if let Some(value) = value {
                fields.push((Bytes::from_static(name), Bytes::from(value)));
            }
        }
        fields.extend(extra.into_iter().map(|(k, v)| (Bytes::from(k), Bytes::from(v))));
        let entry = RawEntry {
            id: EntryId::new(6, 0),
            fields,
        };
        match codec.decode(entry) {
            Ok(message) => prop_assert!(message.json().is_ok()),
            Err(Error::Decode { reason, .. }) => prop_assert!(!reason.is_empty()),
            Err(other) => prop_assert!(false, "{other}"),
        }
    }
}

/// A router reads what a Watermill service wrote (raw `XADD`s of its layout) and dead-letters
/// an entry it cannot read, with the reason; a publisher writes entries of Watermill's layout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_consumes_what_a_watermill_service_wrote() {
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let conn = backend.connection().clone();
    for (n, payload) in [(1, &b"{\"id\":1}"[..]), (2, b"not json"), (3, b"{\"id\":3}")] {
        let uuid = format!("0198c2a4-6b1e-7d5c-9a3f-2b8e4c6d1f0{n}");
        xadd_watermill(
            &conn,
            "wm-orders",
            &uuid,
            payload,
            &[("name", "OrderPlaced"), ("tenant", "acme")],
        )
        .await;
    }
    type Seen = Arc<Mutex<Vec<(u64, String)>>>;
    async fn placed(Json(order): Json<serde_json::Value>, metadata: Metadata, State(seen): State<Seen>) {
        let tenant = metadata.get("tenant").unwrap_or_default().to_owned();
        seen.lock().unwrap().push((order["id"].as_u64().unwrap(), tenant));
    }
    let seen: Seen = Arc::default();
    let (subscriber, publisher) = watermill_pair(&conn);
    let router = Router::with_state(seen.clone());
    let routes = router.routes().route("OrderPlaced", placed);
    let running = router
        .subscribe(
            "wm-orders",
            streamwise::SubscribeOptions::new("rust", "w1"),
            routes,
        )
        .start(subscriber, publisher.clone())
        .await
        .unwrap();
    streamwise::testing::wait_until_handled(&running, 2).await;
    running.shutdown().await.unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(1, "acme".to_owned()), (3, "acme".to_owned())]
    );
    let dead: Vec<RawStreamEntry> = conn
        .command(
            cmd("XRANGE")
                .arg(streamwise::dead_letter::stream_for("wm-orders"))
                .arg("-")
                .arg("+"),
        )
        .await
        .unwrap();
    assert_eq!(dead.len(), 1, "the entry that is not JSON");
    let record: String = dead[0]
        .1
        .iter()
        .map(|(k, v)| format!("{}={} ", String::from_utf8_lossy(k), String::from_utf8_lossy(v)))
        .collect();
    assert!(record.contains("not JSON"), "{record}");

    // Written back in Watermill's layout, field for field.
    let reply = Message::new("OrderShipped", &serde_json::json!({"id": 1})).unwrap();
    publisher.publish("wm-shipped", reply.clone()).await.unwrap();
    let written: Vec<RawStreamEntry> = conn
        .command(cmd("XRANGE").arg("wm-shipped").arg("-").arg("+"))
        .await
        .unwrap();
    let mut fields = written[0].1.clone();
    fields.sort();
    assert_eq!(
        fields,
        vec![
            (
                b"_watermill_message_uuid".to_vec(),
                reply.uuid().to_string().into_bytes()
            ),
            (b"metadata".to_vec(), fixmap(&[("name", "OrderShipped")])),
            (b"payload".to_vec(), reply.payload().to_vec()),
        ]
    );
}

/// A dead letter of a topic a Watermill service also reads is replayed in Watermill's layout
/// (`ReplayOptions::layout`, `streamwise dlq replay --codec watermill`): the Go consumers read
/// it as they read the original; in streamwise's own layout they could not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_replayed_in_the_layout_of_its_topic() {
    use streamwise::redis::ops::{self, Mode, ReplayOptions};
    use streamwise::router::Permanent;
    use streamwise::wire_format::{WireFormat, WireSettings};
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let conn = backend.connection().clone();
    xadd_watermill(
        &conn,
        "wm-replay",
        "0198c2a4-6b1e-7d5c-9a3f-2b8e4c6d1f07",
        b"{\"id\":7}",
        &[("name", "OrderPlaced")],
    )
    .await;
    async fn refuse() -> std::result::Result<(), Permanent> {
        Err(Permanent::new("unknown customer"))
    }
    let (subscriber, publisher) = watermill_pair(&conn);
    let router = Router::new();
    let routes = router.routes().route("OrderPlaced", refuse);
    let running = router
        .subscribe(
            "wm-replay",
            streamwise::SubscribeOptions::new("rust", "w1"),
            routes,
        )
        .start(subscriber, publisher)
        .await
        .unwrap();
    streamwise::testing::wait_until_handled(&running, 1).await;
    running.shutdown().await.unwrap();

    // Read in the topic's layout, the record shows its reason.
    let peek = ops::peek_dead_letters(&conn, "wm-replay", 10, None, &WatermillCodec::default())
        .await
        .unwrap();
    assert_eq!(peek.total, 1);
    assert!(
        peek.latest[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("unknown customer")),
        "{peek:?}"
    );
    let report = ops::replay_dead_letters(
        &conn,
        "wm-replay",
        &ReplayOptions::new(Mode::Execute).layout(WireFormat::Watermill, WireSettings::default()),
        std::future::pending(),
        &mut |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(report.replayed, 1, "{report:?}");
    let entries: Vec<RawStreamEntry> = conn
        .command(cmd("XRANGE").arg("wm-replay").arg("-").arg("+"))
        .await
        .unwrap();
    assert_eq!(entries.len(), 2);
    let replayed: BTreeMap<Vec<u8>, Vec<u8>> = entries[1].1.iter().cloned().collect();
    assert_eq!(
        replayed
            .keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect::<Vec<_>>(),
        ["_watermill_message_uuid", "metadata", "payload"]
    );
    assert_eq!(replayed[&b"payload"[..]], b"{\"id\":7}");
    // Decoded as a Watermill consumer would: its name, and the replay's marks.
    let message = WatermillCodec::default()
        .decode(RawEntry {
            id: EntryId::new(1, 0),
            fields: entries[1]
                .1
                .iter()
                .map(|(k, v)| (Bytes::from(k.clone()), Bytes::from(v.clone())))
                .collect(),
        })
        .unwrap();
    assert_eq!(message.event_type(), "OrderPlaced");
    assert_eq!(message.metadata().get("replay.count"), Some("1"));
}

/// The configuration file names the layout (`codec`) of the producer and the consumer; a name
/// that is not a layout is refused with its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configuration_file_picks_a_peer_layout() {
    use streamwise::redis_streams::Config;
    use streamwise::wire_format::WireFormat;
    let server = RedisServer::start();
    let yaml = format!(
        "redis_streams:\n  url: {}\n  producer:\n    stream: cfg-orders\n    codec: watermill\n  consumer:\n    group: g\n    consumer: c\n    codec: natricine\n",
        server.url()
    );
    let config = Config::from_yaml_str(&yaml).unwrap();
    assert_eq!(config.producer.options.wire_format, WireFormat::Watermill);
    assert_eq!(config.consumer.options.wire_format, WireFormat::Natricine);
    let producer = config.stream_producer().unwrap();
    producer
        .publish("OrderPlaced", &serde_json::json!({"id": 1}), None)
        .await
        .unwrap();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let written = first_entry(backend.connection(), "cfg-orders").await;
    let names: Vec<&[u8]> = written.iter().map(|(k, _)| &k[..]).collect();
    assert!(names.contains(&&b"_watermill_message_uuid"[..]), "{names:?}");

    let bad = Config::from_yaml_str("redis_streams:\n  producer:\n    codec: protobuf\n").unwrap_err();
    assert_eq!(bad.invalid_field(), Some("redis_streams.producer.codec"));
}

/// `codec` as a mapping: a layout with its settings. A consumer configured with natricine's
/// layout and a fallback type reads all three fixture entries (two carry no event type); a
/// producer configured with Watermill's layout, another event type key and another id field
/// writes them; settings that do not fit are refused with their key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configuration_file_sets_a_peer_layouts_event_type_and_fields() {
    use streamwise::redis_streams::Config;
    let server = RedisServer::start();
    let yaml = format!(
        "redis_streams:\n  url: {}\n  producer:\n    stream: cfg-fields\n    codec:\n      format: watermill\n      event_type_key: kind\n      uuid_field: id\n  consumer:\n    group: g\n    consumer: c\n    codec:\n      format: natricine\n      fallback_event_type: natricine.message\n",
        server.url()
    );
    let config = Config::from_yaml_str(&yaml).unwrap();

    // The consumer's codec, as StreamConsumer makes it from these options.
    let options = &config.consumer.options;
    let codec = options.wire_format.codec_with(&options.wire_settings).unwrap();
    for entry in natricine_fixture() {
        let message = codec
            .decode(RawEntry {
                id: entry.id,
                fields: entry.fields.clone(),
            })
            .unwrap_or_else(|e| panic!("entry {}: {e}", entry.id));
        let expected = entry
            .metadata
            .get("event_type")
            .map_or("natricine.message", String::as_str);
        assert_eq!(message.event_type(), expected, "entry {}", entry.id);
    }

    let producer = config.stream_producer().unwrap();
    producer
        .publish("OrderPlaced", &serde_json::json!({"id": 1}), None)
        .await
        .unwrap();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let written = first_entry(backend.connection(), "cfg-fields").await;
    let fields: BTreeMap<&[u8], &[u8]> = written.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    assert_eq!(
        fields.keys().copied().collect::<Vec<_>>(),
        [&b"id"[..], b"metadata", b"payload"]
    );
    assert_eq!(fields[&b"metadata"[..]], &fixmap(&[("kind", "OrderPlaced")])[..]);

    for (codec, field) in [
        // Settings are for the peers' layouts.
        ("{format: streamwise, uuid_field: id}", "codec"),
        // A fixed type leaves no room for a key.
        (
            "{format: natricine, fixed_event_type: a, event_type_key: b}",
            "codec",
        ),
        ("{format: natricine, uuid_field: ''}", "codec.uuid_field"),
        ("{event_type_key: b}", "codec.format"),
        ("{format: natricine, colour: blue}", "codec.colour"),
    ] {
        let yaml = format!("redis_streams:\n  consumer:\n    codec: {codec}\n");
        let err = Config::from_yaml_str(&yaml).unwrap_err();
        assert_eq!(
            err.invalid_field(),
            Some(format!("redis_streams.consumer.{field}").as_str()),
            "{codec}: {err}"
        );
    }
}

/// CQRS through Watermill's layout: a command a Go service wrote (its name in metadata key
/// `name`, as Watermill's CQRS marshaler writes it) is handled by a command processor, and the
/// event it emits goes out with its name in that key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cqrs_commands_and_events_travel_in_watermills_layout() {
    use std::convert::Infallible;
    use streamwise::cqrs::{Command, Cqrs, Emit, Event};
    // Watermill's CQRS marshalers name a type `FullyQualifiedStructName` unless told
    // otherwise (`GenerateName`): the Go package, a dot, the struct.
    #[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
    struct PlaceOrder {
        id: u32,
    }
    impl Command for PlaceOrder {
        fn name() -> std::borrow::Cow<'static, str> {
            "main.PlaceOrder".into()
        }
    }
    #[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
    struct OrderPlaced {
        id: u32,
    }
    impl Event for OrderPlaced {
        fn name() -> std::borrow::Cow<'static, str> {
            "main.OrderPlaced".into()
        }
    }

    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let conn = backend.connection().clone();
    let cqrs = Cqrs::new();
    let topic = cqrs.command_topic::<PlaceOrder>().unwrap();
    xadd_watermill(
        &conn,
        &topic,
        "01ARZ3NDEKTSV4RRFFQ69G5FAV",
        b"{\"id\":42}",
        &[("name", "main.PlaceOrder")],
    )
    .await;
    let handled = Arc::new(Mutex::new(Vec::new()));
    let log = handled.clone();
    let processor = cqrs.command_processor("orders").handle(move |cmd: PlaceOrder| {
        let log = log.clone();
        async move {
            log.lock().unwrap().push(cmd.id);
            Ok::<_, Infallible>(Emit::new().event(OrderPlaced { id: cmd.id }))
        }
    });
    let (subscriber, publisher) = watermill_pair(&conn);
    let running = processor
        .register(Router::new(), "billing")
        .unwrap()
        .start(subscriber, publisher)
        .await
        .unwrap();
    streamwise::testing::wait_until_handled(&running, 1).await;
    running.shutdown().await.unwrap();
    assert_eq!(*handled.lock().unwrap(), [42]);
    let events: Vec<RawStreamEntry> = conn
        .command(
            cmd("XRANGE")
                .arg(cqrs.event_topic::<OrderPlaced>().unwrap())
                .arg("-")
                .arg("+"),
        )
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
    let metadata = events[0]
        .1
        .iter()
        .find(|(k, _)| k == b"metadata")
        .map(|(_, v)| v.clone())
        .expect("a metadata field");
    assert_eq!(metadata, fixmap(&[("name", "main.OrderPlaced")]));
}
