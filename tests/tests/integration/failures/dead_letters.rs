//! Dead letters and routes: exactly the policy's attempts, then the dead-letter queue with
//! reasons; a payload refused on its first delivery; the user's dead-letter exchange;
//! replay by the operator tool; quorum delivery limits; the builder's exchanges and
//! bindings.

use super::*;

#[tokio::test]
async fn always_failing_is_dead_lettered_after_exactly_its_attempts_with_reasons()
-> anyhow::Result<()> {
    let scenario = Scenario::new("doomed").await?;
    let Scenario { broker, queue } = &scenario;
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "tenant".into(),
        lapin::types::AMQPValue::LongString("acme".into()),
    );
    let id = broker
        .publish_with_properties(
            queue,
            b"doomed",
            BasicProperties::default()
                .with_headers(headers)
                .with_correlation_id("corr-1".into()),
        )
        .await?;
    let handler = Scripted::new(|_, _| Err(HandlerError::retry("database unavailable")));
    let started = std::time::SystemTime::now();
    let service = scenario.spawn(Conejo::builder(amqp_url()).queue_with(
        queue,
        handler.clone(),
        queue_config().retry(fast_retries(3)),
    ))?;
    let dlq = format!("{queue}.dlq");
    broker.wait_for_count(&dlq, 1, WAIT).await?;
    let stats = service.stats().queue(queue).unwrap();
    service.stop().await??;
    assert_eq!(
        (stats.handler_errors, stats.retried, stats.dead_lettered),
        (3, 2, 1),
        "{stats:?}"
    );
    let attempts: Vec<u32> = handler.calls().iter().map(|c| c.attempt).collect();
    assert_eq!(attempts, vec![1, 2, 3], "no more deliveries than attempts");

    let dead = broker.drain(&dlq).await?;
    assert_eq!(dead.len(), 1);
    let m = &dead[0];
    assert_eq!(m.body, b"doomed");
    assert_eq!(m.message_id.as_deref(), Some(id.as_str()));
    assert_eq!(
        m.header_str("tenant").as_deref(),
        Some("acme"),
        "user headers kept"
    );
    assert_eq!(
        m.header_str("conejo-reason").as_deref(),
        Some("attempts-exhausted")
    );
    assert_eq!(m.header_str("conejo-failure").as_deref(), Some("handler"));
    assert_eq!(
        m.header_str("conejo-error").as_deref(),
        Some("handler error: database unavailable")
    );
    assert_eq!(m.header_int("conejo-attempt"), Some(3));
    assert_eq!(m.header_str("conejo-original-queue"), Some(queue.clone()));
    assert_eq!(
        m.header_str("conejo-original-exchange").as_deref(),
        Some("")
    );
    assert_eq!(
        m.header_str("conejo-original-routing-key"),
        Some(queue.clone())
    );
    let first = m
        .header_str("conejo-first-failure-at")
        .expect("first failure time");
    let last = m
        .header_str("conejo-last-failure-at")
        .expect("last failure time");
    let first = humantime::parse_rfc3339(&first)?;
    let last = humantime::parse_rfc3339(&last)?;
    assert!(started <= first && first < last, "{first:?} {last:?}");
    assert!(last.duration_since(first)? >= Duration::from_millis(850));
    assert!(
        m.header("x-death").is_none(),
        "the broker's own headers are not carried"
    );
    scenario.cleanup().await
}

