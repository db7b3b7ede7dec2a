//! Configuration: YAML (either shape of the seed documents) overlaid with the environment
//! (`REDIS_URL`, `STREAM_NAME`, `CONSUMER_GROUP`, `CONSUMER_NAME`), overlaid with values set in
//! code. Unknown keys and bad values are [`Error::Invalid`] naming the full key.
//!
//! Both shapes are accepted:
//!
//! ```yaml
//! redis_streams:
//!   url: "redis://localhost:6379"
//!   producer:
//!     stream: "events"
//!     max_length: 10000
//!   consumer:
//!     group: "my-group"
//!     block_ms: 5000
//!     count: 10
//! ```
//!
//! ```yaml
//! redis_streams:
//!   producer:
//!     redis_url: "redis://localhost:6379"
//!     stream_name: "events"
//!     max_length: 10000
//!     auto_create_stream: true
//!   consumer:
//!     redis_url: "redis://localhost:6379"
//!     streams:
//!       - name: "events"
//!         group: "my-group"
//!         consumer: "consumer-1"
//!     block_ms: 5000
//!     count: 10
//!     auto_ack: false
//! ```
//!
//! ```
//! use streamwise::redis_streams::Config;
//!
//! let yaml = "redis_streams:\n  producer:\n    stream: events\n  consumer:\n    group: my-group\n";
//! let env = [("CONSUMER_NAME", "worker-7")];
//! let config = Config::from_yaml_str(yaml)?
//!     .overlay_vars(|name| env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string()))?;
//! assert_eq!(config.consumer_binding(0)?.consumer, "worker-7");
//! assert_eq!(config.consumer_binding(0)?.stream, "events");
//! # Ok::<(), streamwise::Error>(())
//! ```

use std::path::Path;

use serde_norway::{Mapping, Value};

use super::{
    ConsumerOptions, ProducerOptions, RetentionHandle, RetentionOptions, StreamConsumer, StreamManager,
    StreamProducer,
};
use crate::error::{Error, Result, validate_name, validate_stream_name};
use crate::redis::RedisConnection;
use crate::wire_format::{WireFormat, WireSettings};

/// The default Redis URL.
pub const DEFAULT_REDIS_URL: &str = "redis://localhost:6379";

/// Producer and consumer settings.
#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    /// The Redis URL (`redis_streams.url`, or a section's `redis_url`; `REDIS_URL`).
    pub redis_url: String,
    /// The producer section.
    pub producer: ProducerConfig,
    /// The consumer section.
    pub consumer: ConsumerConfig,
    /// The retention section.
    pub retention: RetentionConfig,
}

impl std::fmt::Debug for Config {
    /// The URL's password is never shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("redis_url", &crate::redis::redact_url(&self.redis_url))
            .field("producer", &self.producer)
            .field("consumer", &self.consumer)
            .field("retention", &self.retention)
            .finish()
    }
}

/// The producer section.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ProducerConfig {
    /// The stream (`stream` or `stream_name`; `STREAM_NAME`).
    pub stream: Option<String>,
    /// `max_length`, `auto_create_stream`.
    pub options: ProducerOptions,
}

/// The consumer section.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ConsumerConfig {
    /// What to consume: `streams: [{name, group, consumer}]`, or `group`/`consumer` (and the
    /// producer's stream) directly in the section.
    pub bindings: Vec<Binding>,
    /// `block_ms`, `count`, `auto_ack`, `use_redis_checkpoint`, `reclaim_*`, ...
    pub options: ConsumerOptions,
}

/// The retention section: whether [`Config::start_retention`] runs a background task that keeps
/// every stream's `retention_ms` and `max_length` while it is quiet, and how.
///
/// ```yaml
/// redis_streams:
///   retention:
///     enabled: true
///     interval_ms: 1000
///     safe: true
///     idle_group_age_ms: 604800000
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RetentionConfig {
    /// `enabled` (default `false`).
    pub enabled: bool,
    /// `interval_ms`, `safe`, `idle_group_age_ms`.
    pub options: RetentionOptions,
}

/// One stream/group/consumer to consume, as far as configured.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Binding {
    /// The stream.
    pub stream: Option<String>,
    /// The consumer group.
    pub group: Option<String>,
    /// The consumer name.
    pub consumer: Option<String>,
}

