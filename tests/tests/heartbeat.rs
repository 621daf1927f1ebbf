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

use std::{
    future::Future,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use conejo::{
    Blocking, BlockingHandler, Conejo, Context, Handler, HandlerError, Json, QueueConfig,
};
use conejo_tests::{
    Broker, ConnectionWatch, always_same_connection, amqp_url, find_connection,
    first_absence_after_presence, init_tracing, unique_name,
};

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

struct Scenario {
    name: String,
    burn_queue: String,
    block_queue: String,
    seen: Seen,
    admin: tokio::runtime::Runtime,
    broker: Broker,
    /// Where handlers run: two workers, both blocked by [`Blocker`]s.
    handlers: tokio::runtime::Runtime,
}

impl Scenario {
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
            broker.declare_queue(&block_queue).await?;
            for id in 0..BURNERS {
                broker.publish_json(&burn_queue, &id).await?;
            }
            for id in 100..100 + BLOCKERS {
                broker.publish_json(&block_queue, &id).await?;
            }
            anyhow::Ok(())
        })?;
        let handlers = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        Ok(Scenario {
            name: unique_name("heartbeat"),
            burn_queue,
            block_queue,
            seen: Seen::default(),
            admin,
            broker,
            handlers,
        })
    }

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
                    .concurrency(BURNERS as usize),
            )
            .queue_with(
                &self.block_queue,
                Blocker(Arc::clone(&self.seen)),
                QueueConfig::new()
                    .durable(false)
                    .concurrency(BLOCKERS as usize),
            ))
    }

    /// Waits (polling, bounded) for the broker to list our connection, then watches it.
    fn watch(&self) -> anyhow::Result<ConnectionWatch> {
        poll_until(Duration::from_secs(15), || {
            Ok(find_connection(&self.name)?.is_some())
        })?;
        Ok(ConnectionWatch::start(&self.name, Duration::from_secs(60)))
    }

    fn ready_messages(&self) -> anyhow::Result<u32> {
        self.admin.block_on(async {
            Ok(self.broker.message_count(&self.burn_queue).await?
                + self.broker.message_count(&self.block_queue).await?)
        })
    }

    fn finish(self) -> anyhow::Result<()> {
        let Scenario {
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
    let scenario = Scenario::new()?;
    let service = scenario.service()?.build()?;
    let shutdown = service.shutdown_handle();
    let stats = service.stats();
    let running = scenario
        .handlers
        .spawn(service.run_until(std::future::pending()));
    let watch = scenario.watch()?;

    let total = BURNERS + BLOCKERS;
    let acked = || {
        stats.queue(&scenario.burn_queue).unwrap().acked
            + stats.queue(&scenario.block_queue).unwrap().acked
    };
    poll_until(Duration::from_secs(45), || {
        anyhow::ensure!(
            !running.is_finished(),
            "the service stopped: {:?}",
            stats.all()
        );
        Ok(acked() == total)
    })?;
    let report = watch.stop_report();
    let observations = &report.observations;

    // The broker saw one and the same connection from before the handlers started until
    // after every message was acked: it never missed a heartbeat.
    let connection = always_same_connection(observations).map_err(anyhow::Error::msg)?;
    // The watch starts once the broker lists the connection, a second or two after the
    // handlers started; the naive setup loses its connection about 3 s in (see the control),
    // so a 7 s span is more than twice what it survives.
    let span = observations.last().unwrap().at - observations[0].at;
    assert!(
        span >= HOG - Duration::from_secs(3),
        "observed for {span:?} only ({} polls)",
        observations.len()
    );
    assert!(observations.len() >= 5, "too few polls: {observations:?}");
    eprintln!(
        "broker kept connection {connection} over {} polls spanning {span:?}",
        observations.len()
    );

    shutdown.shutdown();
    wait(&scenario.handlers, running)???;
    assert_eq!(scenario.ready_messages()?, 0, "every message acked");
    let mut seen = scenario.seen.lock().unwrap().clone();
    seen.sort_unstable();
    let expected: Vec<_> = (0..BURNERS)
        .chain(100..100 + BLOCKERS)
        .map(|id| (id, false))
        .collect();
    assert_eq!(
        seen, expected,
        "each message handled once, none redelivered"
    );
    for queue in [&scenario.burn_queue, &scenario.block_queue] {
        let q = stats.queue(queue).unwrap();
        assert_eq!(
            (q.delivered, q.ack_failures, q.requeued),
            (q.acked, 0, 0),
            "{queue}: {q:?}"
        );
    }
    scenario.finish()
}

#[test]
fn control_lapin_on_the_handler_runtime_loses_its_connection() -> anyhow::Result<()> {
    let scenario = Scenario::new()?;
    let service = scenario.service()?.lapin_on_handler_runtime().build()?;
    let shutdown = service.shutdown_handle();
    let running = scenario
        .handlers
        .spawn(service.run_until(std::future::pending()));
    let watch = scenario.watch()?;
    let started = Instant::now();

    // The broker drops the connection while the blockers still hold both workers.
    poll_until(HOG + Duration::from_secs(20), || {
        Ok(first_absence_after_presence(&watch.snapshot()).is_some())
    })?;
    let gone_after = started.elapsed();
    let report = watch.stop_report();
    eprintln!(
        "broker closed the naive connection {gone_after:?} into the load: {:?}",
        report.observations
    );
    assert!(
        gone_after < HOG,
        "the connection should be lost before the handlers release the runtime ({gone_after:?})"
    );

    // Stopped before it can reconnect (it would only hog again): nothing was acked, the
    // broker holds every message again.
    shutdown.shutdown();
    wait(&scenario.handlers, running)???;
    poll_until(Duration::from_secs(15), || {
        Ok(scenario.ready_messages()? == (BURNERS + BLOCKERS) as u32)
    })?;
    scenario.finish()
}
