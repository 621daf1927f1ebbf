//! Expiry and dead-lettering: where a dead letter goes, and the headers it gets.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use conejo::{
    Exchange, Message,
    testing::{Death, Published, TestBroker, TestError, TestMessage, TestQueue},
    types::{AMQPValue, FieldTable},
};

use crate::{
    Outcome,
    support::{
        WAIT, bodies, delivered, nothing_more, publish, publish_to, take_bodies, until_ready,
    },
};

/// A retry as conejo makes one, by the broker alone: a rejected message goes to a wait
/// queue (the work queue's dead-letter exchange), expires there after its TTL and comes
/// back to the work queue (the wait queue's dead-letter exchange) — with an `x-death`
/// entry per queue and reason, counted, the latest first.
pub(crate) async fn ttl_wait_queue_round_trip(broker: &TestBroker) -> Outcome {
    let work = broker.name("conformance.retry.work");
    let wait = broker.name("conformance.retry.wait");
    broker
        .declare_queue(
            &TestQueue::new(&work)
                .dead_letter_exchange("")
                .dead_letter_routing_key(&wait),
        )
        .await?;
    broker
        .declare_queue(
            &TestQueue::new(&wait)
                .message_ttl(Duration::from_millis(100))
                .dead_letter_exchange("")
                .dead_letter_routing_key(&work),
        )
        .await?;
    let mut consumer = broker.consume(&work, 1).await?;
    broker.send(&work, "job").await?;

    let first = delivered(&mut consumer).await?;
    assert_eq!(first.message.text(), "job");
    assert!(!first.message.redelivered());
    assert!(deaths(&first.message).is_empty());
    assert_eq!(first.message.header("x-first-death-queue"), None);
    first.reject().await?;

    let second = delivered(&mut consumer).await?;
    let message = &second.message;
    assert_eq!(message.text(), "job");
    assert!(!message.redelivered(), "a dead letter is a new message");
    assert_eq!(
        (message.exchange(), message.routing_key()),
        ("", work.as_str())
    );
    assert_eq!(
        deaths(message),
        [
            death(&wait, "expired", 1, "", &wait),
            death(&work, "rejected", 1, "", &work),
        ]
    );
    assert_first_death(message, &work, "rejected", "");
    second.reject().await?;

    let third = delivered(&mut consumer).await?;
    assert_eq!(
        deaths(&third.message),
        [
            death(&wait, "expired", 2, "", &wait),
            death(&work, "rejected", 2, "", &work),
        ]
    );
    // The first death stays the first.
    assert_first_death(&third.message, &work, "rejected", "");
    third.ack().await?;
    nothing_more(&mut consumer).await?;
    assert_eq!(broker.ready(&work).await?, 0);
    assert_eq!(broker.ready(&wait).await?, 0);
    consumer.close().await?;
    broker.cleanup().await?;
    Ok(())
}