/// A complete binding, every name present and valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedBinding {
    /// The stream.
    pub stream: String,
    /// The consumer group.
    pub group: String,
    /// The consumer name.
    pub consumer: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            redis_url: DEFAULT_REDIS_URL.to_owned(),
            producer: ProducerConfig::default(),
            consumer: ConsumerConfig::default(),
            retention: RetentionConfig::default(),
        }
    }
}

const ROOT: &str = "redis_streams";

/// The largest configuration text accepted: 1 MiB (a real one is a few hundred bytes).
pub const MAX_CONFIG_BYTES: usize = 1024 * 1024;

/// The deepest nesting accepted in a configuration (block indentation levels, `- ` items and
/// `[`/`{` flow collections together); the deepest real one is 5.
pub const MAX_CONFIG_DEPTH: usize = 32;

/// Refuses text that is too large or too deeply nested, by one linear scan before parsing.
fn check_bounds(yaml: &str) -> Result<()> {
    if yaml.len() > MAX_CONFIG_BYTES {
        return Err(Error::invalid(
            "config",
            format_args!(
                "{} bytes is more than the {MAX_CONFIG_BYTES} accepted",
                yaml.len()
            ),
        ));
    }
    let too_deep = || {
        Error::invalid(
            "config",
            format_args!("nested deeper than the {MAX_CONFIG_DEPTH} levels accepted"),
        )
    };
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    for line in yaml.lines() {
        let body = line.trim_start_matches(' ');
        if flow == 0 && !body.is_empty() && !body.starts_with('#') {
            let indent = line.len() - body.len();
            while indents.last().is_some_and(|&i| i >= indent) {
                indents.pop();
            }
            indents.push(indent);
        }
        // `- - x` nests one level per dash on the same line.
        let dashes = body
            .split_inclusive(' ')
            .take_while(|t| t.trim_end() == "-")
            .count();
        let (mut quote, mut inner) = (None, 0usize);
        for c in body.chars() {
            match (quote, c) {
                (None, '#') => break,
                (None, '"' | '\'') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                (None, '[' | '{') => {
                    flow += 1;
                    inner = inner.max(flow);
                }
                (None, ']' | '}') => flow = flow.saturating_sub(1),
                _ => {}
            }
        }
        if indents.len() + dashes + inner.max(flow) > MAX_CONFIG_DEPTH {
            return Err(too_deep());
        }
    }
    Ok(())
}

