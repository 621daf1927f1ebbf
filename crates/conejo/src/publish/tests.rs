//! The publisher against the in-memory broker: confirms, returns, nacks, a missing exchange,
//! waiting for a connection and its timeout, a blocked connection and the bound on messages
//! in flight, fire-and-forget, request-reply, and a handler's publishes holding its ack.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use lapin::{BasicProperties, types::FieldTable};

use crate::{
    Conejo, Context, Handler, HandlerError, Json, Message, PublishError, Publisher, PublisherState,
    QueueConfig, RequestError, Responder, Responding,
    broker::{QueueOptions, memory::Memory},
};

const URL: &str = "amqp://guest:guest@memory/%2f";

fn declared(memory: &Memory, queue: &str) {
    memory
        .declare_queue(
            queue,
            QueueOptions {
                durable: true,
                ..QueueOptions::default()
            },
            FieldTable::default(),
        )
        .unwrap();
}

async fn publisher(memory: &Memory) -> Publisher {
    Publisher::builder(URL)
        .memory(memory)
        .publish_timeout(Duration::from_secs(2))
        .reconnect_delay(Duration::from_millis(10), Duration::from_millis(50))
        .connect()
        .await
        .expect("connected")
}

async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_publish_returns_once_confirmed_with_its_properties() {
    let memory = Memory::new();
    declared(&memory, "orders");
    let publisher = publisher(&memory).await;
    publisher
        .send(
            Message::to_queue("orders", Json(serde_json::json!({ "id": 7 })))
                .message_id("order-7")
                .header("x-tenant", "acme"),
        )
        .await
        .unwrap();
    let messages = memory.take("orders");
    assert_eq!(messages.len(), 1);
    let properties = &messages[0].properties;
    assert_eq!(
        properties.content_type().as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    assert_eq!(
        *properties.delivery_mode(),
        Some(2),
        "persistent by default"
    );
    assert_eq!(
        properties.message_id().as_ref().map(|c| c.as_str()),
        Some("order-7")
    );
    assert!(
        properties
            .headers()
            .as_ref()
            .unwrap()
            .contains_key("x-tenant")
    );
    assert_eq!(&messages[0].data[..], br#"{"id":7}"#);
    let stats = publisher.stats();
    assert_eq!((stats.sent, stats.confirmed, stats.in_flight), (1, 1, 0));
    publisher.close().await;
    assert_eq!(publisher.state(), PublisherState::Closed);
    assert!(matches!(
        publisher.publish("", "orders", "late").await,
        Err(PublishError::Closed)
    ));
}

#[tokio::test(start_paused = true)]
async fn unroutable_nacked_and_missing_exchange_are_errors_that_say_so() {
    let memory = Memory::new();
    declared(&memory, "q");
    let publisher = publisher(&memory).await;
    let returned = publisher.publish("", "nowhere", "x").await.unwrap_err();
    assert!(
        matches!(&returned, PublishError::Returned { code: 312, routing_key, .. } if routing_key == "nowhere"),
        "{returned:?}"
    );
    assert!(!returned.may_have_been_published());
    memory.nack_publishes(1);
    assert!(matches!(
        publisher.publish("", "q", "x").await,
        Err(PublishError::Nacked)
    ));
    let missing = publisher
        .publish("no-such-exchange", "k", "x")
        .await
        .unwrap_err();
    assert!(
        matches!(&missing, PublishError::Channel(error) if crate::broker::is_not_found(error)),
        "{missing:?}"
    );
    // The broker closed that channel; the publisher goes on, on a fresh one.
    publisher.publish("", "q", "after").await.unwrap();
    assert_eq!(memory.take("q").len(), 1, "only the confirmed one is there");
    // Not mandatory: dropped by the broker, and confirmed.
    publisher
        .send(Message::to_queue("nowhere", "x").mandatory(false))
        .await
        .unwrap();
    let stats = publisher.stats();
    assert_eq!((stats.returned, stats.nacked), (1, 1), "{stats:?}");
    publisher.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_publish_waits_for_the_next_connection_and_times_out_without_one() {
    let memory = Memory::new();
    declared(&memory, "q");
    let publisher = publisher(&memory).await;
    publisher.publish("", "q", "first").await.unwrap();
    // The connection is lost and the next attempts are refused for a while: the publish
    // waits for the connection that comes back.
    memory.refuse_connections(5, None);
    memory.close_connections("fault injection");
    publisher.publish("", "q", "second").await.unwrap();
    // No connection for longer than the publish timeout: it fails, and is not sent later.
    memory.refuse_connections(u32::MAX, None);
    memory.close_connections("fault injection");
    let error = publisher.publish("", "q", "given up").await.unwrap_err();
    assert!(matches!(error, PublishError::Timeout(_)), "{error:?}");
    assert!(error.may_have_been_published());
    memory.refuse_connections(0, None);
    publisher.publish("", "q", "third").await.unwrap();
    let bodies: Vec<Bytes> = memory
        .take("q")
        .into_iter()
        .map(|m| Bytes::from(m.data))
        .collect();
    assert_eq!(
        bodies,
        ["first", "second", "third"].map(|b| Bytes::from_static(b.as_bytes()))
    );
    publisher.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_blocked_connection_holds_publishes_and_the_bound_on_those_in_flight() {
    let memory = Memory::new();
    declared(&memory, "q");
    let publisher = Publisher::builder(URL)
        .memory(&memory)
        .publish_timeout(Duration::from_secs(30))
        .max_in_flight(2)
        .connect()
        .await
        .unwrap();
    memory.block("low on memory");
    let first = tokio::spawn({
        let publisher = publisher.clone();
        async move { publisher.publish("", "q", "1").await }
    });
    eventually("blocked", || {
        matches!(publisher.state(), PublisherState::Blocked(_))
    })
    .await;
    let second = tokio::spawn({
        let publisher = publisher.clone();
        async move { publisher.publish("", "q", "2").await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Two in flight: a third waits for a place, and gets one only when the alarm clears.
    let third = tokio::spawn({
        let publisher = publisher.clone();
        async move { publisher.publish("", "q", "3").await }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!first.is_finished() && !second.is_finished() && !third.is_finished());
    assert_eq!(memory.counts("q").unwrap().ready, 0);
    let stats = publisher.stats();
    assert_eq!(stats.in_flight, 2, "{stats:?}");
    memory.unblock();
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    third.await.unwrap().unwrap();
    assert_eq!(memory.counts("q").unwrap().ready, 3);
    assert_eq!(publisher.state(), PublisherState::Connected);
    publisher.close().await;
}

#[tokio::test(start_paused = true)]
async fn fire_and_forget_is_handed_over_and_counted() {
    let memory = Memory::new();
    declared(&memory, "q");
    let publisher = publisher(&memory).await;
    for n in 0..10 {
        publisher
            .send_fire_and_forget(Message::to_queue("q", format!("m{n}")))
            .await
            .unwrap();
    }
    eventually("all confirmed", || publisher.stats().confirmed == 10).await;
    assert_eq!(memory.counts("q").unwrap().ready, 10);
    publisher.close().await;
}

/// Answers a price for a SKU, counting its calls.
#[derive(Clone, Default)]
struct Prices(Arc<Mutex<u32>>);

impl Responder for Prices {
    type Request = Json<String>;
    type Reply = Json<u64>;

    async fn respond(
        &self,
        Json(sku): Json<String>,
        _: &Context,
    ) -> Result<Json<u64>, HandlerError> {
        *self.0.lock().unwrap() += 1;
        Ok(Json(sku.len() as u64 * 100))
    }
}

#[tokio::test(start_paused = true)]
async fn requests_get_their_own_replies_many_at_once() {
    let memory = Memory::new();
    let prices = Prices::default();
    let service = Conejo::builder(URL)
        .memory(&memory)
        .queue_with(
            "prices",
            Responding::new(prices.clone()),
            QueueConfig::new(),
        )
        .build()
        .unwrap();
    let stop = service.shutdown_handle();
    let running = tokio::spawn(service.run_until(std::future::pending()));
    eventually("consuming", || {
        memory.counts("prices").is_some_and(|c| c.consumers == 1)
    })
    .await;
    let client = publisher(&memory).await;
    let mut asked = Vec::new();
    for sku in ["A", "BB", "CCC", "DDDD", "EEEEE"] {
        let client = client.clone();
        asked.push(tokio::spawn(async move {
            let reply = client
                .request(
                    Message::to_queue("prices", Json(sku)),
                    Duration::from_secs(10),
                )
                .await?;
            let Json(price): Json<u64> = reply.decode().expect("a price");
            Ok::<_, RequestError>((sku, price))
        }));
    }
    for answer in asked {
        let (sku, price) = answer.await.unwrap().unwrap();
        assert_eq!(price, sku.len() as u64 * 100, "{sku}");
    }
    assert_eq!(*prices.0.lock().unwrap(), 5);
    // A request nobody takes is unroutable; one nobody answers, a timeout.
    let error = client
        .request(
            Message::to_queue("nobody", Json("A")),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, RequestError::Publish(PublishError::Returned { .. })),
        "{error:?}"
    );
    declared(&memory, "silent");
    let error = client
        .request(
            Message::to_queue("silent", Json("A")),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
    assert!(matches!(error, RequestError::NoReply(_)), "{error:?}");
    // A request without reply-to is handled, its reply dropped, and acked.
    memory
        .publish(
            "",
            "prices",
            Bytes::from_static(br#""Z""#),
            BasicProperties::default(),
        )
        .unwrap();
    eventually("handled", || *prices.0.lock().unwrap() == 6).await;
    eventually("acked", || {
        memory
            .counts("prices")
            .is_some_and(|c| c.ready == 0 && c.unacked == 0)
    })
    .await;
    stop.shutdown();
    running.await.unwrap().unwrap();
    client.close().await;
}

/// Stores an order and announces it through its context, twice.
#[derive(Clone, Default)]
struct Announces(Arc<Mutex<Vec<u32>>>);

impl Handler for Announces {
    type Message = String;

    async fn handle(&self, order: String, ctx: &Context) -> Result<(), HandlerError> {
        self.0.lock().unwrap().push(ctx.attempt());
        // One awaited, one not: both hold the ack.
        let pending = ctx.publish(Message::to_queue("events", format!("{order}.stored")));
        drop(pending);
        ctx.publish(Message::to_queue("events", format!("{order}.announced")))
            .await?;
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_handlers_publishes_are_confirmed_before_its_input_is_acked() {
    let memory = Memory::new();
    declared(&memory, "orders");
    declared(&memory, "events");
    let handler = Announces::default();
    let service = Conejo::builder(URL)
        .memory(&memory)
        .queue_with(
            "orders",
            handler.clone(),
            QueueConfig::new().retry(
                crate::RetryPolicy::default()
                    .initial_delay(Duration::from_secs(1))
                    .max_delay(Duration::from_secs(1)),
            ),
        )
        .build()
        .unwrap();
    let stats = service.stats();
    let stop = service.shutdown_handle();
    let running = tokio::spawn(service.run_until(std::future::pending()));
    memory
        .publish(
            "",
            "orders",
            Bytes::from_static(b"o1"),
            BasicProperties::default(),
        )
        .unwrap();
    eventually("acked", || stats.queue("orders").unwrap().acked == 1).await;
    let events: Vec<Bytes> = memory
        .take("events")
        .into_iter()
        .map(|m| Bytes::from(m.data))
        .collect();
    assert_eq!(
        events,
        [Bytes::from_static(b"o1.announced")],
        "the dropped publish was never made"
    );
    // A publish the broker refuses: the handler's Ok is not an ack; the input is retried.
    memory.nack_publishes(1);
    memory
        .publish(
            "",
            "orders",
            Bytes::from_static(b"o2"),
            BasicProperties::default(),
        )
        .unwrap();
    eventually("retried and acked", || {
        let s = stats.queue("orders").unwrap();
        s.retried == 1 && s.acked == 3
    })
    .await;
    let queue = stats.queue("orders").unwrap();
    assert_eq!(
        queue.handler_publish_failures + queue.handler_errors,
        1,
        "{queue:?}"
    );
    assert_eq!(*handler.0.lock().unwrap(), vec![1, 1, 2]);
    let events: Vec<Bytes> = memory
        .take("events")
        .into_iter()
        .map(|m| Bytes::from(m.data))
        .collect();
    assert_eq!(events, [Bytes::from_static(b"o2.announced")]);
    stop.shutdown();
    running.await.unwrap().unwrap();
}

/// Publishes through its context without looking at the result: gives up on it at once.
#[derive(Clone, Default)]
struct DoesNotWait(Arc<Mutex<Vec<u32>>>);

impl Handler for DoesNotWait {
    type Message = String;

    async fn handle(&self, order: String, ctx: &Context) -> Result<(), HandlerError> {
        self.0.lock().unwrap().push(ctx.attempt());
        let publish = ctx.publish(Message::to_queue("events", format!("{order}.stored")));
        let _ = tokio::time::timeout(Duration::ZERO, publish).await;
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_publish_the_handler_did_not_wait_for_still_holds_the_ack_and_fails_it() {
    let memory = Memory::new();
    declared(&memory, "orders");
    declared(&memory, "events");
    let handler = DoesNotWait::default();
    let service = Conejo::builder(URL)
        .memory(&memory)
        .queue_with(
            "orders",
            handler.clone(),
            QueueConfig::new().retry(
                crate::RetryPolicy::default()
                    .initial_delay(Duration::from_secs(1))
                    .max_delay(Duration::from_secs(1)),
            ),
        )
        .build()
        .unwrap();
    let stats = service.stats();
    let stop = service.shutdown_handle();
    let running = tokio::spawn(service.run_until(std::future::pending()));
    memory.nack_publishes(1);
    memory
        .publish(
            "",
            "orders",
            Bytes::from_static(b"o1"),
            BasicProperties::default(),
        )
        .unwrap();
    eventually("retried, then acked", || {
        let s = stats.queue("orders").unwrap();
        s.retried == 1 && s.acked == 2
    })
    .await;
    let queue = stats.queue("orders").unwrap();
    assert_eq!(queue.handler_publish_failures, 1, "{queue:?}");
    assert_eq!(*handler.0.lock().unwrap(), vec![1, 2]);
    let events: Vec<Bytes> = memory
        .take("events")
        .into_iter()
        .map(|m| Bytes::from(m.data))
        .collect();
    assert_eq!(events, [Bytes::from_static(b"o1.stored")]);
    stop.shutdown();
    running.await.unwrap().unwrap();
}
