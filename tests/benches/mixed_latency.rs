//! Mixed latency: conejo draining a queue whose handler takes ~1 ms per message, except one
//! message in 1,000 that takes 30 s — beside the uniform run (no slow ones), in the same
//! process, on the same settings.
//!
//! Behind a delivery still running, acks of later tags cannot use `basic.ack(multiple)` (it
//! would ack the running one too): they go out one frame per tag. With one slow message in
//! 1,000 and 30 s each, some slow delivery is nearly always running, so nearly every ack of
//! the mixed run is a frame of its own; this benchmark shows what that costs in throughput,
//! memory and frames, against the uniform run where acks coalesce.
//!
//! Each run: a fresh queue prefilled with `--messages` JSON [`Order`]s; conejo with
//! `prefetch(--prefetch)` and `concurrency(--concurrency)`, handler = decode, then
//! `tokio::time::sleep(--fast-ms)`, or `sleep(--slow-secs)` for the messages whose index is
//! `--slow-every / 2` modulo `--slow-every`. Reported:
//!
//! - **rate of the fast messages**: from the first message handled until every fast one is
//!   handled and acked (the slow ones run on; the uniform run has only fast ones);
//! - **ack frames per ack** (`Stats` `ack_frames / acked`, at that same point);
//! - **resident set**: the highest `VmRSS` sampled every 10 ms during the run, and its value
//!   at the start of the run;
//! - **runtime lags**: the largest `Stats::connection_runtime_lag` (lapin, heartbeats, acks)
//!   and `Stats::handler_runtime_lag` sampled with the resident set, until the last slow
//!   message is acked: the first should stay at a few milliseconds however many handlers
//!   run;
//! - then the run waits for the slow ones (bounded by `--slow-secs` + `--timeout`), shuts
//!   conejo down, and checks every delivery was acked once and the queue is empty
//!   broker-side.
//!
//! The concurrency must leave room for the slow ones: at a rate R, R × slow / slow-every of
//! them run at once (at 40 k msgs/s, the broker's ceiling for one queue here, 30 s and 1 in
//! 1,000: 1,200); the defaults (2,000 slots, prefetch 2,000) leave 800 slots for the fast
//! ones, 800 / 1 ms far above that rate. The benchmark prints that estimate from the uniform
//! run's rate.
//!
//! `--services N` (an experiment) runs N conejo services on the queue, each on its own
//! connection and channel with 1/N of the concurrency and prefetch: RabbitMQ's channel
//! answers each single ack by walking its list of unacked deliveries from the oldest, so
//! behind many long deliveries a single ack costs the broker in proportion to them;
//! spread over N channels, each walk is about N times shorter.
//!
//! ```text
//! cargo bench -p conejo-tests --bench mixed_latency
//! cargo bench -p conejo-tests --bench mixed_latency -- --slow-secs 5 --messages 100000
//! ```
//!
//! Wall-clock rates on a shared 2-core machine swing: compare the two runs of one process.

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use clap::Parser;
use conejo::{Conejo, Context, Handler, HandlerError, Json, QueueConfig};
use conejo_tests::{
    Broker, amqp_url,
    bench::{self, Order},
    unique_name,
};

