//! Private RabbitMQ nodes (and clusters of them) that the test process starts, stops, kills and
//! restarts itself, side by side with the shared broker — which is never touched.
//!
//! The recipe is the one verified on this machine's RabbitMQ 3.10.8 (see `FACTS.md`, "RabbitMQ
//! here"):
//!
//! * the scripts of `/usr/lib/rabbitmq/bin` (or `$CONEJO_RABBITMQ_BIN_DIR`) are called directly,
//!   never the `/usr/sbin` wrappers, which `su rabbitmq` and pick up the shared broker's cookie;
//! * each node has its own directory under `$TMPDIR/conejo-nodes/<node>/`: `home/` with a private
//!   `.erlang.cookie` (mode 0400, written before the first start), `mnesia/` (data), `log/`,
//!   `rabbitmq.conf` (AMQP listener on 127.0.0.1 only, no console logging), `rabbitmq-env.conf`
//!   (loopback-only distribution and epmd; it replaces `/etc/rabbitmq/rabbitmq-env.conf`, which
//!   names the shared node), `enabled_plugins` (`[].`: no management listener on 15672),
//!   `stdout.log` (the VM's console) and `pid` (the beam's pid, from `RABBITMQ_PID_FILE`);
//! * each node has its own block of loopback ports, below Linux's ephemeral range and checked to
//!   be free: the AMQP port, the distribution port, and a small range for the distribution
//!   listener of the CLI tools talking to it (by default every `rabbitmqctl` on the machine
//!   competes for the same eleven ports, 35672–35682);
//! * node names are unique per process: `conejo-t<pid>-<n>[-<hint>]@localhost`.
//!
//! # Lifetime of the processes
//!
//! The server runs in the foreground as a child of the test process (with
//! `RABBITMQ_ALLOW_INPUT=1` the start script `exec`s the VM, so the child *is* the beam process
//! whose pid the pid file holds). Its standard input is a pipe that only the test process holds:
//! when the test process ends in any way — including SIGKILL by a test runner's timeout — the
//! pipe closes, the Erlang shell reads end-of-file and the VM terminates. So a node never outlives
//! its test process, even when no destructor runs. [`PrivateNode`]'s `Drop` kills the node at once
//! and removes its directory; a directory left behind by a process that died is removed by the
//! next process that starts a node. The directory of a node that failed to start is kept (the
//! error says where, and quotes the tails of its log and console output). Set
//! `CONEJO_KEEP_NODE_DIRS=1` to keep every directory (their paths are printed when the nodes are
//! dropped).
//!
//! The node is in its own process group, so a Ctrl-C on the test runner reaches only the test
//! process (which then closes the pipe).
//!
//! # Cost, and sharing a node
//!
//! On this two-core machine a node is ready 4–7 s after it is started (the same for a restart
//! with existing data, after a stop or a kill), a three-node cluster takes 16–25 s (its nodes
//! boot in parallel, ~10 s, then two join in turn). [`shared_private_node`] starts one node per test
//! process and hands out `&'static` references to it: the lifecycle methods ([`PrivateNode::stop`],
//! [`PrivateNode::kill`], [`PrivateNode::start_again`], …) take `&mut self`, so tests can use the
//! shared node (connect, declare, publish, [`PrivateNode::close_all_connections`]) but a test that
//! stops or kills a node has to start its own with [`PrivateNode::start`].
//!
//! Beware: cargo-nextest runs every test in a process of its own, so under nextest "one node per
//! process" means one node per *test* that calls [`shared_private_node`]; only `cargo test` (one
//! process per test binary) shares it between tests. Under nextest, put the checks that need a
//! private node but do not disturb it into one test.
//!
//! # Where things are
//!
//! This module holds [`PrivateNode`], its options and lifecycle, and [`shared_private_node`];
//! its submodules: `files` (the node's directory, configuration and cookie), `process` (the
//! server's OS process: boot, kill, diagnostics), `cli` (`rabbitmqctl` and the other CLI tools
//! against one node, and the parsing of their output), `ports` (the block of loopback ports a
//! node reserves), `cluster` ([`PrivateCluster`]).

