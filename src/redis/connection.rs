//! [`RedisConnection`]: the URL, the retry policy and the shared multiplexed connection that
//! publishers, subscribers and admin calls use. Commands retry with exponential backoff and
//! jitter, reconnect transparently, and fail with [`Error::Connection`] only after the retries
//! are spent. Credentials never appear in `Debug`, errors or logs.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ErrorKind, RedisError, RetryMethod};
use tokio::time::Instant;

use super::dedicated::{DedicatedConnection, TlsSetup};
use crate::error::{Error, Result};

/// The longest `retry_base_delay`, `retry_max_delay`, `response_timeout` and
/// `connect_timeout` that [`RedisConnectionBuilder::build`] accepts: one hour.
pub const MAX_CONNECTION_DURATION: Duration = Duration::from_secs(3600);

/// A Redis server to talk to, with the retry policy for every command sent to it.
///
/// Cheap to clone; clones share one multiplexed connection, opened on first use.
///
/// ```
/// use std::time::Duration;
/// use streamwise::redis::RedisConnection;
///
/// let conn = RedisConnection::builder("redis://:secret@localhost:6379")
///     .max_retries(5)
///     .retry_base_delay(Duration::from_millis(100))
///     .retry_max_delay(Duration::from_secs(30))
///     .build()?;
/// assert_eq!(conn.url(), "redis://:***@localhost:6379");
/// assert!(!format!("{conn:?}").contains("secret"));
/// # Ok::<(), streamwise::Error>(())
/// ```
#[derive(Clone)]
pub struct RedisConnection {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    redacted_url: String,
    settings: Settings,
    shared: SharedConnection,
    /// Set once a command got its reply: the credentials worked then, so from then on a
    /// refused login is taken for credentials being rotated, and retried, rather than for a
    /// misconfiguration. (A connection that opened proves nothing: without a password none
    /// is asked for, and the first command is refused.)
    authenticated_once: AtomicBool,
    /// When a refused login on reconnect was last logged as a warning (they are rate-limited).
    auth_warned_at: Mutex<Option<Instant>>,
    /// The certificates given to the builder, for the dedicated connections' TLS.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    tls: TlsMaterial,
    /// The TLS client configuration of the dedicated connections, built on first use.
    #[cfg(feature = "tls")]
    tls_config: std::sync::OnceLock<std::result::Result<TlsSetup, String>>,
}

/// The shared multiplexed connection, opened on first use and again after it broke.
///
/// Not redis-rs's `ConnectionManager`: it reconnects in the background right when a
/// connection breaks and hands that attempt's outcome to the next command. Retried after a
/// backoff, a command then got the refusal of an attempt made before the backoff, so the
/// last retry never saw a server that came back during it; and a refused login was never
/// attempted again. Here each retry connects anew when there is no connection.
#[derive(Default)]
struct SharedConnection {
    /// The connection in use, with its generation, so that a failure seen on an old
    /// connection does not drop a newer one.
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    /// Held while connecting, so that one attempt runs at a time; holds that attempt's
    /// failure for the commands that waited for it.
    connecting: tokio::sync::Mutex<Option<RedisError>>,
    /// Connection attempts finished so far (also the generation of the newest connection).
    attempts: AtomicU64,
}

#[derive(Clone, Copy, Debug)]
struct Settings {
    max_retries: u32,
    retry_base_delay: Duration,
    retry_max_delay: Duration,
    response_timeout: Duration,
    connect_timeout: Duration,
}

/// Builds a [`RedisConnection`]; see the defaults on each method.
#[derive(Clone)]
pub struct RedisConnectionBuilder {
    url: String,
    settings: Settings,
    tls: TlsMaterial,
}

