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
//! Modes of `consume` (every one decodes each body into the same typed [`Order`] with
//! serde_json, so the figures differ by how messages are received and settled only):
//!
//! - `lapin-loop`: the hand-written lapin consumer to beat — `basic.qos(prefetch)`, read the
//!   stream, decode, and acknowledge with one `basic.ack(multiple = true)` every
//!   `prefetch / 4` deliveries, and at once whenever the stream has nothing ready after the
//!   [`IDLE_FLUSH`] wait (the coalesced-ack loop of the shared FACTS notes);
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

use std::{
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail, ensure};
use clap::{Parser, Subcommand, ValueEnum};
use conejo::{Conejo, Context, Handler, HandlerError, Json, QueueConfig};
use conejo_tests::{
    Broker, DEFAULT_AMQP_URL,
    lapin::{
        Connection, ConnectionProperties,
        options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions},
        types::FieldTable,
    },
};
use futures::{FutureExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// Size of every message body, in bytes (as in the throughput benchmark).
const BODY_LEN: usize = 100;
/// Messages per `publish_many_bytes` call while prefilling.
const PUBLISH_CHUNK: u32 = 10_000;
/// How long the lapin loop waits for a next delivery before flushing its pending ack.
const IDLE_FLUSH: Duration = Duration::from_millis(20);
/// Interval of the `stats().acked` poll once conejo's handler has seen every message.
const STATS_POLL: Duration = Duration::from_millis(1);

/// The message: a small order, as JSON (the throughput benchmark's `Order`).
#[derive(Debug, Serialize, Deserialize)]
struct Order {
    /// Order number.
    id: u64,
    /// Product reference, `SKU-000` to `SKU-999`.
    sku: String,
    /// 1 to 10.
    quantity: u32,
    /// Padding, so that the JSON body is [`BODY_LEN`] bytes.
    note: String,
}

impl Order {
    /// The `index`-th message of a queue, serialized and padded to [`BODY_LEN`] bytes.
    fn body(index: u32) -> Vec<u8> {
        let mut order = Order {
            id: u64::from(index),
            sku: format!("SKU-{:03}", index % 1000),
            quantity: index % 10 + 1,
            note: String::new(),
        };
        let bare = serde_json::to_vec(&order).expect("an Order always serializes");
        order.note = "x".repeat(BODY_LEN.saturating_sub(bare.len()));
        serde_json::to_vec(&order).expect("an Order always serializes")
    }
}

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
    // Test runners list every binary's tests: this one has none.
    if std::env::args().any(|arg| arg == "--list") {
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

/// Declares `queue` durable with no arguments (conejo's default declaration, so conejo's own
/// declare is a no-op), publishes `messages` bodies and waits until all are ready.
async fn prefill(url: &str, queue: &str, messages: u32) -> anyhow::Result<()> {
    let broker = Broker::connect_to(url).await?;
    let channel = broker.open_channel().await?;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring {queue:?}"))?;
    channel.close(200, "declared".into()).await?;
    let mut next = 0;
    while next < messages {
        let end = next.saturating_add(PUBLISH_CHUNK).min(messages);
        broker
            .publish_many_bytes(queue, (next..end).map(Order::body).collect())
            .await?;
        next = end;
    }
    broker
        .wait_for_count(queue, messages, Duration::from_secs(120))
        .await?;
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

/// The hand-written lapin consumer: decode each delivery; with acks, one
/// `basic.ack(multiple)` per `prefetch / 4` deliveries and on idle.
async fn lapin_loop(
    url: &str,
    queue: &str,
    messages: u32,
    prefetch: u16,
    no_ack: bool,
) -> anyhow::Result<String> {
    let properties =
        ConnectionProperties::default().with_connection_name("conejo-cost.lapin".into());
    let connection = Connection::connect(url, properties).await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "conejo-cost".into(),
            BasicConsumeOptions {
                no_ack,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;

    let batch = u32::from(prefetch / 4).max(1);
    let mut count = 0u32;
    // Deliveries received but not acked yet, and the last one's tag.
    let mut pending = 0u32;
    let mut last_tag = 0;
    let mut ack_frames = 0u64;
    while count < messages {
        // Take what is ready without a timer; only an empty stream with acks pending arms the
        // idle flush (a busy loop pays nothing for it).
        let next = match consumer.next().now_or_never() {
            Some(next) => next,
            None if pending == 0 => consumer.next().await,
            None => match tokio::time::timeout(IDLE_FLUSH, consumer.next()).await {
                Ok(next) => next,
                Err(_) => {
                    channel
                        .basic_ack(last_tag, BasicAckOptions { multiple: true })
                        .await?;
                    ack_frames += 1;
                    pending = 0;
                    continue;
                }
            },
        };
        let delivery = next.ok_or_else(|| {
            anyhow!("the consumer stream ended after {count} of {messages} messages")
        })??;
        let order: Order = serde_json::from_slice(&delivery.data)?;
        drop(std::hint::black_box(order));
        count += 1;
        if no_ack {
            continue;
        }
        last_tag = delivery.delivery_tag;
        pending += 1;
        if pending >= batch || count == messages {
            channel
                .basic_ack(last_tag, BasicAckOptions { multiple: true })
                .await?;
            ack_frames += 1;
            pending = 0;
        }
    }
    // Closing the channel would give back anything unacked: `delete` checks none was.
    channel.close(200, "done".into()).await?;
    connection.close(200, "done".into()).await?;
    Ok(format!("prefetch {prefetch} ack_frames {ack_frames}"))
}

/// Counts handled messages for [`conejo()`], and says when the last one was.
#[derive(Debug)]
struct Progress {
    /// Messages handled so far.
    handled: AtomicU64,
    /// How many to handle.
    target: u64,
    /// Fired when `handled` reaches `target`.
    done: Notify,
}

/// The handler: decodes the typed order (conejo does, for `Json<Order>`) and counts it.
#[derive(Debug)]
struct Noop(Arc<Progress>);

impl Handler for Noop {
    type Message = Json<Order>;

    async fn handle(&self, order: Json<Order>, _ctx: &Context) -> Result<(), HandlerError> {
        drop(std::hint::black_box(order));
        let progress = &*self.0;
        if progress.handled.fetch_add(1, Relaxed) + 1 == progress.target {
            progress.done.notify_one();
        }
        Ok(())
    }
}

/// conejo with its defaults and [`Noop`], until every delivery is acked; then a graceful
/// shutdown through the [`ShutdownHandle`](conejo::ShutdownHandle).
async fn conejo(url: &str, queue: &str, messages: u32) -> anyhow::Result<String> {
    let progress = Arc::new(Progress {
        handled: AtomicU64::new(0),
        target: u64::from(messages),
        done: Notify::new(),
    });
    let conejo = Conejo::builder(url)
        .connection_name("conejo-cost.conejo")
        .queue(queue, Noop(Arc::clone(&progress)))
        .build()?;
    let stats = conejo.stats();
    let shutdown = conejo.shutdown_handle();
    let mut service = tokio::spawn(conejo.run_until(std::future::pending()));

    // Only once the handler has seen the last message does this poll the ack count: the poll
    // costs nothing per message.
    let all_acked = async {
        tokio::select! {
            () = progress.done.notified() => {}
            ended = &mut service => bail!("conejo stopped before handling every message: {ended:?}"),
        }
        while stats.queue(queue).map_or(0, |q| q.acked) < u64::from(messages) {
            tokio::time::sleep(STATS_POLL).await;
        }
        Ok(())
    };
    let acked = all_acked.await;
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
