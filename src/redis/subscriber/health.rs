//! [`ReadHealth`]: what the reader and the heartbeat of one subscription tell about it, and
//! the [`HealthProbe`] that turns it into the subscription's health.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::pubsub::{HealthProbe, SubscriptionHealth};

/// The health signals of one subscription.
#[derive(Debug)]
pub(super) struct ReadHealth {
    epoch: Instant,
    /// When the step in flight started (ms since `epoch`, plus one); 0 when none is.
    step_started: AtomicU64,
    /// Steps that failed in a row (the reader reconnects and retries meanwhile).
    failures: AtomicU32,
    /// The last lease renewal failed.
    lease_failing: AtomicBool,
    /// The longest a step may take, in ms: its `BLOCK` and the reply margin (set by the
    /// reader).
    longest_step_ms: AtomicU64,
}

impl Default for ReadHealth {
    fn default() -> Self {
        ReadHealth {
            epoch: Instant::now(),
            step_started: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            lease_failing: AtomicBool::new(false),
            longest_step_ms: AtomicU64::new(u64::MAX),
        }
    }
}

impl ReadHealth {
    /// The subscription's reads block at most `block`, and are answered within `margin` more.
    pub(super) fn set_longest_step(&self, block: Duration, margin: Duration) {
        let ms = u64::try_from((block + margin).as_millis()).unwrap_or(u64::MAX);
        self.longest_step_ms.store(ms, Ordering::Relaxed);
    }

    fn ms_since_epoch(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A step (a read or a claim) was sent.
    pub(super) fn step_started(&self) {
        self.step_started
            .store(self.ms_since_epoch() + 1, Ordering::Relaxed);
    }

    /// The step ended: answered (`ok`), or failed.
    pub(super) fn step_ended(&self, ok: bool) {
        self.step_started.store(0, Ordering::Relaxed);
        if ok {
            self.failures.store(0, Ordering::Relaxed);
        } else {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A lease renewal succeeded (`true`) or failed.
    pub(super) fn lease_renewed(&self, ok: bool) {
        self.lease_failing.store(!ok, Ordering::Relaxed);
    }
}

impl HealthProbe for ReadHealth {
    fn health(&self) -> SubscriptionHealth {
        let degraded = |reason: String| SubscriptionHealth::Degraded { reason };
        if self.lease_failing.load(Ordering::Relaxed) {
            return degraded("the consumer's lease could not be renewed".into());
        }
        let failures = self.failures.load(Ordering::Relaxed);
        if failures > 0 {
            return degraded(format!("{failures} reads failed in a row; reconnecting"));
        }
        let started = self.step_started.load(Ordering::Relaxed);
        if started > 0 {
            let running = Duration::from_millis(self.ms_since_epoch().saturating_sub(started - 1));
            if running > Duration::from_millis(self.longest_step_ms.load(Ordering::Relaxed)) {
                return degraded(format!("a read has not been answered for {running:?}"));
            }
        }
        SubscriptionHealth::Ready
    }
}
