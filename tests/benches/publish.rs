//! Publishing throughput of conejo's [`Publisher`] against hand-written lapin publishers, on a
//! real broker, every message confirmed.
//!
//! Each run publishes `--messages` JSON messages of 100 bytes (the consumers' benchmark
//! message) to a fresh durable queue, persistent and `mandatory`, then checks broker side
//! that the queue holds them all. Publishers alternate within a run:
//!
//! - **lapin pipelined**: one channel in confirm mode, a window of `--window` messages in
//!   flight (publish, and await the oldest confirm once the window is full) — the way to
//!   publish fast with lapin, and the baseline of every ratio printed;
//! - **lapin each**: publish, await its confirm, publish the next — what most code does;
//! - **conejo**: `--tasks` tasks, each awaiting `Publisher::publish` of its share of the
//!   messages in turn (so at most `--tasks` in flight, as many as the lapin window by
//!   default): conejo's link pipelines them on its connection runtime.
//! - **conejo json**: the same, the body encoded by `Json<Order>` in the publish call.
//!
//! Clocks and the client process's CPU time run from the first publish to the last confirm.
//!
//! ```text
//! cargo bench -p conejo-tests --bench publish
//! cargo bench -p conejo-tests --bench publish -- --messages 100000 --runs 5 --window 256
//! ```
//!
//! The broker is [`amqp_url`] (`AMQP_URL`, default the local guest broker). Every queue made is
//! deleted at the end.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use clap::Parser;
use conejo::{Json, Message, Publisher};
use conejo_tests::{
    Broker, amqp_url,
    bench::{Order, cpu_time, listing_tests, median, positive},
    unique_name,
};
use lapin::{
    BasicProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions},
    types::FieldTable,
};

#[derive(Parser, Debug)]
#[command(about = "Publishing throughput: conejo's Publisher against lapin, confirmed")]
struct Args {
    /// Messages per publisher per run.
    #[arg(long, default_value_t = 50_000)]
    messages: u32,
    /// Runs (publishers alternate within each).
    #[arg(long, default_value_t = 3, value_parser = positive)]
    runs: usize,
    /// Messages in flight: lapin's window, and conejo's publishing tasks.
    #[arg(long, default_value_t = 128, value_parser = positive)]
    window: usize,
    /// Ignored: cargo bench passes it.
    #[arg(long, hide = true)]
    bench: bool,
}

/// One publisher's figures in one run.
#[derive(Debug, Clone, Copy)]
struct Figures {
    rate: f64,
    cpu_us_per_message: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    LapinPipelined,
    LapinEach,
    Conejo,
    ConejoJson,
}

impl Kind {
    const ALL: [Kind; 4] = [
        Kind::LapinPipelined,
        Kind::LapinEach,
        Kind::Conejo,
        Kind::ConejoJson,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::LapinPipelined => "lapin pipelined",
            Kind::LapinEach => "lapin each",
            Kind::Conejo => "conejo",
            Kind::ConejoJson => "conejo json",
        }
    }
}

fn properties() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
}

async fn lapin_publish(queue: &str, messages: u32, window: usize) -> anyhow::Result<()> {
    let connection =
        lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let options = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    let mut in_flight = VecDeque::with_capacity(window);
    for index in 0..messages {
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                options,
                &Order::body(index),
                properties(),
            )
            .await?;
        in_flight.push_back(confirm);
        if in_flight.len() >= window {
            let confirmed = in_flight.pop_front().expect("not empty").await?;
            ensure!(
                confirmed.is_ack() && confirmed.take_message().is_none(),
                "not confirmed"
            );
        }
    }
    for confirm in in_flight {
        let confirmed = confirm.await?;
        ensure!(
            confirmed.is_ack() && confirmed.take_message().is_none(),
            "not confirmed"
        );
    }
    connection.close(200, "done".into()).await?;
    Ok(())
}

