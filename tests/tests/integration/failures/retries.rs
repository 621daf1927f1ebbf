//! Retries held by the broker: the policy's delays and attempts, `retry_after`, a
//! give-back at shutdown that uses no attempt, a failing load that loses nothing, a wait
//! queue deleted while running.

use super::*;

#[tokio::test]
async fn fails_twice_then_succeeds_after_the_policys_delays_holding_no_slot() -> anyhow::Result<()>
{
    let scenario = Scenario::new("flaky").await?;
    let Scenario { broker, queue } = &scenario;
    broker.publish_bytes(queue, b"flaky").await?;
    for n in 0..5 {
        broker
            .publish_bytes(queue, format!("quick-{n}").as_bytes())
            .await?;
    }
    let handler = Scripted::new(|body, attempt| match (body, attempt) {
        ("flaky", 1 | 2) => Err(HandlerError::retry("database unavailable")),
        _ => Ok(()),
    });
    // One at a time: if a waiting retry held the only slot, nothing else could run.
    let service = scenario.spawn(Conejo::builder(amqp_url()).queue_with(
        queue,
        handler.clone(),
        queue_config().concurrency(1).retry(fast_retries(5)),
    ))?;
    // 6 successes + 2 failed deliveries acked after their retry copies were confirmed
    let stats = service.wait_for(queue, WAIT, |s| s.acked == 8).await?;
    service.stop().await??;
    assert_eq!((stats.retried, stats.dead_lettered), (2, 0), "{stats:?}");

    let flaky = handler.calls_of("flaky");
    let attempts: Vec<u32> = flaky.iter().map(|c| c.attempt).collect();
    assert_eq!(attempts, vec![1, 2, 3]);
    assert!(flaky.iter().all(|c| !c.redelivered));
    // The policy's delays, 300 ms then 600 ms (wait queues of 304 ms and 609 ms).
    for (gap, ttl) in [
        (flaky[1].at - flaky[0].at, 304),
        (flaky[2].at - flaky[1].at, 609),
    ] {
        let ttl = Duration::from_millis(ttl);
        eprintln!("retry delay: asked {ttl:?}, observed {gap:?}");
        assert!(gap >= ttl - Duration::from_millis(20), "{gap:?} < {ttl:?}");
        assert!(
            gap <= ttl + Duration::from_millis(1500),
            "{gap:?} >> {ttl:?}"
        );
    }
    // Handled while the flaky one waited in the broker.
    let quick_done = handler
        .calls()
        .iter()
        .filter(|c| c.body.starts_with("quick"))
        .map(|c| c.at)
        .max()
        .expect("quick messages handled");
    assert!(
        quick_done < flaky[1].at,
        "a waiting retry held the only slot"
    );
    assert_eq!(broker.message_count(queue).await?, 0);
    scenario.cleanup().await
}

#[tokio::test]
async fn retry_after_overrides_the_backoff() -> anyhow::Result<()> {
    let scenario = Scenario::new("rate-limited").await?;
    let Scenario { broker, queue } = &scenario;
    broker.publish_bytes(queue, b"limited").await?;
    let handler = Scripted::new(|_, attempt| match attempt {
        1 => Err(HandlerError::retry_after(
            "429 Too Many Requests",
            Duration::from_millis(250),
        )),
        _ => Ok(()),
    });
    let service = scenario.spawn(Conejo::builder(amqp_url()).queue_with(
        queue,
        handler.clone(),
        // the policy alone would wait a minute
        queue_config().retry(RetryPolicy::default().initial_delay(Duration::from_secs(60))),
    ))?;
    service.wait_for(queue, WAIT, |s| s.acked == 2).await?;
    service.stop().await??;
    let calls = handler.calls();
    let gap = calls[1].at - calls[0].at;
    eprintln!("retry_after 250 ms: observed {gap:?}");
    assert!(
        gap >= Duration::from_millis(230) && gap < Duration::from_secs(5),
        "{gap:?}"
    );
    scenario.cleanup().await
}

