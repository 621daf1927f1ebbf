//! A `conejo-fixture` process (`tests/src/bin/conejo-fixture.rs`): started with its
//! arguments, each line of its standard output handed to the test as it comes, killed or
//! stopped with SIGTERM. The binary's path is the test's `env!("CARGO_BIN_EXE_conejo-fixture")`
//! (cargo sets it for integration tests only).

use std::{process::Stdio, time::Duration};

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// A running fixture process; dropping it kills the process.
#[derive(Debug)]
pub struct Fixture {
    child: Child,
}

impl Fixture {
    /// Starts `binary` with `args`, connected to `url` (`AMQP_URL`), and hands each line it
    /// prints on stdout to `on_line`, from a task of the current runtime.
    pub fn spawn(
        binary: &str,
        args: &[String],
        url: &str,
        mut on_line: impl FnMut(&str) + Send + 'static,
    ) -> anyhow::Result<Fixture> {
        let mut child = Command::new(binary)
            .args(args)
            .env("AMQP_URL", url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {binary}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                on_line(&line);
            }
        });
        Ok(Fixture { child })
    }

    /// The process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL, and waits for the process to be gone.
    pub async fn kill(mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// SIGTERM, and waits (at most 30 s) for a clean exit.
    pub async fn terminate(mut self) -> anyhow::Result<()> {
        let pid = self.child.id().context("already exited")?;
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .context("no exit within 30 s of SIGTERM")??;
        anyhow::ensure!(status.success(), "exited with {status:?}");
        Ok(())
    }
}
