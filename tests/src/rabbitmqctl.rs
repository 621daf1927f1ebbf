//! The broker's own view of client connections, through `rabbitmqctl`.

use anyhow::{Context, anyhow, bail};
use serde_json::Value;
use std::process::Output;
use std::time::{Duration, Instant};

/// Timeout (seconds) handed to `rabbitmqctl` itself, so a wedged CLI call
/// cannot hang a test forever.
const CTL_TIMEOUT_SECS: u64 = 60;

/// Pause between two polls in the `wait_for_connection_*` helpers (on top of
/// the ~0.3 s a `rabbitmqctl` call takes).
const POLL_PAUSE: Duration = Duration::from_millis(50);

/// One AMQP connection as the broker lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerConnection {
    /// The broker-side connection name, e.g. `"127.0.0.1:54321 -> 127.0.0.1:5672"`.
    /// It changes with every new TCP connection, so it identifies a connection
    /// instance (a reconnect gives a new one).
    pub name: String,
    /// The `connection_name` client property the client sent, if any
    /// (lapin: `ConnectionProperties::with_connection_name`).
    pub connection_name: Option<String>,
    /// The broker's connection state: `"running"`, `"blocked"`, `"blocking"`,
    /// `"starting"`, `"closing"`, …
    pub state: String,
}

/// The `rabbitmqctl` binary: the `RABBITMQCTL` environment variable if set and
/// non-empty, otherwise `rabbitmqctl` from `PATH`.
fn rabbitmqctl_bin() -> String {
    match std::env::var("RABBITMQCTL") {
        Ok(bin) if !bin.trim().is_empty() => bin,
        _ => "rabbitmqctl".to_owned(),
    }
}

fn list_connections_args() -> Vec<String> {
    [
        "-q",
        "list_connections",
        "name",
        "client_properties",
        "state",
        "--formatter",
        "json",
        "--timeout",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain(std::iter::once(CTL_TIMEOUT_SECS.to_string()))
    .collect()
}

fn spawn_error(bin: &str, err: std::io::Error) -> anyhow::Error {
    if err.kind() == std::io::ErrorKind::NotFound {
        anyhow!(
            "`{bin}` not found: the broker-side checks need rabbitmqctl on PATH \
             (or its path in the RABBITMQCTL environment variable)"
        )
    } else {
        anyhow!(err).context(format!("failed to run `{bin}`"))
    }
}

fn check_output(bin: &str, args: &[String], output: Output) -> anyhow::Result<String> {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "`{bin} {}` failed ({}): stderr: {} stdout: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            stdout.trim()
        );
    }
    Ok(stdout)
}

/// Runs `rabbitmqctl -q list_connections name client_properties state
/// --formatter json` (binary overridable with `RABBITMQCTL`) and parses its
/// output. Blocks for the duration of the call (~0.3 s); from async code
/// prefer [`rabbitmqctl_connections_async`].
///
/// Fails with a clear error if the binary is missing or exits non-zero.
pub fn rabbitmqctl_connections() -> anyhow::Result<Vec<BrokerConnection>> {
    connections_via(&rabbitmqctl_bin())
}

fn connections_via(bin: &str) -> anyhow::Result<Vec<BrokerConnection>> {
    let args = list_connections_args();
    let output = std::process::Command::new(bin)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| spawn_error(bin, e))?;
    let stdout = check_output(bin, &args, output)?;
    parse_list_connections(&stdout)
}

/// Async twin of [`rabbitmqctl_connections`] (tokio process; does not block
/// the runtime). The child is killed if the future is dropped.
pub async fn rabbitmqctl_connections_async() -> anyhow::Result<Vec<BrokerConnection>> {
    let stdout = run_async(&rabbitmqctl_bin(), &list_connections_args()).await?;
    parse_list_connections(&stdout)
}

