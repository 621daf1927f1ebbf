//! The engine's logic — consumer, dispatch, supervisor — run against the in-memory broker,
//! without RabbitMQ: deliveries handled and acked (coalesced), the concurrency bound,
//! retries through wait queues under a paused clock, dead letters, poison counting, channel
//! and connection loss, a blocked connection, graceful shutdown, startup refusals. The
//! same behaviours are proved against a real broker by the integration tests.
//!
//! Why it is ~750 lines: one test per behaviour of the engine, each self-contained (its
//! broker, its service, its assertions), sharing the small fixtures above them.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use tokio::{sync::Semaphore, task::JoinHandle};

use crate::{
    Builder, Conejo, Context, Error, Exchange, Handler, HandlerError, Json, QueueConfig,
    QueueStats, RetryPolicy, ShutdownHandle, Stats, Status,
    broker::{QueueOptions, memory::Memory},
    headers,
};

const URL: &str = "amqp://guest:guest@memory/%2f";

/// A bound on every wait of these tests (paused time advances through it in no real time).
const WAIT: Duration = Duration::from_secs(120);

/// A service running against `memory`, on the test's runtime.
struct Running {
    shutdown: ShutdownHandle,
    stats: Stats,
    status: Status,
    task: JoinHandle<Result<(), Error>>,
}

impl Running {
    fn spawn(memory: &Memory, builder: Builder) -> Running {
        let conejo = builder.memory(memory).build().expect("a valid service");
        Running {
            shutdown: conejo.shutdown_handle(),
            stats: conejo.stats(),
            status: conejo.status(),
            task: tokio::spawn(conejo.run_until(std::future::pending())),
        }
    }

