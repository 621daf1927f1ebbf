//! Many queues on one connection: conejo consuming `--queues` queues (default 8) at once,
//! beside a raw lapin consumer of as many queues on one connection, so that what each
//! queue costs, and the share of the client's CPU the connection runtime takes, are
//! visible.
//!
//! One classic queue's process saturates at about one broker core, so a single queue hides
//! the client's cost behind the broker's; several queues lift that limit (the shared FACTS
//! notes: the coalesced loop reaches ~60 k msgs/s on 4 queues here, near the `no_ack`
//! ceiling), and then the client's CPU per message decides the rate. Everything here is one
//! process and one connection per kind: with conejo, every queue's consume loop, acks and
//! heartbeats meet on its one connection runtime (one thread), which is what this
//! benchmark loads.
//!
//! Each run measures each kind, one after the other, on fresh queues: `--queues` uniquely
//! named queues, declared as conejo's default `QueueConfig` declares them (durable, no
//! arguments), are each prefilled with `--messages` JSON [`Order`](bench::Order)s of 100
//! bytes; then
//!
//! - **lapin**: ONE lapin connection, one channel per queue with `basic.qos(--prefetch)`,
//!   and per channel a task running the hand-written coalesced-ack loop
//!   ([`bench::lapin_consume_on`]: decode the typed order, one `basic.ack(multiple = true)`
//!   every prefetch / 4 deliveries and after 20 ms idle), all at once on the process's
//!   multi-thread runtime (lapin's own tasks run there too);
//! - **conejo**: ONE [`Conejo`] service with every queue registered on its builder, the
//!   typed `Json<Order>` no-op handler ([`Noop`]), `prefetch(--prefetch)` and conejo's
//!   default concurrency (or `--concurrency`), stopped through its shutdown handle once
//!   `stats()` shows every message of every queue acked.
//!
//! Printed per kind (median over `--runs`): the total rate (every message, from the first
//! delivery of any queue to the last ack of all), the slowest and the fastest queue's rate
//! (its messages over its own first delivery to last ack), the client process's CPU per
//! message over the same span as the total, messages per `basic.ack` frame, and which
//! threads spent that CPU (per message, by thread name: `tokio-rt-worker` the process's
//! runtime — conejo's handlers, or lapin's consume loops and its heartbeat and RPC tasks;
//! `conejo-connecti` conejo's connection runtime; `lapin-io-loop` lapin's socket thread;
//! measured from just before connecting to the last ack), the kernel's share of that CPU
//! and the threads' context switches per message (hand-offs between threads cost there,
//! which instruction counts of user code do not see). For conejo also the largest
//! [`Stats::connection_runtime_lag`](conejo::Stats::connection_runtime_lag) and
//! [`Stats::handler_runtime_lag`](conejo::Stats::handler_runtime_lag) sampled every 10 ms
//! while it runs; then conejo / lapin.
//!
//! ```text
//! cargo bench -p conejo-tests --bench many_queues
//! cargo bench -p conejo-tests --bench many_queues -- --messages 5000 --runs 1
//! cargo bench -p conejo-tests --bench many_queues -- --queues 4 --prefetch 1000 --runs 3
//! ```
//!
//! The broker is [`amqp_url`] (`AMQP_URL`, default the local guest broker). After each kind
//! has closed its channels (lapin) or shut down (conejo), every queue is checked empty
//! broker-side, then deleted (with what conejo declared for it); every queue made is also
//! deleted when a run fails. A kind that does not finish within `--timeout` (seconds, from
//! connecting to the last ack) fails the benchmark instead of hanging. Wall-clock rates on
//! a shared 2-core machine swing: compare the kinds of one run.
//!
//! Why it is ~600 lines: one benchmark binary, read top to bottom — set-up, the two
//! consumers, the runs and the report — each part used once.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use clap::{Parser, ValueEnum};
use conejo::{Conejo, QueueConfig};
use conejo_tests::{
    Broker, amqp_url,
    bench::{
        self, BODY_LEN, LapinAcks, Mark, Noop, Peaks, Progress, Sampler, ThreadCpu, ThreadTimes,
    },
    lapin::{Connection, ConnectionProperties},
    unique_name,
};

