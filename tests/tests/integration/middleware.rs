//! Layers around handlers, against a real broker: a user's idempotency layer acks
//! duplicates without calling the handler, an authorisation layer on one queue
//! dead-letters what it refuses, a service-wide layer sees every queue's deliveries, and
//! each delivery runs inside a `delivery` span that records its outcome.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use conejo::{
    Conejo, Context, Failure, HandlerError, QueueConfig, handler_fn,
    service::{Delivery, Next, from_fn},
    types::{AMQPValue, BasicProperties, FieldTable},
};
use conejo_tests::{Broker, RunningService, amqp_url, init_tracing, unique_name};

const WAIT: Duration = Duration::from_secs(30);

fn with_id(id: &str) -> BasicProperties {
    BasicProperties::default().with_message_id(id.into())
}

fn with_tenant(id: &str, tenant: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("x-tenant".into(), AMQPValue::LongString(tenant.into()));
    with_id(id).with_headers(headers)
}

#[tokio::test]
async fn layers_deduplicate_authorise_and_see_every_queue() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let payments = unique_name("mw-payments");
    let audit = unique_name("mw-audit");
    broker.declare_queue(&payments).await?;
    broker.declare_queue(&audit).await?;

    // Payments: "a" twice (a duplicate), "b" once, all with a tenant; "c" without one.
    for (id, body) in [("a", "first"), ("b", "second"), ("a", "first again")] {
        broker
            .publish_with_properties(&payments, body.as_bytes(), with_tenant(id, "acme"))
            .await?;
    }
    broker
        .publish_with_properties(&payments, b"anonymous", with_id("c"))
        .await?;
    broker
        .publish_with_properties(&audit, b"line", with_id("z"))
        .await?;

    let handled = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&handled);
    let handler = handler_fn(move |text: String, ctx: Context| {
        let sink = Arc::clone(&sink);
        async move {
            sink.lock().unwrap().push((ctx.queue().to_owned(), text));
            Ok::<(), HandlerError>(())
        }
    });

    // Idempotency on the message id: a processed id is acked without calling the handler.
    let processed = Arc::new(Mutex::new(HashSet::new()));
    let idempotent = from_fn(move |delivery: Delivery, next: Next| {
        let processed = Arc::clone(&processed);
        async move {
            let id = delivery.context().message_id().map(str::to_owned);
            if let Some(id) = &id
                && processed.lock().unwrap().contains(id)
            {
                return Ok(());
            }
            next.run(delivery).await?;
            if let Some(id) = id {
                processed.lock().unwrap().insert(id);
            }
            Ok(())
        }
    });
    // Authorisation on a header, before decoding: refused messages are dead-lettered.
    let tenant_required = from_fn(|delivery: Delivery, next: Next| async move {
        if delivery.context().header("x-tenant").is_none() {
            return Err(Failure::Handler(HandlerError::reject("no x-tenant header")));
        }
        next.run(delivery).await
    });
    // Service-wide: every delivery of every queue, seen from outside the queues' layers.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen_sink = Arc::clone(&seen);
    let observer = from_fn(move |delivery: Delivery, next: Next| {
        let seen = Arc::clone(&seen_sink);
        async move {
            let queue = delivery.context().queue().to_owned();
            let result = next.run(delivery).await;
            seen.lock().unwrap().push((queue, result.is_ok()));
            result
        }
    });

    let service = RunningService::spawn(
        Conejo::builder(amqp_url())
            .queue_with(
                &payments,
                handler.clone(),
                QueueConfig::new()
                    .durable(false)
                    .concurrency(1)
                    .layer(idempotent)
                    .layer(tenant_required),
            )
            .queue_with(&audit, handler, QueueConfig::new().durable(false))
            .layer(observer)
            .build()?,
    );
    let stats = service.wait_for(&payments, WAIT, |s| s.acked == 4).await?;
    service.wait_for(&audit, WAIT, |s| s.acked == 1).await?;
    service.stop().await??;

    assert_eq!((stats.dead_lettered, stats.handler_errors), (1, 1));
    let mut handled = handled.lock().unwrap().clone();
    handled.sort();
    let mut expected = vec![
        (payments.clone(), "first".to_owned()),
        (payments.clone(), "second".to_owned()),
        (audit.clone(), "line".to_owned()),
    ];
    expected.sort();
    assert_eq!(
        handled, expected,
        "the duplicate and the refused never reached the handler"
    );

    let dead = broker.drain(&format!("{payments}.dlq")).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body, b"anonymous");
    assert_eq!(
        dead[0].header_str("conejo-reason").as_deref(),
        Some("rejected")
    );
    assert_eq!(
        dead[0].header_str("conejo-error").as_deref(),
        Some("handler error: no x-tenant header")
    );

    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        5,
        "the service-wide layer saw every delivery: {seen:?}"
    );
    assert_eq!(seen.iter().filter(|(q, _)| *q == audit).count(), 1);
    assert_eq!(seen.iter().filter(|(_, ok)| !ok).count(), 1, "one refused");

    assert_eq!(broker.message_count(&payments).await?, 0);
    assert_eq!(broker.message_count(&audit).await?, 0);
    broker.delete_consumed_queue(&payments).await?;
    broker.delete_consumed_queue(&audit).await?;
    Ok(())
}