mod cli;
mod cluster;
mod files;
mod ports;
mod process;

pub use cluster::PrivateCluster;

use anyhow::{Context, bail, ensure};
use std::fmt;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use files::{random_cookie, sweep_stale_dirs};
use ports::PortBlock;
use process::NodeProcess;

/// Upper bound for a node to become ready (normally 4–7 s; generous for a loaded machine).
pub const NODE_START_TIMEOUT: Duration = Duration::from_secs(60);

/// Upper bound for a node to exit after `rabbitmqctl stop` (normally well under a second).
pub const NODE_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Upper bound for one CLI call (`rabbitmqctl …`, ~0.45 s normally); the child is killed after it.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// Upper bound for a SIGKILLed node's process to be gone.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause between two polls of a node's readiness or membership.
const POLL_PAUSE: Duration = Duration::from_millis(200);

/// How many times [`PrivateNode::start`] retries with other ports when a port was taken between
/// the check and the node's start.
const START_ATTEMPTS: u32 = 3;

/// A RabbitMQ node started by this process, with its own name, ports, cookie and data directory.
///
/// Create one with [`PrivateNode::start`] (or share one per process with
/// [`shared_private_node`]). Its AMQP listener is on `127.0.0.1:`[`PrivateNode::amqp_port`]
/// and `guest`/`guest` works ([`PrivateNode::amqp_url`]). The data directory survives
/// [`PrivateNode::stop`] and [`PrivateNode::kill`]: after [`PrivateNode::start_again`], durable
/// queues and the persistent messages in them are back, on the same port.
///
/// Dropping it SIGKILLs the node (if running) and removes its directory; see the module
/// documentation for why the node cannot outlive the test process even without `Drop`.
pub struct PrivateNode {
    /// The Erlang node name (`conejo-t<pid>-<n>[-<hint>]@localhost`): unique per process, so
    /// that nodes of concurrent test processes never meet in epmd.
    node_name: String,
    /// `$TMPDIR/conejo-nodes/<short name>/`: configuration, cookie, data and logs, kept across
    /// stops and kills so that a restart finds its queues again.
    dir: PathBuf,
    /// Where the server and CLI scripts are (a test points it at fake scripts).
    bin_dir: PathBuf,
    /// The node's loopback ports, reserved for its whole life so a restart binds the same ones.
    ports: PortBlock,
    /// The OS process while it runs; behind a mutex so that `&self` accessors can reap it.
    process: Mutex<NodeProcess>,
    /// Keep the directory on drop: asked for (`CONEJO_KEEP_NODE_DIRS`), or a start failed.
    keep_dir: bool,
    /// Whether the node has a TLS listener (on `ports.amqps()`).
    tls: bool,
}

/// How [`PrivateNode::start_with_options`] sets a node up beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// Appended to the node's `rabbitmq.conf`.
    pub config: String,
    /// Plugins to enable (e.g. `rabbitmq_auth_mechanism_ssl`); none by default.
    pub plugins: Vec<String>,
    /// A TLS listener on `127.0.0.1:`[`PrivateNode::amqps_port`].
    pub tls: Option<TlsListener>,
}

/// The files of a node's TLS listener (PEM). The listener asks for a client certificate and
/// refuses a connection without one (`verify_peer`, `fail_if_no_peer_cert`), TLS 1.3 and 1.2.
#[derive(Debug, Clone)]
pub struct TlsListener {
    /// The CA that client certificates must chain to (`ssl_options.cacertfile`).
    pub ca_file: PathBuf,
    /// The server's certificate (`ssl_options.certfile`).
    pub cert_file: PathBuf,
    /// The server's private key (`ssl_options.keyfile`).
    pub key_file: PathBuf,
}