/// How often the resident set and the runtime lags are sampled.
const SAMPLE: Duration = Duration::from_millis(10);
/// Poll interval of the stats while waiting for the end of a phase.
const POLL: Duration = Duration::from_millis(1);
/// Bound on prefilling one queue.
const FILL_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound on conejo's shutdown once every message is acked.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Command-line settings.
#[derive(Debug, Clone, Copy, Parser)]
#[command(about = "conejo draining a queue with one slow message in many, beside the uniform run")]
struct Args {
    /// Messages per run.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u32).range(1..))]
    messages: u32,
    /// One message in this many is slow.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(2..))]
    slow_every: u32,
    /// How long a slow message takes, in seconds.
    #[arg(long = "slow-secs", value_name = "SECS", default_value = "30", value_parser = seconds)]
    slow: Duration,
    /// How long every other message takes, in milliseconds.
    #[arg(long = "fast-ms", value_name = "MS", default_value = "1", value_parser = millis)]
    fast: Duration,
    /// Handlers at once (shared out among the services).
    #[arg(long, default_value_t = 2000, value_parser = bench::positive)]
    concurrency: usize,
    /// The consumer's prefetch (shared out among the services).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u16).range(1..))]
    prefetch: u16,
    /// conejo services consuming the queue, each on its own connection and channel, with
    /// a share of the concurrency and prefetch: what spreading one queue over several
    /// channels would do.
    #[arg(long, default_value_t = 1, value_parser = bench::positive)]
    services: usize,
    /// Bound on the fast phase of a run (and, beyond the slow duration, on the slow tail),
    /// in seconds.
    #[arg(long, value_name = "SECS", default_value = "180", value_parser = bench::secs)]
    timeout: Duration,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// A handler's sleep given in seconds (zero allowed).
fn seconds(arg: &str) -> Result<Duration, String> {
    arg.parse::<f64>()
        .map_err(|error| error.to_string())
        .and_then(|secs| Duration::try_from_secs_f64(secs).map_err(|error| error.to_string()))
        .map_err(|error| format!("{arg:?} is not a number of seconds: {error}"))
}

/// A handler's sleep given in milliseconds (zero allowed).
fn millis(arg: &str) -> Result<Duration, String> {
    arg.parse::<f64>()
        .map_err(|error| error.to_string())
        .and_then(|ms| Duration::try_from_secs_f64(ms / 1e3).map_err(|error| error.to_string()))
        .map_err(|error| format!("{arg:?} is not a number of milliseconds: {error}"))
}

impl Args {
    /// True when the message `id` is a slow one.
    fn is_slow(&self, id: u64) -> bool {
        id % u64::from(self.slow_every) == u64::from(self.slow_every / 2)
    }

    /// How many slow messages a run of `messages` holds (none in the uniform run).
    fn slow_count(&self, mixed: bool) -> u64 {
        if mixed {
            (0..u64::from(self.messages))
                .filter(|&id| self.is_slow(id))
                .count() as u64
        } else {
            0
        }
    }
}

/// Shared by the handler and the benchmark.
#[derive(Debug, Default)]
struct Progress {
    /// When the first message was handled.
    first: OnceLock<Instant>,
    /// Fast messages handled.
    fast_done: AtomicU64,
    /// Slow messages handled.
    slow_done: AtomicU64,
}

/// Decodes, then sleeps: `slow` for the slow messages (in a mixed run), `fast` otherwise.
#[derive(Debug)]
struct Sleeper {
    args: Args,
    mixed: bool,
    progress: Arc<Progress>,
}

impl Handler for Sleeper {
    type Message = Json<Order>;