/// Certificates for `rediss://`, beyond the system's roots (empty without the `tls` feature).
#[derive(Clone, Default)]
struct TlsMaterial {
    /// The CA to trust instead of the system's roots (PEM).
    #[cfg(feature = "tls")]
    root: Option<Vec<u8>>,
    /// The client's certificate chain and private key (PEM), for servers that ask for one.
    #[cfg(feature = "tls")]
    client: Option<(Vec<u8>, Vec<u8>)>,
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
        let info = redis::IntoConnectionInfo::into_connection_info(self.url.as_str()).map_err(|e| {
            // The client's message may quote the URL; say what is wrong without it.
            Error::invalid(
                "redis_url",
                format_args!("{redacted_url} is not a valid Redis URL ({:?})", e.kind()),
            )
        })?;
        let client = open_client(info, self.tls.clone(), &redacted_url)?;
        Ok(RedisConnection {
            inner: Arc::new(Inner {
                client,
                redacted_url,
                settings: s,
                shared: SharedConnection::default(),
                authenticated_once: AtomicBool::new(false),
                auth_warned_at: Mutex::new(None),
                tls: self.tls,
                #[cfg(feature = "tls")]
                tls_config: std::sync::OnceLock::new(),
            }),
        })
    }
}

/// A client for `info`, with the TLS material given to the builder.
fn open_client(info: redis::ConnectionInfo, tls: TlsMaterial, redacted_url: &str) -> Result<redis::Client> {
    #[cfg(feature = "tls")]
    {
        if matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) {
            // rustls needs a process-wide crypto provider. Install ring unless the application
            // already chose one (then `install_default` fails, and its choice stands).
            let _ = rustls::crypto::ring::default_provider().install_default();
        } else if tls.root.is_some() || tls.client.is_some() {
            return Err(Error::invalid(
                "redis_url",
                "TLS certificates were given, but the URL is not rediss://",
            ));
        }
        if tls.root.is_some() || tls.client.is_some() {
            if let Some(pem) = &tls.root {
                check_pem_certificates("tls_root_certificate", pem)?;
            }
            if let Some((certificate, key)) = &tls.client {
                check_pem_certificates("tls_client_certificate", certificate)?;
                check_pem_key(key)?;
            }
            let certificates = redis::TlsCertificates {
                client_tls: tls
                    .client
                    .map(|(client_cert, client_key)| redis::ClientTlsConfig {
                        client_cert,
                        client_key,
                    }),
                root_cert: tls.root,
            };
            return redis::Client::build_with_tls(info, certificates).map_err(|e| {
                Error::invalid(
                    "tls_client_certificate",
                    format_args!("the TLS certificates cannot be used ({e})"),
                )
            });
        }
    }
    let _ = tls;
    redis::Client::open(info).map_err(|e| {
        Error::invalid(
            "redis_url",
            format_args!("{redacted_url} cannot be used ({:?})", e.kind()),
        )
    })
}

