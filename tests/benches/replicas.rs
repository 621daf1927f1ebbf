//! Scale-out on a private three-node cluster: 1, 2 and 3 replicas (`conejo-fixture`
//! processes, each connected to a different node first), no-op handler, quorum queues.
//!
//! - **one queue**: competing consumers on one quorum queue, unordered (concurrency 16,
//!   prefetch 250); beside it, a hand-written lapin consumer (coalesced acks, the loop to beat)
//!   on the same queue, in this process;
//! - **partitions**: `Partitions::new(…, 6)` — a consistent-hash exchange routing to six
//!   quorum partition queues, ordered by the routing key (1,000 keys), single active
//!   consumer each, every replica consuming all six with `replica(i, n)` (balance every
//!   200 ms, so the partitions spread over the replicas within the run).
//!
//! Each run prefills `--messages` messages, then starts the replicas and measures from the
//! first `handled 1000` report to the last message: msgs/s, the ratio to one replica, and CPU
//! per message of the clients (the replicas' processes) and of the broker (the three nodes'
//! VMs). On this two-core machine the cluster, the replicas and the prefill share the cores:
//! the figures say which side used them.
//!
//! ```text
//! cargo bench -p conejo-tests --bench replicas
//! cargo bench -p conejo-tests --bench replicas -- --messages 100000
//! ```

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::ensure;
use clap::Parser;
use conejo_tests::{
    Broker, Fixture, NodeOptions, PrivateCluster,
    bench::{LapinAcks, Order, cpu_time, lapin_consume, listing_tests},
    unique_name,
};
use futures::{StreamExt, stream};
use lapin::{
    BasicProperties, Confirmation,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable, LongString},
};