impl fmt::Debug for PrivateNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateNode")
            .field("node_name", &self.node_name)
            .field("amqp_port", &self.ports.amqp())
            .field("dist_port", &self.ports.dist())
            .field("dir", &self.dir)
            .field("pid", &self.pid())
            .finish()
    }
}

impl PrivateNode {
    /// Starts a fresh node named `conejo-t<pid>-<n>-<name_hint>@localhost` (the hint is reduced to
    /// `[A-Za-z0-9_-]`, at most 24 characters; it may be empty) with a new random cookie, and
    /// waits until it is ready (`rabbitmqctl await_startup`), at most [`NODE_START_TIMEOUT`].
    ///
    /// The error of a failed start names the node's directory, which is then kept (also by
    /// `Drop`), and quotes the tail of its log and console output.
    pub async fn start(name_hint: &str) -> anyhow::Result<PrivateNode> {
        Self::start_with_cookie(name_hint, &random_cookie(), &NodeOptions::default()).await
    }

    /// As [`start`](Self::start), with `config` appended to the node's `rabbitmq.conf`
    /// (e.g. `consumer_timeout = 2000`).
    pub async fn start_with_config(name_hint: &str, config: &str) -> anyhow::Result<PrivateNode> {
        let options = NodeOptions {
            config: config.to_owned(),
            ..NodeOptions::default()
        };
        Self::start_with_cookie(name_hint, &random_cookie(), &options).await
    }

    /// As [`start`](Self::start), with extra configuration, plugins and a TLS listener.
    pub async fn start_with_options(
        name_hint: &str,
        options: &NodeOptions,
    ) -> anyhow::Result<PrivateNode> {
        Self::start_with_cookie(name_hint, &random_cookie(), options).await
    }

