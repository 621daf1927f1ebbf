//! What the broker refuses, with RabbitMQ's reply codes and texts — and the harness working
//! again afterwards, on a fresh channel, as a client must open one.

use std::time::Duration;

use conejo::{
    Exchange, Message,
    testing::{Published, TestBroker, TestQueue},
    types::{AMQPValue, LongString},
};

use crate::{
    Outcome,
    support::{delivered, publish, publish_to, refusal, until_ready},
};

/// The harness works after a refusal: `queue` takes a message and gives it back.
async fn still_works(broker: &TestBroker, queue: &str) -> Outcome {
    broker.send(queue, "after").await?;
    let got = broker.take(queue).await?;
    assert_eq!(got.len(), 1, "'{queue}' after a refusal");
    assert_eq!(got[0].text(), "after");
    Ok(())
}

/// A queue redeclared with other flags or arguments: 406 PRECONDITION_FAILED naming what
/// differs (exclusivity: 405 RESOURCE_LOCKED); the queue is as it was, and the harness
/// goes on.
pub(crate) async fn conflicting_redeclare(broker: &TestBroker) -> Outcome {
    let queue = broker.name("conformance.redeclare");
    let ttl = Duration::from_millis(60_000);
    let declared = broker
        .declare_queue(&TestQueue::new(&queue).message_ttl(ttl))
        .await?;
    assert_eq!((declared.messages, declared.consumers), (0, 0));
    let inequivalent = |arg: &str, received: &str, current: &str| {
        format!(
            "PRECONDITION_FAILED - inequivalent arg '{arg}' for queue '{queue}' in vhost '/': \
             received {received} but current is {current}"
        )
    };
    let cases = [
        (
            TestQueue::new(&queue),
            406,
            inequivalent("x-message-ttl", "none", "the value '60000' of type 'long'"),
        ),
        (
            TestQueue::new(&queue).message_ttl(Duration::from_millis(100)),
            406,
            // Both set: the values alone.
            inequivalent("x-message-ttl", "'100'", "'60000'"),
        ),
        (
            TestQueue::new(&queue).message_ttl(ttl).transient(),
            406,
            inequivalent("durable", "'false'", "'true'"),
        ),
        (
            TestQueue::new(&queue).message_ttl(ttl).auto_delete(),
            406,
            inequivalent("auto_delete", "'true'", "'false'"),
        ),
        (
            TestQueue::new(&queue)
                .message_ttl(ttl)
                .dead_letter_exchange("elsewhere"),
            406,
            inequivalent(
                "x-dead-letter-exchange",
                "the value 'elsewhere' of type 'longstr'",
                "none",
            ),
        ),
        (
            TestQueue::new(&queue).message_ttl(ttl).exclusive(),
            405,
            format!(
                "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{queue}' in \
                 vhost '/'. It could be originally declared on another connection or the \
                 exclusive property value does not match that of the original declaration."
            ),
        ),
    ];
    for (redeclared, code, text) in cases {
        let (got_code, got_text) = refusal(broker.declare_queue(&redeclared).await)?;
        assert_eq!(
            (got_code, got_text.as_str()),
            (code, text.as_str()),
            "{redeclared:?}"
        );
        // A fresh channel: the queue is as it was.
        assert_eq!(broker.ready(&queue).await?, 0);
    }
    let reserved = broker.name("amq.conformance");
    assert_eq!(
        refusal(broker.declare_queue(&TestQueue::new(&reserved)).await)?,
        (
            403,
            format!("ACCESS_REFUSED - queue name '{reserved}' contains reserved prefix 'amq.*'")
        )
    );
    still_works(broker, &queue).await?;
    // A passive declaration checks nothing but existence.
    let passive = broker.passive(&queue).await?;
    assert_eq!((passive.messages, passive.consumers), (0, 0));
    broker.cleanup().await?;
    Ok(())
}