/// Most messages one kind's queues may hold together (`--queues` × `--messages`): the
/// broker keeps them in memory.
const MAX_TOTAL: u64 = 2_000_000;
/// Minimum bound on prefilling one queue (raised to `--timeout` if that is longer).
const FILL_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound on conejo's shutdown once every message is acked.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// How often conejo's runtime lags are sampled.
const SAMPLE: Duration = Duration::from_millis(10);

/// Command-line settings.
#[derive(Debug, Parser)]
#[command(about = "many queues on one connection: conejo beside raw lapin")]
struct Args {
    /// Queues consumed at once, on one connection.
    #[arg(long, default_value_t = 8, value_parser = bench::positive)]
    queues: usize,
    /// Messages prefilled into each queue.
    #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(u32).range(1..))]
    messages: u32,
    /// Runs; each measures every kind on fresh queues.
    #[arg(long, default_value_t = 3, value_parser = bench::positive)]
    runs: usize,
    /// Prefetch of every queue's consumer (lapin's `basic.qos`, conejo's `prefetch`).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..))]
    prefetch: u16,
    /// conejo's concurrency per queue (default: conejo's own default).
    #[arg(long, value_parser = bench::positive)]
    concurrency: Option<usize>,
    /// Kinds to measure, comma-separated.
    #[arg(long, value_name = "KIND[,KIND…]", value_enum, value_delimiter = ',',
          default_values_t = [Kind::Lapin, Kind::Conejo])]
    only: Vec<Kind>,
    /// Bound on one kind's run, from connecting to the last ack, in seconds.
    #[arg(long, value_name = "SECS", default_value = "120", value_parser = bench::secs)]
    timeout: Duration,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// What consumes the queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kind {
    /// One lapin connection, a channel and a coalesced-ack loop per queue.
    Lapin,
    /// One conejo service with every queue.
    Conejo,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Lapin => "lapin",
            Kind::Conejo => "conejo",
        }
    }
}

/// One kind's run over every queue.
#[derive(Debug)]
struct Sample {
    /// Per queue: its first delivery and its last ack.
    queues: Vec<(Mark, Mark)>,
    /// Messages in each queue.
    messages: u32,
    /// `basic.ack` frames sent, every queue.
    ack_frames: u64,
    /// CPU and context switches per thread name, from just before connecting to the last
    /// ack.
    threads: BTreeMap<String, ThreadTimes>,
    /// conejo's runtime lags (`None` for lapin).
    peaks: Option<Peaks>,
}

impl Sample {
    /// Every message.
    fn total(&self) -> f64 {
        self.queues.len() as f64 * f64::from(self.messages)
    }

    /// The first delivery of any queue and the last ack of all.
    fn span(&self) -> (Mark, Mark) {
        let first = self.queues.iter().map(|q| q.0).min_by_key(|m| m.at);
        let last = self.queues.iter().map(|q| q.1).max_by_key(|m| m.at);
        (
            first.expect("at least one queue"),
            last.expect("at least one queue"),
        )
    }

    /// Messages per second, every queue together.
    fn rate(&self) -> f64 {
        let (first, last) = self.span();
        self.total() / last.at.duration_since(first.at).as_secs_f64()
    }

    /// Each queue's own rate, slowest first.
    fn queue_rates(&self) -> Vec<f64> {
        let mut rates: Vec<f64> = self
            .queues
            .iter()
            .map(|(first, last)| {
                f64::from(self.messages) / last.at.duration_since(first.at).as_secs_f64()
            })
            .collect();
        rates.sort_by(f64::total_cmp);
        rates
    }

