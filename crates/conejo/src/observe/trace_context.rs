//! W3C trace-context propagation (feature `opentelemetry`): a delivery's span continues the
//! trace named by the message's `traceparent`/`tracestate` headers, and the copies conejo
//! republishes (retries, dead letters) carry the delivery span's own context, so that the
//! next attempt is its child. Both go through OpenTelemetry's global propagator (set it
//! with `opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new())`);
//! without the feature, the headers are copied unchanged.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use opentelemetry::propagation::{Extractor, Injector};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Reads string headers for the propagator.
struct HeaderExtractor<'a>(&'a FieldTable);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.inner().get(key)? {
            AMQPValue::LongString(value) => std::str::from_utf8(value.as_bytes()).ok(),
            AMQPValue::ShortString(value) => Some(value.as_str()),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(ShortString::as_str).collect()
    }
}

/// Writes the propagator's fields as string headers.
struct HeaderInjector<'a>(&'a mut FieldTable);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0
            .insert(key.into(), AMQPValue::LongString(LongString::from(value)));
    }
}

/// Makes `span` a child of the trace context in `headers`, if they hold one.
pub(crate) fn adopt_parent(span: &Span, headers: Option<&FieldTable>) {
    let Some(headers) = headers else { return };
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    });
    // Fails only when no OpenTelemetry layer is installed: nothing to propagate then.
    let _ = span.set_parent(parent);
}

/// Writes the current span's trace context into `headers` (replacing the parent's).
pub(crate) fn inject_current(headers: &mut FieldTable) {
    let context = Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut HeaderInjector(headers));
    });
}
