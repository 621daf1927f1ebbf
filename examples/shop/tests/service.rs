//! The orders service as `orders-service` runs it — its own builder, [`orders_service`] —
//! against conejo's in-memory broker: no RabbitMQ, no wall time spent on retry delays
//! (tokio's clock is paused), faults on cue. Each test starts the service on a fresh broker.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use conejo::{
    Exchange, Json, Message,
    testing::{HandledAs, Published, TestBroker, TestError, TestService},
};
use example_shop::{
    ORDER_CREATED, ORDER_STORED, ORDERS, Order, SHOP, Stock, StockError, orders_service,
};

/// The stock service as a test wants it: down for the next `outages` calls (asking to be
/// called again in 30 s), out of the SKUs in `sold_out`, and a record of what it reserved.
#[derive(Clone, Default)]
struct FakeStock {
    outages: Arc<AtomicU32>,
    sold_out: Arc<Mutex<HashSet<String>>>,
    reserved: Arc<Mutex<Vec<u64>>>,
}

impl FakeStock {
    fn down_for(&self, calls: u32) {
        self.outages.store(calls, Ordering::SeqCst);
    }

    fn sold_out(&self, sku: &str) {
        self.sold_out.lock().unwrap().insert(sku.to_owned());
    }

    fn reserved(&self) -> Vec<u64> {
        self.reserved.lock().unwrap().clone()
    }
}

impl Stock for FakeStock {
    async fn reserve(&self, order: &Order) -> Result<(), StockError> {
        let down = self
            .outages
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if down {
            return Err(StockError::Unavailable {
                retry_after: Duration::from_secs(30),
            });
        }
        if self.sold_out.lock().unwrap().contains(&order.sku) {
            return Err(StockError::OutOfStock {
                sku: order.sku.clone(),
                available: 0,
            });
        }
        self.reserved.lock().unwrap().push(order.id);
        Ok(())
    }
}

/// A fresh in-memory broker with the orders service started on it, as the binary builds it.
async fn start(stock: &FakeStock) -> Result<(TestBroker, TestService), TestError> {
    let broker = TestBroker::memory();
    let service = broker
        .start(orders_service(
            conejo::Conejo::builder(broker.url()),
            stock.clone(),
        ))
        .await?;
    Ok((broker, service))
}

fn order(id: u64, sku: &str, quantity: u32) -> Order {
    Order {
        id,
        sku: sku.to_owned(),
        quantity,
    }
}

/// What the front end publishes: the order on `shop` as `order.created`, named by its id.
fn created(order: Order) -> Message {
    let id = format!("order-{}", order.id);
    Message::new(SHOP, ORDER_CREATED, Json(order)).message_id(id)
}

/// Publishes `message` (confirmed) and checks that a queue took it: `publish` answers a
/// message no queue took with `Ok(Published::Returned)`, which `?` lets through.
async fn place(broker: &TestBroker, message: Message) -> anyhow::Result<()> {
    let published = broker.publish(message).await?;
    anyhow::ensure!(
        published == Published::Accepted,
        "not routed: {published:?}"
    );
    Ok(())
}

/// (attempt, outcome) of each delivery of the orders queue, in the order they ended.
fn outcomes(service: &TestService) -> Vec<(u32, HandledAs)> {
    service
        .handled(ORDERS)
        .iter()
        .map(|h| (h.attempt, h.outcome))
        .collect()
}

#[tokio::test]
async fn an_order_created_on_the_shop_exchange_is_stored_and_announced() -> anyhow::Result<()> {
    let stock = FakeStock::default();
    let (broker, service) = start(&stock).await?;

    // The topology it declares: the `shop` topic exchange (a passive declaration fails if
    // it is missing), the queue it consumes and its dead-letter queue.
    broker
        .declare_exchange(&Exchange::topic(SHOP).passive())
        .await?;
    assert_eq!(broker.passive(ORDERS).await?.consumers, 1);
    assert_eq!(broker.ready("shop.orders.dlq").await?, 0);
    // Bound with `order.created` only: another key reaches no queue (published mandatory,
    // it comes back).
    let cancelled = broker
        .publish(Message::new(SHOP, "order.cancelled", "{}"))
        .await?;
    assert!(matches!(cancelled, Published::Returned { code: 312, .. }));

    // Stored whether anyone listens for its event or not (nobody does yet)...
    place(&broker, created(order(1, "SKU-007", 2))).await?;
    service.idle().await?;
    assert_eq!(outcomes(&service), [(1, HandledAs::Acked)]);

    // ...and announced to whoever does.
    let stored = broker.capture(SHOP, ORDER_STORED).await?;
    place(&broker, created(order(2, "SKU-014", 1))).await?;
    service.idle().await?;
    assert_eq!(outcomes(&service), [(1, HandledAs::Acked); 2]);
    assert_eq!(stock.reserved(), [1, 2]);
    let events = stored.take().await?;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].routing_key(), ORDER_STORED);
    assert_eq!(events[0].message_id(), Some("order-2-stored"));
    let event: Order = events[0].json()?;
    assert_eq!(
        (event.id, event.sku.as_str(), event.quantity),
        (2, "SKU-014", 1)
    );
    assert_eq!(broker.ready(ORDERS).await?, 0);
    service.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_stock_outage_is_retried_30_seconds_later_without_waiting_30_seconds()
