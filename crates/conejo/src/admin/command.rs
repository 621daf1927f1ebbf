//! The clap subcommand and its human-readable output.

use std::borrow::Cow;
use std::io::Write;

use lapin::types::{AMQPValue, FieldTable};

use super::{
    AdminError, DEFAULT_SCAN_LIMIT, DeadLetter, DeadLetterSummary, ReplayReport, dlq_name,
};
use crate::AmqpUrl;

/// How much of a body [`DeadLetterCommand::Show`] prints.
const BODY_SHOWN: usize = 2048;

/// The dead-letter queue a command works on: named after the consumed queue
/// (`orders` → `orders.dlq`), or given as is with `--dlq`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
#[group(required = true, multiple = false)]
pub struct DeadLetterQueue {
    /// The consumed queue whose dead letters to work on: `orders` means `orders.dlq`.
    pub queue: Option<String>,
    /// The dead-letter queue itself, when it is not named `<queue>.dlq`.
    #[arg(long, value_name = "DLQ")]
    pub dlq: Option<String>,
}

impl DeadLetterQueue {
    /// The dead-letter queue of the consumed queue `queue`.
    #[must_use]
    pub fn named(queue: &str) -> Self {
        DeadLetterQueue {
            queue: Some(queue.to_owned()),
            dlq: None,
        }
    }

    /// The dead-letter queue `dlq`, whatever its name.
    #[must_use]
    pub fn dlq(dlq: &str) -> Self {
        DeadLetterQueue {
            queue: None,
            dlq: Some(dlq.to_owned()),
        }
    }

    /// The name of the dead-letter queue.
    #[must_use]
    pub fn name(&self) -> String {
        match (&self.dlq, &self.queue) {
            (Some(dlq), _) => dlq.clone(),
            (None, Some(queue)) => dlq_name(queue),
            // clap requires one of them; an empty name gives a clear "does not exist".
            (None, None) => String::new(),
        }
    }
}

/// Inspect and replay dead-lettered messages: a clap subcommand for a service binary.
///
/// ```no_run
/// use clap::Parser;
/// use conejo::admin::DeadLetterCommand;
///
/// /// The order service.
/// #[derive(Parser)]
/// enum Cli {
///     /// Consume orders.
///     Run,
///     /// Inspect and replay the dead letters: `orders-service dead-letters list orders`.
///     #[command(subcommand)]
///     DeadLetters(DeadLetterCommand),
/// }
///
/// #[tokio::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let url: conejo::AmqpUrl = std::env::var("AMQP_URL")?.parse()?;
///     match Cli::parse() {
///         Cli::Run => { /* conejo::Conejo::builder(…)…run().await? */ }
///         Cli::DeadLetters(command) => command.run(&url).await?,
///     }
///     Ok(())
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
#[non_exhaustive]
pub enum DeadLetterCommand {
    /// Count dead letters by reason and failure kind (they stay in place, in order).
    List {
        /// The dead-letter queue.
        #[command(flatten)]
        queue: DeadLetterQueue,
        /// Read at most this many messages.
        #[arg(long, default_value_t = DEFAULT_SCAN_LIMIT)]
        limit: u64,
    },
    /// Print the first dead letters (they stay in place, in order).
    Show {
        /// The dead-letter queue.
        #[command(flatten)]
        queue: DeadLetterQueue,
        /// How many messages to print.
        #[arg(short = 'n', long = "count", default_value_t = 10)]
        n: usize,
    },
    /// Move dead letters back to the queue they failed in, with fresh attempts.
    Replay {
        /// The dead-letter queue.
        #[command(flatten)]
        queue: DeadLetterQueue,
        /// Send every message to this queue instead of its original one.
        #[arg(long, value_name = "QUEUE")]
        to: Option<String>,
        /// Move at most this many messages.
        #[arg(long)]
        max: Option<u64>,
    },
}

impl DeadLetterCommand {
    /// Runs the command against the broker at `url` and prints the result on stdout.
    ///
    /// # Errors
    /// What [`summary`](super::summary), [`show`](super::show) or
    /// [`replay`](super::replay) return; [`AdminError::Output`] if stdout is closed.
    pub async fn run(&self, url: &AmqpUrl) -> Result<(), AdminError> {
        self.run_to(url, &mut std::io::stdout()).await
    }

