//! The Redis protocol, in one home: what the server sends back, and what it means.
//!
//! - [`resp`] scans RESP2 frames as they arrive on a connection of one's own
//!   ([`DedicatedConnection`](super::dedicated::DedicatedConnection)) and parses stream replies
//!   straight from the frame's bytes.
//! - [`replies`] turns replies that redis-rs parsed ([`redis::Value`]) into typed rows
//!   (entries, pending rows, `XINFO` records, claim results), and error replies into
//!   [`Error::Server`](crate::Error::Server).
//!
//! They sit side by side because they know the same reply shapes: an `XREADGROUP` reply is
//! parsed by one or the other (depending on the connection it came on) into the same
//! [`ReplyEntry`](replies::ReplyEntry), and the tests of [`resp`] check that both agree.
//! Nothing outside this module looks inside a reply.

pub(crate) mod replies;
pub(crate) mod resp;
