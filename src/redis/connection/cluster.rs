//! Redis Cluster: the `redis-cluster://` URL, the hash slot of a key, and which master owns a
//! slot (for the connections of one's own, which redis-rs's cluster client does not make).

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Value};

use crate::error::{Error, Result, hash_tag};

/// The hash slots of a cluster.
pub(crate) const SLOTS: u16 = 16384;

/// The seed nodes named by a `redis-cluster://` or `rediss-cluster://` URL, as `redis://` or
/// `rediss://` URLs with the URL's credentials; `None` for a URL of another scheme.
///
/// The form is fred's: `redis-cluster://[user:pass@]host:port[?node=host:port&node=...]`.
pub(super) fn seed_urls(url: &str, redacted: &str) -> Result<Option<Vec<String>>> {
    let lower = url.to_ascii_lowercase();
    let (scheme, rest) = if lower.starts_with("redis-cluster://") {
        ("redis", &url["redis-cluster://".len()..])
    } else if lower.starts_with("rediss-cluster://") {
        ("rediss", &url["rediss-cluster://".len()..])
    } else {
        return Ok(None);
    };
    let bad = |why: &str| {
        Error::invalid(
            "redis_url",
            format_args!("{redacted} is not a valid cluster URL: {why}"),
        )
    };
    let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    if authority.contains('/') {
        return Err(bad("a cluster has one database; give no path"));
    }
    let (credentials, first) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    let mut nodes = vec![first];
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("node", node)) => nodes.push(node),
            _ => return Err(bad("the only parameter is node=host:port")),
        }
    }
    let mut seeds = Vec::with_capacity(nodes.len());
    for node in nodes {
        let (host, port) = node
            .rsplit_once(':')
            .ok_or_else(|| bad("every node is host:port"))?;
        if host.is_empty() || host.contains(['@', '/']) || port.parse::<u16>().is_err() {
            return Err(bad("every node is host:port"));
        }
        seeds.push(format!("{scheme}://{credentials}{node}"));
    }
    Ok(Some(seeds))
}

/// The connection info of each seed URL.
pub(super) fn seed_infos(seeds: &[String], redacted: &str) -> Result<Vec<ConnectionInfo>> {
    seeds
        .iter()
        .map(|seed| {
            seed.as_str().into_connection_info().map_err(|e| {
                Error::invalid(
                    "redis_url",
                    format_args!("{redacted} is not a valid cluster URL ({:?})", e.kind()),
                )
            })
        })
        .collect()
}

/// The hash slot of `key`, as the server computes it (CRC16/XMODEM of the hash tag, or of the
/// whole key, modulo 16384).
pub(crate) fn slot_of(key: &str) -> u16 {
    let hashed = hash_tag(key).unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(hashed.as_bytes()) % SLOTS
}

/// `info` pointed at `host:port` (TLS settings and credentials kept).
pub(super) fn at_node(info: &ConnectionInfo, host: &str, port: u16) -> ConnectionInfo {
    let addr = match info.addr() {
        #[cfg(feature = "tls")]
        ConnectionAddr::TcpTls {
            insecure, tls_params, ..
        } => ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host.to_owned(), port),
    };
    info.clone().set_addr(addr)
}

/// Which master serves each slot, from `CLUSTER SLOTS`.
#[derive(Clone, Debug, Default)]
pub(super) struct SlotOwners {
    /// `(first slot, last slot, host, port)`, one per range.
    ranges: Vec<(u16, u16, String, u16)>,
}

impl SlotOwners {
    /// The owners in a `CLUSTER SLOTS` reply; `None` when the reply has another shape. A node
    /// that announces no endpoint (NULL, `""` or `"?"`: reach it where you reached the cluster)
    /// is taken to be on `seed_host`.
    pub(super) fn from_reply(reply: &Value, seed_host: &str) -> Option<Self> {
        let Value::Array(ranges) = reply else { return None };
        let mut owners = SlotOwners::default();
        for range in ranges {
            let Value::Array(fields) = range else { return None };
            let [first, last, master, ..] = fields.as_slice() else {
                return None;
            };
            let Value::Array(node) = master else { return None };
            let [host, port, ..] = node.as_slice() else {
                return None;
            };
            let host = match host {
                Value::BulkString(b) => String::from_utf8(b.clone()).ok()?,
                Value::SimpleString(s) => s.clone(),
                Value::Nil => String::new(),
                _ => return None,
            };
            let host = match host.as_str() {
                "" | "?" => seed_host.to_owned(),
                _ => host,
            };
            owners
                .ranges
                .push((int(first)? as u16, int(last)? as u16, host, int(port)? as u16));
        }
        Some(owners)
    }

