//! The service's own settings — where the broker is, how to connect and reconnect, shutdown
//! and ack timing, the exchanges — written once: the builder fills them, `build()` validates
//! them, and the running service reads the very struct `build()` validated.

use std::time::Duration;

use crate::{
    Error, Exchange,
    broker::{AmqpUrl, DEFAULT_CONNECT_TIMEOUT, DEFAULT_RECONNECT_DELAY, TlsSetup},
    publish::PublishSettings,
};

/// Default time in-flight handlers get to finish at shutdown: well under Kubernetes' 30 s
/// grace period, leaving time to give messages back and close the connection.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

/// Default time a finished ack may wait to share its frame with others.
pub const DEFAULT_ACK_LINGER: Duration = Duration::from_millis(5);

/// RabbitMQ's default `consumer_timeout` (30 min): a delivery left unacked longer closes its
/// channel.
pub const DEFAULT_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Longest accepted shutdown timeout.
pub(crate) const MAX_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// Longest accepted ack linger.
const MAX_ACK_LINGER: Duration = Duration::from_secs(10);

/// Longest accepted connect timeout.
pub(crate) const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(600);

/// Longest accepted reconnection delay.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(3600);

/// Timing knobs shared by every queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// How long in-flight handlers may run once shutdown starts.
    pub(crate) shutdown_timeout: Duration,
    /// How long a finished ack may wait to be coalesced with others.
    pub(crate) ack_linger: Duration,
}

/// How conejo connects and reconnects.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectPolicy {
    /// How long one connection attempt (TCP, TLS, AMQP handshake) may take.
    pub(crate) timeout: Duration,
    /// At startup, wait for the broker (true) or fail at the first refused attempt.
    pub(crate) wait_for_broker: bool,
    /// Back-off between reconnection attempts, and between attempts to reopen a channel:
    /// initial delay and cap.
    pub(crate) backoff: (Duration, Duration),
}

/// Everything about a service that is not one of its queues, as it runs.
#[derive(Debug)]
pub(crate) struct ServiceConfig {
    /// The broker's addresses, tried in turn.
    pub(crate) urls: Vec<AmqpUrl>,
    /// Shown by the broker (management UI, `rabbitmqctl list_connections`).
    pub(crate) connection_name: String,
    /// Declared, in order, before the queues on every connection.
    pub(crate) exchanges: Vec<Exchange>,
    /// Shutdown deadline and ack linger.
    pub(crate) timing: Timing,
    /// The broker's `consumer_timeout`, as the user declares it (for a startup warning).
    pub(crate) consumer_timeout: Duration,
    /// Connection attempts and back-off (the consuming connection's and the publisher's).
    pub(crate) connect: ConnectPolicy,
    /// The TLS material read from the files, used by every connection attempt.
    pub(crate) tls: TlsSetup,
    /// How the service's publisher publishes (handlers' publishes, retry copies, dead
    /// letters).
    pub(crate) publish: PublishSettings,
    /// The in-memory broker to connect to instead of RabbitMQ (tests).
    #[cfg(any(test, feature = "test-util"))]
    pub(crate) memory: Option<crate::broker::memory::Memory>,
}

/// What the builder is given that `build()` must still parse or read.
#[derive(Debug)]
pub(crate) struct Unresolved {
    /// The URL list as parsed: a URL that does not parse is the error `build()` returns.
    pub(crate) urls: Result<Vec<AmqpUrl>, Error>,
    /// The connection's name, if the user set one (else the program's name).
    pub(crate) connection_name: Option<String>,
    /// TLS settings for `amqps://` URLs, whose files `build()` reads.
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<crate::TlsConfig>,
}

impl ServiceConfig {
    /// The defaults (no address yet: [`resolve`](Self::resolve) sets them).
    pub(crate) fn new() -> Self {
        ServiceConfig {
            urls: Vec::new(),
            connection_name: String::new(),
            exchanges: Vec::new(),
            timing: Timing {
                shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
                ack_linger: DEFAULT_ACK_LINGER,
            },
            consumer_timeout: DEFAULT_CONSUMER_TIMEOUT,
            connect: ConnectPolicy {
                timeout: DEFAULT_CONNECT_TIMEOUT,
                wait_for_broker: true,
                backoff: DEFAULT_RECONNECT_DELAY,
            },
            tls: TlsSetup::default(),
            publish: PublishSettings::default(),
            #[cfg(any(test, feature = "test-util"))]
            memory: None,
        }
    }

