//! A private node's OS process: spawning the server, waiting until it is ready, killing it,
//! reaping it, and the diagnostics quoted when it misbehaves.

use anyhow::{Context, bail};
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::cli::describe_output;
use super::{CLI_TIMEOUT, KILL_TIMEOUT, NODE_START_TIMEOUT, POLL_PAUSE, PrivateNode};

/// Pause between two checks of whether a node's process has exited.
const EXIT_POLL: Duration = Duration::from_millis(20);

/// Lines of the node's log quoted in errors.
const LOG_TAIL_LINES: usize = 40;

/// Lines of the node's console output quoted in errors.
const STDOUT_TAIL_LINES: usize = 15;

/// The node's OS process, if one was started.
#[derive(Debug, Default)]
pub(super) struct NodeProcess {
    /// The `rabbitmq-server` child, which `exec`s into the beam; `None` once reaped.
    child: Option<Child>,
    /// The pid from `RABBITMQ_PID_FILE` when it differs from the child's (not seen on 3.10.8).
    other_beam_pid: Option<u32>,
    /// How the last process exited.
    last_exit: Option<ExitStatus>,
}

impl PrivateNode {
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

    /// Spawns the server and waits until it is ready; on failure, kills it and keeps its
    /// directory for inspection (see [`KEEP_MARKER`](super::files::KEEP_MARKER)).
    pub(super) async fn boot(&mut self) -> anyhow::Result<()> {
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

    /// Spawns the server and polls `rabbitmqctl await_startup` until the node is ready, it
    /// exits, or [`NODE_START_TIMEOUT`] passes.
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

    /// Spawns `rabbitmq-server` in the foreground, in its own process group, its console
    /// output appended to `stdout.log` and its standard input a pipe only we hold.
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
    pub(super) fn configure(&self, command: &mut std::process::Command) {
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

    /// The process record, even if a panicking thread poisoned its mutex.
    pub(super) fn lock_process(&self) -> MutexGuard<'_, NodeProcess> {
        self.process.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends SIGKILL to the beam (and to the pid file's process, should it differ).
    pub(super) fn signal_kill(&self) {
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
    pub(super) fn kill_now(&self) {
        self.signal_kill();
        let deadline = Instant::now() + KILL_TIMEOUT;
        while self.is_running() && Instant::now() < deadline {
            std::thread::sleep(EXIT_POLL);
        }
    }

    /// Waits until the process has exited; false if it still runs after `timeout`.
    pub(super) async fn wait_exit(&self, timeout: Duration) -> bool {
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
    pub(super) fn lost_a_port(&self) -> bool {
        [self.log_file(), self.dir.join("stdout.log")]
            .iter()
            .filter_map(|path| fs::read(path).ok())
            .any(|bytes| String::from_utf8_lossy(&bytes).contains("eaddrinuse"))
    }

    /// Where the node's files are, and the tails of its log and console output, for errors.
    pub(super) fn diagnostics(&self) -> String {
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

/// Whether a process with this pid exists (any owner).
pub(super) fn process_exists(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// The pid a pid file holds, if it can be read.
pub(super) fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::NodeOptions;
    use crate::node::files::{KEEP_MARKER, random_cookie};

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
