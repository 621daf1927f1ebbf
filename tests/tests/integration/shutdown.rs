//! Graceful shutdown, from the outside (a real process and SIGTERM) and from the inside (a
//! shutdown handle and a deadline that runs out, a handler that asks for it).

use std::{
    collections::BTreeSet,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use conejo::{Conejo, Context, Handler, HandlerError};
use conejo_tests::{Scenario, TcpProxy, amqp_url, queue_config, unique_name};
use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{Child, ChildStdout, Command},
};

const TOTAL: usize = 20;
const CONCURRENCY: usize = 4;
const PREFETCH: usize = 10;
const HANDLER: Duration = Duration::from_secs(3);
/// How long a test waits for a service to stop by itself.
const WAIT: Duration = Duration::from_secs(20);

struct Fixture {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Fixture {
    fn spawn(queue: &str, connection_name: &str) -> anyhow::Result<Self> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_conejo-fixture"))
            .args(["--queue", queue, "--connection-name", connection_name])
            .args(["--handler-ms", &HANDLER.as_millis().to_string()])
            .args(["--concurrency", &CONCURRENCY.to_string()])
            .args(["--prefetch", &PREFETCH.to_string()])
            .args(["--shutdown-timeout-ms", "10000"])
            .env("AMQP_URL", amqp_url())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start conejo-fixture")?;
        let stdout = child.stdout.take().context("no stdout")?;
        Ok(Fixture {
            child,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// The next `(event, message id)` line, within `timeout`.
    async fn next_event(&mut self, timeout: Duration) -> anyhow::Result<Option<(String, String)>> {
        let line = tokio::time::timeout(timeout, self.lines.next_line())
            .await
            .context("no output from the fixture in time")??;
        Ok(line.and_then(|line| {
            line.split_once(' ')
                .map(|(event, id)| (event.to_owned(), id.to_owned()))
        }))
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.child.id().context("the fixture already exited")?;
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} {pid} failed");
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_work_gives_back_the_rest_and_exits_zero() -> anyhow::Result<()>
{
    let scenario = Scenario::new("sigterm").await?;
    let Scenario { broker, queue } = &scenario;
    let mut published = BTreeSet::new();
    for n in 0..TOTAL {
        published.insert(
            broker
                .publish_bytes(queue, format!("job {n}").as_bytes())
                .await?,
        );
    }
    let name = unique_name("fixture");
    let mut fixture = Fixture::spawn(queue, &name)?;

    let mut started = BTreeSet::new();
    while started.len() < CONCURRENCY {
        match fixture.next_event(Duration::from_secs(20)).await? {
            Some((event, id)) if event == "started" => {
                started.insert(id);
            }
            other => anyhow::bail!("unexpected fixture output before shutdown: {other:?}"),
        }
    }
    // The prefetch window is full: PREFETCH delivered, CONCURRENCY running.
    broker
        .wait_for_count(queue, (TOTAL - PREFETCH) as u32, Duration::from_secs(10))
        .await?;
    fixture.signal("TERM")?;
    let signalled = Instant::now();

    // The prefetched-but-unstarted messages come back at once, while the handlers still run.
    broker
        .wait_for_count(queue, (TOTAL - CONCURRENCY) as u32, HANDLER / 2)
        .await
        .context(
            "prefetched messages were not given back before the in-flight handlers finished",
        )?;

    let mut finished = BTreeSet::new();
    while let Some((event, id)) = fixture.next_event(Duration::from_secs(20)).await? {
        anyhow::ensure!(
            event == "finished",
            "unexpected event after SIGTERM: {event} {id}"
        );
        finished.insert(id);
    }
    let status = tokio::time::timeout(Duration::from_secs(15), fixture.child.wait()).await??;
    let exited_after = signalled.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        exited_after < HANDLER + Duration::from_secs(2),
        "took {exited_after:?} to exit"
    );
    assert_eq!(finished, started, "every in-flight handler finished");

    // The in-flight messages were acked; everything else is back in the queue, once.
    let rest = broker.drain(queue).await?;
    let rest_ids: Vec<String> = rest.iter().filter_map(|m| m.message_id.clone()).collect();
    let rest_set: BTreeSet<String> = rest_ids.iter().cloned().collect();
    assert_eq!(rest_ids.len(), rest_set.len(), "no duplicate in the queue");
    assert!(
        rest_set.is_disjoint(&finished),
        "an acked message came back"
    );
    let all: BTreeSet<String> = rest_set.union(&finished).cloned().collect();
    assert_eq!(all, published, "no message lost");
    // The ones given back were prefetched (delivered once), the others never left the queue.
    let redelivered = rest.iter().filter(|m| m.redelivered).count();
    assert_eq!(redelivered, PREFETCH - CONCURRENCY);
    conejo_tests::wait_for_connection_absent(&name, Duration::from_secs(5)).await?;
    scenario.cleanup().await
}

/// Sleeps far longer than the shutdown deadline.
#[derive(Clone, Default)]
struct SleepsPastTheDeadline {
    finished: Arc<AtomicU64>,
}

impl Handler for SleepsPastTheDeadline {
    type Message = Vec<u8>;

    async fn handle(&self, _body: Vec<u8>, _ctx: &Context) -> Result<(), HandlerError> {
        tokio::time::sleep(Duration::from_secs(4)).await;
        self.finished.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_past_the_deadline_are_requeued_and_their_late_acks_dropped() -> anyhow::Result<()>
{
    let scenario = Scenario::new("deadline").await?;
    let Scenario { broker, queue } = &scenario;
    for n in 0..6 {
        broker
            .publish_bytes(queue, format!("slow {n}").as_bytes())
            .await?;
    }
    let handler = SleepsPastTheDeadline::default();
    let service = scenario.spawn(
        Conejo::builder(amqp_url())
            .shutdown_timeout(Duration::from_millis(500))
            .queue_with(
                queue,
                handler.clone(),
                queue_config().concurrency(2).prefetch(4),
            ),
    )?;
    // Two running (the concurrency), two more prefetched: two left on the broker.
    service
        .wait_for(queue, Duration::from_secs(10), |s| s.delivered == 2)
        .await?;
    broker
        .wait_for_count(queue, 2, Duration::from_secs(10))
        .await?;
    let stats = service.stats().clone();
    let stopping = Instant::now();
    service.stop().await??;
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "shutdown took {took:?} despite a 500 ms deadline"
    );

    // 2 prefetched-unstarted + 2 still running: all four given back.
    let q = stats.queue(queue).unwrap();
    assert_eq!((q.acked, q.requeued), (0, 4), "{q:?}");
    broker
        .wait_for_count(queue, 6, Duration::from_secs(5))
        .await?;

    // The handlers sleeping past the deadline finish later; their results must not reach
    // the broker.
    let deadline = Instant::now() + Duration::from_secs(10);
    while handler.finished.load(Ordering::SeqCst) < 2 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the running handlers never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let q = stats.queue(queue).unwrap();
    assert_eq!((q.acked, q.late_settlements), (0, 2), "{q:?}");
    assert_eq!(broker.message_count(queue).await?, 6);
    scenario.cleanup().await
}

#[tokio::test]
async fn a_function_handler_can_ask_the_service_to_stop() -> anyhow::Result<()> {
    let scenario = Scenario::new("fn-handler").await?;
    let Scenario { broker, queue } = &scenario;
    broker.publish_bytes(queue, b"hello").await?;
    broker.publish_bytes(queue, b"stop").await?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let service = scenario.spawn(Conejo::builder(amqp_url()).queue_with(
        queue,
        conejo::handler_fn(move |text: String, ctx: Context| {
            let sink = Arc::clone(&sink);
            async move {
                if text == "stop" {
                    ctx.request_shutdown();
                }
                sink.lock().unwrap().push(text);
                Ok(())
            }
        }),
        queue_config().concurrency(1),
    ))?;
    // The service stops by itself, cleanly, after acking both.
    service.join(WAIT).await??;
    assert_eq!(*seen.lock().unwrap(), vec!["hello", "stop"]);
    assert_eq!(broker.message_count(queue).await?, 0);
    scenario.cleanup().await
}

/// When the signal comes.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// At startup, waiting for a broker that is not there.
    Waiting,
    /// After a connection loss, while reconnecting to a broker that has gone.
    Reconnecting,
}

/// Starts the fixture process, brings it to `phase`, sends it `signal` and expects exit 0
/// within a second.
async fn signal_exits_zero_at_once(signal: &str, phase: Phase) -> anyhow::Result<()> {
    let scenario = Scenario::new("signal").await?;
    let queue = &scenario.queue;
    // Waiting: a loopback port nobody listens on. Reconnecting: a proxy to the broker,
    // closed once the fixture consumes.
    let proxy = TcpProxy::start_for_url(&amqp_url())?;
    let url = match phase {
        Phase::Waiting => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
        }
        Phase::Reconnecting => proxy.url(&amqp_url())?,
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_conejo-fixture"))
        .args(["--queue", queue])
        .env("AMQP_URL", url)
        .env("RUST_LOG", "warn,conejo=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start conejo-fixture")?;
    let mut stderr = BufReader::new(child.stderr.take().context("no stderr")?).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut wait_for = async |text: &str| -> anyhow::Result<()> {
        loop {
            let line = tokio::time::timeout_at(deadline.into(), stderr.next_line())
                .await
                .with_context(|| format!("the fixture never said '{text}'"))??
                .context("the fixture exited")?;
            if line.contains(text) {
                return Ok(());
            }
        }
    };
    if let Phase::Reconnecting = phase {
        wait_for("consuming").await?;
        proxy.refuse()?;
        proxy.cut();
        wait_for("connection lost").await?;
    }
    // Waiting or reconnecting: it says so (and keeps trying).
    wait_for("cannot reach the broker").await?;
    let pid = child.id().context("exited")?;
    let signalled = Instant::now();
    std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()?;
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await??;
    let took = signalled.elapsed();
    eprintln!("exited {status:?} {took:?} after SIG{signal}, {phase:?}");
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    scenario.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_waiting_for_the_broker_exits_zero_at_once() -> anyhow::Result<()> {
    signal_exits_zero_at_once("TERM", Phase::Waiting).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_while_waiting_for_the_broker_exits_zero_at_once() -> anyhow::Result<()> {
    signal_exits_zero_at_once("INT", Phase::Waiting).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_reconnecting_exits_zero_at_once() -> anyhow::Result<()> {
    signal_exits_zero_at_once("TERM", Phase::Reconnecting).await
}