/// A rejected message goes to its queue's dead-letter exchange with its own routing key
/// (or the queue's dead-letter routing key), its body, properties and headers, and
/// `x-death` (queue, reason, count, exchange, routing keys, time) and `x-first-death-*`.
pub(crate) async fn reject_writes_death_headers(broker: &TestBroker) -> Outcome {
    let inbound = broker.name("conformance.dlx.in");
    let dlx = broker.name("conformance.dlx");
    let orders = broker.name("conformance.dlx.orders");
    let renamed = broker.name("conformance.dlx.renamed");
    let dead = broker.name("conformance.dlx.dead");
    let dead_renamed = broker.name("conformance.dlx.dead-renamed");
    broker.declare_exchange(&Exchange::direct(&inbound)).await?;
    broker.declare_exchange(&Exchange::direct(&dlx)).await?;
    broker
        .declare_queue(&TestQueue::new(&orders).dead_letter_exchange(&dlx))
        .await?;
    broker
        .declare_queue(
            &TestQueue::new(&renamed)
                .dead_letter_exchange(&dlx)
                .dead_letter_routing_key("dead"),
        )
        .await?;
    broker.declare_queue(&TestQueue::new(&dead)).await?;
    broker.declare_queue(&TestQueue::new(&dead_renamed)).await?;
    broker.bind(&orders, &inbound, "order.created").await?;
    broker.bind(&renamed, &inbound, "order.created").await?;
    broker.bind(&dead, &dlx, "order.created").await?;
    broker.bind(&dead_renamed, &dlx, "dead").await?;

    let message = Message::new(&inbound, "order.created", "order 7")
        .message_id("order-7")
        .content_type("text/plain")
        .header("tenant", "acme");
    assert_eq!(publish(broker, message).await?, Published::Accepted);
    for queue in [&orders, &renamed] {
        let mut consumer = broker.consume(queue, 1).await?;
        delivered(&mut consumer).await?.reject().await?;
        nothing_more(&mut consumer).await?;
        consumer.close().await?;
    }
    until_ready(broker, &dead, 1).await?;
    until_ready(broker, &dead_renamed, 1).await?;

    let got = broker.get(&dead).await?.context("the dead letter")?;
    assert_eq!(got.text(), "order 7");
    assert_eq!(
        (got.exchange(), got.routing_key()),
        (dlx.as_str(), "order.created")
    );
    assert!(!got.redelivered());
    assert_eq!(got.message_id(), Some("order-7"));
    assert_eq!(got.content_type(), Some("text/plain"));
    assert_eq!(got.header_str("tenant"), Some("acme"));
    assert_eq!(
        deaths(&got),
        [death(&orders, "rejected", 1, &inbound, "order.created")]
    );
    assert_first_death(&got, &orders, "rejected", &inbound);
    assert_death_entry_shape(&got, false)?;

    let got = broker
        .get(&dead_renamed)
        .await?
        .context("the renamed dead letter")?;
    assert_eq!((got.exchange(), got.routing_key()), (dlx.as_str(), "dead"));
    // x-death keeps the key the message had, not the one it was dead-lettered with.
    assert_eq!(
        deaths(&got),
        [death(&renamed, "rejected", 1, &inbound, "order.created")]
    );
    assert_first_death(&got, &renamed, "rejected", &inbound);
    broker.cleanup().await?;
    Ok(())
}

/// A message's own `expiration` dead-letters it as `expired`; the dead letter loses the
/// property, and its `x-death` entry keeps it as `original-expiration`. With a queue TTL
/// too, the shorter one applies.
pub(crate) async fn message_expiration_dead_letters(broker: &TestBroker) -> Outcome {
    let queue = broker.name("conformance.expiration");
    let short = broker.name("conformance.expiration.short-ttl");
    let dead = broker.name("conformance.expiration.dead");
    broker.declare_queue(&TestQueue::new(&dead)).await?;
    broker
        .declare_queue(
            &TestQueue::new(&queue)
                .dead_letter_exchange("")
                .dead_letter_routing_key(&dead),
        )
        .await?;
    broker
        .declare_queue(
            &TestQueue::new(&short)
                .message_ttl(Duration::from_millis(50))
                .dead_letter_exchange("")
                .dead_letter_routing_key(&dead),
        )
        .await?;
    let mut watch = broker.consume(&dead, 0).await?;
    let message = Message::to_queue(&queue, "own").expiration(Duration::from_millis(50));
    assert_eq!(publish(broker, message).await?, Published::Accepted);
    let got = delivered(&mut watch).await?;
    assert_eq!(got.message.text(), "own");
    assert_eq!(got.message.properties().expiration(), &None);
    assert_eq!(
        deaths(&got.message),
        [death(&queue, "expired", 1, "", &queue)]
    );
    assert_first_death(&got.message, &queue, "expired", "");
    assert_eq!(original_expiration(&got.message), Some("50".to_owned()));
    assert_death_entry_shape(&got.message, true)?;
    got.ack().await?;

    // The queue's 50 ms, not the message's 60 s.
    let message = Message::to_queue(&short, "queue ttl").expiration(Duration::from_secs(60));
    assert_eq!(publish(broker, message).await?, Published::Accepted);
    let got = delivered(&mut watch).await?;
    assert_eq!(got.message.text(), "queue ttl");
    assert_eq!(
        deaths(&got.message),
        [death(&short, "expired", 1, "", &short)]
    );
    assert_eq!(original_expiration(&got.message), Some("60000".to_owned()));
    got.ack().await?;

    // The queue TTL alone: no original-expiration.
    assert_eq!(
        publish_to(broker, "", &short, "no expiration").await?,
        Published::Accepted
    );
    let got = delivered(&mut watch).await?;
    assert_eq!(got.message.text(), "no expiration");
    assert_eq!(original_expiration(&got.message), None);
    assert_death_entry_shape(&got.message, false)?;
    got.ack().await?;
    watch.close().await?;
    broker.cleanup().await?;
    Ok(())
}

