//! Partitioned queues behind RabbitMQ's consistent-hash exchange ([`conejo::Partitions`]), on
//! private nodes: a startup that names the missing plugin (a node without it), and one key's
//! messages handled in order by three replicas (processes, `conejo-fixture --partitions`),
//! each connected to its own node of a three-node cluster with the plugin, while one of
//! them is killed and restarted (heavy).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use conejo::{Conejo, Context, Error, HandlerError, Partitions, handler_fn};
use conejo_tests::{Broker, Fixture, NodeOptions, PrivateCluster, PrivateNode, unique_name, until};
use futures::{StreamExt, stream};
use lapin::{
    BasicProperties, Confirmation,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};

/// Partitions of the order test.
const PARTITIONS: u16 = 6;
/// Replicas of the order test.
const REPLICAS: usize = 3;
/// Of the order test's messages, those whose sequence number this divides take 250 ms.
const SLOW_EVERY: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_names_the_plugin_when_the_consistent_hash_exchange_is_not_enabled()
-> anyhow::Result<()> {
    let node = PrivateNode::start("no-hash-plugin").await?;
    let started = Instant::now();
    let service = Conejo::builder(node.amqp_url())
        .partitioned(
            Partitions::new(&unique_name("orders"), 4),
            handler_fn(|_: Vec<u8>, _: Context| async { Ok::<(), HandlerError>(()) }),
            conejo::QueueConfig::new().poison_limit(None),
        )
        .build()?;
    let error = tokio::time::timeout(Duration::from_secs(30), service.run())
        .await
        .context("the service kept reconnecting into the refusal")?
        .expect_err("started without the plugin");
    assert!(
        matches!(error, Error::UnknownExchangeType { .. }),
        "{error:?}"
    );
    let text = error.to_string();
    assert!(
        text.contains("x-consistent-hash")
            && text.contains("rabbitmq-plugins enable rabbitmq_consistent_hash_exchange"),
        "{text}"
    );
    eprintln!("refused after {:?}: {text}", started.elapsed());
    Ok(())
}

/// What a replica reported: (replica, started?, message id, queue, attempt, µs).
#[derive(Debug, Clone)]
struct Event {
    replica: usize,
    started: bool,
    id: String,
    queue: String,
    attempt: u32,
    at: u128,
}

type Events = Arc<Mutex<Vec<Event>>>;

/// One replica: `conejo-fixture --partitions`, replica `index` of [`REPLICAS`].
struct Replica;

impl Replica {
    fn spawn(index: usize, url: &str, exchange: &str, events: &Events) -> anyhow::Result<Fixture> {
        let args = format!(
            "--partitions {exchange}:{PARTITIONS} --replica {index}/{REPLICAS} --balance-ms 300 \
             --connection-name replica-{index} --handler-ms 2 --jitter-ms 4 --concurrency 8 \
             --prefetch 32 --poison-limit 0 --fail-every 97 --slow-every {SLOW_EVERY} \
             --slow-ms 250"
        );
        let args: Vec<String> = args.split_whitespace().map(str::to_owned).collect();
        let events = Arc::clone(events);
        Fixture::spawn(
            env!("CARGO_BIN_EXE_conejo-fixture"),
            &args,
            url,
            move |line| {
                if let Some(event) = parse(index, line) {
                    events.lock().unwrap().push(event);
                }
            },
        )
    }
}

/// `started <id> <queue> <attempt> <µs>` or `finished <id> <queue> <µs>`.
fn parse(replica: usize, line: &str) -> Option<Event> {
    let mut words = line.split(' ');
    let started = match words.next()? {
        "started" => true,
        "finished" => false,
        _ => return None,
    };
    let (id, queue) = (words.next()?.to_owned(), words.next()?.to_owned());
    let attempt = if started {
        words.next()?.parse().ok()?
    } else {
        0
    };
    let at = words.next()?.parse().ok()?;
    Some(Event {
        replica,
        started,
        id,
        queue,
        attempt,
        at,
    })
}

/// Messages of the order test, and keys (`CONEJO_PARTITION_MESSAGES`, `…_KEYS` for a longer
/// run: the 100,000 over 1,000 keys).
fn load() -> (usize, usize) {
    let var = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    (
        var("CONEJO_PARTITION_MESSAGES", 30_000),
        var("CONEJO_PARTITION_KEYS", 300),
    )
}

/// Publishes the messages numbered `range`, round robin over `keys` keys: routing key
/// `k<key>`, message id `k<key>:<seq>`, `seq` counting from 0 per key. On one channel, one
/// after the other, so the broker has them in this order.
async fn publish(
    broker: &Broker,
    exchange: &str,
    keys: usize,
    range: std::ops::Range<usize>,
) -> anyhow::Result<()> {
    let channel = broker.connection().create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    // `buffered` polls each publish first in order, and lapin queues a publish's frames
    // on its first poll: the channel carries them in this order.
    let channel = &channel;
    let mut confirms = stream::iter(range)
        .map(|n| async move {
            let (key, seq) = (n % keys, n / keys);
            let properties =
                BasicProperties::default().with_message_id(format!("k{key}:{seq}").into());
            channel
                .basic_publish(
                    exchange.into(),
                    format!("k{key}").as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    n.to_string().as_bytes(),
                    properties,
                )
                .await
        })
        .buffered(256);
    while let Some(confirm) = confirms.next().await {
        let confirmation = confirm?.await?;
        anyhow::ensure!(
            matches!(confirmation, Confirmation::Ack(None)),
            "not routed: {confirmation:?}"
        );
    }
    drop(confirms);
    channel.close(200, "published".into()).await?;
    Ok(())
}

