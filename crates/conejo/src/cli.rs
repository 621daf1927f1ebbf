//! `run` and `check` for a service binary, with `--config` and `--log-format` (feature
//! `cli`).
//!
//! ```no_run
//! use conejo::{Context, Handler, HandlerError, Json, QueueConfig};
//!
//! #[derive(serde::Deserialize)]
//! struct Order { id: u64 }
//!
//! struct Orders;
//! impl Handler for Orders {
//!     type Message = Json<Order>;
//!     async fn handle(&self, Json(order): Json<Order>, _: &Context) -> Result<(), HandlerError> {
//!         tracing::info!(order = order.id, "stored");
//!         Ok(())
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     // orders-service [run]            consume until SIGINT/SIGTERM
//!     // orders-service check            check the settings and the broker, consume nothing
//!     // orders-service --config conejo.toml --log-format json
//!     conejo::cli::main(|conejo| conejo.queue_with("orders", Orders, QueueConfig::new().concurrency(8)))
//!         .await
//! }
//! ```
//!
//! [`main`] parses the command line, loads the [settings](crate::settings) (the `--config`
//! file or `CONEJO_CONFIG`, then `CONEJO_*` variables, then `--log-format`), installs the
//! [log subscriber](crate::logging::init), hands the closure a builder made with
//! [`Conejo::builder_from`](crate::Conejo::builder_from) to register the handlers, then runs
//! the command. Exit codes: 0 success, 1 failure (the broker cannot be reached, a topology
//! error…), 2 invalid configuration or command line. Errors are printed to stderr.
//!
//! To add commands of your own, put [`Options`] and [`Command`] in your own clap parser and
//! call [`Options::settings`] and [`Command::execute`].

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;

use crate::{Builder, Conejo, Error, LogFormat, logging, settings::Settings};

/// The options of a service binary.
#[derive(Debug, Clone, Default, clap::Args)]
#[non_exhaustive]
pub struct Options {
    /// A TOML configuration file; CONEJO_* environment variables override it.
    #[arg(
        long,
        short = 'c',
        env = "CONEJO_CONFIG",
        value_name = "FILE",
        global = true
    )]
    pub config: Option<PathBuf>,
    /// Log format, overriding the `log_format` setting.
    #[arg(long, value_enum, value_name = "FORMAT", global = true)]
    pub log_format: Option<LogFormat>,
}

impl Options {
    /// The settings: the configuration file (if any), `CONEJO_*` variables on top, then
    /// these options.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] naming the key at fault.
    pub fn settings(&self) -> Result<Settings, Error> {
        let mut settings = Settings::load(self.config.as_deref())?;
        if let Some(format) = self.log_format {
            settings.set_log_format(format);
        }
        Ok(settings)
    }
}

/// What the service binary does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::Subcommand)]
#[non_exhaustive]
pub enum Command {
    /// Consume until SIGINT or SIGTERM, then shut down gracefully (the default).
    #[default]
    Run,
    /// Check the settings and the broker's topology, consume nothing; exit 0 if all is well.
    ///
    /// Connects once (no waiting for the broker), declares the exchanges, queues, bindings
    /// and dead-letter topology `run` declares (creating what is missing, as `run` would),
    /// and disconnects.
    Check,
}

impl Command {
    /// Builds the service and runs the command; `check` prints its report to stdout.
    ///
    /// # Errors
    /// The configuration's ([`Builder::build`]), then the command's: [`Conejo::run`],
    /// [`Conejo::check`].
    pub async fn execute(self, mut builder: Builder) -> Result<(), Error> {
        // `check` serves no health endpoint: its port may be the running service's.
        builder.checking = self == Command::Check;
        let service = builder.build()?;
        match self {
            Command::Run => service.run().await,
            Command::Check => {
                let report = service.check().await?;
                print!("{report}");
                println!("check passed");
                Ok(())
            }
        }
    }
}

/// The command line of a service binary: [`Options`] and an optional [`Command`].
#[derive(Debug, Clone, Parser)]
// The help shows no description: this doc comment is about conejo, not the binary.
#[command(about = None, long_about = None)]
#[non_exhaustive]
pub struct Cli {
    /// The options.
    #[command(flatten)]
    pub options: Options,
    /// The command; `run` when none is given.
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    /// Runs the service binary as parsed: see [`main`].
    pub async fn main(self, service: impl FnOnce(Builder) -> Builder) -> ExitCode {
        let settings = match self.options.settings() {
            Ok(settings) => settings,
            Err(error) => return fail(&error),
        };
        if let Err(error) = logging::init(
            settings.log_format().unwrap_or_default(),
            settings.log_level(),
        ) {
            return fail(&error);
        }
        let builder = service(Conejo::builder_from(&settings));
        match self.command.unwrap_or_default().execute(builder).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => fail(&error),
        }
    }
}

/// Parses the command line and runs the service: `service` registers the handlers on a
/// builder configured by the settings. See the [module](self) for an example.
pub async fn main(service: impl FnOnce(Builder) -> Builder) -> ExitCode {
    Cli::parse().main(service).await
}

/// Prints `error` and its causes to stderr; the exit code says whether it is the
/// configuration's (2) or not (1).
fn fail(error: &Error) -> ExitCode {
    let mut message = format!("error: {error}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        // Some errors repeat their source in their own message.
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    eprintln!("{message}");
    if is_configuration(error) {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}

/// Errors a deployment fixes in its configuration, not in its broker.
fn is_configuration(error: &Error) -> bool {
    matches!(
        error,
        Error::InvalidUrl { .. } | Error::InvalidConfig { .. } | Error::InvalidSetting { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands_and_options() {
        let cli = Cli::try_parse_from(["svc"]).unwrap();
        assert_eq!(cli.command, None);
        let cli =
            Cli::try_parse_from(["svc", "check", "--log-format", "json", "-c", "a.toml"]).unwrap();
        assert_eq!(cli.command, Some(Command::Check));
        assert_eq!(cli.options.log_format, Some(LogFormat::Json));
        assert_eq!(cli.options.config, Some(PathBuf::from("a.toml")));
        assert!(Cli::try_parse_from(["svc", "--log-format", "yaml"]).is_err());
        assert!(Cli::try_parse_from(["svc", "consume"]).is_err());
    }
}
