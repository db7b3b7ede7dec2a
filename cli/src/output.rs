//! Everything the tool prints goes through [`Out`]: tables or JSON on stdout, notes and errors
//! on stderr, each line with the URL's password (and the URL's user information) taken out.

use std::io::Write;

use comfy_table::{ContentArrangement, Table, presets};
use serde::Serialize;
use streamwise::EntryId;

/// How results are printed (`--output`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Tables and plain lines, for people.
    Table,
    /// JSON: one object per command (`tail`: one per line), for scripts.
    Json,
}

/// The printer, which knows the secrets it must never print.
pub(crate) struct Out {
    pub(crate) format: Format,
    secrets: Vec<String>,
}

impl Out {
    /// A printer that hides the password of `url` (and the URL as typed, in favour of its
    /// redacted form).
    pub(crate) fn new(format: Format, url: Option<&str>) -> Self {
        let mut secrets = Vec::new();
        if let Some(password) = url.and_then(password_of) {
            secrets.push(password.to_owned());
        }
        Out { format, secrets }
    }

    /// `text` without any secret.
    pub(crate) fn scrub(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for secret in &self.secrets {
            text = text.replace(secret.as_str(), "***");
        }
        text
    }

    /// A line on stdout.
    pub(crate) fn line(&self, text: &str) {
        let mut stdout = std::io::stdout().lock();
        // A closed pipe (`| head`) ends the output, not the tool.
        let _ = writeln!(stdout, "{}", self.scrub(text));
    }

    /// A note on stderr (in both formats, so that stdout stays parseable).
    pub(crate) fn note(&self, text: &str) {
        eprintln!("{}", self.scrub(text));
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

/// The password in a URL's user information (`redis://user:pass@host`), if any.
fn password_of(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let userinfo = &rest[..rest.find('@')?];
    let (_, password) = userinfo.split_once(':')?;
    (!password.is_empty()).then_some(password)
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
        Some(id) => format!("{id} ({})", time_of(id)),
        None => "-".to_owned(),
    }
}

/// The time an entry id was made.
pub(crate) fn time_of(id: EntryId) -> String {
    streamwise::format_timestamp(std::time::UNIX_EPOCH + std::time::Duration::from_millis(id.ms()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_scrubbed_from_every_line() {
        assert_eq!(password_of("redis://:s3cret@host:1"), Some("s3cret"));
        assert_eq!(password_of("redis://user:pw@host"), Some("pw"));
        assert_eq!(password_of("redis://host:1"), None);
        let out = Out::new(Format::Table, Some("redis://admin:s3cret@host:1"));
        assert_eq!(out.scrub("auth s3cret refused"), "auth *** refused");
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
