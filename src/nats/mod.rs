//! The NATS JetStream backend (feature `nats`): [`NatsBackend`] connects, and makes a
//! [`NatsPublisher`] and a [`NatsSubscriber`] that keep the contract of
//! [`Publisher`](crate::Publisher) and [`Subscriber`](crate::Subscriber) on a server with
//! another model than Redis Streams.
//!
//! How the concepts map:
//!
//! | streamwise | JetStream |
//! |---|---|
//! | topic `orders` | stream `orders` with the one subject `streamwise.orders` ([`NatsOptions::subject_prefix`]); created by the first publish or subscribe when allowed, on file storage by default ([`NatsOptions::storage`], [`NatsOptions::replicas`]) |
//! | entry id | `0-<stream sequence>` (the publish acknowledgement's sequence) |
//! | consumer group | a durable pull consumer named after the group, explicit acks, `ack_wait` from [`NatsSubscriberOptions::ack_wait`] |
//! | consumer name | a lease in the key-value bucket `streamwise_leases` (key `<topic>.<group>.<consumer>`, written with create-if-absent, renewed by compare-and-set every third of its TTL, deleted on close); a second live holder is refused with [`Error::ConsumerActive`] |
//! | `max_in_flight` | each pull request asks for as many messages as there are free slots, never more |
//! | ack / nack / `nack_after` | `+ACK` sent at once, confirmed a batch at a time (the last one sent again as a request); `-NAK` / `-NAK {"delay": ...}`, each confirmed by the server |
//! | a long handler | `+WPI` (in progress) for every held delivery every third of `ack_wait` |
//! | dead letter | the record of [`crate::dead_letter`] published to stream `{orders}-dead` (publish acknowledged), then `+TERM` |
//! | `max_deliveries` | a message read for the `max_deliveries + 1`-th time is dead-lettered, record first, then `+TERM` |
//! | reclaim of a stopped consumer's entries | the server's redelivery after `ack_wait` |
//!
//! What differs from Redis, and why, is in the README's NATS section. The module's parts:
//! `url.rs` (URLs and their credentials), `options.rs`, `wire.rs` (names, ids, a message as
//! headers and body), `publisher.rs`, `subscriber.rs` (subscribe, the read loop),
//! `settle.rs` (the settler, the writer of settlements, the heartbeat) and `lease.rs`.
//!
//! ```no_run
//! # async fn demo() -> streamwise::Result<()> {
//! use futures::StreamExt;
//! use streamwise::nats::NatsBackend;
//! use streamwise::prelude::*;
//!
//! let nats = NatsBackend::connect("nats://127.0.0.1:4222").await?;
//! let subscriber = nats.subscriber();
//! let mut orders = subscriber.subscribe("orders", SubscribeOptions::new("billing", "worker-1")).await?;
//! nats.publisher().publish("orders", Message::new("order.placed", &7)?).await?;
//! let delivery = orders.next().await.expect("open")?;
//! delivery.ack().await?;
//! subscriber.close().await?;
//! # Ok(()) }
//! ```

mod lease;
mod options;
mod publisher;
mod settle;
mod subscriber;
mod url;
mod wire;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use async_nats::jetstream::{self, kv, stream};
use tokio::sync::OnceCell;

use crate::error::{Error, Result, validate_name, validate_stream_name};

pub use options::{NatsOptions, NatsPublisherOptions, NatsSubscriberOptions, Storage};
pub use publisher::NatsPublisher;
pub use subscriber::NatsSubscriber;

/// This backend's name in traces (`messaging.system`).
pub(crate) const SYSTEM: &str = "nats";

/// The key-value bucket of consumer leases.
pub(crate) const LEASE_BUCKET: &str = "streamwise_leases";

/// A connection to a NATS server (or cluster) with JetStream, from which publishers and
/// subscribers are made. Cloning is cheap and shares the connection.
#[derive(Clone)]
pub struct NatsBackend {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for NatsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBackend")
            .field("url", &self.shared.url)
            .finish_non_exhaustive()
    }
}

/// What every publisher and subscriber of one backend shares.
pub(crate) struct Shared {
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) options: NatsOptions,
    /// The URL with its credentials hidden, for messages.
    pub(crate) url: String,
    /// Streams known to exist: a publish to one of them goes straight out.
    known: Mutex<HashSet<String>>,
    leases: OnceCell<kv::Store>,
}