/// A classic queue expires messages at its head only: one whose `expiration` passed waits
/// behind one that does not expire, counted as ready, until it reaches the head.
pub(crate) async fn expiry_happens_at_the_head(broker: &TestBroker) -> Outcome {
    let queue = broker.name("conformance.head");
    let dead = broker.name("conformance.head.dead");
    broker.declare_queue(&TestQueue::new(&dead)).await?;
    broker
        .declare_queue(
            &TestQueue::new(&queue)
                .dead_letter_exchange("")
                .dead_letter_routing_key(&dead),
        )
        .await?;
    let mut watch = broker.consume(&dead, 0).await?;
    broker.send(&queue, "keeps").await?;
    let expiring = Message::to_queue(&queue, "expires").expiration(Duration::from_millis(50));
    assert_eq!(publish(broker, expiring).await?, Published::Accepted);
    // Well past its 50 ms: still there, behind the head.
    nothing_more(&mut watch).await?;
    assert_eq!(broker.ready(&queue).await?, 2);
    let head = broker.get(&queue).await?.context("the head")?;
    assert_eq!(head.text(), "keeps");
    // Now at the head, it expires.
    let got = delivered(&mut watch).await?;
    assert_eq!(got.message.text(), "expires");
    assert_eq!(
        deaths(&got.message),
        [death(&queue, "expired", 1, "", &queue)]
    );
    got.ack().await?;
    assert_eq!(broker.ready(&queue).await?, 0);
    watch.close().await?;
    broker.cleanup().await?;
    Ok(())
}

/// A delivery held past its queue's TTL does not expire while unacknowledged; given back,
/// it is dead-lettered as expired instead of being delivered again.
pub(crate) async fn expired_while_unacked_is_dead_lettered_on_requeue(
    broker: &TestBroker,
) -> Outcome {
    let queue = broker.name("conformance.held");
    let dead = broker.name("conformance.held.dead");
    broker.declare_queue(&TestQueue::new(&dead)).await?;
    broker
        .declare_queue(
            &TestQueue::new(&queue)
                .message_ttl(Duration::from_millis(100))
                .dead_letter_exchange("")
                .dead_letter_routing_key(&dead),
        )
        .await?;
    let mut consumer = broker.consume(&queue, 1).await?;
    let mut watch = broker.consume(&dead, 0).await?;
    broker.send(&queue, "held").await?;
    let held = delivered(&mut consumer).await?;
    // Three times the TTL, unacknowledged: not dead-lettered.
    nothing_more(&mut watch).await?;
    held.requeue().await?;
    let got = delivered(&mut watch).await?;
    assert_eq!(got.message.text(), "held");
    assert!(!got.message.redelivered());
    assert_eq!(
        deaths(&got.message),
        [death(&queue, "expired", 1, "", &queue)]
    );
    got.ack().await?;
    nothing_more(&mut consumer).await?;
    assert_eq!(broker.ready(&queue).await?, 0);
    consumer.close().await?;
    watch.close().await?;
    broker.cleanup().await?;
    Ok(())
}

