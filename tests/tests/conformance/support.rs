//! What the scenarios share: bounded waits, and short ways to publish and read back.

use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use conejo::{
    Message,
    testing::{Published, TestBroker, TestConsumer, TestDelivery, TestError, TestMessage},
};

/// How long a delivery or a condition that must come may take (tokio's time: free in
/// memory).
pub(crate) const WAIT: Duration = Duration::from_secs(5);

/// How long the scenarios watch to see that nothing else comes. Live, that is real time:
/// short, as the broker sends what it sends within milliseconds.
pub(crate) const QUIET: Duration = Duration::from_millis(300);

/// How often a poll looks again.
const POLL: Duration = Duration::from_millis(10);

/// The next delivery, which must come within [`WAIT`].
pub(crate) async fn delivered(consumer: &mut TestConsumer) -> anyhow::Result<TestDelivery> {
    consumer
        .next(WAIT)
        .await?
        .with_context(|| format!("no delivery within {WAIT:?} to {consumer:?}"))
}

/// Nothing more is delivered for [`QUIET`].
pub(crate) async fn nothing_more(consumer: &mut TestConsumer) -> anyhow::Result<()> {
    if let Some(delivery) = consumer.next(QUIET).await? {
        bail!("nothing more was to be delivered, got {delivery:?}");
    }
    Ok(())
}

/// Waits (at most [`WAIT`]) until `queue` holds exactly `count` ready messages.
pub(crate) async fn until_ready(
    broker: &TestBroker,
    queue: &str,
    count: u32,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ready = broker.ready(queue).await?;
        if ready == count {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "'{queue}' holds {ready} ready messages, not {count}, after {WAIT:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Publishes `message` and gives the broker's answer.
pub(crate) async fn publish(broker: &TestBroker, message: Message) -> anyhow::Result<Published> {
    let what = format!("{message:?}");
    broker
        .publish(message)
        .await
        .with_context(|| format!("publish {what}"))
}

/// Publishes `body` to `exchange` with `routing_key` (mandatory), and gives the answer.
pub(crate) async fn publish_to(
    broker: &TestBroker,
    exchange: &str,
    routing_key: &str,
    body: &'static str,
) -> anyhow::Result<Published> {
    publish(broker, Message::new(exchange, routing_key, body)).await
}

/// The answer to a mandatory message no queue took.
pub(crate) fn no_route() -> Published {
    Published::Returned {
        code: 312,
        text: "NO_ROUTE".to_owned(),
    }
}

/// The bodies of `messages`, in order.
pub(crate) fn bodies(messages: &[TestMessage]) -> Vec<String> {
    messages.iter().map(TestMessage::text).collect()
}

/// Takes every ready message of `queue`, and gives their bodies.
pub(crate) async fn take_bodies(broker: &TestBroker, queue: &str) -> anyhow::Result<Vec<String>> {
    Ok(bodies(&broker.take(queue).await?))
}

/// The refusal `result` must be: its reply code and text.
pub(crate) fn refusal<T: std::fmt::Debug>(
    result: Result<T, TestError>,
) -> anyhow::Result<(u16, String)> {
    match result {
        Err(TestError::Refused { code, text, .. }) => Ok((code, text)),
        Err(other) => bail!("expected a refusal by the broker, got {other}"),
        Ok(value) => bail!("expected a refusal by the broker, got {value:?}"),
    }
}