-> anyhow::Result<()> {
    let stock = FakeStock::default();
    let (broker, service) = start(&stock).await?;
    let stored = broker.capture(SHOP, ORDER_STORED).await?;
    stock.down_for(1);

    let (clock, wall) = (tokio::time::Instant::now(), std::time::Instant::now());
    place(&broker, created(order(2, "SKU-014", 1))).await?;
    service.idle().await?;

    // Attempt 1 failed (the stock service was down) and went to a wait queue; attempt 2,
    // once the wait was over, was stored.
    assert_eq!(
        outcomes(&service),
        [(1, HandledAs::Retried), (2, HandledAs::Acked)]
    );
    let first = &service.handled(ORDERS)[0];
    assert!(
        first
            .failure
            .as_deref()
            .is_some_and(|f| f.contains("the stock service is unavailable")),
        "{first:?}"
    );
    assert!(
        first
            .sent_to
            .as_deref()
            .is_some_and(|q| q.starts_with("shop.orders.retry.")),
        "{first:?}"
    );
    // The stock service's 30 s (a wait queue within 10 % of it) passed on tokio's clock...
    assert!(
        clock.elapsed() >= Duration::from_secs(27),
        "{:?}",
        clock.elapsed()
    );
    // ...and not on the wall's.
    assert!(
        wall.elapsed() < Duration::from_secs(2),
        "{:?}",
        wall.elapsed()
    );
    assert_eq!(stock.reserved(), [2]);
    assert_eq!(stored.take().await?.len(), 1);
    let stats = service.queue(ORDERS);
    assert_eq!(
        (stats.retried, stats.acked, stats.handler_errors),
        (1, 2, 1)
    );
    service.stop().await?;
    Ok(())
}

#[tokio::test]
async fn an_order_that_cannot_be_fulfilled_is_dead_lettered_with_its_reason() -> anyhow::Result<()>
{
    let stock = FakeStock::default();
    stock.sold_out("SKU-404");
    let (broker, service) = start(&stock).await?;
    let stored = broker.capture(SHOP, ORDER_STORED).await?;

    place(&broker, created(order(3, "SKU-021", 0))).await?; // no items
    place(&broker, created(order(4, "SKU-404", 1))).await?; // sold out
    let malformed = Message::new(SHOP, ORDER_CREATED, "{\"id\": 99, \"sku\": oops");
    place(&broker, malformed).await?; // not JSON
    service.idle().await?;

    // Dead-lettered on their first attempt: retrying cannot help them.
    assert_eq!(outcomes(&service), [(1, HandledAs::DeadLettered); 3]);
    let dead = broker.take("shop.orders.dlq").await?;
    let reasons: Vec<_> = dead
        .iter()
        .map(|m| (m.dead_letter_reason(), m.failure(), m.error()))
        .collect();
    assert_eq!(
        reasons[..2],
        [
            (
                Some("rejected"),
                Some("handler"),
                Some("handler error: order 3 has no items")
            ),
            (
                Some("rejected"),
                Some("handler"),
                Some("handler error: order 4: SKU-404 is out of stock (0 left)")
            ),
        ]
    );
    assert_eq!(
        (reasons[2].0, reasons[2].1),
        (Some("rejected"), Some("decode"))
    );
    // The dead letters keep the route they came by, for a replay.
    assert_eq!(dead[0].header_str("conejo-original-exchange"), Some(SHOP));
    assert_eq!(
        dead[0].header_str("conejo-original-routing-key"),
        Some(ORDER_CREATED)
    );
    assert_eq!(stock.reserved(), Vec::<u64>::new());
    assert!(stored.take().await?.is_empty(), "nothing was stored");
    let stats = service.queue(ORDERS);
    assert_eq!((stats.dead_lettered, stats.decode_failures), (3, 1));
    service.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_connection_lost_mid_order_loses_nothing_and_stores_it_once() -> anyhow::Result<()> {
    let stock = FakeStock::default();
    let (broker, service) = start(&stock).await?;
    let stored = broker.capture(SHOP, ORDER_STORED).await?;
    let faults = broker.faults().expect("the in-memory broker");

    // The connection that receives the next delivery is dropped once it is sent: the handler
    // has the order, its ack cannot reach the broker, which redelivers it.
    faults.drop_connection_after_deliveries(1);
    place(&broker, created(order(5, "SKU-035", 3))).await?;
    // Not `idle` at once: while the service reconnects its queue has no consumer, and a
    // message waiting in a queue nobody consumes does not count as pending.
    service
        .until("reconnected", |s| s.status().reconnects() == 1)
        .await?;
    service.idle().await?;

    let handled = service.handled(ORDERS);
    let seen: Vec<_> = handled.iter().map(|h| (h.outcome, h.redelivered)).collect();
    // Stored on the first delivery (its ack lost with the connection); the redelivery counted
    // (crash-loop detection on a classic queue republishes it with its count); the copy
    // acked — by the idempotency layer, which knows the order was stored.
    assert_eq!(
        seen,
        [
            (HandledAs::Acked, false),
            (HandledAs::RedeliveryCounted, true),
            (HandledAs::Acked, false),
        ],
        "{handled:#?}"
    );
    assert!(
        handled
            .iter()
            .all(|h| h.message_id.as_deref() == Some("order-5"))
    );
    assert_eq!(stock.reserved(), [5], "reserved once");
    assert_eq!(stored.take().await?.len(), 1, "announced once");
    assert_eq!(broker.ready(ORDERS).await?, 0);
    assert_eq!(broker.ready("shop.orders.dlq").await?, 0);
    let stats = service.queue(ORDERS);
    assert_eq!(stats.delivered, 3, "{stats:?}");
    assert_eq!(stats.acked, 2, "{stats:?}"); // the first ack was lost with the connection
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    assert_eq!(service.status().reconnects(), 1);
    service.stop().await?;
    Ok(())
}