/// Parses the JSON that `rabbitmqctl list_connections name client_properties
/// state --formatter json` prints.
///
/// RabbitMQ 3.10 prints an array of objects whose `client_properties` is a
/// list of `[key, type, value]` triples (nested tables are again such lists),
/// e.g. `[["connection_name","longstr","xyz"],["product","longstr","lapin"]]`.
/// `[key, value]` pairs and plain JSON objects are accepted too. Empty output
/// means no connections.
pub fn parse_list_connections(stdout: &str) -> anyhow::Result<Vec<BrokerConnection>> {
    let trimmed = stdout.trim();
    if trimmed.is_empty() {
        return Ok(Vec::new());
    }
    let value: Value = match serde_json::from_str(trimmed) {
        Ok(v) => v,
        // Tolerate informational lines printed before the JSON document.
        Err(first_err) => match trimmed.find('[') {
            Some(start) if start > 0 => serde_json::from_str(&trimmed[start..])
                .with_context(|| format!("unparsable rabbitmqctl output: {trimmed}"))?,
            _ => {
                return Err(
                    anyhow!(first_err).context(format!("unparsable rabbitmqctl output: {trimmed}"))
                );
            }
        },
    };
    let rows = value
        .as_array()
        .ok_or_else(|| anyhow!("rabbitmqctl output is not a JSON array: {trimmed}"))?;
    rows.iter()
        .map(|row| {
            let obj = row
                .as_object()
                .ok_or_else(|| anyhow!("rabbitmqctl row is not a JSON object: {row}"))?;
            let name = obj
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("rabbitmqctl row without a string `name`: {row}"))?
                .to_owned();
            let state = obj.get("state").map(value_to_string).unwrap_or_default();
            let connection_name = obj
                .get("client_properties")
                .and_then(|props| client_property(props, "connection_name"))
                .map(value_to_string);
            Ok(BrokerConnection {
                name,
                connection_name,
                state,
            })
        })
        .collect()
}

/// Looks `key` up in a client-properties value of any of the accepted shapes.
fn client_property<'a>(props: &'a Value, key: &str) -> Option<&'a Value> {
    match props {
        Value::Object(map) => map.get(key),
        Value::Array(entries) => entries.iter().find_map(|entry| {
            let parts = entry.as_array()?;
            if parts.first()?.as_str()? != key {
                return None;
            }
            match parts.len() {
                // [key, type, value]
                3 => parts.get(2),
                // [key, value]
                2 => parts.get(1),
                _ => None,
            }
        }),
        _ => None,
    }
}

fn value_to_string(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// All broker connections whose `connection_name` client property equals
/// `connection_name` (usually zero or one; two while a reconnect overlaps
/// with the old connection's teardown).
pub fn find_connections(connection_name: &str) -> anyhow::Result<Vec<BrokerConnection>> {
    Ok(filter_named(rabbitmqctl_connections()?, connection_name))
}

pub(crate) fn pick(mut matching: Vec<BrokerConnection>) -> Option<BrokerConnection> {
    // Prefer a running connection over one that is starting or closing.
    let running = matching.iter().position(|c| c.state == "running");
    match running {
        Some(i) => Some(matching.swap_remove(i)),
        None => matching.into_iter().next(),
    }
}

fn filter_named(all: Vec<BrokerConnection>, connection_name: &str) -> Vec<BrokerConnection> {
    all.into_iter()
        .filter(|c| c.connection_name.as_deref() == Some(connection_name))
        .collect()
}

/// The broker connection whose `connection_name` client property equals
/// `connection_name`, if any (a `"running"` one is preferred when several
/// match). Blocking; see [`find_connection_async`].
pub fn find_connection(connection_name: &str) -> anyhow::Result<Option<BrokerConnection>> {
    Ok(pick(filter_named(
        rabbitmqctl_connections()?,
        connection_name,
    )))
}

/// Async twin of [`find_connection`].
pub async fn find_connection_async(
    connection_name: &str,
) -> anyhow::Result<Option<BrokerConnection>> {
    Ok(pick(filter_named(
        rabbitmqctl_connections_async().await?,
        connection_name,
    )))
}

/// Polls the broker until a connection named `connection_name` is listed,
/// and returns it; errors after `timeout` (or on a `rabbitmqctl` failure).
pub async fn wait_for_connection_present(
    connection_name: &str,
    timeout: Duration,
) -> anyhow::Result<BrokerConnection> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(conn) = find_connection_async(connection_name).await? {
            return Ok(conn);
        }
        if Instant::now() >= deadline {
            bail!("no broker connection named {connection_name:?} appeared within {timeout:?}");
        }
        tokio::time::sleep(POLL_PAUSE).await;
    }
}