#[tokio::test]
async fn a_non_json_content_type_is_dead_lettered_on_its_first_delivery() -> anyhow::Result<()> {
    let scenario = Scenario::new("xml").await?;
    let Scenario { broker, queue } = &scenario;

    #[derive(serde::Deserialize)]
    struct Order {
        #[allow(dead_code)]
        id: u64,
    }
    struct AcksOrders;
    impl Handler for AcksOrders {
        type Message = Json<Order>;
        async fn handle(&self, _: Json<Order>, _: &Context) -> Result<(), HandlerError> {
            Ok(())
        }
    }
    broker
        .publish_with_properties(
            queue,
            b"<order id='1'/>",
            BasicProperties::default().with_content_type("application/xml".into()),
        )
        .await?;
    broker.publish_bytes(queue, b"{\"id\": oops").await?;
    broker
        .publish_json(queue, &serde_json::json!({"id": 7}))
        .await?;
    let service = scenario.spawn(Conejo::builder(amqp_url()).queue_with(
        queue,
        AcksOrders,
        queue_config().concurrency(1),
    ))?;
    let stats = service.wait_for(queue, WAIT, |s| s.acked == 3).await?;
    service.stop().await??;
    assert_eq!(
        (stats.decode_failures, stats.dead_lettered, stats.retried),
        (2, 2, 0)
    );
    let dead = broker.drain(&format!("{queue}.dlq")).await?;
    assert_eq!(dead.len(), 2);
    assert!(
        dead.iter()
            .all(|m| m.header_str("conejo-failure").as_deref() == Some("decode"))
    );
    assert!(
        dead.iter()
            .all(|m| m.header_int("conejo-attempt") == Some(1))
    );
    assert_eq!(
        dead[0].header_str("conejo-error").as_deref(),
        Some(
            "cannot decode json payload: unsupported content type 'application/xml' (expected JSON)"
        )
    );
    assert_eq!(dead[0].content_type.as_deref(), Some("application/xml"));
    scenario.cleanup().await
}

#[tokio::test]
async fn dead_letters_go_to_the_users_exchange_with_its_routing_key() -> anyhow::Result<()> {
    let scenario = Scenario::new("user-dlx").await?;
    let Scenario { broker, queue } = &scenario;
    let exchange = unique_name("errors");
    let parking = unique_name("parking");
    broker
        .declare_exchange(&exchange, ExchangeKind::Direct)
        .await?;
    broker.declare_queue(&parking).await?;
    let channel = broker.open_channel().await?;
    channel
        .queue_bind(
            parking.as_str().into(),
            exchange.as_str().into(),
            "parked".into(),
            Default::default(),
            Default::default(),
        )
        .await?;
    broker.publish_bytes(queue, b"bad").await?;
    let service = scenario.spawn(
        Conejo::builder(amqp_url()).queue_with(
            queue,
            Scripted::new(|_, _| Err(HandlerError::reject("bad input"))),
            queue_config()
                .dead_letter_exchange(&exchange)
                .dead_letter_routing_key("parked"),
        ),
    )?;
    broker.wait_for_count(&parking, 1, WAIT).await?;
    service.stop().await??;
    let dead = broker.drain(&parking).await?;
    assert_eq!(
        dead[0].header_str("conejo-reason").as_deref(),
        Some("rejected")
    );
    broker.delete_queue(&parking).await?;
    broker.delete_exchange(&exchange).await?;
    scenario.cleanup().await
}

#[tokio::test]
async fn exchanges_and_bindings_from_the_builder_route_to_the_queue() -> anyhow::Result<()> {
    let scenario = Scenario::undeclared("bound").await?;
    let Scenario { broker, queue } = &scenario;
    let exchange = unique_name("shop");
    let handler = Scripted::new(|_, _| Ok(()));
    let service = scenario.spawn(
        Conejo::builder(amqp_url())
            .exchange(Exchange::topic(&exchange).durable(false))
            .queue_with(
                queue,
                handler.clone(),
                queue_config().bind(&exchange, "order.created.*"),
            ),
    )?;
    broker.wait_for_consumer_count(queue, 1, WAIT).await?;
    let channel = broker.open_channel().await?;
    for key in ["order.created.eu", "order.cancelled.eu", "order.created.us"] {
        channel
            .basic_publish(
                exchange.as_str().into(),
                key.into(),
                Default::default(),
                key.as_bytes(),
                BasicProperties::default(),
            )
            .await?;
    }
    service.wait_for(queue, WAIT, |s| s.acked == 2).await?;
    service.stop().await??;
    let mut bodies: Vec<_> = handler.calls().into_iter().map(|c| c.body).collect();
    bodies.sort();
    assert_eq!(bodies, vec!["order.created.eu", "order.created.us"]);
    broker.delete_exchange(&exchange).await?;
    scenario.cleanup().await
}

