//! [`RepeatedWarnings`]: the warnings of a subscription's tasks, each repeated one logged
//! once and then with a count, so that a fault that persists does not flood the log.

use tokio::time::Instant;

/// Logs a warning the first time, then the same warning again only with how often it came
/// meanwhile (at most every [`RepeatedWarnings::EVERY`]): a fault that persists does not
/// flood the log.
#[derive(Default)]
pub(super) struct RepeatedWarnings {
    last: Option<(String, Instant)>,
    repeats: u64,
}

impl RepeatedWarnings {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    pub(super) fn warn(&mut self, stream: &str, message: &str) {
        let now = Instant::now();
        match &self.last {
            Some((last, at)) if last == message && now.duration_since(*at) < Self::EVERY => {
                self.repeats += 1;
            }
            Some((last, _)) if last == message => {
                tracing::warn!(stream, repeated = self.repeats + 1, "{message}");
                self.last = Some((message.to_owned(), now));
                self.repeats = 0;
            }
            _ => {
                if self.repeats > 0 {
                    tracing::warn!(
                        stream,
                        repeated = self.repeats,
                        "(the warning before this one came again)"
                    );
                }
                tracing::warn!(stream, "{message}");
                self.last = Some((message.to_owned(), now));
                self.repeats = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RepeatedWarnings;
    use crate::testing::CapturedLogs;

    #[test]
    fn a_repeated_warning_is_logged_once_then_with_its_count() {
        let logs = CapturedLogs::new();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.make_writer())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let mut log = RepeatedWarnings::default();
            for _ in 0..1000 {
                log.warn("s", "read failed: connection refused");
            }
            log.warn("s", "consumer group vanished");
        });
        let text = logs.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].contains("read failed: connection refused"), "{text}");
        assert!(lines[1].contains("repeated=999"), "{text}");
        assert!(lines[2].contains("consumer group vanished"), "{text}");
    }
}
