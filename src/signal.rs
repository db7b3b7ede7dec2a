//! [`Signal`]: a cancellation token whose check is one atomic load. (`CancellationToken`'s own
//! check takes a lock, which shows on paths that run per delivery.)

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

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

    /// Whether `other` is this signal (a clone of it).
    pub(crate) fn same_as(&self, other: &Signal) -> bool {
        Arc::ptr_eq(&self.flag, &other.flag)
    }

    /// Whether the signal is set.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Completes once the signal is set.
    pub(crate) fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    /// Like [`cancelled`](Self::cancelled), for a future kept across many polls (a `select!`
    /// in a loop): a poll is one atomic load while the waker stays the same.
    pub(crate) fn wait(&self) -> Wait<'_> {
        Wait {
            flag: &self.flag,
            inner: Box::pin(self.token.cancelled()),
            registered: None,
        }
    }
}

/// The future of [`Signal::wait`].
pub(crate) struct Wait<'a> {
    flag: &'a AtomicBool,
    inner: Pin<Box<WaitForCancellationFuture<'a>>>,
    /// The waker the inner future last registered.
    registered: Option<Waker>,
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.flag.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if self.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            // The inner future holds this waker already: `cancel` wakes it.
            return Poll::Pending;
        }
        let this = &mut *self;
        match this.inner.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(()),
            Poll::Pending => {
                this.registered = Some(cx.waker().clone());
                Poll::Pending
            }
        }
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

    #[tokio::test]
    async fn a_wait_polled_many_times_still_wakes_on_cancel() {
        let signal = Signal::new();
        let clone = signal.clone();
        let (polled, mut polled_rx) = tokio::sync::mpsc::unbounded_channel();
        let waiter = tokio::spawn(async move {
            let wait = clone.wait();
            tokio::pin!(wait);
            // Polled again and again with the same waker, as in a select! loop.
            for _ in 0..3 {
                assert!(futures::poll!(wait.as_mut()).is_pending());
                polled.send(()).unwrap();
            }
            wait.await;
        });
        for _ in 0..3 {
            polled_rx.recv().await.unwrap();
        }
        signal.cancel();
        waiter.await.unwrap();
        // Set before the first poll: ready at once.
        signal.wait().await;
    }
}