#[tokio::test]
async fn dead_letters_replayed_by_the_operator_tool_are_handled() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let scenario = Scenario::new("replayed").await?;
    let Scenario { broker, queue } = &scenario;

    /// Rejects everything until the bug is fixed.
    #[derive(Clone, Default)]
    struct RejectsUntilFixed {
        fixed: Arc<AtomicBool>,
    }
    impl Handler for RejectsUntilFixed {
        type Message = String;
        async fn handle(&self, _: String, _: &Context) -> Result<(), HandlerError> {
            if self.fixed.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(HandlerError::reject("bug #42"))
            }
        }
    }
    let handler = RejectsUntilFixed::default();
    let service = scenario.spawn(Conejo::builder(amqp_url()).queue_with(
        queue,
        handler.clone(),
        queue_config(),
    ))?;
    for n in 0..3 {
        broker
            .publish_bytes(queue, format!("m{n}").as_bytes())
            .await?;
    }
    let dlq = format!("{queue}.dlq");
    broker.wait_for_count(&dlq, 3, WAIT).await?;
    handler.fixed.store(true, Ordering::SeqCst);

    let url: conejo::AmqpUrl = amqp_url().parse()?;
    let report = conejo::admin::replay(&url, &dlq, None, None).await?;
    assert_eq!(report.replayed, 3);
    // 3 dead letters acked, then the 3 replayed copies handled
    let stats = service.wait_for(queue, WAIT, |s| s.acked == 6).await?;
    service.stop().await??;
    assert_eq!(stats.dead_lettered, 3);
    assert_eq!(broker.message_count(&dlq).await?, 0);
    scenario.cleanup().await
}

/// Quorum queues conejo declares itself get an explicit delivery limit: the poison limit
/// with its dead-letter exchange, or, with detection off, no limit said explicitly — never
/// the broker's default (20 on RabbitMQ 4, dropping the message).
#[tokio::test]
async fn quorum_queues_declared_by_conejo_carry_an_explicit_delivery_limit() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let detected = unique_name("quorum-poison");
    let unlimited = unique_name("quorum-unlimited");
    let handler = Scripted::new(|_, _| Ok(()));
    let service = RunningService::spawn(
        Conejo::builder(amqp_url())
            .queue_with(&detected, handler.clone(), QueueConfig::new().quorum())
            .queue_with(
                &unlimited,
                handler.clone(),
                QueueConfig::new().quorum().poison_limit(None),
            )
            .build()?,
    );
    for queue in [&detected, &unlimited] {
        broker.wait_for_consumer_count(queue, 1, WAIT).await?;
        broker.publish_bytes(queue, queue.as_bytes()).await?;
        service.wait_for(queue, WAIT, |s| s.acked == 1).await?;
    }
    service.stop().await??;
    let of = |arguments: Option<String>, queue: &str| {
        arguments.unwrap_or_else(|| panic!("no queue {queue}"))
    };
    let detected_args = of(
        conejo_tests::rabbitmqctl_queue_arguments(&detected).await?,
        &detected,
    );
    let unlimited_args = of(
        conejo_tests::rabbitmqctl_queue_arguments(&unlimited).await?,
        &unlimited,
    );
    eprintln!("{detected}: {detected_args}\n{unlimited}: {unlimited_args}");
    let compact = |text: &str| text.replace(' ', "");
    assert!(
        compact(&detected_args).contains(r#"{"x-delivery-limit",5}"#),
        "{detected_args}"
    );
    assert!(
        compact(&detected_args)
            .contains(&format!(r#"{{"x-dead-letter-exchange","{detected}.dlx"}}"#)),
        "{detected_args}"
    );
    assert!(
        compact(&unlimited_args).contains(r#"{"x-delivery-limit",2147483647}"#),
        "{unlimited_args}"
    );
    assert!(
        !unlimited_args.contains("x-dead-letter-exchange"),
        "{unlimited_args}"
    );
    broker
        .delete_consumed_queues(&[&detected, &unlimited])
        .await?;
    Ok(())
}