/// Polls the broker until no connection named `connection_name` is listed;
/// errors after `timeout` (naming what was still there) or on a
/// `rabbitmqctl` failure.
pub async fn wait_for_connection_absent(
    connection_name: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let still = filter_named(rabbitmqctl_connections_async().await?, connection_name);
        if still.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "broker connection(s) named {connection_name:?} still present after {timeout:?}: {still:?}"
            );
        }
        tokio::time::sleep(POLL_PAUSE).await;
    }
}

/// Force-closes the broker-side connection `broker_name` (a
/// [`BrokerConnection::name`]) as an operator would: looks up its Erlang pid
/// (`rabbitmqctl list_connections pid name`, table format: the JSON
/// formatter prints pids as `#PID<…>`, which `close_connection` rejects), then runs `rabbitmqctl
/// close_connection <pid> <reason>`. The client gets a `connection.close`
/// (320 CONNECTION_FORCED) carrying `reason`. Only that one client
/// connection is affected, never the broker's configuration.
pub async fn rabbitmqctl_close_connection(broker_name: &str, reason: &str) -> anyhow::Result<()> {
    let bin = rabbitmqctl_bin();
    let listing = run_async(&bin, &list_args("list_connections", &["pid", "name"])).await?;
    let pid = find_pid(&listing, broker_name)
        .ok_or_else(|| anyhow!("no broker connection named {broker_name:?} to close"))?;
    let close_args: Vec<String> = vec!["-q".into(), "close_connection".into(), pid, reason.into()];
    run_async(&bin, &close_args).await.map(drop)
}

async fn run_async(bin: &str, args: &[String]) -> anyhow::Result<String> {
    let output = tokio::process::Command::new(bin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| spawn_error(bin, e))?;
    check_output(bin, args, output)
}

/// `rabbitmqctl -q <command> <columns…> --no-table-headers --timeout …`: a listing, one row
/// of tab-separated columns a line.
fn list_args(command: &str, columns: &[&str]) -> Vec<String> {
    let mut args = vec!["-q".to_owned(), command.to_owned()];
    args.extend(columns.iter().map(|column| (*column).to_owned()));
    args.extend([
        "--no-table-headers".to_owned(),
        "--timeout".to_owned(),
        CTL_TIMEOUT_SECS.to_string(),
    ]);
    args
}

/// The names of every queue of the default vhost (`rabbitmqctl -q list_queues name`).
pub async fn rabbitmqctl_queue_names() -> anyhow::Result<Vec<String>> {
    let args = list_args("list_queues", &["name"]);
    let stdout = run_async(&rabbitmqctl_bin(), &args).await?;
    Ok(stdout
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect())
}

/// Messages of `queue` delivered and not yet acknowledged, as the broker counts them
/// (`rabbitmqctl list_queues name messages_unacknowledged`); 0 for a queue not found.
pub async fn rabbitmqctl_queue_unacked(queue: &str) -> anyhow::Result<u32> {
    let Some(unacked) = queue_column(queue, "messages_unacknowledged").await? else {
        return Ok(0);
    };
    unacked
        .parse()
        .with_context(|| format!("messages_unacknowledged {unacked:?} of {queue}"))
}

/// The arguments `queue` was declared with, as `rabbitmqctl list_queues name arguments`
/// prints them (an Erlang-style list such as `[{"x-queue-type","quorum"},…]`); `None` if
/// there is no such queue.
pub async fn rabbitmqctl_queue_arguments(queue: &str) -> anyhow::Result<Option<String>> {
    queue_column(queue, "arguments").await
}

/// One column of `queue`'s row of `rabbitmqctl list_queues name <column>`, trimmed; `None`
/// if there is no such queue.
async fn queue_column(queue: &str, column: &str) -> anyhow::Result<Option<String>> {
    let args = list_args("list_queues", &["name", column]);
    let stdout = run_async(&rabbitmqctl_bin(), &args).await?;
    Ok(stdout.lines().find_map(|line| {
        let (name, value) = line.trim().split_once('\t')?;
        (name == queue).then(|| value.trim().to_owned())
    }))
}

/// The prefetch count of each consumer on `queue`, as the broker applies it
/// (`rabbitmqctl list_consumers queue_name prefetch_count`).
pub async fn rabbitmqctl_consumer_prefetch(queue: &str) -> anyhow::Result<Vec<u32>> {
    let args = list_args("list_consumers", &["queue_name", "prefetch_count"]);
    let stdout = run_async(&rabbitmqctl_bin(), &args).await?;
    stdout
        .lines()
        .filter_map(|line| line.trim().rsplit_once('\t'))
        .filter(|(name, _)| *name == queue)
        .map(|(_, prefetch)| {
            prefetch
                .trim()
                .parse()
                .with_context(|| format!("prefetch_count {prefetch:?} of {queue}"))
        })
        .collect()
}

