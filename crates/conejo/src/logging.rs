//! A `tracing` subscriber for services: text or JSON lines on stderr (feature `logging`).
//!
//! conejo logs through `tracing` (target `conejo`) what happens and what it does next:
//! `connected`, `consuming queue=orders concurrency=16 prefetch=250`, `connection lost;
//! reconnecting`, `stopped cleanly`. Nothing is printed until the application installs a
//! subscriber; [`init`] is one line for that.
//!
//! ```
//! use conejo::{LogFormat, logging};
//!
//! // Text lines, `info` for everything but lapin (which reports connection events that
//! // conejo reports itself); `RUST_LOG` replaces that default.
//! logging::init(LogFormat::Text, None)?;
//! tracing::info!("service starting"); // conejo's logs and yours, on stderr
//! # Ok::<(), conejo::Error>(())
//! ```
//!
//! With `conejo::settings` (feature `config`) the format and the filter come
//! from the configuration: `logging::init(settings.log_format().unwrap_or_default(),
//! settings.log_level())`; `conejo::cli` (feature `cli`) does it for you.

use tracing_subscriber::EnvFilter;

use crate::{Error, LogFormat};

/// The filter used when neither a level nor `RUST_LOG` is given: conejo's and the
/// application's `info` logs; lapin's off, since conejo reports every connection event
/// itself, saying what it does next (lapin logs the same losses at `ERROR`).
pub const DEFAULT_FILTER: &str = "info,lapin=off";

/// Installs a global subscriber writing to stderr, as text or one JSON object per line.
///
/// `level` is a `tracing` filter (`info`, `warn,conejo=debug`); when it is `None`,
/// `RUST_LOG` is used if set, else [`DEFAULT_FILTER`]. Either way lapin's own logs stay off
/// unless the filter names lapin (`info,lapin=debug`): conejo reports every connection event
/// itself, and lapin's (`error doing IO`, `Exponential backoff attempts exhausted, aborting
/// recovery` — conejo does its own recovery) would only contradict it. Logs go to stderr, so a
/// command's own output (such as `check`'s report) stays alone on stdout. When a global
/// subscriber is already installed (by the application, or by an earlier call), it is kept
/// and this does nothing.
///
/// # Errors
/// [`Error::InvalidSetting`] (key `log_level`, or `RUST_LOG`) when the filter does not
/// parse.
pub fn init(format: LogFormat, level: Option<&str>) -> Result<(), Error> {
    let invalid =
        |key: &str, error: tracing_subscriber::filter::ParseError| Error::InvalidSetting {
            key: key.to_owned(),
            reason: format!("invalid log filter: {error}"),
        };
    let filter = match level {
        Some(level) => {
            EnvFilter::try_new(quiet_lapin(level)).map_err(|e| invalid("log_level", e))?
        }
        None => match std::env::var(EnvFilter::DEFAULT_ENV) {
            Ok(directives) if !directives.trim().is_empty() => {
                EnvFilter::try_new(quiet_lapin(&directives))
                    .map_err(|e| invalid(EnvFilter::DEFAULT_ENV, e))?
            }
            _ => EnvFilter::new(DEFAULT_FILTER),
        },
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Err: a global subscriber is already installed; it stays.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}

/// `directives` with `lapin=off` added, unless one of them names lapin.
fn quiet_lapin(directives: &str) -> String {
    let names_lapin = directives
        .split(',')
        .any(|directive| directive.trim_start().starts_with("lapin"));
    if names_lapin {
        directives.to_owned()
    } else {
        format!("{directives},lapin=off")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lapin_stays_quiet_unless_the_filter_names_it() {
        assert_eq!(quiet_lapin("info"), "info,lapin=off");
        assert_eq!(
            quiet_lapin("warn,conejo=debug"),
            "warn,conejo=debug,lapin=off"
        );
        assert_eq!(quiet_lapin("info, lapin=debug"), "info, lapin=debug");
        assert_eq!(quiet_lapin("lapin::io_loop=trace"), "lapin::io_loop=trace");
        // A trailing comma still parses.
        assert!(EnvFilter::try_new(quiet_lapin("info,")).is_ok());
    }

    #[test]
    fn an_invalid_filter_names_its_key() {
        let err = init(LogFormat::Json, Some("info,conejo=loud")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid configuration: log_level: invalid log filter"),
            "{err}"
        );
        // Installing twice keeps the first subscriber (a silent one: this process runs the
        // other unit tests too).
        init(LogFormat::Text, Some("off")).unwrap();
        init(LogFormat::Json, None).unwrap();
    }
}