    /// Takes in what still had to be parsed or read, and checks every setting: what this
    /// returns is what runs.
    pub(crate) fn resolve(mut self, given: Unresolved) -> Result<Self, Error> {
        #[cfg(feature = "tls")]
        let (urls, tls) = {
            let mut urls = given.urls?;
            let tls = tls_setup(given.tls.as_ref(), &mut urls)?;
            (urls, tls)
        };
        #[cfg(not(feature = "tls"))]
        let (urls, tls) = {
            let urls = given.urls?;
            let tls = tls_setup(&urls)?;
            (urls, tls)
        };
        self.urls = urls;
        self.tls = tls;
        self.connection_name = given
            .connection_name
            .unwrap_or_else(crate::broker::program_name);
        self.validate()?;
        Ok(self)
    }

    fn validate(&self) -> Result<(), Error> {
        self.publish.validate()?;
        let timing = self.timing;
        if timing.shutdown_timeout.is_zero() || timing.shutdown_timeout > MAX_SHUTDOWN_TIMEOUT {
            return Err(Error::config(
                None,
                "shutdown timeout must be between 1 ns and 24 h",
            ));
        }
        if timing.ack_linger > MAX_ACK_LINGER {
            return Err(Error::config(None, "ack linger must be at most 10 s"));
        }
        if self.consumer_timeout.is_zero() {
            return Err(Error::config(None, "consumer timeout must be positive"));
        }
        let connect = self.connect;
        if connect.timeout.is_zero() || connect.timeout > MAX_CONNECT_TIMEOUT {
            return Err(Error::config(
                None,
                "connect timeout must be between 1 ns and 10 min",
            ));
        }
        let (initial, max) = connect.backoff;
        if initial.is_zero() || max < initial || max > MAX_RECONNECT_DELAY {
            return Err(Error::config(
                None,
                "reconnect delay: initial must be positive and at most max, max at most 1 h",
            ));
        }
        for (index, exchange) in self.exchanges.iter().enumerate() {
            if exchange.name.is_empty() || exchange.name.len() > 255 {
                return Err(Error::config(
                    None,
                    format!("exchange name '{}' must be 1 to 255 bytes", exchange.name),
                ));
            }
            if self.exchanges[..index]
                .iter()
                .any(|other| other.name == exchange.name)
            {
                return Err(Error::config(
                    None,
                    format!("exchange '{}' registered twice", exchange.name),
                ));
            }
        }
        Ok(())
    }
}

/// Checks that the URLs and the TLS settings agree, and reads the TLS files.
#[cfg(feature = "tls")]
fn tls_setup(config: Option<&crate::TlsConfig>, urls: &mut [AmqpUrl]) -> Result<TlsSetup, Error> {
    let Some(config) = config else {
        return Ok(TlsSetup::default());
    };
    if let Some(plain) = urls.iter().find(|url| !url.is_tls()) {
        return Err(Error::config(
            None,
            format!("TLS settings given, but {plain} is not an amqps:// URL"),
        ));
    }
    let setup = config.load()?;
    if config.uses_external_auth() {
        urls.iter_mut().for_each(AmqpUrl::use_external_auth);
    }
    Ok(setup)
}

/// Without the `tls` feature, an `amqps://` URL cannot work: say so now.
#[cfg(not(feature = "tls"))]
fn tls_setup(urls: &[AmqpUrl]) -> Result<TlsSetup, Error> {
    match urls.iter().find(|url| url.is_tls()) {
        Some(url) => Err(Error::config(
            None,
            format!(
                "{url} needs TLS, which this build of conejo lacks: enable conejo's `tls` \
                 feature (conejo = {{ version = \"…\", features = [\"tls\"] }})"
            ),
        )),
        None => Ok(TlsSetup::default()),
    }
}

impl ServiceConfig {
    /// The publishing connection's name: the service's, then `-publish`.
    pub(crate) fn publisher_name(&self) -> String {
        format!("{}-publish", self.connection_name)
    }
}
