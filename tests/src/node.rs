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

use anyhow::{Context, anyhow, bail, ensure};
use serde_json::Value;
use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, Once, PoisonError};
use std::time::{Duration, Instant};

/// Where the RabbitMQ scripts are, unless `CONEJO_RABBITMQ_BIN_DIR` says otherwise.
const DEFAULT_BIN_DIR: &str = "/usr/lib/rabbitmq/bin";

/// Environment variable overriding [`DEFAULT_BIN_DIR`].
const BIN_DIR_VAR: &str = "CONEJO_RABBITMQ_BIN_DIR";

/// Environment variable that, when set to anything but `0` or empty, keeps node directories.
const KEEP_DIRS_VAR: &str = "CONEJO_KEEP_NODE_DIRS";

/// A file in a node's directory that keeps it from being removed (by `Drop` and by the sweep of
/// dead processes' directories): written when a start fails.
const KEEP_MARKER: &str = "KEPT-AFTER-FAILED-START";

/// Upper bound for a node to become ready (normally 4–7 s; generous for a loaded machine).
pub const NODE_START_TIMEOUT: Duration = Duration::from_secs(60);

/// Upper bound for a node to exit after `rabbitmqctl stop` (normally well under a second).
pub const NODE_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Upper bound for one CLI call (`rabbitmqctl …`, ~0.45 s normally); the child is killed after it.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// Upper bound for a SIGKILLed node's process to be gone.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Upper bound for a cluster to list all its running members after a join or a restart.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);

/// Pause between two polls of a node's readiness or membership.
const POLL_PAUSE: Duration = Duration::from_millis(200);

/// Pause between two checks of whether a node's process has exited.
const EXIT_POLL: Duration = Duration::from_millis(20);

/// How many times [`PrivateNode::start`] retries with other ports when a port was taken between
/// the check and the node's start.
const START_ATTEMPTS: u32 = 3;

/// Lines of the node's log quoted in errors.
const LOG_TAIL_LINES: usize = 40;

/// Lines of the node's console output quoted in errors.
const STDOUT_TAIL_LINES: usize = 15;

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
    node_name: String,
    dir: PathBuf,
    bin_dir: PathBuf,
    ports: PortBlock,
    process: Mutex<NodeProcess>,
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

/// The node's OS process, if one was started.
#[derive(Debug, Default)]
struct NodeProcess {
    /// The `rabbitmq-server` child, which `exec`s into the beam; `None` once reaped.
    child: Option<Child>,
    /// The pid from `RABBITMQ_PID_FILE` when it differs from the child's (not seen on 3.10.8).
    other_beam_pid: Option<u32>,
    /// How the last process exited.
    last_exit: Option<ExitStatus>,
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

    /// Creates the node's directory, files and port reservation, without starting it.
    fn prepare(
        name_hint: &str,
        cookie: &str,
        options: &NodeOptions,
    ) -> anyhow::Result<PrivateNode> {
        static NODES: AtomicU64 = AtomicU64::new(0);
        let bin_dir = bin_dir();
        let server = bin_dir.join("rabbitmq-server");
        ensure!(
            server.is_file(),
            "{} not found: private nodes need the RabbitMQ server scripts there (Debian's \
             rabbitmq-server package), or their directory in {BIN_DIR_VAR}",
            server.display()
        );
        let n = NODES.fetch_add(1, Ordering::Relaxed);
        let hint = sanitize_hint(name_hint);
        let short = if hint.is_empty() {
            format!("conejo-t{}-{n}", std::process::id())
        } else {
            format!("conejo-t{}-{n}-{hint}", std::process::id())
        };
        let dir = nodes_root().join(&short);
        let node = PrivateNode {
            node_name: format!("{short}@localhost"),
            dir,
            bin_dir,
            ports: PortBlock::reserve()?,
            process: Mutex::new(NodeProcess::default()),
            keep_dir: keep_dirs(),
            tls: options.tls.is_some(),
        };
        node.write_files(cookie, options)
            .with_context(|| format!("failed to prepare {}", node.dir.display()))?;
        Ok(node)
    }