    async fn handle(&self, Json(order): Json<Order>, _ctx: &Context) -> Result<(), HandlerError> {
        self.progress.first.get_or_init(Instant::now);
        if self.mixed && self.args.is_slow(order.id) {
            tokio::time::sleep(self.args.slow).await;
            self.progress.slow_done.fetch_add(1, Relaxed);
        } else {
            tokio::time::sleep(self.args.fast).await;
            self.progress.fast_done.fetch_add(1, Relaxed);
        }
        Ok(())
    }
}

/// What one run measured.
#[derive(Debug)]
struct Sample {
    /// Fast messages per second.
    rate: f64,
    /// First handled to the last fast one acked.
    elapsed: Duration,
    /// `ack_frames` and `acked` at that point.
    ack_frames: u64,
    acked: u64,
    /// `ack_frames` and `acked` at the end of the run.
    final_frames: u64,
    final_acked: u64,
    /// Moves of the queue to a fresh channel (`QueueStats::rotations`), over the whole run.
    rotations: u64,
    /// Resident set at the start of the run and its highest sample during the run, KiB.
    rss_start: u64,
    rss_peak: u64,
    /// The largest connection-runtime and handler-runtime lags sampled during the run (the
    /// largest over the services).
    connection_lag: Duration,
    handler_lag: Duration,
    /// First handled to the last slow one acked (mixed runs).
    total: Duration,
    /// CPU time of this process and of the broker over the fast phase, per fast message.
    client_us: Option<f64>,
    broker_us: Option<f64>,
}

/// CPU time of this process and of the broker (if found) now.
fn cpu_now(broker: Option<&str>) -> (Option<Duration>, Option<Duration>) {
    (bench::cpu_time("self"), broker.and_then(bench::cpu_time))
}

/// One run on a fresh prefilled queue.
async fn run(
    broker: &Broker,
    args: Args,
    mixed: bool,
    queue: &str,
    broker_pid: Option<&str>,
) -> anyhow::Result<Sample> {
    bench::prefill(broker, queue, args.messages, FILL_TIMEOUT).await?;
    let total = u64::from(args.messages);
    let slow = args.slow_count(mixed);
    let fast = total - slow;
    let progress = Arc::new(Progress::default());
    let services = u16::try_from(args.services).unwrap_or(u16::MAX);
    let mut built = Vec::new();
    for _ in 0..args.services {
        let handler = Sleeper {
            args,
            mixed,
            progress: Arc::clone(&progress),
        };
        let config = QueueConfig::new()
            .prefetch((args.prefetch / services).max(1))
            .concurrency((args.concurrency / args.services).max(1));
        built.push(
            Conejo::builder(amqp_url())
                .connection_name(unique_name("mixed_latency"))
                .queue_with(queue, handler, config)
                .build()?,
        );
    }
    let stats: Vec<_> = built.iter().map(Conejo::stats).collect();
    let shutdowns: Vec<_> = built.iter().map(Conejo::shutdown_handle).collect();
    let rss_start = bench::rss_kib().unwrap_or(0);
    let sampler = bench::Sampler::start(stats.clone(), SAMPLE);
    let cpu_start = cpu_now(broker_pid);
    let mut running: Vec<_> = built
        .into_iter()
        .map(|conejo| tokio::spawn(conejo.run_until(std::future::pending())))
        .collect();
    // Summed over the services.
    let queue_stats = || {
        stats.iter().filter_map(|s| s.queue(queue)).fold(
            (0, 0, 0, 0, 0),
            |(acked, frames, delivered, requeued, rotations), q| {
                (
                    acked + q.acked,
                    frames + q.ack_frames,
                    delivered + q.delivered,
                    requeued + q.requeued,
                    rotations + q.rotations,
                )
            },
        )
    };
    let counts = || {
        let (acked, frames, ..) = queue_stats();
        (acked, frames)
    };

    // Phase 1: every fast message handled and acked.
    let fast_phase = async {
        loop {
            if let Some(service) = running.iter_mut().find(|s| s.is_finished()) {
                bail!("conejo stopped early: {:?}", service.await);
            }
            // slow ones read first: an ack counted below may only be for a slow one read here
            let slow_done = progress.slow_done.load(Relaxed);
            if progress.fast_done.load(Relaxed) == fast && counts().0 >= fast + slow_done {
                return Ok(Instant::now());
            }
            tokio::time::sleep(POLL).await;
        }
    };
    let fast_end = tokio::time::timeout(args.timeout, fast_phase).await;
    let cpu_end = cpu_now(broker_pid);
    let (acked, ack_frames) = counts();
    // Phase 2: the slow ones, bounded.
    let tail = async {
        while counts().0 < total {
            tokio::time::sleep(POLL).await;
        }
        Instant::now()
    };
    let tail_end = match &fast_end {
        Ok(Ok(_)) => tokio::time::timeout(args.slow + args.timeout, tail)
            .await
            .ok(),
        _ => None,
    };
    let peaks = sampler.stop().await?;
    for shutdown in &shutdowns {
        shutdown.shutdown();
    }
    let ended = tokio::time::timeout(SHUTDOWN_TIMEOUT, futures::future::join_all(running)).await;
    let fast_end =
        fast_end.map_err(|_| anyhow!("the fast messages took more than {:?}", args.timeout))??;
    let tail_end = tail_end.with_context(|| {
        format!(
            "the slow messages were not all acked within {:?}: {:?}",
            args.slow + args.timeout,
            queue_stats()
        )
    })?;
    let ended =
        ended.map_err(|_| anyhow!("conejo did not shut down within {SHUTDOWN_TIMEOUT:?}"))?;
    for service in ended {
        service
            .context("the conejo task failed")?
            .context("conejo returned an error")?;
    }
    let (final_acked, final_frames, delivered, requeued, rotations) = queue_stats();
    ensure!(
        final_acked == total && delivered == total && requeued == 0,
        "delivered {delivered}, acked {final_acked}, requeued {requeued} of {total}"
    );
    bench::ensure_empty(broker, &[queue]).await?;
    let first = *progress.first.get().context("nothing handled")?;
    let elapsed = fast_end.duration_since(first);
    Ok(Sample {
        rate: fast as f64 / elapsed.as_secs_f64(),
        elapsed,
        ack_frames,
        acked,
        final_frames,
        final_acked,
        rotations,
        rss_start,
        rss_peak: peaks.rss_kib,
        connection_lag: peaks.connection_lag,
        handler_lag: peaks.handler_lag,
        total: tail_end.duration_since(first),
        client_us: per_message(cpu_start.0, cpu_end.0, fast),
        broker_us: per_message(cpu_start.1, cpu_end.1, fast),
    })
}

/// CPU microseconds per message between two samples.
fn per_message(start: Option<Duration>, end: Option<Duration>, messages: u64) -> Option<f64> {
    let spent = end?.checked_sub(start?)?;
    Some(spent.as_secs_f64() * 1e6 / messages as f64)
}

fn report(label: &str, s: &Sample) {
    let us = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.1}"));
    println!(
        "{label:<8} {:>9.0} msg/s  fast phase {:>7.2?}  CPU µs/msg client {} broker {}  \
         ack frames/ack {:.3} ({} / {})  end: {} / {}  rotations {}  RSS {:.1} → peak {:.1} MiB  all acked \
         after {:.2?}  max lag: connection runtime {:.1} ms, handler runtime {:.1} ms",
        s.rate,
        s.elapsed,
        us(s.client_us),
        us(s.broker_us),
        s.ack_frames as f64 / s.acked.max(1) as f64,
        s.ack_frames,
        s.acked,
        s.final_frames,
        s.final_acked,
        s.rotations,
        s.rss_start as f64 / 1024.0,
        s.rss_peak as f64 / 1024.0,
        s.total,
        s.connection_lag.as_secs_f64() * 1e3,
        s.handler_lag.as_secs_f64() * 1e3,
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if bench::listing_tests() {
        return Ok(());
    }
    let args = Args::parse();
    println!(
        "mixed_latency: {} messages of {} B, 1 in {} sleeping {:?}, the rest {:?}; \
         concurrency {}, prefetch {}, {} service(s), {} cores",
        args.messages,
        bench::BODY_LEN,
        args.slow_every,
        args.slow,
        args.fast,
        args.concurrency,
        args.prefetch,
        args.services,
        std::thread::available_parallelism().map_or(0, usize::from),
    );
    let broker = Broker::connect().await?;
    let queues = [unique_name("mixed.uniform"), unique_name("mixed.mixed")];
    let started = Instant::now();
    let broker_pid = bench::broker_pid();
    let pid = broker_pid.as_deref();
    let result = async {
        let uniform = run(&broker, args, false, &queues[0], pid).await.context("uniform run")?;
        report("uniform", &uniform);
        let concurrent_slow =
            uniform.rate * args.slow.as_secs_f64() / f64::from(args.slow_every);
        println!(
            "slow ones running at once at the uniform rate: {:.0} × {:?} / {} = {concurrent_slow:.0} \
             of {} slots{}",
            uniform.rate,
            args.slow,
            args.slow_every,
            args.concurrency,
            if concurrent_slow * 2.0 > args.concurrency as f64 {
                " — more than half: raise --concurrency and --prefetch"
            } else {
                ""
            }
        );
        let mixed = run(&broker, args, true, &queues[1], pid).await.context("mixed run")?;
        report("mixed", &mixed);
        println!(
            "mixed / uniform: throughput {:.2}x, ack frames per ack {:.3} vs {:.3}, peak RSS \
             {:.2}x ({:+.1} MiB)",
            mixed.rate / uniform.rate,
            mixed.ack_frames as f64 / mixed.acked.max(1) as f64,
            uniform.ack_frames as f64 / uniform.acked.max(1) as f64,
            mixed.rss_peak as f64 / uniform.rss_peak.max(1) as f64,
            (mixed.rss_peak as f64 - uniform.rss_peak as f64) / 1024.0,
        );
        anyhow::Ok(())
    }
    .await;
    let mut cleanup = Ok(());
    for queue in &queues {
        if let Err(error) = broker.delete_consumed_queue(queue).await {
            cleanup = Err(error);
        }
    }
    broker.close().await?;
    result?;
    cleanup?;
    println!(
        "peak RSS of the process (VmHWM) {:.1} MiB; total {:.0?}; one run each, same process, \
         uniform first",
        bench::peak_rss_kib().unwrap_or(0) as f64 / 1024.0,
        started.elapsed()
    );
    Ok(())
}
