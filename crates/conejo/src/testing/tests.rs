//! The harness on the in-memory broker, with injected faults: what it reports of a service
//! is what happened, and the service behaves as it does against RabbitMQ — it reconnects,
//! gives back, redelivers, counts, and loses nothing. (The same behaviours are proved
//! against a real broker by the integration tests.)
//!
//! Why it is ~700 lines: one test per fault and behaviour, each self-contained through the
//! public harness, sharing the small handlers above them.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;

use super::*;
use crate::{
    Conejo, Context, Exchange, Handler, HandlerError, Json, Message, QueueConfig, RetryPolicy,
};

/// Records every body it handles; fails those listed, on their first attempt.
#[derive(Clone, Default)]
struct Orders {
    seen: Arc<Mutex<Vec<(String, u32)>>>,
    /// Bodies that fail (retry) on attempt 1.
    flaky: Arc<Vec<String>>,
    /// When set, each call waits for a notification first.
    hold: Option<Arc<Notify>>,
}

impl Handler for Orders {
    type Message = String;
    async fn handle(&self, body: String, ctx: &Context) -> Result<(), HandlerError> {
        if let Some(hold) = &self.hold {
            hold.notified().await;
        }
        self.seen
            .lock()
            .unwrap()
            .push((body.clone(), ctx.attempt()));
        if self.flaky.contains(&body) && ctx.attempt() == 1 {
            return Err(HandlerError::retry("stock service down"));
        }
        Ok(())
    }
}

/// Stores an order, then announces it to `shop` with the key `order.stored`.
#[derive(Clone, Default)]
struct Announcer {
    calls: Arc<AtomicU32>,
}

impl Handler for Announcer {
    type Message = Json<u32>;
    async fn handle(&self, Json(id): Json<u32>, ctx: &Context) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        ctx.publish(Message::new("shop", "order.stored", Json(id)))
            .await?;
        Ok(())
    }
}

fn outcomes(service: &TestService, queue: &str) -> Vec<(u32, HandledAs)> {
    service
        .handled(queue)
        .iter()
        .map(|h| (h.attempt, h.outcome))
        .collect()
}

async fn orders_queue(broker: &TestBroker) {
    broker
        .declare_queue(&TestQueue::new("orders"))
        .await
        .unwrap();
}

fn slow_retries() -> QueueConfig {
    QueueConfig::new().retry(
        RetryPolicy::default()
            .initial_delay(Duration::from_secs(27))
            .jitter(0.0),
    )
}

