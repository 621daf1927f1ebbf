//! `rabbitmqctl` and the other RabbitMQ CLI tools against one private node, and the parsing of
//! what they print.

use anyhow::{Context, anyhow, bail};
use serde_json::Value;
use std::process::{Output, Stdio};
use std::time::Duration;

use super::{CLI_TIMEOUT, PrivateNode};

impl PrivateNode {
    /// Runs `rabbitmqctl -n <this node> <args…>` with this node's environment (cookie, env
    /// file, CLI port range), at most [`CLI_TIMEOUT`], and returns its standard output. A
    /// non-zero exit is an error quoting both outputs. E.g. `node.rabbitmqctl(&["-q",
    /// "list_queues", "name", "messages"])`.
    pub async fn rabbitmqctl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.cli("rabbitmqctl", args).await
    }

    /// Like [`PrivateNode::rabbitmqctl`] for another CLI tool of the same directory
    /// (`rabbitmq-diagnostics`, `rabbitmq-queues`, `rabbitmq-plugins`, …).
    pub async fn cli(&self, tool: &str, args: &[&str]) -> anyhow::Result<String> {
        let output = self.cli_output(tool, args, CLI_TIMEOUT).await?;
        if !output.status.success() {
            bail!(
                "`{tool} -n {} {}` failed ({}): {}",
                self.node_name,
                args.join(" "),
                output.status,
                describe_output(&output)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Force-closes every client connection of this node (`rabbitmqctl close_all_connections`):
    /// clients get a `connection.close` (320 CONNECTION_FORCED) with a conejo-tests reason.
    pub async fn close_all_connections(&self) -> anyhow::Result<()> {
        self.rabbitmqctl(&["-q", "close_all_connections", "closed by conejo-tests"])
            .await
            .map(drop)
    }

    /// The running members of this node's cluster (just this node when it is alone), from
    /// `rabbitmqctl cluster_status`, sorted.
    pub async fn running_nodes(&self) -> anyhow::Result<Vec<String>> {
        let stdout = self
            .rabbitmqctl(&["-q", "cluster_status", "--formatter", "json"])
            .await?;
        parse_running_nodes(&stdout)
    }

    /// The node that hosts the leader of the quorum queue `queue` (vhost `/`), from
    /// `rabbitmqctl list_queues name leader` asked to this node; `None` while the queue has no
    /// known leader. Fails if the queue is not listed.
    pub async fn quorum_leader(&self, queue: &str) -> anyhow::Result<Option<String>> {
        let stdout = self
            .rabbitmqctl(&[
                "-q",
                "list_queues",
                "name",
                "type",
                "leader",
                "--formatter",
                "json",
            ])
            .await?;
        parse_leader(&stdout, queue)
    }

    /// Runs a CLI tool against this node; the child is killed after `timeout`.
    pub(super) async fn cli_output(
        &self,
        tool: &str,
        args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<Output> {
        let bin = self.bin_dir.join(tool);
        let mut command = tokio::process::Command::new(&bin);
        self.configure(command.as_std_mut());
        command
            .arg("-n")
            .arg(&self.node_name)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let describe = || {
            format!(
                "`{} -n {} {}`",
                bin.display(),
                self.node_name,
                args.join(" ")
            )
        };
        tokio::time::timeout(timeout, command.output())
            .await
            .map_err(|_| anyhow!("{} timed out after {timeout:?}", describe()))?
            .with_context(|| format!("failed to run {}", describe()))
    }
}

/// Both outputs of a CLI call, for an error message.
pub(super) fn describe_output(output: &Output) -> String {
    format!(
        "stderr: {} stdout: {}",
        String::from_utf8_lossy(&output.stderr).trim(),
        String::from_utf8_lossy(&output.stdout).trim()
    )
}

/// `running_nodes` of `rabbitmqctl cluster_status --formatter json`, sorted.
fn parse_running_nodes(stdout: &str) -> anyhow::Result<Vec<String>> {
    let value: Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("unparsable cluster_status output: {stdout}"))?;
    let nodes = value
        .get("running_nodes")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("cluster_status output without running_nodes: {stdout}"))?;
    let mut names: Vec<String> = nodes
        .iter()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    names.sort();
    Ok(names)
}

/// The `leader` of the row named `queue` in `rabbitmqctl list_queues name type leader
/// --formatter json` output; `None` if empty or not a string.
fn parse_leader(stdout: &str, queue: &str) -> anyhow::Result<Option<String>> {
    let trimmed = stdout.trim();
    let rows: Vec<Value> = if trimmed.is_empty() {
        Vec::new()
    } else {
        serde_json::from_str(trimmed)
            .with_context(|| format!("unparsable list_queues output: {trimmed}"))?
    };
    // While a killed node's quorum queues elect new leaders, a surviving node may list no
    // queue at all for a moment (seen on 3.10.8 right after a SIGKILL): no leader yet. A
    // listing without this queue among others is a real error (a wrong name).
    if rows.is_empty() {
        return Ok(None);
    }
    let row = rows
        .iter()
        .find(|row| row.get("name").and_then(Value::as_str) == Some(queue))
        .ok_or_else(|| anyhow!("queue {queue:?} is not listed: {trimmed}"))?;
    Ok(row
        .get("leader")
        .and_then(Value::as_str)
        .filter(|leader| !leader.is_empty())
        .map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cluster_status_of_3_10() {
        let json = r#"{"alarms":[],"cluster_name":"a@vm","disk_nodes":["b@localhost","a@localhost"],"running_nodes":["b@localhost","a@localhost"],"partitions":{}}"#;
        assert_eq!(
            parse_running_nodes(json).unwrap(),
            vec!["a@localhost", "b@localhost"]
        );
        assert!(parse_running_nodes("{}").is_err());
        assert!(parse_running_nodes("Error: nodedown").is_err());
    }

    #[test]
    fn parses_quorum_leader_of_3_10() {
        let json = r#"[
{"name":"qq1","type":"quorum","leader":"a@localhost"}
,{"name":"classic","type":"classic","leader":""}
]"#;
        assert_eq!(
            parse_leader(json, "qq1").unwrap().as_deref(),
            Some("a@localhost")
        );
        assert_eq!(parse_leader(json, "classic").unwrap(), None);
        assert!(parse_leader(json, "missing").is_err());
        // Nothing listed at all: an election under way, no leader yet.
        assert_eq!(parse_leader("", "qq1").unwrap(), None);
        assert_eq!(parse_leader("[]", "qq1").unwrap(), None);
    }
}