    /// Runs the command against the broker at `url` and writes the result to `out`.
    ///
    /// # Errors
    /// As [`run`](Self::run).
    pub async fn run_to<W: Write>(&self, url: &AmqpUrl, out: &mut W) -> Result<(), AdminError> {
        match self {
            DeadLetterCommand::List { queue, limit } => {
                let summary = super::summary(url, &queue.name(), *limit).await?;
                write_summary(out, &summary)
            }
            DeadLetterCommand::Show { queue, n } => {
                let dlq = queue.name();
                let letters = super::show(url, &dlq, *n).await?;
                write_letters(out, &dlq, &letters)
            }
            DeadLetterCommand::Replay { queue, to, max } => {
                let report = super::replay(url, &queue.name(), to.as_deref(), *max).await?;
                write_report(out, &report)
            }
        }
        .and_then(|()| out.flush())
        .map_err(AdminError::Output)
    }
}

fn write_summary(out: &mut impl Write, summary: &DeadLetterSummary) -> std::io::Result<()> {
    let dlq = shown(&summary.dlq);
    if summary.inspected == 0 {
        return writeln!(out, "{dlq}: no dead letters");
    }
    if summary.complete {
        writeln!(out, "{dlq}: {} dead letters", summary.inspected)?;
    } else {
        writeln!(
            out,
            "{dlq}: {} ready, the first {} read (raise --limit to read more)",
            summary.ready, summary.inspected
        )?;
    }
    let rows: Vec<_> = summary
        .groups
        .iter()
        .map(|group| (or_dash(&group.reason), or_dash(&group.failure), group.count))
        .collect();
    let reason_width = rows.iter().map(|row| row.0.len()).max().unwrap_or(0).max(6);
    let failure_width = rows.iter().map(|row| row.1.len()).max().unwrap_or(0).max(7);
    writeln!(
        out,
        "  {:reason_width$}  {:failure_width$}  count",
        "reason", "failure"
    )?;
    for (reason, failure, count) in rows {
        writeln!(
            out,
            "  {reason:reason_width$}  {failure:failure_width$}  {count:>5}"
        )?;
    }
    if let (Some(oldest), Some(newest)) = (&summary.oldest_failure, &summary.newest_failure) {
        writeln!(out, "last failures from {oldest} to {newest}")?;
    }
    Ok(())
}

fn write_letters(out: &mut impl Write, dlq: &str, letters: &[DeadLetter]) -> std::io::Result<()> {
    let dlq = shown(dlq);
    if letters.is_empty() {
        return writeln!(out, "{dlq}: no dead letters");
    }
    writeln!(out, "{dlq}: the first {} dead letters", letters.len())?;
    for letter in letters {
        writeln!(out)?;
        write_letter(out, letter)?;
    }
    Ok(())
}

fn write_letter(out: &mut impl Write, letter: &DeadLetter) -> std::io::Result<()> {
    let headers = &letter.conejo;
    let text = or_dash;
    let int = |value: Option<i64>| value.map_or("-".to_owned(), |n| n.to_string());
    writeln!(
        out,
        "#{} reason={} failure={} attempts={}",
        letter.position,
        text(&headers.reason),
        text(&headers.failure),
        int(headers.attempt),
    )?;
    if let Some(error) = &headers.error {
        writeln!(out, "  error: {}", shown(error))?;
    }
    writeln!(
        out,
        "  from: queue={} exchange={} routing-key={}",
        text(&headers.original_queue),
        text(&headers.original_exchange),
        text(&headers.original_routing_key),
    )?;
    writeln!(
        out,
        "  failed: first={} last={}",
        text(&headers.first_failure_at),
        text(&headers.last_failure_at),
    )?;
    if headers.redeliveries.is_some() || headers.replayed.is_some() {
        writeln!(
            out,
            "  redeliveries={} replayed={}",
            int(headers.redeliveries),
            int(headers.replayed)
        )?;
    }
    let properties = properties(letter);
    if !properties.is_empty() {
        writeln!(out, "  properties: {}", properties.join(" "))?;
    }
    if !letter.other_headers.inner().is_empty() {
        writeln!(out, "  headers: {}", table(&letter.other_headers))?;
    }
    writeln!(out, "  body: {}", body(&letter.body))
}