    fn write_files(&self, cookie: &str, options: &NodeOptions) -> anyhow::Result<()> {
        if self.dir.exists() {
            // Left by an earlier process that had the same pid.
            fs::remove_dir_all(&self.dir)?;
        }
        for sub in ["home", "mnesia", "log"] {
            fs::create_dir_all(self.dir.join(sub))?;
        }
        // A cookie readable by others is refused by Erlang; create it 0400 right away.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(self.dir.join("home/.erlang.cookie"))?;
        file.write_all(cookie.as_bytes())?;
        fs::write(
            self.dir.join("rabbitmq-env.conf"),
            "# Written by conejo-tests: distribution and epmd on loopback only.\n\
             export ERL_FLAGS=\"-kernel inet_dist_use_interface {127,0,0,1}\"\n\
             export ERL_EPMD_ADDRESS=127.0.0.1\n",
        )?;
        let tls = match &options.tls {
            Some(tls) => format!(
                "listeners.ssl.1 = 127.0.0.1:{}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = true\n\
                 ssl_options.versions.1 = tlsv1.3\n\
                 ssl_options.versions.2 = tlsv1.2\n",
                self.ports.amqps(),
                tls.ca_file.display(),
                tls.cert_file.display(),
                tls.key_file.display(),
            ),
            None => String::new(),
        };
        fs::write(
            self.dir.join("rabbitmq.conf"),
            format!(
                "# Written by conejo-tests.\n\
                 listeners.tcp.1 = 127.0.0.1:{}\n\
                 {tls}\
                 log.console = false\n\
                 log.file.level = info\n\
                 {}\n",
                self.ports.amqp(),
                options.config,
            ),
        )?;
        fs::write(
            self.dir.join("enabled_plugins"),
            format!("[{}].\n", options.plugins.join(",")),
        )?;
        // Channels check their consumer timeouts on each tick, every minute by default: a
        // second, so that a test's short consumer_timeout is enforced promptly.
        fs::write(
            self.dir.join("advanced.config"),
            "[{rabbit, [{channel_tick_interval, 1000}]}].\n",
        )?;
        Ok(())
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

    /// The beam process's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        let mut process = self.lock_process();
        reap(&mut process);
        process.child.as_ref().map(Child::id)
    }

    /// Whether the node's VM process is alive (it may still be booting or shutting down; the
    /// lifecycle methods return only once it is ready, or gone). Never blocks.
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
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

    /// Spawns the server and waits until it is ready; on failure, kills it and keeps its
    /// directory for inspection (see [`KEEP_MARKER`]).
    async fn boot(&mut self) -> anyhow::Result<()> {
        let result = self.try_boot().await;
        if let Err(err) = result {
            self.kill_now();
            self.keep_for_inspection(&err);
            return Err(err.context(format!(
                "failed to start {}; its files are kept in {}",
                self.node_name,
                self.dir.display()
            )));
        }
        result
    }

    /// Keeps the directory when the node is dropped, and from the sweep, with `err` in
    /// [`KEEP_MARKER`].
    fn keep_for_inspection(&mut self, err: &anyhow::Error) {
        self.keep_dir = true;
        let _ = fs::write(self.dir.join(KEEP_MARKER), format!("{err:#}\n"));
    }

    async fn try_boot(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let pid_file = self.dir.join("pid");
        // A stale pid file would name a dead process.
        let _ = fs::remove_file(&pid_file);
        let child = self.spawn_server()?;
        let child_pid = child.id();
        {
            let mut process = self.lock_process();
            process.child = Some(child);
            process.other_beam_pid = None;
            process.last_exit = None;
        }
        let deadline = started + NODE_START_TIMEOUT;
        loop {
            if !self.is_running() {
                let status = self
                    .lock_process()
                    .last_exit
                    .map_or_else(|| "unknown status".to_owned(), |s| s.to_string());
                bail!(
                    "{} exited ({status}) {:.1?} after its start, before it was ready{}",
                    self.node_name,
                    started.elapsed(),
                    self.diagnostics()
                );
            }
            let last = match self
                .cli_output(
                    "rabbitmqctl",
                    &["-q", "await_startup", "--timeout", "10"],
                    CLI_TIMEOUT,
                )
                .await
            {
                Ok(output) if output.status.success() => break,
                // 69 (unavailable) while the node is not registered with epmd yet.
                Ok(output) => format!("{}: {}", output.status, describe_output(&output)),
                Err(err) => format!("{err:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "{} not ready within {NODE_START_TIMEOUT:?} (last check: {last}){}",
                    self.node_name,
                    self.diagnostics()
                );
            }
            tokio::time::sleep(POLL_PAUSE).await;
        }
        // RABBITMQ_ALLOW_INPUT makes the script exec the VM: the pid file names our child.
        if let Some(beam) = read_pid(&pid_file)
            && beam != child_pid
        {
            tracing::warn!(
                node = %self.node_name,
                "pid file names {beam}, not the child {child_pid}: will SIGKILL both"
            );
            self.lock_process().other_beam_pid = Some(beam);
        }
        tracing::info!(node = %self.node_name, port = self.ports.amqp(), "ready in {:.1?}", started.elapsed());
        Ok(())
    }

