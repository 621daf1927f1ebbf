//! Stream queues on the shared broker: read from `first` with retries in place and a dead
//! letter (no `basic.nack`, which would close the connection), resumed by the next run after
//! the stored offset, read from an offset, `next` and a timestamp, and resumed after a lost
//! connection from the committed offset, not from the start.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use conejo::{
    Conejo, Context, Handler, HandlerError, OffsetStore, OffsetStoreError, QueueConfig, QueueStats,
    RetryPolicy, StreamOffset,
    types::{AMQPValue, FieldTable, LongString},
};
use conejo_tests::{Broker, Scenario, amqp_url, unique_name, until};

const WAIT: Duration = Duration::from_secs(30);

/// The offsets stored by the services of a test, by queue.
#[derive(Default)]
struct Stored(Mutex<HashMap<String, u64>>);

impl Stored {
    fn get(&self, queue: &str) -> Option<u64> {
        self.0.lock().unwrap().get(queue).copied()
    }
}

impl OffsetStore for Stored {
    async fn load(&self, queue: &str) -> Result<Option<u64>, OffsetStoreError> {
        Ok(self.0.lock().unwrap().get(queue).copied())
    }

    async fn store(&self, queue: &str, offset: u64) -> Result<(), OffsetStoreError> {
        let mut stored = self.0.lock().unwrap();
        let previous = stored.insert(queue.to_owned(), offset);
        assert!(
            previous < Some(offset),
            "stored {offset} after {previous:?}"
        );
        Ok(())
    }
}

/// Records each call: offset → (body, attempt) of every call. Fails the first attempt at
/// body `retry-me` and every attempt at `never`; takes 0–2 ms.
#[derive(Clone, Default)]
struct Reads {
    calls: Arc<Mutex<Calls>>,
}

/// Offset → (body, attempt) of each call.
type Calls = BTreeMap<u64, Vec<(String, u32)>>;

impl Reads {
    fn offsets(&self) -> Vec<u64> {
        self.calls.lock().unwrap().keys().copied().collect()
    }

    fn calls_of(&self, offset: u64) -> Vec<(String, u32)> {
        self.calls
            .lock()
            .unwrap()
            .get(&offset)
            .cloned()
            .unwrap_or_default()
    }

    fn total_calls(&self) -> usize {
        self.calls.lock().unwrap().values().map(Vec::len).sum()
    }
}

impl Handler for Reads {
    type Message = String;

    async fn handle(&self, body: String, ctx: &Context) -> Result<(), HandlerError> {
        let offset = ctx
            .stream_offset()
            .expect("a stream delivery has an offset");
        self.calls
            .lock()
            .unwrap()
            .entry(offset)
            .or_default()
            .push((body.clone(), ctx.attempt()));
        tokio::time::sleep(Duration::from_micros(offset % 3 * 700)).await;
        match body.as_str() {
            "retry-me" if ctx.attempt() == 1 => Err(HandlerError::retry("not yet")),
            "never" => Err(HandlerError::retry("never works")),
            _ => Ok(()),
        }
    }
}

async fn declare_stream(broker: &Broker, queue: &str) -> anyhow::Result<()> {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("stream")),
    );
    broker
        .declare_durable_queue_with_args(queue, arguments)
        .await
}

async fn publish(broker: &Broker, queue: &str, bodies: &[impl AsRef<str>]) -> anyhow::Result<()> {
    let bodies = bodies
        .iter()
        .map(|b| b.as_ref().as_bytes().to_vec())
        .collect();
    broker.publish_many_persistent(queue, bodies).await
}

