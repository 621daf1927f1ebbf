//! A cluster of private nodes: formed, then its members killed, stopped and started again.

use anyhow::{Context, anyhow, bail, ensure};
use std::time::{Duration, Instant};

use super::files::random_cookie;
use super::{NodeOptions, POLL_PAUSE, PrivateNode};

/// Upper bound for a cluster to list all its running members after a join or a restart.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);

/// A cluster of [`PrivateNode`]s started by this process (all with the same cookie).
///
/// [`PrivateCluster::start`] boots the nodes in parallel, then joins the second and later ones
/// to the first one (`stop_app`, `reset`, `join_cluster`, `start_app`), and waits until the
/// first one lists all of them as running. Node `i` can then be killed, stopped and started
/// again; it rejoins by itself as long as another member runs. Dropping the cluster kills every
/// node.
#[derive(Debug)]
pub struct PrivateCluster {
    nodes: Vec<PrivateNode>,
}

impl PrivateCluster {
    /// Starts `size` nodes (named `conejo-t<pid>-<n>-k<i>@localhost`) and forms one cluster of
    /// them; fails if they are not all running members within [`NODE_START_TIMEOUT`](super::NODE_START_TIMEOUT) plus 30 s
    /// after the joins.
    pub async fn start(size: usize) -> anyhow::Result<PrivateCluster> {
        Self::start_with_options(size, &NodeOptions::default()).await
    }

    /// As [`start`](Self::start), every node with `options` (plugins, configuration).
    pub async fn start_with_options(
        size: usize,
        options: &NodeOptions,
    ) -> anyhow::Result<PrivateCluster> {
        ensure!(size > 0, "a cluster needs at least one node");
        let cookie = random_cookie();
        let hints: Vec<String> = (0..size).map(|i| format!("k{i}")).collect();
        let nodes = futures::future::try_join_all(
            hints
                .iter()
                .map(|hint| PrivateNode::start_with_cookie(hint, &cookie, options)),
        )
        .await?;
        let mut cluster = PrivateCluster { nodes };
        match cluster.form().await {
            Ok(()) => Ok(cluster),
            Err(err) => {
                let dirs: Vec<String> = cluster
                    .nodes
                    .iter_mut()
                    .map(|node| {
                        node.keep_for_inspection(&err);
                        node.dir.display().to_string()
                    })
                    .collect();
                Err(err.context(format!(
                    "failed to form a cluster of {size}; the nodes' files are kept in {}",
                    dirs.join(", ")
                )))
            }
        }
    }

    /// Joins every node but the first to the first, and waits until all are running members.
    async fn form(&self) -> anyhow::Result<()> {
        let Some((seed, others)) = self.nodes.split_first() else {
            bail!("no nodes started");
        };
        for node in others {
            for step in [
                &["stop_app"][..],
                &["reset"],
                &["join_cluster", seed.node_name()],
                &["start_app"],
            ] {
                node.rabbitmqctl(step).await.with_context(|| {
                    format!(
                        "joining {} to {}: `{}` failed{}",
                        node.node_name(),
                        seed.node_name(),
                        step.join(" "),
                        node.diagnostics()
                    )
                })?;
            }
        }
        self.wait_for_running_nodes(self.nodes.len(), CLUSTER_TIMEOUT)
            .await
            .map(drop)
    }

    /// The nodes, in the order they were started (node 0 is the one the others joined).
    pub fn nodes(&self) -> &[PrivateNode] {
        &self.nodes
    }

    /// Every node's [`PrivateNode::amqp_url`], in node order.
    pub fn amqp_urls(&self) -> Vec<String> {
        self.nodes.iter().map(PrivateNode::amqp_url).collect()
    }

    /// The address list replica `index` of a service is given: every node, starting at node
    /// `index` (modulo the size), comma-separated — so that replicas' connections spread
    /// over the nodes and each fails over to the others.
    pub fn replica_url(&self, index: usize) -> String {
        let urls = self.amqp_urls();
        (0..urls.len())
            .map(|k| urls[(index + k) % urls.len()].as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the node named `node_name`, if it is one of this cluster's.
    pub fn index_of(&self, node_name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.node_name() == node_name)
    }

    fn node_mut(&mut self, i: usize) -> anyhow::Result<&mut PrivateNode> {
        let size = self.nodes.len();
        self.nodes
            .get_mut(i)
            .ok_or_else(|| anyhow!("no node {i} in a cluster of {size}"))
    }

    /// [`PrivateNode::kill`] of node `i`.
    pub async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        self.node_mut(i)?.kill().await
    }

    /// [`PrivateNode::stop`] of node `i`.
    pub async fn stop(&mut self, i: usize) -> anyhow::Result<()> {
        self.node_mut(i)?.stop().await
    }

    /// [`PrivateNode::start_again`] of node `i`, then waits (at most 30 s) until every member
    /// whose process runs is listed as running, i.e. node `i` has rejoined. Another member must
    /// be running (see [`PrivateNode::start_again`]).
    pub async fn start_again(&mut self, i: usize) -> anyhow::Result<()> {
        self.node_mut(i)?.start_again().await?;
        let running = self.nodes.iter().filter(|n| n.is_running()).count();
        self.wait_for_running_nodes(running, CLUSTER_TIMEOUT)
            .await
            .map(drop)
    }

    /// The running members as the first node whose process runs sees them (sorted).
    pub async fn running_nodes(&self) -> anyhow::Result<Vec<String>> {
        self.first_running()?.running_nodes().await
    }

    /// Polls [`PrivateCluster::running_nodes`] until it lists `expected` nodes, and returns
    /// them; errors after `timeout` with the last listing (or error) seen.
    pub async fn wait_for_running_nodes(
        &self,
        expected: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.running_nodes().await {
                Ok(nodes) if nodes.len() == expected => return Ok(nodes),
                Ok(nodes) => format!("last seen {nodes:?}"),
                Err(err) => format!("last check failed: {err:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "the cluster did not list {expected} running nodes within {timeout:?}; {last}"
                );
            }
            tokio::time::sleep(POLL_PAUSE).await;
        }
    }

    /// The index of the node hosting the leader of the quorum queue `queue` (vhost `/`), as the
    /// first running node sees it; `None` while there is no known leader (or it is not one of
    /// this cluster's nodes).
    pub async fn quorum_leader(&self, queue: &str) -> anyhow::Result<Option<usize>> {
        let leader = self.first_running()?.quorum_leader(queue).await?;
        Ok(leader.and_then(|name| self.index_of(&name)))
    }

    fn first_running(&self) -> anyhow::Result<&PrivateNode> {
        self.nodes
            .iter()
            .find(|n| n.is_running())
            .ok_or_else(|| anyhow!("no node of the cluster is running"))
    }
}
