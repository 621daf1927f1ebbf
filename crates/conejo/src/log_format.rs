//! The log format setting, shared by `conejo::settings` and `conejo::logging`.

use std::{fmt, str::FromStr};

/// How logs are written: human-readable text lines, or one JSON object per line (for log
/// collectors).
///
/// ```
/// use conejo::LogFormat;
///
/// assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
/// assert_eq!(LogFormat::default(), LogFormat::Text);
/// assert!("yaml".parse::<LogFormat>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LogFormat {
    /// `2026-11-26T19:00:00.000Z  INFO conejo: consuming queue=orders …` (the default).
    #[default]
    Text,
    /// `{"timestamp":"…","level":"INFO","fields":{"message":"consuming","queue":"orders"},…}`.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("unknown log format {raw:?} (text or json)")),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

#[cfg(feature = "cli")]
impl clap::ValueEnum for LogFormat {
    fn value_variants<'a>() -> &'a [Self] {
        &[LogFormat::Text, LogFormat::Json]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }))
    }
}
