//! Handlers that panic, hang or vanish: panics outside the handler still settle, an async
//! handler is cut at its timeout, a blocking one abandoned with its slot kept, a task that
//! dies without a result gives its message back.

use super::*;

/// An error whose `Display` panics.
#[derive(Debug)]
struct Treacherous;

impl std::fmt::Display for Treacherous {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        panic!("Display of Treacherous")
    }
}

impl std::error::Error for Treacherous {}

/// An error that panics when dropped: conejo drops it after dead-lettering the message,
/// outside any `catch_unwind`, so the delivery's task dies without a result.
#[derive(Debug)]
struct ExplodesOnDrop;

impl std::fmt::Display for ExplodesOnDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("explodes on drop")
    }
}

impl std::error::Error for ExplodesOnDrop {}

impl Drop for ExplodesOnDrop {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("ExplodesOnDrop dropped");
        }
    }
}

#[tokio::test]
async fn panics_outside_the_handler_still_settle_and_the_queue_goes_on() -> anyhow::Result<()> {
    let scenario = Scenario::new("treacherous").await?;
    let Scenario { broker, queue } = &scenario;
    for body in ["display", "policy", "fine"] {
        broker.publish_bytes(queue, body.as_bytes()).await?;
    }
    let handler = Scripted::new(|body, _| match body {
        "display" => Err(HandlerError::reject(Treacherous)),
        "policy" => Err(HandlerError::retry("the policy will panic on this one")),
        _ => Ok(()),
    });
    let service = scenario.spawn(Conejo::builder(amqp_url()).queue_with(
        queue,
        handler.clone(),
        queue_config().concurrency(1).on_failure(|failure, _| {
            if failure.to_string().contains("policy will panic") {
                panic!("a failure policy with a bug");
            }
            failure.default_outcome()
        }),
    ))?;
    // The policy formats every failure: for "display" it panics inside the policy too, then
    // again when conejo writes the error header.
    let stats = service.wait_for(queue, WAIT, |s| s.acked == 3).await?;
    assert!(!service.is_finished());
    service.stop().await??;
    assert_eq!(
        (stats.dead_lettered, stats.unsettled, stats.requeued),
        (2, 0, 0),
        "{stats:?}"
    );
    let dead = broker.drain(&format!("{queue}.dlq")).await?;
    let bodies: Vec<_> = dead.iter().map(|m| m.body.clone()).collect();
    assert_eq!(bodies, vec![b"display".to_vec(), b"policy".to_vec()]);
    assert_eq!(
        dead[0].header_str("conejo-error").as_deref(),
        Some("handler failure (its error's Display panicked)")
    );
    assert_eq!(handler.calls_of("fine").len(), 1);
    scenario.cleanup().await
}

#[tokio::test]
async fn a_hanging_async_handler_is_cut_at_its_timeout() -> anyhow::Result<()> {
    let scenario = Scenario::new("hang").await?;
    let Scenario { broker, queue } = &scenario;
    broker.publish_bytes(queue, b"hang").await?;

    struct Hangs;
    impl Handler for Hangs {
        type Message = String;
        async fn handle(&self, _: String, _: &Context) -> Result<(), HandlerError> {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        }
    }
    let started = Instant::now();
    let service = scenario.spawn(
        Conejo::builder(amqp_url()).queue_with(
            queue,
            Hangs,
            queue_config()
                .timeout(Duration::from_millis(300))
                .retry(RetryPolicy::none()),
        ),
    )?;
    broker
        .wait_for_count(&format!("{queue}.dlq"), 1, WAIT)
        .await?;
    let elapsed = started.elapsed();
    let stats = service.stats().queue(queue).unwrap();
    service.stop().await??;
    assert_eq!(
        (stats.timeouts, stats.abandoned, stats.dead_lettered),
        (1, 0, 1)
    );
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    let dead = broker.drain(&format!("{queue}.dlq")).await?;
    assert_eq!(
        dead[0].header_str("conejo-failure").as_deref(),
        Some("timeout")
    );
    assert_eq!(
        dead[0].header_str("conejo-reason").as_deref(),
        Some("attempts-exhausted")
    );
    scenario.cleanup().await
}

