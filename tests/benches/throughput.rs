//! Throughput of conejo against hand-written lapin consumers, on a real broker.
//!
//! For each prefetch (100 and 1000) and each consumer, repeated `--runs` times (consumers
//! alternate within a run, so drifts of a shared machine touch them alike):
//!
//! 1. a fresh, uniquely named queue — declared exactly as conejo's default [`QueueConfig`]
//!    declares it (durable, no arguments) — is prefilled with `--messages` JSON messages of
//!    100 bytes, and the benchmark waits until the broker reports all of them ready;
//! 2. the consumer drains it, decoding every body into the typed [`Order`]:
//!    - **lapin no_ack**: `no_ack`, the broker forgets each message once sent — its delivery
//!      ceiling, which an acking consumer cannot reach;
//!    - **lapin coalesced**: `basic.qos(prefetch)`, one `basic.ack(multiple = true)` every
//!      prefetch / 4 deliveries and after 20 ms idle — the practical ceiling of an acking
//!      consumer of one queue, and the baseline of every ratio printed;
//!    - **lapin ack-each**: the ordinary loop, ack each delivery and await the ack;
//!    - **conejo**: a [`Handler`] with `type Message = Json<Order>` that only counts,
//!      with `prefetch(p)` and `concurrency(p)`, until `stats().acked` reaches the total;
//!    - **conejo pf only**: the same handler with `prefetch(p)` and the default concurrency;
//!    - **conejo dflt**: the same handler with conejo's defaults (no prefetch, no
//!      concurrency set: what a new user gets; the `--prefetch` of the row does not apply).
//!
//! With `--failing-share F` (e.g. 0.1), each run also measures **conejo with failures**: the
//! same handler and settings, but a share `F` of the messages (one in ten for 0.1, spread
//! evenly) fails on its first two attempts and succeeds on the third, under a retry policy of
//! [`FAILING_INITIAL_DELAY`] × 3ⁿ with ± 10 % jitter — so each of them makes two round trips
//! through the broker's wait queues. Its rate counts the original messages handled per second
//! (each failing message once, when it finally succeeds); the retries it scheduled are
//! printed beside it.
//!
//! Both clocks run from the first delivery user code sees until the last ack has been sent;
//! the client process CPU time (all threads, from `/proc/self/stat`) is sampled at the same
//! two points. Every run then checks, broker side, that the queue is empty (after closing the
//! channel or shutting conejo down, so an unacked message would be back in the queue).
//!
//! ```text
//! cargo bench -p conejo-tests --bench throughput
//! cargo bench -p conejo-tests --bench throughput -- --messages 50000 --runs 5
//! cargo bench -p conejo-tests --bench throughput -- --prefetch 1000 --only lapin-coalesced,conejo
//! cargo bench -p conejo-tests --bench throughput -- --failing-share 0.1
//! ```
//!
//! The broker is [`amqp_url`] (`AMQP_URL`, default the local guest broker). Every queue made is
//! deleted at the end (with the wait and dead-letter queues conejo declared for it), also
//! when a run fails; a run that does not finish within `--timeout SECS` (default 120) fails
//! the benchmark instead of hanging. `--help` lists every flag.
//!
//! Why it is ~650 lines: one benchmark binary, read top to bottom — its consumers, runs,
//! ratios and report — each part used once.

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use clap::{Parser, ValueEnum};
use conejo::{Conejo, Context, Handler, HandlerError, Json, QueueConfig, RetryPolicy};
use conejo_tests::{
    Broker, amqp_url,
    bench::{self, BODY_LEN, LapinAcks, Mark, Noop, Order, Progress},
    unique_name,
};