    /// Polls `queue`'s counters until `done` holds (at most [`WAIT`] of tokio time).
    async fn until(&self, queue: &str, done: impl Fn(&QueueStats) -> bool) -> QueueStats {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let stats = self.stats.queue(queue).expect("a registered queue");
            if done(&stats) {
                return stats;
            }
            assert!(!self.task.is_finished(), "the service stopped: {stats:?}");
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out; counters: {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn stop(self) -> Result<(), Error> {
        self.shutdown.shutdown();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("stopped in time")
            .expect("not panicked")
    }
}

/// Polls `check` until it holds (at most [`WAIT`] of tokio time).
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

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

fn publish(memory: &Memory, queue: &str, body: &str) {
    assert!(
        memory
            .publish(
                "",
                queue,
                Bytes::copy_from_slice(body.as_bytes()),
                BasicProperties::default()
            )
            .unwrap(),
        "unroutable"
    );
}

fn text_header(message: &crate::broker::Incoming, name: &str) -> Option<String> {
    headers::text(message.properties.headers().as_ref(), name).map(str::to_owned)
}

/// Records what it handled; fails the bodies it is told to, always or for the first calls.
#[derive(Clone, Default)]
struct Recorder {
    handled: Arc<Mutex<Vec<(String, u32)>>>,
    running: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    /// When set, each call waits for a permit.
    gate: Option<Arc<Semaphore>>,
    /// Bodies that fail until their attempt exceeds the number.
    failing: Arc<Mutex<Vec<(String, u32)>>>,
}

impl Handler for Recorder {
    type Message = String;

    async fn handle(&self, body: String, ctx: &Context) -> Result<(), HandlerError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("open gate").forget();
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
        let fails = self
            .failing
            .lock()
            .unwrap()
            .iter()
            .any(|(failing, until)| *failing == body && ctx.attempt() <= *until);
        self.handled.lock().unwrap().push((body, ctx.attempt()));
        if fails {
            return Err(HandlerError::retry("failing on purpose"));
        }
        Ok(())
    }
}

fn config() -> QueueConfig {
    QueueConfig::new().retry(
        RetryPolicy::default()
            .initial_delay(Duration::from_secs(1))
            .max_delay(Duration::from_secs(1)),
    )
}

#[tokio::test(start_paused = true)]
async fn messages_are_handled_once_and_acked_in_coalesced_frames() {
    let memory = Memory::new();
    declared(&memory, "orders");
    for n in 0..100 {
        publish(&memory, "orders", &format!("m{n}"));
    }
    let recorder = Recorder::default();
    let service = Running::spawn(
        &memory,
        Conejo::builder(URL).queue_with("orders", recorder.clone(), config()),
    );
    let stats = service.until("orders", |s| s.acked == 100).await;
    assert!(stats.ack_frames < 100, "acks not coalesced: {stats:?}");
    assert_eq!(recorder.handled.lock().unwrap().len(), 100);
    eventually("settled on the broker", || {
        memory
            .counts("orders")
            .is_some_and(|c| c.ready == 0 && c.unacked == 0)
    })
    .await;
    service.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_concurrency_is_reached_and_never_exceeded() {
    let memory = Memory::new();
    declared(&memory, "jobs");
    for n in 0..20 {
        publish(&memory, "jobs", &format!("j{n}"));
    }
    let gate = Arc::new(Semaphore::new(0));
    let recorder = Recorder {
        gate: Some(Arc::clone(&gate)),
        ..Recorder::default()
    };
    let service = Running::spawn(
        &memory,
        Conejo::builder(URL).queue_with("jobs", recorder.clone(), config().concurrency(4)),
    );
    eventually("four running", || {
        recorder.running.load(Ordering::SeqCst) == 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(recorder.most.load(Ordering::SeqCst), 4);
    gate.add_permits(20);
    service.until("jobs", |s| s.acked == 20).await;
    assert_eq!(recorder.most.load(Ordering::SeqCst), 4, "the bound held");
    service.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_failure_waits_in_the_broker_and_comes_back_as_the_next_attempt() {
    let memory = Memory::new();
    declared(&memory, "payments");
    publish(&memory, "payments", "flaky");
    let recorder = Recorder::default();
    recorder
        .failing
        .lock()
        .unwrap()
        .push(("flaky".to_owned(), 2));
    let service = Running::spawn(
        &memory,
        Conejo::builder(URL).queue_with("payments", recorder.clone(), config()),
    );
    let started = tokio::time::Instant::now();
    let stats = service
        .until("payments", |s| s.retried == 2 && s.acked == 3)
        .await;
    // Each retry waited its 1 s (± 20 %) in a wait queue, not in the process.
    assert!(
        started.elapsed() >= Duration::from_millis(1600),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        *recorder.handled.lock().unwrap(),
        vec![
            ("flaky".to_owned(), 1),
            ("flaky".to_owned(), 2),
            ("flaky".to_owned(), 3)
        ]
    );
    assert_eq!(stats.dead_lettered, 0);
    let waits: Vec<String> = memory
        .queues()
        .into_iter()
        .filter(|name| name.starts_with("payments.retry."))
        .collect();
    assert!(
        !waits.is_empty(),
        "a wait queue is declared: {:?}",
        memory.queues()
    );
    for wait in waits {
        assert_eq!(memory.counts(&wait).unwrap().ready, 0, "{wait} drained");
    }
    service.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn attempts_used_up_and_bad_payloads_are_dead_lettered_with_reasons() {
    let memory = Memory::new();
    declared(&memory, "shop");
    publish(&memory, "shop", "doomed");
    let recorder = Recorder::default();
    recorder
        .failing
        .lock()
        .unwrap()
        .push(("doomed".to_owned(), u32::MAX));
    // A JSON queue next to it gets a body that is not JSON.
    declared(&memory, "typed");
    publish(&memory, "typed", "{not json");
    struct Typed;
    impl Handler for Typed {
        type Message = Json<u32>;
        async fn handle(&self, _: Json<u32>, _: &Context) -> Result<(), HandlerError> {
            Ok(())
        }
    }
    let service = Running::spawn(
        &memory,
        Conejo::builder(URL)
            .queue_with(
                "shop",
                recorder.clone(),
                config().retry(
                    RetryPolicy::default()
                        .max_attempts(3)
                        .initial_delay(Duration::from_secs(1))
                        .max_delay(Duration::from_secs(1)),
                ),
            )
            .queue_with("typed", Typed, config()),
    );
    service.until("shop", |s| s.dead_lettered == 1).await;
    service.until("typed", |s| s.dead_lettered == 1).await;
    assert_eq!(recorder.handled.lock().unwrap().len(), 3, "three attempts");
    let letters = memory.take("shop.dlq");
    assert_eq!(letters.len(), 1);
    assert_eq!(
        text_header(&letters[0], headers::REASON).as_deref(),
        Some("attempts-exhausted")
    );
    assert_eq!(
        text_header(&letters[0], headers::ORIGINAL_QUEUE).as_deref(),
        Some("shop")
    );
    let letters = memory.take("typed.dlq");
    assert_eq!(letters.len(), 1);
    assert_eq!(
        text_header(&letters[0], headers::FAILURE).as_deref(),
        Some("decode")
    );
    assert_eq!(&letters[0].data[..], b"{not json");
    service.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_connection_closed_by_the_broker_is_reopened_and_loses_nothing() {
    let memory = Memory::new();
    declared(&memory, "forced");
    let gate = Arc::new(Semaphore::new(0));
    let recorder = Recorder {
        gate: Some(Arc::clone(&gate)),
        ..Recorder::default()
    };
    let service = Running::spawn(
        &memory,
        Conejo::builder(URL)
            .reconnect_delay(Duration::from_millis(50), Duration::from_millis(200))
            .queue_with("forced", recorder.clone(), config()),
    );
    for n in 0..10 {
        publish(&memory, "forced", &format!("f{n}"));
    }
    // Ten running, none finished, when the broker closes the connection.
    eventually("ten running", || {
        recorder.running.load(Ordering::SeqCst) == 10
    })
    .await;
    assert_eq!(memory.close_connections("fault injection"), 1);
    eventually("reconnected", || service.status.reconnects() == 1).await;
    gate.add_permits(1000);
    // The ten come back redelivered, are counted as redelivered (classic queue: a copy is
    // republished with the count), and each is handled and acked.
    eventually("every message settled", || {
        memory
            .counts("forced")
            .is_some_and(|c| c.ready == 0 && c.unacked == 0)
    })
    .await;
    let handled = recorder.handled.lock().unwrap().clone();
    for n in 0..10 {
        assert!(
            handled.iter().any(|(body, _)| *body == format!("f{n}")),
            "f{n} lost: {handled:?}"
        );
    }
    let stats = service.stats.queue("forced").unwrap();
    assert!(stats.late_settlements >= 10, "{stats:?}");
    assert_eq!(service.status.reconnects(), 1);
    service.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_channel_closed_by_the_broker_is_reopened_without_a_reconnection() {
    let memory = Memory::new();
    declared(&memory, "timeouts");
    let gate = Arc::new(Semaphore::new(0));
    let recorder = Recorder {
        gate: Some(Arc::clone(&gate)),
        ..Recorder::default()
    };
    let service = Running::spawn(
        &memory,
        Conejo::builder(URL)
            .reconnect_delay(Duration::from_millis(50), Duration::from_millis(200))
            .queue_with("timeouts", recorder.clone(), config()),
    );
    publish(&memory, "timeouts", "slow");
    eventually("running", || recorder.running.load(Ordering::SeqCst) == 1).await;
    // What the broker does to a delivery left unacked past its consumer_timeout.
    assert_eq!(
        memory.fail_consumers(
            "timeouts",
            406,
            "PRECONDITION_FAILED - delivery acknowledgement timed out"
        ),
        1
    );
    eventually("consumed again", || {
        memory.counts("timeouts").is_some_and(|c| c.consumers == 1)
    })
    .await;
    gate.add_permits(10);
    eventually("settled", || {
        memory
            .counts("timeouts")
            .is_some_and(|c| c.ready == 0 && c.unacked == 0)
    })
    .await;
    let stats = service.stats.queue("timeouts").unwrap();
    assert_eq!(stats.late_settlements, 1, "{stats:?}");
    assert_eq!(service.status.reconnects(), 0);
    service.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_deleted_queue_is_declared_and_consumed_again() {
    let memory = Memory::new();
    declared(&memory, "deleted");
    let recorder = Recorder::default();
    let service = Running::spawn(
        &memory,
        Conejo::builder(URL)
            .reconnect_delay(Duration::from_millis(50), Duration::from_millis(200))
            .queue_with("deleted", recorder.clone(), config()),
    );
    eventually("consuming", || {
        memory.counts("deleted").is_some_and(|c| c.consumers == 1)
    })
    .await;
    assert!(memory.delete_queue("deleted"));
    eventually("declared and consumed again", || {
        memory.counts("deleted").is_some_and(|c| c.consumers == 1)
    })
    .await;
    publish(&memory, "deleted", "after");
    service.until("deleted", |s| s.acked == 1).await;
    assert_eq!(service.status.reconnects(), 0);
    service.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn shutdown_gives_back_what_did_not_start_and_finishes_what_runs() {
    let memory = Memory::new();
    declared(&memory, "stopping");
    for n in 0..30 {
        publish(&memory, "stopping", &format!("s{n}"));
    }
    let gate = Arc::new(Semaphore::new(0));
    let recorder = Recorder {
        gate: Some(Arc::clone(&gate)),
        ..Recorder::default()
    };
    let service = Running::spawn(
        &memory,
        Conejo::builder(URL).queue_with("stopping", recorder.clone(), config().concurrency(3)),
    );
    eventually("three running", || {
        recorder.running.load(Ordering::SeqCst) == 3
    })
    .await;
    service.shutdown.shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The unstarted ones are back in the queue while the three still run.
    let counts = memory.counts("stopping").unwrap();
    assert_eq!((counts.ready, counts.unacked), (27, 3), "{counts:?}");
    gate.add_permits(3);
    service.stop().await.unwrap();
    assert_eq!(recorder.handled.lock().unwrap().len(), 3);
    let counts = memory.counts("stopping").unwrap();
    assert_eq!((counts.ready, counts.unacked), (27, 0), "{counts:?}");
}

#[tokio::test(start_paused = true)]
async fn a_redelivered_message_is_counted_and_dead_lettered_as_poison_past_the_limit() {
    let memory = Memory::new();
    declared(&memory, "crashy");
    // A message that comes back redelivered with a count already at the limit minus one: this
    // delivery makes it poison (classic queue: conejo counts in `conejo-redeliveries`).
    let mut table = FieldTable::default();
    headers::set_int(&mut table, headers::REDELIVERIES, 4);
    memory
        .publish(
            "",
            "crashy",
            Bytes::from_static(b"boom"),
            BasicProperties::default().with_headers(table),
        )
        .unwrap();
    let recorder = Recorder::default();
    // First a consumer that takes it and vanishes without settling: a crash.
    let crash = Running::spawn(
        &memory,
        Conejo::builder(URL).queue_with(
            "crashy",
            Recorder {
                gate: Some(Arc::new(Semaphore::new(0))),
                ..Recorder::default()
            },
            config(),
        ),
    );
    eventually("taken", || {
        memory.counts("crashy").is_some_and(|c| c.unacked == 1)
    })
    .await;
    crash.task.abort();
    memory.close_connections("the consumer crashed");
    eventually("requeued", || {
        memory.counts("crashy").is_some_and(|c| c.ready == 1)
    })
    .await;
    let service = Running::spawn(
        &memory,
        Conejo::builder(URL).queue_with("crashy", recorder.clone(), config()),
    );
    service
        .until("crashy", |s| s.poison == 1 && s.dead_lettered == 1)
        .await;
    assert!(
        recorder.handled.lock().unwrap().is_empty(),
        "never handled again"
    );
    let letters = memory.take("crashy.dlq");
    assert_eq!(
        text_header(&letters[0], headers::REASON).as_deref(),
        Some("poison")
    );
    service.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_blocked_connection_is_reported_and_its_retries_wait() {
    let memory = Memory::new();
    declared(&memory, "alarm");
    declared(&memory, "healthy");
    let recorder = Recorder::default();
    recorder
        .failing
        .lock()
        .unwrap()
        .push(("once".to_owned(), 1));
    let healthy = Recorder::default();
    let service = Running::spawn(
        &memory,
        Conejo::builder(URL)
            .queue_with("alarm", recorder.clone(), config())
            .queue_with("healthy", healthy.clone(), config()),
    );
    eventually("connected", || service.status.is_ready()).await;
    // A memory alarm: RabbitMQ blocks the connections that publish.
    memory.block("low on memory");
    publish(&memory, "alarm", "once");
    // The failure's retry copy is to be published: the publisher's connection is blocked.
    eventually("blocked", || service.status.blocked().is_some()).await;
    assert!(!service.status.is_ready(), "a blocked service is not ready");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stats = service.stats.queue("alarm").unwrap();
    assert_eq!((stats.retried, stats.acked), (0, 0), "{stats:?}");
    // The consuming connection never published: it was not blocked, and acks go on.
    publish(&memory, "healthy", "fine");
    service.until("healthy", |s| s.acked == 1).await;
    memory.unblock();
    service
        .until("alarm", |s| s.retried == 1 && s.acked == 2)
        .await;
    eventually("unblocked", || service.status.blocked().is_none()).await;
    assert_eq!(service.status.reconnects(), 0);
    service.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn refused_credentials_fail_startup_and_an_unreachable_broker_is_waited_for() {
    let memory = Memory::new();
    declared(&memory, "q");
    memory.refuse_connections(1, Some(403));
    let refused = Conejo::builder(URL)
        .memory(&memory)
        .queue("q", Recorder::default())
        .build()
        .unwrap()
        .run_until(std::future::pending())
        .await
        .unwrap_err();
    assert!(refused.is_refused(), "{refused}");
    assert!(!refused.to_string().contains("guest:guest"), "{refused}");
    // Unreachable three times: waited for (the default), then consumed.
    memory.refuse_connections(3, None);
    let recorder = Recorder::default();
    let service = Running::spawn(
        &memory,
        Conejo::builder(URL)
            .reconnect_delay(Duration::from_millis(50), Duration::from_millis(200))
            .queue_with("q", recorder.clone(), config()),
    );
    publish(&memory, "q", "late");
    service.until("q", |s| s.acked == 1).await;
    // Told not to wait, an unreachable broker is an error at once.
    memory.refuse_connections(1, None);
    let failed = Conejo::builder(URL)
        .memory(&memory)
        .wait_for_broker(false)
        .queue("q", Recorder::default())
        .build()
        .unwrap()
        .run_until(std::future::pending())
        .await
        .unwrap_err();
    assert!(
        failed.is_connection_error() && !failed.is_refused(),
        "{failed}"
    );
    service.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_passive_queue_that_is_missing_is_a_startup_error() {
    let memory = Memory::new();
    let error = Conejo::builder(URL)
        .memory(&memory)
        .queue_with("absent", Recorder::default(), QueueConfig::new().passive())
        .build()
        .unwrap()
        .run_until(std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(error, Error::QueueNotFound { .. }), "{error:?}");
    // A quorum queue's settings back poison detection on the broker's side.
    let memory = Memory::new();
    let service = Running::spawn(
        &memory,
        Conejo::builder(URL).queue_with(
            "replicated",
            Recorder::default(),
            QueueConfig::new().quorum(),
        ),
    );
    eventually("declared", || memory.counts("replicated").is_some()).await;
    let mismatch = memory.declare_queue(
        "replicated",
        QueueOptions {
            durable: true,
            ..QueueOptions::default()
        },
        {
            let mut arguments = FieldTable::default();
            arguments.insert("x-delivery-limit".into(), AMQPValue::LongInt(99));
            arguments
        },
    );
    assert!(mismatch.is_err(), "declared with conejo's delivery limit");
    service.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn exchanges_and_bindings_from_the_builder_route_to_the_queue() {
    let memory = Memory::new();
    let recorder = Recorder::default();
    let service = Running::spawn(
        &memory,
        Conejo::builder(URL)
            .exchange(Exchange::topic("shop"))
            .queue_with("orders", recorder.clone(), config().bind("shop", "order.*")),
    );
    eventually("consuming", || {
        memory.counts("orders").is_some_and(|c| c.consumers == 1)
    })
    .await;
    let body = |text: &'static str| Bytes::from_static(text.as_bytes());
    assert!(
        memory
            .publish(
                "shop",
                "order.created",
                body("o1"),
                BasicProperties::default()
            )
            .unwrap()
    );
    assert!(
        !memory
            .publish(
                "shop",
                "invoice.created",
                body("i1"),
                BasicProperties::default()
            )
            .unwrap(),
        "not bound"
    );
    // Declared by the service as it asked: a different declaration is refused.
    assert!(
        memory
            .declare_exchange("shop", lapin::ExchangeKind::Fanout, FieldTable::default())
            .is_err()
    );
    service.until("orders", |s| s.acked == 1).await;
    assert_eq!(
        *recorder.handled.lock().unwrap(),
        vec![("o1".to_owned(), 1)]
    );
    service.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_retry_copy_the_broker_refuses_gives_the_message_back_and_loses_nothing() {
    let memory = Memory::new();
    declared(&memory, "refused");
    let recorder = Recorder::default();
    recorder
        .failing
        .lock()
        .unwrap()
        .push(("once".to_owned(), 1));
    let service = Running::spawn(
        &memory,
        Conejo::builder(URL).queue_with("refused", recorder.clone(), config()),
    );
    memory.nack_publishes(1);
    publish(&memory, "refused", "once");
    // The copy is nacked: the original is not acked but given back (after a pause), is
    // delivered again (and, redelivered on a classic queue, republished with its count),
    // fails again on its first attempt, and this time its copy is taken; attempt 2 succeeds.
    let stats = service
        .until("refused", |s| s.retried == 1 && s.acked == 3)
        .await;
    assert_eq!(
        (stats.publish_failures, stats.requeued),
        (1, 1),
        "{stats:?}"
    );
    let attempts: Vec<u32> = recorder
        .handled
        .lock()
        .unwrap()
        .iter()
        .map(|h| h.1)
        .collect();
    assert_eq!(attempts, vec![1, 1, 2]);
    eventually("settled", || {
        memory
            .counts("refused")
            .is_some_and(|c| c.ready == 0 && c.unacked == 0)
    })
    .await;
    service.stop().await.unwrap();
}
