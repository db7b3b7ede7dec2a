//! `nats://` URLs: the servers to connect to, the credentials and the TLS files in them,
//! taken apart so that the credentials go to the client as options and never sit in an
//! address that could be printed or logged (async-nats logs server addresses at debug level).

use std::fmt;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// What a `nats://` (or `tls://`) URL says: servers, credentials and whether TLS is required.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct NatsUrl {
    /// `nats://host:port` (or `tls://host:port`) per server, without credentials.
    pub(crate) servers: Vec<String>,
    pub(crate) auth: Auth,
    /// TLS is required: the scheme was `tls://`, or the query named TLS files or
    /// `tls_required=true`.
    pub(crate) tls: bool,
    /// `tls_ca=<pem>` (repeatable): root certificates to trust besides the system's.
    pub(crate) tls_roots: Vec<PathBuf>,
    /// `tls_cert=<pem>&tls_key=<pem>`: the client's certificate and key.
    pub(crate) tls_client: Option<(PathBuf, PathBuf)>,
    /// The query as given (file paths only: nothing secret), for the redacted form.
    query: Option<String>,
}

/// The credentials of a URL.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Auth {
    None,
    /// `nats://user:password@host`.
    UserPassword(String, String),
    /// `nats://token@host`.
    Token(String),
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::UserPassword(user, _) => write!(f, "UserPassword({user:?}, ***)"),
            Auth::Token(_) => f.write_str("Token(***)"),
        }
    }
}

impl fmt::Debug for NatsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl NatsUrl {
    /// Parses `nats://[user:password@|token@]host[:port][,host[:port]...][?query]`; `tls://`
    /// asks for TLS. User, password and token may be percent-encoded. The query may hold
    /// `tls_ca=<pem>` (repeatable), `tls_cert=<pem>` with `tls_key=<pem>`, and
    /// `tls_required=true|false`. Errors name the field `url` and never repeat the
    /// credentials.
    pub(crate) fn parse(url: &str) -> Result<Self> {
        let bad = |why: &str| Error::invalid("url", format_args!("{}: {why}", redact(url)));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected nats://host:port"))?;
        let tls = match scheme {
            "nats" => false,
            "tls" => true,
            _ => return Err(bad("the scheme must be nats:// or tls://")),
        };
        let rest = rest.trim_end_matches('/');
        let (userinfo, after) = match rest.rfind('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        let (hosts, query) = match after.split_once('?') {
            Some((hosts, query)) => (hosts.trim_end_matches('/'), Some(query)),
            None => (after, None),
        };
        let mut tls = tls;
        let (mut tls_roots, mut cert, mut key) = (Vec::new(), None, None);
        for pair in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
        {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value =
                percent_decode(value).ok_or_else(|| bad("a query value is not percent-encoded UTF-8"))?;
            match name {
                "tls_ca" => tls_roots.push(PathBuf::from(value)),
                "tls_cert" => cert = Some(PathBuf::from(value)),
                "tls_key" => key = Some(PathBuf::from(value)),
                "tls_required" => match value.as_str() {
                    "true" => tls = true,
                    "false" => {}
                    _ => return Err(bad("tls_required must be true or false")),
                },
                other => {
                    return Err(bad(&format!(
                        "unknown parameter {other:?} (known: tls_ca, tls_cert, tls_key, tls_required)"
                    )));
                }
            }
        }
        let tls_client = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => return Err(bad("tls_cert and tls_key go together")),
        };
        tls |= !tls_roots.is_empty() || tls_client.is_some();
        let auth = match userinfo {
            None => Auth::None,
            Some(info) => match info.split_once(':') {
                Some((user, password)) => Auth::UserPassword(
                    percent_decode(user).ok_or_else(|| bad("the user name is not percent-encoded UTF-8"))?,
                    percent_decode(password)
                        .ok_or_else(|| bad("the password is not percent-encoded UTF-8"))?,
                ),
                None => Auth::Token(
                    percent_decode(info).ok_or_else(|| bad("the token is not percent-encoded UTF-8"))?,
                ),
            },
        };
        let mut servers = Vec::new();
        for host in hosts.split(',') {
            if host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
                return Err(bad("expected host[:port], comma-separated"));
            }
            if let Some((_, port)) = host.rsplit_once(':')
                && !host.ends_with(']')
                && port.parse::<u16>().is_err()
            {
                return Err(bad("the port is not a number from 0 to 65535"));
            }
            servers.push(format!("{scheme}://{host}"));
        }
        Ok(NatsUrl {
            servers,
            auth,
            tls,
            tls_roots,
            tls_client,
            query: query.filter(|q| !q.is_empty()).map(str::to_owned),
        })
    }

    /// The URL with its password or token replaced by `***`.
    pub(crate) fn redacted(&self) -> String {
        let hosts: Vec<&str> = self
            .servers
            .iter()
            .map(|s| s.split_once("://").map_or(s.as_str(), |(_, h)| h))
            .collect();
        let scheme = self
            .servers
            .first()
            .and_then(|s| s.split_once("://"))
            .map_or("nats", |(scheme, _)| scheme);
        let auth = match &self.auth {
            Auth::None => String::new(),
            Auth::UserPassword(user, _) => format!("{user}:***@"),
            Auth::Token(_) => "***@".to_owned(),
        };
        let query = self.query.as_ref().map(|q| format!("?{q}")).unwrap_or_default();
        format!("{scheme}://{auth}{}{query}", hosts.join(","))
    }
}

