//! The heartbeat task of a subscription: every third of the lease TTL it renews the
//! consumer's [`Lease`] and touches the entries the subscription owns (held a while, waiting
//! to retry, waiting for a dead-letter write: `XCLAIM ... JUSTID` to itself, only if still
//! its own), so that reclaim does not take them from a handler that is still working. It
//! holds reclaim back after an outage, tells the reader when another consumer took the lease,
//! and releases the lease when the subscription is gone or the subscriber closes.

use std::sync::Weak;
use std::time::Duration;

use tokio::time::Instant;

use super::lease::{Held, Lease};
use super::shared::Shared;
use super::warnings::RepeatedWarnings;
use crate::error::Result;
use crate::redis::scripts;
use crate::signal::Signal;

/// Renews the lease and touches long-held and waiting entries for as long as the subscription
/// or any of its deliveries lives and the subscriber is open.
pub(super) struct Heartbeat {
    lease: Lease,
    shared: Weak<Shared>,
    interval: Duration,
    /// Cancelled when another consumer turns out to hold the lease: the reader then stops.
    lease_lost: Signal,
    health: std::sync::Arc<super::health::ReadHealth>,
}

impl Heartbeat {
    /// The heartbeat of `lease` for the subscription whose state is `shared`: it beats every
    /// third of the lease TTL and cancels `lease_lost` when another consumer took the lease.
    pub(super) fn new(
        lease: Lease,
        shared: Weak<Shared>,
        lease_lost: Signal,
        health: std::sync::Arc<super::health::ReadHealth>,
    ) -> Self {
        Heartbeat {
            interval: lease.ttl() / 3,
            lease,
            shared,
            lease_lost,
            health,
        }
    }

    /// Beats until `closed` (the subscriber) or `released` (the last user of the
    /// subscription's state is gone), or until the lease turns out lost; then, once the
    /// flusher wrote what it had (`flushed`), releases it.
    pub(super) async fn run(self, closed: Signal, released: Signal, flushed: Signal) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut log = RepeatedWarnings::default();
        let mut renewal_failed = false;
        loop {
            tokio::select! {
                biased;
                _ = closed.cancelled() => break,
                _ = released.cancelled() => break,
                _ = tick.tick() => {}
            }
            let renewed = self.lease.hold_state("lease renewal").await;
            self.health.lease_renewed(renewed.is_ok());
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
                    tracing::warn!(lease = %self.lease.key(), "the lease had run out; taken again, and reclaim waits one lease TTL");
                    if let Some(shared) = self.shared.upgrade() {
                        shared.hold_back_reclaim(self.lease.ttl());
                    }
                }
                Ok(Held::Refused) => {
                    tracing::error!(
                        lease = %self.lease.key(),
                        "another consumer took this consumer's lease; this subscription stops"
                    );
                    self.lease_lost.cancel();
                    return;
                }
                Err(e) => {
                    renewal_failed = true;
                    log.warn(self.lease.key(), &format!("lease not renewed: {e}"));
                }
            }
            let Some(shared) = self.shared.upgrade() else {
                break;
            };
            // Half an interval: a beat that comes a little early still touches what the last one did.
            if let Err(e) = touch_owned(&shared, self.interval / 2).await {
                log.warn(
                    shared.origin().stream(),
                    &format!("heartbeat of held entries failed: {e}"),
                );
            }
        }
        // Held (renewed) until the flusher wrote the last settlements: a final flush that
        // retries past the lease's time would otherwise find it run out, or another's.
        let mut tick = tokio::time::interval(self.interval);
        tick.tick().await;
        loop {
            tokio::select! {
                biased;
                _ = flushed.cancelled() => break,
                _ = tick.tick() => {
                    if let Ok(Held::Refused) = self.lease.hold_state("lease renewal").await {
                        return;
                    }
                }
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
    let origin = shared.origin();
    let _touched: i64 = shared
        .conn()
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