/// Collects the fields of every closed `delivery` span.
#[derive(Clone, Default)]
struct SpanCapture {
    open: Arc<Mutex<std::collections::HashMap<u64, Fields>>>,
    closed: Arc<Mutex<Vec<Fields>>>,
}

type Fields = std::collections::BTreeMap<String, String>;

struct Visitor<'a>(&'a mut Fields);

impl tracing::field::Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            format!("{value:?}").replace('"', ""),
        );
    }
}

impl<S> tracing_subscriber::Layer<S> for SpanCapture
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().name() == "delivery" {
            let mut fields = Fields::new();
            attrs.record(&mut Visitor(&mut fields));
            self.open.lock().unwrap().insert(id.into_u64(), fields);
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if let Some(fields) = self.open.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Visitor(fields));
        }
    }

    fn on_close(&self, id: tracing::span::Id, _: tracing_subscriber::layer::Context<'_, S>) {
        if let Some(fields) = self.open.lock().unwrap().remove(&id.into_u64()) {
            self.closed.lock().unwrap().push(fields);
        }
    }
}

#[test]
fn every_delivery_runs_in_a_span_that_records_its_outcome() -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt;

    let capture = SpanCapture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    // One thread: conejo's delivery tasks run where this subscriber is the default.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let queue = unique_name("mw-spans");
    tracing::subscriber::with_default(subscriber, || {
        runtime.block_on(async {
            let broker = Broker::connect().await?;
            broker.declare_queue(&queue).await?;
            for (id, body) in [("ok-1", "ok"), ("retry-1", "retry"), ("bad-1", "reject")] {
                broker
                    .publish_with_properties(&queue, body.as_bytes(), with_id(id))
                    .await?;
            }
            let handler = handler_fn(|text: String, _ctx: Context| async move {
                match text.as_str() {
                    "retry" => Err(HandlerError::retry("later")),
                    "reject" => Err(HandlerError::reject("never")),
                    _ => Ok(()),
                }
            });
            let service = RunningService::spawn(
                Conejo::builder(amqp_url())
                    .queue_with(&queue, handler, QueueConfig::new().durable(false))
                    .build()?,
            );
            service.wait_for(&queue, WAIT, |s| s.acked == 3).await?;
            service.stop().await??;
            broker.delete_consumed_queue(&queue).await
        })
    })?;

    let mut spans = capture.closed.lock().unwrap().clone();
    spans.sort_by(|a, b| a.get("message_id").cmp(&b.get("message_id")));
    let outcomes: Vec<_> = spans
        .iter()
        .map(|f| {
            (
                f.get("message_id").cloned().unwrap_or_default(),
                f.get("outcome").cloned().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("bad-1".to_owned(), "dead-lettered".to_owned()),
            ("ok-1".to_owned(), "acked".to_owned()),
            ("retry-1".to_owned(), "retried".to_owned()),
        ]
    );
    for span in &spans {
        assert_eq!(span.get("queue"), Some(&queue), "{span:?}");
        assert_eq!(
            span.get("attempt").map(String::as_str),
            Some("1"),
            "{span:?}"
        );
        let ms: f64 = span
            .get("handler_ms")
            .expect("handler_ms recorded")
            .parse()?;
        assert!((0.0..5_000.0).contains(&ms), "{span:?}");
    }
    Ok(())
}
