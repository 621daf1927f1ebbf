//! The reason conejo exists: handlers that hog the application's runtime must not cost the
//! broker connection.
//!
//! Both tests run the same load with a 1 s heartbeat (the broker closes a connection that
//! sent nothing for about two intervals): three blocking handlers burn CPU for 10 s each
//! (more of them than this machine has cores), and two async handlers block both workers of
//! a two-worker runtime for 10 s with `std::thread::sleep` — the classic mistake. With
//! conejo's dedicated connection runtime the broker keeps the same connection throughout and
//! every message is acked once; with lapin bound to the handler runtime (the control), the
//! broker drops the connection while the handlers run. The control proves the first test can
//! fail.
//!
//! Neither test depends on timing: the load is published only once the broker lists the idle
//! connection (whose broker-side name, `client port -> server port`, identifies that TCP
//! connection), and the verdict is causal — the same broker-side connection before and after
//! the load, with nothing redelivered, or that connection gone and every message back in the
//! queue. `rabbitmqctl` itself is slow and erratic while the handlers starve the CPU, so it is
//! never polled during the load.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use conejo::{
    Blocking, BlockingHandler, Conejo, Context, Handler, HandlerError, Json, QueueConfig,
};
use conejo_tests::{Broker, amqp_url, find_connection, init_tracing, unique_name};

/// How long each handler hogs its thread.
const HOG: Duration = Duration::from_secs(10);
/// CPU burners: more than the machine's cores.
const BURNERS: u64 = 3;
/// Async handlers blocking their worker: as many as the handler runtime has workers.
const BLOCKERS: u64 = 2;

type Seen = Arc<Mutex<Vec<(u64, bool)>>>;

/// Burns CPU for [`HOG`] on the blocking pool.
struct Burner(Seen);

impl BlockingHandler for Burner {
    type Message = Json<u64>;

    fn handle(&self, Json(id): Json<u64>, ctx: &Context) -> Result<(), HandlerError> {
        let started = Instant::now();
        let mut x = id | 1;
        while started.elapsed() < HOG {
            for _ in 0..10_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
            }
        }
        std::hint::black_box(x);
        self.0.lock().unwrap().push((id, ctx.redelivered()));
        Ok(())
    }
}

/// An async handler that wrongly blocks its worker thread for [`HOG`].
struct Blocker(Seen);

impl Handler for Blocker {
    type Message = Json<u64>;

    async fn handle(&self, Json(id): Json<u64>, ctx: &Context) -> Result<(), HandlerError> {
        thread::sleep(HOG);
        self.0.lock().unwrap().push((id, ctx.redelivered()));
        Ok(())
    }
}

/// Both tests' set-up: two queues loaded with hogging handlers, the runtime they run on, and
/// a runtime of the test's own for the broker-side checks.
struct HogLoad {
    /// The service's `connection_name`: how the broker's listing tells its connection.
    name: String,
    /// The queue of the CPU-burning [`Burner`]s.
    burn_queue: String,
    /// The queue of the worker-blocking [`Blocker`]s.
    block_queue: String,
    /// What each handler call saw: (message id, redelivered).
    seen: Seen,
    /// Runs the test's own broker calls, away from the hogged runtime.
    admin: tokio::runtime::Runtime,
    /// The test's connection, to publish the load and count what is left.
    broker: Broker,
    /// Where handlers run: two workers, both blocked by [`Blocker`]s.
    handlers: tokio::runtime::Runtime,
}

impl HogLoad {
    fn new() -> anyhow::Result<Self> {
        init_tracing();
        let admin = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let broker = admin.block_on(Broker::connect())?;
        let burn_queue = unique_name("hb-burn");
        let block_queue = unique_name("hb-block");
        admin.block_on(async {
            broker.declare_queue(&burn_queue).await?;
            broker.declare_queue(&block_queue).await
        })?;
        let handlers = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        Ok(HogLoad {
            name: unique_name("heartbeat"),
            burn_queue,
            block_queue,
            seen: Seen::default(),
            admin,
            broker,
            handlers,
        })
    }

    /// Poison counting is off: on a classic queue it republishes each redelivered message, and
    /// when the control's connection dies before the original is acked both copies remain
    /// (at least once), which would blur the control's exact count of messages given back.
    fn service(&self) -> anyhow::Result<conejo::Builder> {
        let url = amqp_url();
        let separator = if url.contains('?') { '&' } else { '?' };
        Ok(Conejo::builder(format!("{url}{separator}heartbeat=1"))
            .connection_name(&self.name)
            .shutdown_timeout(Duration::from_secs(30))
            .queue_with(
                &self.burn_queue,
                Blocking::new(Burner(Arc::clone(&self.seen))),
                QueueConfig::new()
                    .durable(false)
                    .poison_limit(None)
                    .concurrency(BURNERS as usize),
            )
            .queue_with(
                &self.block_queue,
                Blocker(Arc::clone(&self.seen)),
                QueueConfig::new()
                    .durable(false)
                    .poison_limit(None)
                    .concurrency(BLOCKERS as usize),
            ))
    }