    /// Client process CPU microseconds per message over [`Sample::span`].
    fn cpu_us(&self) -> Option<f64> {
        let (first, last) = self.span();
        let spent = last.cpu?.checked_sub(first.cpu?)?;
        Some(spent.as_secs_f64() * 1e6 / self.total())
    }

    /// CPU microseconds per message of each thread name.
    fn thread_us(&self) -> BTreeMap<&str, f64> {
        self.per_thread(|times| times.cpu().as_secs_f64() * 1e6)
    }

    /// Context switches per message of each thread name.
    fn thread_switches(&self) -> BTreeMap<&str, f64> {
        self.per_thread(|times| times.switches as f64)
    }

    /// `value` of each thread name's times, per message.
    fn per_thread(&self, value: impl Fn(&ThreadTimes) -> f64) -> BTreeMap<&str, f64> {
        self.threads
            .iter()
            .map(|(name, times)| (name.as_str(), value(times) / self.total()))
            .collect()
    }

    /// The share of the threads' CPU time spent in the kernel, in percent.
    fn system_percent(&self) -> f64 {
        let (system, cpu) = self.threads.values().fold((0.0, 0.0), |(system, cpu), t| {
            (system + t.system.as_secs_f64(), cpu + t.cpu().as_secs_f64())
        });
        system * 100.0 / cpu.max(f64::MIN_POSITIVE)
    }
}

/// Prefills each of `queues` with `--messages` orders.
async fn prefill(broker: &Broker, queues: &[String], args: &Args) -> anyhow::Result<()> {
    for queue in queues {
        bench::prefill(broker, queue, args.messages, args.timeout.max(FILL_TIMEOUT)).await?;
    }
    Ok(())
}

/// One lapin connection, a channel and a task per queue, each a coalesced-ack loop.
async fn run_lapin(queues: &[String], args: &Args) -> anyhow::Result<Sample> {
    let threads_before = ThreadCpu::now();
    let name = unique_name("many_queues.lapin");
    let properties = ConnectionProperties::default().with_connection_name(name.as_str().into());
    let connection = Connection::connect(&amqp_url(), properties).await?;
    let (messages, prefetch) = (args.messages, args.prefetch);
    let mut tasks = Vec::new();
    for (index, queue) in queues.iter().enumerate() {
        let channel = connection.create_channel().await?;
        let (tag, queue) = (format!("{name}.{index}"), queue.clone());
        tasks.push(tokio::spawn(async move {
            bench::lapin_consume_on(
                &channel,
                &tag,
                &queue,
                messages,
                prefetch,
                LapinAcks::Coalesced,
                Mark::now,
            )
            .await
        }));
    }
    let joined = tokio::time::timeout(args.timeout, futures::future::try_join_all(tasks)).await;
    let threads = ThreadCpu::now().since(&threads_before);
    let closed = connection.close(200, "done".into()).await;
    let runs = joined
        .map_err(|_| anyhow!("raw lapin took more than {:?}", args.timeout))?
        .context("a lapin consumer task failed")?
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    closed?;
    Ok(Sample {
        queues: runs.iter().map(|run| (run.first, run.last)).collect(),
        messages,
        ack_frames: runs.iter().map(|run| run.ack_frames).sum(),
        threads,
        peaks: None,
    })
}