impl Config {
    /// Reads a YAML file (see the module docs for the shapes).
    pub fn from_yaml_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::invalid("config", format_args!("cannot read {}: {e}", path.display())))?;
        Self::from_yaml_str(&text)
    }

    /// Parses YAML text. Text over [`MAX_CONFIG_BYTES`], or nested deeper than
    /// [`MAX_CONFIG_DEPTH`], is refused before parsing ([`Error::Invalid`], `config`), so that
    /// a hostile or broken file cannot stall the parser.
    pub fn from_yaml_str(yaml: &str) -> Result<Self> {
        check_bounds(yaml)?;
        let doc: Value = serde_norway::from_str(yaml).map_err(|e| {
            // The parser names the key path when a value cannot be represented (a number too
            // big for 64 bits, say): keep that as the field.
            let text = e.to_string();
            let field = text
                .split_once(": ")
                .map(|(path, _)| path)
                .filter(|path| path.starts_with(ROOT) && !path.contains(char::is_whitespace))
                .map_or_else(|| "config".to_owned(), str::to_owned);
            Error::invalid(field, format_args!("not valid YAML: {text}"))
        })?;
        let mut config = Config::default();
        if doc.is_null() {
            return Ok(config);
        }
        let top = mapping(&doc, "(top level)")?;
        for (key, value) in top {
            match key_str(key, "(top level)")? {
                ROOT => config.read_root(value)?,
                other => return Err(unknown(other)),
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Overlays the environment variables `REDIS_URL`, `STREAM_NAME`, `CONSUMER_GROUP` and
    /// `CONSUMER_NAME` (they win over YAML).
    pub fn overlay_env(self) -> Result<Self> {
        self.overlay_vars(|name| std::env::var(name).ok())
    }

    /// Overlays variables from `lookup` (for tests and other sources): `REDIS_URL` sets the
    /// URL; `STREAM_NAME` the producer's stream and the first binding's; `CONSUMER_GROUP` and
    /// `CONSUMER_NAME` the first binding's group and consumer.
    pub fn overlay_vars(mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        if let Some(url) = lookup("REDIS_URL") {
            RedisConnection::new(&url).map_err(|e| rename(e, "REDIS_URL"))?;
            self.redis_url = url;
        }
        let mut first = self.consumer.bindings.first().cloned().unwrap_or_default();
        if let Some(stream) = lookup("STREAM_NAME") {
            validate_stream_name("STREAM_NAME", &stream)?;
            self.producer.stream = Some(stream.clone());
            first.stream = Some(stream);
        }
        if let Some(group) = lookup("CONSUMER_GROUP") {
            validate_name("CONSUMER_GROUP", &group)?;
            first.group = Some(group);
        }
        if let Some(consumer) = lookup("CONSUMER_NAME") {
            validate_name("CONSUMER_NAME", &consumer)?;
            first.consumer = Some(consumer);
        }
        if first != Binding::default() {
            match self.consumer.bindings.first_mut() {
                Some(b) => *b = first,
                None => self.consumer.bindings.push(first),
            }
        }
        Ok(self)
    }

    /// Reads `path` if given, then the environment: the usual way to configure a service.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        match path {
            Some(p) => Self::from_yaml_file(p)?.overlay_env(),
            None => Config::default().overlay_env(),
        }
    }

    /// The consumer binding `index`, completed: its stream defaults to the producer's.
    pub fn consumer_binding(&self, index: usize) -> Result<ResolvedBinding> {
        let path = format!("{ROOT}.consumer.streams[{index}]");
        let b = self.consumer.bindings.get(index).cloned().unwrap_or_default();
        let need = |value: Option<String>, key: &str, env: &str| {
            value.ok_or_else(|| {
                Error::invalid(
                    format!("{path}.{key}"),
                    format_args!("is not set (set it in YAML or with {env})"),
                )
            })
        };
        Ok(ResolvedBinding {
            stream: need(
                b.stream.or_else(|| self.producer.stream.clone()),
                "name",
                "STREAM_NAME",
            )?,
            group: need(b.group, "group", "CONSUMER_GROUP")?,
            consumer: need(b.consumer, "consumer", "CONSUMER_NAME")?,
        })
    }

    /// A producer as configured.
    pub fn stream_producer(&self) -> Result<StreamProducer> {
        let stream = self.producer.stream.as_deref().ok_or_else(|| {
            Error::invalid(
                format!("{ROOT}.producer.stream"),
                "is not set (set it in YAML or with STREAM_NAME)",
            )
        })?;
        StreamProducer::with_options(
            RedisConnection::new(&self.redis_url)?,
            stream,
            self.producer.options.clone(),
        )
    }

    /// A consumer for binding `index`, as configured.
    pub fn stream_consumer(&self, index: usize) -> Result<StreamConsumer> {
        let b = self.consumer_binding(index)?;
        StreamConsumer::with_options(
            RedisConnection::new(&self.redis_url)?,
            &b.stream,
            &b.group,
            &b.consumer,
            self.consumer.options.clone(),
        )
    }

    /// The retention task as configured, started (`None` when `retention.enabled` is not
    /// set). Every process may start one: a stream is trimmed by one of them at a time. Must be
    /// called within a tokio runtime.
    pub fn start_retention(&self) -> Result<Option<RetentionHandle>> {
        if !self.retention.enabled {
            return Ok(None);
        }
        let manager = StreamManager::with_connection(RedisConnection::new(&self.redis_url)?);
        manager.start_retention(self.retention.options).map(Some)
    }

    fn read_root(&mut self, value: &Value) -> Result<()> {
        for (key, value) in mapping(value, ROOT)? {
            let key = key_str(key, ROOT)?;
            let path = format!("{ROOT}.{key}");
            match key {
                "url" | "redis_url" => self.redis_url = redis_url(value, &path)?,
                "producer" => self.read_producer(value)?,
                "consumer" => self.read_consumer(value)?,
                "retention" => self.read_retention(value)?,
                _ => return Err(unknown(&path)),
            }
        }
        Ok(())
    }

    fn read_producer(&mut self, value: &Value) -> Result<()> {
        let section = format!("{ROOT}.producer");
        for (key, value) in mapping(value, &section)? {
            let key = key_str(key, &section)?;
            let path = format!("{section}.{key}");
            let p = &mut self.producer;
            match key {
                "redis_url" => self.redis_url = redis_url(value, &path)?,
                "stream" | "stream_name" => p.stream = Some(stream_name(value, &path)?),
                "max_length" => {
                    let n = positive(value, &path)?;
                    let limit = crate::MAX_CAP;
                    if n > limit {
                        return Err(Error::invalid(path, format_args!("must be at most {limit}")));
                    }
                    p.options.max_length = n;
                }
                "auto_create_stream" => p.options.auto_create_stream = boolean(value, &path)?,
                "max_entry_size" => p.options.max_entry_size = positive(value, &path)? as usize,
                "codec" => (p.options.wire_format, p.options.wire_settings) = codec(value, &path)?,
                _ => return Err(unknown(&path)),
            }
        }
        Ok(())
    }

    fn read_retention(&mut self, value: &Value) -> Result<()> {
        let section = format!("{ROOT}.retention");
        for (key, value) in mapping(value, &section)? {
            let key = key_str(key, &section)?;
            let path = format!("{section}.{key}");
            let r = &mut self.retention;
            match key {
                "enabled" => r.enabled = boolean(value, &path)?,
                "interval_ms" => r.options.interval_ms = positive(value, &path)?,
                "safe" => r.options.safe = boolean(value, &path)?,
                "idle_group_age_ms" => r.options.idle_group_age_ms = positive(value, &path)?,
                _ => return Err(unknown(&path)),
            }
        }
        self.retention
            .options
            .validate()
            .map_err(|e| match e.invalid_field() {
                Some(field) => {
                    let field = field.to_owned();
                    rename(e, format!("{section}.{field}"))
                }
                None => e,
            })
    }

    fn read_consumer(&mut self, value: &Value) -> Result<()> {
        let section = format!("{ROOT}.consumer");
        let mut direct = Binding::default();
        for (key, value) in mapping(value, &section)? {
            let key = key_str(key, &section)?;
            let path = format!("{section}.{key}");
            let o = &mut self.consumer.options;
            match key {
                "redis_url" => self.redis_url = redis_url(value, &path)?,
                "streams" => self.consumer.bindings = bindings(value, &path)?,
                "stream" | "stream_name" => direct.stream = Some(stream_name(value, &path)?),
                "group" => direct.group = Some(name(value, &path)?),
                "consumer" | "name" => direct.consumer = Some(name(value, &path)?),
                "block_ms" => o.block_ms = positive(value, &path)?,
                "count" => o.count = positive(value, &path)? as usize,
                "auto_ack" => o.auto_ack = boolean(value, &path)?,
                "use_redis_checkpoint" => o.use_redis_checkpoint = boolean(value, &path)?,
                "reclaim_enabled" => o.reclaim_enabled = boolean(value, &path)?,
                "reclaim_interval_ms" => o.reclaim_interval_ms = positive(value, &path)?,
                "reclaim_min_idle_ms" => o.reclaim_min_idle_ms = unsigned(value, &path)?,
                "create_group" => o.create_group = boolean(value, &path)?,
                "start_id" => o.start_id = string(value, &path)?,
                "max_deliveries" => o.max_deliveries = positive(value, &path)?,
                "lease_ttl_ms" => o.lease_ttl_ms = positive(value, &path)?,
                "ack_flush_interval_ms" => o.ack_flush_interval_ms = unsigned(value, &path)?,
                "max_entry_size" => o.max_entry_size = positive(value, &path)? as usize,
                "codec" => (o.wire_format, o.wire_settings) = codec(value, &path)?,
                _ => return Err(unknown(&path)),
            }
        }
        if direct != Binding::default() {
            self.consumer.bindings.insert(0, direct);
        }
        Ok(())
    }

    /// Checks what the options cannot check alone, naming the YAML key.
    fn validate(&self) -> Result<()> {
        let section = format!("{ROOT}.consumer");
        let o = &self.consumer.options;
        crate::pubsub::StartFrom::parse(&o.start_id).map_err(|e| rename(e, format!("{section}.start_id")))?;
        let probe = StreamConsumer::with_options(
            RedisConnection::new(&self.redis_url).map_err(|e| rename(e, format!("{ROOT}.url")))?,
            "probe",
            "probe",
            "probe",
            o.clone(),
        );
        probe.map(drop).map_err(|e| match e.invalid_field() {
            Some(field) => {
                let field = field.to_owned();
                rename(e, format!("{section}.{field}"))
            }
            None => e,
        })
    }
}

