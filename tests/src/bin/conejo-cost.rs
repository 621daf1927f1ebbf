//! The client's cost per message, for `scripts/instructions`: consumes exactly `--messages`
//! prefilled JSON messages of ~100 B from one queue and exits, so that the process can run
//! under `valgrind --tool=callgrind` and be counted. Prefilling and cleaning up are separate
//! invocations (run natively), so a counted process only connects, consumes and closes.
//!
//! ```text
//! conejo-cost prefill --queue Q --messages N   # declare Q as conejo does, publish N, wait
//! conejo-cost consume --mode conejo --queue Q --messages N
//! conejo-cost delete --queue Q                 # Q and whatever conejo declared for it
//! ```
//!
//! Modes of `consume` (every one decodes each body into the same typed [`Order`](bench::Order) with
//! serde_json, so the figures differ by how messages are received and settled only):
//!
//! - `lapin-loop`: the hand-written lapin consumer to beat — `basic.qos(prefetch)`, read the
//!   stream, decode, and acknowledge with one `basic.ack(multiple = true)` every
//!   `prefetch / 4` deliveries, and at once whenever the stream has nothing ready after the
//!   [`IDLE_FLUSH`](bench::IDLE_FLUSH) wait (the coalesced-ack loop of the shared FACTS notes);
//! - `conejo`: a conejo service with conejo's defaults and a typed `Json<Order>` no-op
//!   handler, stopped through its [`ShutdownHandle`](conejo::ShutdownHandle) once it has
//!   acked every delivery;
//! - `lapin-noack`: lapin with `no_ack` (the broker forgets each message once sent): lapin's
//!   receive path plus the decode, a floor for anything built on lapin.
//!
//! `--prefetch` defaults to the prefetch conejo derives by default, so both lapin modes and
//! conejo run with the same window. Every mode runs on the same multi-thread tokio runtime
//! (`#[tokio::main]`); conejo, as always, puts its lapin connection on a runtime of its own.
//!
//! A consume run prints one line on stdout (`consumed N …`) and exits non-zero if it did not
//! consume and settle exactly `--messages` messages within `--timeout` seconds.

use std::{process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context as _, anyhow, ensure};
use clap::{Parser, Subcommand, ValueEnum};
use conejo::{Conejo, QueueConfig};
use conejo_tests::{
    Broker, DEFAULT_AMQP_URL,
    bench::{self, LapinAcks, Noop, Progress},
};

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "Consume N prefilled messages, to count a client's instructions per message")]
struct Args {
    /// Broker URL.
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true, global = true)]
    amqp_url: String,
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The three steps of one measurement.
#[derive(Debug, Subcommand)]
enum Command {
    /// Declare the queue as conejo's default `QueueConfig` does (durable, no arguments),
    /// publish N JSON bodies with confirms and wait until the broker holds them all.
    Prefill {
        /// The queue.
        #[arg(long)]
        queue: String,
        /// How many messages.
        #[arg(long)]
        messages: u32,
    },
    /// Consume exactly N messages, the way `--mode` says, then exit.
    Consume {
        /// Which consumer.
        #[arg(long, value_enum)]
        mode: Mode,
        /// The prefilled queue.
        #[arg(long)]
        queue: String,
        /// How many messages it holds.
        #[arg(long)]
        messages: u32,
        /// Prefetch of the lapin modes (default: the prefetch conejo derives by default).
        #[arg(long)]
        prefetch: Option<u16>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Check the queue is empty, then delete it and what conejo declared for it.
    Delete {
        /// The queue.
        #[arg(long)]
        queue: String,
    },
}

/// A consumer to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Hand-written lapin loop with coalesced acks.
    LapinLoop,
    /// conejo, defaults, typed JSON no-op handler.
    Conejo,
    /// lapin with `no_ack`.
    LapinNoack,
}

