//! Shared by the benchmarks and `conejo-cost`: the JSON message they all consume, prefilling
//! a queue with it, the hand-written lapin consumers conejo is measured against, the
//! counting no-op handler conejo runs, and the clocks they are measured with.
//!
//! Why it is ~600 lines: the hand-written lapin consumers conejo is measured against live
//! here together, so that every benchmark compares with the same code.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use conejo::{Context, Handler, HandlerError, Json, Stats};
use futures::{FutureExt as _, StreamExt as _};
use lapin::{
    Channel, Connection, ConnectionProperties,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions},
    types::FieldTable,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::Broker;

/// Size of every message body, in bytes.
pub const BODY_LEN: usize = 100;
/// Messages per `publish_many_bytes` call while prefilling.
const PUBLISH_CHUNK: u32 = 10_000;
/// How long the coalescing lapin loop waits for a next delivery before it flushes its
/// pending ack.
pub const IDLE_FLUSH: Duration = Duration::from_millis(20);
/// Interval of the `stats()` poll once a conejo handler has seen every message.
pub const STATS_POLL: Duration = Duration::from_millis(1);

/// The message: a small order, as JSON.
#[derive(Debug, Serialize, Deserialize)]
pub struct Order {
    /// Order number (the index of the message in its queue).
    pub id: u64,
    /// Product reference, `SKU-000` to `SKU-999`.
    pub sku: String,
    /// 1 to 10.
    pub quantity: u32,
    /// Padding, so that the JSON body is [`BODY_LEN`] bytes.
    pub note: String,
}

impl Order {
    /// The `index`-th message of a queue, serialized and padded to [`BODY_LEN`] bytes.
    pub fn body(index: u32) -> Vec<u8> {
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

/// Declares `queue` as conejo's default `QueueConfig` does (durable, not exclusive, not
/// auto-delete, no arguments, so conejo's own declare is a no-op), publishes `messages`
/// [`Order`] bodies with confirms and waits until the broker holds them all (bounded by
/// `timeout`).
pub async fn prefill(
    broker: &Broker,
    queue: &str,
    messages: u32,
    timeout: Duration,
) -> anyhow::Result<()> {
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
    let fill = async {
        let mut next = 0;
        while next < messages {
            let end = next.saturating_add(PUBLISH_CHUNK).min(messages);
            broker
                .publish_many_bytes(queue, (next..end).map(Order::body).collect())
                .await?;
            next = end;
        }
        broker.wait_for_count(queue, messages, timeout).await
    };
    tokio::time::timeout(timeout, fill)
        .await
        .map_err(|_| anyhow!("prefilling {queue:?} took more than {timeout:?}"))?
}

/// A point in time of a run: wall clock and this process's CPU time.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    /// Wall clock.
    pub at: Instant,
    /// Process CPU time ([`cpu_time`] of `self`), if readable.
    pub cpu: Option<Duration>,
}

impl Mark {
    /// Now.
    pub fn now() -> Mark {
        Mark {
            at: Instant::now(),
            cpu: cpu_time("self"),
        }
    }
}

/// Shared by a counting handler ([`Noop`]) and the benchmark that waits for it: how many
/// messages were handled, when the first was, and a wake-up when the last one is.
#[derive(Debug)]
pub struct Progress {
    /// Messages handled so far.
    handled: AtomicU64,
    /// Taken when the first message was handled.
    first: OnceLock<Mark>,
    /// Fired when `handled` reaches `target`.
    done: Notify,
    /// How many messages to handle.
    target: u64,
}

impl Progress {
    /// Progress towards `target` handled messages.
    pub fn new(target: u64) -> Arc<Progress> {
        Arc::new(Progress {
            handled: AtomicU64::new(0),
            first: OnceLock::new(),
            done: Notify::new(),
            target,
        })
    }

    /// Takes the [`Mark`] of the first message (only the first call does).
    pub fn started(&self) {
        self.first.get_or_init(Mark::now);
    }

    /// Counts one handled message, and wakes [`Progress::done`] at the last.
    pub fn handled_one(&self) {
        if self.handled.fetch_add(1, Relaxed) + 1 == self.target {
            self.done.notify_one();
        }
    }

    /// Messages handled so far.
    pub fn handled(&self) -> u64 {
        self.handled.load(Relaxed)
    }

    /// The mark of the first message, once one was handled.
    pub fn first(&self) -> Option<Mark> {
        self.first.get().copied()
    }

    /// Returns once `target` messages were handled (for one waiter).
    pub async fn done(&self) {
        if self.handled() < self.target {
            self.done.notified().await;
        }
    }

