//! Failure semantics against a real broker: retries held by the broker with backoff and
//! attempt counting, dead letters with reasons, timeouts, panics anywhere, topology.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use conejo::{
    Blocking, BlockingHandler, Conejo, Context, Exchange, Failure, Handler, HandlerError, Json,
    Outcome, QueueConfig, RetryPolicy, types::BasicProperties,
};
use conejo_tests::{
    Broker, RunningService, Scenario, amqp_url, init_tracing, queue_config, unique_name,
};
use lapin::ExchangeKind;

const WAIT: Duration = Duration::from_secs(30);

/// One call of a [`Scripted`] handler.
#[derive(Debug, Clone)]
struct Call {
    body: String,
    attempt: u32,
    redelivered: bool,
    at: Instant,
    /// The exchange and routing key the message came by, as the context tells.
    route: (String, String),
}

/// What a [`Scripted`] handler does with a body on an attempt.
type Script = fn(&str, u32) -> Result<(), HandlerError>;

/// Records every call, then does what its script says.
#[derive(Clone)]
struct Scripted {
    calls: Arc<Mutex<Vec<Call>>>,
    script: Script,
}

impl Scripted {
    fn new(script: Script) -> Self {
        Scripted {
            calls: Arc::default(),
            script,
        }
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn calls_of(&self, body: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.body == body)
            .collect()
    }
}

impl Handler for Scripted {
    type Message = String;

    async fn handle(&self, body: String, ctx: &Context) -> Result<(), HandlerError> {
        self.calls.lock().unwrap().push(Call {
            body: body.clone(),
            attempt: ctx.attempt(),
            redelivered: ctx.redelivered(),
            at: Instant::now(),
            route: (ctx.exchange().to_owned(), ctx.routing_key().to_owned()),
        });
        (self.script)(&body, ctx.attempt())
    }
}

/// No jitter, so that observed delays can be compared with the policy.
fn fast_retries(attempts: u32) -> RetryPolicy {
    RetryPolicy::default()
        .max_attempts(attempts)
        .initial_delay(Duration::from_millis(300))
        .multiplier(2.0)
        .jitter(0.0)
}

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
async fn always_failing_is_dead_lettered_after_exactly_its_attempts_with_reasons()
-> anyhow::Result<()> {
    let scenario = Scenario::new("doomed").await?;
    let Scenario { broker, queue } = &scenario;
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "tenant".into(),
        lapin::types::AMQPValue::LongString("acme".into()),
    );
    let id = broker
        .publish_with_properties(
            queue,
            b"doomed",
            BasicProperties::default()
                .with_headers(headers)
                .with_correlation_id("corr-1".into()),
        )
        .await?;
    let handler = Scripted::new(|_, _| Err(HandlerError::retry("database unavailable")));
    let started = std::time::SystemTime::now();
    let service = scenario.spawn(Conejo::builder(amqp_url()).queue_with(
        queue,
        handler.clone(),
        queue_config().retry(fast_retries(3)),
    ))?;
    let dlq = format!("{queue}.dlq");
    broker.wait_for_count(&dlq, 1, WAIT).await?;
    let stats = service.stats().queue(queue).unwrap();
    service.stop().await??;
    assert_eq!(
        (stats.handler_errors, stats.retried, stats.dead_lettered),
        (3, 2, 1),
        "{stats:?}"
    );
    let attempts: Vec<u32> = handler.calls().iter().map(|c| c.attempt).collect();
    assert_eq!(attempts, vec![1, 2, 3], "no more deliveries than attempts");

    let dead = broker.drain(&dlq).await?;
    assert_eq!(dead.len(), 1);
    let m = &dead[0];
    assert_eq!(m.body, b"doomed");
    assert_eq!(m.message_id.as_deref(), Some(id.as_str()));
    assert_eq!(
        m.header_str("tenant").as_deref(),
        Some("acme"),
        "user headers kept"
    );
    assert_eq!(
        m.header_str("conejo-reason").as_deref(),
        Some("attempts-exhausted")
    );
    assert_eq!(m.header_str("conejo-failure").as_deref(), Some("handler"));
    assert_eq!(
        m.header_str("conejo-error").as_deref(),
        Some("handler error: database unavailable")
    );
    assert_eq!(m.header_int("conejo-attempt"), Some(3));
    assert_eq!(m.header_str("conejo-original-queue"), Some(queue.clone()));
    assert_eq!(
        m.header_str("conejo-original-exchange").as_deref(),
        Some("")
    );
    assert_eq!(
        m.header_str("conejo-original-routing-key"),
        Some(queue.clone())
    );
    let first = m
        .header_str("conejo-first-failure-at")
        .expect("first failure time");
    let last = m
        .header_str("conejo-last-failure-at")
        .expect("last failure time");
    let first = humantime::parse_rfc3339(&first)?;
    let last = humantime::parse_rfc3339(&last)?;
    assert!(started <= first && first < last, "{first:?} {last:?}");
    assert!(last.duration_since(first)? >= Duration::from_millis(850));
    assert!(
        m.header("x-death").is_none(),
        "the broker's own headers are not carried"
    );
    scenario.cleanup().await
}

