//! Latency from publish to handler start, conejo beside a raw lapin consumer, on a real
//! broker, at a steady rate well below either's ceiling.
//!
//! For each consumer (raw lapin, then conejo with its defaults — ack linger included), a
//! fresh queue is consumed while a publisher on its own connection sends `--rate` messages
//! per second for `--seconds` (paced by the clock, no confirms, so the publisher does not
//! wait on the broker). Each ~100-byte JSON body carries the time it was published (on one
//! monotonic clock shared by publisher and consumer: the same process); the consumer records
//! the time its handler starts — for conejo, inside the handler, after decoding; for lapin,
//! right after decoding. The first second is warm-up and not counted. Printed: p50, p90, p99,
//! p99.9 and max per consumer, and conejo's minus lapin's at each percentile.
//!
//! ```text
//! cargo bench -p conejo-tests --bench latency
//! cargo bench -p conejo-tests --bench latency -- --rate 1000 --seconds 20
//! ```
//!
//! The broker is `AMQP_URL` (default the local guest broker). Every run is bounded in time
//! and checks, broker side, that its queue ended empty; the queues are deleted.

use std::{
    sync::{Arc, LazyLock, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use conejo::{Conejo, Context, Handler, HandlerError, Json, QueueConfig};
use conejo_tests::{
    Broker, amqp_url,
    lapin::{
        BasicProperties, Connection, ConnectionProperties,
        options::{
            BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
            QueueDeclareOptions,
        },
        types::FieldTable,
    },
    unique_name,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

/// The clock every timestamp is measured on.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Nanoseconds since [`EPOCH`].
fn now_ns() -> u64 {
    u64::try_from(EPOCH.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Messages published before measuring starts: the first second.
fn warm_up(rate: u32) -> usize {
    rate as usize
}

/// How long a consumer may take to see the last message after the publisher finished.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
#[command(about = "publish-to-handler latency of conejo beside raw lapin")]
struct Args {
    /// Messages per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Seconds of publishing per consumer (the first is warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The message.
#[derive(Debug, Serialize, Deserialize)]
struct Stamp {
    /// When it was published, ns since [`EPOCH`].
    sent_ns: u64,
    /// Its number.
    seq: u64,
    /// Padding to about 100 bytes.
    note: String,
}

/// Latencies recorded by a consumer, in ns, indexed by sequence number.
#[derive(Clone)]
struct Recorder {
    latencies: Arc<Mutex<Vec<Option<u64>>>>,
}

impl Recorder {
    fn new(total: usize) -> Self {
        Recorder {
            latencies: Arc::new(Mutex::new(vec![None; total])),
        }
    }

    fn record(&self, stamp: &Stamp) {
        let latency = now_ns().saturating_sub(stamp.sent_ns);
        if let Some(slot) = self
            .latencies
            .lock()
            .unwrap()
            .get_mut(usize::try_from(stamp.seq).unwrap_or(usize::MAX))
        {
            *slot = Some(latency);
        }
    }

    fn count(&self) -> usize {
        self.latencies.lock().unwrap().iter().flatten().count()
    }

    /// The measured latencies (warm-up excluded), sorted; an error if any is missing.
    fn sorted(&self, skip: usize) -> anyhow::Result<Vec<u64>> {
        let all = self.latencies.lock().unwrap();
        let mut measured = Vec::with_capacity(all.len().saturating_sub(skip));
        for (seq, latency) in all.iter().enumerate().skip(skip) {
            measured.push(latency.with_context(|| format!("message {seq} never reached"))?);
        }
        measured.sort_unstable();
        Ok(measured)
    }
}

/// conejo's handler: records, then acks.
struct Record(Recorder);

impl Handler for Record {
    type Message = Json<Stamp>;

    async fn handle(&self, Json(stamp): Json<Stamp>, _ctx: &Context) -> Result<(), HandlerError> {
        self.0.record(&stamp);
        Ok(())
    }
}

/// Publishes `total` stamped messages to `queue` at `rate` per second, paced by the clock.
async fn publish(queue: String, rate: u32, total: usize) -> anyhow::Result<()> {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let start = Instant::now();
    let interval = Duration::from_secs(1) / rate;
    for seq in 0..total {
        let due = start + interval * u32::try_from(seq).unwrap_or(u32::MAX);
        tokio::time::sleep_until(due.into()).await;
        let body = serde_json::to_vec(&Stamp {
            sent_ns: now_ns(),
            seq: seq as u64,
            note: "x".repeat(48),
        })?;
        // Awaiting the publish only waits for lapin to take the frame (no confirms).
        let _confirm = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_content_type("application/json".into()),
            )
            .await?;
    }
    connection.close(200, "done".into()).await?;
    Ok(())
}

/// Waits, bounded, until `recorder` saw `total` messages.
async fn wait_for_all(recorder: &Recorder, total: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while recorder.count() < total {
        ensure!(
            Instant::now() < deadline,
            "only {} of {total} messages arrived",
            recorder.count()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Raw lapin: the ordinary consumer loop (decode, record, ack), prefetch 32.
async fn lapin_run(queue: &str, args: &Args, total: usize) -> anyhow::Result<Recorder> {
    let recorder = Recorder::new(total);
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel.basic_qos(32, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "latency-lapin".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let sink = recorder.clone();
    let consuming = tokio::spawn(async move {
        let mut seen = 0;
        while seen < total {
            let delivery = consumer.next().await.context("consumer ended")??;
            let stamp: Stamp = serde_json::from_slice(&delivery.data)?;
            sink.record(&stamp);
            delivery.ack(BasicAckOptions::default()).await?;
            seen += 1;
        }
        anyhow::Ok(())
    });
    publish(queue.to_owned(), args.rate, total).await?;
    wait_for_all(&recorder, total).await?;
    tokio::time::timeout(DRAIN_TIMEOUT, consuming).await???;
    channel.close(200, "done".into()).await?;
    connection.close(200, "done".into()).await?;
    Ok(recorder)
}

/// conejo with its defaults (concurrency 16, prefetch 32, ack linger 5 ms).
async fn conejo_run(
    broker: &Broker,
    queue: &str,
    args: &Args,
    total: usize,
) -> anyhow::Result<Recorder> {
    let recorder = Recorder::new(total);
    let service = Conejo::builder(amqp_url())
        .connection_name("latency-conejo")
        .queue_with(queue, Record(recorder.clone()), QueueConfig::new())
        .build()?;
    let shutdown = service.shutdown_handle();
    let running = tokio::spawn(service.run_until(std::future::pending()));
    broker
        .wait_for_consumer_count(queue, 1, DRAIN_TIMEOUT)
        .await?;
    publish(queue.to_owned(), args.rate, total).await?;
    wait_for_all(&recorder, total).await?;
    shutdown.shutdown();
    tokio::time::timeout(DRAIN_TIMEOUT, running).await???;
    Ok(recorder)
}

/// The `p`-th percentile (0–100) of sorted values.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if conejo_tests::bench::listing_tests() {
        return Ok(());
    }
    let args = Args::parse();
    ensure!(
        (1..=20_000).contains(&args.rate),
        "--rate must be 1 to 20000"
    );
    ensure!(args.seconds >= 2, "--seconds must be at least 2");
    LazyLock::force(&EPOCH);
    let total = args.rate as usize * args.seconds as usize;
    let broker = Broker::connect().await?;
    println!(
        "latency: publish → handler start, {} msgs/s for {} s per consumer ({} measured after \
         1 s of warm-up), ~100 B JSON, broker {}",
        args.rate,
        args.seconds,
        total - warm_up(args.rate),
        broker.connection_name()
    );
    let percentiles = [50.0, 90.0, 99.0, 99.9];
    let mut results = Vec::new();
    for kind in ["raw lapin", "conejo"] {
        let queue = unique_name("bench.latency");
        let recorded = match kind {
            "raw lapin" => lapin_run(&queue, &args, total).await,
            _ => conejo_run(&broker, &queue, &args, total).await,
        };
        let left = broker.message_count(&queue).await;
        broker.delete_consumed_queue(&queue).await?;
        let sorted = recorded?.sorted(warm_up(args.rate))?;
        if left? != 0 {
            bail!("{kind}: the queue did not end empty");
        }
        let mut line = format!("{kind:>10}:");
        for p in percentiles {
            line += &format!("  p{p} {:7.3} ms", ms(percentile(&sorted, p)));
        }
        line += &format!("  max {:7.3} ms", ms(*sorted.last().unwrap()));
        println!("{line}");
        results.push(sorted);
    }
    let mut line = format!("{:>10}:", "difference");
    for p in percentiles {
        let delta = percentile(&results[1], p) as f64 - percentile(&results[0], p) as f64;
        line += &format!("  p{p} {:+7.3} ms", delta / 1e6);
    }
    println!("{line}");
    broker.close().await
}