    /// Returns once `target` messages were handled, then polls `stats` every [`STATS_POLL`]
    /// until `queue` has acked `deliveries` (the poll starts after the last message, so it
    /// costs nothing per message); the [`Mark`] is taken then.
    pub async fn acked(&self, stats: &Stats, queue: &str, deliveries: u64) -> Mark {
        self.done().await;
        while stats.queue(queue).map_or(0, |q| q.acked) < deliveries {
            tokio::time::sleep(STATS_POLL).await;
        }
        Mark::now()
    }
}

/// The handler conejo is measured with: `Json<Order>` (conejo decodes the typed order), marks
/// the first message, counts each one, and acks.
#[derive(Debug)]
pub struct Noop(pub Arc<Progress>);

impl Handler for Noop {
    type Message = Json<Order>;

    async fn handle(&self, order: Json<Order>, _ctx: &Context) -> Result<(), HandlerError> {
        self.0.started();
        drop(std::hint::black_box(order));
        self.0.handled_one();
        Ok(())
    }
}

/// Checks, broker side, that each of `queues` is empty (call it once consumers have closed
/// their channels: anything unacked is back in its queue then).
pub async fn ensure_empty<S: AsRef<str>>(broker: &Broker, queues: &[S]) -> anyhow::Result<()> {
    for queue in queues {
        let queue = queue.as_ref();
        let left = broker.message_count(queue).await?;
        anyhow::ensure!(left == 0, "{left} messages left in {queue:?} after the run");
    }
    Ok(())
}

/// Waits, at most `timeout`, for a conejo service spawned as a task (after its shutdown was
/// asked) and returns its result.
pub async fn stopped(
    service: tokio::task::JoinHandle<Result<(), conejo::Error>>,
    timeout: Duration,
) -> anyhow::Result<()> {
    tokio::time::timeout(timeout, service)
        .await
        .map_err(|_| anyhow!("conejo did not shut down within {timeout:?}"))?
        .context("the conejo task failed")?
        .context("conejo returned an error")
}

/// How a hand-written lapin consumer settles its deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LapinAcks {
    /// The ordinary loop: `ack` each delivery and await it before taking the next.
    Each,
    /// One `basic.ack(multiple = true)` every `prefetch / 4` deliveries, and at once when
    /// the stream has had nothing ready for [`IDLE_FLUSH`] (the loop to beat).
    Coalesced,
    /// `no_ack`: the broker forgets each message once sent (its delivery ceiling).
    None,
}

/// What [`lapin_consume`] measured; `M` is whatever the caller's `mark` returns.
#[derive(Debug)]
pub struct LapinRun<M> {
    /// Taken at the first delivery.
    pub first: M,
    /// Taken once the last delivery was decoded and (unless `no_ack`) its ack sent.
    pub last: M,
    /// `basic.ack` frames sent.
    pub ack_frames: u64,
}

/// A hand-written lapin consumer of `messages` prefilled [`Order`]s of `queue`, on a
/// connection of its own named `connection_name`: [`lapin_consume_on`] a channel of it, then
/// closes the connection.
pub async fn lapin_consume<M>(
    url: &str,
    connection_name: &str,
    queue: &str,
    messages: u32,
    prefetch: u16,
    acks: LapinAcks,
    mark: impl FnMut() -> M,
) -> anyhow::Result<LapinRun<M>> {
    let properties = ConnectionProperties::default().with_connection_name(connection_name.into());
    let connection = Connection::connect(url, properties).await?;
    let channel = connection.create_channel().await?;
    let run = lapin_consume_on(
        &channel,
        connection_name,
        queue,
        messages,
        prefetch,
        acks,
        mark,
    )
    .await?;
    connection.close(200, "done".into()).await?;
    Ok(run)
}