/// The rustls configuration of the dedicated connections: the given root certificate, else
/// the system's roots (as redis-rs does), and the client certificate when one was given. The
/// crypto provider is the application's process default, else ring.
#[cfg(feature = "tls")]
fn tls_client_config(tls: &TlsMaterial) -> std::result::Result<TlsSetup, String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let mut roots = rustls::RootCertStore::empty();
    match &tls.root {
        Some(pem) => {
            for certificate in CertificateDer::pem_slice_iter(pem) {
                let certificate = certificate.map_err(|e| format!("root certificate: {e}"))?;
                roots
                    .add(certificate)
                    .map_err(|e| format!("root certificate: {e}"))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found.errors.first().map(|e| e.to_string()).unwrap_or_default();
                return Err(format!("no root certificates found on this system {why}"));
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match &tls.client {
        Some((certificate, key)) => {
            let chain = CertificateDer::pem_slice_iter(certificate)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| format!("client certificate: {e}"))?;
            // The PEM error could quote key material: say only what is wrong.
            let key = PrivateKeyDer::from_pem_slice(key).map_err(|_| "client key is not PEM".to_owned())?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Refuses a root certificate that holds no PEM certificate, or a broken one: the client would
/// otherwise trust nothing and fail only when it connects.
#[cfg(feature = "tls")]
fn check_pem_certificates(field: &'static str, pem: &[u8]) -> Result<()> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut count = 0;
    for certificate in CertificateDer::pem_slice_iter(pem) {
        certificate.map_err(|e| Error::invalid(field, format_args!("is not valid PEM ({e})")))?;
        count += 1;
    }
    if count == 0 {
        return Err(Error::invalid(
            field,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(())
}

/// Refuses a client key that holds no private key. The PEM error names no key material.
#[cfg(feature = "tls")]
fn check_pem_key(pem: &[u8]) -> Result<()> {
    use rustls::pki_types::{PrivateKeyDer, pem::PemObject};
    PrivateKeyDer::from_pem_slice(pem).map(drop).map_err(|_| {
        Error::invalid(
            "tls_client_key",
            "holds no PEM private key (-----BEGIN ... PRIVATE KEY-----)",
        )
    })
}

impl RedisConnection {
    /// A connection to `url` with the default retry policy (5 retries, 100 ms doubling up to
    /// 30 s). Fails with [`Error::Invalid`] (`redis_url`) for a malformed URL.
    pub fn new(url: &str) -> Result<Self> {
        Self::builder(url).build()
    }

    /// A builder for a connection to `url`.
    pub fn builder(url: &str) -> RedisConnectionBuilder {
        RedisConnectionBuilder {
            url: url.to_owned(),
            tls: TlsMaterial::default(),
            settings: Settings {
                max_retries: 5,
                retry_base_delay: Duration::from_millis(100),
                retry_max_delay: Duration::from_secs(30),
                response_timeout: Duration::from_secs(10),
                connect_timeout: Duration::from_secs(5),
            },
        }
    }

    /// The URL with any password replaced by `***`.
    pub fn url(&self) -> &str {
        &self.inner.redacted_url
    }

    /// Retries before a command fails.
    pub fn max_retries(&self) -> u32 {
        self.inner.settings.max_retries
    }

    /// The first retry delay.
    pub fn retry_base_delay(&self) -> Duration {
        self.inner.settings.retry_base_delay
    }

    /// The longest retry delay.
    pub fn retry_max_delay(&self) -> Duration {
        self.inner.settings.retry_max_delay
    }

    /// The shared multiplexed connection with its generation; opens it when there is none.
    /// A command that waited while another attempt failed gets that attempt's error (it was
    /// made after the command asked) instead of trying again at once.
    async fn shared(&self) -> std::result::Result<(u64, MultiplexedConnection), RedisError> {
        let shared = &self.inner.shared;
        if let Some(current) = lock(&shared.current).clone() {
            return Ok(current);
        }
        let attempts_seen = shared.attempts.load(Ordering::Acquire);
        let mut last_failure = shared.connecting.lock().await;
        if let Some(current) = lock(&shared.current).clone() {
            return Ok(current);
        }
        if shared.attempts.load(Ordering::Acquire) != attempts_seen
            && let Some(e) = last_failure.as_ref()
        {
            return Err(e.clone());
        }
        let s = self.inner.settings;
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(s.response_timeout))
            .set_connection_timeout(Some(s.connect_timeout));
        let connected = self
            .inner
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await;
        let generation = shared.attempts.fetch_add(1, Ordering::AcqRel) + 1;
        match connected {
            Ok(conn) => {
                *last_failure = None;
                self.connected();
                *lock(&shared.current) = Some((generation, conn.clone()));
                Ok((generation, conn))
            }
            Err(e) => {
                *last_failure = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Drops the shared connection of `generation` after it failed for good (the next command
    /// opens a new one); a newer connection stays.
    fn forget_shared(&self, generation: u64) {
        let mut current = lock(&self.inner.shared.current);
        if current.as_ref().is_some_and(|(g, _)| *g == generation) {
            *current = None;
        }
    }

    /// Notes a connection that opened: logs the end of refused logins that were reported.
    fn connected(&self) {
        if lock(&self.inner.auth_warned_at).take().is_some() {
            tracing::info!(url = %self.url(), "logged in again after refused logins");
        }
    }

    /// Whether a failed attempt may be retried: connection trouble, or a refused login by a
    /// client that has logged in before (its credentials are being rotated, or its user
    /// re-created). A client whose first login is refused fails at once: it is misconfigured.
    fn retryable(&self, e: &RedisError) -> bool {
        is_transient(e) || (is_auth_failure(e) && self.inner.authenticated_once.load(Ordering::Acquire))
    }

    /// Logs a failed attempt before its retry. Refused logins are warnings, at most one per
    /// [`AUTH_WARNING_EVERY`], since every command and task of the client meets them while
    /// the credentials are wrong.
    fn log_retry(&self, what: &str, attempt: u32, delay: Duration, e: &RedisError) {
        if is_auth_failure(e) {
            let now = Instant::now();
            let mut warned_at = lock(&self.inner.auth_warned_at);
            if warned_at.is_none_or(|at| now.duration_since(at) >= AUTH_WARNING_EVERY) {
                *warned_at = Some(now);
                tracing::warn!(what, url = %self.url(),
                    "authentication refused on reconnect; retrying with backoff until the credentials work again");
                return;
            }
        }
        tracing::debug!(what, attempt, ?delay, error = %e, url = %self.url(), "redis command failed; retrying");
    }

    /// Runs `op` on the shared connection, retrying connection failures with backoff.
    /// Server errors that retrying cannot fix are returned at once, as `RedisError`, for the
    /// caller to map (`NOGROUP` and the like); retries spent become [`Error::Connection`].
    pub(crate) async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> std::result::Result<T, CommandError>
    where
        F: FnMut(MultiplexedConnection) -> Fut,
        Fut: Future<Output = std::result::Result<T, RedisError>>,
    {
        let mut attempt = 0;
        loop {
            let result = match self.shared().await {
                Ok((generation, conn)) => {
                    let result = op(conn).await;
                    if let Err(e) = &result
                        && e.is_unrecoverable_error()
                    {
                        self.forget_shared(generation);
                    }
                    result
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(v) => {
                    if !self.inner.authenticated_once.load(Ordering::Relaxed) {
                        self.inner.authenticated_once.store(true, Ordering::Release);
                    }
                    return Ok(v);
                }
                Err(e) if self.retryable(&e) && attempt < self.inner.settings.max_retries => {
                    let delay = self.backoff(attempt);
                    self.log_retry(what, attempt, delay, &e);
                    attempt += 1;
                    tokio::time::sleep(delay).await;
                }
                Err(e) if is_server_refusal(&e) => return Err(CommandError::refused(what, e)),
                Err(e) => return Err(CommandError::Failed(self.connection_error(what, e, attempt))),
            }
        }
    }

    /// Runs one command on the shared connection with the retry policy, for extensions (for
    /// example a deduplication store) that need Redis commands of their own. Server errors
    /// are [`Error::Backend`].
    ///
    /// ```no_run
    /// # async fn demo(conn: streamwise::redis::RedisConnection) -> streamwise::Result<()> {
    /// use streamwise::redis::client::cmd;
    /// let fresh: Option<String> = conn
    ///     .command(cmd("SET").arg("seen:42").arg(1).arg("NX").arg("PX").arg(60_000))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn command<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T> {
        self.run_mapped("command", |mut c| {
            let cmd = cmd.clone();
            async move { cmd.query_async(&mut c).await }
        })
        .await
    }

    /// Like [`run`](Self::run), mapping every server error to [`Error::Backend`].
    pub(crate) async fn run_mapped<T, F, Fut>(&self, what: &str, op: F) -> Result<T>
    where
        F: FnMut(MultiplexedConnection) -> Fut,
        Fut: Future<Output = std::result::Result<T, RedisError>>,
    {
        self.run(what, op).await.map_err(CommandError::into_error)
    }

    /// Opens a connection of its own (for blocking reads, which would stall a shared one, and
    /// for reads sent ahead), retrying connection failures with backoff. `response_timeout`
    /// must exceed the longest `BLOCK` sent on it.
    pub(crate) async fn dedicated(&self, response_timeout: Duration) -> Result<DedicatedConnection> {
        let info = self.inner.client.get_connection_info();
        let mut attempt = 0;
        loop {
            let connected = match self.tls_setup() {
                Ok(tls) => {
                    DedicatedConnection::connect(
                        info,
                        tls,
                        self.inner.settings.connect_timeout,
                        response_timeout,
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            match connected {
                Ok(conn) => {
                    self.connected();
                    return Ok(conn);
                }
                Err(e) if self.retryable(&e) && attempt < self.inner.settings.max_retries => {
                    let delay = self.backoff(attempt);
                    self.log_retry("connect", attempt, delay, &e);
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(self.connection_error("connect", e, attempt)),
            }
        }
    }

    /// Opens a connection of its own once, without retries (for a caller that falls back to
    /// the shared connection when it fails), with the configured response timeout.
    pub(crate) async fn dedicated_once(&self) -> std::result::Result<DedicatedConnection, RedisError> {
        let s = self.inner.settings;
        let tls = self.tls_setup()?;
        let info = self.inner.client.get_connection_info();
        let conn = DedicatedConnection::connect(info, tls, s.connect_timeout, s.response_timeout).await?;
        self.connected();
        Ok(conn)
    }

    /// The TLS client configuration for a `rediss://` URL (`None` for other URLs).
    #[cfg(feature = "tls")]
    fn tls_setup(&self) -> std::result::Result<Option<TlsSetup>, RedisError> {
        let info = self.inner.client.get_connection_info();
        if !matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) {
            return Ok(None);
        }
        match self
            .inner
            .tls_config
            .get_or_init(|| tls_client_config(&self.inner.tls))
        {
            Ok(config) => Ok(Some(config.clone())),
            Err(reason) => Err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "TLS configuration",
                reason.clone(),
            ))),
        }
    }

    #[cfg(not(feature = "tls"))]
    fn tls_setup(&self) -> std::result::Result<Option<TlsSetup>, RedisError> {
        Ok(None)
    }

    /// The delay before retry number `attempt` (0-based): the base doubled per attempt, capped,
    /// with "equal jitter" (half fixed, half random) so that clients do not retry in step.
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let s = self.inner.settings;
        let exp = s
            .retry_base_delay
            .saturating_mul(2u32.saturating_pow(attempt.min(31)));
        let capped = exp.min(s.retry_max_delay);
        let half = capped / 2;
        half + half.mul_f64(fastrand::f64())
    }

    pub(crate) fn connection_error(&self, what: &str, e: RedisError, retries: u32) -> Error {
        let message = if is_auth_failure(&e) {
            format!("authentication to {} failed during {what}", self.url())
        } else if let Some(reason) = tls_refusal(&e) {
            format!("TLS handshake with {} failed during {what}: {reason}", self.url())
        } else {
            // Connection errors (refused, reset, timed out) hold no credentials.
            format!("{what} on {} failed after {retries} retries: {e}", self.url())
        };
        Error::connection(message, Some(Box::new(e)))
    }
}

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConnection")
            .field("url", &self.inner.redacted_url)
            .field("settings", &self.inner.settings)
            .finish()
    }
}

/// A command that failed: either for good on the connection (retries spent, authentication)
/// or with a server error the caller may want to map.
#[derive(Debug)]
pub(crate) enum CommandError {
    Failed(Error),
    Server(Refused),
}

impl CommandError {
    pub(crate) fn refused(what: &str, error: RedisError) -> Self {
        CommandError::Server(Refused {
            what: what.to_owned(),
            error,
        })
    }

    /// [`Error::Backend`] for a server error, naming the command or script.
    pub(crate) fn into_error(self) -> Error {
        match self {
            CommandError::Failed(e) => e,
            CommandError::Server(refused) => Error::Backend(Box::new(refused)),
        }
    }

    /// The server error code (`NOGROUP`, `BUSYGROUP`, ...), if this is a server error.
    pub(crate) fn code(&self) -> Option<&str> {
        match self {
            CommandError::Server(refused) => refused.error.code(),
            CommandError::Failed(_) => None,
        }
    }
}

/// A server error with what it refused: a script's error names only its SHA, so the
/// message starts with what the command or script was for (`lease acquire: OOM ...`).
#[derive(Debug)]
pub(crate) struct Refused {
    what: String,
    error: RedisError,
}

impl Refused {
    /// `error`, named by `what`, for errors that do not come through [`RedisConnection::run`].
    pub(crate) fn boxed(what: &str, error: RedisError) -> Box<Self> {
        Box::new(Refused {
            what: what.to_owned(),
            error,
        })
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.error)
    }
}

impl std::error::Error for Refused {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// How often at most a refused login on reconnect is logged as a warning.
const AUTH_WARNING_EVERY: Duration = Duration::from_secs(10);

/// The guard of `mutex`; a panic elsewhere cannot leave these values half-written.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Errors that a new attempt, maybe on a new connection, can cure.
pub(crate) fn is_transient(e: &RedisError) -> bool {
    if is_auth_failure(e) || e.code() == Some("NOPERM") || tls_refusal(e).is_some() {
        return false;
    }
    e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.retry_method(),
            RetryMethod::Reconnect | RetryMethod::RetryImmediately | RetryMethod::WaitAndRetry
        )
}

/// A server error, which a new connection would meet again: neither connection trouble nor a
/// refused login or TLS handshake.
pub(crate) fn is_server_refusal(e: &RedisError) -> bool {
    !is_transient(e) && !is_auth_failure(e) && tls_refusal(e).is_none()
}

/// The TLS error, when the handshake failed for a reason a retry cannot cure (an untrusted or
/// mismatched certificate, no common protocol version): the client must be configured anew.
#[cfg(feature = "tls")]
fn tls_refusal(e: &RedisError) -> Option<String> {
    use std::error::Error as _;
    use std::sync::Arc;
    // redis-rs keeps the cause as `Arc<dyn Error>`, and the I/O error wraps the rustls error
    // without exposing it as a source, so both layers are unwrapped by hand.
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(err) = cause {
        let inner: &(dyn std::error::Error + 'static) =
            match err.downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>() {
                Some(arc) => arc.as_ref(),
                None => err,
            };
        let tls = match inner.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()),
            None => inner.downcast_ref::<rustls::Error>(),
        };
        if let Some(tls) = tls.filter(|tls| is_configuration_refusal(tls)) {
            return Some(tls.to_string());
        }
        cause = inner.source();
    }
    None
}

/// TLS errors that come from how the client or server is set up (certificates, protocol
/// versions), as opposed to a connection damaged in transit, which a reconnect cures.
#[cfg(feature = "tls")]
fn is_configuration_refusal(e: &rustls::Error) -> bool {
    use rustls::AlertDescription as Alert;
    match e {
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::PeerIncompatible(_)
        | rustls::Error::UnsupportedNameType => true,
        rustls::Error::AlertReceived(alert) => matches!(
            alert,
            Alert::HandshakeFailure
                | Alert::NoCertificate
                | Alert::BadCertificate
                | Alert::UnsupportedCertificate
                | Alert::CertificateRevoked
                | Alert::CertificateExpired
                | Alert::CertificateUnknown
                | Alert::UnknownCA
                | Alert::AccessDenied
                | Alert::ProtocolVersion
                | Alert::InsufficientSecurity
                | Alert::CertificateRequired
        ),
        _ => false,
    }
}

#[cfg(not(feature = "tls"))]
fn tls_refusal(_: &RedisError) -> Option<String> {
    None
}

/// Wrong or missing credentials: retrying cannot help, and the error says so. (`NOPERM`, an
/// ACL refusing a command or key, is a server error of its own, not a failed login.)
fn is_auth_failure(e: &RedisError) -> bool {
    e.kind() == ErrorKind::AuthenticationFailed || matches!(e.code(), Some("WRONGPASS" | "NOAUTH"))
}

/// `text` with its `%XX` escapes decoded (invalid ones kept as they are).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `url` with the password (and any `pass`/`password` query value) replaced by `***`.
///
/// Whatever the URL's shape, also one a parser refuses: a password with an unencoded `/`,
/// `?`, `#` or `@` is hidden whole, since everything before the last `@` counts as user
/// information (a URL with an `@` elsewhere is hidden more than needed, never less).
///
/// ```
/// use streamwise::redis::redact_url;
/// assert_eq!(redact_url("redis://user:pw@host:6379/0"), "redis://user:***@host:6379/0");
/// assert_eq!(redact_url("rediss://:pw@host"), "rediss://:***@host");
/// assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
/// assert_eq!(redact_url("redis+unix:///tmp/r.sock?db=1&pass=pw"), "redis+unix:///tmp/r.sock?db=1&pass=***");
/// assert_eq!(redact_url("redis://user:p/w#x?y@host/0"), "redis://user:***@host/0");
/// assert_eq!(redact_url("redis+unix:///s?p%61ss=pw"), "redis+unix:///s?p%61ss=***");
/// ```
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    // Byte ranges of `rest` to hide; both rules may apply, and both are kept.
    let mut hidden: Vec<std::ops::Range<usize>> = Vec::new();
    if let Some(at) = rest.rfind('@') {
        let info = &rest[..at];
        match info.find(':') {
            // The user name is shown only when it cannot be part of something else.
            Some(colon) if !info[..colon].contains(['/', '?', '#']) => hidden.push(colon + 1..at),
            Some(_) => hidden.push(0..at),
            None if info.contains(['/', '?', '#', '&', '=']) => hidden.push(0..at),
            None => {}
        }
    }
    // A password in the query may hold any character: from its value on, nothing is shown.
    // Keys are compared decoded (`p%61ss` is `pass` to the URL parser too).
    let value_at = rest
        .match_indices(['?', '&'])
        .filter_map(|(at, _)| {
            let key_start = at + 1;
            let key_end = key_start + rest[key_start..].find('=')?;
            let key = percent_decoded(&rest[key_start..key_end]).to_ascii_lowercase();
            (key == "pass" || key == "password").then_some(key_end + 1)
        })
        .min();
    if let Some(value_at) = value_at {
        hidden.push(value_at..rest.len());
    }
    let mut shown = String::with_capacity(url.len());
    if let Some(scheme) = scheme {
        shown.push_str(scheme);
        shown.push_str("://");
    }
    let mut in_hidden = false;
    for (i, c) in rest.char_indices() {
        if hidden.iter().any(|r| r.contains(&i)) {
            if !in_hidden {
                shown.push_str("***");
                in_hidden = true;
            }
        } else {
            in_hidden = false;
            shown.push(c);
        }
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "tls")]
    #[test]
    fn only_tls_setup_errors_are_refusals_and_transit_damage_is_retried() {
        let wrapped =
            |e: rustls::Error| RedisError::from(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
        let untrusted = wrapped(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        assert!(tls_refusal(&untrusted).unwrap().contains("UnknownIssuer"));
        assert!(!is_transient(&untrusted));
        let alert = wrapped(rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA));
        assert!(tls_refusal(&alert).is_some());
        for damage in [
            rustls::Error::DecryptError,
            rustls::Error::AlertReceived(rustls::AlertDescription::InternalError),
            rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac),
        ] {
            assert_eq!(tls_refusal(&wrapped(damage)), None);
        }
        let reset = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(tls_refusal(&reset), None);
    }

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

    #[test]
    fn backoff_doubles_with_jitter_and_stays_capped() {
        let conn = RedisConnection::builder("redis://localhost")
            .retry_base_delay(Duration::from_millis(100))
            .retry_max_delay(Duration::from_secs(1))
            .build()
            .unwrap();
        for attempt in 0..40 {
            let full = Duration::from_millis(100)
                .saturating_mul(2u32.saturating_pow(attempt.min(31)))
                .min(Duration::from_secs(1));
            let d = conn.backoff(attempt);
            assert!(
                d >= full / 2 && d <= full,
                "attempt {attempt}: {d:?} not in [{:?}, {full:?}]",
                full / 2
            );
        }
    }

    #[test]
    fn passwords_never_show() {
        let conn = RedisConnection::new("redis://admin:s3cr3t@localhost:6379/2").unwrap();
        assert_eq!(conn.url(), "redis://admin:***@localhost:6379/2");
        assert!(!format!("{conn:?}").contains("s3cr3t"));
        let builder = RedisConnection::builder("redis://admin:s3cr3t@localhost");
        assert!(!format!("{builder:?}").contains("s3cr3t"));
    }
}