async fn conejo_publish(
    publisher: &Publisher,
    queue: &str,
    messages: u32,
    tasks: usize,
    json: bool,
) -> anyhow::Result<()> {
    let tasks = u32::try_from(tasks)
        .unwrap_or(u32::MAX)
        .min(messages.max(1));
    let mut running = Vec::new();
    for task in 0..tasks {
        let (publisher, queue) = (publisher.clone(), queue.to_owned());
        running.push(tokio::spawn(async move {
            let mut index = task;
            while index < messages {
                if json {
                    let order: Order = serde_json::from_slice(&Order::body(index))?;
                    publisher.publish("", &queue, Json(order)).await?;
                } else {
                    publisher
                        .send(
                            Message::to_queue(&queue, Order::body(index))
                                .content_type("application/json"),
                        )
                        .await?;
                }
                index += tasks;
            }
            anyhow::Ok(())
        }));
    }
    for task in running {
        task.await??;
    }
    Ok(())
}

async fn run_one(
    kind: Kind,
    args: &Args,
    broker: &Broker,
    publisher: &Publisher,
) -> anyhow::Result<Figures> {
    let queue = unique_name("bench-publish");
    let channel = broker.open_channel().await?;
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await?;
    channel.close(200, "declared".into()).await?;
    let started = Instant::now();
    let cpu = cpu_time("self");
    match kind {
        Kind::LapinPipelined => lapin_publish(&queue, args.messages, args.window).await?,
        Kind::LapinEach => lapin_publish(&queue, args.messages, 1).await?,
        Kind::Conejo => {
            conejo_publish(publisher, &queue, args.messages, args.window, false).await?;
        }
        Kind::ConejoJson => {
            conejo_publish(publisher, &queue, args.messages, args.window, true).await?;
        }
    }
    let elapsed = started.elapsed();
    let cpu = cpu_time("self")
        .zip(cpu)
        .map(|(after, before)| after - before);
    broker
        .wait_for_count(&queue, args.messages, Duration::from_secs(60))
        .await
        .with_context(|| format!("{}: not every message is on the broker", kind.name()))?;
    broker.delete_queue(&queue).await?;
    let messages = f64::from(args.messages);
    Ok(Figures {
        rate: messages / elapsed.as_secs_f64(),
        cpu_us_per_message: cpu.map(|cpu| cpu.as_secs_f64() * 1e6 / messages),
    })
}

fn main() -> anyhow::Result<()> {
    if listing_tests() {
        return Ok(());
    }
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let broker = Broker::connect().await?;
        let publisher = Publisher::builder(amqp_url())
            .connection_name("bench-publisher")
            .max_in_flight(args.window.max(1))
            .connect()
            .await?;
        let mut figures: Vec<(Kind, Vec<Figures>)> =
            Kind::ALL.iter().map(|&kind| (kind, Vec::new())).collect();
        for run in 1..=args.runs {
            for (kind, seen) in &mut figures {
                let one = run_one(*kind, &args, &broker, &publisher).await?;
                eprintln!(
                    "run {run}/{}: {:<16} {:>9.0} msgs/s  {}",
                    args.runs,
                    kind.name(),
                    one.rate,
                    one.cpu_us_per_message
                        .map_or_else(|| "-".to_owned(), |us| format!("{us:.1} µs CPU/msg"))
                );
                seen.push(one);
            }
        }
        let baseline = median(
            &figures[0]
                .1
                .iter()
                .map(|f| f.rate)
                .collect::<Vec<_>>(),
        );
        println!(
            "\npublishing {} messages of ~100 B, persistent, mandatory, confirmed; window {}; median of {} run(s)",
            args.messages, args.window, args.runs
        );
        println!("{:<16} {:>10} {:>16} {:>14}", "publisher", "msgs/s", "ratio to lapin", "CPU µs/msg");
        for (kind, seen) in &figures {
            let rate = median(&seen.iter().map(|f| f.rate).collect::<Vec<_>>());
            let cpu: Vec<f64> = seen.iter().filter_map(|f| f.cpu_us_per_message).collect();
            println!(
                "{:<16} {:>10.0} {:>16.2} {:>14}",
                kind.name(),
                rate,
                rate / baseline,
                if cpu.is_empty() {
                    "-".to_owned()
                } else {
                    format!("{:.1}", median(&cpu))
                }
            );
        }
        publisher.close().await;
        anyhow::Ok(())
    })
}