#[tokio::test]
async fn a_non_json_content_type_is_dead_lettered_on_its_first_delivery() -> anyhow::Result<()> {
    let scenario = Scenario::new("xml").await?;
    let Scenario { broker, queue } = &scenario;

    #[derive(serde::Deserialize)]
    struct Order {
        #[allow(dead_code)]
        id: u64,
    }
    struct AcksOrders;
    impl Handler for AcksOrders {
        type Message = Json<Order>;
        async fn handle(&self, _: Json<Order>, _: &Context) -> Result<(), HandlerError> {
            Ok(())
        }
    }
    broker
        .publish_with_properties(
            queue,
            b"<order id='1'/>",
            BasicProperties::default().with_content_type("application/xml".into()),
        )
        .await?;
    broker.publish_bytes(queue, b"{\"id\": oops").await?;
    broker
        .publish_json(queue, &serde_json::json!({"id": 7}))
        .await?;
    let service = scenario.spawn(Conejo::builder(amqp_url()).queue_with(
        queue,
        AcksOrders,
        queue_config().concurrency(1),
    ))?;
    let stats = service.wait_for(queue, WAIT, |s| s.acked == 3).await?;
    service.stop().await??;
    assert_eq!(
        (stats.decode_failures, stats.dead_lettered, stats.retried),
        (2, 2, 0)
    );
    let dead = broker.drain(&format!("{queue}.dlq")).await?;
    assert_eq!(dead.len(), 2);
    assert!(
        dead.iter()
            .all(|m| m.header_str("conejo-failure").as_deref() == Some("decode"))
    );
    assert!(
        dead.iter()
            .all(|m| m.header_int("conejo-attempt") == Some(1))
    );
    assert_eq!(
        dead[0].header_str("conejo-error").as_deref(),
        Some(
            "cannot decode json payload: unsupported content type 'application/xml' (expected JSON)"
        )
    );
    assert_eq!(dead[0].content_type.as_deref(), Some("application/xml"));
    scenario.cleanup().await
}

/// An error whose `Display` panics.
#[derive(Debug)]
struct Treacherous;

impl std::fmt::Display for Treacherous {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        panic!("Display of Treacherous")
    }
}

impl std::error::Error for Treacherous {}

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

