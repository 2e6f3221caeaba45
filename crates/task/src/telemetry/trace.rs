//! W3C trace context across the fan-out: an event's `trace_headers`
//! (`traceparent`, `tracestate`) become the parent of its dispatch span, and
//! each push to a gateway carries the context of that span onwards, so a
//! trace continues from the publisher through the task pod to the gateway.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Makes `span` a child of the context in `headers`, if there is one.
pub fn continue_from(span: &tracing::Span, headers: &HashMap<String, String>) {
    if headers.is_empty() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(headers);
    let _ = span.set_parent(parent);
}

/// The W3C headers naming `span` as the parent of what comes next.
pub fn headers_of(span: &tracing::Span) -> HashMap<String, String> {
    let mut out = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut out);
    out
}

/// The trace id in a `traceparent` header (`00-<trace>-<span>-<flags>`).
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (_version, trace) = (parts.next()?, parts.next()?);
    (trace.len() == 32).then_some(trace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_parse() {
        assert_eq!(
            trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id("garbage"), None);
    }
}