/// `url` with anything between `://` and the last `@` hidden, for errors about URLs that
/// did not parse.
pub(crate) fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://***@{}", &url[at + 1..]),
        (None, Some(at)) => format!("***@{}", &url[at + 1..]),
        _ => url.to_owned(),
    }
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_taken_out_of_the_servers() {
        let url = NatsUrl::parse("nats://alice:p%40ss:w@127.0.0.1:4223,10.0.0.2").unwrap();
        assert_eq!(url.servers, ["nats://127.0.0.1:4223", "nats://10.0.0.2"]);
        assert_eq!(url.auth, Auth::UserPassword("alice".into(), "p@ss:w".into()));
        assert_eq!(url.redacted(), "nats://alice:***@127.0.0.1:4223,10.0.0.2");
        assert!(!format!("{url:?}").contains("p@ss"));
        let token = NatsUrl::parse("tls://s3cret@host:4222").unwrap();
        assert!(token.tls);
        assert_eq!(token.auth, Auth::Token("s3cret".into()));
        assert_eq!(token.redacted(), "tls://***@host:4222");
    }

    #[test]
    fn tls_files_come_from_the_query() {
        let url = NatsUrl::parse(
            "nats://u:pw@h:1?tls_ca=/etc/ca.pem&tls_ca=/b%20c.pem&tls_cert=/c.pem&tls_key=/k.pem",
        )
        .unwrap();
        assert!(url.tls);
        assert_eq!(
            url.tls_roots,
            [PathBuf::from("/etc/ca.pem"), PathBuf::from("/b c.pem")]
        );
        assert_eq!(
            url.tls_client,
            Some((PathBuf::from("/c.pem"), PathBuf::from("/k.pem")))
        );
        assert_eq!(url.servers, ["nats://h:1"]);
        assert_eq!(
            url.redacted(),
            "nats://u:***@h:1?tls_ca=/etc/ca.pem&tls_ca=/b%20c.pem&tls_cert=/c.pem&tls_key=/k.pem"
        );
        assert!(NatsUrl::parse("nats://h:1?tls_required=true").unwrap().tls);
        assert!(!NatsUrl::parse("nats://h:1?tls_required=false").unwrap().tls);
        for bad in [
            "nats://h:1?tls_cert=/c.pem",
            "nats://h:1?nope=1",
            "nats://h:1?tls_required=yes",
        ] {
            assert_eq!(
                NatsUrl::parse(bad).unwrap_err().invalid_field(),
                Some("url"),
                "{bad}"
            );
        }
    }

    #[test]
    fn bad_urls_name_the_field_and_hide_the_password() {
        for bad in [
            "redis://u:hunter2@h:1",
            "nats://u:hunter2@h:port",
            "nats://u:hunter2@",
            "u:hunter2@h:1",
            "nats://u:hunter2%zz@h:1",
        ] {
            let err = NatsUrl::parse(bad).unwrap_err();
            assert_eq!(err.invalid_field(), Some("url"), "{bad}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }
}