/// The `pid` of the row named `broker_name` in a tab-separated
/// `list_connections pid name` table (e.g.
/// `<rabbit@localhost.1795632044.1898.0>\t127.0.0.1:44528 -> 127.0.0.1:5672`).
fn find_pid(listing: &str, broker_name: &str) -> Option<String> {
    listing.lines().find_map(|line| {
        let (pid, name) = line.split_once('\t')?;
        (name.trim() == broker_name && pid.starts_with('<')).then(|| pid.trim().to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE_3_10: &str = r#"[
{"name":"127.0.0.1:56538 -> 127.0.0.1:5672","client_properties":[["capabilities","table",[["authentication_failure_close","bool",true],["basic.nack","bool",true]]],["connection_name","longstr","xyz-é \"q\" ✓"],["platform","longstr","rust"],["product","longstr","lapin"],["version","longstr","4.12.3"]],"state":"running"}
,{"name":"127.0.0.1:56554 -> 127.0.0.1:5672","client_properties":[["capabilities","table",[["publisher_confirms","bool",true]]],["platform","longstr","rust"]],"state":"running"}
]
"#;

    #[test]
    fn parses_rabbitmq_3_10_triples() {
        let conns = parse_list_connections(SAMPLE_3_10).unwrap();
        assert_eq!(conns.len(), 2);
        assert_eq!(conns[0].name, "127.0.0.1:56538 -> 127.0.0.1:5672");
        assert_eq!(conns[0].connection_name.as_deref(), Some("xyz-é \"q\" ✓"));
        assert_eq!(conns[0].state, "running");
        assert_eq!(conns[1].connection_name, None);
    }

    #[test]
    fn parses_empty_and_other_shapes() {
        assert!(parse_list_connections("").unwrap().is_empty());
        assert!(parse_list_connections("[\n]\n").unwrap().is_empty());
        let pairs =
            r#"[{"name":"a","client_properties":[["connection_name","n1"]],"state":"running"}]"#;
        assert_eq!(
            parse_list_connections(pairs).unwrap()[0]
                .connection_name
                .as_deref(),
            Some("n1")
        );
        let object = r#"Listing connections ...
[{"name":"b","client_properties":{"connection_name":"n2"},"state":"blocked"}]"#;
        let conn = &parse_list_connections(object).unwrap()[0];
        assert_eq!(conn.connection_name.as_deref(), Some("n2"));
        assert_eq!(conn.state, "blocked");
        assert!(parse_list_connections("{}").is_err());
        assert!(parse_list_connections("Error: nodedown").is_err());
    }

    #[test]
    fn missing_binary_is_a_clear_error() {
        let err = connections_via("/nonexistent/rabbitmqctl").unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("not found") && msg.contains("RABBITMQCTL"),
            "{msg}"
        );
    }

    #[test]
    fn failing_binary_reports_exit_status() {
        // `false` ignores its arguments and exits 1.
        let err = connections_via("false").unwrap_err();
        assert!(format!("{err:#}").contains("failed"), "{err:#}");
    }

    #[test]
    fn finds_pid_in_table() {
        let table =
            "pid\tname\n<rabbit@localhost.1795632044.1898.0>\t127.0.0.1:44528 -> 127.0.0.1:5672\n";
        assert_eq!(
            find_pid(table, "127.0.0.1:44528 -> 127.0.0.1:5672").as_deref(),
            Some("<rabbit@localhost.1795632044.1898.0>")
        );
        assert_eq!(find_pid(table, "127.0.0.1:1 -> 127.0.0.1:5672"), None);
        assert_eq!(find_pid("", "x"), None);
    }

    #[test]
    fn pick_prefers_running() {
        let mk = |name: &str, state: &str| BrokerConnection {
            name: name.into(),
            connection_name: Some("x".into()),
            state: state.into(),
        };
        let picked = pick(vec![mk("old", "closing"), mk("new", "running")]).unwrap();
        assert_eq!(picked.name, "new");
        assert!(pick(Vec::new()).is_none());
    }
}
