//! A conejo service on either broker: a retry through its wait queue and back, a dead
//! letter — the same journal and the same queues afterwards.

use std::time::Duration;

use conejo::{
    Conejo, Context, Handler, HandlerError, QueueConfig, RetryPolicy,
    testing::{HandledAs, TestBroker, TestQueue},
};

use crate::Outcome;

/// Fails the first attempt of `retry` (retried), rejects `bad`, handles the rest.
struct Flaky;

impl Handler for Flaky {
    type Message = String;

    async fn handle(&self, body: String, ctx: &Context) -> Result<(), HandlerError> {
        match body.as_str() {
            "bad" => Err(HandlerError::reject("bad order")),
            "retry" if ctx.attempt() == 1 => Err(HandlerError::retry("stock service down")),
            _ => Ok(()),
        }
    }
}

/// A retry round trip through conejo's wait queue (the broker's TTL and dead-lettering
/// bring it back), and a reject to the dead-letter queue, as the journal and the queues
/// show.
pub(crate) async fn service_retry_round_trip(broker: &TestBroker) -> Outcome {
    let queue = broker.name("conformance.service");
    broker.declare_queue(&TestQueue::new(&queue)).await?;
    let retry = RetryPolicy::default()
        .initial_delay(Duration::from_millis(100))
        .jitter(0.0);
    let service = broker
        .start(Conejo::builder(broker.url()).queue_with(
            &queue,
            Flaky,
            QueueConfig::new().retry(retry),
        ))
        .await?;
    broker.send(&queue, "retry").await?;
    broker.send(&queue, "bad").await?;
    broker.send(&queue, "fine").await?;
    service.idle().await?;

    let mut handled: Vec<(String, u32, HandledAs)> = service
        .handled(&queue)
        .iter()
        .map(|h| {
            (
                String::from_utf8_lossy(&h.body).into_owned(),
                h.attempt,
                h.outcome,
            )
        })
        .collect();
    handled.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    assert_eq!(
        handled,
        [
            ("bad".to_owned(), 1, HandledAs::DeadLettered),
            ("fine".to_owned(), 1, HandledAs::Acked),
            ("retry".to_owned(), 1, HandledAs::Retried),
            ("retry".to_owned(), 2, HandledAs::Acked),
        ]
    );
    let retried = service
        .handled(&queue)
        .into_iter()
        .find(|h| h.outcome == HandledAs::Retried)
        .expect("the retry");
    let wait = retried.sent_to.expect("its wait queue");
    assert!(wait.starts_with(&format!("{queue}.retry.")), "{wait}");
    assert_eq!(broker.ready(&wait).await?, 0);
    assert_eq!(broker.ready(&queue).await?, 0);
    let dead = broker.take(&format!("{queue}.dlq")).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].text(), "bad");
    assert_eq!(dead[0].dead_letter_reason(), Some("rejected"));
    assert_eq!(dead[0].error(), Some("handler error: bad order"));
    service.stop().await?;
    broker.cleanup().await?;
    Ok(())
}
