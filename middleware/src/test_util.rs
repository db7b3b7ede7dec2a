//! Helpers for this crate's tests.

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
