//! Consumers with manual acknowledgements: the prefetch window, `multiple`, requeues, a
//! cancel, a closed channel.

use std::time::Duration;

use anyhow::bail;
use conejo::testing::{TestBroker, TestQueue};

use crate::{
    Outcome,
    support::{WAIT, bodies, delivered, nothing_more, refusal, until_ready},
};

/// Declares `queue` and sends it `m1`…`m<count>`.
async fn queue_of(broker: &TestBroker, base: &str, count: usize) -> anyhow::Result<String> {
    let queue = broker.name(base);
    broker.declare_queue(&TestQueue::new(&queue)).await?;
    for n in 1..=count {
        broker.send(&queue, format!("m{n}")).await?;
    }
    Ok(queue)
}

/// A prefetch of 2 with 5 ready: exactly 2 delivered, the rest ready, until one is acked —
/// then exactly one more.
pub(crate) async fn prefetch_window(broker: &TestBroker) -> Outcome {
    let queue = queue_of(broker, "conformance.prefetch", 5).await?;
    let mut consumer = broker.consume(&queue, 2).await?;
    let first = delivered(&mut consumer).await?;
    let second = delivered(&mut consumer).await?;
    assert_eq!(
        (first.message.text(), second.message.text()),
        ("m1".into(), "m2".into())
    );
    assert!(first.tag < second.tag);
    nothing_more(&mut consumer).await?;
    let declared = broker.passive(&queue).await?;
    assert_eq!((declared.messages, declared.consumers), (3, 1));

    first.ack().await?;
    let third = delivered(&mut consumer).await?;
    assert_eq!(third.message.text(), "m3");
    nothing_more(&mut consumer).await?;
    assert_eq!(broker.ready(&queue).await?, 2);

    second.ack().await?;
    third.ack().await?;
    let fourth = delivered(&mut consumer).await?;
    let fifth = delivered(&mut consumer).await?;
    assert_eq!(
        (fourth.message.text(), fifth.message.text()),
        ("m4".into(), "m5".into())
    );
    nothing_more(&mut consumer).await?;
    fourth.ack().await?;
    fifth.ack().await?;
    assert_eq!(broker.ready(&queue).await?, 0);
    consumer.close().await?;
    broker.cleanup().await?;
    Ok(())
}

/// `multiple`: acking the third delivery settles the first three; closing the channel gives
/// back only the other two, redelivered.
pub(crate) async fn ack_multiple_settles_earlier_deliveries(broker: &TestBroker) -> Outcome {
    let queue = queue_of(broker, "conformance.multiple", 5).await?;
    let mut consumer = broker.consume(&queue, 0).await?;
    let mut deliveries = Vec::new();
    for _ in 0..5 {
        deliveries.push(delivered(&mut consumer).await?);
    }
    let texts: Vec<String> = deliveries.iter().map(|d| d.message.text()).collect();
    assert_eq!(texts, ["m1", "m2", "m3", "m4", "m5"]);
    nothing_more(&mut consumer).await?;
    assert_eq!(broker.ready(&queue).await?, 0);
    let rest = deliveries.split_off(3);
    let third = deliveries.pop().expect("the third");
    third.ack_multiple().await?;
    drop((deliveries, rest));
    consumer.close().await?;
    until_ready(broker, &queue, 2).await?;
    let back = broker.take(&queue).await?;
    assert_eq!(bodies(&back), ["m4", "m5"]);
    assert!(back.iter().all(|m| m.redelivered()));
    broker.cleanup().await?;
    Ok(())
}

/// A requeued delivery comes back first, marked redelivered; the others keep their place
/// and their flag.
pub(crate) async fn requeue_marks_redelivered(broker: &TestBroker) -> Outcome {
    let queue = queue_of(broker, "conformance.requeue", 3).await?;
    let mut consumer = broker.consume(&queue, 1).await?;
    let first = delivered(&mut consumer).await?;
    assert_eq!(first.message.text(), "m1");
    assert!(!first.message.redelivered());
    first.requeue().await?;
    let again = delivered(&mut consumer).await?;
    assert_eq!(again.message.text(), "m1");
    assert!(again.message.redelivered());
    again.requeue().await?;
    let third_time = delivered(&mut consumer).await?;
    assert_eq!(third_time.message.text(), "m1");
    assert!(third_time.message.redelivered());
    third_time.ack().await?;
    for expected in ["m2", "m3"] {
        let next = delivered(&mut consumer).await?;
        assert_eq!(next.message.text(), expected);
        assert!(!next.message.redelivered());
        next.ack().await?;
    }
    nothing_more(&mut consumer).await?;
    consumer.close().await?;

    // Three in flight at once: the requeued one is delivered again, redelivered.
    for n in 4..=6 {
        broker.send(&queue, format!("m{n}")).await?;
    }
    let mut consumer = broker.consume(&queue, 3).await?;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(delivered(&mut consumer).await?);
    }
    let middle = held.remove(1);
    assert_eq!(middle.message.text(), "m5");
    middle.requeue().await?;
    let back = delivered(&mut consumer).await?;
    assert_eq!(
        (back.message.text(), back.message.redelivered()),
        ("m5".into(), true)
    );
    nothing_more(&mut consumer).await?;
    back.ack().await?;
    for delivery in held {
        delivery.ack().await?;
    }
    assert_eq!(broker.ready(&queue).await?, 0);
    consumer.close().await?;
    broker.cleanup().await?;
    Ok(())
}

