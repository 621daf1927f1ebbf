//! `conejo`: the operator tool of conejo services.
//!
//! ```text
//! conejo dead-letters list orders              # counts by reason and failure kind
//! conejo dead-letters show orders -n 5         # the first five, headers parsed
//! conejo dead-letters replay orders --max 100  # back to the queue they failed in
//! ```
//!
//! The broker URL comes from `--url` or `AMQP_URL`; its password is never printed.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use conejo::AmqpUrl;
use conejo::admin::DeadLetterCommand;

/// The operator tool of conejo services.
#[derive(Debug, Parser)]
#[command(name = "conejo", version)]
struct Cli {
    /// Broker URL (its password is never printed).
    #[arg(
        long,
        global = true,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true,
        hide_default_value = true
    )]
    url: String,
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The tool's commands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect and replay the messages a conejo service dead-lettered.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The error's own text already ends with its cause; no backtrace for operators.
            eprintln!("conejo: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Parsed here rather than by clap, whose errors repeat the value, password included.
    let url: AmqpUrl = cli.url.parse()?;
    match cli.command {
        Command::DeadLetters(command) => command.run(&url).await?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
