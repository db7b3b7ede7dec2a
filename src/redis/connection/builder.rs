//! [`RedisConnectionBuilder`]: the settings of a [`RedisConnection`], their defaults and
//! their bounds, checked when it builds.

use std::fmt;
use std::time::Duration;

use super::redact::redact_url;
use super::tls::{self, TlsMaterial};
use super::{ClusterTarget, RedisConnection, Target, cluster};
use crate::error::{Error, Result};

/// The longest `retry_base_delay`, `retry_max_delay`, `response_timeout` and
/// `connect_timeout` that [`RedisConnectionBuilder::build`] accepts: one hour.
pub const MAX_CONNECTION_DURATION: Duration = Duration::from_secs(3600);

/// The retry policy and timeouts of a connection.
#[derive(Clone, Copy, Debug)]
pub(super) struct Settings {
    pub(super) max_retries: u32,
    pub(super) retry_base_delay: Duration,
    pub(super) retry_max_delay: Duration,
    pub(super) response_timeout: Duration,
    pub(super) connect_timeout: Duration,
}

impl Default for Settings {
    /// The seed's defaults: 5 retries, 100 ms doubling up to 30 s; 10 s for a reply, 5 s to
    /// connect.
    fn default() -> Self {
        Settings {
            max_retries: 5,
            retry_base_delay: Duration::from_millis(100),
            retry_max_delay: Duration::from_secs(30),
            response_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Builds a [`RedisConnection`]; see the defaults on each method.
#[derive(Clone)]
pub struct RedisConnectionBuilder {
    url: String,
    settings: Settings,
    tls: TlsMaterial,
}

impl fmt::Debug for RedisConnectionBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConnectionBuilder")
            .field("url", &redact_url(&self.url))
            .field("settings", &self.settings)
            .finish()
    }
}

impl RedisConnectionBuilder {
    /// A builder for `url` with the default settings and no certificates of its own.
    pub(super) fn new(url: &str) -> Self {
        RedisConnectionBuilder {
            url: url.to_owned(),
            settings: Settings::default(),
            tls: TlsMaterial::default(),
        }
    }

    /// How many times a failed command is retried before [`Error::Connection`]. Default 5;
    /// any count is accepted (the delays stay capped by `retry_max_delay`).
    #[must_use]
    pub fn max_retries(mut self, n: u32) -> Self {
        self.settings.max_retries = n;
        self
    }

    /// The first retry delay; it doubles on each retry. Default 100 ms, at most
    /// [`MAX_CONNECTION_DURATION`].
    #[must_use]
    pub fn retry_base_delay(mut self, delay: Duration) -> Self {
        self.settings.retry_base_delay = delay;
        self
    }

    /// The longest retry delay. Default 30 s, at most [`MAX_CONNECTION_DURATION`].
    #[must_use]
    pub fn retry_max_delay(mut self, delay: Duration) -> Self {
        self.settings.retry_max_delay = delay;
        self
    }

    /// How long a command (other than a blocking read) may wait for its reply. Default 10 s,
    /// at most [`MAX_CONNECTION_DURATION`].
    #[must_use]
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.settings.response_timeout = timeout;
        self
    }

    /// How long opening a connection may take. Default 5 s, at most
    /// [`MAX_CONNECTION_DURATION`].
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings.connect_timeout = timeout;
        self
    }

    /// Trusts this root certificate (PEM) for `rediss://` instead of the system's roots, for a
    /// server whose certificate comes from a private CA. [`build`](Self::build) refuses PEM
    /// that holds no certificate ([`Error::Invalid`], `tls_root_certificate`); a server
    /// certificate the CA did not sign fails at connect, without retries.
    ///
    /// ```no_run
    /// # fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use streamwise::redis::{RedisBackend, RedisConnection};
    /// let ca = std::fs::read("/etc/redis/ca.pem")?;
    /// let conn = RedisConnection::builder("rediss://:secret@redis.internal:6380")
    ///     .tls_root_certificate(ca)
    ///     .build()?;
    /// let redis = RedisBackend::with_connection(conn);
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "tls")]
    #[must_use]
    pub fn tls_root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.root = Some(pem.into());
        self
    }

    /// Presents this certificate chain and private key (both PEM) to a server that checks
    /// clients (mutual TLS, `tls-auth-clients yes`). [`build`](Self::build) refuses PEM without
    /// a certificate (`tls_client_certificate`) or without a private key (`tls_client_key`).
    /// The key is never printed, not even by `Debug`.
    #[cfg(feature = "tls")]
    #[must_use]
    pub fn tls_client_certificate(
        mut self,
        certificate_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls.client = Some((certificate_pem.into(), key_pem.into()));
        self
    }

    /// Checks the settings and the URL; does not connect yet. Every duration must be longer
    /// than zero and at most [`MAX_CONNECTION_DURATION`] ([`Error::Invalid`] names the option),
    /// so that no deadline computed from it can overflow later.
    pub fn build(self) -> Result<RedisConnection> {
        let s = self.settings;
        for (field, duration) in [
            ("retry_base_delay", s.retry_base_delay),
            ("retry_max_delay", s.retry_max_delay),
            ("response_timeout", s.response_timeout),
            ("connect_timeout", s.connect_timeout),
        ] {
            if duration.is_zero() || duration > MAX_CONNECTION_DURATION {
                return Err(Error::invalid(
                    field,
                    format_args!(
                        "{duration:?} must be longer than zero and at most {MAX_CONNECTION_DURATION:?}"
                    ),
                ));
            }
        }
        if s.retry_max_delay < s.retry_base_delay {
            return Err(Error::invalid(
                "retry_max_delay",
                format_args!(
                    "{:?} is shorter than retry_base_delay {:?}",
                    s.retry_max_delay, s.retry_base_delay
                ),
            ));
        }
        let redacted_url = redact_url(&self.url);
        if cfg!(not(feature = "tls")) && self.url.to_ascii_lowercase().starts_with("rediss://") {
            return Err(Error::invalid(
                "redis_url",
                format_args!("{redacted_url} needs TLS: enable streamwise's `tls` feature"),
            ));
        }
        if let Some(seeds) = cluster::seed_urls(&self.url, &redacted_url)? {
            let infos = cluster::seed_infos(&seeds, &redacted_url)?;
            let target = cluster_target(infos, &self.tls, s, &redacted_url)?;
            return Ok(RedisConnection::with_target(target, redacted_url, s, self.tls));
        }
        let info = redis::IntoConnectionInfo::into_connection_info(self.url.as_str()).map_err(|e| {
            // The client's message may quote the URL; say what is wrong without it.
            Error::invalid(
                "redis_url",
                format_args!("{redacted_url} is not a valid Redis URL ({:?})", e.kind()),
            )
        })?;
        let client = tls::open_client(info, self.tls.clone(), &redacted_url)?;
        Ok(RedisConnection::with_target(
            Target::Single(client),
            redacted_url,
            s,
            self.tls,
        ))
    }
}