/// Messages per run unless `--messages` says otherwise.
const DEFAULT_MESSAGES: u32 = 200_000;
/// Runs per (prefetch, consumer) unless `--runs` says otherwise.
const DEFAULT_RUNS: usize = 3;
/// Prefetches measured unless `--prefetch` says otherwise.
const DEFAULT_PREFETCHES: [u16; 2] = [100, 1000];
/// Minimum bound on prefilling one queue (raised to the run timeout if that is longer).
const FILL_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound on connecting, and on conejo's shutdown once every message is acked.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Delay before the first retry of a failing message in the failing runs (the second waits
/// three times as long).
const FAILING_INITIAL_DELAY: Duration = Duration::from_millis(50);
/// Jitter of the failing runs' retry delays.
const FAILING_JITTER: f64 = 0.1;
/// Attempts a failing message fails before it succeeds.
const FAILED_ATTEMPTS: u32 = 2;

/// Which consumer a run measures; the names are `--only`'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kind {
    /// lapin with `no_ack`: the broker's delivery ceiling.
    #[value(name = "lapin-noack")]
    NoAck,
    /// The hand-written lapin loop with coalesced `basic.ack(multiple)`: the practical
    /// ceiling of an acking consumer of one queue, and the baseline of the ratios.
    #[value(name = "lapin-coalesced")]
    Coalesced,
    /// The ordinary lapin consumer loop (ack each, await each ack).
    Lapin,
    /// conejo with a counting handler, `prefetch(p)` and `concurrency(p)`.
    Conejo,
    /// conejo with a counting handler and its defaults (no prefetch, no concurrency set).
    ConejoDefault,
    /// conejo with a counting handler, `prefetch(p)` and the default concurrency.
    ConejoPrefetch,
    /// As conejo-default, observed: a `tracing` subscriber that takes every `delivery` span
    /// and INFO event (formatted, written to a sink), and the `health` server's metrics
    /// recorder with its per-delivery duration histogram.
    ConejoObserved,
    /// conejo with a counting handler that fails a share of the messages twice (added by
    /// `--failing-share`, not named in `--only`).
    #[value(skip)]
    Failing,
}

impl Kind {
    /// What runs unless `--only` says otherwise: every kind but [`Kind::Failing`].
    const ALL: [Kind; 7] = [
        Kind::NoAck,
        Kind::Coalesced,
        Kind::Lapin,
        Kind::Conejo,
        Kind::ConejoDefault,
        Kind::ConejoPrefetch,
        Kind::ConejoObserved,
    ];

    /// Its name in the table.
    fn label(self) -> &'static str {
        match self {
            Kind::NoAck => "lapin no_ack",
            Kind::Coalesced => "lapin coalesc",
            Kind::Lapin => "lapin ack-each",
            Kind::Conejo => "conejo",
            Kind::ConejoDefault => "conejo dflt",
            Kind::ConejoPrefetch => "conejo pf only",
            Kind::ConejoObserved => "conejo dflt+obs",
            Kind::Failing => "conejo+fails",
        }
    }
}

/// Command-line settings.
#[derive(Debug, Parser)]
#[command(about = "throughput of conejo against hand-written lapin consumers")]
struct Args {
    /// Messages per run.
    #[arg(long, default_value_t = DEFAULT_MESSAGES,
          value_parser = clap::value_parser!(u32).range(1..))]
    messages: u32,
    /// Runs per (prefetch, consumer).
    #[arg(long, default_value_t = DEFAULT_RUNS, value_parser = bench::positive)]
    runs: usize,
    /// Prefetches to measure, comma-separated.
    #[arg(long = "prefetch", value_name = "P[,P…]", value_delimiter = ',',
          default_values_t = DEFAULT_PREFETCHES,
          value_parser = clap::value_parser!(u16).range(1..))]
    prefetches: Vec<u16>,
    /// Consumers to measure, comma-separated.
    #[arg(long = "only", value_name = "KIND[,KIND…]", value_enum, value_delimiter = ',',
          default_values_t = Kind::ALL)]
    kinds: Vec<Kind>,
    /// Share of the messages (0 to 1) that fail twice in an extra conejo run, conejo+fails
    /// (0: no such run).
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    failing_share: f64,
    /// Bound on one consumer run, from connecting to the last ack, in seconds.
    #[arg(long, value_name = "SECS", default_value = "120", value_parser = bench::secs)]
    timeout: Duration,
    /// Run every consumer (and conejo's handlers) on a current-thread tokio runtime instead
    /// of the default multi-thread one (its two workers wake each other across threads as
    /// tasks are handed over).
    #[arg(long)]
    current_thread: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// A share, 0 to 1.