/// One conejo service with every queue, [`Noop`] handlers, until every queue's messages
/// are acked; then a graceful shutdown and the counts checked.
async fn run_conejo(queues: &[String], args: &Args) -> anyhow::Result<Sample> {
    let messages = u64::from(args.messages);
    let progress: Vec<Arc<Progress>> = queues.iter().map(|_| Progress::new(messages)).collect();
    let mut config = QueueConfig::new().prefetch(args.prefetch);
    if let Some(concurrency) = args.concurrency {
        config = config.concurrency(concurrency);
    }
    let mut builder =
        Conejo::builder(amqp_url()).connection_name(unique_name("many_queues.conejo"));
    for (queue, progress) in queues.iter().zip(&progress) {
        builder = builder.queue_with(queue, Noop(Arc::clone(progress)), config.clone());
    }
    let conejo = builder.build()?;
    let stats = conejo.stats();
    let shutdown = conejo.shutdown_handle();
    let threads_before = ThreadCpu::now();
    let sampler = Sampler::start(vec![stats.clone()], SAMPLE);
    let mut service = tokio::spawn(conejo.run_until(std::future::pending()));

    let all_acked = async {
        let each = queues
            .iter()
            .zip(&progress)
            .map(|(queue, progress)| progress.acked(&stats, queue, messages));
        tokio::select! {
            ends = futures::future::join_all(each) => Ok(ends),
            ended = &mut service => bail!("conejo stopped before acking every message: {ended:?}"),
        }
    };
    let ends = tokio::time::timeout(args.timeout, all_acked).await;
    let threads = ThreadCpu::now().since(&threads_before);
    let peaks = sampler.stop().await?;
    shutdown.shutdown();
    let ends = ends.map_err(|_| {
        anyhow!(
            "conejo took more than {:?}: handled {:?}, stats {:?}",
            args.timeout,
            progress.iter().map(|p| p.handled()).collect::<Vec<_>>(),
            stats.all()
        )
    })??;
    bench::stopped(service, SHUTDOWN_TIMEOUT).await?;

    let mut ack_frames = 0;
    let mut sampled = Vec::new();
    for ((queue, progress), end) in queues.iter().zip(&progress).zip(ends) {
        let q = stats.queue(queue).context("no stats for a queue")?;
        ensure!(
            q.delivered == messages
                && q.acked == messages
                && q.requeued == 0
                && progress.handled() == messages,
            "{queue}: conejo delivered {}, acked {}, requeued {} and handled {} of {messages}: \
             {q:?}",
            q.delivered,
            q.acked,
            q.requeued,
            progress.handled()
        );
        ack_frames += q.ack_frames;
        sampled.push((progress.first().context("no message was handled")?, end));
    }
    Ok(Sample {
        queues: sampled,
        messages: args.messages,
        ack_frames,
        threads,
        peaks: Some(peaks),
    })
}

/// One kind's run on fresh queues (pushed to `made` before use), checked empty and
/// deleted afterwards.
async fn run_kind(
    broker: &Broker,
    kind: Kind,
    args: &Args,
    made: &mut Vec<String>,
) -> anyhow::Result<Sample> {
    let queues: Vec<String> = (0..args.queues)
        .map(|index| unique_name(&format!("many_queues.{}.{index}", kind.label())))
        .collect();
    made.extend(queues.iter().cloned());
    prefill(broker, &queues, args).await?;
    let sample = match kind {
        Kind::Lapin => run_lapin(&queues, args).await,
        Kind::Conejo => run_conejo(&queues, args).await,
    }?;
    bench::ensure_empty(broker, &queues).await?;
    broker.delete_consumed_queues(&queues).await?;
    made.retain(|queue| !queues.contains(queue));
    Ok(sample)
}

/// Milliseconds.
fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// One line per run, as it ends.
fn progress_line(kind: Kind, run: usize, runs: usize, sample: &Sample) -> String {
    let rates = sample.queue_rates();
    let mut line = format!(
        "run {run}/{runs}  {:<6}  {:>8.0} msg/s  queues {:>7.0} to {:>7.0} msg/s  CPU {} µs/msg",
        kind.label(),
        sample.rate(),
        rates[0],
        rates[rates.len() - 1],
        sample
            .cpu_us()
            .map_or_else(|| "n/a".to_owned(), |us| format!("{us:.1}")),
    );
    if let Some(peaks) = sample.peaks {
        let _ = write!(
            line,
            "  lag max: connection {:.1} ms, handler {:.1} ms",
            ms(peaks.connection_lag),
            ms(peaks.handler_lag)
        );
    }
    let _ = write!(
        line,
        "  by thread: {}; system {:.0} %; context switches per message: {}",
        by_thread(&sample.thread_us()),
        sample.system_percent(),
        switches(&sample.thread_switches())
    );
    line
}