    /// Waits (polling, bounded) until the service consumes every queue and the broker lists
    /// its connection, then publishes the load. Returns the connection's broker-side name.
    fn start_load(&self, status: &conejo::Status) -> anyhow::Result<String> {
        let mut connection = None;
        poll_until(Duration::from_secs(30), || {
            if status.is_ready() {
                connection = find_connection(&self.name)?.map(|c| c.name);
            }
            Ok(connection.is_some())
        })?;
        self.admin.block_on(async {
            for id in 0..BURNERS {
                self.broker.publish_json(&self.burn_queue, &id).await?;
            }
            for id in 100..100 + BLOCKERS {
                self.broker.publish_json(&self.block_queue, &id).await?;
            }
            anyhow::Ok(())
        })?;
        Ok(connection.expect("set when the poll ended"))
    }

    /// The broker-side name of the connection now carrying the service's name, if any.
    fn connection_now(&self) -> anyhow::Result<Option<String>> {
        Ok(find_connection(&self.name)?.map(|c| c.name))
    }

    fn ready_messages(&self) -> anyhow::Result<u32> {
        self.admin.block_on(async {
            Ok(self.broker.message_count(&self.burn_queue).await?
                + self.broker.message_count(&self.block_queue).await?)
        })
    }

    fn finish(self) -> anyhow::Result<()> {
        let HogLoad {
            admin,
            broker,
            burn_queue,
            block_queue,
            handlers,
            ..
        } = self;
        handlers.shutdown_timeout(Duration::from_secs(20));
        admin.block_on(async {
            broker.delete_consumed_queue(&burn_queue).await?;
            broker.delete_consumed_queue(&block_queue).await
        })
    }
}

fn poll_until(
    timeout: Duration,
    mut done: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !done()? {
        anyhow::ensure!(
            Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn wait<T>(runtime: &tokio::runtime::Runtime, task: impl Future<Output = T>) -> anyhow::Result<T> {
    runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(40), task).await })
        .map_err(|_| anyhow::anyhow!("timed out"))
}

#[test]
fn heartbeats_survive_handlers_that_hog_every_worker() -> anyhow::Result<()> {
    let load = HogLoad::new()?;
    let service = load.service()?.build()?;
    let shutdown = service.shutdown_handle();
    let stats = service.stats();
    let status = service.status();
    let running = load
        .handlers
        .spawn(service.run_until(std::future::pending()));
    let before = load.start_load(&status)?;

    let total = BURNERS + BLOCKERS;
    let acked = || {
        stats.queue(&load.burn_queue).unwrap().acked + stats.queue(&load.block_queue).unwrap().acked
    };
    poll_until(Duration::from_secs(60), || {
        anyhow::ensure!(
            !running.is_finished(),
            "the service stopped: {:?}",
            stats.all()
        );
        Ok(acked() == total)
    })?;

    // Ten seconds without a heartbeat frame on a 1 s heartbeat would have made the broker close
    // the connection (the control shows it does) and conejo would have reconnected on a new
    // TCP connection. The broker still lists the very connection it listed before the load.
    let after = load.connection_now()?;
    assert_eq!(
        after.as_deref(),
        Some(before.as_str()),
        "the broker-side connection changed during the load"
    );
    assert_eq!(status.reconnects(), 0, "the service never reconnected");
    eprintln!("broker kept connection {before} through {HOG:?} of hogged handlers");

    shutdown.shutdown();
    wait(&load.handlers, running)???;
    assert_eq!(load.ready_messages()?, 0, "every message acked");
    let mut seen = load.seen.lock().unwrap().clone();
    seen.sort_unstable();
    let expected: Vec<_> = (0..BURNERS)
        .chain(100..100 + BLOCKERS)
        .map(|id| (id, false))
        .collect();
    assert_eq!(
        seen, expected,
        "each message handled once, none redelivered"
    );
    for queue in [&load.burn_queue, &load.block_queue] {
        let q = stats.queue(queue).unwrap();
        assert_eq!(
            (q.delivered, q.ack_failures, q.requeued),
            (q.acked, 0, 0),
            "{queue}: {q:?}"
        );
    }
    load.finish()
}

#[test]
fn control_lapin_on_the_handler_runtime_loses_its_connection() -> anyhow::Result<()> {
    let load = HogLoad::new()?;
    let service = load.service()?.lapin_on_handler_runtime().build()?;
    let shutdown = service.shutdown_handle();
    let status = service.status();
    let running = load
        .handlers
        .spawn(service.run_until(std::future::pending()));
    let before = load.start_load(&status)?;
    let started = Instant::now();

    // The blockers hold both workers for 10 s: no heartbeat goes out, the broker closes the
    // connection. The service notices once its runtime is released and reconnects; the
    // handlers' results belong to the dead connection and are dropped, never acked.
    poll_until(HOG + Duration::from_secs(40), || {
        Ok(status.reconnects() >= 1 && load.connection_now()?.as_ref() != Some(&before))
    })?;
    eprintln!(
        "the naive connection {before} was replaced {:?} into the load",
        started.elapsed()
    );
    // Stopped (it would only hog again): nothing was acked, the broker holds every message
    // again.
    shutdown.shutdown();
    wait(&load.handlers, running)???;
    let mut ready = 0;
    poll_until(Duration::from_secs(15), || {
        ready = load.ready_messages()?;
        Ok(ready == (BURNERS + BLOCKERS) as u32)
    })
    .map_err(|e| e.context(format!("{ready} messages ready")))?;
    load.finish()
}

