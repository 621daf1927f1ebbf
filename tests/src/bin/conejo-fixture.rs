//! A small conejo service for process-level tests (signals, exit codes, crash loops,
//! replicas): consumes one existing queue with a handler that sleeps, and reports on stdout,
//! one line per event: `started <message-id>` and `finished <message-id>`. With `--abort-on BODY` it
//! aborts the whole process (SIGABRT) on a message with that body, as a poison message would.
//! With `--partitions EXCHANGE:COUNT` it consumes the partitions of a consistent-hash
//! exchange instead of one queue, and its lines are `started <id> <queue> <attempt> <µs>` and
//! `finished <id> <queue> <µs>` (`<µs>`: the wall clock, comparable between processes).
//! Exits 0 after a clean shutdown, 1 with the error on stderr otherwise.

use std::{process::ExitCode, time::Duration};

use clap::Parser;
use conejo::{Conejo, Context, Handler, HandlerError, QueueConfig};

/// Test fixture service.
#[derive(Parser)]
struct Args {
    /// Broker URL.
    #[arg(long, env = "AMQP_URL", default_value = conejo_tests::DEFAULT_AMQP_URL, hide_env_values = true)]
    amqp_url: String,
    /// The queue to consume (must exist).
    #[arg(long, required_unless_present = "partitions")]
    queue: Option<String>,
    /// Consume the partitions of this consistent-hash exchange instead: `EXCHANGE:COUNT`.
    #[arg(long, conflicts_with = "queue")]
    partitions: Option<String>,
    /// This replica's index among the replicas: `INDEX/REPLICAS` (with `--partitions`).
    #[arg(long)]
    replica: Option<String>,
    /// How often a replica holding another's partition checks for its return, in ms.
    #[arg(long, default_value_t = 10_000)]
    balance_ms: u64,
    /// Up to this many extra milliseconds per message, at random.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Messages whose sequence number is divisible by this take `--slow-ms` instead
    /// (ids `key:seq`).
    #[arg(long)]
    slow_every: Option<u64>,
    /// How long a slow message takes, in milliseconds.
    #[arg(long, default_value_t = 200)]
    slow_ms: u64,
    /// No line per message; with `--report-every N`, `handled <count>` every N messages.
    #[arg(long)]
    quiet: bool,
    /// Print `handled <count>` every this many handled messages.
    #[arg(long)]
    report_every: Option<u64>,
    /// Quorum queues: with `--partitions`, the partition queues; with `--queue`, says the
    /// queue is one.
    #[arg(long)]
    quorum: bool,
    /// Fail (to be retried) the first attempt of every message whose id ends in a
    /// sequence number divisible by this (ids `key:seq`).
    #[arg(long)]
    fail_every: Option<u64>,
    /// Connection name shown by the broker.
    #[arg(long, default_value = "conejo-fixture")]
    connection_name: String,
    /// How long each message takes to handle, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    handler_ms: u64,
    /// Messages handled at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Prefetch.
    #[arg(long, default_value_t = 10)]
    prefetch: u16,
    /// Shutdown deadline for in-flight handlers, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    shutdown_timeout_ms: u64,
    /// Abort the process on a message with this body.
    #[arg(long)]
    abort_on: Option<String>,
    /// Deliveries without a result before a message is dead-lettered as poison (0: off).
    #[arg(long, default_value_t = conejo::DEFAULT_POISON_LIMIT)]
    poison_limit: u32,
    /// The queue has a single active consumer (`x-single-active-consumer`).
    #[arg(long)]
    single_active: bool,
    /// This consumer's priority (`x-priority`).
    #[arg(long)]
    priority: Option<i32>,
    /// Order deliveries by this header (per-key ordering).
    #[arg(long)]
    ordered_by_header: Option<String>,
}

/// Sleeps, reporting start and end on stdout.
struct SleepsAndReports {
    pause: Duration,
    jitter_ms: u64,
    abort_on: Option<Vec<u8>>,
    fail_every: Option<u64>,
    /// Every n-th sequence number takes `slow` instead.
    slow: Option<(u64, Duration)>,
    /// Lines with the queue, the attempt and the time.
    detailed: bool,
    /// No line per message.
    quiet: bool,
    /// `handled <count>` every this many.
    report_every: Option<u64>,
    /// Messages handled so far.
    handled: std::sync::atomic::AtomicU64,
}

impl Handler for SleepsAndReports {
    type Message = Vec<u8>;