fn finished_ids(events: &Events) -> HashSet<String> {
    events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| !e.started)
        .map(|e| e.id.clone())
        .collect()
}

/// Replica `replica` started a message on each of its own partitions after `since` (µs).
fn home_again(events: &Events, replica: usize, since: u128) -> bool {
    let events = events.lock().unwrap();
    (0..PARTITIONS)
        .filter(|p| usize::from(*p) % REPLICAS == replica)
        .all(|p| {
            let suffix = format!(".{p}");
            events.iter().any(|e| {
                e.replica == replica && e.started && e.at > since && e.queue.ends_with(&suffix)
            })
        })
}

/// Deliveries replica `replica` started before `before` (µs) and had not finished by then.
fn running(events: &Events, replica: usize, before: u128) -> usize {
    let events = events.lock().unwrap();
    let of = |started: bool| -> HashSet<&str> {
        events
            .iter()
            .filter(|e| e.replica == replica && e.started == started && e.at < before)
            .map(|e| e.id.as_str())
            .collect()
    };
    of(true).difference(&of(false)).count()
}

/// Whether replica `replica` has started a slow message and not finished it.
fn running_slow(events: &Events, replica: usize) -> bool {
    let events = events.lock().unwrap();
    let slow = |e: &&Event| {
        e.replica == replica
            && e.id
                .rsplit(':')
                .next()
                .and_then(|seq| seq.parse::<usize>().ok())
                .is_some_and(|seq| seq % SLOW_EVERY == 0)
    };
    let finished: HashSet<&str> = events
        .iter()
        .filter(slow)
        .filter(|e| !e.started)
        .map(|e| e.id.as_str())
        .collect();
    events
        .iter()
        .filter(slow)
        .any(|e| e.started && !finished.contains(e.id.as_str()))
}

/// Checks that no two runs of one key's messages overlapped, across the replicas; returns
/// how many runs it checked. A run lasts from a `started` line to the next line of the same
/// message in the same replica (its `finished`, or the `started` of its retry); a run that
/// the kill cut short (replica 1, started before `killed_at`, never ended) ends at the kill.
fn never_two_at_once(events: &[Event], killed_at: u128) -> usize {
    let mut runs: HashMap<&str, Vec<(u128, u128, usize, &str)>> = HashMap::new();
    for (i, e) in events.iter().enumerate().filter(|(_, e)| e.started) {
        let end = events[i + 1..]
            .iter()
            .find(|later| later.replica == e.replica && later.id == e.id)
            .map(|later| later.at)
            .or((e.replica == 1 && e.at < killed_at).then_some(killed_at))
            .unwrap_or_else(|| panic!("{} never ended on replica {}", e.id, e.replica));
        let key = e.id.split(':').next().unwrap_or_default();
        runs.entry(key)
            .or_default()
            .push((e.at, end, e.replica, e.id.as_str()));
    }
    let mut checked = 0;
    for (key, mut runs) in runs {
        runs.sort_unstable();
        for pair in runs.windows(2) {
            let ((_, end, replica, id), (start, _, next_replica, next_id)) = (pair[0], pair[1]);
            assert!(
                start >= end,
                "key {key}: {next_id} started on replica {next_replica} {} µs before {id} \
                 ended on replica {replica}",
                end - start
            );
            checked += 1;
        }
    }
    checked
}

