//! The values operators type: durations (`30s`, `7d`), times (ISO 8601, or `-5m` for five
//! minutes ago), rates (`100/s`), entry ids and `key=value` pairs.

use std::time::{Duration, SystemTime};

use streamwise::EntryId;

/// A duration: a whole number and a unit, `ms`, `s`, `m`, `h`, `d` or `w` (`30s`, `7d`,
/// `1500ms`); `0` alone is zero.
pub(crate) fn duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit (ms, s, m, h, d or w)"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let ms_per = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 604_800_000,
        _ => {
            return Err(format!(
                "{unit:?} in {text:?} is not a unit (ms, s, m, h, d or w)"
            ));
        }
    };
    n.checked_mul(ms_per)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// A time: ISO 8601 (`2026-12-06T10:00:00Z`), or `-<duration>` before now (`-5m`).
pub(crate) fn time(text: &str) -> Result<SystemTime, String> {
    if let Some(ago) = text.strip_prefix('-') {
        let ago = duration(ago)?;
        return SystemTime::now()
            .checked_sub(ago)
            .ok_or_else(|| format!("{text:?} is before 1970"));
    }
    streamwise::parse_timestamp(text).map_err(|_| {
        format!("{text:?} is neither an ISO 8601 time (2026-12-06T10:00:00Z) nor -<duration> (-5m)")
    })
}

/// A rate in records a second: `100/s`, `6000/m`, `10/h`, or a number alone (a second).
pub(crate) fn rate(text: &str) -> Result<f64, String> {
    let (number, per) = text.split_once('/').unwrap_or((text, "s"));
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a rate like 100/s"))?;
    let seconds = match per.trim() {
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("{other:?} in {text:?} is not s, m or h")),
    };
    let rate = n / seconds;
    if !(rate > 0.0 && rate.is_finite()) {
        return Err(format!("{text:?} is not a rate above zero"));
    }
    Ok(rate)
}

/// An entry id (`1700000000000-0`).
pub(crate) fn entry_id(text: &str) -> Result<EntryId, String> {
    text.parse()
        .map_err(|e: streamwise::ParseEntryIdError| e.to_string())
}

/// A `key=value` pair.
pub(crate) fn pair(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{text:?} is not key=value")),
    }
}

/// Where a group is reset to, as `group reset --to` reads it.
pub(crate) fn reset_to(text: &str) -> Result<streamwise::redis::ops::ResetTo, String> {
    use streamwise::redis::ops::ResetTo;
    Ok(match text {
        "earliest" => ResetTo::Earliest,
        "latest" => ResetTo::Latest,
        "checkpoint" => ResetTo::Checkpoint,
        _ if text.starts_with('-') || text.contains('T') => ResetTo::Time(time(text)?),
        _ => ResetTo::Id(entry_id(text).map_err(|_| {
            format!("{text:?} is none of earliest, latest, checkpoint, an entry id, an ISO 8601 time or -<duration>")
        })?),
    })
}

/// Where `tail --from` starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum From {
    /// Only entries added from now on (`$`).
    New,
    /// After this id (an id `x` given is read from `x` on: after the one before it).
    After(EntryId),
}

pub(crate) fn tail_from(text: &str) -> Result<From, String> {
    Ok(match text {
        "$" => From::New,
        "-" | "0" | "earliest" => From::After(EntryId::ZERO),
        _ if text.starts_with('-') || text.contains('T') => {
            let ms = time(text)?
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            From::After(EntryId::new(ms, 0).prev().unwrap_or(EntryId::ZERO))
        }
        _ => {
            let id = entry_id(text).map_err(|_| {
                format!("{text:?} is none of $, an entry id, an ISO 8601 time or -<duration>")
            })?;
            From::After(id.prev().unwrap_or(EntryId::ZERO))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_rates_and_times_read_as_operators_write_them() {
        assert_eq!(duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(duration("0"), Ok(Duration::ZERO));
        assert!(duration("30").is_err());
        assert!(duration("5y").is_err());
        assert!(duration("s").is_err());
        assert_eq!(rate("100/s"), Ok(100.0));
        assert_eq!(rate("60/m"), Ok(1.0));
        assert_eq!(rate("20"), Ok(20.0));
        assert!(rate("0/s").is_err());
        assert!(rate("fast").is_err());
        let five_ago = time("-5m").unwrap();
        let age = SystemTime::now().duration_since(five_ago).unwrap();
        assert!(
            age >= Duration::from_secs(300) && age < Duration::from_secs(310),
            "{age:?}"
        );
        assert!(time("yesterday").is_err());
        assert_eq!(pair("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(pair("=b").is_err());
    }

    #[test]
    fn reset_targets_and_tail_starts() {
        use streamwise::redis::ops::ResetTo;
        assert_eq!(reset_to("earliest"), Ok(ResetTo::Earliest));
        assert_eq!(reset_to("5-1"), Ok(ResetTo::Id(EntryId::new(5, 1))));
        assert!(matches!(reset_to("2026-12-06T10:00:00Z"), Ok(ResetTo::Time(_))));
        assert!(reset_to("soon").is_err());
        assert_eq!(tail_from("$"), Ok(From::New));
        assert_eq!(tail_from("5-1"), Ok(From::After(EntryId::new(5, 0))));
        assert_eq!(
            tail_from("1970-01-01T00:00:00.010Z"),
            Ok(From::After(EntryId::new(9, u64::MAX)))
        );
    }
}