fn share(arg: &str) -> Result<f64, String> {
    match arg.parse::<f64>() {
        Ok(share) if (0.0..=1.0).contains(&share) => Ok(share),
        _ => Err(format!("{arg:?} is not a number from 0 to 1")),
    }
}

/// The result of one run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// First delivery to last ack.
    elapsed: Duration,
    /// Process CPU time over the same span.
    cpu: Option<Duration>,
    /// Retries conejo scheduled (confirmed retry copies); 0 but in failing runs.
    retries: u64,
}

impl Sample {
    /// The sample between two marks.
    fn between(start: Mark, end: Mark) -> Sample {
        Sample {
            elapsed: end.at.duration_since(start.at),
            cpu: end
                .cpu
                .zip(start.cpu)
                .map(|(end, start)| end.saturating_sub(start)),
            retries: 0,
        }
    }

    /// Messages per second.
    fn rate(&self, messages: u32) -> f64 {
        f64::from(messages) / self.elapsed.as_secs_f64()
    }

    /// Process CPU microseconds per message.
    fn cpu_per_message_us(&self, messages: u32) -> Option<f64> {
        self.cpu
            .map(|cpu| cpu.as_secs_f64() * 1e6 / f64::from(messages))
    }
}

/// Prefills `queue` with `messages` [`Order`]s (bounded by at least [`FILL_TIMEOUT`]).
async fn prefill(
    broker: &Broker,
    queue: &str,
    messages: u32,
    timeout: Duration,
) -> anyhow::Result<()> {
    bench::prefill(broker, queue, messages, timeout.max(FILL_TIMEOUT)).await
}

/// What one consumer run consumes, and how.
#[derive(Debug, Clone, Copy)]
struct Run<'a> {
    /// The prefilled queue.
    queue: &'a str,
    /// How many messages it holds.
    messages: u32,
    /// The consumer's prefetch.
    prefetch: u16,
    /// Bound on the run.
    timeout: Duration,
}

/// A hand-written lapin consumer ([`bench::lapin_consume`]), settling as `acks` says.
async fn run_lapin(broker: &Broker, run: Run<'_>, acks: LapinAcks) -> anyhow::Result<Sample> {
    let Run {
        queue,
        messages,
        prefetch,
        timeout,
    } = run;
    let (url, name) = (amqp_url(), unique_name("throughput.lapin"));
    let consume = bench::lapin_consume(&url, &name, queue, messages, prefetch, acks, Mark::now);
    let lapin = tokio::time::timeout(timeout, consume)
        .await
        .map_err(|_| anyhow!("raw lapin run took more than {timeout:?}"))??;
    // The channel is closed: anything unacked is back in the queue, so the count is final.
    bench::ensure_empty(broker, &[queue]).await?;
    Ok(Sample::between(lapin.first, lapin.last))
}

/// True when the message `index` is one of the failing share: spread evenly, exactly
/// `⌊messages × share⌋` of the first `messages`.
fn fails(index: u64, share: f64) -> bool {
    ((index + 1) as f64 * share).floor() > (index as f64 * share).floor()
}

/// [`Noop`], but the failing share of the messages fails on its first [`FAILED_ATTEMPTS`]
/// attempts (a retry, as `?` would); `handled` counts successes only.
#[derive(Debug)]
struct Flaky {
    /// Shared with the benchmark.
    progress: Arc<Progress>,
    /// Share of the messages that fail.
    share: f64,
}

impl Handler for Flaky {
    type Message = Json<Order>;

    async fn handle(&self, Json(order): Json<Order>, ctx: &Context) -> Result<(), HandlerError> {
        self.progress.started();
        if fails(order.id, self.share) && ctx.attempt() <= FAILED_ATTEMPTS {
            return Err(HandlerError::retry("transient failure (benchmark)"));
        }
        drop(std::hint::black_box(order));
        self.progress.handled_one();
        Ok(())
    }
}

