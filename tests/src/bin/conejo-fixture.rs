//! A small conejo service for process-level tests (signals, exit codes, crash loops,
//! replicas): consumes one existing queue with a handler that sleeps, and reports on stdout,
//! one line per event: `started <message-id>` and `finished <message-id>`. With `--abort-on BODY` it
//! aborts the whole process (SIGABRT) on a message with that body, as a poison message would.
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
    #[arg(long)]
    queue: String,
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
    abort_on: Option<Vec<u8>>,
}

impl Handler for SleepsAndReports {
    type Message = Vec<u8>;

    async fn handle(&self, body: Vec<u8>, ctx: &Context) -> Result<(), HandlerError> {
        let id = ctx.message_id().unwrap_or("?");
        println!("started {id}");
        if self.abort_on.as_deref() == Some(body.as_slice()) {
            std::process::abort();
        }
        tokio::time::sleep(self.pause).await;
        println!("finished {id}");
        Ok(())
    }
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
        .passive()
        .concurrency(args.concurrency)
        .prefetch(args.prefetch)
        .poison_limit(Some(args.poison_limit).filter(|&limit| limit > 0));
    if args.single_active {
        config = config.single_active_consumer();
    }
    if let Some(priority) = args.priority {
        config = config.consumer_priority(priority);
    }
    if let Some(header) = &args.ordered_by_header {
        config = config.ordered_by(conejo::OrderKey::header(header));
    }
    let service = Conejo::builder(&args.amqp_url)
        .connection_name(args.connection_name)
        .shutdown_timeout(Duration::from_millis(args.shutdown_timeout_ms))
        .queue_with(
            &args.queue,
            SleepsAndReports {
                pause: Duration::from_millis(args.handler_ms),
                abort_on: args.abort_on.map(String::into_bytes),
            },
            config,
        )
        .build();
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