    async fn handle(&self, body: Vec<u8>, ctx: &Context) -> Result<(), HandlerError> {
        let id = ctx.message_id().unwrap_or("?");
        if self.quiet {
        } else if self.detailed {
            println!(
                "started {id} {} {} {}",
                ctx.queue(),
                ctx.attempt(),
                micros()
            );
        } else {
            println!("started {id}");
        }
        if self.abort_on.as_deref() == Some(body.as_slice()) {
            std::process::abort();
        }
        let jitter = match self.jitter_ms {
            0 => 0,
            max => random() % (max + 1),
        };
        let seq = id
            .rsplit(':')
            .next()
            .and_then(|seq| seq.parse::<u64>().ok());
        let pause = match (self.slow, seq) {
            (Some((every, slow)), Some(seq)) if seq % every == 0 => slow,
            _ => self.pause + Duration::from_millis(jitter),
        };
        // A zero sleep still waits for the timer's next tick (1 ms): a no-op handler skips it.
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        if let (Some(every), Some(seq)) = (self.fail_every, seq)
            && seq % every == 0
            && ctx.attempt() == 1
        {
            return Err(HandlerError::retry("the first attempt fails"));
        }
        if self.quiet {
        } else if self.detailed {
            println!("finished {id} {} {}", ctx.queue(), micros());
        } else {
            println!("finished {id}");
        }
        let handled = self
            .handled
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if let Some(every) = self.report_every
            && handled.is_multiple_of(every)
        {
            println!("handled {handled}");
        }
        Ok(())
    }
}

/// Microseconds since the epoch: comparable between the replicas on one machine.
fn micros() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_micros())
}

/// A cheap pseudo-random number (xorshift, seeded per process and thread).
fn random() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            u64::from(std::process::id()).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
                ^ (micros() as u64),
        );
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    // Logs to stderr: stdout carries the events the tests read.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,conejo=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut config = QueueConfig::new()
        .concurrency(args.concurrency)
        .prefetch(args.prefetch)
        .poison_limit(Some(args.poison_limit).filter(|&limit| limit > 0));
    if args.partitions.is_none() {
        // The test declared the queue: `--quorum` says it is a quorum queue.
        config = config.passive();
        if args.quorum {
            config = config.quorum();
        }
    }
    if args.single_active {
        config = config.single_active_consumer();
    }
    if let Some(priority) = args.priority {
        config = config.consumer_priority(priority);
    }
    if let Some(header) = &args.ordered_by_header {
        config = config.ordered_by(conejo::OrderKey::header(header));
    }
    let handler = SleepsAndReports {
        pause: Duration::from_millis(args.handler_ms),
        jitter_ms: args.jitter_ms,
        abort_on: args.abort_on.map(String::into_bytes),
        fail_every: args.fail_every,
        slow: args
            .slow_every
            .map(|every| (every, Duration::from_millis(args.slow_ms))),
        detailed: args.partitions.is_some(),
        quiet: args.quiet,
        report_every: args.report_every.filter(|&every| every > 0),
        handled: std::sync::atomic::AtomicU64::new(0),
    };
    let builder = Conejo::builder(&args.amqp_url)
        .connection_name(args.connection_name)
        .shutdown_timeout(Duration::from_millis(args.shutdown_timeout_ms));
    let builder = match (&args.queue, &args.partitions) {
        (Some(queue), _) => builder.queue_with(queue, handler, config),
        (None, Some(spec)) => match partitions(spec, args.replica.as_deref(), args.balance_ms) {
            Ok(partitions) => {
                let config = if args.quorum { config.quorum() } else { config };
                let config = config.retry(
                    conejo::RetryPolicy::default()
                        .initial_delay(Duration::from_millis(50))
                        .multiplier(1.0)
                        .max_attempts(5),
                );
                builder.partitioned(partitions, handler, config)
            }
            Err(error) => {
                eprintln!("conejo-fixture: {error}");
                return ExitCode::FAILURE;
            }
        },
        (None, None) => unreachable!("clap requires one"),
    };
    let service = builder.build();
    let result = match service {
        Ok(service) => service.run().await,
        Err(error) => Err(error),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("conejo-fixture: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `EXCHANGE:COUNT` and `INDEX/REPLICAS` as [`Partitions`](conejo::Partitions).
fn partitions(
    spec: &str,
    replica: Option<&str>,
    balance_ms: u64,
) -> Result<conejo::Partitions, String> {
    let (exchange, count) = spec
        .rsplit_once(':')
        .ok_or("--partitions takes EXCHANGE:COUNT")?;
    let count = count
        .parse()
        .map_err(|_| "--partitions: COUNT is a number")?;
    let mut partitions = conejo::Partitions::new(exchange, count)
        .balance_interval(Duration::from_millis(balance_ms));
    if let Some(replica) = replica {
        let (index, replicas) = replica
            .split_once('/')
            .and_then(|(i, n)| Some((i.parse().ok()?, n.parse().ok()?)))
            .ok_or("--replica takes INDEX/REPLICAS")?;
        partitions = partitions.replica(index, replicas);
    }
    Ok(partitions)
}