/// Two queues whose TTLs dead-letter to each other: RabbitMQ drops the message when it
/// would come back to a queue it expired in with no reject since, rather than loop.
pub(crate) async fn expiry_cycle_is_dropped(broker: &TestBroker) -> Outcome {
    let ping = broker.name("conformance.cycle.ping");
    let pong = broker.name("conformance.cycle.pong");
    for (queue, other) in [(&ping, &pong), (&pong, &ping)] {
        broker
            .declare_queue(
                &TestQueue::new(queue)
                    .message_ttl(Duration::from_millis(50))
                    .dead_letter_exchange("")
                    .dead_letter_routing_key(other),
            )
            .await?;
    }
    broker.send(&ping, "ball").await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (a, b) = (broker.ready(&ping).await?, broker.ready(&pong).await?);
        if (a, b) == (0, 0) {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "still going round after {WAIT:?}: {a} in ping, {b} in pong"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // And it stays gone: ten TTLs later, nothing came back.
    let idle = broker.name("conformance.cycle.idle");
    broker.declare_queue(&TestQueue::new(&idle)).await?;
    let mut watch = broker.consume(&idle, 1).await?;
    nothing_more(&mut watch).await?;
    assert_eq!(
        (broker.ready(&ping).await?, broker.ready(&pong).await?),
        (0, 0)
    );
    watch.close().await?;
    broker.cleanup().await?;
    Ok(())
}

/// A queue at its `x-max-length` (of ready messages: what is delivered and unacked does not
/// count): by default it drops its head, dead-lettered as `maxlen`; with `x-overflow:
/// reject-publish` it refuses the new message (the publisher's confirm is a nack), with
/// `reject-publish-dlx` it also dead-letters it.
pub(crate) async fn max_length_drops_the_head_or_refuses(broker: &TestBroker) -> Outcome {
    let dead = broker.name("conformance.maxlen.dead");
    broker.declare_queue(&TestQueue::new(&dead)).await?;
    let bounded = |queue: &str| {
        TestQueue::new(queue)
            .argument("x-max-length", 2i64)
            .dead_letter_exchange("")
            .dead_letter_routing_key(&dead)
    };
    let drops = broker.name("conformance.maxlen.drop-head");
    broker.declare_queue(&bounded(&drops)).await?;
    for n in 1..=3 {
        broker.send(&drops, format!("m{n}")).await?;
    }
    assert_eq!(broker.ready(&drops).await?, 2);
    let dropped = broker.take(&dead).await?;
    assert_eq!(bodies(&dropped), ["m1"]);
    assert_eq!(
        deaths(&dropped[0]),
        [death(&drops, "maxlen", 1, "", &drops)]
    );
    assert_first_death(&dropped[0], &drops, "maxlen", "");
    // Delivered and unacked, m2 leaves room: m4 fits.
    let mut consumer = broker.consume(&drops, 1).await?;
    let held = delivered(&mut consumer).await?;
    assert_eq!(held.message.text(), "m2");
    broker.send(&drops, "m4").await?;
    assert_eq!(broker.ready(&drops).await?, 2);
    assert_eq!(broker.ready(&dead).await?, 0);
    // Given back, it makes three: the head goes — m2 itself.
    held.requeue().await?;
    until_ready(broker, &dead, 1).await?;
    assert_eq!(take_bodies(broker, &dead).await?, ["m2"]);
    consumer.close().await?;
    assert_eq!(take_bodies(broker, &drops).await?, ["m3", "m4"]);

    for (overflow, dead_lettered) in [("reject-publish", false), ("reject-publish-dlx", true)] {
        let queue = broker.name(&format!("conformance.maxlen.{overflow}"));
        broker
            .declare_queue(&bounded(&queue).argument("x-overflow", overflow))
            .await?;
        broker.send(&queue, "r1").await?;
        broker.send(&queue, "r2").await?;
        let refused = broker.publish(Message::to_queue(&queue, "r3")).await;
        assert!(
            matches!(refused, Err(TestError::Nacked { .. })),
            "{overflow}: {refused:?}"
        );
        assert_eq!(
            take_bodies(broker, &queue).await?,
            ["r1", "r2"],
            "{overflow}"
        );
        let dead_letters = broker.take(&dead).await?;
        if dead_lettered {
            assert_eq!(bodies(&dead_letters), ["r3"]);
            assert_eq!(
                deaths(&dead_letters[0]),
                [death(&queue, "maxlen", 1, "", &queue)]
            );
        } else {
            assert!(dead_letters.is_empty(), "{overflow}: {dead_letters:?}");
        }
    }
    broker.cleanup().await?;
    Ok(())
}

/// An `x-death` entry: queue, reason, count, exchange, routing keys.
pub(crate) type DeathRow = (String, String, i64, String, Vec<String>);

/// The `x-death` entry of a message that died in `queue` once per `count`, with one
/// routing key.
pub(crate) fn death(queue: &str, reason: &str, count: i64, exchange: &str, key: &str) -> DeathRow {
    (
        queue.to_owned(),
        reason.to_owned(),
        count,
        exchange.to_owned(),
        vec![key.to_owned()],
    )
}

/// The message's `x-death` entries (what [`TestMessage::deaths`] reads), most recent first.
pub(crate) fn deaths(message: &TestMessage) -> Vec<DeathRow> {
    message
        .deaths()
        .into_iter()
        .map(
            |Death {
                 queue,
                 reason,
                 count,
                 exchange,
                 routing_keys,
                 ..
             }| { (queue, reason, count, exchange, routing_keys) },
        )
        .collect()
}

/// `x-first-death-queue`, `-reason` and `-exchange`.
pub(crate) fn assert_first_death(message: &TestMessage, queue: &str, reason: &str, exchange: &str) {
    assert_eq!(
        (
            message.header_str("x-first-death-queue"),
            message.header_str("x-first-death-reason"),
            message.header_str("x-first-death-exchange"),
        ),
        (Some(queue), Some(reason), Some(exchange)),
        "x-first-death-* of {message:?}"
    );
}

/// The first `x-death` entry, as the broker wrote it.
fn first_death_entry(message: &TestMessage) -> Option<FieldTable> {
    match message.header("x-death")? {
        AMQPValue::FieldArray(entries) => match entries.as_slice().first()? {
            AMQPValue::FieldTable(table) => Some(table.clone()),
            _ => None,
        },
        _ => None,
    }
}

fn original_expiration(message: &TestMessage) -> Option<String> {
    match first_death_entry(message)?
        .inner()
        .get("original-expiration")?
    {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        other => Some(format!("{other:?}")),
    }
}

/// The first `x-death` entry's fields and their AMQP types, as RabbitMQ writes them.
fn assert_death_entry_shape(message: &TestMessage, with_expiration: bool) -> Outcome {
    let entry = first_death_entry(message).context("an x-death entry")?;
    let mut shape: Vec<(String, &'static str)> = entry
        .inner()
        .iter()
        .map(|(key, value)| (key.to_string(), kind(value)))
        .collect();
    shape.sort();
    let mut expected = vec![
        ("count", "long"),
        ("exchange", "longstr"),
        ("queue", "longstr"),
        ("reason", "longstr"),
        ("routing-keys", "array"),
        ("time", "timestamp"),
    ];
    if with_expiration {
        expected.insert(1, ("original-expiration", "longstr"));
        expected.sort();
    }
    let expected: Vec<(String, &str)> = expected
        .into_iter()
        .map(|(k, t)| (k.to_owned(), t))
        .collect();
    ensure!(
        shape == expected,
        "x-death entry {shape:?}, expected {expected:?}"
    );
    Ok(())
}

fn kind(value: &AMQPValue) -> &'static str {
    match value {
        AMQPValue::LongString(_) => "longstr",
        AMQPValue::ShortString(_) => "shortstr",
        AMQPValue::LongLongInt(_) => "long",
        AMQPValue::LongInt(_) => "signedint",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::FieldTable(_) => "table",
        _ => "other",
    }
}
