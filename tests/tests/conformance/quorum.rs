//! Quorum queues: delivery counts, the delivery limit, and what they cannot be.

use conejo::testing::{TestBroker, TestMessage, TestQueue};

use crate::{
    Outcome,
    dead_letter::{assert_first_death, death, deaths},
    support::{delivered, nothing_more, refusal, until_ready},
};

/// A quorum queue counts the deliveries given back (`x-delivery-count` from the first
/// redelivery on, with the redelivered flag); past its `x-delivery-limit` the message is
/// dead-lettered with the reason `delivery_limit`. A closed channel gives back as a requeue
/// does.
pub(crate) async fn delivery_count_and_limit(broker: &TestBroker) -> Outcome {
    let queue = broker.name("conformance.quorum");
    let dead = broker.name("conformance.quorum.dead");
    broker.declare_queue(&TestQueue::new(&dead)).await?;
    broker
        .declare_queue(
            &TestQueue::new(&queue)
                .quorum()
                .delivery_limit(2)
                .dead_letter_exchange("")
                .dead_letter_routing_key(&dead),
        )
        .await?;
    broker.send(&queue, "counted").await?;
    let mut consumer = broker.consume(&queue, 1).await?;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let delivery = delivered(&mut consumer).await?;
        seen.push((
            delivery.message.redelivered(),
            delivery.message.header_int("x-delivery-count"),
        ));
        delivery.requeue().await?;
    }
    assert_eq!(seen, [(false, None), (true, Some(1)), (true, Some(2))]);
    // Returned a third time, past the limit of 2: dead-lettered.
    nothing_more(&mut consumer).await?;
    until_ready(broker, &dead, 1).await?;
    assert_eq!(broker.ready(&queue).await?, 0);
    let got = broker.get(&dead).await?.expect("the dead letter");
    assert_eq!(got.text(), "counted");
    assert_eq!(
        deaths(&got),
        [death(&queue, "delivery_limit", 1, "", &queue)]
    );
    assert_first_death(&got, &queue, "delivery_limit", "");
    assert_eq!(got.header_int("x-delivery-count"), None);

    // A closed channel counts as a return.
    broker.send(&queue, "closed").await?;
    let first = delivered(&mut consumer).await?;
    assert_eq!(first.message.header_int("x-delivery-count"), None);
    drop(first);
    consumer.close().await?;
    let mut consumer = broker.consume(&queue, 1).await?;
    let again = delivered(&mut consumer).await?;
    assert_eq!(
        (
            again.message.redelivered(),
            again.message.header_int("x-delivery-count")
        ),
        (true, Some(1))
    );
    again.ack().await?;
    nothing_more(&mut consumer).await?;
    consumer.close().await?;
    broker.cleanup().await?;
    Ok(())
}

/// A quorum queue must be durable, not exclusive, not auto-delete (406); redeclared without
/// its type, it is not equivalent.
pub(crate) async fn refuses_what_a_quorum_queue_cannot_be(broker: &TestBroker) -> Outcome {
    let queue = broker.name("conformance.quorum.refused");
    let invalid = |property: &str| {
        (
            406,
            format!(
                "PRECONDITION_FAILED - invalid property '{property}' for queue '{queue}' in vhost '/'"
            ),
        )
    };
    for (declared, property) in [
        (TestQueue::new(&queue).quorum().transient(), "non-durable"),
        (
            TestQueue::new(&queue).quorum().exclusive(),
            "exclusive-owner",
        ),
        (TestQueue::new(&queue).quorum().auto_delete(), "auto-delete"),
    ] {
        assert_eq!(
            refusal(broker.declare_queue(&declared).await)?,
            invalid(property),
            "{declared:?}"
        );
        assert_eq!(refusal(broker.passive(&queue).await)?.0, 404);
    }
    broker
        .declare_queue(&TestQueue::new(&queue).quorum())
        .await?;
    assert_eq!(
        refusal(broker.declare_queue(&TestQueue::new(&queue)).await)?,
        (
            406,
            format!(
                "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue '{queue}' in \
                 vhost '/': received none but current is the value 'quorum' of type 'longstr'"
            )
        )
    );
    broker.send(&queue, "fine").await?;
    assert_eq!(broker.take(&queue).await?.len(), 1);
    broker.cleanup().await?;
    Ok(())
}

/// Where a quorum queue (3.10) puts what is given back: what a consumer that went held,
/// and what is given back to a queue with a delivery limit, ahead of what was never
/// delivered, in the order it came back; a nack to a queue without a delivery limit, at its
/// back (3.10 republishes it, so that repeated requeues do not grow its log). A classic
/// queue puts it back in its place. A `basic.get` from a quorum queue says
/// `x-delivery-count` even when it is 0.
pub(crate) async fn where_returns_go(broker: &TestBroker) -> Outcome {
    let count = |text: &str, returned: bool| (text.to_owned(), returned, Some(i64::from(returned)));
    for limit in [None, Some(10)] {
        let queue = broker.name(&format!("conformance.quorum.returns-{limit:?}"));
        let declared = TestQueue::new(&queue).quorum();
        let declared = match limit {
            Some(limit) => declared.delivery_limit(limit),
            None => declared,
        };
        broker.declare_queue(&declared).await?;
        for n in 1..=5 {
            broker.send(&queue, format!("m{n}")).await?;
        }
        let mut consumer = broker.consume(&queue, 4).await?;
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(delivered(&mut consumer).await?);
        }
        consumer.cancel().await?;
        let (m1, m2, m3, m4) = {
            let mut held = held.into_iter();
            let mut next = || held.next().expect("four deliveries");
            (next(), next(), next(), next())
        };
        m3.requeue().await?;
        m1.requeue().await?;
        m2.ack().await?;
        m4.requeue().await?;
        until_ready(broker, &queue, 4).await?;
        let nacked = [count("m3", true), count("m1", true), count("m4", true)];
        let expected: Vec<_> = match limit {
            None => std::iter::once(count("m5", false)).chain(nacked).collect(),
            Some(_) => nacked.into_iter().chain([count("m5", false)]).collect(),
        };
        assert_eq!(
            seen(&broker.take(&queue).await?),
            expected,
            "limit {limit:?}"
        );
        consumer.close().await?;

        // What a closed channel held comes first, whatever the limit.
        for n in 1..=4 {
            broker.send(&queue, format!("c{n}")).await?;
        }
        let mut consumer = broker.consume(&queue, 2).await?;
        let held = (
            delivered(&mut consumer).await?,
            delivered(&mut consumer).await?,
        );
        drop(held);
        consumer.close().await?;
        until_ready(broker, &queue, 4).await?;
        assert_eq!(
            seen(&broker.take(&queue).await?),
            [
                count("c1", true),
                count("c2", true),
                count("c3", false),
                count("c4", false)
            ],
            "limit {limit:?}"
        );
    }
    broker.cleanup().await?;
    Ok(())
}

/// Body, redelivered flag, `x-delivery-count`.
fn seen(messages: &[TestMessage]) -> Vec<(String, bool, Option<i64>)> {
    messages
        .iter()
        .map(|m| (m.text(), m.redelivered(), m.header_int("x-delivery-count")))
        .collect()
}