#[tokio::main]
async fn main() -> ExitCode {
    if bench::listing_tests() {
        return ExitCode::SUCCESS;
    }
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("conejo-cost: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Does what the command line says.
async fn run(args: Args) -> anyhow::Result<()> {
    let url = args.amqp_url;
    match args.command {
        Command::Prefill { queue, messages } => prefill(&url, &queue, messages).await,
        Command::Delete { queue } => delete(&url, &queue).await,
        Command::Consume {
            mode,
            queue,
            messages,
            prefetch,
            timeout,
        } => {
            ensure!(messages > 0, "--messages must be positive");
            let prefetch = prefetch.unwrap_or_else(|| QueueConfig::new().effective_prefetch());
            ensure!(prefetch > 0, "--prefetch must be positive");
            let timeout = Duration::from_secs(timeout);
            let consume = async {
                match mode {
                    Mode::LapinLoop => lapin_loop(&url, &queue, messages, prefetch, false).await,
                    Mode::LapinNoack => lapin_loop(&url, &queue, messages, prefetch, true).await,
                    Mode::Conejo => conejo(&url, &queue, messages).await,
                }
            };
            let summary = tokio::time::timeout(timeout, consume)
                .await
                .map_err(|_| anyhow!("{mode:?} did not finish within {timeout:?}"))??;
            println!("consumed {messages} {summary}");
            Ok(())
        }
    }
}

/// Declares `queue` as conejo does, publishes `messages` bodies and waits until all are ready.
async fn prefill(url: &str, queue: &str, messages: u32) -> anyhow::Result<()> {
    let broker = Broker::connect_to(url).await?;
    bench::prefill(&broker, queue, messages, Duration::from_secs(120)).await?;
    broker.close().await
}

/// Fails if anything is left in `queue`, after deleting it (and conejo's companions) anyway.
async fn delete(url: &str, queue: &str) -> anyhow::Result<()> {
    let broker = Broker::connect_to(url).await?;
    let left = broker.message_count(queue).await;
    broker.delete_consumed_queue(queue).await?;
    broker.close().await?;
    let left = left?;
    ensure!(left == 0, "{left} messages were left in {queue:?}");
    Ok(())
}

/// The hand-written lapin consumer ([`bench::lapin_consume`]): decode each delivery; with
/// acks, one `basic.ack(multiple)` per `prefetch / 4` deliveries and on idle.
async fn lapin_loop(
    url: &str,
    queue: &str,
    messages: u32,
    prefetch: u16,
    no_ack: bool,
) -> anyhow::Result<String> {
    let acks = if no_ack {
        LapinAcks::None
    } else {
        LapinAcks::Coalesced
    };
    let run = bench::lapin_consume(
        url,
        "conejo-cost.lapin",
        queue,
        messages,
        prefetch,
        acks,
        || (),
    )
    .await?;
    Ok(format!("prefetch {prefetch} ack_frames {}", run.ack_frames))
}

/// conejo with its defaults and [`Noop`], until every delivery is acked; then a graceful
/// shutdown through the [`ShutdownHandle`](conejo::ShutdownHandle).
async fn conejo(url: &str, queue: &str, messages: u32) -> anyhow::Result<String> {
    let progress = Progress::new(u64::from(messages));
    let conejo = Conejo::builder(url)
        .connection_name("conejo-cost.conejo")
        .queue(queue, Noop(Arc::clone(&progress)))
        .build()?;
    let stats = conejo.stats();
    let shutdown = conejo.shutdown_handle();
    let mut service = tokio::spawn(conejo.run_until(std::future::pending()));

    let acked = tokio::select! {
        _ = progress.acked(&stats, queue, u64::from(messages)) => Ok(()),
        ended = &mut service => Err(anyhow!("conejo stopped before acking every message: {ended:?}")),
    };
    shutdown.shutdown();
    acked?;
    service
        .await
        .context("the conejo task failed")?
        .context("conejo returned an error")?;
    let q = stats.queue(queue).context("no stats for the queue")?;
    ensure!(
        q.acked == u64::from(messages) && q.delivered == u64::from(messages),
        "conejo delivered {} and acked {} of {messages}: {q:?}",
        q.delivered,
        q.acked
    );
    Ok(format!(
        "prefetch {} ack_frames {}",
        QueueConfig::new().effective_prefetch(),
        q.ack_frames
    ))
}