/// What RabbitMQ does not compare on a redeclaration: an integer argument's width, and the
/// arguments it does not know. The answer counts the queue's messages.
pub(crate) async fn equivalent_redeclare(broker: &TestBroker) -> Outcome {
    let queue = broker.name("conformance.equivalent");
    broker
        .declare_queue(
            &TestQueue::new(&queue)
                .message_ttl(Duration::from_millis(60_000))
                .argument("x-conejo-custom", "one"),
        )
        .await?;
    broker.send(&queue, "one").await?;
    broker.send(&queue, "two").await?;
    // conejo declares its wait queues' TTL as a 32-bit unsigned integer, the harness as a
    // 64-bit signed one: the same argument to RabbitMQ.
    for redeclared in [
        TestQueue::new(&queue).argument("x-message-ttl", AMQPValue::LongUInt(60_000)),
        TestQueue::new(&queue).argument("x-message-ttl", AMQPValue::LongInt(60_000)),
        TestQueue::new(&queue)
            .message_ttl(Duration::from_millis(60_000))
            .argument("x-conejo-custom", "two"),
        TestQueue::new(&queue)
            .message_ttl(Duration::from_millis(60_000))
            .argument("x-queue-type", "classic"),
    ] {
        let declared = broker.declare_queue(&redeclared).await?;
        assert_eq!(
            (declared.messages, declared.consumers),
            (2, 0),
            "{redeclared:?}"
        );
    }
    assert_eq!(broker.take(&queue).await?.len(), 2);
    // Declared a classic queue in so many words, redeclared without: the same.
    let typed = broker.name("conformance.equivalent.typed");
    broker
        .declare_queue(&TestQueue::new(&typed).argument("x-queue-type", "classic"))
        .await?;
    broker.declare_queue(&TestQueue::new(&typed)).await?;
    broker.cleanup().await?;
    Ok(())
}

/// An exchange redeclared with another type or flags: 406 naming what differs; its
/// arguments are compared only for `alternate-exchange`. The `amq.` prefix is reserved,
/// the default exchange cannot be declared, a missing exchange fails a passive check.
pub(crate) async fn conflicting_exchange_redeclare(broker: &TestBroker) -> Outcome {
    let exchange = broker.name("conformance.exchange");
    let queue = broker.name("conformance.exchange.q");
    broker.declare_exchange(&Exchange::topic(&exchange)).await?;
    broker.declare_queue(&TestQueue::new(&queue)).await?;
    broker.bind(&queue, &exchange, "#").await?;
    let inequivalent = |arg: &str, received: &str, current: &str| {
        format!(
            "PRECONDITION_FAILED - inequivalent arg '{arg}' for exchange '{exchange}' in vhost \
             '/': received {received} but current is {current}"
        )
    };
    let cases = [
        (
            Exchange::fanout(&exchange),
            inequivalent("type", "'fanout'", "'topic'"),
        ),
        (
            Exchange::topic(&exchange).durable(false),
            inequivalent("durable", "'false'", "'true'"),
        ),
        (
            Exchange::topic(&exchange).auto_delete(true),
            inequivalent("auto_delete", "'true'", "'false'"),
        ),
        (
            Exchange::topic(&exchange).argument(
                "alternate-exchange",
                AMQPValue::LongString(LongString::from("elsewhere")),
            ),
            inequivalent(
                "alternate-exchange",
                "the value 'elsewhere' of type 'longstr'",
                "none",
            ),
        ),
    ];
    for (redeclared, text) in cases {
        let (code, got) = refusal(broker.declare_exchange(&redeclared).await)?;
        assert_eq!((code, got.as_str()), (406, text.as_str()), "{redeclared:?}");
    }
    // Other arguments are not compared.
    broker
        .declare_exchange(&Exchange::topic(&exchange).argument(
            "x-conejo-custom",
            AMQPValue::LongString(LongString::from("x")),
        ))
        .await?;
    // The exchange is as it was: a topic exchange with its binding.
    assert_eq!(
        publish_to(broker, &exchange, "a.b", "routed").await?,
        Published::Accepted
    );
    assert_eq!(broker.take(&queue).await?.len(), 1);

    let reserved = broker.name("amq.conformance");
    let (code, text) = refusal(broker.declare_exchange(&Exchange::direct(&reserved)).await)?;
    assert_eq!(
        (code, text),
        (
            403,
            format!("ACCESS_REFUSED - exchange name '{reserved}' contains reserved prefix 'amq.*'")
        )
    );
    let (code, text) = refusal(broker.declare_exchange(&Exchange::direct("")).await)?;
    assert_eq!(
        (code, text.as_str()),
        (
            403,
            "ACCESS_REFUSED - operation not permitted on the default exchange"
        )
    );
    let missing = broker.name("conformance.exchange.missing");
    let (code, text) = refusal(
        broker
            .declare_exchange(&Exchange::topic(&missing).passive())
            .await,
    )?;
    assert_eq!(
        (code, text),
        (
            404,
            format!("NOT_FOUND - no exchange '{missing}' in vhost '/'")
        )
    );
    still_works(broker, &queue).await?;
    broker.cleanup().await?;
    Ok(())
}