    /// Every master of the map, each once, in the order of their first slot range.
    pub(super) fn masters(&self) -> Vec<(String, u16)> {
        let mut masters: Vec<(String, u16)> = Vec::new();
        for (_, _, host, port) in &self.ranges {
            if !masters.iter().any(|(h, p)| h == host && p == port) {
                masters.push((host.clone(), *port));
            }
        }
        masters
    }

    /// The master serving `slot`, if the map knows one.
    pub(super) fn owner(&self, slot: u16) -> Option<(&str, u16)> {
        self.ranges
            .iter()
            .find(|(first, last, ..)| (*first..=*last).contains(&slot))
            .map(|(_, _, host, port)| (host.as_str(), *port))
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

/// The address a `MOVED <slot> <host:port>` or `ASK` error redirects to.
pub(super) fn redirect_target(e: &redis::RedisError) -> Option<(String, u16)> {
    // redis-rs gives `(address, slot)`; the address is `host:port` (IPv6 in brackets or not).
    let (address, _slot) = e.redirect_node()?;
    let (host, port) = address.rsplit_once(':')?;
    Some((host.trim_matches(['[', ']']).to_owned(), port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_the_servers() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot_of("123456789"), 12739);
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("{orders}-dead"), slot_of("orders"));
        assert_eq!(slot_of("streamwise:meta:{orders}"), slot_of("orders"));
    }

    #[test]
    fn cluster_urls_name_their_seed_nodes() {
        let seeds = |url| seed_urls(url, "<url>").unwrap();
        assert_eq!(seeds("redis://a:1"), None);
        assert_eq!(seeds("redis-cluster://a:1"), Some(vec!["redis://a:1".to_owned()]));
        assert_eq!(
            seeds("rediss-cluster://u:p@a:1?node=b:2&node=c:3"),
            Some(vec![
                "rediss://u:p@a:1".into(),
                "rediss://u:p@b:2".into(),
                "rediss://u:p@c:3".into()
            ])
        );
        for bad in [
            "redis-cluster://a",
            "redis-cluster://a:1/2",
            "redis-cluster://a:1?db=2",
            "redis-cluster://a:1?node=b",
            "redis-cluster://:x@a:99999",
        ] {
            let err = seed_urls(bad, "<url>").unwrap_err();
            assert_eq!(err.invalid_field(), Some("redis_url"), "{bad}");
        }
    }

    #[test]
    fn a_redirect_names_the_node_to_go_to() {
        let error = |text: &str| {
            let reply = redis::parse_redis_value(format!("-{text}\r\n").as_bytes()).unwrap();
            reply.extract_error().unwrap_err()
        };
        assert_eq!(
            redirect_target(&error("MOVED 3999 127.0.0.1:6381")),
            Some(("127.0.0.1".to_owned(), 6381))
        );
        assert_eq!(
            redirect_target(&error("ASK 3999 redis-2.internal:7000")),
            Some(("redis-2.internal".to_owned(), 7000))
        );
        assert_eq!(
            redirect_target(&error("MOVED 3999 [::1]:7001")),
            Some(("::1".to_owned(), 7001))
        );
        assert_eq!(redirect_target(&error("ERR no")), None);
    }

    #[test]
    fn the_slot_map_names_each_slots_master() {
        let node = |host: &str, port| Value::Array(vec![Value::BulkString(host.into()), Value::Int(port)]);
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("10.0.0.1", 7000),
                node("10.0.0.4", 7003),
            ]),
            Value::Array(vec![Value::Int(5461), Value::Int(16383), node("10.0.0.2", 7001)]),
        ]);
        let owners = SlotOwners::from_reply(&reply, "seed").unwrap();
        assert_eq!(owners.owner(0), Some(("10.0.0.1", 7000)));
        assert_eq!(owners.owner(5461), Some(("10.0.0.2", 7001)));
        assert_eq!(owners.owner(16383), Some(("10.0.0.2", 7001)));
        assert!(SlotOwners::from_reply(&Value::Int(1), "seed").is_none());
        let unknown = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(100),
                Value::Array(vec![Value::Nil, Value::Int(7000)]),
            ]),
            Value::Array(vec![Value::Int(101), Value::Int(16383), node("?", 7001)]),
        ]);
        let owners = SlotOwners::from_reply(&unknown, "seed").unwrap();
        assert_eq!(owners.owner(5), Some(("seed", 7000)));
        assert_eq!(owners.owner(200), Some(("seed", 7001)));
    }
}