/// A hand-written lapin consumer of `messages` prefilled [`Order`]s of `queue` on `channel`
/// (consumer tag `consumer_tag`), with `basic.qos(prefetch)`: decodes each body, settles as
/// `acks` says, then closes the channel (closing gives back anything unacked, so a
/// broker-side count after it is final). `mark` is called at the first delivery and after
/// the last.
pub async fn lapin_consume_on<M>(
    channel: &Channel,
    consumer_tag: &str,
    queue: &str,
    messages: u32,
    prefetch: u16,
    acks: LapinAcks,
    mut mark: impl FnMut() -> M,
) -> anyhow::Result<LapinRun<M>> {
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            consumer_tag.into(),
            BasicConsumeOptions {
                no_ack: acks == LapinAcks::None,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;

    let batch = u32::from(prefetch / 4).max(1);
    let mut first = None;
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
        if first.is_none() {
            first = Some(mark());
        }
        let order: Order = serde_json::from_slice(&delivery.data)?;
        drop(std::hint::black_box(order));
        count += 1;
        match acks {
            LapinAcks::None => {}
            LapinAcks::Each => {
                delivery.ack(BasicAckOptions::default()).await?;
                ack_frames += 1;
            }
            LapinAcks::Coalesced => {
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
        }
    }
    let last = mark();
    channel.close(200, "done".into()).await?;
    Ok(LapinRun {
        first: first.context("no delivery")?,
        last,
        ack_frames,
    })
}

/// True when a test runner is listing this binary's tests (`--list`, as `cargo nextest run
/// --all-targets` does with every target): a benchmark has none, and exits at once.
pub fn listing_tests() -> bool {
    std::env::args().any(|arg| arg == "--list")
}

/// The median of some values (the mean of the middle two for an even count; NaN for none).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    match sorted.len() {
        0 => f64::NAN,
        len if len % 2 == 1 => sorted[mid],
        _ => (sorted[mid - 1] + sorted[mid]) / 2.0,
    }
}

/// A duration given in seconds on a command line (`120`, `0.5`): clap's `value_parser` for
/// the benchmarks' `--timeout` and similar flags. Zero, negative and non-finite are refused.
pub fn secs(arg: &str) -> Result<Duration, String> {
    match arg.parse::<f64>() {
        Ok(secs) if secs > 0.0 => {
            Duration::try_from_secs_f64(secs).map_err(|error| format!("{arg:?}: {error}"))
        }
        _ => Err(format!("{arg:?} is not a positive number of seconds")),
    }
}

/// A positive whole number on a command line (`--runs`, `--queues`): clap's `value_parser`
/// where `value_parser!(u32).range(1..)` does not fit the type.
pub fn positive(arg: &str) -> Result<usize, String> {
    match arg.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{arg:?} is not a positive whole number")),
    }
}

/// The highest values a [`Sampler`] saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peaks {
    /// Resident set (`VmRSS`), KiB.
    pub rss_kib: u64,
    /// [`Stats::connection_runtime_lag`], the largest over every service sampled.
    pub connection_lag: Duration,
    /// [`Stats::handler_runtime_lag`], the largest over every service sampled.
    pub handler_lag: Duration,
}

/// Samples, every `period` until stopped, this process's resident set and the runtime lags
/// of some conejo services, and keeps the highest of each. Each lag reading is already the
/// largest of the last 2 s (see [`Stats::connection_runtime_lag`]), so a period well under
/// that misses no stall.
#[derive(Debug)]
pub struct Sampler {
    stop: Arc<Notify>,
    task: tokio::task::JoinHandle<Peaks>,
}

impl Sampler {
    /// Starts sampling, on the current runtime (so its own timer also waits on a busy handler
    /// runtime: a lag it misses shows in the next reading).
    pub fn start(stats: Vec<Stats>, period: Duration) -> Sampler {
        let stop = Arc::new(Notify::new());
        let stopped = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let mut peaks = Peaks::default();
            let mut sample = || {
                peaks.rss_kib = peaks.rss_kib.max(rss_kib().unwrap_or(0));
                for stats in &stats {
                    peaks.connection_lag = peaks.connection_lag.max(stats.connection_runtime_lag());
                    peaks.handler_lag = peaks.handler_lag.max(stats.handler_runtime_lag());
                }
            };
            loop {
                sample();
                tokio::select! {
                    () = stopped.notified() => break,
                    () = tokio::time::sleep(period) => {}
                }
            }
            sample();
            peaks
        });
        Sampler { stop, task }
    }

    /// Takes a last sample and returns the peaks.
    pub async fn stop(self) -> anyhow::Result<Peaks> {
        self.stop.notify_one();
        self.task.await.context("the sampler task failed")
    }
}

/// The process's peak resident set size (`VmHWM` of `/proc/self/status`), in KiB.
pub fn peak_rss_kib() -> Option<u64> {
    status_kib("VmHWM:")
}

/// The process's resident set size now (`VmRSS` of `/proc/self/status`), in KiB.
pub fn rss_kib() -> Option<u64> {
    status_kib("VmRSS:")
}

fn status_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// CPU time (user + system, every thread) of process `pid` (`"self"` for this one), from
/// `/proc/<pid>/stat`; `None` where unreadable.
pub fn cpu_time(pid: &str) -> Option<Duration> {
    let (user, system) = stat_times(&format!("/proc/{pid}/stat"))?;
    Some(user + system)
}

