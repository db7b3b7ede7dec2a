//! [`Signal`]: a cancellation token whose check is one atomic load. (`CancellationToken`'s own
//! check takes a lock, which shows on paths that run per delivery.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// Set once; cheap to check, possible to await.
#[derive(Clone, Debug, Default)]
pub(crate) struct Signal {
    flag: Arc<AtomicBool>,
    token: CancellationToken,
}

impl Signal {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Sets the signal and wakes everyone waiting on it.
    pub(crate) fn cancel(&self) {
        self.flag.store(true, Ordering::Release);
        self.token.cancel();
    }

    /// Whether the signal is set.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Completes once the signal is set.
    pub(crate) fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_signal_is_seen_by_clones_and_wakes_waiters() {
        let signal = Signal::new();
        let clone = signal.clone();
        let waiter = tokio::spawn(async move { clone.cancelled().await });
        assert!(!signal.is_cancelled());
        signal.cancel();
        waiter.await.unwrap();
        assert!(signal.is_cancelled());
    }
}