/// Gives an [`Error::Invalid`] the name of the key it came from.
fn rename(e: Error, field: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    match e {
        Error::Invalid { reason, .. } => Error::Invalid {
            field: field.into(),
            reason,
        },
        other => other,
    }
}

fn unknown(path: &str) -> Error {
    Error::invalid(path.to_owned(), "is not a known configuration key")
}

fn mapping<'a>(v: &'a Value, path: &str) -> Result<&'a Mapping> {
    v.as_mapping().ok_or_else(|| {
        Error::invalid(
            path.to_owned(),
            format_args!("must be a mapping, got {}", kind(v)),
        )
    })
}

fn key_str<'a>(key: &'a Value, path: &str) -> Result<&'a str> {
    key.as_str().ok_or_else(|| {
        Error::invalid(
            path.to_owned(),
            format_args!("has a key that is not a string: {key:?}"),
        )
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn string(v: &Value, path: &str) -> Result<String> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| Error::invalid(path.to_owned(), format_args!("must be a string, got {}", kind(v))))
}

fn name(v: &Value, path: &str) -> Result<String> {
    let s = string(v, path)?;
    validate_name("name", &s).map_err(|e| rename(e, path.to_owned()))?;
    Ok(s)
}

fn stream_name(v: &Value, path: &str) -> Result<String> {
    let s = string(v, path)?;
    validate_stream_name("name", &s).map_err(|e| rename(e, path.to_owned()))?;
    Ok(s)
}