#[tokio::test]
async fn a_delivery_whose_connection_drops_is_redelivered_once() {
    let broker = TestBroker::memory();
    orders_queue(&broker).await;
    let service = broker
        .start(Conejo::builder(broker.url()).queue("orders", Orders::default()))
        .await
        .unwrap();
    let faults = broker.faults().unwrap();
    faults.drop_connection_after_deliveries(1);
    broker.send("orders", "first").await.unwrap();
    service
        .until("reconnected", |s| s.status().reconnects() == 1)
        .await
        .unwrap();
    service.idle().await.unwrap();
    let handled: Vec<(HandledAs, bool)> = service
        .handled("orders")
        .iter()
        .map(|h| (h.outcome, h.redelivered))
        .collect();
    assert_eq!(
        handled,
        [
            (HandledAs::Acked, false),
            (HandledAs::RedeliveryCounted, true),
            (HandledAs::Acked, false),
        ]
    );
    assert_eq!(broker.ready("orders").await.unwrap(), 0);
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_retry_waits_its_delay_in_tokio_time_and_comes_back_on_attempt_two() {
    let broker = TestBroker::memory();
    orders_queue(&broker).await;
    let orders = Orders {
        flaky: Arc::new(vec!["o-1".to_owned()]),
        ..Orders::default()
    };
    let service = broker
        .start(Conejo::builder(broker.url()).queue_with("orders", orders.clone(), slow_retries()))
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let wall = std::time::Instant::now();
    broker.send("orders", "o-1").await.unwrap();
    service.idle().await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(27),
        "tokio time passed: {:?}",
        started.elapsed()
    );
    assert!(
        wall.elapsed() < Duration::from_secs(5),
        "wall: {:?}",
        wall.elapsed()
    );
    assert_eq!(
        outcomes(&service, "orders"),
        [(1, HandledAs::Retried), (2, HandledAs::Acked)]
    );
    let retried = &service.handled("orders")[0];
    assert_eq!(
        retried.failure.as_deref(),
        Some("handler: handler error: stock service down")
    );
    assert!(
        retried
            .sent_to
            .as_deref()
            .is_some_and(|q| q.starts_with("orders.retry."))
    );
    assert_eq!(service.queue("orders").retried, 1);
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_stalled_network_loses_the_connection_after_two_heartbeats_and_nothing_is_lost() {
    let broker = TestBroker::memory();
    orders_queue(&broker).await;
    let hold = Arc::new(Notify::new());
    let orders = Orders {
        hold: Some(Arc::clone(&hold)),
        ..Orders::default()
    };
    let url = "amqp://guest:guest@conejo-memory/%2f?heartbeat=5";
    let service = broker
        .start(Conejo::builder(url).queue("orders", orders.clone()))
        .await
        .unwrap();
    broker.send("orders", "in-flight").await.unwrap();
    service
        .until("the delivery is in the handler", |s| {
            s.queue("orders").in_flight == 1
        })
        .await
        .unwrap();
    let faults = broker.faults().unwrap();
    let stalled = tokio::time::Instant::now();
    faults.stall();
    // The handler finishes during the stall: its ack cannot reach the broker.
    hold.notify_one();
    service
        .until("the connection is lost", |s| {
            s.status().state() != crate::ConnectionState::Connected
        })
        .await
        .unwrap();
    let lost_after = stalled.elapsed();
    assert!(
        lost_after >= Duration::from_secs(10) && lost_after < Duration::from_secs(12),
        "lost after {lost_after:?} (two 5 s heartbeats)"
    );
    // Reconnection attempts get no answer until the network heals.
    assert_eq!(service.status().reconnects(), 0);
    faults.heal();
    hold.notify_waiters();
    // The redelivery (and conejo's counting copy of it) pass the gate too.
    let releaser = tokio::spawn({
        let hold = Arc::clone(&hold);
        async move {
            loop {
                hold.notify_one();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    service
        .until("reconnected", |s| s.status().reconnects() == 1)
        .await
        .unwrap();
    service.idle().await.unwrap();
    releaser.abort();
    let seen = orders.seen.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        2,
        "handled before the stall, and again: {seen:?}"
    );
    assert_eq!(broker.ready("orders").await.unwrap(), 0);
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_handlers_event_is_confirmed_before_its_input_is_acked() {
    let broker = TestBroker::memory();
    broker
        .declare_exchange(&Exchange::topic("shop"))
        .await
        .unwrap();
    orders_queue(&broker).await;
    let events = broker.capture("shop", "order.stored").await.unwrap();
    let announcer = Announcer::default();
    let service = broker
        .start(Conejo::builder(broker.url()).queue_with(
            "orders",
            announcer.clone(),
            slow_retries(),
        ))
        .await
        .unwrap();

    // A withheld confirm holds the input's ack.
    let faults = broker.faults().unwrap();
    faults.withhold_confirms(1);
    broker.send("orders", Json(1)).await.unwrap();
    service
        .until("the handler ran", |_| {
            announcer.calls.load(Ordering::SeqCst) == 1
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        service.queue("orders").acked,
        0,
        "acked before its event was confirmed"
    );
    assert_eq!(faults.release_confirms(), 1);
    service.idle().await.unwrap();
    assert_eq!(service.queue("orders").acked, 1);

    // A returned event fails the delivery: retried, then announced.
    faults.return_publishes(1);
    broker.send("orders", Json(2)).await.unwrap();
    service.idle().await.unwrap();
    assert_eq!(
        outcomes(&service, "orders")[1..],
        [(1, HandledAs::Retried), (2, HandledAs::Acked)]
    );
    // The handler saw the publish fail (and returned its error).
    assert_eq!(service.queue("orders").handler_errors, 1);
    let bodies: Vec<u32> = events
        .take()
        .await
        .unwrap()
        .iter()
        .map(|m| m.json().unwrap())
        .collect();
    assert_eq!(bodies, [1, 2]);
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_connection_dropped_after_the_event_was_routed_redelivers_the_input_and_duplicates_the_event()
 {
    let broker = TestBroker::memory();
    broker
        .declare_exchange(&Exchange::topic("shop"))
        .await
        .unwrap();
    orders_queue(&broker).await;
    let events = broker.capture("shop", "#").await.unwrap();
    let announcer = Announcer::default();
    let service = broker
        .start(Conejo::builder(broker.url()).queue("orders", announcer.clone()))
        .await
        .unwrap();
    let faults = broker.faults().unwrap();
    faults.drop_connection_after_publishes(1);
    broker.send("orders", Json(7)).await.unwrap();
    service.idle().await.unwrap();
    // The event reached the broker, its confirm did not: the handler's publish failed and
    // its delivery was lost with the connection, so the input came back and was handled
    // again — the event at least once, never lost.
    let caught = events.take().await.unwrap();
    assert_eq!(caught.len(), 2, "{caught:?}");
    assert_eq!(service.queue("orders").handler_errors, 1);
    assert_eq!(announcer.calls.load(Ordering::SeqCst), 2);
    assert_eq!(broker.ready("orders").await.unwrap(), 0);
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_consumer_cancelled_by_the_broker_is_consumed_again() {
    let broker = TestBroker::memory();
    orders_queue(&broker).await;
    let orders = Orders::default();
    let service = broker
        .start(Conejo::builder(broker.url()).queue("orders", orders.clone()))
        .await
        .unwrap();
    let faults = broker.faults().unwrap();
    assert_eq!(faults.cancel_consumers("orders"), 1);
    // The broker sees a consumer again.
    let deadline = tokio::time::Instant::now() + DEFAULT_WAIT;
    while broker.passive("orders").await.unwrap().consumers == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never consumed again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    broker.send("orders", "after").await.unwrap();
    service.idle().await.unwrap();
    assert_eq!(
        orders.seen.lock().unwrap().as_slice(),
        [("after".to_owned(), 1)]
    );
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_channel_closed_by_the_broker_gives_back_its_deliveries_and_is_reopened() {
    let broker = TestBroker::memory();
    orders_queue(&broker).await;
    let hold = Arc::new(Notify::new());
    let orders = Orders {
        hold: Some(Arc::clone(&hold)),
        ..Orders::default()
    };
    let service = broker
        .start(Conejo::builder(broker.url()).queue("orders", orders.clone()))
        .await
        .unwrap();
    broker.send("orders", "held").await.unwrap();
    service
        .until("in the handler", |s| s.queue("orders").in_flight == 1)
        .await
        .unwrap();
    let faults = broker.faults().unwrap();
    assert_eq!(
        faults.close_consumer_channels(
            "orders",
            406,
            "PRECONDITION_FAILED - delivery acknowledgement timed out"
        ),
        1
    );
    let releaser = tokio::spawn({
        let hold = Arc::clone(&hold);
        async move {
            loop {
                hold.notify_one();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    service.idle().await.unwrap();
    releaser.abort();
    let stats = service.queue("orders");
    assert_eq!(stats.late_settlements, 1, "{stats:?}");
    assert_eq!(
        stats.acked, 2,
        "the counting copy, then the message: {stats:?}"
    );
    assert_eq!(broker.ready("orders").await.unwrap(), 0);
    assert_eq!(service.status().reconnects(), 0, "the connection stayed");
    service.stop().await.unwrap();
}

#[tokio::test]
async fn connections_refused_at_startup_are_waited_out() {
    let broker = TestBroker::memory();
    orders_queue(&broker).await;
    let faults = broker.faults().unwrap();
    faults.refuse_connections(3, None);
    let started = tokio::time::Instant::now();
    let service = broker
        .start(Conejo::builder(broker.url()).queue("orders", Orders::default()))
        .await
        .unwrap();
    // 100 ms, 200 ms, 400 ms of back-off (with jitter) between the attempts.
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
    broker.send("orders", "late").await.unwrap();
    service.idle().await.unwrap();
    assert_eq!(service.queue("orders").acked, 1);
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_nacked_dead_letter_is_given_back_then_dead_lettered() {
    let broker = TestBroker::memory();
    orders_queue(&broker).await;
    struct Rejecting;
    impl Handler for Rejecting {
        type Message = String;
        async fn handle(&self, _: String, _: &Context) -> Result<(), HandlerError> {
            Err(HandlerError::reject("not an order"))
        }
    }
    let service = broker
        .start(Conejo::builder(broker.url()).queue("orders", Rejecting))
        .await
        .unwrap();
    let faults = broker.faults().unwrap();
    faults.nack_publishes(1);
    broker.send("orders", "junk").await.unwrap();
    service.idle().await.unwrap();
    let ends: Vec<HandledAs> = service
        .handled("orders")
        .iter()
        .map(|h| h.outcome)
        .collect();
    assert_eq!(
        ends,
        [
            HandledAs::Requeued,
            HandledAs::RedeliveryCounted,
            HandledAs::DeadLettered
        ]
    );
    let dead = broker.take("orders.dlq").await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].dead_letter_reason(), Some("rejected"));
    assert_eq!(dead[0].error(), Some("handler error: not an order"));
    assert_eq!(service.queue("orders").publish_failures, 1);
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_resource_alarm_holds_a_handlers_publish_until_it_clears() {
    let broker = TestBroker::memory();
    broker
        .declare_exchange(&Exchange::topic("shop"))
        .await
        .unwrap();
    orders_queue(&broker).await;
    let events = broker.capture("shop", "order.stored").await.unwrap();
    let service = broker
        .start(Conejo::builder(broker.url()).queue("orders", Announcer::default()))
        .await
        .unwrap();
    let faults = broker.faults().unwrap();
    faults.block("memory alarm");
    broker.send("orders", Json(5)).await.unwrap();
    service
        .until("blocked", |s| s.status().blocked().is_some())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(service.queue("orders").acked, 0);
    assert!(service.idle_within(Duration::from_secs(1)).await.is_err());
    faults.unblock();
    service.idle().await.unwrap();
    assert_eq!(service.queue("orders").acked, 1);
    assert_eq!(events.take().await.unwrap().len(), 1);
    assert_eq!(service.status().blocked(), None);
    service.stop().await.unwrap();
}

#[tokio::test]
async fn stopping_finishes_the_running_handler_and_gives_back_the_rest() {
    let broker = TestBroker::memory();
    orders_queue(&broker).await;
    let hold = Arc::new(Notify::new());
    let orders = Orders {
        hold: Some(Arc::clone(&hold)),
        ..Orders::default()
    };
    let service = broker
        .start(Conejo::builder(broker.url()).queue_with(
            "orders",
            orders.clone(),
            QueueConfig::new().concurrency(1),
        ))
        .await
        .unwrap();
    for n in 0..3 {
        broker.send("orders", format!("o-{n}")).await.unwrap();
    }
    service
        .until("one in the handler", |s| s.queue("orders").in_flight >= 1)
        .await
        .unwrap();
    let stats = service.stats();
    let stopping = tokio::spawn(service.stop());
    tokio::time::sleep(Duration::from_millis(50)).await;
    hold.notify_one();
    stopping.await.unwrap().unwrap();
    let seen = orders.seen.lock().unwrap().clone();
    assert_eq!(seen, [("o-0".to_owned(), 1)]);
    assert_eq!(stats.queue("orders").unwrap().acked, 1);
    assert_eq!(
        broker.ready("orders").await.unwrap(),
        2,
        "the others are back in the queue"
    );
}

#[tokio::test]
async fn a_service_that_cannot_declare_its_queue_fails_to_start_with_the_brokers_reason() {
    let broker = TestBroker::memory();
    broker
        .declare_queue(&TestQueue::new("orders").transient())
        .await
        .unwrap();
    let error = broker
        .start(Conejo::builder(broker.url()).queue("orders", Orders::default()))
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("PRECONDITION_FAILED") && text.contains("durable"),
        "{text}"
    );
}

#[tokio::test]
async fn the_harness_reports_refusals_with_the_brokers_codes_and_recovers() {
    let broker = TestBroker::memory();
    let missing = broker.ready("nowhere").await.unwrap_err();
    assert_eq!(missing.reply_code(), Some(404), "{missing}");
    let unroutable = broker
        .publish(Message::new("", "nowhere", "x"))
        .await
        .unwrap();
    assert_eq!(
        unroutable,
        Published::Returned {
            code: 312,
            text: "NO_ROUTE".to_owned()
        }
    );
    let no_exchange = broker
        .publish(Message::new("missing", "k", "x"))
        .await
        .unwrap_err();
    assert_eq!(no_exchange.reply_code(), Some(404), "{no_exchange}");
    // The control channel was closed by those refusals and is opened again.
    orders_queue(&broker).await;
    broker.send("orders", "ok").await.unwrap();
    assert_eq!(broker.take("orders").await.unwrap()[0].text(), "ok");
    assert!(matches!(
        broker.send("nowhere", "x").await,
        Err(TestError::Refused { code: 312, .. })
    ));
}

#[tokio::test]
async fn an_event_the_handler_did_not_wait_for_still_holds_its_inputs_ack() {
    /// Hands its event over, waits 10 ms for the confirm at most, and returns `Ok`.
    struct Impatient;
    impl Handler for Impatient {
        type Message = Json<u32>;
        async fn handle(&self, Json(id): Json<u32>, ctx: &Context) -> Result<(), HandlerError> {
            let publish = ctx.publish(Message::new("shop", "order.stored", Json(id)));
            let _ = tokio::time::timeout(Duration::from_millis(10), publish).await;
            Ok(())
        }
    }
    let broker = TestBroker::memory();
    broker
        .declare_exchange(&Exchange::topic("shop"))
        .await
        .unwrap();
    orders_queue(&broker).await;
    let events = broker.capture("shop", "order.stored").await.unwrap();
    let service = broker
        .start(Conejo::builder(broker.url()).queue("orders", Impatient))
        .await
        .unwrap();
    let faults = broker.faults().unwrap();
    faults.withhold_confirms(1);
    broker.send("orders", Json(1)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = service.queue("orders");
    assert_eq!(
        (stats.acked, stats.in_flight),
        (0, 1),
        "acked before its event was confirmed"
    );
    assert_eq!(faults.release_confirms(), 1);
    service.idle().await.unwrap();
    assert_eq!(service.queue("orders").acked, 1);
    assert_eq!(outcomes(&service, "orders"), [(1, HandledAs::Acked)]);

    // Its event nacked: the handler's Ok becomes a publish failure, retried.
    faults.nack_publishes(1);
    broker.send("orders", Json(2)).await.unwrap();
    service.idle().await.unwrap();
    assert_eq!(service.queue("orders").handler_publish_failures, 1);
    let ends = outcomes(&service, "orders");
    assert_eq!(ends[1], (1, HandledAs::Retried), "{ends:?}");
    assert_eq!(
        service.handled("orders")[1]
            .failure
            .as_deref()
            .map(|f| f.starts_with("publish")),
        Some(true)
    );
    let ids: Vec<u32> = events
        .take()
        .await
        .unwrap()
        .iter()
        .map(|m| m.json().unwrap())
        .collect();
    assert_eq!(
        ids,
        [1, 2],
        "the nacked event was published again by the retry"
    );
    service.stop().await.unwrap();
}

/// (stream offset, attempt) of each call.
type Calls = Vec<(Option<u64>, u32)>;

/// Records each message's stream offset.
#[derive(Clone, Default)]
struct Offsets(Arc<Mutex<Calls>>);

impl Handler for Offsets {
    type Message = String;
    async fn handle(&self, body: String, ctx: &Context) -> Result<(), HandlerError> {
        self.0
            .lock()
            .unwrap()
            .push((ctx.stream_offset(), ctx.attempt()));
        if body == "flaky" && ctx.attempt() == 1 {
            return Err(HandlerError::retry("not yet"));
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_stream_queue_is_numbered_retried_in_place_and_committed() {
    let broker = TestBroker::memory();
    let offsets = Offsets::default();
    let service = broker
        .start(
            Conejo::builder(broker.url()).queue_with(
                "events",
                offsets.clone(),
                QueueConfig::new()
                    .stream(crate::StreamOffset::First)
                    .concurrency(1)
                    .retry(RetryPolicy::default().initial_delay(Duration::from_secs(3))),
            ),
        )
        .await
        .unwrap();
    for body in ["a", "flaky", "c"] {
        broker.send("events", body).await.unwrap();
    }
    service
        .until("offset 2 committed", |s| {
            s.queue("events").stream_offset == Some(2)
        })
        .await
        .unwrap();
    // In place: the retry held its slot (concurrency 1), and no copy went through a wait
    // queue.
    assert_eq!(
        *offsets.0.lock().unwrap(),
        [(Some(0), 1), (Some(1), 1), (Some(1), 2), (Some(2), 1)]
    );
    assert_eq!(outcomes(&service, "events").len(), 4);
    assert_eq!(service.queue("events").retried, 1);
    service.stop().await.unwrap();
}
