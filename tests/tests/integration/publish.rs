//! Publishing against RabbitMQ: confirmed publishes and their properties, returns, nacks, a
//! missing exchange, many confirms in flight, a forced close in the middle of publishing,
//! a handler's publishes confirmed before its input is acked, and request-reply over direct
//! reply-to.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use conejo::{
    Conejo, Context, Handler, HandlerError, Json, Message, PublishError, Publisher, PublisherState,
    RequestError, Responder, Responding,
    types::{AMQPValue, FieldTable, LongString},
};
use conejo_tests::{Scenario, amqp_url, queue_config, unique_name};

const WAIT: Duration = Duration::from_secs(20);

async fn publisher(name: &str) -> anyhow::Result<Publisher> {
    Ok(Publisher::builder(amqp_url())
        .connection_name(name)
        .publish_timeout(Duration::from_secs(10))
        .reconnect_delay(Duration::from_millis(50), Duration::from_millis(200))
        .connect()
        .await?)
}

#[tokio::test]
async fn a_publish_is_confirmed_routed_and_carries_its_properties() -> anyhow::Result<()> {
    let scenario = Scenario::new("published").await?;
    let Scenario { broker, queue } = &scenario;
    let publisher = publisher(&unique_name("conn-publisher")).await?;
    publisher
        .send(
            Message::to_queue(queue, Json(serde_json::json!({ "id": 7 })))
                .message_id("order-7")
                .header("x-tenant", "acme"),
        )
        .await?;
    assert_eq!(publisher.state(), PublisherState::Connected);
    let drained = broker.drain(queue).await?;
    assert_eq!(drained.len(), 1);
    let message = &drained[0];
    assert_eq!(message.content_type.as_deref(), Some("application/json"));
    assert_eq!(message.message_id.as_deref(), Some("order-7"));
    assert_eq!(message.header_str("x-tenant").as_deref(), Some("acme"));
    assert_eq!(message.json::<serde_json::Value>()?["id"], 7);
    let stats = publisher.stats();
    assert_eq!((stats.sent, stats.confirmed, stats.in_flight), (1, 1, 0));
    publisher.close().await;
    assert!(matches!(
        publisher.publish("", queue, "late").await,
        Err(PublishError::Closed)
    ));
    scenario.cleanup().await
}

#[tokio::test]
async fn unroutable_is_returned_and_a_missing_exchange_closes_only_the_publishers_channel()
-> anyhow::Result<()> {
    let scenario = Scenario::new("returned").await?;
    let Scenario { broker, queue } = &scenario;
    let publisher = publisher(&unique_name("conn-returned")).await?;
    let returned = publisher
        .publish("", &unique_name("no-such-queue"), "x")
        .await
        .unwrap_err();
    assert!(
        matches!(returned, PublishError::Returned { code: 312, .. }),
        "{returned:?}"
    );
    let missing = publisher
        .publish(&unique_name("no-such-exchange"), "k", "x")
        .await
        .unwrap_err();
    assert!(matches!(missing, PublishError::Channel(_)), "{missing:?}");
    assert!(missing.to_string().contains("NOT_FOUND"), "{missing}");
    // The broker closed that channel only: the next publish goes out on a fresh one, on the
    // same connection.
    publisher.publish("", queue, "after").await?;
    assert_eq!(broker.message_count(queue).await?, 1);
    publisher.close().await;
    scenario.cleanup().await
}

#[tokio::test]
async fn a_full_queue_that_rejects_publishes_nacks_them() -> anyhow::Result<()> {
    let scenario = Scenario::undeclared("full").await?;
    let Scenario { broker, queue } = &scenario;
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(1));
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    broker.declare_queue_with_args(queue, arguments).await?;
    let publisher = publisher(&unique_name("conn-full")).await?;
    publisher.publish("", queue, "fits").await?;
    let nacked = publisher.publish("", queue, "overflows").await.unwrap_err();
    assert!(matches!(nacked, PublishError::Nacked), "{nacked:?}");
    assert!(!nacked.may_have_been_published());
    assert_eq!(publisher.stats().nacked, 1);
    publisher.close().await;
    scenario.cleanup().await
}

#[tokio::test]
async fn many_publishes_are_in_flight_at_once_and_all_confirmed() -> anyhow::Result<()> {
    let scenario = Scenario::new("pipelined").await?;
    let Scenario { broker, queue } = &scenario;
    let publisher = publisher(&unique_name("conn-pipelined")).await?;
    const N: usize = 2_000;
    let publishes = (0..N).map(|n| {
        let publisher = publisher.clone();
        let queue = queue.clone();
        async move { publisher.publish("", &queue, format!("m{n}")).await }
    });
    let results = futures::future::join_all(publishes).await;
    assert!(
        results.iter().all(Result::is_ok),
        "{:?}",
        results.iter().find(|r| r.is_err())
    );
    broker.wait_for_count(queue, N as u32, WAIT).await?;
    let stats = publisher.stats();
    assert_eq!((stats.confirmed, stats.in_flight), (N as u64, 0));
    publisher.close().await;
    scenario.cleanup().await
}

