//! The options of the NATS backend: the connection and the streams it creates
//! ([`NatsOptions`]), its publishers ([`NatsPublisherOptions`]) and its subscribers
//! ([`NatsSubscriberOptions`]). Each is checked before it is used; [`Error::Invalid`] names
//! the option at fault.

use std::path::PathBuf;
use std::time::Duration;

use crate::codec::DEFAULT_MAX_ENTRY_SIZE;
use crate::error::{Error, Result};
use crate::pubsub::MAX_INTERVAL;

/// Where JetStream keeps the streams the backend creates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Storage {
    /// On disk (the default): survives a server restart.
    #[default]
    File,
    /// In memory: faster, lost when the server stops.
    Memory,
}

/// How the backend connects, and how it creates streams ([`NatsBackend::connect_with`]).
///
/// [`NatsBackend::connect_with`]: super::NatsBackend::connect_with
///
/// ```
/// use std::time::Duration;
/// use streamwise::nats::{NatsOptions, Storage};
///
/// let options = NatsOptions::default()
///     .replicas(3)
///     .storage(Storage::File)
///     .request_timeout(Duration::from_secs(5));
/// assert_eq!(options.subject_prefix, "streamwise");
/// assert_eq!(NatsOptions::default().replicas(0).validate().unwrap_err().invalid_field(), Some("replicas"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NatsOptions {
    /// The name the connection gives itself (shown by the server's monitoring). Default none.
    pub name: Option<String>,
    /// Topic `t` is stored in stream `t` under subject `<subject_prefix>.t`. Default
    /// `streamwise`; dot-separated tokens of A-Z, a-z, 0-9, `-` and `_`.
    pub subject_prefix: String,
    /// Where the streams it creates are kept. Default [`Storage::File`].
    pub storage: Storage,
    /// Copies of each stream it creates (and of its lease bucket) on a cluster. Default 1;
    /// 1 to 5.
    pub replicas: usize,
    /// How long connecting may take. Default 5 s.
    pub connection_timeout: Duration,
    /// How long a JetStream request (a publish's acknowledgement, a settlement's confirmation,
    /// an API call) may take. Default 10 s.
    pub request_timeout: Duration,
    /// Require TLS even with `nats://` URLs (`tls://` requires it anyway). Default `false`.
    pub require_tls: bool,
    /// PEM files of root certificates to trust besides the system's.
    pub root_certificates: Vec<PathBuf>,
    /// A client certificate and its key (PEM files), for servers that verify clients.
    pub client_certificate: Option<(PathBuf, PathBuf)>,
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions {
            name: None,
            subject_prefix: "streamwise".to_owned(),
            storage: Storage::File,
            replicas: 1,
            connection_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            require_tls: false,
            root_certificates: Vec::new(),
            client_certificate: None,
        }
    }
}

impl NatsOptions {
    /// The connection's name.
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The prefix of the subjects of topics (default `streamwise`).
    #[must_use]
    pub fn subject_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.subject_prefix = prefix.into();
        self
    }

    /// Where the streams it creates are kept.
    #[must_use]
    pub fn storage(mut self, storage: Storage) -> Self {
        self.storage = storage;
        self
    }

    /// Copies of each stream it creates.
    #[must_use]
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas;
        self
    }

    /// How long connecting may take.
    #[must_use]
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// How long one JetStream request may take.
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Require TLS.
    #[must_use]
    pub fn require_tls(mut self, require: bool) -> Self {
        self.require_tls = require;
        self
    }

    /// Trust the root certificates in this PEM file too.
    #[must_use]
    pub fn root_certificate(mut self, pem: impl Into<PathBuf>) -> Self {
        self.root_certificates.push(pem.into());
        self
    }

    /// Present this client certificate (PEM files of the certificate and its key).
    #[must_use]
    pub fn client_certificate(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_certificate = Some((cert.into(), key.into()));
        self
    }

    /// Checks every option, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        let token_ok = |t: &str| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if !self.subject_prefix.split('.').all(token_ok) {
            return Err(Error::invalid(
                "subject_prefix",
                format_args!(
                    "{:?} is not dot-separated tokens of A-Z, a-z, 0-9, '-' and '_'",
                    self.subject_prefix
                ),
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(Error::invalid(
                "replicas",
                format_args!("{} is not between 1 and 5", self.replicas),
            ));
        }
        positive("connection_timeout", self.connection_timeout)?;
        positive("request_timeout", self.request_timeout)?;
        Ok(())
    }
}

fn positive(field: &'static str, d: Duration) -> Result<()> {
    if d.is_zero() || d > MAX_INTERVAL {
        return Err(Error::invalid(
            field,
            format_args!("{d:?} must be longer than zero and at most {MAX_INTERVAL:?}"),
        ));
    }
    Ok(())
}