    /// Prepares and boots a node with `cookie` (a cluster's nodes share one), retrying with
    /// other ports when one was taken before the node could bind it.
    async fn start_with_cookie(
        name_hint: &str,
        cookie: &str,
        options: &NodeOptions,
    ) -> anyhow::Result<PrivateNode> {
        sweep_stale_dirs();
        let mut attempt = 1;
        loop {
            let mut node = Self::prepare(name_hint, cookie, options)?;
            match node.boot().await {
                Ok(()) => return Ok(node),
                Err(err) if attempt < START_ATTEMPTS && node.lost_a_port() => {
                    // Expected, nothing to inspect: let Drop remove it.
                    node.keep_dir = false;
                    tracing::warn!(
                        node = %node.node_name,
                        "a port was taken before the node could bind it; retrying with others: {err:#}"
                    );
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// The Erlang node name, e.g. `conejo-t4242-0-durable@localhost`.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The AMQP port (on 127.0.0.1); the same across restarts.
    pub fn amqp_port(&self) -> u16 {
        self.ports.amqp()
    }

    /// The AMQP listener's address, `127.0.0.1:`[`PrivateNode::amqp_port`] (e.g. as a
    /// [`crate::TcpProxy`] target).
    pub fn amqp_addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.ports.amqp()))
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f` (vhost `/`; `guest` may log in over loopback).
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.ports.amqp())
    }

    /// The TLS listener's port (on 127.0.0.1), if the node was started with one
    /// ([`NodeOptions::tls`]).
    pub fn amqps_port(&self) -> Option<u16> {
        self.tls.then(|| self.ports.amqps())
    }

    /// The Erlang distribution port (on 127.0.0.1).
    pub fn dist_port(&self) -> u16 {
        self.ports.dist()
    }

    /// The node's directory (configuration, cookie, data, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The node's main log file, `<dir>/log/<node name>.log`.
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("log").join(format!("{}.log", self.node_name))
    }

    /// Stops the node gracefully (`rabbitmqctl stop`: clients get a 320 CONNECTION_FORCED
    /// "broker forced connection closure with reason 'shutdown'" — lapin 4.12 often reports
    /// only the connection reset that follows it —, queues are written out, the VM halts) and
    /// waits for its process to exit, at most
    /// [`NODE_STOP_TIMEOUT`] (then it is killed and this is an error). Fails if it is not
    /// running.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        ensure!(self.is_running(), "{} is not running", self.node_name);
        // Its exit status does not matter: the CLI may lose its peer as the VM goes away.
        let ctl = self.rabbitmqctl(&["stop"]).await;
        if self.wait_exit(NODE_STOP_TIMEOUT).await {
            return Ok(());
        }
        let diagnostics = self.diagnostics();
        self.kill_now();
        let ctl = match ctl {
            Ok(_) => "succeeded".to_owned(),
            Err(err) => format!("failed: {err:#}"),
        };
        bail!(
            "{} did not exit within {NODE_STOP_TIMEOUT:?} of `rabbitmqctl stop` (which {ctl}); \
             killed it{diagnostics}",
            self.node_name
        )
    }

    /// SIGKILLs the node's beam process (the pid `RABBITMQ_PID_FILE` holds) — a crash: nothing
    /// is flushed or closed gracefully — and waits until it is gone. Confirmed persistent
    /// messages of durable queues are on disk and come back with [`PrivateNode::start_again`].
    /// Fails if it is not running.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        ensure!(self.is_running(), "{} is not running", self.node_name);
        self.signal_kill();
        ensure!(
            self.wait_exit(KILL_TIMEOUT).await,
            "{} still running {KILL_TIMEOUT:?} after SIGKILL",
            self.node_name
        );
        Ok(())
    }

    /// Starts the node again after [`PrivateNode::stop`] or [`PrivateNode::kill`], with the same
    /// name, ports, cookie and data, and waits until it is ready (at most
    /// [`NODE_START_TIMEOUT`]). A member of a cluster rejoins it by itself — as long as another
    /// member is running: a clustered node that starts alone waits for its peers (up to 10 ×
    /// 30 s), so restart a fully stopped cluster's nodes in parallel. Fails if it is running.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        ensure!(!self.is_running(), "{} is already running", self.node_name);
        self.boot().await
    }

    /// [`PrivateNode::stop`], then [`PrivateNode::start_again`].
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        self.start_again().await
    }

    /// Stops the RabbitMQ application but not the VM (`rabbitmqctl stop_app`): the AMQP listener
    /// closes and clients are disconnected, the node stays reachable by the CLI.
    pub async fn stop_app(&mut self) -> anyhow::Result<()> {
        self.rabbitmqctl(&["stop_app"]).await.map(drop)
    }

    /// Starts the RabbitMQ application again after [`PrivateNode::stop_app`]
    /// (`rabbitmqctl start_app`, which returns once it runs).
    pub async fn start_app(&mut self) -> anyhow::Result<()> {
        self.rabbitmqctl(&["start_app"]).await.map(drop)
    }
}

impl Drop for PrivateNode {
    fn drop(&mut self) {
        self.kill_now();
        if self.is_running() {
            eprintln!(
                "conejo-tests: {} (pid {:?}) survived SIGKILL; leaving {}",
                self.node_name,
                self.pid(),
                self.dir.display()
            );
        } else if self.keep_dir {
            eprintln!(
                "conejo-tests: kept the files of {} in {}",
                self.node_name,
                self.dir.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// One node per test process, started on first use (by whichever test gets there first) and
/// never stopped: it ends with the process (see the module documentation).
///
/// The `&'static` reference only allows what does not disturb other tests: the lifecycle
/// methods need `&mut`. Tests that stop, kill or restart a node start their own with
/// [`PrivateNode::start`]. Under cargo-nextest, which runs each test in its own process, this is
/// one node per test that calls it.
pub async fn shared_private_node() -> anyhow::Result<&'static PrivateNode> {
    static NODE: tokio::sync::OnceCell<PrivateNode> = tokio::sync::OnceCell::const_new();
    NODE.get_or_try_init(|| PrivateNode::start("shared"))
        .await
        .context("failed to start the shared private node")
}