fn redis_url(v: &Value, path: &str) -> Result<String> {
    let url = string(v, path)?;
    RedisConnection::new(&url).map_err(|e| rename(e, path.to_owned()))?;
    Ok(url)
}

fn unsigned(v: &Value, path: &str) -> Result<u64> {
    v.as_u64().ok_or_else(|| {
        Error::invalid(
            path.to_owned(),
            format_args!("must be a whole number ≥ 0, got {}", kind(v)),
        )
    })
}

fn positive(v: &Value, path: &str) -> Result<u64> {
    match unsigned(v, path)? {
        0 => Err(Error::invalid(path.to_owned(), "must be at least 1")),
        n => Ok(n),
    }
}

fn boolean(v: &Value, path: &str) -> Result<bool> {
    v.as_bool().ok_or_else(|| {
        Error::invalid(
            path.to_owned(),
            format_args!("must be true or false, got {}", kind(v)),
        )
    })
}

/// A layout: by name (`codec: natricine`), or a mapping of its name (`format`) and settings
/// (`event_type_key`, `fallback_event_type`, `fixed_event_type`, `uuid_field`,
/// `payload_field`, `metadata_field`), usable in this build.
fn codec(v: &Value, path: &str) -> Result<(WireFormat, WireSettings)> {
    let (format, settings) = match v {
        Value::Mapping(map) => {
            let mut format = None;
            let mut settings = WireSettings::default();
            for (key, value) in map {
                let key = key_str(key, path)?;
                let path = format!("{path}.{key}");
                let text = || match string(value, &path)? {
                    t if t.is_empty() => Err(Error::invalid(path.clone(), "must not be empty")),
                    t => Ok(Some(t)),
                };
                match key {
                    "format" => format = Some(wire_format(value, &path)?),
                    "event_type_key" => settings.event_type_key = text()?,
                    "fallback_event_type" => settings.fallback_event_type = text()?,
                    "fixed_event_type" => settings.fixed_event_type = text()?,
                    "uuid_field" => settings.uuid_field = text()?,
                    "payload_field" => settings.payload_field = text()?,
                    "metadata_field" => settings.metadata_field = text()?,
                    _ => return Err(unknown(&path)),
                }
            }
            let format = format.ok_or_else(|| {
                Error::invalid(
                    format!("{path}.format"),
                    "is missing: streamwise, natricine or watermill",
                )
            })?;
            (format, settings)
        }
        _ => (wire_format(v, path)?, WireSettings::default()),
    };
    // Checked now: a layout this build cannot write, or settings that do not fit it, are a
    // configuration error.
    format.codec_with(&settings).map_err(|e| rename_field(e, path))?;
    Ok((format, settings))
}

/// A layout by name (`streamwise`, `natricine`, `watermill`).
fn wire_format(v: &Value, path: &str) -> Result<WireFormat> {
    let name = v
        .as_str()
        .ok_or_else(|| Error::invalid(path.to_owned(), format_args!("must be a string, got {}", kind(v))))?;
    name.parse().map_err(|e: Error| rename_field(e, path))
}

