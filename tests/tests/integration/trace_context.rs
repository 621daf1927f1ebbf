//! W3C trace-context propagation (feature `opentelemetry`), against a real broker: the
//! span of a delivery continues the trace of the message's `traceparent`, and its retry's
//! span is a child of the failed attempt's span, through the `traceparent` conejo writes on
//! the retry copy.

use std::time::Duration;

use conejo::{
    Conejo, Context, HandlerError, QueueConfig, RetryPolicy, handler_fn,
    types::{AMQPValue, BasicProperties, FieldTable},
};
use conejo_tests::{Broker, RunningService, amqp_url, unique_name};
use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    trace::{InMemorySpanExporter, SdkTracerProvider},
};
use tracing_subscriber::layer::SubscriberExt;

const WAIT: Duration = Duration::from_secs(30);
const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT_ID: &str = "b7ad6b7169203331";

#[test]
fn a_delivery_continues_the_trace_of_its_message_and_its_retry_continues_it() -> anyhow::Result<()>
{
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("conejo-tests")));
    // One thread: conejo's delivery tasks run where this subscriber is the default.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let queue = unique_name("traced");
    tracing::subscriber::with_default(subscriber, || {
        runtime.block_on(async {
            let broker = Broker::connect().await?;
            broker.declare_queue(&queue).await?;
            let mut headers = FieldTable::default();
            headers.insert(
                "traceparent".into(),
                AMQPValue::LongString(format!("00-{TRACE_ID}-{PARENT_ID}-01").into()),
            );
            broker
                .publish_with_properties(
                    &queue,
                    b"traced",
                    BasicProperties::default().with_headers(headers),
                )
                .await?;
            broker.publish_bytes(&queue, b"untraced").await?;
            // Fails its first attempt, then succeeds.
            let handler = handler_fn(|text: String, ctx: Context| async move {
                if text == "traced" && ctx.attempt() == 1 {
                    return Err(HandlerError::retry("not yet"));
                }
                Ok(())
            });
            let retries = RetryPolicy::default()
                .initial_delay(Duration::from_millis(100))
                .jitter(0.0);
            let service = RunningService::spawn(
                Conejo::builder(amqp_url())
                    .queue_with(
                        &queue,
                        handler,
                        QueueConfig::new().durable(false).retry(retries),
                    )
                    .build()?,
            );
            service
                .wait_for(&queue, WAIT, |s| s.acked == 3 && s.retried == 1)
                .await?;
            service.stop().await??;
            broker.delete_consumed_queue(&queue).await
        })
    })?;
    provider.force_flush()?;

    let spans: Vec<_> = exporter
        .get_finished_spans()?
        .into_iter()
        .filter(|span| span.name == "delivery")
        .collect();
    assert_eq!(spans.len(), 3, "one span per delivery: {spans:#?}");
    let trace = TraceId::from_hex(TRACE_ID)?;
    let traced: Vec<_> = spans
        .iter()
        .filter(|span| span.span_context.trace_id() == trace)
        .collect();
    assert_eq!(
        traced.len(),
        2,
        "both attempts continue the message's trace"
    );
    let first = traced
        .iter()
        .find(|span| span.parent_span_id == SpanId::from_hex(PARENT_ID).unwrap())
        .expect("the first attempt's parent is the publisher's span");
    let retry = traced
        .iter()
        .find(|span| span.parent_span_id == first.span_context.span_id())
        .expect("the retry's parent is the first attempt's span");
    assert_ne!(retry.span_context.span_id(), first.span_context.span_id());
    let untraced = spans
        .iter()
        .find(|span| span.span_context.trace_id() != trace)
        .expect("the message without a traceparent starts a trace of its own");
    assert_eq!(untraced.parent_span_id, SpanId::INVALID);
    Ok(())
}

/// A handler's publish is a producer span, child of its delivery's span, and the message it
/// publishes carries that span's `traceparent`: the trace crosses the hop to the next
/// consumer.
#[test]
fn a_handlers_publish_carries_its_delivery_trace_to_the_next_consumer() -> anyhow::Result<()> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("conejo-tests")));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let queue = unique_name("traced-in");
    let events = unique_name("traced-out");
    let published = tracing::subscriber::with_default(subscriber, || {
        runtime.block_on(async {
            let broker = Broker::connect().await?;
            broker.declare_queue(&queue).await?;
            broker.declare_queue(&events).await?;
            let mut headers = FieldTable::default();
            headers.insert(
                "traceparent".into(),
                AMQPValue::LongString(format!("00-{TRACE_ID}-{PARENT_ID}-01").into()),
            );
            broker
                .publish_with_properties(
                    &queue,
                    b"order",
                    BasicProperties::default().with_headers(headers),
                )
                .await?;
            let events_queue = events.clone();
            let handler = handler_fn(move |_: String, ctx: Context| {
                let events = events_queue.clone();
                async move {
                    ctx.publish(conejo::Message::to_queue(&events, "order.stored"))
                        .await?;
                    Ok::<(), HandlerError>(())
                }
            });
            let service = RunningService::spawn(
                Conejo::builder(amqp_url())
                    .queue_with(&queue, handler, QueueConfig::new().durable(false))
                    .build()?,
            );
            service.wait_for(&queue, WAIT, |s| s.acked == 1).await?;
            service.stop().await??;
            let published = broker.drain(&events).await?;
            broker.delete_queue(&events).await?;
            broker.delete_consumed_queue(&queue).await?;
            anyhow::Ok(published)
        })
    })?;
    provider.force_flush()?;
    let spans = exporter.get_finished_spans()?;
    let delivery = spans
        .iter()
        .find(|span| span.name == "delivery")
        .expect("the delivery's span");
    let publish = spans
        .iter()
        .find(|span| span.name == "publish")
        .expect("the publish's span");
    assert_eq!(publish.span_kind, opentelemetry::trace::SpanKind::Producer);
    assert_eq!(publish.parent_span_id, delivery.span_context.span_id());
    assert_eq!(
        publish.span_context.trace_id(),
        TraceId::from_hex(TRACE_ID)?
    );
    assert_eq!(published.len(), 1);
    let traceparent = published[0]
        .header_str("traceparent")
        .expect("the event carries a traceparent");
    assert_eq!(
        traceparent,
        format!("00-{TRACE_ID}-{}-01", publish.span_context.span_id()),
        "the event's parent is the publish span"
    );
    Ok(())
}
