//! Credentials out of sight: [`redact_url`] hides the password of a Redis URL, whatever its
//! shape, for `Debug` output, error messages and logs.

/// `text` with its `%XX` escapes decoded (invalid ones kept as they are).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `url` with the password (and any `pass`/`password` query value) replaced by `***`.
///
/// Whatever the URL's shape, also one a parser refuses: a password with an unencoded `/`,
/// `?`, `#` or `@` is hidden whole, since everything before the last `@` counts as user
/// information (a URL with an `@` elsewhere is hidden more than needed, never less).
///
/// ```
/// use streamwise::redis::redact_url;
/// assert_eq!(redact_url("redis://user:pw@host:6379/0"), "redis://user:***@host:6379/0");
/// assert_eq!(redact_url("rediss://:pw@host"), "rediss://:***@host");
/// assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
/// assert_eq!(redact_url("redis+unix:///tmp/r.sock?db=1&pass=pw"), "redis+unix:///tmp/r.sock?db=1&pass=***");
/// assert_eq!(redact_url("redis://user:p/w#x?y@host/0"), "redis://user:***@host/0");
/// assert_eq!(redact_url("redis+unix:///s?p%61ss=pw"), "redis+unix:///s?p%61ss=***");
/// ```
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    // Byte ranges of `rest` to hide; both rules may apply, and both are kept.
    let mut hidden: Vec<std::ops::Range<usize>> = Vec::new();
    if let Some(at) = rest.rfind('@') {
        let info = &rest[..at];
        match info.find(':') {
            // The user name is shown only when it cannot be part of something else.
            Some(colon) if !info[..colon].contains(['/', '?', '#']) => hidden.push(colon + 1..at),
            Some(_) => hidden.push(0..at),
            None if info.contains(['/', '?', '#', '&', '=']) => hidden.push(0..at),
            None => {}
        }
    }
    // A password in the query may hold any character: from its value on, nothing is shown.
    // Keys are compared decoded (`p%61ss` is `pass` to the URL parser too).
    let value_at = rest
        .match_indices(['?', '&'])
        .filter_map(|(at, _)| {
            let key_start = at + 1;
            let key_end = key_start + rest[key_start..].find('=')?;
            let key = percent_decoded(&rest[key_start..key_end]).to_ascii_lowercase();
            (key == "pass" || key == "password").then_some(key_end + 1)
        })
        .min();
    if let Some(value_at) = value_at {
        hidden.push(value_at..rest.len());
    }
    let mut shown = String::with_capacity(url.len());
    if let Some(scheme) = scheme {
        shown.push_str(scheme);
        shown.push_str("://");
    }
    let mut in_hidden = false;
    for (i, c) in rest.char_indices() {
        if hidden.iter().any(|r| r.contains(&i)) {
            if !in_hidden {
                shown.push_str("***");
                in_hidden = true;
            }
        } else {
            in_hidden = false;
            shown.push(c);
        }
    }
    shown
}