/// The properties that are set, as `name=value`.
fn properties(letter: &DeadLetter) -> Vec<String> {
    let p = &letter.properties;
    let mut shown_properties = Vec::new();
    let mut add = |name: &str, value: Option<String>| {
        if let Some(value) = value {
            shown_properties.push(format!("{name}={}", shown(&value)));
        }
    };
    let text = |value: &Option<lapin::types::ShortString>| value.as_ref().map(ToString::to_string);
    add("message-id", text(p.message_id()));
    add("correlation-id", text(p.correlation_id()));
    add("content-type", text(p.content_type()));
    add("content-encoding", text(p.content_encoding()));
    add("type", text(p.kind()));
    add("app-id", text(p.app_id()));
    add("user-id", text(p.user_id()));
    add("reply-to", text(p.reply_to()));
    add("expiration", text(p.expiration()));
    add("timestamp", p.timestamp().map(|t| t.to_string()));
    add("delivery-mode", p.delivery_mode().map(|m| m.to_string()));
    add("priority", p.priority().map(|m| m.to_string()));
    shown_properties
}

/// The body: its text if it is UTF-8 (the first [`BODY_SHOWN`] bytes), else its size.
fn body(body: &[u8]) -> String {
    let Ok(text) = std::str::from_utf8(body) else {
        return format!("<{} bytes, not UTF-8>", body.len());
    };
    if text.len() <= BODY_SHOWN {
        return shown(text).into_owned();
    }
    let mut end = BODY_SHOWN;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", shown(&text[..end]), body.len())
}

fn table(table: &FieldTable) -> String {
    let entries: Vec<String> = table
        .inner()
        .iter()
        .map(|(key, value)| format!("{}={}", shown(key.as_str()), value_text(value)))
        .collect();
    entries.join(" ")
}

fn value_text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(text) => {
            format!("\"{}\"", shown(&String::from_utf8_lossy(text.as_bytes())))
        }
        AMQPValue::ShortString(text) => format!("\"{}\"", shown(text.as_str())),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(x) => x.to_string(),
        AMQPValue::Double(x) => x.to_string(),
        AMQPValue::DecimalValue(d) => format!("{}e-{}", d.value, d.scale),
        AMQPValue::Timestamp(t) => format!("timestamp:{t}"),
        AMQPValue::FieldArray(items) => {
            let items: Vec<String> = items.as_slice().iter().map(value_text).collect();
            format!("[{}]", items.join(", "))
        }
        AMQPValue::FieldTable(inner) => format!("{{{}}}", table(inner)),
        AMQPValue::ByteArray(bytes) => format!("<{} bytes>", bytes.as_slice().len()),
        AMQPValue::Void => "void".to_owned(),
    }
}

fn write_report(out: &mut impl Write, report: &ReplayReport) -> std::io::Result<()> {
    let dlq = shown(&report.dlq);
    let destinations: Vec<String> = report
        .destinations
        .iter()
        .map(|(queue, count)| format!("{count} to {}", shown(queue)))
        .collect();
    match report.replayed {
        0 => writeln!(out, "{dlq}: no message replayed")?,
        n => writeln!(out, "{dlq}: {n} replayed ({})", destinations.join(", "))?,
    }
    if report.max_reached {
        writeln!(out, "stopped at --max; more may be left")?;
    }
    if report.skipped > 0 {
        writeln!(
            out,
            "{} left in {dlq}: no queue to go back to (no conejo-original-queue; use --to)",
            report.skipped
        )?;
    }
    if !report.unroutable.is_empty() {
        writeln!(out, "{} left in {dlq}: not routed", report.unroutable.len())?;
        for unroutable in &report.unroutable {
            writeln!(
                out,
                "  message-id={} to {}: {}",
                or_dash(&unroutable.message_id),
                shown(&unroutable.queue),
                shown(&unroutable.reason),
            )?;
        }
    }
    Ok(())
}

/// The value shown, `-` when there is none, `""` when it is empty (the default exchange).
fn or_dash(value: &Option<String>) -> Cow<'_, str> {
    match value.as_deref() {
        None => Cow::Borrowed("-"),
        Some("") => Cow::Borrowed("\"\""),
        Some(text) => shown(text),
    }
}

