//! [`CapturedLogs`]: what a `tracing` subscriber writes, kept for a test to look at.

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};

/// Collects the output of a `tracing_subscriber::fmt` subscriber, so that a test can check
/// what was logged (a warning given, a secret never written). Clones share one buffer.
///
/// ```
/// use streamwise::testing::CapturedLogs;
///
/// let logs = CapturedLogs::new();
/// let subscriber = tracing_subscriber::fmt()
///     .with_writer(logs.make_writer())
///     .with_ansi(false)
///     .finish();
/// tracing::subscriber::with_default(subscriber, || tracing::warn!("slow handler"));
/// assert!(logs.text().contains("WARN"));
/// assert!(logs.text().contains("slow handler"));
/// ```
#[derive(Clone, Debug, Default)]
pub struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// An empty capture.
    pub fn new() -> Self {
        Self::default()
    }

    /// A writer factory for `tracing_subscriber::fmt().with_writer(..)` (any
    /// `Fn() -> impl Write` is one): every writer it makes appends here.
    pub fn make_writer(&self) -> impl Fn() -> CapturedLogs + Send + Sync + use<> {
        let logs = self.clone();
        move || logs.clone()
    }

    /// Everything written so far (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buffer()).into_owned()
    }

    fn buffer(&self) -> MutexGuard<'_, Vec<u8>> {
        // A test that panicked while logging must not hide what was logged before.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.buffer().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
