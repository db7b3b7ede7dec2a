//! The consumer lease: the key `streamwise:lease:{<stream>}:<group>:<consumer>`, held with a
//! TTL by the one live consumer of that name, so that a second one is refused and a consumer
//! that stopped renewing it can be told crashed. This module takes it ([`Lease::acquire`]),
//! extends it ([`Lease::hold_state`]) and releases it; renewing it on a timer is the
//! [`heartbeat`](super::heartbeat)'s job.

use std::time::Duration;

use crate::delivery::Origin;
use crate::error::{Error, Result};
use crate::redis::connection::RedisConnection;
use crate::redis::{keys, scripts};

/// What taking or extending a lease found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Held {
    /// Ours, extended.
    Extended,
    /// It was free (ours had run out, or it is new) and is ours now.
    Retaken,
    /// Another consumer holds it.
    Refused,
}

/// A held lease.
#[derive(Clone)]
pub(super) struct Lease {
    conn: RedisConnection,
    key: String,
    registry: String,
    stream: String,
    consumer: String,
    token: String,
    ttl: Duration,
    /// When the lease was last found ours (ms since `since`), shared by every clone.
    confirmed_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    since: tokio::time::Instant,
}

impl Lease {
    /// Takes the lease of `origin`'s consumer. When another holds it, waits (at most as long
    /// as that lease has left to live) to see whether its holder is alive: a holder that renews
    /// it is live, and the call fails with [`Error::ConsumerActive`]; a lease that runs out
    /// was left by a process that died (a restart under the same name after a crash), and is
    /// taken over.
    /// The lease's value is a token unique to this subscription: a UUIDv7, after `member/` when
    /// the subscription reads for a group member (a partition's owner).
    pub(super) async fn acquire(
        conn: &RedisConnection,
        origin: &Origin,
        ttl: Duration,
        member: Option<&str>,
    ) -> Result<Lease> {
        let (stream, group, consumer) = (origin.stream(), origin.group(), origin.consumer());
        let lease = Lease {
            conn: conn.clone(),
            key: keys::lease(stream, group, consumer),
            registry: keys::leased_consumers(stream, group),
            stream: stream.to_owned(),
            consumer: consumer.to_owned(),
            token: match member {
                Some(member) => format!("{member}/{}", uuid::Uuid::now_v7()),
                None => uuid::Uuid::now_v7().to_string(),
            },
            ttl,
            confirmed_ms: std::sync::Arc::default(),
            since: tokio::time::Instant::now(),
        };
        let active = || Error::ConsumerActive {
            stream: stream.to_owned(),
            group: group.to_owned(),
            consumer: consumer.to_owned(),
        };
        let mut seen: Option<(String, i64)> = None;
        loop {
            if lease.hold("lease acquire").await? {
                if seen.is_some() {
                    tracing::info!(lease = %lease.key, "took over a lease its holder stopped renewing");
                }
                return Ok(lease);
            }
            let (holder, left_ms) = lease.state().await?;
            if left_ms == -2 {
                // It ran out (or was released) between the two looks: take it now.
                continue;
            }
            match &seen {
                // Renewed since the last look (its time went up), or taken by another: live.
                Some((before, before_ms)) if *before != holder || left_ms > *before_ms => {
                    return Err(active());
                }
                // No expiry: not a lease of ours to wait out.
                _ if left_ms == -1 => return Err(active()),
                _ => {}
            }
            if seen.is_none() {
                tracing::info!(lease = %lease.key, left_ms, "consumer name held; waiting to see whether its holder is alive");
            }
            seen = Some((holder, left_ms));
            // A live holder renews every third of its TTL, so several looks fall between two
            // renewals; the wait ends at the latest when the lease runs out.
            let look = Duration::from_millis(u64::try_from(left_ms).unwrap_or(0) / 8)
                .clamp(Duration::from_millis(5), Duration::from_millis(250));
            tokio::time::sleep(look).await;
        }
    }

    /// The lease's holder token and milliseconds left (`-2` when free, `-1` without expiry).
    async fn state(&self) -> Result<(String, i64)> {
        self.conn
            .run_mapped("read lease", |mut c| {
                let call = scripts::LEASE_STATE.key(&self.key);
                async move { call.invoke_async(&mut c).await }
            })
            .await
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX)
    }

    /// Takes or extends the lease; `false` when another consumer holds it. Retrying is safe:
    /// our own token counts as ours. `what` names the script call in errors.
    async fn hold(&self, what: &str) -> Result<bool> {
        Ok(self.hold_state(what).await? != Held::Refused)
    }

    /// Takes or extends the lease, and tells which: [`Held::Retaken`] means it had run out
    /// (this consumer was cut off, or paused, for longer than the TTL).
    pub(super) async fn hold_state(&self, what: &str) -> Result<Held> {
        let held: i64 = self
            .conn
            .run_mapped(what, |mut c| {
                let mut call = scripts::HOLD_LEASE.key(&self.key);
                call.key(&self.registry)
                    .key(&self.stream)
                    .arg(&self.token)
                    .arg(self.ttl_ms())
                    .arg(&self.consumer);
                async move { call.invoke_async(&mut c).await }
            })
            .await?;
        let state = match held {
            1 => Held::Extended,
            2 => Held::Retaken,
            _ => Held::Refused,
        };
        if state != Held::Refused {
            let ms = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.confirmed_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(state)
    }

    /// Whether the lease was last found ours longer ago than the heartbeat should take
    /// (two thirds of the TTL): a paused or cut-off process, whose lease another may have
    /// taken meanwhile.
    pub(super) fn unconfirmed(&self) -> bool {
        let confirmed = Duration::from_millis(self.confirmed_ms.load(std::sync::atomic::Ordering::Relaxed));
        self.since.elapsed().saturating_sub(confirmed) > self.ttl * 2 / 3
    }

    /// How long the lease lives without renewal.
    pub(super) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The lease's key.
    pub(super) fn key(&self) -> &str {
        &self.key
    }

    /// The token that marks the lease as this subscription's.
    pub(super) fn token(&self) -> &str {
        &self.token
    }

    /// Gives the lease up (if still ours); a failure is logged, and the lease runs out by itself.
    pub(super) async fn release(&self) {
        let released = self
            .conn
            .run_mapped("lease release", |mut c| {
                let mut call = scripts::RELEASE_LEASE.key(&self.key);
                call.key(&self.registry).arg(&self.token).arg(&self.consumer);
                async move { call.invoke_async::<i64>(&mut c).await }
            })
            .await;
        if let Err(e) = released {
            tracing::warn!(lease = %self.key, error = %e, "lease not released; it expires by itself");
        }
    }
}