/// A passive declaration (and a get, a consume) of a missing queue: 404 NOT_FOUND; the
/// harness goes on on a fresh channel.
pub(crate) async fn passive_declare_of_missing_queue(broker: &TestBroker) -> Outcome {
    let missing = broker.name("conformance.missing");
    let expected = (
        404,
        format!("NOT_FOUND - no queue '{missing}' in vhost '/'"),
    );
    assert_eq!(refusal(broker.passive(&missing).await)?, expected);
    assert_eq!(refusal(broker.ready(&missing).await)?, expected);
    assert_eq!(refusal(broker.get(&missing).await)?, expected);
    assert_eq!(refusal(broker.consume(&missing, 1).await)?, expected);
    // Declared now, it is there.
    let declared = broker.declare_queue(&TestQueue::new(&missing)).await?;
    assert_eq!((declared.messages, declared.consumers), (0, 0));
    still_works(broker, &missing).await?;
    broker.cleanup().await?;
    Ok(())
}

/// A publish to a missing exchange: 404 NOT_FOUND, mandatory or not; the harness goes on.
pub(crate) async fn publish_to_missing_exchange(broker: &TestBroker) -> Outcome {
    let exchange = broker.name("conformance.nowhere");
    let expected = (
        404,
        format!("NOT_FOUND - no exchange '{exchange}' in vhost '/'"),
    );
    for mandatory in [true, false] {
        let message = Message::new(&exchange, "key", "lost").mandatory(mandatory);
        assert_eq!(refusal(broker.publish(message).await)?, expected);
    }
    broker
        .declare_exchange(&Exchange::direct(&exchange))
        .await?;
    let queue = broker.name("conformance.nowhere.q");
    broker.declare_queue(&TestQueue::new(&queue)).await?;
    broker.bind(&queue, &exchange, "key").await?;
    let message = Message::new(&exchange, "key", "found");
    assert_eq!(publish(broker, message).await?, Published::Accepted);
    assert_eq!(broker.take(&queue).await?.len(), 1);
    broker.cleanup().await?;
    Ok(())
}

/// Bindings refused: a missing queue or exchange (404; with both missing, the exchange is
/// named), the default exchange (403).
pub(crate) async fn bind_refusals(broker: &TestBroker) -> Outcome {
    let exchange = broker.name("conformance.bind");
    let queue = broker.name("conformance.bind.q");
    let missing_queue = broker.name("conformance.bind.missing-q");
    let missing_exchange = broker.name("conformance.bind.missing-x");
    broker
        .declare_exchange(&Exchange::direct(&exchange))
        .await?;
    broker.declare_queue(&TestQueue::new(&queue)).await?;
    let no_queue = (
        404,
        format!("NOT_FOUND - no queue '{missing_queue}' in vhost '/'"),
    );
    let no_exchange = (
        404,
        format!("NOT_FOUND - no exchange '{missing_exchange}' in vhost '/'"),
    );
    assert_eq!(
        refusal(broker.bind(&missing_queue, &exchange, "k").await)?,
        no_queue
    );
    assert_eq!(
        refusal(broker.bind(&queue, &missing_exchange, "k").await)?,
        no_exchange
    );
    assert_eq!(
        refusal(broker.bind(&missing_queue, &missing_exchange, "k").await)?,
        no_exchange
    );
    assert_eq!(
        refusal(broker.bind(&queue, "", "k").await)?,
        (
            403,
            "ACCESS_REFUSED - operation not permitted on the default exchange".to_owned()
        )
    );
    broker.bind(&queue, &exchange, "k").await?;
    assert_eq!(
        publish_to(broker, &exchange, "k", "bound").await?,
        Published::Accepted
    );
    assert_eq!(broker.take(&queue).await?.len(), 1);
    broker.cleanup().await?;
    Ok(())
}

/// An ack of a delivery tag already settled (by a `multiple` ack): the broker closes the
/// consumer's channel with 406 PRECONDITION_FAILED, giving back what it held.
pub(crate) async fn unknown_delivery_tag(broker: &TestBroker) -> Outcome {
    let queue = broker.name("conformance.unknown-tag");
    broker.declare_queue(&TestQueue::new(&queue)).await?;
    for n in 1..=3 {
        broker.send(&queue, format!("m{n}")).await?;
    }
    let mut consumer = broker.consume(&queue, 0).await?;
    let first = delivered(&mut consumer).await?;
    let second = delivered(&mut consumer).await?;
    let third = delivered(&mut consumer).await?;
    second.ack_multiple().await?;
    let tag = first.tag;
    let acked = first.ack().await;
    // The ack itself has no answer: the refusal closes the channel.
    let closed = consumer.next(Duration::from_secs(5)).await;
    let expected = (
        406,
        format!("PRECONDITION_FAILED - unknown delivery tag {tag}"),
    );
    match acked {
        Ok(()) => assert_eq!(refusal(closed)?, expected),
        Err(error) => {
            panic!("the ack of an unknown tag answered {error} (the broker sends no answer)")
        }
    }
    drop(third);
    until_ready(broker, &queue, 1).await?;
    let back = broker.take(&queue).await?;
    assert_eq!((back[0].text(), back[0].redelivered()), ("m3".into(), true));
    broker.cleanup().await?;
    Ok(())
}

