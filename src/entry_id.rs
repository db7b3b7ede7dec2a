//! [`EntryId`], the id a stream gives an entry. Its own module, with its own parse error, so
//! that the error types can name entries without the error module and the message module
//! depending on each other.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The id a stream gives an entry: `<milliseconds>-<sequence>`, ordered, as in Redis.
///
/// ```
/// use streamwise::EntryId;
/// let id: EntryId = "1700000000000-3".parse()?;
/// assert_eq!((id.ms(), id.seq()), (1_700_000_000_000, 3));
/// assert_eq!(id.to_string(), "1700000000000-3");
/// # Ok::<(), streamwise::Error>(())
/// ```
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId {
    ms: u64,
    seq: u64,
}

impl EntryId {
    /// The smallest id, `0-0`: "from the beginning".
    pub const ZERO: EntryId = EntryId { ms: 0, seq: 0 };

    /// An id from its two parts.
    pub const fn new(ms: u64, seq: u64) -> Self {
        EntryId { ms, seq }
    }

    /// The millisecond part.
    pub const fn ms(&self) -> u64 {
        self.ms
    }

    /// The sequence part.
    pub const fn seq(&self) -> u64 {
        self.seq
    }

    /// The largest id below `self`, if any: everything up to it comes before `self`.
    pub fn prev(self) -> Option<Self> {
        match (self.ms, self.seq) {
            (0, 0) => None,
            (ms, 0) => Some(EntryId::new(ms - 1, u64::MAX)),
            (ms, seq) => Some(EntryId::new(ms, seq - 1)),
        }
    }

    /// The id that a stream assigns after `self` when the clock reads `now_ms`.
    pub(crate) fn next_at(self, now_ms: u64) -> Self {
        if now_ms > self.ms {
            EntryId::new(now_ms, 0)
        } else if self.seq == u64::MAX {
            EntryId::new(self.ms + 1, 0)
        } else {
            EntryId::new(self.ms, self.seq + 1)
        }
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for EntryId {
    type Err = ParseEntryIdError;

    /// Parses `<ms>-<seq>`, or `<ms>` alone (sequence 0), as Redis accepts.
    fn from_str(s: &str) -> Result<Self, ParseEntryIdError> {
        let bad = || ParseEntryIdError(s.to_owned());
        let (ms, seq) = match s.split_once('-') {
            Some((ms, seq)) => (ms, seq),
            None => (s, "0"),
        };
        let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return Err(bad());
        }
        Ok(EntryId::new(
            ms.parse().map_err(|_| bad())?,
            seq.parse().map_err(|_| bad())?,
        ))
    }
}

impl Serialize for EntryId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EntryId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A text that is not an entry id. Converts into [`Error::Invalid`](crate::Error::Invalid)
/// naming the field `id`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid id: {0:?} is not an entry id of the form <ms>-<seq>")]
pub struct ParseEntryIdError(String);

impl ParseEntryIdError {
    /// The field at fault, `id`, as [`Error::invalid_field`](crate::Error::invalid_field) gives it.
    pub fn invalid_field(&self) -> Option<&str> {
        Some("id")
    }

    /// The text that was given.
    pub fn input(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_parse_print_and_order() {
        let id: EntryId = "5-2".parse().unwrap();
        assert_eq!(id, EntryId::new(5, 2));
        assert_eq!("7".parse::<EntryId>().unwrap(), EntryId::new(7, 0));
        for bad in [
            "",
            "-",
            "a-1",
            "1-",
            "-1",
            "1-2-3",
            "1 -2",
            "99999999999999999999-0",
        ] {
            let err = bad.parse::<EntryId>().unwrap_err();
            assert_eq!(err.invalid_field(), Some("id"), "{bad:?}");
            assert_eq!(err.input(), bad);
            assert_eq!(crate::Error::from(err).invalid_field(), Some("id"), "{bad:?}");
        }
        assert!(EntryId::new(1, 9) < EntryId::new(2, 0));
        assert_eq!(EntryId::new(5, 2).next_at(4), EntryId::new(5, 3));
        assert_eq!(EntryId::new(5, 2).next_at(9), EntryId::new(9, 0));
        assert_eq!(EntryId::new(5, u64::MAX).next_at(5), EntryId::new(6, 0));
        assert_eq!(EntryId::new(5, 2).prev(), Some(EntryId::new(5, 1)));
        assert_eq!(EntryId::new(5, 0).prev(), Some(EntryId::new(4, u64::MAX)));
        assert_eq!(EntryId::ZERO.prev(), None);
    }

    #[test]
    fn entry_id_serde_is_the_string_form() {
        let json = serde_json::to_string(&EntryId::new(3, 4)).unwrap();
        assert_eq!(json, "\"3-4\"");
        assert_eq!(
            serde_json::from_str::<EntryId>(&json).unwrap(),
            EntryId::new(3, 4)
        );
    }
}