/// How many times redis-rs' cluster connection retries a command by itself (a redirect counts).
const CLUSTER_CLIENT_RETRIES: u32 = 3;

/// The longest wait between redis-rs' own retries.
const CLUSTER_CLIENT_MAX_WAIT: Duration = Duration::from_millis(200);

/// The cluster client for the seed nodes `infos`, with the connection's timeouts and TLS
/// certificates. redis-rs' own retries (following `MOVED` and `ASK`, waiting out `TRYAGAIN`
/// and a failover) are kept few and short, so that the connection's retry policy
/// (`max_retries`, the backoff) is what bounds a command, as on one server.
fn cluster_target(
    infos: Vec<redis::ConnectionInfo>,
    material: &TlsMaterial,
    s: Settings,
    redacted_url: &str,
) -> Result<Target> {
    let seed = infos.first().cloned().expect("a cluster URL names a node");
    let mut builder = redis::cluster::ClusterClientBuilder::new(infos)
        .connection_timeout(s.connect_timeout)
        .response_timeout(s.response_timeout)
        .retries(CLUSTER_CLIENT_RETRIES)
        .min_retry_wait(10)
        .max_retry_wait(CLUSTER_CLIENT_MAX_WAIT.min(s.retry_max_delay).as_millis().max(10) as u64);
    builder = tls::cluster_certificates(builder, &seed, material)?;
    let client = builder.build().map_err(|e| {
        Error::invalid(
            "redis_url",
            format_args!("{redacted_url} cannot be used ({:?})", e.kind()),
        )
    })?;
    Ok(Target::Cluster(ClusterTarget {
        client,
        seed,
        owners: std::sync::Mutex::new(None),
        masters: std::sync::Mutex::new(std::collections::HashMap::new()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_urls_and_settings_name_the_field() {
        for url in ["", "http://host", "redis://host:notaport", "not a url"] {
            let err = RedisConnection::new(url).unwrap_err();
            assert_eq!(err.invalid_field(), Some("redis_url"), "{url:?}: {err}");
        }
        let err = RedisConnection::builder("redis://:hunter2@host:99999")
            .build()
            .unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let b = || RedisConnection::builder("redis://localhost");
        let cases = [
            (b().retry_base_delay(Duration::ZERO), "retry_base_delay"),
            (b().retry_max_delay(Duration::from_millis(1)), "retry_max_delay"),
            (b().response_timeout(Duration::ZERO), "response_timeout"),
            (b().connect_timeout(Duration::ZERO), "connect_timeout"),
        ];
        for (builder, field) in cases {
            assert_eq!(builder.build().unwrap_err().invalid_field(), Some(field));
        }
    }

    #[test]
    fn every_duration_option_is_bounded_at_build() {
        let b = || RedisConnection::builder("redis://localhost");
        let cases = [
            (b().retry_base_delay(Duration::MAX), "retry_base_delay"),
            (b().retry_max_delay(Duration::MAX), "retry_max_delay"),
            (b().response_timeout(Duration::MAX), "response_timeout"),
            (b().connect_timeout(Duration::MAX), "connect_timeout"),
            (
                b().retry_base_delay(MAX_CONNECTION_DURATION + Duration::from_nanos(1))
                    .retry_max_delay(Duration::MAX),
                "retry_base_delay",
            ),
        ];
        for (builder, field) in cases {
            let err = builder.build().unwrap_err();
            assert_eq!(err.invalid_field(), Some(field), "{err}");
        }
        // The limits themselves are accepted, and so is any retry count.
        b().retry_base_delay(MAX_CONNECTION_DURATION)
            .retry_max_delay(MAX_CONNECTION_DURATION)
            .response_timeout(MAX_CONNECTION_DURATION)
            .connect_timeout(MAX_CONNECTION_DURATION)
            .max_retries(u32::MAX)
            .build()
            .unwrap();
    }

    #[test]
    fn defaults_match_the_seed() {
        let conn = RedisConnection::new("redis://localhost:6379").unwrap();
        assert_eq!(conn.max_retries(), 5);
        assert_eq!(conn.retry_base_delay(), Duration::from_millis(100));
        assert_eq!(conn.retry_max_delay(), Duration::from_secs(30));
    }
}
