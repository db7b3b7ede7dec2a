//! Middleware for streamwise handlers, one module per middleware, each behind a cargo feature
//! (in the manner of tower-http next to axum).
//!
//! The router and its middleware are built in a later step; for now this crate holds the
//! conventions every middleware follows.

/// The name of the dead-letter stream of `stream`: `<stream>-dead` (the same rule as the
/// backends, [`streamwise::dead_letter::stream_for`]).
///
/// ```
/// assert_eq!(streamwise_middleware::dead_letter_stream("orders"), "orders-dead");
/// ```
pub fn dead_letter_stream(stream: &str) -> String {
    streamwise::dead_letter::stream_for(stream)
}

#[cfg(test)]
mod tests {
    #[test]
    fn dead_letter_stream_names_are_valid_stream_names() {
        let name = super::dead_letter_stream("data-updates");
        assert_eq!(name, "data-updates-dead");
        assert!(streamwise::validate_name("stream", &name).is_ok());
    }
}
