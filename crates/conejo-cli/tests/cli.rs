//! The `conejo` binary as an operator runs it, without a broker: help and bad URLs never
//! show the password.

use std::process::{Command, Output};

const SECRET: &str = "hunter2-not-shown";

fn conejo(args: &[&str], url: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_conejo"))
        .args(args)
        .env("AMQP_URL", url)
        .output()
        .expect("the conejo binary runs")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn help_hides_the_url_from_the_environment() {
    let url = format!("amqp://ops:{SECRET}@broker.invalid:5672/%2f");
    for args in [
        &["--help"][..],
        &["dead-letters", "--help"],
        &["dead-letters", "replay", "--help"],
    ] {
        let output = conejo(args, &url);
        assert!(output.status.success(), "{args:?}: {}", text(&output));
        let shown = text(&output);
        assert!(shown.contains("--url"), "{shown}");
        assert!(
            !shown.contains(SECRET) && !shown.contains("guest"),
            "{shown}"
        );
    }
}

#[test]
fn bad_urls_fail_without_showing_the_password() {
    for url in [
        format!("http://ops:{SECRET}@broker.invalid/"),
        format!("amqp://ops:{SECRET}@broker.invalid:notaport/"),
        // A port nothing listens on: a connection error, after the URL was accepted.
        format!("amqp://ops:{SECRET}@127.0.0.1:1/%2f"),
    ] {
        let output = conejo(&["dead-letters", "list", "orders"], &url);
        assert!(!output.status.success(), "{url} was accepted");
        let shown = text(&output);
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(
            shown.contains("ops:***@") || shown.contains("invalid AMQP URL"),
            "{shown}"
        );
    }
}