impl NatsBackend {
    /// Connects to `url` (`nats://[user:password@|token@]host:port[,host:port...]`, `tls://`
    /// for TLS) with the default [`NatsOptions`]. The query may name TLS files:
    /// `tls_ca=<pem>` (repeatable), `tls_cert=<pem>&tls_key=<pem>` (a client certificate),
    /// and `tls_required=true`; each makes TLS required.
    ///
    /// Errors: [`Error::Invalid`] (`url`) for a URL that does not parse,
    /// [`Error::Connection`] when no server answers or the credentials are refused; neither
    /// ever shows the password or token.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, NatsOptions::default()).await
    }

    /// Connects to `url` with `options`, checked first.
    pub async fn connect_with(url: &str, options: NatsOptions) -> Result<Self> {
        options.validate()?;
        let parsed = url::NatsUrl::parse(url)?;
        let redacted = parsed.redacted();
        let mut connect = async_nats::ConnectOptions::new()
            .connection_timeout(options.connection_timeout)
            .request_timeout(Some(options.request_timeout))
            .require_tls(parsed.tls || options.require_tls);
        connect = match parsed.auth.clone() {
            url::Auth::None => connect,
            url::Auth::UserPassword(user, password) => connect.user_and_password(user, password),
            url::Auth::Token(token) => connect.token(token),
        };
        for root in options.root_certificates.iter().chain(&parsed.tls_roots) {
            connect = connect.add_root_certificates(root.clone());
        }
        // The URL's client certificate, else the options'.
        if let Some((cert, key)) = parsed.tls_client.as_ref().or(options.client_certificate.as_ref()) {
            connect = connect.add_client_certificate(cert.clone(), key.clone());
        }
        if let Some(name) = &options.name {
            connect = connect.name(name);
        }
        let client = connect
            .connect(parsed.servers.clone())
            .await
            .map_err(|e| Error::Connection {
                // The kind only: the client's error may carry the address it was given.
                message: format!("cannot connect to {redacted}: {}", e.kind()),
                source: None,
            })?;
        let js = jetstream::ContextBuilder::new()
            .timeout(options.request_timeout)
            .ack_timeout(options.request_timeout)
            .build(client.clone());
        Ok(NatsBackend {
            shared: Arc::new(Shared {
                client,
                js,
                options,
                url: redacted,
                known: Mutex::default(),
                leases: OnceCell::new(),
            }),
        })
    }

    /// The URL it connected to, with the password or token hidden.
    pub fn url(&self) -> &str {
        &self.shared.url
    }

    /// The options it was made with.
    pub fn options(&self) -> &NatsOptions {
        &self.shared.options
    }

    /// A publisher with the default options (streams created when missing, 1 MiB entries).
    pub fn publisher(&self) -> NatsPublisher {
        NatsPublisher::new(self.shared.clone(), NatsPublisherOptions::default())
    }

    /// A publisher with `options`, checked first.
    pub fn publisher_with(&self, options: NatsPublisherOptions) -> Result<NatsPublisher> {
        options.validate()?;
        Ok(NatsPublisher::new(self.shared.clone(), options))
    }

    /// A subscriber with the default options.
    pub fn subscriber(&self) -> NatsSubscriber {
        NatsSubscriber::new(self.shared.clone(), NatsSubscriberOptions::default())
    }

    /// A subscriber with `options`, checked first.
    pub fn subscriber_with(&self, options: NatsSubscriberOptions) -> Result<NatsSubscriber> {
        options.validate()?;
        Ok(NatsSubscriber::new(self.shared.clone(), options))
    }

    /// How many messages of `topic` are delivered in `group` and not yet acknowledged (the
    /// consumer's `num_ack_pending`: nacked ones waiting for their redelivery included).
    pub async fn pending_count(&self, topic: &str, group: &str) -> Result<u64> {
        validate_stream_name("topic", topic)?;
        validate_name("group", group)?;
        let missing = || Error::GroupNotFound {
            stream: topic.to_owned(),
            group: group.to_owned(),
        };
        let stream = self.shared.stream(topic).await?.ok_or_else(missing)?;
        match stream.consumer_info(group).await {
            Ok(info) => Ok(info.num_ack_pending as u64),
            Err(e) if is_not_found(&e) => Err(missing()),
            Err(e) => Err(self.shared.failed("CONSUMER.INFO", e)),
        }
    }

    /// Number of messages in the stream of `topic`.
    pub async fn stream_len(&self, topic: &str) -> Result<u64> {
        validate_stream_name("topic", topic)?;
        let mut stream = self
            .shared
            .stream(topic)
            .await?
            .ok_or_else(|| Error::StreamNotFound {
                stream: topic.to_owned(),
            })?;
        let info = stream
            .info()
            .await
            .map_err(|e| self.shared.failed("STREAM.INFO", e))?;
        Ok(info.state.messages)
    }
}

impl Shared {
    pub(crate) fn known(&self) -> MutexGuard<'_, HashSet<String>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The configuration of the stream of `topic` this backend creates.
    pub(crate) fn stream_config(&self, topic: &str) -> stream::Config {
        stream::Config {
            name: topic.to_owned(),
            subjects: vec![wire::subject(&self.options.subject_prefix, topic)],
            storage: self.storage(),
            num_replicas: self.options.replicas,
            ..Default::default()
        }
    }