/// Sleeps (blocking its thread) for as many milliseconds as the body says, recording when it
/// started and ended.
#[derive(Clone, Default)]
struct SleepsBodyMillis {
    spans: Arc<Mutex<Vec<(String, Instant, Instant)>>>,
}

impl BlockingHandler for SleepsBodyMillis {
    type Message = String;

    fn handle(&self, body: String, _: &Context) -> Result<(), HandlerError> {
        let start = Instant::now();
        let ms: u64 = body.parse()?;
        std::thread::sleep(Duration::from_millis(ms));
        self.spans
            .lock()
            .unwrap()
            .push((body, start, Instant::now()));
        Ok(())
    }
}

#[tokio::test]
async fn a_hanging_blocking_handler_is_abandoned_but_keeps_its_slot() -> anyhow::Result<()> {
    let scenario = Scenario::new("hang-blocking").await?;
    let Scenario { broker, queue } = &scenario;
    broker.publish_bytes(queue, b"1500").await?;
    broker.publish_bytes(queue, b"10").await?;
    let handler = SleepsBodyMillis::default();
    let service = scenario.spawn(
        Conejo::builder(amqp_url()).queue_with(
            queue,
            Blocking::new(handler.clone()),
            queue_config()
                .concurrency(1)
                .timeout(Duration::from_millis(200))
                .retry(RetryPolicy::none()),
        ),
    )?;
    let stats = service.wait_for(queue, WAIT, |s| s.acked == 2).await?;
    // the abandoned thread's own end is recorded once it returns
    let deadline = Instant::now() + WAIT;
    while handler.spans.lock().unwrap().len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    service.stop().await??;
    assert_eq!(
        (stats.timeouts, stats.abandoned, stats.dead_lettered),
        (1, 1, 1),
        "{stats:?}"
    );
    let spans = handler.spans.lock().unwrap().clone();
    let slow = spans
        .iter()
        .find(|s| s.0 == "1500")
        .expect("slow one returned");
    let quick = spans.iter().find(|s| s.0 == "10").expect("quick one ran");
    // concurrency 1 held: the next message started only once the abandoned thread returned
    assert!(quick.1 >= slow.2, "the concurrency bound was broken");
    scenario.cleanup().await
}

#[test]
fn failures_name_their_kind() {
    assert_eq!(Failure::Timeout(Duration::from_secs(1)).kind(), "timeout");
    assert_eq!(
        Failure::Timeout(Duration::from_secs(1)).default_outcome(),
        Outcome::Retry
    );
}

#[tokio::test]
async fn a_task_that_dies_without_a_result_gives_its_message_back() -> anyhow::Result<()> {
    let scenario = Scenario::new("dies").await?;
    let Scenario { broker, queue } = &scenario;
    broker.publish_bytes(queue, b"explodes").await?;
    broker.publish_bytes(queue, b"fine").await?;
    let handler = Scripted::new(|body, _| match body {
        "explodes" => Err(HandlerError::reject(ExplodesOnDrop)),
        _ => Ok(()),
    });
    let service = scenario.spawn(Conejo::builder(amqp_url()).queue_with(
        queue,
        handler.clone(),
        queue_config().concurrency(1).poison_limit(Some(2)),
    ))?;
    // The unsettled delivery is given back (not left unacked), comes back redelivered, and
    // once delivered twice without a result it is dead-lettered as poison.
    let stats = service
        .wait_for(queue, WAIT, |s| s.poison == 1 && s.dead_lettered == 3)
        .await?;
    assert!(!service.is_finished());
    service.stop().await??;
    assert_eq!(stats.unsettled, 2, "{stats:?}");
    assert_eq!(stats.requeued, 2, "{stats:?}");
    assert_eq!(handler.calls_of("fine").len(), 1);
    assert_eq!(broker.message_count(queue).await?, 0);
    let dead = broker.drain(&format!("{queue}.dlq")).await?;
    let reasons: Vec<_> = dead
        .iter()
        .map(|m| m.header_str("conejo-reason").unwrap_or_default())
        .collect();
    // at least once: the copies confirmed before each task died are duplicates, none lost
    assert_eq!(reasons, vec!["rejected", "rejected", "poison"]);
    scenario.cleanup().await
}