fn now_micros() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_micros())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_stays_in_order_across_replicas_while_one_is_killed_and_restarted()
-> anyhow::Result<()> {
    let (messages, keys) = load();
    let cluster = PrivateCluster::start_with_options(
        REPLICAS,
        &NodeOptions {
            plugins: vec!["rabbitmq_consistent_hash_exchange".to_owned()],
            ..NodeOptions::default()
        },
    )
    .await?;
    // Replica i connects to node i first: the replicas and the partitions' consumers are
    // spread over the cluster, and most deliveries cross from one node to another.
    let urls: Vec<String> = (0..REPLICAS).map(|i| cluster.replica_url(i)).collect();
    let exchange = unique_name("orders");
    let partitions = Partitions::new(&exchange, PARTITIONS);
    let events: Events = Arc::default();
    let mut replicas: Vec<Option<Fixture>> = (0..REPLICAS)
        .map(|i| Replica::spawn(i, &urls[i], &exchange, &events).map(Some))
        .collect::<anyhow::Result<_>>()?;
    let broker = Broker::connect_to(&cluster.amqp_urls()[0]).await?;
    for queue in partitions.queue_names() {
        broker
            .wait_for_consumer_count(&queue, REPLICAS as u32, Duration::from_secs(60))
            .await?;
    }
    // The stream is published in order while the replicas consume it; one of them dies
    // with deliveries in flight and comes back.
    let broker = Arc::new(broker);
    let started = Instant::now();
    let producer = tokio::spawn({
        let (broker, exchange) = (Arc::clone(&broker), exchange.clone());
        async move { publish(&broker, &exchange, keys, 0..messages).await }
    });
    until("a third handled", Duration::from_secs(120), || {
        finished_ids(&events).len() >= messages / 3
    })
    .await?;
    // Killed while it runs a slow message (250 ms): deliveries in flight for sure.
    until(
        "replica 1 runs a slow message",
        Duration::from_secs(60),
        || running_slow(&events, 1),
    )
    .await?;
    replicas[1].take().context("replica 1")?.kill().await?;
    let killed_at = now_micros();
    let handled_at_kill = finished_ids(&events).len();
    replicas[1] = Some(Replica::spawn(1, &urls[1], &exchange, &events)?);
    anyhow::ensure!(handled_at_kill < messages, "the kill came after the stream");
    producer.await??;
    until("every message handled", Duration::from_secs(300), || {
        finished_ids(&events).len() == messages
    })
    .await?;
    let elapsed = started.elapsed();

    // The restarted replica gets its own partitions back: more messages until it handles
    // some on each (the others hand a partition back while they are busy with it).
    let mut extra = messages;
    let back = Instant::now();
    while !home_again(&events, 1, killed_at) {
        anyhow::ensure!(
            back.elapsed() < Duration::from_secs(60),
            "replica 1 never got its partitions back"
        );
        publish(&broker, &exchange, keys, extra..extra + keys * 2).await?;
        extra += keys * 2;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    until(
        "the extra messages handled",
        Duration::from_secs(60),
        || finished_ids(&events).len() == extra,
    )
    .await?;
    let rebalanced = back.elapsed();

    for replica in replicas.into_iter().flatten() {
        replica.terminate().await?;
    }
    // What the killed replica had started and not finished (its lines all read by now).
    let in_flight_at_kill = running(&events, 1, killed_at);

    // Per key, in the replicas' own clock: a message is started for the first time only
    // once the key's previous message finished (anywhere), so no key ever ran out of order
    // or two at once across the replicas — through the kill, the retries in place and the
    // hand-backs. And each key stays on one partition.
    let mut events = events.lock().unwrap().clone();
    events.sort_by_key(|e| e.at);
    let mut first_start: HashMap<&str, u128> = HashMap::new();
    let mut first_finish: HashMap<&str, u128> = HashMap::new();
    let mut partition_of: HashMap<&str, &str> = HashMap::new();
    let mut finishes = 0usize;
    let mut retries = 0usize;
    let mut handled_by: BTreeMap<usize, usize> = BTreeMap::new();
    for e in &events {
        let key = e.id.split(':').next().unwrap_or_default();
        let queue = partition_of.entry(key).or_insert(&e.queue);
        assert_eq!(*queue, e.queue, "key {key} on two partitions");
        if e.started {
            first_start.entry(&e.id).or_insert(e.at);
            retries += usize::from(e.attempt > 1);
        } else {
            first_finish.entry(&e.id).or_insert(e.at);
            finishes += 1;
            *handled_by.entry(e.replica).or_default() += 1;
        }
    }
    let mut checked = 0;
    for n in keys..extra {
        let (key, seq) = (n % keys, n / keys);
        let id = format!("k{key}:{seq}");
        let previous = format!("k{key}:{}", seq - 1);
        let start = first_start[id.as_str()];
        let before = first_finish[previous.as_str()];
        assert!(
            start >= before,
            "{id} started {} µs before {previous} finished: {:#?}",
            before - start,
            events
                .iter()
                .filter(|e| e.id == id || e.id == previous)
                .collect::<Vec<_>>()
        );
        checked += 1;
    }
    let overlaps_checked = never_two_at_once(&events, killed_at);
    let duplicates = finishes - extra;
    eprintln!(
        "{messages} messages over {keys} keys through {PARTITIONS} partitions and {REPLICAS} \
         replicas in {elapsed:?} ({:.0} msgs/s); replica 1 killed after {handled_at_kill} \
         handled, running {in_flight_at_kill}; {duplicates} handled twice; {retries} retried in place; its partitions \
         back {rebalanced:?} after the stream; {extra} in all, handled by replica {handled_by:?}; \
         {checked} successions and {overlaps_checked} runs checked",
        messages as f64 / elapsed.as_secs_f64()
    );
    // At most what the killed replica held unacked: its window on each partition.
    assert!(
        duplicates <= 32 * usize::from(PARTITIONS),
        "{duplicates} duplicates"
    );
    assert!(retries > 0, "no retry happened");
    assert!(in_flight_at_kill > 0, "nothing was running at the kill");
    for queue in partitions.queue_names() {
        assert_eq!(
            broker.message_count(&queue).await?,
            0,
            "{queue} not drained"
        );
    }
    Arc::into_inner(broker)
        .context("the broker is shared")?
        .close()
        .await?;
    Ok(())
}
