//! The one error type of streamwise, with a kind per failure the seeds name, and the small
//! error of settling a delivery ([`SettleError`]).

use std::borrow::Cow;
use std::fmt;

use std::time::Duration;

use crate::entry_id::{EntryId, ParseEntryIdError};

/// Shorthand for `std::result::Result<T, streamwise::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in streamwise.
///
/// The variants map onto the errors of the seed contract: `StreamNotFoundError` is
/// [`Error::StreamNotFound`], `GroupNotFoundError` is [`Error::GroupNotFound`],
/// `PayloadTooLargeError` is [`Error::PayloadTooLarge`], `RedisConnectionError` is
/// [`Error::Connection`] and `ConsumerCrashedError` is [`Error::ConsumerCrashed`].
/// Bad input is always [`Error::Invalid`], naming the field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The stream does not exist and the operation may not create it.
    #[error("stream `{stream}` not found")]
    StreamNotFound {
        /// The stream that was asked for.
        stream: String,
    },

    /// The consumer group does not exist on the stream.
    #[error("consumer group `{group}` not found on stream `{stream}`")]
    GroupNotFound {
        /// The stream the group was looked up on.
        stream: String,
        /// The group that was asked for.
        group: String,
    },

    /// The encoded entry is larger than the configured limit; nothing was written.
    #[error("payload too large: the encoded entry is {size} bytes, the limit is {limit} bytes")]
    PayloadTooLarge {
        /// Size of the encoded entry in bytes.
        size: usize,
        /// The limit in force, in bytes.
        limit: usize,
    },

    /// The backend could not be reached, after all retries.
    #[error("connection error: {message}")]
    Connection {
        /// What failed. Never contains credentials.
        message: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<BoxError>,
    },

    /// A consumer stopped renewing its lease while it still held pending entries.
    #[error(
        "consumer `{consumer}` in group `{group}` on stream `{stream}` crashed with {pending} pending entries"
    )]
    ConsumerCrashed {
        /// The stream.
        stream: String,
        /// The consumer group.
        group: String,
        /// The consumer whose lease expired.
        consumer: String,
        /// How many entries it still held.
        pending: u64,
    },

    /// Another live consumer already uses this name in this group.
    #[error("consumer `{consumer}` is already active in group `{group}` on stream `{stream}`")]
    ConsumerActive {
        /// The stream.
        stream: String,
        /// The consumer group.
        group: String,
        /// The name that is taken.
        consumer: String,
    },

    /// The consumers are too far behind: the group's lag is above the producer's limit.
    #[error(
        "backpressure: group `{group}` on stream `{stream}` is {lag} entries behind, the limit is {limit}"
    )]
    Backpressure {
        /// The stream.
        stream: String,
        /// The consumer group watched.
        group: String,
        /// Its lag when the producer gave up.
        lag: u64,
        /// The producer's limit.
        limit: u64,
    },

    /// Fewer replicas than asked (the Redis `PublisherOptions::wait_replicas`) acknowledged a
    /// publish in time. The entries were written on the master, under `ids`: they may still
    /// replicate, or be lost if the master fails before they do.
    #[error(
        "publish to `{stream}` acknowledged by {acknowledged} of {wanted} replicas in time; the entries exist on the master"
    )]
    NotReplicated {
        /// The stream.
        stream: String,
        /// The entries written on the master.
        ids: Vec<EntryId>,
        /// Replicas that acknowledged them in time.
        acknowledged: u64,
        /// Replicas asked for.
        wanted: u64,
    },

    /// A partitioned topic was asked for with another partition count than the one stored
    /// with it. The count of a topic never changes: its keys would move to other partitions.
    #[error("topic `{topic}` has {stored} partitions, not {requested}")]
    PartitionMismatch {
        /// The topic.
        topic: String,
        /// The count stored with the topic.
        stored: u32,
        /// The count asked for.
        requested: u32,
    },

    /// A plain publish or subscribe named a partitioned topic, whose entries live in its
    /// partition streams: use [`crate::partition::PartitionedPublisher`] and
    /// [`crate::partition::PartitionedSubscriber`].
    #[error(
        "topic `{topic}` is partitioned ({partitions} partitions); publish and subscribe to it through the partition module"
    )]
    Partitioned {
        /// The topic.
        topic: String,
        /// Its partition count.
        partitions: u32,
    },

    /// An argument or setting is not acceptable.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The parameter, option or configuration key at fault.
        field: Cow<'static, str>,
        /// Why it was refused.
        reason: String,
    },

    /// Settling a delivery was refused (already settled, a nack delay too long, the
    /// subscription closed); see [`SettleError`].
    #[error(transparent)]
    Settle(#[from] SettleError),

    /// A payload or entry could not be decoded.
    #[error("cannot decode {what}: {reason}")]
    Decode {
        /// What was being decoded (for example `payload` or `entry 1-0`).
        what: Cow<'static, str>,
        /// Why it failed.
        reason: String,
    },

    /// A value could not be serialized into a payload.
    #[error("cannot encode payload: {0}")]
    Encode(#[source] serde_json::Error),

    /// The publisher, subscriber or subscription was closed.
    #[error("{0} is closed")]
    Closed(&'static str),

    /// A subscription ended by itself while the router ran (its consumer lost its lease to
    /// another process, say, or the subscriber was closed from outside): the router stopped,
    /// so that the process exits and is restarted rather than stay up doing nothing.
    #[error("subscription to `{topic}` ended: {reason}")]
    SubscriptionEnded {
        /// The topic of the subscription.
        topic: String,
        /// What ended it.
        reason: String,
        /// The error the subscription reported last, if any.
        #[source]
        source: Option<Box<Error>>,
    },

    /// The server refused a command with an error reply: an ACL refusal (`NOPERM`), memory
    /// full (`OOM`), a key of another type (`WRONGTYPE`), a script's own error, ... A retry
    /// would meet the same refusal, so none is made. [`Error::server_code`] reads the code.
    ///
    /// ```
    /// let err = streamwise::Error::Server {
    ///     command: "XADD".into(),
    ///     code: "NOPERM".into(),
    ///     message: "User alice has no permissions to access the 'payments' key".into(),
    /// };
    /// assert_eq!(err.server_code(), Some("NOPERM"));
    /// assert_eq!(
    ///     err.to_string(),
    ///     "the server refused XADD: NOPERM User alice has no permissions to access the 'payments' key"
    /// );
    /// ```
    #[error("the server refused {command}: {code}{}{message}", if .message.is_empty() { "" } else { " " })]
    Server {
        /// What was sent: the command, or what a script was for (a script's error reply
        /// names only its SHA).
        command: String,
        /// The error code, the first word of the error reply (`NOPERM`, `OOM`, `ERR`, ...).
        code: String,
        /// The rest of the error reply. (The client library's error is not kept: it says
        /// nothing more.)
        message: String,
    },

    /// The backend does not offer this operation (a provided trait method it leaves as is).
    #[error("this backend does not support {0}")]
    Unsupported(&'static str),
}

/// Why settling a delivery was refused. Nothing was recorded; only [`AlreadySettled`]
/// means the delivery had been settled (before).
///
/// It converts into [`Error::Settle`], so `?` works in functions that
/// return [`crate::Result`].
///
/// [`AlreadySettled`]: SettleError::AlreadySettled
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SettleError {
    /// The delivery was already acked, nacked or dead-lettered; settling again does nothing.
    #[error("delivery {id} was already settled")]
    AlreadySettled {
        /// The entry id of the delivery.
        id: EntryId,
    },
    /// A nack delay longer than [`MAX_NACK_DELAY`](crate::MAX_NACK_DELAY); the delivery
    /// stays unsettled.
    #[error("invalid delay: {delay:?} is longer than the longest nack delay, {longest:?}")]
    DelayTooLong {
        /// The delay asked for.
        delay: Duration,
        /// The longest accepted.
        longest: Duration,
    },
    /// The subscription (or its subscriber) was closed before the settlement: the entry
    /// stays pending and is delivered again.
    #[error("the subscription of delivery {id} is closed; the entry stays pending")]
    Closed {
        /// The entry id of the delivery.
        id: EntryId,
    },
}

impl From<ParseEntryIdError> for Error {
    fn from(e: ParseEntryIdError) -> Self {
        Error::invalid(
            "id",
            format_args!("{:?} is not an entry id of the form <ms>-<seq>", e.input()),
        )
    }
}

/// A boxed error that can cross threads.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

impl Error {
    /// A validation error naming `field`.
    ///
    /// ```
    /// let err = streamwise::Error::invalid("event_type", "must not be empty");
    /// assert_eq!(err.to_string(), "invalid event_type: must not be empty");
    /// ```
    pub fn invalid(field: impl Into<Cow<'static, str>>, reason: impl fmt::Display) -> Self {
        Error::Invalid {
            field: field.into(),
            reason: reason.to_string(),
        }
    }

    /// A connection error with a message and an optional cause.
    pub fn connection(message: impl Into<String>, source: Option<BoxError>) -> Self {
        Error::Connection {
            message: message.into(),
            source,
        }
    }

    /// The server's error code (`NOPERM`, `OOM`, `WRONGTYPE`, ...), if this is an
    /// [`Error::Server`].
    pub fn server_code(&self) -> Option<&str> {
        match self {
            Error::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The field named by an [`Error::Invalid`] (or the `delay` of a
    /// [`SettleError::DelayTooLong`]), if this is one.
    pub fn invalid_field(&self) -> Option<&str> {
        match self {
            Error::Invalid { field, .. } => Some(field),
            Error::Settle(SettleError::DelayTooLong { .. }) => Some("delay"),
            _ => None,
        }
    }
}

/// Checks a stream or group or consumer name against `[A-Za-z0-9_-]+`.
///
/// `field` names the parameter in the error.
///
/// ```
/// use streamwise::validate_name;
/// assert!(validate_name("stream", "data-updates").is_ok());
/// let err = validate_name("stream", "bad name").unwrap_err();
/// assert_eq!(err.invalid_field(), Some("stream"));
/// ```
pub fn validate_name(field: &'static str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(Error::invalid(
            field,
            format_args!("{name:?} contains {bad:?}; only A-Z, a-z, 0-9, '-' and '_' are allowed"),
        ));
    }
    Ok(())
}

/// Checks a stream or topic name: [`validate_name`]'s characters, plus at most one Redis
/// Cluster hash tag `{tag}` (the tag itself of those characters, non-empty, with more of the
/// name outside the braces).
///
/// Every key streamwise keeps beside a stream carries the stream's hash tag (see
/// [`crate::redis`]), so that one script can touch them all on a cluster. A name with a tag
/// of its own, such as the dead-letter stream `{orders}-dead`, puts the stream in the slot of
/// that tag.
///
/// ```
/// use streamwise::validate_stream_name;
/// assert!(validate_stream_name("stream", "orders").is_ok());
/// assert!(validate_stream_name("stream", "{orders}-dead").is_ok());
/// for bad in ["{orders}", "{}-x", "{a}{b}", "a{b", "a}b", "a.b"] {
///     assert!(validate_stream_name("stream", bad).is_err(), "{bad}");
/// }
/// ```
pub fn validate_stream_name(field: &'static str, name: &str) -> Result<()> {
    let Some(open) = name.find('{') else {
        if name.contains('}') {
            return Err(Error::invalid(
                field,
                format_args!("{name:?} has a '}}' without a '{{'"),
            ));
        }
        return validate_plain_stream(field, name);
    };
    let tagged = || {
        let close = open + name[open..].find('}')?;
        let (before, tag, after) = (&name[..open], &name[open + 1..close], &name[close + 1..]);
        let plain = |s: &str| !s.contains(['{', '}']);
        (plain(before) && plain(after) && !tag.contains('{') && (!before.is_empty() || !after.is_empty()))
            .then_some((before, tag, after))
    };
    let Some((before, tag, after)) = tagged() else {
        return Err(Error::invalid(
            field,
            format_args!(
                "{name:?} is not a stream name: at most one hash tag '{{tag}}', and more of the name outside it"
            ),
        ));
    };
    validate_plain_stream(field, tag)?;
    for part in [before, after].into_iter().filter(|p| !p.is_empty()) {
        validate_name(field, part)?;
    }
    Ok(())
}

/// A stream name without hash tag: a [`validate_name`] name, or a partition stream of one
/// (`orders~p3`, see [`crate::partition`]).
fn validate_plain_stream(field: &'static str, name: &str) -> Result<()> {
    if split_partition_stream(name).is_some() {
        return Ok(());
    }
    validate_name(field, name)
}

/// The topic and partition number of a partition stream's name (`orders~p3`), when it is one:
/// a [`validate_name`] topic, `~p`, and the number in its one decimal spelling.
pub(crate) fn split_partition_stream(stream: &str) -> Option<(&str, u32)> {
    let (topic, number) = stream.rsplit_once("~p")?;
    let partition: u32 = number.parse().ok()?;
    (partition.to_string() == number && validate_name("topic", topic).is_ok()).then_some((topic, partition))
}

/// The Redis Cluster hash tag of `key`, as the server finds it: the text between the first
/// `{` and the first `}` after it, when that text is not empty.
pub(crate) fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let len = key[open + 1..].find('}')?;
    (len > 0).then(|| &key[open + 1..open + 1 + len])
}

/// Checks that an event type is a non-empty string.
pub fn validate_event_type(event_type: &str) -> Result<()> {
    if event_type.is_empty() {
        return Err(Error::invalid("event_type", "must not be empty"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_stream_name_rule() {
        for good in ["a", "data-updates", "A_b-9"] {
            assert!(validate_name("stream", good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "a.b", "ü", "a:b", "a/b"] {
            let err = validate_name("group", bad).unwrap_err();
            assert_eq!(err.invalid_field(), Some("group"), "{bad}");
        }
    }

    #[test]
    fn stream_names_may_carry_one_hash_tag() {
        for good in ["a", "orders", "{orders}-dead", "x{orders}", "p-{o_1}-3"] {
            assert!(validate_stream_name("stream", good).is_ok(), "{good}");
        }
        for bad in [
            "", "{orders}", "{}x", "{a}{b}x", "a{b", "a}b", "{a.b}x", "{a}.b", "a{{b}}",
        ] {
            let err = validate_stream_name("topic", bad).unwrap_err();
            assert_eq!(err.invalid_field(), Some("topic"), "{bad}");
        }
    }

    #[test]
    fn the_hash_tag_is_what_redis_hashes() {
        assert_eq!(hash_tag("streamwise:meta:{orders}"), Some("orders"));
        assert_eq!(hash_tag("{orders}-dead"), Some("orders"));
        assert_eq!(hash_tag("orders"), None);
        assert_eq!(hash_tag("a{}b{c}"), None);
        assert_eq!(hash_tag("a}b{c}"), Some("c"));
    }

    #[test]
    fn event_type_must_not_be_empty() {
        assert!(validate_event_type("price.update").is_ok());
        let err = validate_event_type("").unwrap_err();
        assert_eq!(err.invalid_field(), Some("event_type"));
    }

    #[test]
    fn error_messages_are_readable() {
        let err = Error::PayloadTooLarge {
            size: 2_000_000,
            limit: 1_048_576,
        };
        assert_eq!(
            err.to_string(),
            "payload too large: the encoded entry is 2000000 bytes, the limit is 1048576 bytes"
        );
    }
}
