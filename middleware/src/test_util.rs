//! Helpers for this crate's tests.

use std::time::Duration;

use streamwise::router::RunningRouter;
use streamwise::testing::CapturedLogs;

/// A subscriber writing to a fresh capture (no colours, with span close events), and the
/// capture.
pub(crate) fn log_subscriber() -> (impl tracing::Subscriber + Send + Sync, CapturedLogs) {
    let captured = CapturedLogs::new();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.make_writer())
        .with_ansi(false)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .finish();
    (subscriber, captured)
}

/// Waits until `running` has handled `n` deliveries, failing the test after `within`.
pub(crate) async fn wait_until_handled(running: &RunningRouter, n: u64, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while running.handled() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} handled",
            running.handled()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