#[derive(Parser, Debug)]
#[command(about = "Scale-out: 1, 2 and 3 replicas on a three-node cluster")]
struct Args {
    /// Messages per run.
    #[arg(long, default_value_t = 60_000)]
    messages: u64,
    /// Ignored: cargo bench passes it.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Replicas report every this many messages.
const REPORT: u64 = 1000;
/// Partitions of the partitioned topology.
const PARTITIONS: u16 = 6;
/// Keys of the partitioned runs.
const KEYS: u64 = 1000;

/// What one run measured.
struct Run {
    what: String,
    replicas: usize,
    rate: f64,
    client_cpu_per_msg: Duration,
    broker_cpu_per_msg: Duration,
}

fn main() -> anyhow::Result<()> {
    if listing_tests() {
        return Ok(());
    }
    let args = Args::parse();
    ensure!(
        args.messages > 2 * REPORT,
        "--messages must exceed {}",
        2 * REPORT
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(bench(args))
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let cluster = PrivateCluster::start_with_options(
        3,
        &NodeOptions {
            plugins: vec!["rabbitmq_consistent_hash_exchange".to_owned()],
            ..NodeOptions::default()
        },
    )
    .await?;
    eprintln!("cluster of 3 up in {:?}", started.elapsed());
    let urls = cluster.amqp_urls();
    let broker = Broker::connect_to(&urls[0]).await?;
    let m = args.messages;
    let mut runs = Vec::new();

    // One quorum queue, competing consumers.
    let queue = unique_name("bench-replicas");
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    broker
        .declare_durable_queue_with_args(&queue, arguments)
        .await?;
    {
        fill_queue(&broker, &queue, m).await?;
        let before = broker_cpu(&cluster);
        let mark = || (Instant::now(), cpu_time("self"));
        let run = lapin_consume(
            &urls[0],
            "bench-lapin",
            &queue,
            u32::try_from(m)?,
            250,
            LapinAcks::Coalesced,
            mark,
        )
        .await?;
        let (first, last) = (run.first, run.last);
        let seconds = (last.0 - first.0).as_secs_f64();
        let client = last.1.zip(first.1).map(|(b, a)| b - a).unwrap_or_default();
        runs.push(Run {
            what: "one queue: lapin, 1 consumer".to_owned(),
            replicas: 1,
            rate: m as f64 / seconds,
            client_cpu_per_msg: client / u32::try_from(m)?,
            broker_cpu_per_msg: (broker_cpu(&cluster) - before) / u32::try_from(m)?,
        });
        print_run(runs.last().expect("a run"));
    }
    for replicas in 1..=3 {
        fill_queue(&broker, &queue, m).await?;
        let args =
            |_: usize| format!("--queue {queue} --handler-ms 0 --concurrency 16 --prefetch 250");
        let run = drain(
            &cluster,
            replicas,
            m,
            "one queue: conejo",
            std::slice::from_ref(&queue),
            args,
        )
        .await?;
        print_run(&run);
        runs.push(run);
    }
    broker.delete_queue(&queue).await?;

    // Partitions: the replicas declare them once; then each run prefills and drains.
    let exchange = unique_name("bench-parts");
    let exchange_name = exchange.as_str();
    let partition_args = |replicas: usize| {
        move |index: usize| {
            let exchange = exchange_name;
            format!(
                "--partitions {exchange}:{PARTITIONS} --replica {index}/{replicas} --quorum \
                 --balance-ms 200 --handler-ms 0 --concurrency 16 --prefetch 250 \
                 --poison-limit 0"
            )
        }
    };
    {
        let fixture = spawn(&cluster, 0, &partition_args(1)(0), Arc::default())?;
        for p in 0..PARTITIONS {
            broker
                .wait_for_consumer_count(&format!("{exchange}.{p}"), 1, Duration::from_secs(60))
                .await?;
        }
        fixture.terminate().await?;
    }
    let partition_queues: Vec<String> =
        (0..PARTITIONS).map(|p| format!("{exchange}.{p}")).collect();
    for replicas in 1..=3 {
        fill_partitions(&broker, &exchange, m).await?;
        let run = drain(
            &cluster,
            replicas,
            m,
            "6 partitions, ordered: conejo",
            &partition_queues,
            partition_args(replicas),
        )
        .await?;
        print_run(&run);
        runs.push(run);
    }
    for p in 0..PARTITIONS {
        broker.delete_queue(&format!("{exchange}.{p}")).await?;
    }
    broker.delete_exchange(&exchange).await?;
    broker.close().await?;

    println!();
    println!(
        "{:<32} {:>8} {:>10} {:>8} {:>14} {:>14}",
        "run", "replicas", "msgs/s", "ratio", "client µs/msg", "broker µs/msg"
    );
    for run in &runs {
        let base = runs
            .iter()
            .find(|r| r.replicas == 1 && r.what == run.what)
            .map_or(run.rate, |r| r.rate);
        println!(
            "{:<32} {:>8} {:>10.0} {:>8.2} {:>14.1} {:>14.1}",
            run.what,
            run.replicas,
            run.rate,
            run.rate / base,
            run.client_cpu_per_msg.as_secs_f64() * 1e6,
            run.broker_cpu_per_msg.as_secs_f64() * 1e6,
        );
    }
    let lapin = runs[0].rate;
    let conejo = runs[1].rate;
    println!(
        "\none queue, one consumer: conejo / lapin = {:.2}; {m} messages per run; all in {:?}",
        conejo / lapin,
        started.elapsed()
    );
    Ok(())
}

fn print_run(run: &Run) {
    eprintln!(
        "{} × {}: {:.0} msgs/s, client {:?}/msg, broker {:?}/msg",
        run.what, run.replicas, run.rate, run.client_cpu_per_msg, run.broker_cpu_per_msg
    );
}

/// Starts `replicas` fixtures (replica i connected to node i first), waits until they have
/// handled `m` messages in all, and measures from the first report to the last.
async fn drain(
    cluster: &PrivateCluster,
    replicas: usize,
    m: u64,
    what: &str,
    queues: &[String],
    args: impl Fn(usize) -> String,
) -> anyhow::Result<Run> {
    let handled: Vec<Arc<AtomicU64>> = (0..replicas).map(|_| Arc::default()).collect();
    let fixtures = (0..replicas)
        .map(|i| spawn(cluster, i, &args(i), Arc::clone(&handled[i])))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let total = || {
        handled
            .iter()
            .map(|h| h.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    while total() < REPORT {
        ensure!(Instant::now() < deadline, "{what}: nothing handled");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (first, first_total) = (Instant::now(), total());
    let pids: Vec<String> = fixtures
        .iter()
        .filter_map(Fixture::pid)
        .map(|p| p.to_string())
        .collect();
    let client_before: Duration = pids.iter().filter_map(|p| cpu_time(p)).sum();
    let broker_before = broker_cpu(cluster);
    // The last report is at a multiple of REPORT per replica: count to the end from the
    // broker's side instead.
    while total() + u64::try_from(replicas)? * REPORT < m {
        ensure!(Instant::now() < deadline, "{what}: stuck at {}", total());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let counted = total();
    let last = Instant::now();
    let client: Duration =
        pids.iter().filter_map(|p| cpu_time(p)).sum::<Duration>() - client_before;
    let broker = broker_cpu(cluster) - broker_before;
    for fixture in fixtures {
        fixture.terminate().await?;
    }
    // What the runs left (the last reports' remainder) goes, for the next run's prefill.
    let admin = Broker::connect_to(&cluster.amqp_urls()[0]).await?;
    for queue in queues {
        admin.purge(queue).await?;
    }
    admin.close().await?;
    let n = counted - first_total;
    let n32 = u32::try_from(n)?;
    Ok(Run {
        what: what.to_owned(),
        replicas,
        rate: n as f64 / (last - first).as_secs_f64(),
        client_cpu_per_msg: client / n32,
        broker_cpu_per_msg: broker / n32,
    })
}

/// A quiet fixture, replica `index`, its node list starting at node `index`.
fn spawn(
    cluster: &PrivateCluster,
    index: usize,
    args: &str,
    handled: Arc<AtomicU64>,
) -> anyhow::Result<Fixture> {
    let mut args: Vec<String> = args.split_whitespace().map(str::to_owned).collect();
    args.extend(["--quiet", "--report-every", &REPORT.to_string()].map(str::to_owned));
    args.extend([
        "--connection-name".to_owned(),
        format!("bench-replica-{index}"),
    ]);
    Fixture::spawn(
        env!("CARGO_BIN_EXE_conejo-fixture"),
        &args,
        &cluster.replica_url(index),
        move |line| {
            if let Some(count) = line.strip_prefix("handled ").and_then(|n| n.parse().ok()) {
                handled.store(count, Ordering::Relaxed);
            }
        },
    )
}

/// CPU time of the cluster's three VMs.
fn broker_cpu(cluster: &PrivateCluster) -> Duration {
    cluster
        .nodes()
        .iter()
        .filter_map(|node| node.pid())
        .filter_map(|pid| cpu_time(&pid.to_string()))
        .sum()
}

async fn fill_queue(broker: &Broker, queue: &str, m: u64) -> anyhow::Result<()> {
    let mut next = 0u32;
    let m32 = u32::try_from(m)?;
    while next < m32 {
        let end = (next + 10_000).min(m32);
        broker
            .publish_many_bytes(queue, (next..end).map(Order::body).collect())
            .await?;
        next = end;
    }
    broker
        .wait_for_count(queue, m32, Duration::from_secs(120))
        .await
}

/// `m` messages to the partitions' exchange, round robin over [`KEYS`] routing keys.
async fn fill_partitions(broker: &Broker, exchange: &str, m: u64) -> anyhow::Result<()> {
    let channel = broker.connection().create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let channel = &channel;
    let mut confirms = stream::iter(0..m)
        .map(|n| async move {
            let body = Order::body(u32::try_from(n).unwrap_or(u32::MAX));
            channel
                .basic_publish(
                    exchange.into(),
                    format!("k{}", n % KEYS).as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    BasicProperties::default(),
                )
                .await
        })
        .buffered(256);
    while let Some(confirm) = confirms.next().await {
        let confirmation = confirm?.await?;
        ensure!(
            matches!(confirmation, Confirmation::Ack(None)),
            "not routed: {confirmation:?}"
        );
    }
    drop(confirms);
    channel.close(200, "filled".into()).await?;
    Ok(())
}