/// What a publish-only application does: connect a publisher on its runtime, publish, then
/// hog every worker of that runtime for [`HOG`] (a publish made meanwhile waits for a worker),
/// then publish again. Returns the publisher's broker-side connection before and after, and
/// its counters.
fn publish_through_a_hogged_application(naive: bool) -> anyhow::Result<HoggedPublisher> {
    init_tracing();
    let admin = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let broker = admin.block_on(Broker::connect())?;
    let queue = unique_name("hb-publish");
    admin.block_on(broker.declare_queue(&queue))?;
    let application = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let name = unique_name("hb-publisher");
    let url = amqp_url();
    let separator = if url.contains('?') { '&' } else { '?' };
    let mut builder = conejo::Publisher::builder(format!("{url}{separator}heartbeat=1"))
        .connection_name(&name)
        .reconnect_delay(Duration::from_millis(50), Duration::from_millis(200));
    if naive {
        builder = builder.lapin_on_the_callers_runtime();
    }
    let publisher = application.block_on(builder.connect())?;
    application.block_on(publisher.publish("", &queue, "before"))?;
    let mut before = None;
    poll_until(Duration::from_secs(30), || {
        before = find_connection(&name)?.map(|c| c.name);
        Ok(before.is_some())
    })?;
    // Both workers blocked for 10 s: ten heartbeat intervals.
    let blockers: Vec<_> = (0..2)
        .map(|_| application.spawn(async { thread::sleep(HOG) }))
        .collect();
    let during = application.spawn({
        let (publisher, queue) = (publisher.clone(), queue.clone());
        async move { publisher.publish("", &queue, "during").await }
    });
    for blocker in blockers {
        wait(&application, blocker)??;
    }
    let during = wait(&application, during)??;
    application.block_on(publisher.publish("", &queue, "after"))?;
    let mut after = None;
    poll_until(Duration::from_secs(30), || {
        after = find_connection(&name)?.map(|c| c.name);
        Ok(after.is_some())
    })?;
    let stats = publisher.stats();
    application.block_on(publisher.close());
    let on_broker = admin.block_on(broker.message_count(&queue))?;
    admin.block_on(broker.delete_queue(&queue))?;
    application.shutdown_timeout(Duration::from_secs(5));
    Ok(HoggedPublisher {
        before,
        after,
        during,
        stats,
        on_broker,
    })
}

/// What [`publish_through_a_hogged_application`] saw.
struct HoggedPublisher {
    /// The publisher's broker-side connection before the load, and after.
    before: Option<String>,
    after: Option<String>,
    /// The publish made while the application was blocked.
    during: Result<(), conejo::PublishError>,
    /// The publisher's counters at the end.
    stats: conejo::PublishStats,
    /// Messages on the broker at the end.
    on_broker: u32,
}

/// The publisher's connection lives on conejo's connection runtime too: an application whose
/// every worker is blocked — the runtime the publisher was made on, and publishes from —
/// keeps its publishing connection, and publishes once released, with nothing lost.
#[test]
fn a_publishers_connection_survives_an_application_that_hogs_every_worker() -> anyhow::Result<()> {
    let seen = publish_through_a_hogged_application(false)?;
    assert_eq!(
        seen.after, seen.before,
        "the publisher's broker-side connection changed"
    );
    seen.during?;
    let stats = seen.stats;
    assert_eq!(
        (stats.confirmed, stats.lost, stats.failed),
        (3, 0, 0),
        "{stats:?}"
    );
    assert_eq!(seen.on_broker, 3);
    eprintln!(
        "publisher kept connection {} through {HOG:?} of a blocked application",
        seen.before.unwrap_or_default()
    );
    Ok(())
}

/// The control: with lapin on the application's runtime, the same load costs the publisher its
/// connection (the broker closes it for missed heartbeats), which proves the test above can
/// fail.
#[test]
fn control_a_publisher_on_the_applications_runtime_loses_its_connection() -> anyhow::Result<()> {
    let seen = publish_through_a_hogged_application(true)?;
    let stats = seen.stats;
    assert_ne!(
        seen.after, seen.before,
        "the naive publisher kept its connection: {stats:?}"
    );
    // The publish made during the load was lost with the connection, or sent again after it:
    // on the broker or not, the publisher said which it could be.
    let landed = match &seen.during {
        Ok(()) => 1,
        Err(error) => {
            assert!(error.may_have_been_published(), "{error:?}");
            0
        }
    };
    assert!(
        seen.on_broker >= 2 + landed,
        "{} on the broker; {stats:?}",
        seen.on_broker
    );
    eprintln!(
        "the naive publisher's connection {:?} was replaced by {:?}; the publish during the \
         load: {:?}",
        seen.before, seen.after, seen.during
    );
    Ok(())
}