    fn spawn_server(&self) -> anyhow::Result<Child> {
        let console = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stdout.log"))
            .context("failed to open the node's stdout.log")?;
        let console_err = console
            .try_clone()
            .context("failed to duplicate stdout.log's handle")?;
        let server = self.bin_dir.join("rabbitmq-server");
        let mut command = std::process::Command::new(&server);
        self.configure(&mut command);
        command
            // The script then execs the VM (no signal-forwarding shell in between) and runs
            // the Erlang shell on stdin: our pipe, whose end-of-file terminates the VM.
            .env("RABBITMQ_ALLOW_INPUT", "1")
            .stdin(Stdio::piped())
            .stdout(console)
            .stderr(console_err)
            .process_group(0);
        command
            .spawn()
            .with_context(|| format!("failed to run {}", server.display()))
    }

    /// The environment of the server and its CLI tools: only this node's settings, nothing
    /// inherited that could point them at the shared broker.
    fn configure(&self, command: &mut std::process::Command) {
        for (key, _) in std::env::vars_os() {
            let inherited = key.to_string_lossy();
            if inherited.starts_with("RABBITMQ_") || inherited.starts_with("ERL_") {
                command.env_remove(&key);
            }
        }
        let dir = &self.dir;
        command
            .current_dir(dir)
            .env("HOME", dir.join("home"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_NODENAME", &self.node_name)
            .env("RABBITMQ_DIST_PORT", self.ports.dist().to_string())
            .env(
                "RABBITMQ_CTL_DIST_PORT_MIN",
                self.ports.cli_min().to_string(),
            )
            .env(
                "RABBITMQ_CTL_DIST_PORT_MAX",
                self.ports.cli_max().to_string(),
            )
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .env("ERL_CRASH_DUMP", dir.join("erl_crash.dump"));
    }

    /// Runs a CLI tool against this node; the child is killed after `timeout`.
    async fn cli_output(
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

    fn lock_process(&self) -> MutexGuard<'_, NodeProcess> {
        self.process.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends SIGKILL to the beam (and to the pid file's process, should it differ).
    fn signal_kill(&self) {
        let mut process = self.lock_process();
        if let Some(child) = process.child.as_mut() {
            // The child is not reaped yet, so its pid cannot have been reused.
            let _ = child.kill();
        }
        if let Some(other) = process.other_beam_pid.take() {
            let _ = std::process::Command::new("kill")
                .args(["-s", "KILL", &other.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    /// SIGKILL and a blocking, bounded wait for the exit (for error paths and `Drop`).
    fn kill_now(&self) {
        self.signal_kill();
        let deadline = Instant::now() + KILL_TIMEOUT;
        while self.is_running() && Instant::now() < deadline {
            std::thread::sleep(EXIT_POLL);
        }
    }

    /// Waits until the process has exited; false if it still runs after `timeout`.
    async fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_running() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(EXIT_POLL).await;
        }
    }

    /// Whether the last failed start was due to a port someone else bound in the meantime.
    fn lost_a_port(&self) -> bool {
        [self.log_file(), self.dir.join("stdout.log")]
            .iter()
            .filter_map(|path| fs::read(path).ok())
            .any(|bytes| String::from_utf8_lossy(&bytes).contains("eaddrinuse"))
    }

    /// Where the node's files are, and the tails of its log and console output, for errors.
    fn diagnostics(&self) -> String {
        let log = self.log_file();
        let console = self.dir.join("stdout.log");
        format!(
            "\nnode {} (AMQP 127.0.0.1:{}, distribution port {}), files under {}\n\
             --- last {LOG_TAIL_LINES} lines of {} ---\n{}\n\
             --- last {STDOUT_TAIL_LINES} lines of {} ---\n{}",
            self.node_name,
            self.ports.amqp(),
            self.ports.dist(),
            self.dir.display(),
            log.display(),
            tail(&log, LOG_TAIL_LINES),
            console.display(),
            tail(&console, STDOUT_TAIL_LINES),
        )
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

/// Reaps the child if it has exited, recording its status.
fn reap(process: &mut NodeProcess) {
    if let Some(child) = process.child.as_mut() {
        match child.try_wait() {
            Ok(None) => {}
            Ok(Some(status)) => {
                process.last_exit = Some(status);
                process.child = None;
            }
            // Not our child any more (cannot happen with std's Child); treat it as gone.
            Err(_) => process.child = None,
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
    /// them; fails if they are not all running members within [`NODE_START_TIMEOUT`] plus 30 s
    /// after the joins.
    pub async fn start(size: usize) -> anyhow::Result<PrivateCluster> {
        ensure!(size > 0, "a cluster needs at least one node");
        let cookie = random_cookie();
        let hints: Vec<String> = (0..size).map(|i| format!("k{i}")).collect();
        let options = NodeOptions::default();
        let nodes = futures::future::try_join_all(
            hints
                .iter()
                .map(|hint| PrivateNode::start_with_cookie(hint, &cookie, &options)),
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

/// A reserved block of [`PortBlock::SIZE`] consecutive loopback ports: AMQP, distribution, the
/// CLI tools' distribution range, and AMQPS (used only by a node with a TLS listener). Released (for this process) when dropped.
#[derive(Debug)]
struct PortBlock {
    base: u16,
}

/// Blocks handed out by this process and not yet released.
static RESERVED_BLOCKS: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

impl PortBlock {
    const SIZE: u16 = 9;
    /// First port of the first block.
    const LOW: u16 = 20_000;
    /// Blocks end below Linux's default ephemeral range (32768–60999), so an outgoing
    /// connection's local port never takes a stopped node's port.
    const HIGH: u16 = 32_768;

    /// Reserves a block whose ports are all free, starting the search at a pid-derived block so
    /// that concurrent test processes rarely look at the same ports.
    fn reserve() -> anyhow::Result<PortBlock> {
        static CALLS: AtomicU64 = AtomicU64::new(0);
        let blocks = u64::from((Self::HIGH - Self::LOW) / Self::SIZE);
        let start = u64::from(std::process::id()) * 7919 + CALLS.fetch_add(1, Ordering::Relaxed);
        let mut reserved = RESERVED_BLOCKS
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for k in 0..blocks {
            let index = u16::try_from((start + k) % blocks).context("port block index")?;
            let base = Self::LOW + index * Self::SIZE;
            if reserved.contains(&base) {
                continue;
            }
            if (base..base + Self::SIZE).all(port_is_free) {
                reserved.insert(base);
                return Ok(PortBlock { base });
            }
        }
        bail!(
            "no block of {} free ports between {} and {}",
            Self::SIZE,
            Self::LOW,
            Self::HIGH
        )
    }

    fn amqp(&self) -> u16 {
        self.base
    }

    fn dist(&self) -> u16 {
        self.base + 1
    }

    fn cli_min(&self) -> u16 {
        self.base + 2
    }

    fn cli_max(&self) -> u16 {
        self.base + Self::SIZE - 2
    }

    fn amqps(&self) -> u16 {
        self.base + Self::SIZE - 1
    }
}

impl Drop for PortBlock {
    fn drop(&mut self) {
        RESERVED_BLOCKS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.base);
    }
}

fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

fn bin_dir() -> PathBuf {
    match std::env::var_os(BIN_DIR_VAR) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(DEFAULT_BIN_DIR),
    }
}

fn keep_dirs() -> bool {
    std::env::var_os(KEEP_DIRS_VAR).is_some_and(|v| !v.is_empty() && v != OsStr::new("0"))
}

/// `$TMPDIR/conejo-nodes`.
fn nodes_root() -> PathBuf {
    std::env::temp_dir().join("conejo-nodes")
}

/// Removes, once per process, the node directories of processes that no longer exist (and
/// whose node is gone too). Best effort.
fn sweep_stale_dirs() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        let Ok(entries) = fs::read_dir(nodes_root()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(owner) = name
                .to_str()
                .and_then(|n| n.strip_prefix("conejo-t"))
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            let path = entry.path();
            let beam_alive = read_pid(&path.join("pid")).is_some_and(process_exists);
            let kept = path.join(KEEP_MARKER).exists();
            if owner != std::process::id() && !process_exists(owner) && !beam_alive && !kept {
                let _ = fs::remove_dir_all(&path);
            }
        }
    });
}

fn process_exists(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `[A-Za-z0-9_-]` only (Erlang node names), at most 24 characters.
fn sanitize_hint(hint: &str) -> String {
    hint.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .take(24)
        .collect()
}

/// 32 random upper-case letters.
fn random_cookie() -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut cookie = String::with_capacity(32);
    for round in 0..4u8 {
        // Each RandomState has fresh random keys.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u8(round);
        hasher.write_u128(nanos);
        hasher.write_u32(std::process::id());
        let mut value = hasher.finish();
        for _ in 0..8 {
            cookie.push(char::from(b'A' + (value % 26) as u8));
            value /= 26;
        }
    }
    cookie
}

/// The last `lines` lines of a text file, control characters (the VM's terminal-title escapes)
/// dropped; a note if it cannot be read.
fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..]
                .iter()
                .map(|line| {
                    line.chars()
                        .filter(|c| !c.is_control() || *c == '\t')
                        .collect::<String>()
                })
                .collect::<Vec<_>>()
                .join("\n")
        }
        Err(err) => format!("(cannot read it: {err})"),
    }
}

fn describe_output(output: &Output) -> String {
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
    fn hints_are_valid_node_name_parts() {
        assert_eq!(sanitize_hint("durable queue/1"), "durablequeue1");
        assert_eq!(sanitize_hint("a_b-c"), "a_b-c");
        assert_eq!(sanitize_hint(&"x".repeat(40)).len(), 24);
    }

    #[test]
    fn cookies_are_random_letters() {
        let a = random_cookie();
        let b = random_cookie();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_uppercase()), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn port_blocks_are_distinct_and_free_when_released() {
        let a = PortBlock::reserve().unwrap();
        let b = PortBlock::reserve().unwrap();
        assert_ne!(a.base, b.base);
        assert!(a.base >= PortBlock::LOW && a.amqps() < PortBlock::HIGH);
        assert_eq!(a.amqps() - a.amqp() + 1, PortBlock::SIZE);
        assert!(a.cli_min() < a.cli_max() && a.cli_max() < a.amqps());
        let base = a.base;
        drop(a);
        assert!(!RESERVED_BLOCKS.lock().unwrap().contains(&base));
    }

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
        assert!(parse_leader("", "qq1").is_err());
    }

    /// A server that dies at boot: the error names the node, its exit status and directory,
    /// and quotes its console output; the node's directory is kept.
    #[tokio::test]
    async fn failed_start_is_diagnosable() {
        use std::os::unix::fs::PermissionsExt;
        let bin = std::env::temp_dir().join(format!("conejo-fake-bin-{}", std::process::id()));
        fs::create_dir_all(&bin).unwrap();
        for (name, script) in [
            (
                "rabbitmq-server",
                "#!/bin/sh\necho \"fake boot of $RABBITMQ_NODENAME failed\"\nsleep 0.3\nexit 3\n",
            ),
            // As a real rabbitmqctl does while the node is not registered yet.
            ("rabbitmqctl", "#!/bin/sh\necho nodedown >&2\nexit 69\n"),
        ] {
            let path = bin.join(name);
            fs::write(&path, script).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut node =
            PrivateNode::prepare("fake", &random_cookie(), &NodeOptions::default()).unwrap();
        node.bin_dir = bin.clone();
        let err = node.boot().await.expect_err("the fake server exits");
        let msg = format!("{err:#}");
        eprintln!("{msg}");
        assert!(msg.contains(node.node_name()), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains(&node.dir().display().to_string()), "{msg}");
        assert!(
            msg.contains(&format!("fake boot of {} failed", node.node_name())),
            "{msg}"
        );
        assert!(!node.is_running());
        assert!(
            msg.starts_with(&format!(
                "failed to start {}; its files are kept",
                node.node_name()
            )),
            "{msg}"
        );
        let dir = node.dir().to_owned();
        drop(node);
        assert!(dir.join(KEEP_MARKER).is_file());
        fs::remove_dir_all(&dir).unwrap();
        fs::remove_dir_all(&bin).unwrap();
    }

    #[test]
    fn tail_keeps_the_last_lines_without_escapes() {
        let dir = std::env::temp_dir().join(format!("conejo-tail-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("log");
        fs::write(&file, "one\ntwo\n\u{1b}]2;title\u{7}three\n").unwrap();
        assert_eq!(tail(&file, 2), "two\n]2;titlethree");
        assert!(tail(&dir.join("missing"), 2).contains("cannot read"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
