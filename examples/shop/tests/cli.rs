//! The example service binary as a deployment runs it: `orders-service check`, configured by
//! a file and `CONEJO_*` variables, judged by its exit code. Needs the broker in `AMQP_URL`
//! (default: the local one).

use std::{
    process::{Command, Output},
    time::{Duration, Instant},
};

fn amqp_url() -> String {
    std::env::var("AMQP_URL")
        .ok()
        .filter(|url| !url.trim().is_empty())
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// Runs `orders-service` with only the given variables (nothing inherited but `PATH`).
fn orders_service(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_orders-service"));
    command.env_clear().args(args);
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("orders-service runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_passes_against_the_broker() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/orders-service.toml");
    let url = amqp_url();
    let output = orders_service(
        &["--config", file, "check"],
        &[("CONEJO_URL", &url), ("CONEJO_LOG_FORMAT", "json")],
    );
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("queue shop.orders: ok") && stdout.ends_with("check passed\n"),
        "{stdout}"
    );
    // The file's concurrency (16) over the code's (32); JSON logs on stderr.
    assert!(stdout.contains("concurrency 16, prefetch 250"), "{stdout}");
    assert!(
        stderr.contains("\"message\":\"check: connected\""),
        "{stderr}"
    );
}

#[test]
fn an_invalid_setting_exits_2_naming_the_variable() {
    let output = orders_service(
        &["check"],
        &[("CONEJO_QUEUES__SHOP_ORDERS__CONCURRENCY", "0")],
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr.trim(),
        "error: invalid configuration: CONEJO_QUEUES__SHOP_ORDERS__CONCURRENCY: must be at least 1"
    );
    // A queue the service does not have.
    let output = orders_service(&["check"], &[("CONEJO_QUEUES__ORDERS__PREFETCH", "5")]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("CONEJO_QUEUES__ORDERS__PREFETCH: no such queue is registered"),
        "{stderr}"
    );
}

#[test]
fn an_unreachable_broker_fails_the_check_at_once() {
    let started = Instant::now();
    let output = orders_service(
        &["check"],
        &[("CONEJO_URL", "amqp://guest:hunter2@127.0.0.1:1/%2f")],
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(
        stderr.contains("error: cannot connect to amqp://guest:***@127.0.0.1:1/%2f"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn refused_credentials_are_reported_once_by_conejo_without_lapins_noise() {
    let url = amqp_url().replacen("guest:guest@", "guest:not-the-password@", 1);
    assert_ne!(url, amqp_url(), "the broker's URL has no guest:guest");
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/orders-service.toml");
    // An explicit level, as an operator sets it: lapin's own lines stay off all the same.
    let output = orders_service(
        &["--config", file, "check"],
        &[("CONEJO_URL", &url), ("CONEJO_LOG_LEVEL", "info")],
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("ACCESS_REFUSED"), "{stderr}");
    assert!(!stderr.contains("not-the-password"), "{stderr}");
    assert!(!stderr.contains("lapin"), "{stderr}");
    assert!(!stderr.contains("Exponential backoff"), "{stderr}");
}
