//! Real tests of the fault-injection support: private RabbitMQ nodes (started, stopped, killed
//! and restarted by this process), a three-node cluster, and the TCP proxy.
//!
//! Private nodes cost seconds of CPU on a two-core machine, so `.config/nextest.toml` puts this
//! module in the `heavy` test group (one test at a time). Timings go to stderr (`--no-capture`
//! shows them). The proxy tests go through the proxy to the shared broker ([`amqp_url`]): a
//! stalled or cut connection of our own does not disturb it.

use conejo_tests::lapin::options::QueueDeclareOptions;
use conejo_tests::lapin::types::{AMQPValue, FieldTable, LongString};
use conejo_tests::lapin::{BasicProperties, Connection, ConnectionProperties};
use conejo_tests::{
    Broker, PrivateCluster, PrivateNode, ProxyMode, TcpProxy, amqp_url, init_tracing,
    shared_private_node, unique_name,
};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

/// Publishes `body` as a persistent message (delivery mode 2), confirmed.
async fn publish_persistent(broker: &Broker, queue: &str, body: &[u8]) -> anyhow::Result<()> {
    broker
        .publish_with_properties(
            queue,
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .map(drop)
}

/// Polls until `connection` is no longer connected; returns how long that took.
async fn wait_until_closed(connection: &Connection, timeout: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while connection.status().connected() {
        anyhow::ensure!(
            start.elapsed() < timeout,
            "the connection is still open after {timeout:?}: {:?}",
            connection.status()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(start.elapsed())
}

fn bodies(messages: &[conejo_tests::DrainedMessage]) -> Vec<String> {
    messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect()
}

#[tokio::test]
async fn private_node_keeps_persistent_messages_across_stop_and_kill() -> anyhow::Result<()> {
    init_tracing();
    let started = Instant::now();
    let mut node = PrivateNode::start("durable").await?;
    eprintln!(
        "timing: private node {} ready in {:.2?}",
        node.node_name(),
        started.elapsed()
    );
    assert!(node.is_running());
    assert!(
        node.node_name()
            .starts_with(&format!("conejo-t{}-", std::process::id())),
        "{}",
        node.node_name()
    );
    assert!(node.node_name().ends_with("-durable@localhost"));
    assert_ne!(node.amqp_port(), 5672);
    assert_eq!(
        node.amqp_url(),
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", node.amqp_port())
    );
    assert_eq!(node.running_nodes().await?, vec![node.node_name()]);

    let queue = unique_name("nodes.durable");
    let broker = Broker::connect_to(&node.amqp_url()).await?;
    broker
        .declare_durable_queue_with_args(&queue, FieldTable::default())
        .await?;
    publish_persistent(&broker, &queue, b"persistent-1").await?;
    // A transient message in the same durable queue does not survive a restart: proof that
    // the node really restarted (and that the persistent one came back from disk).
    broker.publish_bytes(&queue, b"transient").await?;
    assert_eq!(broker.message_count(&queue).await?, 2);
    // The node is not the shared broker: the queue does not exist there.
    let shared = Broker::connect().await?;
    assert!(shared.message_count(&queue).await.is_err());
    shared.close().await?;
    // The node-bound CLI sees the queue too.
    let listing = node
        .rabbitmqctl(&["-q", "list_queues", "name", "messages"])
        .await?;
    assert!(listing.contains(&queue), "{listing}");

    // Graceful stop: the client's connection is closed by the broker.
    let stopping = Instant::now();
    node.stop().await?;
    eprintln!("timing: stop in {:.2?}", stopping.elapsed());
    assert!(!node.is_running());
    assert_eq!(node.pid(), None);
    wait_until_closed(broker.connection(), WAIT).await?;
    assert!(
        Broker::connect_to(&node.amqp_url()).await.is_err(),
        "a stopped node must refuse connections"
    );
    assert!(node.stop().await.is_err(), "stopping a stopped node");

    let restarting = Instant::now();
    node.start_again().await?;
    eprintln!(
        "timing: start_again after stop in {:.2?}",
        restarting.elapsed()
    );
    assert!(node.start_again().await.is_err(), "starting a running node");
    let broker = Broker::connect_to(&node.amqp_url()).await?;
    assert_eq!(broker.message_count(&queue).await?, 1);
    publish_persistent(&broker, &queue, b"persistent-2").await?;

    // A crash: SIGKILL of the beam.
    let pid = node.pid().expect("running");
    let killing = Instant::now();
    node.kill().await?;
    eprintln!("timing: kill in {:.2?}", killing.elapsed());
    assert!(!node.is_running());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "beam {pid} still exists"
    );
    wait_until_closed(broker.connection(), WAIT).await?;

    let restarting = Instant::now();
    node.start_again().await?;
    eprintln!(
        "timing: start_again after kill in {:.2?}",
        restarting.elapsed()
    );
    let broker = Broker::connect_to(&node.amqp_url()).await?;
    let drained = broker.drain(&queue).await?;
    assert_eq!(bodies(&drained), ["persistent-1", "persistent-2"]);

    broker.delete_queue(&queue).await?;
    broker.close().await?;

    let dir = node.dir().to_owned();
    assert!(dir.join("home/.erlang.cookie").is_file());
    drop(node);
    if std::env::var_os("CONEJO_KEEP_NODE_DIRS").is_none() {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    Ok(())
}

#[tokio::test]
async fn shared_node_is_started_once_and_can_close_all_connections() -> anyhow::Result<()> {
    init_tracing();
    let started = Instant::now();
    let node = shared_private_node().await?;
    eprintln!(
        "timing: shared node {} ready in {:.2?}",
        node.node_name(),
        started.elapsed()
    );
    let again = shared_private_node().await?;
    assert!(std::ptr::eq(node, again), "a second node was started");

    let first = Broker::connect_to(&node.amqp_url()).await?;
    let second = Broker::connect_to(&node.amqp_url()).await?;
    let closing = Instant::now();
    node.close_all_connections().await?;
    wait_until_closed(first.connection(), WAIT).await?;
    wait_until_closed(second.connection(), WAIT).await?;
    eprintln!(
        "timing: close_all_connections effective in {:.2?}",
        closing.elapsed()
    );
    // The node itself carries on.
    let third = Broker::connect_to(&node.amqp_url()).await?;
    let queue = unique_name("nodes.shared");
    third.declare_queue(&queue).await?;
    third.delete_queue(&queue).await?;
    third.close().await?;

    let err = node
        .rabbitmqctl(&["no_such_command"])
        .await
        .expect_err("an unknown command fails");
    assert!(format!("{err:#}").contains("no_such_command"), "{err:#}");
    Ok(())
}

#[tokio::test]
async fn proxy_passes_traffic_refuses_and_accepts() -> anyhow::Result<()> {
    init_tracing();
    let proxy = TcpProxy::start_for_url(&amqp_url())?;
    let url = proxy.url(&amqp_url())?;
    assert!(url.contains(&proxy.addr().to_string()), "{url}");
    assert_eq!(proxy.connections(), 0);

    let broker = Broker::connect_to(&url).await?;
    proxy.wait_for_connections(1, WAIT).await?;
    let queue = unique_name("nodes.proxy");
    broker.declare_queue(&queue).await?;
    let bodies_in: Vec<Vec<u8>> = (0..500u32).map(|i| i.to_be_bytes().to_vec()).collect();
    broker.publish_many_bytes(&queue, bodies_in).await?;
    assert_eq!(broker.drain(&queue).await?.len(), 500);

    // Refused: a new connection fails at once, the open one carries on.
    proxy.refuse()?;
    let refused = Instant::now();
    let err = Broker::connect_to(&url)
        .await
        .expect_err("the proxy refuses connections");
    eprintln!(
        "timing: connecting through a refusing proxy failed in {:.2?}: {err:#}",
        refused.elapsed()
    );
    assert!(refused.elapsed() < Duration::from_secs(2));
    broker.publish_bytes(&queue, b"still here").await?;
    assert_eq!(proxy.connections(), 1);

    proxy.accept()?;
    let second = Broker::connect_to(&url).await?;
    proxy.wait_for_connections(2, WAIT).await?;
    assert_eq!(second.message_count(&queue).await?, 1);

    second.close().await?;
    broker.delete_queue(&queue).await?;
    broker.close().await?;
    proxy.wait_for_connections(0, WAIT).await?;
    Ok(())
}

#[tokio::test]
async fn proxy_stall_kills_a_heartbeat_1_connection_and_cut_closes_at_once() -> anyhow::Result<()> {
    init_tracing();
    let proxy = TcpProxy::start_for_url(&amqp_url())?;
    let url = format!("{}?heartbeat=1", proxy.url(&amqp_url())?);
    let connect =
        || async { anyhow::Ok(Connection::connect(&url, ConnectionProperties::default()).await?) };

    // Control: through a passing proxy, a 1 s heartbeat keeps the connection alive.
    let connection = connect().await?;
    assert_eq!(connection.configuration().heartbeat(), 1);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(connection.status().connected(), "{:?}", connection.status());

    assert_eq!(proxy.connections(), 1);

    // Stalled: no heartbeat gets through; lapin gives up after two intervals.
    proxy.stall();
    assert_eq!(proxy.mode(), ProxyMode::Stall);
    let took = wait_until_closed(&connection, WAIT).await?;
    eprintln!("timing: heartbeat=1 connection dead {took:.2?} after the stall");
    assert!(
        took >= Duration::from_millis(500),
        "{took:?}: too early for a heartbeat timeout"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    drop(connection);
    // Release the stalled sockets, so the broker sees this connection end now.
    assert_eq!(proxy.cut(), 1);
    proxy.pass();

    // Cut: the connection fails at once, and the proxy still accepts new ones.
    let connection = connect().await?;
    let channel = connection.create_channel().await?;
    channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let cut_at = Instant::now();
    assert_eq!(proxy.cut(), 1);
    assert_eq!(proxy.connections(), 0);
    let took = wait_until_closed(&connection, WAIT).await?;
    eprintln!(
        "timing: connection closed {took:.2?} after a cut (cut() returned in {:.2?})",
        cut_at.elapsed() - took
    );
    assert!(took < Duration::from_millis(500), "{took:?}");
    let again = connect().await?;
    assert!(again.status().connected());
    again.close(200, "bye".into()).await?;
    Ok(())
}

#[tokio::test]
async fn cluster_of_three_forms_and_a_killed_node_rejoins() -> anyhow::Result<()> {
    init_tracing();
    let started = Instant::now();
    let mut cluster = PrivateCluster::start(3).await?;
    eprintln!("timing: 3-node cluster formed in {:.2?}", started.elapsed());
    let mut names: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| n.node_name().to_owned())
        .collect();
    names.sort();
    assert_eq!(cluster.running_nodes().await?, names);
    assert_eq!(
        cluster.nodes()[2].running_nodes().await?,
        names,
        "as the last node to join sees it"
    );
    assert_eq!(cluster.amqp_urls().len(), 3);

    // A quorum queue with members on all three nodes.
    let queue = unique_name("nodes.quorum");
    let broker = Broker::connect_to(&cluster.amqp_urls()[0]).await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    broker.declare_durable_queue_with_args(&queue, args).await?;
    for i in 0..10u8 {
        publish_persistent(&broker, &queue, &[i]).await?;
    }
    broker.close().await?;
    let leader = cluster
        .quorum_leader(&queue)
        .await?
        .ok_or_else(|| anyhow::anyhow!("queue {queue} has no leader"))?;
    eprintln!(
        "quorum queue leader on node {leader} ({})",
        cluster.nodes()[leader].node_name()
    );

    // Kill the leader's node: the others elect a new leader and keep the messages.
    let killed_at = Instant::now();
    cluster.kill(leader).await?;
    assert!(!cluster.nodes()[leader].is_running());
    cluster.wait_for_running_nodes(2, WAIT).await?;
    let new_leader = loop {
        match cluster.quorum_leader(&queue).await? {
            Some(i) if i != leader => break i,
            _ => {
                anyhow::ensure!(
                    killed_at.elapsed() < Duration::from_secs(15),
                    "no new leader 15 s after the kill"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    eprintln!(
        "timing: new leader on node {new_leader} seen {:.2?} after the kill (CLI polls included)",
        killed_at.elapsed()
    );
    let survivor = Broker::connect_to(&cluster.amqp_urls()[new_leader]).await?;
    survivor.wait_for_count(&queue, 10, WAIT).await?;
    survivor.close().await?;

    // Back to three.
    let restarting = Instant::now();
    cluster.start_again(leader).await?;
    eprintln!(
        "timing: killed node restarted and rejoined in {:.2?}",
        restarting.elapsed()
    );
    assert_eq!(cluster.running_nodes().await?, names);
    assert_eq!(
        cluster.nodes()[leader].running_nodes().await?,
        names,
        "as the restarted node sees it"
    );
    let broker = Broker::connect_to(&cluster.amqp_urls()[leader]).await?;
    assert_eq!(broker.message_count(&queue).await?, 10);
    broker.delete_queue(&queue).await?;
    broker.close().await?;

    assert!(cluster.kill(3).await.is_err(), "there is no node 3");
    Ok(())
}