#[tokio::test]
async fn dead_letters_go_to_the_users_exchange_with_its_routing_key() -> anyhow::Result<()> {
    let scenario = Scenario::new("user-dlx").await?;
    let Scenario { broker, queue } = &scenario;
    let exchange = unique_name("errors");
    let parking = unique_name("parking");
    broker
        .declare_exchange(&exchange, ExchangeKind::Direct)
        .await?;
    broker.declare_queue(&parking).await?;
    let channel = broker.open_channel().await?;
    channel
        .queue_bind(
            parking.as_str().into(),
            exchange.as_str().into(),
            "parked".into(),
            Default::default(),
            Default::default(),
        )
        .await?;
    broker.publish_bytes(queue, b"bad").await?;
    let service = scenario.spawn(
        Conejo::builder(amqp_url()).queue_with(
            queue,
            Scripted::new(|_, _| Err(HandlerError::reject("bad input"))),
            queue_config()
                .dead_letter_exchange(&exchange)
                .dead_letter_routing_key("parked"),
        ),
    )?;
    broker.wait_for_count(&parking, 1, WAIT).await?;
    service.stop().await??;
    let dead = broker.drain(&parking).await?;
    assert_eq!(
        dead[0].header_str("conejo-reason").as_deref(),
        Some("rejected")
    );
    broker.delete_queue(&parking).await?;
    broker.delete_exchange(&exchange).await?;
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
async fn exchanges_and_bindings_from_the_builder_route_to_the_queue() -> anyhow::Result<()> {
    let scenario = Scenario::undeclared("bound").await?;
    let Scenario { broker, queue } = &scenario;
    let exchange = unique_name("shop");
    let handler = Scripted::new(|_, _| Ok(()));
    let service = scenario.spawn(
        Conejo::builder(amqp_url())
            .exchange(Exchange::topic(&exchange).durable(false))
            .queue_with(
                queue,
                handler.clone(),
                queue_config().bind(&exchange, "order.created.*"),
            ),
    )?;
    broker.wait_for_consumer_count(queue, 1, WAIT).await?;
    let channel = broker.open_channel().await?;
    for key in ["order.created.eu", "order.cancelled.eu", "order.created.us"] {
        channel
            .basic_publish(
                exchange.as_str().into(),
                key.into(),
                Default::default(),
                key.as_bytes(),
                BasicProperties::default(),
            )
            .await?;
    }
    service.wait_for(queue, WAIT, |s| s.acked == 2).await?;
    service.stop().await??;
    let mut bodies: Vec<_> = handler.calls().into_iter().map(|c| c.body).collect();
    bodies.sort();
    assert_eq!(bodies, vec!["order.created.eu", "order.created.us"]);
    broker.delete_exchange(&exchange).await?;
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

#[test]
fn failures_name_their_kind() {
    assert_eq!(Failure::Timeout(Duration::from_secs(1)).kind(), "timeout");
    assert_eq!(
        Failure::Timeout(Duration::from_secs(1)).default_outcome(),
        Outcome::Retry
    );
}

#[tokio::test]
async fn dead_letters_replayed_by_the_operator_tool_are_handled() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let scenario = Scenario::new("replayed").await?;
    let Scenario { broker, queue } = &scenario;

    /// Rejects everything until the bug is fixed.
    #[derive(Clone, Default)]
    struct RejectsUntilFixed {
        fixed: Arc<AtomicBool>,
    }
    impl Handler for RejectsUntilFixed {
        type Message = String;
        async fn handle(&self, _: String, _: &Context) -> Result<(), HandlerError> {
            if self.fixed.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(HandlerError::reject("bug #42"))
            }
        }
    }
    let handler = RejectsUntilFixed::default();
    let service = scenario.spawn(Conejo::builder(amqp_url()).queue_with(
        queue,
        handler.clone(),
        queue_config(),
    ))?;
    for n in 0..3 {
        broker
            .publish_bytes(queue, format!("m{n}").as_bytes())
            .await?;
    }
    let dlq = format!("{queue}.dlq");
    broker.wait_for_count(&dlq, 3, WAIT).await?;
    handler.fixed.store(true, Ordering::SeqCst);

    let url: conejo::AmqpUrl = amqp_url().parse()?;
    let report = conejo::admin::replay(&url, &dlq, None, None).await?;
    assert_eq!(report.replayed, 3);
    // 3 dead letters acked, then the 3 replayed copies handled
    let stats = service.wait_for(queue, WAIT, |s| s.acked == 6).await?;
    service.stop().await??;
    assert_eq!(stats.dead_lettered, 3);
    assert_eq!(broker.message_count(&dlq).await?, 0);
    scenario.cleanup().await
}

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

/// Quorum queues conejo declares itself get an explicit delivery limit: the poison limit
/// with its dead-letter exchange, or, with detection off, no limit said explicitly — never
/// the broker's default (20 on RabbitMQ 4, dropping the message).
#[tokio::test]
async fn quorum_queues_declared_by_conejo_carry_an_explicit_delivery_limit() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let detected = unique_name("quorum-poison");
    let unlimited = unique_name("quorum-unlimited");
    let handler = Scripted::new(|_, _| Ok(()));
    let service = RunningService::spawn(
        Conejo::builder(amqp_url())
            .queue_with(&detected, handler.clone(), QueueConfig::new().quorum())
            .queue_with(
                &unlimited,
                handler.clone(),
                QueueConfig::new().quorum().poison_limit(None),
            )
            .build()?,
    );
    for queue in [&detected, &unlimited] {
        broker.wait_for_consumer_count(queue, 1, WAIT).await?;
        broker.publish_bytes(queue, queue.as_bytes()).await?;
        service.wait_for(queue, WAIT, |s| s.acked == 1).await?;
    }
    service.stop().await??;
    let of = |arguments: Option<String>, queue: &str| {
        arguments.unwrap_or_else(|| panic!("no queue {queue}"))
    };
    let detected_args = of(
        conejo_tests::rabbitmqctl_queue_arguments(&detected).await?,
        &detected,
    );
    let unlimited_args = of(
        conejo_tests::rabbitmqctl_queue_arguments(&unlimited).await?,
        &unlimited,
    );
    eprintln!("{detected}: {detected_args}\n{unlimited}: {unlimited_args}");
    let compact = |text: &str| text.replace(' ', "");
    assert!(
        compact(&detected_args).contains(r#"{"x-delivery-limit",5}"#),
        "{detected_args}"
    );
    assert!(
        compact(&detected_args)
            .contains(&format!(r#"{{"x-dead-letter-exchange","{detected}.dlx"}}"#)),
        "{detected_args}"
    );
    assert!(
        compact(&unlimited_args).contains(r#"{"x-delivery-limit",2147483647}"#),
        "{unlimited_args}"
    );
    assert!(
        !unlimited_args.contains("x-dead-letter-exchange"),
        "{unlimited_args}"
    );
    broker
        .delete_consumed_queues(&[&detected, &unlimited])
        .await?;
    Ok(())
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
