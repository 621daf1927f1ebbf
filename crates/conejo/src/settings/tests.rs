//! Loading, precedence and errors of settings.

use super::*;
use crate::{Conejo, Context, Handler, HandlerError, QueueConfig};

struct Noop;
impl Handler for Noop {
    type Message = Vec<u8>;
    async fn handle(&self, _: Vec<u8>, _: &Context) -> Result<(), HandlerError> {
        Ok(())
    }
}

const FILE: &str = r#"
    url = ["amqp://app:file-secret@n1:5672/%2f", "amqp://app:file-secret@n2:5672/%2f"]
    connection_name = "from-file"
    shutdown_timeout = "25s"
    wait_for_broker = false
    log_format = "json"

    [queues."shop.orders"]
    concurrency = 4
    prefetch = 20
    poison_limit = "off"
    retry = { max_attempts = 3, initial_delay = "500ms", max_delay = "10s" }

    [queues.thumbnails]
    timeout = "2m"
"#;

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn error(result: Result<Settings, Error>) -> String {
    match result {
        Ok(settings) => panic!("expected an error, got {settings:?}"),
        Err(error) => {
            assert!(matches!(error, Error::InvalidSetting { .. }), "{error:?}");
            error.to_string()
        }
    }
}

#[test]
fn the_environment_wins_over_the_file() {
    let settings = Settings::from_toml("conejo.toml", FILE)
        .unwrap()
        .with_env(env(&[
            ("CONEJO_SHUTDOWN_TIMEOUT", "5s"),
            ("CONEJO_QUEUES__SHOP_ORDERS__CONCURRENCY", "8"),
            ("CONEJO_QUEUES__shop_orders__RETRY__MAX_ATTEMPTS", "7"),
            ("CONEJO_LOG_LEVEL", "debug,lapin=off"),
            ("PATH", "/usr/bin"),
            ("CONEJO_CONFIG", "ignored.toml"),
            ("CONEJO_CONNECTION_NAME", " "), // empty: unset
        ]))
        .unwrap();
    assert_eq!(settings.shutdown_timeout(), Some(Duration::from_secs(5)));
    assert_eq!(settings.connection_name(), Some("from-file"));
    assert_eq!(settings.wait_for_broker(), Some(false));
    assert_eq!(settings.log_format(), Some(LogFormat::Json));
    assert_eq!(settings.log_level(), Some("debug,lapin=off"));
    assert_eq!(settings.urls().map(<[_]>::len), Some(2));
    let orders = settings.queue("shop.orders");
    assert_eq!(orders.concurrency(), Some(8)); // env
    assert_eq!(orders.prefetch(), Some(20)); // file
    assert_eq!(orders.max_attempts(), Some(7)); // env
    assert_eq!(orders.initial_delay(), Some(Duration::from_millis(500)));
    assert_eq!(orders.poison_limit(), Some(None));
    assert_eq!(
        settings.queue("thumbnails").timeout(),
        Some(Duration::from_secs(120))
    );
    assert_eq!(settings.queue("other"), QueueSettings::default());
    let shown = format!("{settings:?}");
    assert!(!shown.contains("file-secret"), "{shown}");
}

#[test]
fn settings_win_over_the_code_whatever_the_order() {
    let settings = Settings::from_toml("conejo.toml", FILE)
        .unwrap()
        .with_env(env(&[("CONEJO_CONNECT_TIMEOUT", "3s")]))
        .unwrap();
    let builder = Conejo::builder("amqp://localhost")
        .settings(&settings)
        .shutdown_timeout(Duration::from_secs(1)) // the file's 25 s wins
        .queue_with(
            "shop.orders",
            Noop,
            QueueConfig::new()
                .concurrency(1)
                .timeout(Duration::from_secs(9)),
        )
        .queue("thumbnails", Noop)
        .queue("untouched", Noop);
    let conejo = builder.build().unwrap();
    let shown = format!("{conejo:?}");
    assert!(shown.contains("concurrency: Some(4)"), "{shown}");
    assert!(shown.contains("prefetch: Some(20)"), "{shown}");
    // the code's timeout stays where no setting replaces it
    assert!(shown.contains("timeout: Some(9s)"), "{shown}");
    assert!(shown.contains("timeout: Some(120s)"), "{shown}");
    assert!(shown.contains("shutdown_timeout: 25s"), "{shown}");
    assert!(shown.contains("timeout: 3s"), "{shown}");
    assert!(shown.contains("from-file"), "{shown}");
    assert!(shown.contains("amqp://app:***@n1:5672"), "{shown}");
    assert!(!shown.contains("file-secret"), "{shown}");
}