/// Closing a consumer's channel gives back what it held unacknowledged, redelivered, ahead
/// of what was never delivered.
pub(crate) async fn closed_channel_requeues_unacked(broker: &TestBroker) -> Outcome {
    let queue = queue_of(broker, "conformance.closed", 3).await?;
    let mut consumer = broker.consume(&queue, 2).await?;
    let first = delivered(&mut consumer).await?;
    let second = delivered(&mut consumer).await?;
    first.ack().await?;
    // m3 comes in m1's place.
    let third = delivered(&mut consumer).await?;
    assert_eq!(third.message.text(), "m3");
    drop((second, third));
    consumer.close().await?;
    until_ready(broker, &queue, 2).await?;
    let back = broker.take(&queue).await?;
    let seen: Vec<(String, bool)> = back.iter().map(|m| (m.text(), m.redelivered())).collect();
    assert_eq!(seen, [("m2".into(), true), ("m3".into(), true)]);
    broker.cleanup().await?;
    Ok(())
}

/// After `basic.cancel` nothing more is delivered; the delivery held can still be acked
/// (or given back); the rest stays ready, and the queue has no consumer.
pub(crate) async fn cancel_stops_deliveries(broker: &TestBroker) -> Outcome {
    let queue = queue_of(broker, "conformance.cancel", 4).await?;
    let mut consumer = broker.consume(&queue, 2).await?;
    let first = delivered(&mut consumer).await?;
    let second = delivered(&mut consumer).await?;
    assert_eq!(broker.passive(&queue).await?.consumers, 1);
    consumer.cancel().await?;
    // Room in the window again: a consumer still there would get m3.
    first.ack().await?;
    nothing_more(&mut consumer).await?;
    let declared = broker.passive(&queue).await?;
    assert_eq!((declared.messages, declared.consumers), (2, 0));
    second.requeue().await?;
    until_ready(broker, &queue, 3).await?;
    let rest = broker.take(&queue).await?;
    let seen: Vec<(String, bool)> = rest.iter().map(|m| (m.text(), m.redelivered())).collect();
    assert_eq!(
        seen,
        [
            ("m2".into(), true),
            ("m3".into(), false),
            ("m4".into(), false)
        ]
    );
    // The consumer's channel is still open: closing it is fine.
    consumer.close().await?;
    broker.cleanup().await?;
    Ok(())
}

/// An auto-delete queue lives until its last consumer goes — not before it had one, not
/// while another remains.
pub(crate) async fn auto_delete_queue_goes_with_its_last_consumer(broker: &TestBroker) -> Outcome {
    let queue = broker.name("conformance.auto-delete");
    broker
        .declare_queue(&TestQueue::new(&queue).transient().auto_delete())
        .await?;
    broker.send(&queue, "kept").await?;
    assert_eq!(broker.ready(&queue).await?, 1);
    let mut one = broker.consume(&queue, 1).await?;
    delivered(&mut one).await?.ack().await?;
    let two = broker.consume(&queue, 1).await?;
    one.cancel().await?;
    let declared = broker.passive(&queue).await?;
    assert_eq!(declared.consumers, 1);
    two.close().await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match broker.passive(&queue).await {
            Err(error) if error.reply_code() == Some(404) => break,
            Err(error) => return Err(error.into()),
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(declared) => bail!("'{queue}' still there without consumers: {declared:?}"),
        }
    }
    one.close().await?;
    broker.cleanup().await?;
    Ok(())
}

/// Two consumers of one queue share it in turn, one message each, whatever their room.
pub(crate) async fn consumers_take_turns(broker: &TestBroker) -> Outcome {
    let queue = queue_of(broker, "conformance.turns", 0).await?;
    let mut one = broker.consume(&queue, 0).await?;
    let mut two = broker.consume(&queue, 0).await?;
    assert_eq!(broker.passive(&queue).await?.consumers, 2);
    for n in 1..=4 {
        broker.send(&queue, format!("m{n}")).await?;
    }
    let mut got = Vec::new();
    for (name, consumer) in [("one", &mut one), ("two", &mut two)] {
        for _ in 0..2 {
            let delivery = delivered(consumer).await?;
            got.push((name, delivery.message.text()));
            delivery.ack().await?;
        }
        nothing_more(consumer).await?;
    }
    assert_eq!(
        got,
        [
            ("one", "m1".to_owned()),
            ("one", "m3".to_owned()),
            ("two", "m2".to_owned()),
            ("two", "m4".to_owned()),
        ]
    );
    one.close().await?;
    two.close().await?;
    broker.cleanup().await?;
    Ok(())
}

/// A queue deleted under its consumer: the broker cancels it (its deliveries end), the
/// delivery it held can still be acked on its channel, and the queue is gone.
pub(crate) async fn deleted_queue_cancels_its_consumer(broker: &TestBroker) -> Outcome {
    let queue = queue_of(broker, "conformance.deleted", 2).await?;
    let mut consumer = broker.consume(&queue, 1).await?;
    let held = delivered(&mut consumer).await?;
    broker.delete_queue(&queue).await?;
    if let Some(delivery) = consumer.next(WAIT).await? {
        bail!("delivered after its queue was deleted: {delivery:?}");
    }
    held.ack().await?;
    assert_eq!(refusal(broker.passive(&queue).await)?.0, 404);
    consumer.close().await?;
    broker.cleanup().await?;
    Ok(())
}

/// Deliveries given back in any order go back to where they were in the queue: ahead of
/// what was never delivered, in their first order.
pub(crate) async fn requeued_messages_keep_their_order(broker: &TestBroker) -> Outcome {
    let queue = queue_of(broker, "conformance.order", 5).await?;
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
    let back = broker.take(&queue).await?;
    let seen: Vec<(String, bool)> = back.iter().map(|m| (m.text(), m.redelivered())).collect();
    assert_eq!(
        seen,
        [
            ("m1".into(), true),
            ("m3".into(), true),
            ("m4".into(), true),
            ("m5".into(), false)
        ]
    );
    consumer.close().await?;
    broker.cleanup().await?;
    Ok(())
}