/// The settings of every conejo run: `prefetch(p)` and `concurrency(p)`.
fn conejo_config(prefetch: u16) -> QueueConfig {
    QueueConfig::new()
        .prefetch(prefetch)
        .concurrency(usize::from(prefetch))
}

/// conejo with [`Noop`] and `config` (for [`Kind::Conejo`] `prefetch(p)` and
/// `concurrency(p)`), until every message is acked.
async fn run_conejo(broker: &Broker, run: Run<'_>, config: QueueConfig) -> anyhow::Result<Sample> {
    let progress = Progress::new(u64::from(run.messages));
    let handler = Noop(Arc::clone(&progress));
    run_service(broker, run, handler, config, &progress, 0).await
}

/// As [`run_conejo`], with [`Flaky`] failing `share` of the messages twice, retried after
/// [`FAILING_INITIAL_DELAY`] and three times that.
async fn run_failing(broker: &Broker, run: Run<'_>, share: f64) -> anyhow::Result<Sample> {
    let failing = (0..u64::from(run.messages))
        .filter(|&index| fails(index, share))
        .count() as u64;
    let progress = Progress::new(u64::from(run.messages));
    let handler = Flaky {
        progress: Arc::clone(&progress),
        share,
    };
    let config = conejo_config(run.prefetch).retry(
        RetryPolicy::default()
            .initial_delay(FAILING_INITIAL_DELAY)
            .jitter(FAILING_JITTER),
    );
    let retries = failing * u64::from(FAILED_ATTEMPTS);
    run_service(broker, run, handler, config, &progress, retries).await
}

/// Runs conejo with `handler` until it has handled every message and acked every delivery
/// (the originals, and the `retries` retry copies it is expected to schedule), then checks
/// the counts.
async fn run_service<H: Handler>(
    broker: &Broker,
    run: Run<'_>,
    handler: H,
    config: QueueConfig,
    progress: &Progress,
    retries: u64,
) -> anyhow::Result<Sample> {
    let Run {
        queue,
        messages,
        timeout,
        ..
    } = run;
    let deliveries = u64::from(messages) + retries;
    let mut conejo = Conejo::builder(amqp_url())
        .connection_name(unique_name("throughput.conejo"))
        .queue_with(queue, handler, config);
    if OBSERVE.load(Relaxed) {
        conejo = conejo.health_port(0);
    }
    let conejo = conejo.build()?;
    let stats = conejo.stats();
    let shutdown = conejo.shutdown_handle();
    let mut service = tokio::spawn(conejo.run_until(std::future::pending()));

    let all_acked = async {
        tokio::select! {
            end = progress.acked(&stats, queue, deliveries) => Ok(end),
            ended = &mut service => bail!("conejo stopped before acking every message: {ended:?}"),
        }
    };
    let end = tokio::time::timeout(timeout, all_acked).await;
    shutdown.shutdown();
    let end = end.map_err(|_| {
        anyhow!(
            "conejo run took more than {timeout:?} (handled {}, stats {:?})",
            progress.handled(),
            stats.queue(queue)
        )
    })??;
    bench::stopped(service, SETUP_TIMEOUT).await?;

    let final_stats = stats.queue(queue).context("no stats for the queue")?;
    ensure!(
        final_stats.acked == deliveries
            && final_stats.retried == retries
            && final_stats.dead_lettered == 0
            && progress.handled() == u64::from(messages),
        "conejo acked {} deliveries (of {deliveries}), scheduled {} retries (of {retries}) and \
         handled {} of {messages} messages: {final_stats:?}",
        final_stats.acked,
        final_stats.retried,
        progress.handled()
    );
    bench::ensure_empty(broker, &[queue]).await?;
    let start = progress.first().context("no message was handled")?;
    Ok(Sample {
        retries: final_stats.retried,
        ..Sample::between(start, end)
    })
}

/// Results of one (prefetch, consumer) pair.
#[derive(Debug)]
struct Series {
    /// The prefetch.
    prefetch: u16,
    /// The consumer.
    kind: Kind,
    /// One per run.
    samples: Vec<Sample>,
}

