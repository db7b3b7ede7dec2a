//! Trace context across services (the `opentelemetry` feature): a publish opens a PRODUCER
//! span `publish <topic>` and writes its W3C trace context (`traceparent`, `tracestate`) into
//! the message's metadata; the router opens a CONSUMER span `process <topic>` for each
//! delivery, whose parent is that context (or which links to it,
//! [`Router::trace_links`](crate::router::Router::trace_links)). The handler, and every
//! message it publishes, run inside it, so a command and the events it causes stay in one
//! trace. Spans are `tracing` spans: the application installs `tracing-opentelemetry`'s layer
//! with the tracer provider it wants, and a text map propagator
//! (`opentelemetry::global::set_text_map_propagator`, usually `TraceContextPropagator`).
//!
//! Attributes follow the OpenTelemetry messaging conventions: `messaging.system` (`redis`,
//! `memory` for the in-memory backend; [`Origin::system`](crate::delivery::Origin::system)),
//! `messaging.destination.name`, `messaging.consumer.group.name`, `messaging.message.id`,
//! `messaging.operation.type` (`send`, `process`).

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::message::{Message, Metadata};

/// The metadata key of the W3C trace parent.
pub const TRACEPARENT: &str = "traceparent";
/// The metadata key of the W3C trace state.
pub const TRACESTATE: &str = "tracestate";

struct MetadataInjector<'a>(&'a mut Metadata);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

struct MetadataExtractor<'a>(&'a Metadata);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k).collect()
    }
}

/// The PRODUCER span of a publish to `topic` of messaging system `system`.
pub(crate) fn publish_span(system: &'static str, topic: &str) -> tracing::Span {
    tracing::info_span!(
        "publish",
        otel.name = %format_args!("publish {topic}"),
        otel.kind = "producer",
        messaging.system = system,
        messaging.destination.name = %topic,
        messaging.operation.type = "send",
    )
}

/// Writes the trace context of `span` into the metadata of `messages`.
pub(crate) fn inject(span: &tracing::Span, messages: &mut [Message]) {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    opentelemetry::global::get_text_map_propagator(|propagator| {
        for message in messages.iter_mut() {
            propagator.inject_context(&cx, &mut MetadataInjector(message.metadata_mut()));
        }
    });
}

/// The CONSUMER span of handling `message`, delivered as `id` from `topic` to `group`; its
/// parent is the trace context in the message's metadata, or with `link` a link to it.
pub(crate) fn process_span(
    system: &'static str,
    topic: &str,
    group: &str,
    id: &str,
    message: &Message,
    link: bool,
) -> tracing::Span {
    let span = tracing::info_span!(
        "process",
        otel.name = %format_args!("process {topic}"),
        otel.kind = "consumer",
        messaging.system = system,
        messaging.destination.name = %topic,
        messaging.consumer.group.name = %group,
        messaging.message.id = %id,
        messaging.operation.type = "process",
    );
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&MetadataExtractor(message.metadata()))
    });
    let remote = parent.span().span_context().clone();
    if remote.is_valid() {
        if link {
            span.add_link(remote);
        } else if let Err(e) = span.set_parent(parent) {
            tracing::debug!(error = %e, "the delivery's trace context could not be its span's parent");
        }
    }
    span
}