    fn storage(&self) -> stream::StorageType {
        match self.options.storage {
            Storage::File => stream::StorageType::File,
            Storage::Memory => stream::StorageType::Memory,
        }
    }

    /// The stream of `topic`, `None` when it does not exist.
    pub(crate) async fn stream(&self, topic: &str) -> Result<Option<stream::Stream>> {
        match self.js.get_stream(topic).await {
            Ok(stream) => Ok(Some(stream)),
            Err(e) => match e.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    self.known().remove(topic);
                    Ok(None)
                }
                _ => Err(self.failed("STREAM.INFO", e)),
            },
        }
    }

    /// Makes sure the stream of `topic` exists (created as [`stream_config`](Self::stream_config)
    /// says when missing).
    pub(crate) async fn ensure_stream(&self, topic: &str) -> Result<stream::Stream> {
        match self.js.get_or_create_stream(self.stream_config(topic)).await {
            Ok(stream) => {
                self.known().insert(topic.to_owned());
                Ok(stream)
            }
            // Another process may have created it between the look and the create.
            Err(first) => match self.stream(topic).await? {
                Some(stream) => {
                    self.known().insert(topic.to_owned());
                    Ok(stream)
                }
                None => Err(match first.kind() {
                    jetstream::context::CreateStreamErrorKind::JetStream(js) => refused("STREAM.CREATE", &js),
                    _ => self.failed("STREAM.CREATE", first),
                }),
            },
        }
    }

    /// The lease bucket, created (with entries that expire after `ttl`) when missing.
    pub(crate) async fn leases(&self, ttl: std::time::Duration) -> Result<&kv::Store> {
        self.leases
            .get_or_try_init(|| async {
                if let Ok(store) = self.js.get_key_value(LEASE_BUCKET).await {
                    return Ok(store);
                }
                // The bucket's stream, as the key-value layer lays it out, made directly: the
                // client's own `create_key_value` first reads account information in a form
                // servers before 2.10 do not give.
                let config = stream::Config {
                    name: format!("KV_{LEASE_BUCKET}"),
                    description: Some("streamwise: which process holds each consumer name".to_owned()),
                    subjects: vec![format!("$KV.{LEASE_BUCKET}.>")],
                    max_messages_per_subject: 1,
                    max_age: ttl,
                    storage: self.storage(),
                    num_replicas: self.options.replicas,
                    allow_rollup: true,
                    deny_delete: true,
                    allow_direct: true,
                    discard: stream::DiscardPolicy::New,
                    ..Default::default()
                };
                let created = self.js.get_or_create_stream(config).await;
                match self.js.get_key_value(LEASE_BUCKET).await {
                    Ok(store) => Ok(store),
                    Err(e) => Err(match created {
                        Err(first) => self.failed("KV.CREATE", first),
                        Ok(_) => self.failed("KV.INFO", e),
                    }),
                }
            })
            .await
    }

    /// An error of the client or the server, as [`Error::Server`] when JetStream refused the
    /// request (its error code and description), else [`Error::Connection`].
    pub(crate) fn failed(&self, what: &str, err: impl std::error::Error + Send + Sync + 'static) -> Error {
        let text = err.to_string();
        // async-nats writes JetStream refusals as "... (code 10059, description ...)"-like
        // texts; the API error itself is found through the source chain where kept.
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
        while let Some(e) = source {
            if let Some(js) = e.downcast_ref::<jetstream::Error>() {
                return refused(what, js);
            }
            source = e.source();
        }
        Error::Connection {
            message: format!("{what} on {}: {text}", self.url),
            source: Some(Box::new(err)),
        }
    }
}

/// A request JetStream refused, as [`Error::Server`] with its error code (`10074`, ...) and
/// description.
pub(crate) fn refused(what: &str, js: &jetstream::Error) -> Error {
    Error::Server {
        command: what.to_owned(),
        code: js.error_code().0.to_string(),
        message: js.to_string(),
    }
}

/// Whether a consumer lookup failed because the consumer (or its stream) does not exist.
pub(crate) fn is_not_found(e: &jetstream::context::ConsumerInfoError) -> bool {
    use async_nats::jetstream::context::ConsumerInfoErrorKind as K;
    match e.kind() {
        K::NotFound | K::StreamNotFound => true,
        K::JetStream(js) => matches!(
            js.error_code(),
            jetstream::ErrorCode::CONSUMER_NOT_FOUND | jetstream::ErrorCode::STREAM_NOT_FOUND
        ),
        _ => false,
    }
}