/// `n` bodies `m<i>`, with `retry-me` and `never` at the given places.
fn bodies(range: std::ops::Range<usize>, special: &[(usize, &'static str)]) -> Vec<String> {
    range
        .map(|i| {
            special
                .iter()
                .find(|(at, _)| *at == i)
                .map_or_else(|| format!("m{i}"), |(_, body)| (*body).to_owned())
        })
        .collect()
}

fn fast_retries() -> RetryPolicy {
    RetryPolicy::default()
        .initial_delay(Duration::from_millis(20))
        .max_attempts(3)
}

#[tokio::test]
async fn a_stream_is_read_from_first_and_the_next_run_resumes_after_the_stored_offset()
-> anyhow::Result<()> {
    let scenario = Scenario::undeclared("stream").await?;
    let Scenario { broker, queue } = &scenario;
    declare_stream(broker, queue).await?;
    let first = bodies(0..500, &[(13, "retry-me"), (77, "never")]);
    publish(broker, queue, &first).await?;
    let store = Arc::new(Stored::default());
    let config = || {
        QueueConfig::new()
            .stream(StreamOffset::First)
            .offset_store(Arc::clone(&store))
            .concurrency(8)
            .retry(fast_retries())
    };

    let Run {
        reads,
        stats,
        reconnects,
    } = run_until(&scenario, config(), 499, &[] as &[&str]).await?;
    // Read whole, once each: the retry in place (attempt 2 of `retry-me`) and the dead
    // letter (`never`, 3 attempts) sent no nack, so the connection was never lost and
    // nothing was read twice.
    assert_eq!(reads.offsets(), (0..500).collect::<Vec<_>>());
    assert_eq!(reads.total_calls(), 500 + 1 + 2);
    assert_eq!(
        reads.calls_of(13),
        vec![("retry-me".to_owned(), 1), ("retry-me".to_owned(), 2)]
    );
    assert_eq!(
        reads.calls_of(77).iter().map(|c| c.1).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(reconnects, 0);
    assert_eq!((stats.retried, stats.dead_lettered), (3, 1));
    let dead = broker.drain(&format!("{queue}.dlq")).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body, b"never");
    assert_eq!(
        dead[0].header_str("conejo-reason").as_deref(),
        Some("attempts-exhausted")
    );
    assert_eq!(dead[0].header("x-stream-offset"), None);
    // The last committed offset was stored at shutdown.
    assert_eq!(store.get(queue), Some(499));

    // The next run, from `first` again, resumes after the stored offset: it reads only what
    // came since.
    let second = bodies(500..800, &[]);
    publish(broker, queue, &second).await?;
    let reads = run_until(&scenario, config(), 799, &[] as &[&str])
        .await?
        .reads;
    assert_eq!(reads.offsets(), (500..800).collect::<Vec<_>>());
    assert_eq!(reads.total_calls(), 300);
    assert_eq!(reads.calls_of(500), vec![("m500".to_owned(), 1)]);
    assert_eq!(store.get(queue), Some(799));
    scenario.cleanup().await
}

/// What one run of a service read, and its queue's counters at the end.
struct Run {
    reads: Reads,
    stats: QueueStats,
    reconnects: u64,
}

/// Runs a service on the scenario's stream with `config` until it has committed `last` —
/// publishing `publish_once_consuming` once it consumes — then stops it.
async fn run_until(
    scenario: &Scenario,
    config: QueueConfig,
    last: u64,
    publish_once_consuming: &[impl AsRef<str>],
) -> anyhow::Result<Run> {
    let reads = Reads::default();
    let service = scenario.spawn(
        Conejo::builder(amqp_url())
            .connection_name(unique_name("stream-reader"))
            .queue_with(&scenario.queue, reads.clone(), config),
    )?;
    if !publish_once_consuming.is_empty() {
        // Ready once its consume-ok came (a stream's queue.declare-ok counts no consumers).
        until("consuming", WAIT, || service.status().is_ready()).await?;
        publish(&scenario.broker, &scenario.queue, publish_once_consuming).await?;
    }
    service
        .wait_for(&scenario.queue, WAIT, |s| s.stream_offset == Some(last))
        .await?;
    let stats = service.stats().queue(&scenario.queue).unwrap();
    let reconnects = service.status().reconnects();
    service.stop().await??;
    Ok(Run {
        reads,
        stats,
        reconnects,
    })
}

/// A service reading the scenario's stream from `from`: the offsets it read until it
/// committed `last`.
async fn read_from(
    scenario: &Scenario,
    from: StreamOffset,
    last: u64,
    publish_once_consuming: &[&str],
) -> anyhow::Result<Vec<u64>> {
    let config = QueueConfig::new().stream(from);
    let run = run_until(scenario, config, last, publish_once_consuming).await?;
    Ok(run.reads.offsets())
}

#[tokio::test]
async fn a_stream_is_read_from_an_offset_from_next_and_from_a_timestamp() -> anyhow::Result<()> {
    let scenario = Scenario::undeclared("stream-from").await?;
    declare_stream(&scenario.broker, &scenario.queue).await?;
    let first = bodies(0..100, &[]);
    publish(&scenario.broker, &scenario.queue, &first).await?;

    let from_offset = read_from(&scenario, StreamOffset::Offset(90), 99, &[]).await?;
    assert_eq!(from_offset, (90..100).collect::<Vec<_>>());

    // `next`: nothing of what the stream holds, only what comes after the subscription.
    let next = read_from(&scenario, StreamOffset::Next, 102, &["a", "b", "c"]).await?;
    assert_eq!(next, vec![100, 101, 102]);

    // A timestamp an hour back: everything (every chunk was written since).
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let since = read_from(&scenario, StreamOffset::Timestamp(an_hour_ago), 102, &[]).await?;
    assert_eq!(since, (0..103).collect::<Vec<_>>());
    scenario.cleanup().await
}

#[tokio::test]
async fn a_lost_connection_resumes_the_stream_after_the_committed_offset() -> anyhow::Result<()> {
    let scenario = Scenario::undeclared("stream-lost").await?;
    let Scenario { broker, queue } = &scenario;
    declare_stream(broker, queue).await?;
    const N: u64 = 6_000;
    let all = bodies(0..N as usize, &[]);
    publish(broker, queue, &all).await?;
    let name = unique_name("stream-lost");
    let reads = Reads::default();
    // 4 at a time, 0–1.4 ms each: the close (rabbitmqctl takes a second or two) comes
    // mid-stream.
    let service = scenario.spawn(
        Conejo::builder(amqp_url())
            .connection_name(&name)
            .queue_with(
                queue,
                reads.clone(),
                QueueConfig::new()
                    .stream(StreamOffset::First)
                    .concurrency(4),
            ),
    )?;
    let connection = conejo_tests::wait_for_connection_present(&name, WAIT).await?;
    service
        .wait_for(queue, WAIT, |s| s.stream_offset >= Some(N / 10))
        .await?;
    conejo_tests::rabbitmqctl_close_connection(&connection.name, "fault injection").await?;
    let committed_before = service.stats().queue(queue).unwrap().stream_offset;
    anyhow::ensure!(
        committed_before < Some(N - 1),
        "the stream was read before the fault: nothing tested"
    );
    service
        .wait_for(queue, Duration::from_secs(60), |s| {
            s.stream_offset == Some(N - 1)
        })
        .await?;
    let status = service.status().clone();
    service.stop().await??;
    assert_eq!(status.reconnects(), 1);
    // Everything read; read twice only what was running or waiting above the committed
    // offset when the connection went (at most a prefetch window), never from the start.
    assert_eq!(reads.offsets(), (0..N).collect::<Vec<_>>());
    let calls = reads.calls.lock().unwrap().clone();
    let twice: Vec<u64> = calls
        .iter()
        .filter(|(_, c)| c.len() > 1)
        .map(|(o, _)| *o)
        .collect();
    assert!(calls.values().all(|c| c.len() <= 2), "read three times");
    let window = u64::from(QueueConfig::new().concurrency(4).effective_prefetch());
    assert!(twice.len() as u64 <= window, "{} read twice", twice.len());
    if let (Some(&lowest), Some(committed)) = (twice.first(), committed_before) {
        assert!(
            lowest > committed,
            "offset {lowest} read again though {committed} was committed before the loss"
        );
    }
    scenario.cleanup().await
}