/// Options of a [`NatsPublisher`](super::NatsPublisher).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NatsPublisherOptions {
    /// Whether publishing creates a missing stream (default) or fails with
    /// [`Error::StreamNotFound`].
    pub auto_create: bool,
    /// The limit on the encoded size of one entry, as [`wire_size`](crate::codec::wire_size)
    /// counts it. Default 1 MiB; at least 1 byte. (The server's `max_payload`, 1 MiB by
    /// default, limits a message with its headers too.)
    pub max_entry_size: usize,
    /// How many times a publish that got no acknowledgement (a connection lost, a server
    /// restarting) is sent again before it fails, after 50 ms, doubling up to 1 s. Each
    /// publish carries an id of its own (`Nats-Msg-Id`), so JetStream stores one copy
    /// however many are sent within its duplicate window. Default 5; at most 100.
    pub max_retries: u32,
}

impl Default for NatsPublisherOptions {
    fn default() -> Self {
        NatsPublisherOptions {
            auto_create: true,
            max_entry_size: DEFAULT_MAX_ENTRY_SIZE,
            max_retries: 5,
        }
    }
}

impl NatsPublisherOptions {
    /// Whether publishing to a missing stream creates it.
    #[must_use]
    pub fn auto_create(mut self, auto_create: bool) -> Self {
        self.auto_create = auto_create;
        self
    }

    /// The limit on the encoded size of one entry.
    #[must_use]
    pub fn max_entry_size(mut self, bytes: usize) -> Self {
        self.max_entry_size = bytes;
        self
    }

    /// How many times a publish without acknowledgement is sent again.
    #[must_use]
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// Checks the options.
    pub fn validate(&self) -> Result<()> {
        if self.max_entry_size == 0 {
            return Err(Error::invalid("max_entry_size", "must be at least 1 byte"));
        }
        if self.max_retries > 100 {
            return Err(Error::invalid(
                "max_retries",
                format_args!("{} is more than 100", self.max_retries),
            ));
        }
        Ok(())
    }
}

/// Options of a [`NatsSubscriber`](super::NatsSubscriber).
///
/// ```
/// use std::time::Duration;
/// use streamwise::nats::NatsSubscriberOptions;
///
/// let options = NatsSubscriberOptions::default().ack_wait(Duration::from_secs(60));
/// assert!(options.validate().is_ok());
/// let err = NatsSubscriberOptions::default().lease_ttl(Duration::ZERO).validate().unwrap_err();
/// assert_eq!(err.invalid_field(), Some("lease_ttl"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NatsSubscriberOptions {
    /// The `ack_wait` of the durable consumers it creates: how long a delivery may go without
    /// a settlement or a heartbeat before the server hands it to another consumer of the
    /// group. Held deliveries are kept with `Progress` heartbeats every third of it, so it
    /// only matters when a consumer stops (a crash, a close with deliveries unsettled): then
    /// it is how soon others get them. Default 30 s; at least 100 ms. A consumer created
    /// earlier keeps its own.
    pub ack_wait: Duration,
    /// How long a consumer name stays taken after its holder stopped renewing it (a crash).
    /// Used when the lease bucket is created; a bucket made earlier keeps its own. Default
    /// 10 s; at least 1 s.
    pub lease_ttl: Duration,
    /// Entries larger than this (as [`RawEntry::size`](crate::codec::RawEntry::size) counts)
    /// are dead-lettered when read. Default 1 MiB.
    pub max_entry_size: usize,
}

impl Default for NatsSubscriberOptions {
    fn default() -> Self {
        NatsSubscriberOptions {
            ack_wait: Duration::from_secs(30),
            lease_ttl: Duration::from_secs(10),
            max_entry_size: DEFAULT_MAX_ENTRY_SIZE,
        }
    }
}

impl NatsSubscriberOptions {
    /// The `ack_wait` of the consumers it creates.
    #[must_use]
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// How long a consumer name stays taken after a crash.
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Entries larger than this are dead-lettered.
    #[must_use]
    pub fn max_entry_size(mut self, bytes: usize) -> Self {
        self.max_entry_size = bytes;
        self
    }

    /// Checks the options.
    pub fn validate(&self) -> Result<()> {
        positive("ack_wait", self.ack_wait)?;
        if self.ack_wait < Duration::from_millis(100) {
            return Err(Error::invalid(
                "ack_wait",
                format_args!("{:?} is shorter than 100 ms", self.ack_wait),
            ));
        }
        positive("lease_ttl", self.lease_ttl)?;
        if self.lease_ttl < Duration::from_secs(1) {
            return Err(Error::invalid(
                "lease_ttl",
                format_args!("{:?} is shorter than 1 s", self.lease_ttl),
            ));
        }
        if self.max_entry_size == 0 {
            return Err(Error::invalid("max_entry_size", "must be at least 1 byte"));
        }
        Ok(())
    }
}
