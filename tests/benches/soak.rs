//! Memory over a long run: conejo's resident set while it consumes millions of messages.
//!
//! A publisher in the same process (its own connection, confirmed batches of
//! [`CHUNK`]) keeps the queue's backlog between one and two chunks' worth ahead of conejo,
//! which consumes with a no-op typed JSON handler at `--prefetch` (concurrency equal to
//! it). The process's resident set (`VmRSS` of `/proc/self/status`) is sampled at every
//! percent of the run; the first `--warm-up` percent is excluded. Printed: rate, RSS after
//! warm-up, its max and min afterwards, final RSS, and the drift (max − min) relative to
//! the first sample — the issue's bar is ±5 %. The publisher's own memory is part of the
//! figure (it is flat too).
//!
//! ```text
//! cargo bench -p conejo-tests --bench soak                          # 1,000,000 messages
//! cargo bench -p conejo-tests --bench soak -- --messages 10000000   # the 10 M soak, ~10 min
//! ```
//!
//! Bounded by `--timeout` (seconds); checks, broker side, that the queue ended empty.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure};
use clap::Parser;
use conejo::{Conejo, Context, Handler, HandlerError, Json, QueueConfig};
use conejo_tests::{
    Broker, amqp_url,
    bench::{self, Order},
    unique_name,
};

/// Messages per confirmed publish batch.
const CHUNK: u64 = 5_000;

#[derive(Parser, Debug)]
#[command(about = "conejo's resident set over a long run")]
struct Args {
    /// Messages to consume.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Prefetch (and concurrency).
    #[arg(long, default_value_t = 1000)]
    prefetch: u16,
    /// Percent of the run excluded from the drift.
    #[arg(long, default_value_t = 10)]
    warm_up: u64,
    /// Bound on the whole run, in seconds.
    #[arg(long, default_value_t = 1800)]
    timeout: u64,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Counts handled messages.
struct Count(Arc<AtomicU64>);

impl Handler for Count {
    type Message = Json<Order>;

    async fn handle(&self, order: Json<Order>, _ctx: &Context) -> Result<(), HandlerError> {
        drop(std::hint::black_box(order));
        self.0.fetch_add(1, Relaxed);
        Ok(())
    }
}

/// The resident set, in KiB.
fn rss_kib() -> anyhow::Result<u64> {
    bench::rss_kib().ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/self/status"))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if conejo_tests::bench::listing_tests() {
        return Ok(());
    }
    let args = Args::parse();
    ensure!(
        args.messages >= 100 * CHUNK / 10,
        "--messages must be at least 50000"
    );
    ensure!(args.warm_up < 100, "--warm-up is a percentage below 100");
    let broker = Broker::connect().await?;
    let queue = unique_name("bench.soak");
    let handled = Arc::new(AtomicU64::new(0));
    let service = Conejo::builder(amqp_url())
        .connection_name("soak-conejo")
        .queue_with(
            &queue,
            Count(Arc::clone(&handled)),
            QueueConfig::new()
                .durable(false)
                .prefetch(args.prefetch)
                .concurrency(usize::from(args.prefetch)),
        )
        .build()?;
    let stats = service.stats();
    let shutdown = service.shutdown_handle();
    let running = tokio::spawn(service.run_until(std::future::pending()));
    broker
        .wait_for_consumer_count(&queue, 1, Duration::from_secs(30))
        .await?;

    let body = |id: u64| Order::body(u32::try_from(id).unwrap_or(u32::MAX));
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let started = Instant::now();
    let step = args.messages / 100;
    let mut samples: Vec<(u64, u64)> = Vec::with_capacity(101);
    let mut published = 0;
    let outcome = async {
        while handled.load(Relaxed) < args.messages {
            ensure!(
                Instant::now() < deadline,
                "timed out after {} of {} messages",
                handled.load(Relaxed),
                args.messages
            );
            let done = handled.load(Relaxed);
            if published < args.messages && published - done < 2 * CHUNK {
                let n = CHUNK.min(args.messages - published);
                let bodies = (published..published + n).map(body).collect();
                broker.publish_many_bytes(&queue, bodies).await?;
                published += n;
            } else {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let percent = handled.load(Relaxed) / step.max(1);
            while (samples.len() as u64) <= percent.min(100) {
                samples.push((handled.load(Relaxed), rss_kib()?));
            }
        }
        anyhow::Ok(())
    }
    .await;
    let elapsed = started.elapsed();
    shutdown.shutdown();
    let stopped = tokio::time::timeout(Duration::from_secs(60), running).await;
    let left = broker.message_count(&queue).await;
    broker.delete_consumed_queue(&queue).await?;
    outcome?;
    stopped???;
    if left? != 0 {
        bail!("the queue did not end empty");
    }
    let acked = stats.queue(&queue).map_or(0, |q| q.acked);
    ensure!(acked == args.messages, "acked {acked} of {}", args.messages);

    let measured = &samples[usize::try_from(args.warm_up)
        .unwrap_or(0)
        .min(samples.len() - 1)..];
    let first = measured[0].1;
    let max = measured.iter().map(|s| s.1).max().unwrap_or(first);
    let min = measured.iter().map(|s| s.1).min().unwrap_or(first);
    let last = samples.last().map_or(first, |s| s.1);
    println!(
        "soak: {} messages at prefetch {} in {:.1} s ({:.1} k msgs/s, publisher in-process)",
        args.messages,
        args.prefetch,
        elapsed.as_secs_f64(),
        args.messages as f64 / elapsed.as_secs_f64() / 1e3
    );
    println!(
        "RSS: {:.1} MiB after {} % warm-up; then min {:.1}, max {:.1}, final {:.1} MiB; \
         drift (max − min) {:+.1} % of the first",
        mib(first),
        args.warm_up,
        mib(min),
        mib(max),
        mib(last),
        (max - min) as f64 * 100.0 / first as f64
    );
    let line: Vec<String> = samples
        .iter()
        .step_by(10)
        .map(|(n, kib)| format!("{}k:{:.1}", n / 1000, mib(*kib)))
        .collect();
    println!("samples (messages:MiB): {}", line.join(" "));
    broker.close().await
}