/// Runs every (prefetch, run, consumer) combination; consumers alternate within a run so
/// that slow drifts of the machine or broker affect both alike. Every queue made is pushed
/// to `queues` before it is used.
async fn measure(
    broker: &Broker,
    args: &Args,
    queues: &mut Vec<String>,
) -> anyhow::Result<Vec<Series>> {
    let mut all = Vec::new();
    for &prefetch in &args.prefetches {
        let mut series: Vec<Series> = args
            .kinds
            .iter()
            .map(|&kind| Series {
                prefetch,
                kind,
                samples: Vec::new(),
            })
            .collect();
        for run in 1..=args.runs {
            for entry in &mut series {
                let queue = unique_name(&format!("throughput.{prefetch}"));
                queues.push(queue.clone());
                prefill(broker, &queue, args.messages, args.timeout).await?;
                let spec = Run {
                    queue: &queue,
                    messages: args.messages,
                    prefetch,
                    timeout: args.timeout,
                };
                let sample = match entry.kind {
                    Kind::NoAck => run_lapin(broker, spec, LapinAcks::None).await,
                    Kind::Coalesced => run_lapin(broker, spec, LapinAcks::Coalesced).await,
                    Kind::Lapin => run_lapin(broker, spec, LapinAcks::Each).await,
                    Kind::Conejo => run_conejo(broker, spec, conejo_config(prefetch)).await,
                    Kind::ConejoDefault => run_conejo(broker, spec, QueueConfig::new()).await,
                    Kind::ConejoPrefetch => {
                        run_conejo(broker, spec, QueueConfig::new().prefetch(prefetch)).await
                    }
                    Kind::ConejoObserved => {
                        OBSERVE.store(true, Relaxed);
                        let sample = run_conejo(broker, spec, QueueConfig::new()).await;
                        OBSERVE.store(false, Relaxed);
                        sample
                    }
                    Kind::Failing => run_failing(broker, spec, args.failing_share).await,
                }
                .with_context(|| {
                    format!("{} run {run}, prefetch {prefetch}", entry.kind.label())
                })?;
                broker.delete_consumed_queue(&queue).await?;
                eprintln!(
                    "prefetch {prefetch:>5}  run {run}/{}  {:<14}  {:>9.0} msg/s  {:?}{}",
                    args.runs,
                    entry.kind.label(),
                    sample.rate(args.messages),
                    sample.elapsed,
                    if entry.kind == Kind::Failing {
                        format!("  {} retries", sample.retries)
                    } else {
                        String::new()
                    },
                );
                entry.samples.push(sample);
            }
        }
        all.extend(series);
    }
    Ok(all)
}