/// `e` (an invalid value) reported under the configuration's `path`.
fn rename_field(e: Error, path: &str) -> Error {
    match e {
        Error::Invalid { reason, .. } => Error::invalid(path.to_owned(), reason),
        other => other,
    }
}

fn bindings(v: &Value, path: &str) -> Result<Vec<Binding>> {
    let list = v
        .as_sequence()
        .ok_or_else(|| Error::invalid(path.to_owned(), format_args!("must be a list, got {}", kind(v))))?;
    list.iter()
        .enumerate()
        .map(|(i, item)| {
            let item_path = format!("{path}[{i}]");
            let mut b = Binding::default();
            for (key, value) in mapping(item, &item_path)? {
                let key = key_str(key, &item_path)?;
                let path = format!("{item_path}.{key}");
                match key {
                    "name" | "stream" => b.stream = Some(stream_name(value, &path)?),
                    "group" => b.group = Some(name(value, &path)?),
                    "consumer" => b.consumer = Some(name(value, &path)?),
                    _ => return Err(unknown(&path)),
                }
            }
            Ok(b)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUICKSTART: &str = r#"
redis_streams:
  url: "redis://localhost:6379"

  producer:
    stream: "events"
    max_length: 10000

  consumer:
    group: "my-group"
    block_ms: 5000
    count: 10
"#;

    const CONTRACT: &str = r#"
redis_streams:
  producer:
    redis_url: "redis://localhost:6380"
    stream_name: "events"
    max_length: 500
    auto_create_stream: false

  consumer:
    redis_url: "redis://localhost:6380"
    streams:
      - name: "events"
        group: "my-group"
        consumer: "consumer-1"
      - name: "audit"
        group: "auditors"
        consumer: "consumer-2"
    block_ms: 2000
    count: 20
    auto_ack: true
"#;

    fn vars(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn the_quickstart_shape_loads() {
        let c = Config::from_yaml_str(QUICKSTART).unwrap();
        assert_eq!(c.redis_url, "redis://localhost:6379");
        assert_eq!(c.producer.stream.as_deref(), Some("events"));
        assert_eq!(c.producer.options.max_length, 10_000);
        assert_eq!(c.consumer.options.block_ms, 5000);
        assert_eq!(c.consumer.options.count, 10);
        let err = c.consumer_binding(0).unwrap_err();
        assert_eq!(
            err.invalid_field(),
            Some("redis_streams.consumer.streams[0].consumer")
        );
        let c = c.overlay_vars(vars(&[("CONSUMER_NAME", "worker-1")])).unwrap();
        let b = c.consumer_binding(0).unwrap();
        assert_eq!(
            (b.stream.as_str(), b.group.as_str(), b.consumer.as_str()),
            ("events", "my-group", "worker-1")
        );
    }

    #[test]
    fn the_contract_shape_loads() {
        let c = Config::from_yaml_str(CONTRACT).unwrap();
        assert_eq!(c.redis_url, "redis://localhost:6380");
        assert_eq!(c.producer.options.max_length, 500);
        assert!(!c.producer.options.auto_create_stream);
        assert!(c.consumer.options.auto_ack);
        assert_eq!(c.consumer.options.count, 20);
        assert_eq!(c.consumer.bindings.len(), 2);
        let second = c.consumer_binding(1).unwrap();
        assert_eq!(
            (second.stream.as_str(), second.group.as_str()),
            ("audit", "auditors")
        );
    }

    #[test]
    fn defaults_apply_where_yaml_is_silent() {
        let c = Config::from_yaml_str("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.redis_url, DEFAULT_REDIS_URL);
        assert_eq!(c.producer.options, ProducerOptions::default());
        assert_eq!(c.consumer.options, ConsumerOptions::default());
    }

    #[test]
    fn the_environment_wins_over_yaml_and_code_wins_over_both() {
        let env = vars(&[
            ("REDIS_URL", "redis://cache:6379"),
            ("STREAM_NAME", "orders"),
            ("CONSUMER_GROUP", "billing"),
            ("CONSUMER_NAME", "w-2"),
        ]);
        let mut c = Config::from_yaml_str(CONTRACT)
            .unwrap()
            .overlay_vars(env)
            .unwrap();
        assert_eq!(c.redis_url, "redis://cache:6379");
        assert_eq!(c.producer.stream.as_deref(), Some("orders"));
        let first = c.consumer_binding(0).unwrap();
        assert_eq!(
            (
                first.stream.as_str(),
                first.group.as_str(),
                first.consumer.as_str()
            ),
            ("orders", "billing", "w-2")
        );
        assert_eq!(
            c.consumer_binding(1).unwrap().stream,
            "audit",
            "only the first binding is overlaid"
        );
        c.consumer.options.count = 3;
        assert_eq!(c.consumer.options.count, 3);
    }

    #[test]
    fn oversized_or_deeply_nested_text_is_refused_before_parsing() {
        let started = std::time::Instant::now();
        for yaml in [
            format!("redis_streams: {}{}", "[".repeat(64_000), "]".repeat(64_000)),
            format!("a: {}", "{b: ".repeat(200_000)),
            (0..40).map(|i| format!("{}k{i}:\n", " ".repeat(i))).collect(),
            format!("redis_streams:\n  {}x", "- ".repeat(40)),
            format!("# {}\n", "x".repeat(MAX_CONFIG_BYTES)),
        ] {
            let err = Config::from_yaml_str(&yaml).unwrap_err();
            assert_eq!(err.invalid_field(), Some("config"), "{err}");
        }
        // A linear scan, not a parse: well under a second for all of them, even in debug.
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // Brackets inside quotes and comments do not count; real configs pass.
        let quoted = format!(
            "redis_streams:\n  url: \"redis://h/{}\"  # {}\n",
            "[".repeat(40),
            "{".repeat(40)
        );
        assert_eq!(
            Config::from_yaml_str(&quoted).unwrap_err().invalid_field(),
            Some("redis_streams.url")
        );
        Config::from_yaml_str(CONTRACT).unwrap();
        Config::from_yaml_str(QUICKSTART).unwrap();
    }

    #[test]
    fn every_consumer_option_has_a_key() {
        let yaml = "redis_streams:\n  consumer:\n    group: g\n    lease_ttl_ms: 1500\n    ack_flush_interval_ms: 20\n    max_entry_size: 4096\n    max_deliveries: 3\n";
        let o = Config::from_yaml_str(yaml).unwrap().consumer.options;
        assert_eq!(
            (
                o.lease_ttl_ms,
                o.ack_flush_interval_ms,
                o.max_entry_size,
                o.max_deliveries
            ),
            (1500, 20, 4096, 3)
        );
    }

    #[test]
    fn the_retention_section_sets_every_knob() {
        let off = Config::from_yaml_str("redis_streams:\n  producer:\n    stream: s\n").unwrap();
        assert_eq!(off.retention, RetentionConfig::default());
        assert!(!off.retention.enabled);
        let yaml = "redis_streams:\n  retention:\n    enabled: true\n    interval_ms: 250\n    safe: false\n    idle_group_age_ms: 60000\n";
        let r = Config::from_yaml_str(yaml).unwrap().retention;
        assert_eq!(
            r,
            RetentionConfig {
                enabled: true,
                options: RetentionOptions {
                    interval_ms: 250,
                    safe: false,
                    idle_group_age_ms: 60_000,
                },
            }
        );
        for (yaml, key) in [
            (
                "redis_streams:\n  retention:\n    interval_ms: 50",
                "redis_streams.retention.interval_ms",
            ),
            (
                "redis_streams:\n  retention:\n    idle_group_age_ms: 0",
                "redis_streams.retention.idle_group_age_ms",
            ),
            (
                "redis_streams:\n  retention:\n    enabled: yes please",
                "redis_streams.retention.enabled",
            ),
            (
                "redis_streams:\n  retention:\n    safety: true",
                "redis_streams.retention.safety",
            ),
            ("redis_streams:\n  retention: 5", "redis_streams.retention"),
        ] {
            let err = Config::from_yaml_str(yaml).unwrap_err();
            assert_eq!(err.invalid_field(), Some(key), "{yaml}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_named_in_full() {
        let cases = [
            ("other: 1", "other"),
            ("redis_streams:\n  urll: x", "redis_streams.urll"),
            (
                "redis_streams:\n  producer:\n    max_lenght: 5",
                "redis_streams.producer.max_lenght",
            ),
            (
                "redis_streams:\n  consumer:\n    blok_ms: 5",
                "redis_streams.consumer.blok_ms",
            ),
            (
                "redis_streams:\n  consumer:\n    streams:\n      - nme: x",
                "redis_streams.consumer.streams[0].nme",
            ),
        ];
        for (yaml, key) in cases {
            let err = Config::from_yaml_str(yaml).unwrap_err();
            assert_eq!(err.invalid_field(), Some(key), "{yaml}: {err}");
            assert!(err.to_string().contains("not a known configuration key"), "{err}");
        }
    }

    #[test]
    fn bad_values_are_named_in_full() {
        let cases = [
            ("redis_streams:\n  url: 'http://x'", "redis_streams.url"),
            (
                "redis_streams:\n  producer:\n    max_length: 0",
                "redis_streams.producer.max_length",
            ),
            (
                "redis_streams:\n  producer:\n    max_length: -3",
                "redis_streams.producer.max_length",
            ),
            (
                "redis_streams:\n  producer:\n    stream: 'bad name'",
                "redis_streams.producer.stream",
            ),
            (
                "redis_streams:\n  producer:\n    auto_create_stream: maybe",
                "redis_streams.producer.auto_create_stream",
            ),
            (
                "redis_streams:\n  consumer:\n    block_ms: fast",
                "redis_streams.consumer.block_ms",
            ),
            (
                "redis_streams:\n  consumer:\n    count: 0",
                "redis_streams.consumer.count",
            ),
            (
                "redis_streams:\n  producer:\n    max_length: 18446744073709551615",
                "redis_streams.producer.max_length",
            ),
            (
                "redis_streams:\n  consumer:\n    lease_ttl_ms: 5",
                "redis_streams.consumer.lease_ttl_ms",
            ),
            (
                "redis_streams:\n  consumer:\n    ack_flush_interval_ms: 60000",
                "redis_streams.consumer.ack_flush_interval_ms",
            ),
            (
                "redis_streams:\n  consumer:\n    max_entry_size: 0",
                "redis_streams.consumer.max_entry_size",
            ),
            (
                "redis_streams:\n  consumer:\n    count: 99999999",
                "redis_streams.consumer.count",
            ),
            (
                "redis_streams:\n  consumer:\n    start_id: later",
                "redis_streams.consumer.start_id",
            ),
            (
                "redis_streams:\n  consumer:\n    streams: events",
                "redis_streams.consumer.streams",
            ),
            (
                "redis_streams:\n  consumer:\n    streams:\n      - group: 'a b'",
                "redis_streams.consumer.streams[0].group",
            ),
            ("redis_streams: [1]", "redis_streams"),
            (
                "redis_streams:\n  consumer:\n    reclaim_enabled: true\n    reclaim_interval_ms: 0",
                "redis_streams.consumer.reclaim_interval_ms",
            ),
        ];
        for (yaml, key) in cases {
            let err = Config::from_yaml_str(yaml).unwrap_err();
            assert_eq!(err.invalid_field(), Some(key), "{yaml}: {err}");
        }
        let err = Config::from_yaml_str("redis_streams: {").unwrap_err();
        assert_eq!(err.invalid_field(), Some("config"));
    }

    #[test]
    fn bad_environment_values_name_the_variable() {
        for (name, value) in [
            ("REDIS_URL", "nope"),
            ("STREAM_NAME", "a b"),
            ("CONSUMER_GROUP", ""),
            ("CONSUMER_NAME", "x/y"),
        ] {
            let lookup = move |n: &str| (n == name).then(|| value.to_owned());
            let err = Config::default().overlay_vars(lookup).unwrap_err();
            assert_eq!(err.invalid_field(), Some(name), "{name}={value:?}: {err}");
        }
    }

    #[test]
    fn files_load_and_missing_files_say_so() {
        let dir = std::env::temp_dir().join(format!("streamwise-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("streams.yaml");
        std::fs::write(&path, QUICKSTART).unwrap();
        assert_eq!(
            Config::from_yaml_file(&path).unwrap().producer.stream.as_deref(),
            Some("events")
        );
        let err = Config::from_yaml_file(dir.join("absent.yaml")).unwrap_err();
        assert_eq!(err.invalid_field(), Some("config"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn producers_and_consumers_are_built_from_config() {
        let c = Config::from_yaml_str(CONTRACT).unwrap();
        let producer = c.stream_producer().unwrap();
        assert_eq!(producer.stream_name(), "events");
        let consumer = c.stream_consumer(1).unwrap();
        assert!(consumer.options().auto_ack);
        let err = Config::default().stream_producer().unwrap_err();
        assert_eq!(err.invalid_field(), Some("redis_streams.producer.stream"));
    }
}