#[test]
fn errors_name_the_key() {
    let cases: &[(&str, &str)] = &[
        (
            "[queues.orders]\nconcurrency = 0",
            "invalid configuration: conejo.toml: queues.orders.concurrency: must be at least 1",
        ),
        (
            "[queues.\"shop.orders\"]\nprefetch = 0",
            "invalid configuration: conejo.toml: queues.\"shop.orders\".prefetch: must be 1 to 65535 (0 would mean unlimited)",
        ),
        (
            "shutdown_timeout = 5",
            "invalid configuration: conejo.toml: shutdown_timeout: expected a duration such as \"30s\" or \"500ms\", found integer",
        ),
        (
            "[queues.orders.retry]\nmax_delay = \"2d\"",
            "invalid configuration: conejo.toml: queues.orders.retry.max_delay: must be between 1 ms and 24 h",
        ),
        (
            "[queues.orders]\nconcurency = 3",
            "invalid configuration: conejo.toml: queues.orders.concurency: unknown queue setting",
        ),
        (
            "shutdown-timeout = \"3s\"",
            "invalid configuration: conejo.toml: shutdown-timeout: unknown setting",
        ),
        (
            "log_format = \"yaml\"",
            "invalid configuration: conejo.toml: log_format: unknown log format \"yaml\" (text or json)",
        ),
    ];
    for (file, expected) in cases {
        let message = error(Settings::from_toml("conejo.toml", file));
        assert!(message.starts_with(expected), "{file}: {message}");
    }
    let cases: &[(&str, &str, &str)] = &[
        (
            "CONEJO_SHUTDOWN_TIMEOUT",
            "5 parsecs",
            "invalid configuration: CONEJO_SHUTDOWN_TIMEOUT: invalid duration \"5 parsecs\" (write e.g. \"500ms\", \"30s\", \"2m\")",
        ),
        (
            "CONEJO_QUEUES__ORDERS__CONCURRENCY",
            "eight",
            "invalid configuration: CONEJO_QUEUES__ORDERS__CONCURRENCY: invalid integer \"eight\"",
        ),
        (
            "CONEJO_QUEUES__ORDERS__POISON_LIMIT",
            "0",
            "invalid configuration: CONEJO_QUEUES__ORDERS__POISON_LIMIT: must be at least 1 (or \"off\")",
        ),
        (
            "CONEJO_WAIT_FOR_BROKER",
            "maybe",
            "invalid configuration: CONEJO_WAIT_FOR_BROKER: invalid boolean \"maybe\" (true or false)",
        ),
        (
            "CONEJO_CONNECT_TIMEOUT",
            "0s",
            "invalid configuration: CONEJO_CONNECT_TIMEOUT: must be between 1 ns and 10 min",
        ),
        (
            "CONEJO_HEALTH_ADDR",
            "localhost",
            "invalid configuration: CONEJO_HEALTH_ADDR: invalid socket address \"localhost\"",
        ),
        (
            "CONEJO_QUEUE__ORDERS__CONCURRENCY",
            "1",
            "invalid configuration: CONEJO_QUEUE__ORDERS__CONCURRENCY: unknown setting",
        ),
        (
            "CONEJO_QUEUES____CONCURRENCY",
            "1",
            "invalid configuration: CONEJO_QUEUES____CONCURRENCY: missing queue name",
        ),
    ];
    for (name, value, expected) in cases {
        let message = error(Settings::default().with_env(env(&[(name, value)])));
        assert!(message.starts_with(expected), "{name}={value}: {message}");
    }
}

#[test]
fn passwords_never_appear_in_errors() {
    let message = error(Settings::default().with_env(env(&[(
        "CONEJO_URL",
        "amqp://app:env-secret@host:notaport/",
    )])));
    assert!(
        message.starts_with("invalid configuration: CONEJO_URL: invalid AMQP URL"),
        "{message}"
    );
    assert!(!message.contains("env-secret"), "{message}");
    // A TOML syntax error on the URL's line: the parser's message quotes the line, ours not.
    let message = error(Settings::from_toml(
        "conejo.toml",
        "log_level = \"info\"\nurl = \"amqp://app:file-secret@host/\n",
    ));
    assert!(
        message.contains("conejo.toml: invalid TOML (line 2, column"),
        "{message}"
    );
    assert!(!message.contains("file-secret"), "{message}");
    let message = error(Settings::from_toml("conejo.toml", "url = 5"));
    assert!(
        message.contains("conejo.toml: url: expected a URL"),
        "{message}"
    );
}

#[test]
fn a_setting_for_an_unregistered_queue_is_an_error() {
    let settings = Settings::from_toml("conejo.toml", "[queues.ordrs]\nconcurrency = 2").unwrap();
    let err = Conejo::builder("amqp://localhost")
        .settings(&settings)
        .queue("orders", Noop)
        .build()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration: conejo.toml: queues.ordrs.concurrency: no such queue is \
         registered (registered: 'orders')"
    );
    let settings = Settings::default()
        .with_env(env(&[("CONEJO_QUEUES__SHOP_ORDER__PREFETCH", "5")]))
        .unwrap();
    let err = Conejo::builder("amqp://localhost")
        .settings(&settings)
        .queue("shop.orders", Noop)
        .build()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration: CONEJO_QUEUES__SHOP_ORDER__PREFETCH: no such queue is \
         registered (registered: 'shop.orders' as SHOP_ORDERS)"
    );
    let settings = Settings::default()
        .with_env(env(&[("CONEJO_QUEUES__A_B__PREFETCH", "5")]))
        .unwrap();
    let err = Conejo::builder("amqp://localhost")
        .settings(&settings)
        .queue("a.b", Noop)
        .queue("a-b", Noop)
        .build()
        .unwrap_err();
    assert!(
        err.to_string().contains("names several queues (a.b, a-b)"),
        "{err}"
    );
}

#[test]
fn builder_from_defaults_to_a_local_broker() {
    let conejo = Conejo::builder_from(&Settings::default())
        .queue("orders", Noop)
        .build()
        .unwrap();
    assert!(format!("{conejo:?}").contains("amqp://guest:***@127.0.0.1:5672/%2f"));
    // Files are read from disk; a missing one names its path.
    let message = error(Settings::load_from(
        Some(Path::new("/nonexistent/conejo.toml")),
        env(&[]),
    ));
    assert!(
        message.starts_with("invalid configuration: /nonexistent/conejo.toml: cannot read"),
        "{message}"
    );
}