#[tokio::test]
async fn a_shutdown_give_back_uses_no_attempt() -> anyhow::Result<()> {
    let scenario = Scenario::new("give-back").await?;
    let Scenario { broker, queue } = &scenario;
    // Published through an exchange: the route must survive conejo's redelivery counting
    // (a republished copy, through the default exchange).
    let exchange = unique_name("give-back-x");
    broker
        .declare_exchange(&exchange, ExchangeKind::Direct)
        .await?;
    let channel = broker.open_channel().await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "orders.eu".into(),
            Default::default(),
            Default::default(),
        )
        .await?;
    channel.confirm_select(Default::default()).await?;
    for n in 0..6 {
        channel
            .basic_publish(
                exchange.as_str().into(),
                "orders.eu".into(),
                Default::default(),
                format!("m{n}").as_bytes(),
                BasicProperties::default(),
            )
            .await?
            .await?;
    }
    // First service: one slow handler at a time, the rest prefetched, then shut down.
    struct Sleeps300Ms;
    impl Handler for Sleeps300Ms {
        type Message = String;
        async fn handle(&self, _: String, _: &Context) -> Result<(), HandlerError> {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(())
        }
    }
    let first = scenario.spawn(Conejo::builder(amqp_url()).queue_with(
        queue,
        Sleeps300Ms,
        queue_config().concurrency(1).prefetch(10),
    ))?;
    first.wait_for(queue, WAIT, |s| s.delivered >= 1).await?;
    broker.wait_for_count(queue, 0, WAIT).await?; // all six in conejo's hands
    first.stop().await??;
    let given_back = broker.message_count(queue).await?;
    assert!(
        given_back >= 4,
        "prefetched messages were given back: {given_back}"
    );

    let handler = Scripted::new(|_, _| Ok(()));
    let second = scenario.spawn(Conejo::builder(amqp_url()).queue_with(
        queue,
        handler.clone(),
        queue_config(),
    ))?;
    let expected = usize::try_from(given_back)?;
    let deadline = Instant::now() + WAIT;
    while handler.calls().len() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    second
        .wait_for(queue, WAIT, |s| s.acked >= 2 * given_back as u64)
        .await?;
    let stats = second.stats().queue(queue).unwrap();
    second.stop().await??;
    assert_eq!(stats.poison, 0);
    let calls = handler.calls();
    assert_eq!(calls.len(), expected, "{calls:?}");
    assert!(calls.iter().all(|c| c.attempt == 1), "{calls:?}");
    let route = (exchange.clone(), "orders.eu".to_owned());
    assert!(calls.iter().all(|c| c.route == route), "{calls:?}");
    broker.delete_exchange(&exchange).await?;
    scenario.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_with_one_in_ten_failing_twice_loses_nothing() -> anyhow::Result<()> {
    let scenario = Scenario::new("load").await?;
    let Scenario { broker, queue } = &scenario;
    const N: usize = 20_000;
    let bodies = (0..N).map(|n| n.to_string().into_bytes()).collect();
    broker.publish_many_bytes(queue, bodies).await?;

    #[derive(Clone, Default)]
    struct FailsEveryTenthTwice {
        handled: Arc<Mutex<Vec<u32>>>,
    }
    impl Handler for FailsEveryTenthTwice {
        type Message = String;
        async fn handle(&self, body: String, ctx: &Context) -> Result<(), HandlerError> {
            let n: usize = body.parse()?;
            if n.is_multiple_of(10) && ctx.attempt() <= 2 {
                return Err(HandlerError::retry("transient"));
            }
            self.handled.lock().unwrap()[n] += 1;
            Ok(())
        }
    }
    let handler = FailsEveryTenthTwice {
        handled: Arc::new(Mutex::new(vec![0; N])),
    };
    let started = Instant::now();
    let service = scenario.spawn(
        Conejo::builder(amqp_url()).queue_with(
            queue,
            handler.clone(),
            queue_config().retry(
                RetryPolicy::default()
                    .initial_delay(Duration::from_millis(100))
                    .jitter(0.1),
            ),
        ),
    )?;
    let failing = (N / 10) as u64;
    let stats = service
        .wait_for(queue, Duration::from_secs(120), |s| {
            s.acked == N as u64 + 2 * failing
        })
        .await?;
    let elapsed = started.elapsed();
    service.stop().await??;
    eprintln!(
        "{N} messages, {failing} failing twice: {elapsed:?} ({:.0} msgs/s including retries)",
        N as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(
        (stats.retried, stats.dead_lettered),
        (2 * failing, 0),
        "{stats:?}"
    );
    let handled = handler.handled.lock().unwrap().clone();
    assert!(
        handled.iter().all(|&n| n == 1),
        "every message handled exactly once"
    );
    assert_eq!(broker.message_count(queue).await?, 0);
    scenario.cleanup().await
}

/// A wait queue deleted while conejo runs (an operator cleaning up): the next retry copy
/// comes back unroutable, the delivery is given back, and the retry after it declares the
/// wait queue again, instead of failing the same way until the connection is reopened.
#[tokio::test]
async fn a_wait_queue_deleted_while_running_is_declared_again() -> anyhow::Result<()> {
    let scenario = Scenario::new("wait-deleted").await?;
    let Scenario { broker, queue } = &scenario;
    // Every message fails its first attempt, then succeeds.
    let handler = Scripted::new(|_, attempt| {
        if attempt == 1 {
            Err(HandlerError::retry("first attempt"))
        } else {
            Ok(())
        }
    });
    let service = scenario.spawn(Conejo::builder(amqp_url()).queue_with(
        queue,
        handler.clone(),
        queue_config().retry(fast_retries(3)),
    ))?;
    broker.publish_bytes(queue, b"first").await?;
    // Acked twice: once as its retry copy was confirmed, once handled.
    service.wait_for(queue, WAIT, |s| s.acked == 2).await?;
    let prefix = format!("{queue}.retry.");
    let wait_queues: Vec<String> = conejo_tests::rabbitmqctl_queue_names()
        .await?
        .into_iter()
        .filter(|name| name.starts_with(&prefix))
        .collect();
    assert_eq!(wait_queues.len(), 1, "{wait_queues:?}");
    broker.delete_queue(&wait_queues[0]).await?;

    broker.publish_bytes(queue, b"second").await?;
    let deadline = Instant::now() + WAIT;
    while !handler.calls_of("second").iter().any(|c| c.attempt == 2) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "second: {:?}; {:?}",
            handler.calls_of("second"),
            service.stats().queue(queue)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = service.wait_for(queue, WAIT, |s| s.in_flight == 0).await?;
    service.stop().await??;
    eprintln!("{stats:?}");
    assert_eq!(stats.publish_failures, 1, "one copy came back unroutable");
    let calls = handler.calls_of("second");
    assert_eq!(calls.last().map(|c| c.attempt), Some(2), "{calls:?}");
    scenario.cleanup().await
}