/// The result table.
fn table(args: &Args, series: &[Series]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>8} | {:<14} | {:>12} | {:<32} | {:>14}",
        "prefetch", "consumer", "median msg/s", "all runs (msg/s)", "CPU µs/msg"
    );
    let _ = writeln!(out, "{}", "-".repeat(8 + 14 + 12 + 32 + 14 + 4 * 3));
    for &prefetch in &args.prefetches {
        let mut medians = Vec::new();
        for entry in series.iter().filter(|s| s.prefetch == prefetch) {
            let rates: Vec<f64> = entry
                .samples
                .iter()
                .map(|s| s.rate(args.messages))
                .collect();
            let cpu: Vec<f64> = entry
                .samples
                .iter()
                .filter_map(|s| s.cpu_per_message_us(args.messages))
                .collect();
            let rate = bench::median(&rates);
            medians.push((entry.kind, rate));
            let runs = rates
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(" ");
            let cpu = if cpu.len() == entry.samples.len() {
                format!("{:.2}", bench::median(&cpu))
            } else {
                "n/a".to_owned()
            };
            let _ = writeln!(
                out,
                "{prefetch:>8} | {:<14} | {rate:>12.0} | {runs:<32} | {cpu:>14}",
                entry.kind.label()
            );
        }
        let of = |kind| medians.iter().find(|(k, _)| *k == kind).map(|(_, r)| *r);
        if let Some(coalesced) = of(Kind::Coalesced) {
            for kind in [
                Kind::NoAck,
                Kind::Lapin,
                Kind::Conejo,
                Kind::ConejoPrefetch,
                Kind::ConejoDefault,
                Kind::ConejoObserved,
            ] {
                if let Some(rate) = of(kind) {
                    let _ = writeln!(
                        out,
                        "{prefetch:>8} | {:<14} | {:>11.2}x | {} / lapin coalesced",
                        "ratio",
                        rate / coalesced,
                        kind.label()
                    );
                }
            }
        }
        if let (Some(conejo), Some(failing)) = (of(Kind::Conejo), of(Kind::Failing)) {
            let _ = writeln!(
                out,
                "{prefetch:>8} | {:<14} | {:>11.2}x |",
                "fails/conejo",
                failing / conejo
            );
        }
    }
    for entry in series.iter().filter(|s| s.kind == Kind::Failing) {
        let retries: Vec<String> = entry
            .samples
            .iter()
            .map(|s| s.retries.to_string())
            .collect();
        let _ = writeln!(
            out,
            "{:>8} | {:<14} | retries scheduled per run: {}",
            entry.prefetch,
            entry.kind.label(),
            retries.join(" ")
        );
    }
    if args.failing_share > 0.0 {
        let _ = writeln!(
            out,
            "conejo+fails: a share {} of the messages fails on attempts 1 and 2 and succeeds on \
             attempt 3 (retries after {FAILING_INITIAL_DELAY:?} and 3 × that, ± {:.0} %); its \
             msg/s counts original messages handled, its CPU is per original message",
            args.failing_share,
            FAILING_JITTER * 100.0
        );
    }
    out
}

/// On during [`Kind::ConejoObserved`] runs only.
static OBSERVE: AtomicBool = AtomicBool::new(false);

/// Installs a subscriber that, while [`OBSERVE`] is on, takes INFO spans and events (conejo's
/// `delivery` span for every message) and formats them into a sink; off, it declines them.
fn observe_when_asked() {
    use tracing_subscriber::{Layer as _, layer::SubscriberExt as _};
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::sink)
        .with_filter(tracing_subscriber::filter::dynamic_filter_fn(|meta, _| {
            OBSERVE.load(Relaxed) && *meta.level() <= tracing::Level::INFO
        }));
    let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer));
}

fn main() -> anyhow::Result<()> {
    if bench::listing_tests() {
        return Ok(());
    }
    let args = Args::parse();
    let runtime = if args.current_thread {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    };
    runtime.block_on(run(args))
}

async fn run(mut args: Args) -> anyhow::Result<()> {
    if args.failing_share > 0.0 {
        args.kinds.push(Kind::Failing);
    }
    observe_when_asked();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    println!(
        "throughput: {} messages of {BODY_LEN} B per run, {} run(s), prefetch {:?}, \
         {cores} cores, {} runtime, broker {}{}",
        args.messages,
        args.runs,
        args.prefetches,
        if args.current_thread {
            "current-thread"
        } else {
            "multi-thread"
        },
        amqp_url().split('@').next_back().unwrap_or_default(),
        if args.failing_share > 0.0 {
            format!(", failing share {}", args.failing_share)
        } else {
            String::new()
        },
    );

    let broker = Broker::connect().await?;
    let mut queues = Vec::new();
    let started = Instant::now();
    let result = measure(&broker, &args, &mut queues).await;
    let mut cleanup = Ok(());
    for queue in &queues {
        if let Err(error) = broker.delete_consumed_queue(queue).await {
            cleanup = Err(error);
        }
    }
    let closed = broker.close().await;
    let series = result?;
    cleanup?;
    closed?;

    println!();
    print!("{}", table(&args, &series));
    println!(
        "\nmedian of {} run(s); clock from the first delivery to the last ack sent; CPU = \
         client process user+system time (all threads) over the same span; total {:.0?}",
        args.runs,
        started.elapsed()
    );
    Ok(())
}