/// Arguments RabbitMQ refuses on a new queue (406, naming the argument and why): a TTL that
/// is not a non-negative integer, a zero `x-expires`, a dead-letter routing key without an
/// exchange, a dead-letter exchange that is not a string, an unknown queue type or overflow
/// mode, a queue type's argument on a queue of another type. Nothing is created.
pub(crate) async fn invalid_queue_arguments(broker: &TestBroker) -> Outcome {
    type Case = (&'static str, fn(TestQueue) -> TestQueue, String);
    let invalid = |arg: &str, why: &str| format!("invalid arg '{arg}' for {{queue}}: {why}");
    let cases: Vec<Case> = vec![
        (
            "ttl-text",
            |q| q.argument("x-message-ttl", "100"),
            invalid("x-message-ttl", "\"expected integer, got longstr\""),
        ),
        (
            "ttl-negative",
            |q| q.argument("x-message-ttl", -5i64),
            invalid("x-message-ttl", "{value_negative,-5}"),
        ),
        (
            "expires-zero",
            |q| q.argument("x-expires", 0i64),
            invalid("x-expires", "{value_zero,0}"),
        ),
        (
            "key-alone",
            |q| q.dead_letter_routing_key("dead"),
            invalid(
                "x-dead-letter-routing-key",
                "routing_key_but_no_dlx_defined",
            ),
        ),
        (
            "dlx-number",
            |q| q.argument("x-dead-letter-exchange", 5i64),
            "invalid type 'long' for arg 'x-dead-letter-exchange' in {queue}".to_owned(),
        ),
        (
            // The type first.
            "type-unknown",
            |q| {
                q.argument("x-message-ttl", "x")
                    .argument("x-queue-type", "bogus")
            },
            invalid("x-queue-type", "\"unsupported queue type 'bogus'\""),
        ),
        (
            "overflow-unknown",
            |q| q.argument("x-overflow", "bogus"),
            invalid("x-overflow", "invalid_overflow"),
        ),
        (
            "single-active-number",
            |q| q.argument("x-single-active-consumer", 1i64),
            invalid("x-single-active-consumer", "{unacceptable_type,long}"),
        ),
        (
            "classic-delivery-limit",
            |q| q.delivery_limit(5),
            "invalid arg 'x-delivery-limit' for {queue} of queue type rabbit_classic_queue"
                .to_owned(),
        ),
        (
            // The values before the type's arguments.
            "classic-limit-and-ttl",
            |q| q.delivery_limit(5).argument("x-message-ttl", "x"),
            invalid("x-message-ttl", "\"expected integer, got longstr\""),
        ),
        (
            "quorum-priority",
            |q| q.quorum().argument("x-max-priority", 5i64),
            "invalid arg 'x-max-priority' for {queue} of queue type rabbit_quorum_queue".to_owned(),
        ),
    ];
    for (base, arguments, text) in cases {
        let queue = broker.name(&format!("conformance.invalid.{base}"));
        let declared = arguments(TestQueue::new(&queue));
        let text = format!(
            "PRECONDITION_FAILED - {}",
            text.replace("{queue}", &format!("queue '{queue}' in vhost '/'"))
        );
        assert_eq!(
            refusal(broker.declare_queue(&declared).await)?,
            (406, text),
            "{declared:?}"
        );
        assert_eq!(refusal(broker.passive(&queue).await)?.0, 404);
    }
    // What conejo's wait queues declare is valid.
    let queue = broker.name("conformance.invalid.none");
    broker
        .declare_queue(
            &TestQueue::new(&queue)
                .argument("x-message-ttl", AMQPValue::LongUInt(1000))
                .dead_letter_exchange("")
                .dead_letter_routing_key("elsewhere")
                .argument("x-queue-type", "classic"),
        )
        .await?;
    still_works(broker, &queue).await?;
    broker.cleanup().await?;
    Ok(())
}