/// Context switches per message, in all and by thread name.
fn switches(per_message: &BTreeMap<&str, f64>) -> String {
    let parts: Vec<String> = per_message
        .iter()
        .filter(|&(_, &n)| n > 0.0)
        .map(|(name, n)| format!("{name} {n:.3}"))
        .collect();
    format!(
        "{:.3} ({})",
        per_message.values().sum::<f64>(),
        parts.join(", ")
    )
}

/// Each thread name's CPU µs per message and share of the threads' sum, the names that
/// spent nothing left out.
fn by_thread(us: &BTreeMap<&str, f64>) -> String {
    let sum: f64 = us.values().sum();
    us.iter()
        .filter(|&(_, &us)| us > 0.0)
        .map(|(name, us)| format!("{name} {us:.2} ({:.0} %)", us * 100.0 / sum))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The result table: medians over the runs of each kind, then conejo / lapin.
fn table(args: &Args, results: &[(Kind, Vec<Sample>)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<6} | {:>9} | {:>13} | {:>13} | {:>10} | {:>10} | all runs (msg/s)",
        "kind", "msg/s", "slowest queue", "fastest queue", "CPU µs/msg", "acks/frame",
    );
    let _ = writeln!(out, "{}", "-".repeat(100));
    let mut medians = BTreeMap::new();
    for (kind, samples) in results {
        let of =
            |f: &dyn Fn(&Sample) -> f64| bench::median(&samples.iter().map(f).collect::<Vec<_>>());
        let rate = of(&|s| s.rate());
        let slowest = of(&|s| s.queue_rates()[0]);
        let fastest = of(&|s| *s.queue_rates().last().expect("a queue"));
        let cpu: Vec<f64> = samples.iter().filter_map(Sample::cpu_us).collect();
        let cpu = (cpu.len() == samples.len()).then(|| bench::median(&cpu));
        let acks_per_frame = of(&|s| s.total() / s.ack_frames.max(1) as f64);
        let runs: Vec<String> = samples.iter().map(|s| format!("{:.0}", s.rate())).collect();
        let _ = writeln!(
            out,
            "{:<6} | {rate:>9.0} | {slowest:>13.0} | {fastest:>13.0} | {:>10} | {acks_per_frame:>10.1} | {}",
            kind.label(),
            cpu.map_or_else(|| "n/a".to_owned(), |us| format!("{us:.2}")),
            runs.join(" ")
        );
        medians.insert(kind.label(), (rate, cpu));
    }
    if let (Some(lapin), Some(conejo)) = (medians.get("lapin"), medians.get("conejo")) {
        let _ = write!(out, "conejo / lapin: rate {:.2}x", conejo.0 / lapin.0);
        if let (Some(lapin_cpu), Some(conejo_cpu)) = (lapin.1, conejo.1) {
            let _ = write!(
                out,
                ", CPU per message {:.2}x ({:+.2} µs)",
                conejo_cpu / lapin_cpu,
                conejo_cpu - lapin_cpu
            );
        }
        out.push('\n');
    }

    let _ = writeln!(
        out,
        "\nCPU µs/msg by thread name and share of their sum, the kernel's share of it, and \
         context switches (voluntary + involuntary) per message (median over the runs; from \
         just before connecting to the last ack):"
    );
    for (kind, samples) in results {
        let mut names: Vec<&str> = samples
            .iter()
            .flat_map(|s| s.threads.keys().map(String::as_str))
            .collect();
        names.sort_unstable();
        names.dedup();
        let median_of = |per: &dyn Fn(&Sample) -> BTreeMap<&str, f64>| -> BTreeMap<&str, f64> {
            names
                .iter()
                .map(|&name| {
                    let values: Vec<f64> = samples
                        .iter()
                        .map(|s| per(s).get(name).copied().unwrap_or(0.0))
                        .collect();
                    (name, bench::median(&values))
                })
                .collect()
        };
        let medians = median_of(&Sample::thread_us);
        let system = bench::median(
            &samples
                .iter()
                .map(Sample::system_percent)
                .collect::<Vec<_>>(),
        );
        let _ = writeln!(
            out,
            "  {:<6}  {}\n          system {system:.0} % of it; context switches per message: {}",
            kind.label(),
            by_thread(&medians),
            switches(&median_of(&Sample::thread_switches))
        );
    }

    for (kind, samples) in results {
        let lags: Vec<Peaks> = samples.iter().filter_map(|s| s.peaks).collect();
        if lags.is_empty() {
            continue;
        }
        let connection: Vec<String> = lags
            .iter()
            .map(|p| format!("{:.1}", ms(p.connection_lag)))
            .collect();
        let handler: Vec<String> = lags
            .iter()
            .map(|p| format!("{:.1}", ms(p.handler_lag)))
            .collect();
        let _ = writeln!(
            out,
            "\n{} runtime lag, largest sampled every {SAMPLE:?} per run (ms): connection runtime {}; \
             handler runtime {}",
            kind.label(),
            connection.join(" "),
            handler.join(" ")
        );
    }
    let _ = writeln!(
        out,
        "\nmedian of {} run(s), {} queues × {} messages, prefetch {}{}",
        args.runs,
        args.queues,
        args.messages,
        args.prefetch,
        args.concurrency
            .map_or_else(String::new, |c| format!(", conejo concurrency {c}"))
    );
    out
}