#[tokio::test]
async fn publishes_wait_through_a_forced_close_and_lose_nothing_confirmed() -> anyhow::Result<()> {
    let scenario = Scenario::new("reconnecting").await?;
    let Scenario { broker, queue } = &scenario;
    let name = unique_name("conn-reconnecting");
    let publisher = publisher(&name).await?;
    publisher.publish("", queue, "before").await?;
    let connection = conejo_tests::wait_for_connection_present(&name, WAIT).await?;
    // A steady stream of publishes while the broker closes the publisher's connection:
    // every publish that returned Ok is on the broker; the others say they may be.
    let stream = tokio::spawn({
        let (publisher, queue) = (publisher.clone(), queue.clone());
        async move {
            let mut confirmed = Vec::new();
            let mut failed = 0;
            for n in 0..400 {
                match publisher.publish("", &queue, format!("m{n}")).await {
                    Ok(()) => confirmed.push(format!("m{n}")),
                    Err(error) => {
                        assert!(error.may_have_been_published(), "{error:?}");
                        failed += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (confirmed, failed)
        }
    });
    conejo_tests::rabbitmqctl_close_connection(&connection.name, "fault injection").await?;
    let (confirmed, failed) = stream.await?;
    publisher.publish("", queue, "after").await?;
    let on_broker: Vec<String> = broker
        .drain(queue)
        .await?
        .into_iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    for body in &confirmed {
        assert!(
            on_broker.contains(body),
            "{body} was confirmed and is not there"
        );
    }
    assert!(on_broker.contains(&"after".to_owned()));
    let stats = publisher.stats();
    eprintln!(
        "{} confirmed, {failed} failed through the close; on the broker: {}; {stats:?}",
        confirmed.len(),
        on_broker.len()
    );
    assert!(
        stats.sent > stats.confirmed || failed == 0,
        "the close came in the middle: {stats:?}"
    );
    publisher.close().await;
    scenario.cleanup().await
}

/// Stores an order and announces it through its context.
#[derive(Clone, Default)]
struct AnnouncesStored {
    events: String,
    handled: Arc<Mutex<u32>>,
}

impl Handler for AnnouncesStored {
    type Message = Json<u64>;

    async fn handle(&self, Json(id): Json<u64>, ctx: &Context) -> Result<(), HandlerError> {
        *self.handled.lock().unwrap() += 1;
        ctx.publish(Message::to_queue(&self.events, Json(id)).message_id(format!("stored-{id}")))
            .await?;
        Ok(())
    }
}

#[tokio::test]
async fn a_handlers_publishes_are_confirmed_on_a_connection_of_their_own_before_its_ack()
-> anyhow::Result<()> {
    let scenario = Scenario::new("announcing").await?;
    let Scenario { broker, queue } = &scenario;
    let events = unique_name("events");
    broker.declare_queue(&events).await?;
    let name = unique_name("conn-announcing");
    let handler = AnnouncesStored {
        events: events.clone(),
        handled: Arc::default(),
    };
    for id in 0..50u64 {
        broker.publish_json(queue, &id).await?;
    }
    let service = scenario.spawn(
        Conejo::builder(amqp_url())
            .connection_name(&name)
            .queue_with(queue, handler.clone(), queue_config().concurrency(8)),
    )?;
    service.wait_for(queue, WAIT, |s| s.acked == 50).await?;
    // Every input acked has its event on the broker already.
    assert_eq!(broker.message_count(&events).await?, 50);
    assert_eq!(service.stats().publisher().confirmed, 50);
    // The events went out on the publisher's own connection, beside the consuming one.
    assert!(conejo_tests::find_connection(&format!("{name}-publish"))?.is_some());
    assert!(conejo_tests::find_connection(&name)?.is_some());
    broker.delete_queue(&events).await?;
    scenario.finish(service).await
}

/// Answers a price per SKU.
struct Prices;

impl Responder for Prices {
    type Request = Json<String>;
    type Reply = Json<u64>;

    async fn respond(
        &self,
        Json(sku): Json<String>,
        _: &Context,
    ) -> Result<Json<u64>, HandlerError> {
        Ok(Json(sku.len() as u64 * 100))
    }
}

#[tokio::test]
async fn requests_over_direct_reply_to_get_their_own_replies() -> anyhow::Result<()> {
    let scenario = Scenario::new("prices").await?;
    let Scenario { queue, .. } = &scenario;
    let service = scenario.spawn(Conejo::builder(amqp_url()).queue_with(
        queue,
        Responding::new(Prices),
        queue_config(),
    ))?;
    scenario
        .broker
        .wait_for_consumer_count(queue, 1, WAIT)
        .await?;
    let client = publisher(&unique_name("conn-client")).await?;
    let asked = (0..20).map(|n| {
        let (client, queue) = (client.clone(), queue.clone());
        async move {
            let sku = "X".repeat(n + 1);
            let reply = client
                .request(
                    Message::to_queue(&queue, Json(&sku)),
                    Duration::from_secs(10),
                )
                .await?;
            let Json(price): Json<u64> = reply.decode().expect("a price");
            anyhow::ensure!(price == sku.len() as u64 * 100, "{sku}: {price}");
            Ok::<_, anyhow::Error>(())
        }
    });
    for answer in futures::future::join_all(asked).await {
        answer?;
    }
    let nobody = client
        .request(
            Message::to_queue(&unique_name("nobody"), Json("X")),
            Duration::from_secs(2),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(nobody, RequestError::Publish(PublishError::Returned { .. })),
        "{nobody:?}"
    );
    client.close().await;
    scenario.finish(service).await
}
