//! Replicas of one service on one queue, as separate processes (`conejo-fixture`): a single
//! active consumer handing over when the active replica is killed or stops, and consumer
//! priorities. Against the shared broker — the replicas are killed, never the broker — and,
//! for the hand-over of a quorum queue's role between replicas on different nodes, a private
//! three-node cluster (heavy: `.config/nextest.toml`).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use conejo::{Conejo, Context, Handler, HandlerError, QueueConfig};
use conejo_tests::{
    Broker, Fixture, PrivateCluster, PrivateNode, Scenario, amqp_url, unique_name, until,
};
use lapin::types::{AMQPValue, FieldTable};
use tokio::sync::Semaphore;

/// What a replica reported, in the order the test read it: (replica, event, message id, when).
type Events = Arc<Mutex<Vec<(usize, &'static str, String, Instant)>>>;

/// One replica: a `conejo-fixture` process consuming `queue`.
struct Replica;

impl Replica {
    fn spawn(
        index: usize,
        queue: &str,
        extra: &[&str],
        events: &Events,
    ) -> anyhow::Result<Fixture> {
        Self::spawn_on(&amqp_url(), index, queue, extra, events)
    }

    fn spawn_on(
        url: &str,
        index: usize,
        queue: &str,
        extra: &[&str],
        events: &Events,
    ) -> anyhow::Result<Fixture> {
        let mut args: Vec<String> = ["--queue", queue, "--single-active"]
            .iter()
            .map(|a| (*a).to_owned())
            .collect();
        args.extend(["--connection-name".to_owned(), format!("replica-{index}")]);
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let events = Arc::clone(events);
        Fixture::spawn(
            env!("CARGO_BIN_EXE_conejo-fixture"),
            &args,
            url,
            move |line| {
                let event = if let Some(id) = line.strip_prefix("started ") {
                    ("started", id)
                } else if let Some(id) = line.strip_prefix("finished ") {
                    ("finished", id)
                } else {
                    return;
                };
                events
                    .lock()
                    .unwrap()
                    .push((index, event.0, event.1.to_owned(), Instant::now()));
            },
        )
    }
}

fn count(events: &Events, replica: usize, kind: &str) -> usize {
    events
        .lock()
        .unwrap()
        .iter()
        .filter(|(r, k, _, _)| *r == replica && *k == kind)
        .count()
}

/// A queue with a single active consumer, holding `n` messages with ids `0`…`n-1`.
async fn single_active_queue(prefix: &str, n: usize) -> anyhow::Result<Scenario> {
    let scenario = Scenario::undeclared(prefix).await?;
    fill_single_active(&scenario, n, false).await?;
    Ok(scenario)
}

/// Declares the scenario's queue with a single active consumer — a quorum queue when
/// `quorum` — and publishes `n` messages with ids `0`…`n-1`.
async fn fill_single_active(scenario: &Scenario, n: usize, quorum: bool) -> anyhow::Result<()> {
    let mut arguments = FieldTable::default();
    arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    if quorum {
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        scenario
            .broker
            .declare_durable_queue_with_args(&scenario.queue, arguments)
            .await?;
    } else {
        scenario
            .broker
            .declare_queue_with_args(&scenario.queue, arguments)
            .await?;
    }
    for id in 0..n {
        scenario
            .broker
            .publish_with_properties(
                &scenario.queue,
                id.to_string().as_bytes(),
                lapin::BasicProperties::default().with_message_id(id.to_string().into()),
            )
            .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_active_consumer_hands_over_when_the_active_replica_is_killed()
-> anyhow::Result<()> {
    let scenario = single_active_queue("sac-kill", 300).await?;
    let url = amqp_url();
    hand_over_after_a_kill(&scenario, 300, [&url, &url], &[], None).await?;
    scenario.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_quorum_queues_active_role_moves_to_a_replica_on_another_node_when_the_active_one_is_killed()
-> anyhow::Result<()> {
    let cluster = PrivateCluster::start(3).await?;
    // The queue's leader on node 2; the replicas connected to nodes 0 and 1.
    let scenario = Scenario {
        broker: Broker::connect_to(&cluster.amqp_urls()[2]).await?,
        queue: unique_name("sac-cluster"),
    };
    // More messages: counting the consumers with rabbitmqctl takes a second or two, while
    // the first replica goes on.
    fill_single_active(&scenario, 1_000, true).await?;
    let (first, second) = (cluster.replica_url(0), cluster.replica_url(1));
    let node = &cluster.nodes()[2];
    hand_over_after_a_kill(
        &scenario,
        1_000,
        [&first, &second],
        &["--quorum"],
        Some(node),
    )
    .await?;
    scenario.broker.close().await
}

/// Two replicas on the scenario's queue of `n` messages, the first connected to
/// `urls[0]`, the second to `urls[1]`: the second waits while the first is active; the
/// first is SIGKILLed mid-stream; the second takes over and every message is handled, twice
/// at most what the killed one held unacked. The consumers are counted by the broker's
/// `queue.declare-ok` — or, for a quorum queue (whose count is of the active consumer only),
/// by `rabbitmqctl list_consumers` on `node`.
async fn hand_over_after_a_kill(
    scenario: &Scenario,
    n: usize,
    urls: [&str; 2],
    extra: &[&str],
    node: Option<&PrivateNode>,
) -> anyhow::Result<()> {
    let events: Events = Arc::default();
    let mut replica = vec![
        "--handler-ms",
        "10",
        "--concurrency",
        "4",
        "--prefetch",
        "10",
    ];
    replica.extend_from_slice(extra);
    let first = Replica::spawn_on(urls[0], 0, &scenario.queue, &replica, &events)?;
    until(
        "the first replica is active",
        Duration::from_secs(30),
        || count(&events, 0, "finished") >= 40,
    )
    .await?;
    // Registered second, it waits: the broker delivers to the first only.
    let second = Replica::spawn_on(urls[1], 1, &scenario.queue, &replica, &events)?;
    match node {
        None => wait_consumers(scenario, 2).await?,
        Some(node) => {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let listed = node
                    .rabbitmqctl(&["-q", "list_consumers", "queue_name"])
                    .await?;
                let consumers = listed
                    .lines()
                    .filter(|line| line.trim() == scenario.queue)
                    .count();
                if consumers == 2 {
                    break;
                }
                anyhow::ensure!(Instant::now() < deadline, "{consumers} consumers listed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let waiting_since = Instant::now();
    while waiting_since.elapsed() < Duration::from_millis(200) && count(&events, 0, "finished") < n
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        count(&events, 1, "started"),
        0,
        "the waiting replica got deliveries"
    );
    let handled_before = count(&events, 0, "finished");
    anyhow::ensure!(
        handled_before < n,
        "the first replica finished before the kill"
    );
    let killed = Instant::now();
    first.kill().await?;
    until(
        "the second replica takes over",
        Duration::from_secs(30),
        || count(&events, 1, "started") > 0,
    )
    .await?;
    let took_over = killed.elapsed();
    let finished_ids = || -> std::collections::BTreeSet<String> {
        events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.1 == "finished")
            .map(|e| e.2.clone())
            .collect()
    };
    until("every message handled", Duration::from_secs(60), || {
        finished_ids().len() == n
    })
    .await?;
    let finished = finished_ids();
    assert_eq!(finished.len(), n);
    let total = count(&events, 0, "finished") + count(&events, 1, "finished");
    let duplicates = total - n;
    eprintln!(
        "killed after {handled_before} handled; the waiting replica consumed {took_over:?} \
         later; {duplicates} duplicates"
    );
    // At most the killed replica's unacked window came back.
    assert!(duplicates <= 10, "{duplicates} duplicates");
    second.terminate().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_active_consumer_hands_over_in_order_when_the_active_replica_stops()
-> anyhow::Result<()> {
    const N: usize = 200;
    let scenario = single_active_queue("sac-stop", N).await?;
    let events: Events = Arc::default();
    // One at a time: the queue's order is the handled order, across both replicas. No
    // redelivery counting: on a classic queue it republishes what the hand-over gives back
    // to the back of the queue.
    let replica = [
        "--handler-ms",
        "20",
        "--concurrency",
        "1",
        "--prefetch",
        "10",
        "--poison-limit",
        "0",
    ];
    let first = Replica::spawn(0, &scenario.queue, &replica, &events)?;
    until(
        "the first replica is active",
        Duration::from_secs(30),
        || count(&events, 0, "finished") >= 20,
    )
    .await?;
    let second = Replica::spawn(1, &scenario.queue, &replica, &events)?;
    wait_consumers(&scenario, 2).await?;
    let stopped = Instant::now();
    first.terminate().await?;
    let handed_over = stopped.elapsed();
    until("every message handled", Duration::from_secs(60), || {
        count(&events, 0, "finished") + count(&events, 1, "finished") >= N
    })
    .await?;
    let order: Vec<(usize, usize)> = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.1 == "finished")
        .map(|e| (e.0, e.2.parse().expect("a numeric id")))
        .collect();
    let ids: Vec<usize> = order.iter().map(|&(_, id)| id).collect();
    assert_eq!(
        ids,
        (0..N).collect::<Vec<_>>(),
        "handled once each, in queue order, across the hand-over"
    );
    let by_first = order.iter().filter(|&&(r, _)| r == 0).count();
    eprintln!(
        "the first replica handled {by_first}, stopped in {handed_over:?}; the second the \
         other {} in order, no duplicate",
        N - by_first
    );
    assert!((20..N).contains(&by_first));
    second.terminate().await?;
    scenario.cleanup().await
}

/// Waits until the broker counts `n` consumers on the scenario's queue.
async fn wait_consumers(scenario: &Scenario, n: u32) -> anyhow::Result<()> {
    scenario
        .broker
        .wait_for_consumer_count(&scenario.queue, n, Duration::from_secs(30))
        .await
}

/// Holds each delivery until the test lets it go; counts what it handled.
#[derive(Clone)]
struct Held {
    gate: Arc<Semaphore>,
    handled: Arc<Mutex<Vec<String>>>,
}

impl Handler for Held {
    type Message = String;
    async fn handle(&self, body: String, _: &Context) -> Result<(), HandlerError> {
        self.gate.acquire().await.expect("open").forget();
        self.handled.lock().unwrap().push(body);
        Ok(())
    }
}

#[tokio::test]
async fn the_higher_priority_consumer_gets_the_messages_while_it_has_room() -> anyhow::Result<()> {
    let scenario = Scenario::new("priority").await?;
    let queue = &scenario.queue;
    let consumer = |priority: i32| {
        Held {
            gate: Arc::new(Semaphore::new(0)),
            handled: Arc::default(),
        }
        .with_priority(priority)
    };
    let (high, high_config) = consumer(10);
    let (low, low_config) = consumer(0);
    let high_service = scenario.spawn(
        Conejo::builder(amqp_url())
            .connection_name(unique_name("high"))
            .queue_with(queue, high.clone(), high_config),
    )?;
    let low_service = scenario.spawn(
        Conejo::builder(amqp_url())
            .connection_name(unique_name("low"))
            .queue_with(queue, low.clone(), low_config),
    )?;
    wait_consumers(&scenario, 2).await?;
    // One message at a time, each handled before the next: the high consumer has room
    // every time, and gets them all.
    for n in 0..20 {
        scenario
            .broker
            .publish_bytes(queue, format!("a{n}").as_bytes())
            .await?;
        high.gate.add_permits(1);
        until(
            "handled by the high consumer",
            Duration::from_secs(10),
            || high.handled.lock().unwrap().len() == n + 1,
        )
        .await?;
    }
    assert!(
        low.handled.lock().unwrap().is_empty(),
        "the low consumer got one with room above"
    );
    // The high consumer's window (4) full and held: the rest go to the low one.
    for n in 0..10 {
        scenario
            .broker
            .publish_bytes(queue, format!("b{n}").as_bytes())
            .await?;
    }
    low.gate.add_permits(10);
    until(
        "the overflow handled by the low consumer",
        Duration::from_secs(10),
        || low.handled.lock().unwrap().len() == 6,
    )
    .await?;
    high.gate.add_permits(10);
    until(
        "the high consumer's window handled",
        Duration::from_secs(10),
        || high.handled.lock().unwrap().len() == 24,
    )
    .await?;
    eprintln!(
        "high: {:?}; low: {:?}",
        high.handled.lock().unwrap().len(),
        low.handled.lock().unwrap()
    );
    high_service.stop().await??;
    low_service.stop().await??;
    scenario.cleanup().await
}

impl Held {
    /// This handler with a queue configuration of the given consumer priority, a window of
    /// four.
    fn with_priority(self, priority: i32) -> (Held, QueueConfig) {
        (
            self,
            conejo_tests::queue_config()
                .concurrency(4)
                .prefetch(4)
                .consumer_priority(priority),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_active_consumer_is_told_from_the_waiting_one() -> anyhow::Result<()> {
    let scenario = single_active_queue("sac-role", 0).await?;
    let queue = &scenario.queue;
    let config = || {
        conejo_tests::queue_config()
            .passive()
            .single_active_consumer()
            .concurrency(2)
    };
    let replica = |name: &str, held: &Held| {
        Conejo::builder(amqp_url())
            .connection_name(unique_name(name))
            .queue_with(queue, held.clone(), config())
    };
    let (first, second) = (Held::open(), Held::open());
    let first_service = scenario.spawn(replica("first", &first))?;
    wait_consumers(&scenario, 1).await?;
    let second_service = scenario.spawn(replica("second", &second))?;
    wait_consumers(&scenario, 2).await?;
    // Nothing delivered yet: neither can tell.
    assert_eq!(
        first_service.stats().queue(queue).unwrap().active,
        Some(false)
    );
    for n in 0..10 {
        scenario
            .broker
            .publish_bytes(queue, format!("a{n}").as_bytes())
            .await?;
    }
    first_service
        .wait_for(queue, Duration::from_secs(10), |s| s.acked == 10)
        .await?;
    let role =
        |service: &conejo_tests::RunningService| service.stats().queue(queue).unwrap().active;
    assert_eq!(role(&first_service), Some(true));
    assert_eq!(role(&second_service), Some(false), "the waiting one");
    first_service.stop().await??;
    for n in 0..10 {
        scenario
            .broker
            .publish_bytes(queue, format!("b{n}").as_bytes())
            .await?;
    }
    second_service
        .wait_for(queue, Duration::from_secs(10), |s| s.acked == 10)
        .await?;
    assert_eq!(role(&second_service), Some(true), "the role moved on");
    assert!(
        second
            .handled
            .lock()
            .unwrap()
            .iter()
            .all(|b| b.starts_with('b'))
    );
    second_service.stop().await??;
    scenario.cleanup().await
}

impl Held {
    /// A handler that lets every delivery through.
    fn open() -> Held {
        Held {
            gate: Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)),
            handled: Arc::default(),
        }
    }
}
