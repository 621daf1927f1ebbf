//! Crash loops: a message that kills the consumer process on every delivery is dead-lettered
//! as poison after the limit, and the service then runs normally — on a classic queue
//! (conejo counts) and on a quorum queue (the broker counts).

use std::{
    collections::BTreeSet,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use conejo_tests::{Broker, amqp_url, init_tracing, unique_name};
use lapin::{
    options::QueueDeclareOptions,
    types::{AMQPValue, FieldTable, LongString},
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    task::JoinHandle,
};

const LIMIT: u32 = 3;

/// One run of the fixture service, its stdout lines collected as they come.
struct Run {
    /// The fixture's process: crashed on the poison message, or stopped by the test.
    child: Child,
    /// Its stdout lines so far (`started <id>`, `finished <id>`).
    lines: Arc<Mutex<Vec<String>>>,
    /// The task collecting `lines`: it ends at the end of the output, once the process is gone.
    reader: JoinHandle<()>,
}

impl Run {
    fn start(queue: &str) -> anyhow::Result<Run> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_conejo-fixture"))
            .args(["--queue", queue, "--handler-ms", "5"])
            .args(["--concurrency", "1", "--prefetch", "1"])
            .args(["--abort-on", "poison"])
            .args(["--poison-limit", &LIMIT.to_string()])
            .env("AMQP_URL", amqp_url())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start conejo-fixture")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let reader = tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        Ok(Run {
            child,
            lines,
            reader,
        })
    }

    /// The ids of the messages the run finished, once it has exited: waits (at most 10 s)
    /// until all its output is read.
    async fn finished(self) -> anyhow::Result<Vec<String>> {
        tokio::time::timeout(Duration::from_secs(10), self.reader)
            .await
            .context("the fixture's output did not end")??;
        Ok(self
            .lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|line| line.strip_prefix("finished ").map(str::to_owned))
            .collect())
    }
}

/// Runs the fixture again and again while it crashes; once the poison message is in the
/// dead-letter queue and the work queue is empty, stops it with SIGTERM. Returns the number
/// of crashes and the ids of every message handled.
async fn run_until_healed(broker: &Broker, queue: &str) -> anyhow::Result<(u32, BTreeSet<String>)> {
    let dlq = format!("{queue}.dlq");
    let mut crashes = 0;
    let mut handled = BTreeSet::new();
    for _ in 0..=LIMIT + 2 {
        let mut run = Run::start(queue)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = run.child.try_wait()? {
                anyhow::ensure!(!status.success(), "the fixture stopped on its own");
                crashes += 1;
                break;
            }
            let healed = broker.message_count(&dlq).await.unwrap_or(0) == 1
                && broker.message_count(queue).await? == 0
                && broker.consumer_count(queue).await? == 1;
            if healed {
                let pid = run.child.id().context("exited")?;
                std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()?;
                let status =
                    tokio::time::timeout(Duration::from_secs(10), run.child.wait()).await??;
                anyhow::ensure!(status.success(), "clean exit expected, got {status:?}");
                handled.extend(run.finished().await?);
                return Ok((crashes, handled));
            }
            anyhow::ensure!(Instant::now() < deadline, "neither crashed nor healed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        handled.extend(run.finished().await?);
    }
    anyhow::bail!("still crashing after {crashes} runs")
}

async fn publish_around_poison(broker: &Broker, queue: &str) -> anyhow::Result<BTreeSet<String>> {
    let mut good = BTreeSet::new();
    for n in 0..3 {
        good.insert(
            broker
                .publish_bytes(queue, format!("ok-{n}").as_bytes())
                .await?,
        );
    }
    broker.publish_bytes(queue, b"poison").await?;
    for n in 3..6 {
        good.insert(
            broker
                .publish_bytes(queue, format!("ok-{n}").as_bytes())
                .await?,
        );
    }
    Ok(good)
}

async fn check(broker: &Broker, queue: &str, good: BTreeSet<String>) -> anyhow::Result<()> {
    let (crashes, handled) = run_until_healed(broker, queue).await?;
    eprintln!("{queue}: {crashes} crashes, then healed");
    assert_eq!(crashes, LIMIT, "one crash per delivery up to the limit");
    assert!(
        good.is_subset(&handled),
        "every good message handled: {handled:?}"
    );
    let dead = broker.drain(&format!("{queue}.dlq")).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body, b"poison");
    assert_eq!(
        dead[0].header_str("conejo-reason").as_deref(),
        Some("poison")
    );
    assert_eq!(
        dead[0].header_int("conejo-redeliveries"),
        Some(i64::from(LIMIT))
    );
    assert!(dead[0].header("conejo-failure").is_none());
    broker.delete_consumed_queue(queue).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_kills_the_process_is_dead_lettered_on_a_classic_queue() -> anyhow::Result<()>
{
    init_tracing();
    let broker = Broker::connect().await?;
    let queue = unique_name("crash-classic");
    broker.declare_queue(&queue).await?;
    let good = publish_around_poison(&broker, &queue).await?;
    check(&broker, &queue, good).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_kills_the_process_is_dead_lettered_on_a_quorum_queue() -> anyhow::Result<()>
{
    init_tracing();
    let broker = Broker::connect().await?;
    let queue = unique_name("crash-quorum");
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    broker
        .open_channel()
        .await?
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await?;
    let good = publish_around_poison(&broker, &queue).await?;
    check(&broker, &queue, good).await
}