/// `text` with control characters escaped, so that no message can drive the terminal.
fn shown(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::super::{ConejoHeaders, ReasonCount, Unroutable};
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: DeadLetterCommand,
    }

    fn parse(args: &[&str]) -> Result<DeadLetterCommand, clap::Error> {
        Cli::try_parse_from(std::iter::once("svc").chain(args.iter().copied())).map(|c| c.command)
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_queue_or_a_dlq_names_the_dead_letter_queue() {
        let DeadLetterCommand::List { queue, limit } = parse(&["list", "orders"]).unwrap() else {
            panic!("not list");
        };
        assert_eq!(
            (queue.name(), limit),
            ("orders.dlq".to_owned(), DEFAULT_SCAN_LIMIT)
        );
        let DeadLetterCommand::Show { queue, n } =
            parse(&["show", "--dlq", "odd", "-n", "3"]).unwrap()
        else {
            panic!("not show");
        };
        assert_eq!((queue.name(), n), ("odd".to_owned(), 3));
        assert_eq!(
            parse(&["replay", "orders", "--to", "orders-v2", "--max", "5"]).unwrap(),
            DeadLetterCommand::Replay {
                queue: DeadLetterQueue::named("orders"),
                to: Some("orders-v2".into()),
                max: Some(5),
            }
        );
        assert!(parse(&["list"]).is_err(), "a queue is required");
        assert!(
            parse(&["list", "orders", "--dlq", "x"]).is_err(),
            "not both"
        );
    }

    #[test]
    fn summary_output() {
        let summary = DeadLetterSummary {
            dlq: "orders.dlq".into(),
            ready: 12,
            inspected: 10,
            complete: false,
            groups: vec![
                ReasonCount {
                    reason: Some("attempts-exhausted".into()),
                    failure: Some("handler".into()),
                    count: 7,
                },
                ReasonCount {
                    reason: Some("poison".into()),
                    failure: None,
                    count: 3,
                },
            ],
            oldest_failure: Some("2026-11-26T16:40:01.123Z".into()),
            newest_failure: Some("2026-11-26T17:00:00.000Z".into()),
        };
        let mut out = Vec::new();
        write_summary(&mut out, &summary).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "orders.dlq: 12 ready, the first 10 read (raise --limit to read more)\n\
             \x20 reason              failure  count\n\
             \x20 attempts-exhausted  handler      7\n\
             \x20 poison              -            3\n\
             last failures from 2026-11-26T16:40:01.123Z to 2026-11-26T17:00:00.000Z\n"
        );
    }

    #[test]
    fn a_letter_is_printed_without_control_characters() {
        let mut other = FieldTable::default();
        other.insert("tenant".into(), AMQPValue::LongString("acme".into()));
        let letter = DeadLetter {
            position: 1,
            properties: lapin::BasicProperties::default()
                .with_message_id("m-1".into())
                .with_content_type("text/plain".into()),
            conejo: ConejoHeaders {
                reason: Some("rejected".into()),
                failure: Some("decode".into()),
                error: Some("bad \x1b[31mred\x1b[0m input\n".into()),
                attempt: Some(1),
                original_queue: Some("orders".into()),
                ..ConejoHeaders::default()
            },
            other_headers: other,
            body: b"hello\x07".to_vec(),
        };
        let mut out = Vec::new();
        write_letter(&mut out, &letter).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(!out.contains('\x1b') && !out.contains('\x07'), "{out}");
        assert!(
            out.contains("#1 reason=rejected failure=decode attempts=1"),
            "{out}"
        );
        assert!(
            out.contains(r"error: bad \u{1b}[31mred\u{1b}[0m input\n"),
            "{out}"
        );
        assert!(
            out.contains("properties: message-id=m-1 content-type=text/plain"),
            "{out}"
        );
        assert!(out.contains("headers: tenant=\"acme\""), "{out}");
        assert!(out.contains(r"body: hello\u{7}"), "{out}");
        assert_eq!(body(&[0xff, 0xfe]), "<2 bytes, not UTF-8>");
        assert!(body("é".repeat(2000).as_bytes()).ends_with("… (4000 bytes in all)"));
    }

    #[test]
    fn replay_output() {
        let report = ReplayReport {
            dlq: "orders.dlq".into(),
            replayed: 3,
            destinations: [("orders".to_owned(), 3)].into(),
            skipped: 1,
            unroutable: vec![Unroutable {
                message_id: Some("m-9".into()),
                queue: "gone".into(),
                reason: "NO_ROUTE (312)".into(),
            }],
            max_reached: false,
        };
        let mut out = Vec::new();
        write_report(&mut out, &report).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "orders.dlq: 3 replayed (3 to orders)\n\
             1 left in orders.dlq: no queue to go back to (no conejo-original-queue; use --to)\n\
             1 left in orders.dlq: not routed\n\
             \x20 message-id=m-9 to gone: NO_ROUTE (312)\n"
        );
    }
}