/// Every run of every kind, kinds alternating within a run.
async fn measure(
    broker: &Broker,
    args: &Args,
    made: &mut Vec<String>,
) -> anyhow::Result<Vec<(Kind, Vec<Sample>)>> {
    let mut results: Vec<(Kind, Vec<Sample>)> =
        args.only.iter().map(|&kind| (kind, Vec::new())).collect();
    for run in 1..=args.runs {
        for (kind, samples) in &mut results {
            let sample = run_kind(broker, *kind, args, made)
                .await
                .with_context(|| format!("{} run {run}", kind.label()))?;
            eprintln!("{}", progress_line(*kind, run, args.runs, &sample));
            samples.push(sample);
        }
    }
    Ok(results)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if bench::listing_tests() {
        return Ok(());
    }
    let mut args = Args::parse();
    args.only.dedup();
    let total = args.queues as u64 * u64::from(args.messages);
    ensure!(
        total <= MAX_TOTAL,
        "--queues × --messages is {total}, more than {MAX_TOTAL} (the broker holds them in memory)"
    );
    println!(
        "many_queues: {} queues × {} messages of {BODY_LEN} B on one connection per kind, \
         prefetch {}, {} run(s), {} cores, broker {}",
        args.queues,
        args.messages,
        args.prefetch,
        args.runs,
        std::thread::available_parallelism().map_or(0, usize::from),
        amqp_url().split('@').next_back().unwrap_or_default(),
    );
    let broker = Broker::connect().await?;
    let started = Instant::now();
    let mut made = Vec::new();
    let result = measure(&broker, &args, &mut made).await;
    // Queues of a run that failed.
    let cleanup = broker.delete_consumed_queues(&made).await;
    let closed = broker.close().await;
    let results = result?;
    cleanup?;
    closed?;
    println!();
    print!("{}", table(&args, &results));
    println!(
        "clock: first delivery of any queue to the last ack of all (a queue's own rate: its \
         first delivery to its last ack); CPU = client process user+system time (all threads) \
         over the total's span; total {:.0?}",
        started.elapsed()
    );
    Ok(())
}
