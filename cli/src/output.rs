//! Everything the tool prints goes through [`Out`]: tables or JSON on stdout, notes and errors
//! on stderr. The reports carry no URL, and the library's errors name the server by its
//! redacted URL; notes and errors are redacted once more with the library's
//! [`redact_url`](streamwise::redis::redact_url), applied to the URLs the tool was given,
//! wherever one is quoted.

use std::io::Write;

use comfy_table::{ContentArrangement, Table, presets};
use serde::Serialize;
use streamwise::EntryId;
use streamwise::redis::{ops, redact_url};

/// How results are printed (`--output`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Tables and plain lines, for people.
    Table,
    /// JSON: one object per command (`tail`: one per line), for scripts.
    Json,
}

/// The printer, which knows the URLs it must never print as they were typed.
pub(crate) struct Out {
    pub(crate) format: Format,
    urls: Vec<String>,
}

impl Out {
    /// A printer whose notes show `urls` (the URLs the tool was given) redacted.
    pub(crate) fn new(format: Format, urls: Vec<String>) -> Self {
        Out { format, urls }
    }

    /// A line on stdout.
    pub(crate) fn line(&self, text: &str) {
        let mut stdout = std::io::stdout().lock();
        // A closed pipe (`| head`) ends the output, not the tool.
        let _ = writeln!(stdout, "{text}");
    }

    /// A note or an error on stderr (in both formats, so that stdout stays parseable), with
    /// any URL the tool was given redacted.
    pub(crate) fn note(&self, text: &str) {
        eprintln!("{}", redact_urls(text, &self.urls));
    }

    /// `value` as pretty JSON on stdout.
    pub(crate) fn json(&self, value: &impl Serialize) {
        match serde_json::to_string_pretty(value) {
            Ok(text) => self.line(&text),
            Err(e) => self.note(&format!("error: cannot write JSON: {e}")),
        }
    }

    /// `value` as one line of JSON on stdout.
    pub(crate) fn json_line(&self, value: &impl Serialize) {
        match serde_json::to_string(value) {
            Ok(text) => self.line(&text),
            Err(e) => self.note(&format!("error: cannot write JSON: {e}")),
        }
    }

    /// A table on stdout.
    pub(crate) fn table(&self, table: &Table) {
        self.line(&table.to_string());
    }
}

/// `text` with each of `urls` (whole URLs, as typed) replaced by its redacted form
/// ([`redact_url`]): only where a whole URL is quoted, so that nothing else in the text can
/// change.
pub(crate) fn redact_urls(text: &str, urls: &[String]) -> String {
    let mut text = text.to_owned();
    // The longest first: a URL that contains another is replaced whole.
    let mut urls: Vec<&String> = urls.iter().filter(|u| !u.is_empty()).collect();
    urls.sort_by_key(|u| std::cmp::Reverse(u.len()));
    for url in urls {
        let redacted = redact_url(url);
        if redacted != *url {
            text = text.replace(url.as_str(), &redacted);
        }
    }
    text
}

/// A table with `header`, for rows to be added.
pub(crate) fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.iter().copied());
    table
}

/// Milliseconds as people read them: `850ms`, `12.5s`, `3m 20s`, `5h 02m`, `3d 04h`.
pub(crate) fn ms(ms: u64) -> String {
    let s = ms / 1000;
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m {:02}s", s / 60, s % 60),
        3_600_000..86_400_000 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// An optional value, or `-`.
pub(crate) fn opt<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// An entry id with the time it was made.
pub(crate) fn id_with_time(id: Option<EntryId>) -> String {
    match id {
        Some(id) => format!("{id} ({})", ops::id_time(id)),
        None => "-".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted_whole_and_nothing_else_changes() {
        let urls = |u: &[&str]| u.iter().map(|u| (*u).to_owned()).collect::<Vec<_>>();
        // A password with an `@` (the user information ends at the last one), and one in the
        // query.
        let given = urls(&[
            "redis://admin:p@ss@host:1",
            "redis+unix:///tmp/r.sock?password=hunter2",
        ]);
        assert_eq!(
            redact_urls(
                "cannot reach redis://admin:p@ss@host:1 nor redis+unix:///tmp/r.sock?password=hunter2",
                &given
            ),
            "cannot reach redis://admin:***@host:1 nor redis+unix:///tmp/r.sock?password=***"
        );
        // A short password leaves everything but the URL as it was.
        let given = urls(&["redis://:1@127.0.0.1:7001"]);
        assert_eq!(
            redact_urls("{\"pending\": 1} redis://:1@127.0.0.1:7001", &given),
            "{\"pending\": 1} redis://:***@127.0.0.1:7001"
        );
        assert_eq!(redact_urls("no url here: 1", &given), "no url here: 1");
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(ms(850), "850ms");
        assert_eq!(ms(12_500), "12.5s");
        assert_eq!(ms(200_000), "3m 20s");
        assert_eq!(ms(18_120_000), "5h 02m");
        assert_eq!(ms(273_600_000), "3d 04h");
    }
}