/// utime and stime of a `/proc/…/stat` file (a process's or a thread's).
fn stat_times(path: &str) -> Option<(Duration, Duration)> {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let ticks_per_second = *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .filter(|&ticks| ticks > 0)
            .unwrap_or(100)
    });
    let stat = std::fs::read_to_string(path).ok()?;
    // utime and stime: fields 14 and 15, counted after the `)` that ends the command name.
    let mut fields = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .skip(11);
    let mut next = || -> Option<Duration> {
        let ticks: u64 = fields.next()?.parse().ok()?;
        Some(Duration::from_nanos(
            ticks.saturating_mul(1_000_000_000) / ticks_per_second,
        ))
    };
    Some((next()?, next()?))
}

/// What one thread, or the threads of one name, spent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadTimes {
    /// CPU time in user space.
    pub user: Duration,
    /// CPU time in the kernel (system calls: socket I/O, futex wake-ups and waits…).
    pub system: Duration,
    /// Context switches: voluntary (the thread waited: parked, blocked in a read) plus
    /// involuntary (preempted).
    pub switches: u64,
}

impl ThreadTimes {
    /// User + system.
    pub fn cpu(&self) -> Duration {
        self.user + self.system
    }

    fn saturating_sub(self, earlier: ThreadTimes) -> ThreadTimes {
        ThreadTimes {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
            switches: self.switches.saturating_sub(earlier.switches),
        }
    }

    fn add(&mut self, other: ThreadTimes) {
        self.user += other.user;
        self.system += other.system;
        self.switches += other.switches;
    }
}

/// Context switches of a thread, from its `/proc/…/status`.
fn switches(status: &str) -> Option<u64> {
    let count = |key: &str| -> Option<u64> {
        let line = status.lines().find(|line| line.starts_with(key))?;
        line[key.len()..].trim().parse().ok()
    };
    Some(count("voluntary_ctxt_switches:")? + count("nonvoluntary_ctxt_switches:")?)
}

/// The CPU time and context switches of every thread of this process at one moment
/// (`/proc/self/task`), by thread id, with the thread's name (`comm`: at most 15 bytes, so
/// tokio's workers are `tokio-rt-worker`, conejo's connection runtime `conejo-connecti`,
/// lapin's socket thread `lapin-io-loop`).
#[derive(Debug, Clone, Default)]
pub struct ThreadCpu(BTreeMap<u64, (String, ThreadTimes)>);

impl ThreadCpu {
    /// Now (empty where `/proc/self/task` is unreadable).
    pub fn now() -> ThreadCpu {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return ThreadCpu::default();
        };
        ThreadCpu(
            tasks
                .filter_map(|task| {
                    let task = task.ok()?;
                    let tid = task.file_name().to_str()?.parse().ok()?;
                    let path = task.path();
                    let name = std::fs::read_to_string(path.join("comm")).ok()?;
                    let (user, system) = stat_times(path.join("stat").to_str()?)?;
                    let status = std::fs::read_to_string(path.join("status")).ok()?;
                    let times = ThreadTimes {
                        user,
                        system,
                        switches: switches(&status)?,
                    };
                    Some((tid, (name.trim().to_owned(), times)))
                })
                .collect(),
        )
    }

    /// What each thread name spent from `earlier` to this snapshot, summed over the threads
    /// of that name (a thread started in between counts from zero; one that ended in
    /// between is missing).
    pub fn since(&self, earlier: &ThreadCpu) -> BTreeMap<String, ThreadTimes> {
        let mut by_name = BTreeMap::<String, ThreadTimes>::new();
        for (tid, (name, times)) in &self.0 {
            let before = earlier
                .0
                .get(tid)
                .map_or_else(ThreadTimes::default, |t| t.1);
            by_name
                .entry(name.clone())
                .or_default()
                .add(times.saturating_sub(before));
        }
        by_name
    }
}

/// The broker's process id, to sample its CPU time: `BROKER_PID` if set, else the only
/// `beam.smp` process of this machine (`None` if there are none or several).
pub fn broker_pid() -> Option<String> {
    if let Ok(pid) = std::env::var("BROKER_PID") {
        return Some(pid);
    }
    let mut found = std::fs::read_dir("/proc").ok()?.filter_map(|entry| {
        let entry = entry.ok()?;
        let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
        (comm.trim() == "beam.smp").then(|| entry.file_name().to_string_lossy().into_owned())
    });
    let pid = found.next()?;
    found.next().is_none().then_some(pid)
}
