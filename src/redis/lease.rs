//! Consumer leases and heartbeats. A live consumer holds the key
//! `streamwise:lease:<stream>:<group>:<consumer>` with a TTL and renews it every third of the
//! TTL; a second live consumer of the same name is refused. On each renewal the entries it
//! has held for a while are touched (`XCLAIM ... JUSTID` to itself, only if it still owns them),
//! so that reclaim does not take them from a handler that is still working.

use std::sync::Weak;
use std::time::Duration;

use crate::signal::Signal;
use tokio::time::Instant;

use super::connection::RedisConnection;
use super::subscriber::SubscriptionState as Shared;
use super::{keys, scripts};
use crate::delivery::Origin;
use crate::error::{Error, Result};

/// What taking or extending a lease found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Held {
    /// Ours, extended.
    Extended,
    /// It was free (ours had run out, or it is new) and is ours now.
    Retaken,
    /// Another consumer holds it.
    Refused,
}

/// A held lease.
#[derive(Clone)]
pub(crate) struct Lease {
    conn: RedisConnection,
    key: String,
    registry: String,
    stream: String,
    consumer: String,
    token: String,
    ttl: Duration,
}

impl Lease {
    /// Takes the lease of `origin`'s consumer. When another holds it, waits (at most as long
    /// as that lease has left to live) to see whether its holder is alive: a holder that renews
    /// it is live, and the call fails with [`Error::ConsumerActive`]; a lease that runs out
    /// was left by a process that died (a restart under the same name after a crash), and is
    /// taken over.
    pub(crate) async fn acquire(conn: &RedisConnection, origin: &Origin, ttl: Duration) -> Result<Lease> {
        let (stream, group, consumer) = (origin.stream(), origin.group(), origin.consumer());
        let lease = Lease {
            conn: conn.clone(),
            key: keys::lease(stream, group, consumer),
            registry: keys::leased_consumers(stream, group),
            stream: stream.to_owned(),
            consumer: consumer.to_owned(),
            token: uuid::Uuid::now_v7().to_string(),
            ttl,
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
    pub(crate) async fn hold_state(&self, what: &str) -> Result<Held> {
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
        Ok(match held {
            1 => Held::Extended,
            2 => Held::Retaken,
            _ => Held::Refused,
        })
    }

    /// How long the lease lives without renewal.
    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The lease's key.
    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    /// The token that marks the lease as this subscription's.
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    async fn release(&self) {
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

/// Renews the lease and touches long-held and waiting entries for as long as the subscription
/// or any of its deliveries lives and the subscriber is open.
pub(crate) struct Heartbeat {
    pub(crate) lease: Lease,
    pub(crate) shared: Weak<Shared>,
    pub(crate) interval: Duration,
    /// Cancelled when another consumer turns out to hold the lease: the reader then stops.
    pub(crate) lease_lost: Signal,
}

impl Heartbeat {
    pub(crate) async fn run(self, closed: Signal, released: Signal) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut log = crate::redis::subscriber::RepeatedWarnings::default();
        let mut renewal_failed = false;
        loop {
            tokio::select! {
                biased;
                _ = closed.cancelled() => break,
                _ = released.cancelled() => break,
                _ = tick.tick() => {}
            }
            let renewed = self.lease.hold_state("lease renewal").await;
            if renewed.is_ok() && std::mem::take(&mut renewal_failed) {
                // The server was out of reach: others may have lost their leases meanwhile
                // while ours survived, so no one is taken for crashed for one TTL.
                if let Some(shared) = self.shared.upgrade() {
                    shared.hold_back_reclaim(self.lease.ttl());
                }
            }
            match renewed {
                Ok(Held::Extended) => {}
                Ok(Held::Retaken) => {
                    // Cut off (or paused) past the TTL: the others may have been too, so no
                    // one is taken for crashed until they had a TTL to renew.
                    tracing::warn!(lease = %self.lease.key, "the lease had run out; taken again, and reclaim waits one lease TTL");
                    if let Some(shared) = self.shared.upgrade() {
                        shared.hold_back_reclaim(self.lease.ttl());
                    }
                }
                Ok(Held::Refused) => {
                    tracing::error!(
                        lease = %self.lease.key,
                        "another consumer took this consumer's lease; this subscription stops"
                    );
                    self.lease_lost.cancel();
                    return;
                }
                Err(e) => {
                    renewal_failed = true;
                    log.warn(&self.lease.key, &format!("lease not renewed: {e}"));
                }
            }
            let Some(shared) = self.shared.upgrade() else {
                break;
            };
            if let Err(e) = touch_owned(&shared, self.interval).await {
                log.warn(
                    shared.origin.stream(),
                    &format!("heartbeat of held entries failed: {e}"),
                );
            }
        }
        self.lease.release().await;
    }
}

/// Resets the idle time of entries held longer than `older_than`, and of entries waiting to
/// be retried, if still ours.
async fn touch_owned(shared: &Shared, older_than: Duration) -> Result<()> {
    let now = Instant::now();
    let ids: Vec<String> = {
        let ledger = shared.ledger();
        let held = ledger
            .held
            .iter()
            .filter(|(_, at)| now.duration_since(**at) >= older_than)
            .map(|(id, _)| id);
        held.chain(ledger.retry_due.keys())
            .chain(ledger.dead_lettering.iter())
            .map(|id| id.to_string())
            .collect()
    };
    if ids.is_empty() {
        return Ok(());
    }
    let origin = &shared.origin;
    let _touched: i64 = shared
        .conn
        .run_mapped("held entries heartbeat", |mut c| {
            let mut call = scripts::TOUCH_OWN.key(origin.stream());
            call.arg(origin.group()).arg(origin.consumer());
            for id in &ids {
                call.arg(id);
            }
            async move { call.invoke_async(&mut c).await }
        })
        .await?;
    let mut ledger = shared.ledger();
    for at in ledger.held.values_mut() {
        if now.duration_since(*at) >= older_than {
            *at = now;
        }
    }
    Ok(())
}
