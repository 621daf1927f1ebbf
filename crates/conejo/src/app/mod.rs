//! The builder and the service users run: register queues on a [`Builder`], `build()` it
//! into a [`Conejo`], run that until a signal.
//!
//! May use: everything below it (`engine`, `config`, `observe`, `service`, `handler`,
//! `broker`).

mod builder;
mod conejo;
mod signal;

#[cfg(feature = "config")]
pub(crate) use self::builder::ApplySettings;
#[cfg(feature = "test-util")]
pub(crate) use self::conejo::DeclaredNames;
pub use self::{
    builder::Builder,
    conejo::{Conejo, ShutdownHandle},
};

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::{Conejo, Context, Error, Handler, HandlerError};

    struct Noop;
    impl Handler for Noop {
        type Message = Vec<u8>;
        async fn handle(&self, _: Vec<u8>, _: &Context) -> Result<(), HandlerError> {
            Ok(())
        }
    }

    #[test]
    fn build_rejects_bad_configuration_before_connecting() {
        let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
        let err = Conejo::builder(url).build().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: no queue registered"
        );
        let err = Conejo::builder(url)
            .queue("a", Noop)
            .queue("a", Noop)
            .build()
            .unwrap_err();
        assert_eq!(err.queue(), Some("a"));
        let err = Conejo::builder("amqp://u:pw-xyz@host:99999/")
            .queue("a", Noop)
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::InvalidUrl { .. }));
        assert!(!err.to_string().contains("pw-xyz"));
        let conejo = Conejo::builder("amqp://u:pw-xyz@host/")
            .queue("a", Noop)
            .build()
            .unwrap();
        assert!(!format!("{conejo:?}").contains("pw-xyz"));
    }

    #[test]
    fn every_duration_is_bounded_in_build_overflow_included() {
        let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
        let builder = || Conejo::builder(url).queue("a", Noop);
        let bad = [
            ("shutdown", builder().shutdown_timeout(Duration::MAX)),
            ("shutdown", builder().shutdown_timeout(Duration::ZERO)),
            ("linger", builder().ack_linger(Duration::MAX)),
            ("connect", builder().connect_timeout(Duration::MAX)),
            ("connect", builder().connect_timeout(Duration::ZERO)),
            ("consumer", builder().consumer_timeout(Duration::ZERO)),
            (
                "reconnect",
                builder().reconnect_delay(Duration::from_secs(1), Duration::MAX),
            ),
            (
                "reconnect",
                builder().reconnect_delay(Duration::ZERO, Duration::from_secs(1)),
            ),
            (
                "timeout",
                Conejo::builder(url).queue_with(
                    "a",
                    Noop,
                    crate::QueueConfig::new().timeout(Duration::MAX),
                ),
            ),
        ];
        for (what, builder) in bad {
            let err = builder.build().unwrap_err();
            assert!(
                matches!(err, Error::InvalidConfig { .. }),
                "{what}: {err:?}"
            );
            assert!(err.to_string().contains(what), "{what}: {err}");
        }
        // The largest accepted values do not overflow once running: the shutdown deadline
        // and the linger are added to an Instant.
        let conejo = builder()
            .shutdown_timeout(Duration::from_secs(24 * 3600))
            .ack_linger(Duration::from_secs(10))
            .build()
            .unwrap();
        let now = std::time::Instant::now();
        assert!(
            now.checked_add(conejo.config.timing.shutdown_timeout)
                .is_some()
        );
        assert!(now.checked_add(conejo.config.timing.ack_linger).is_some());
    }

    #[test]
    fn a_handler_timeout_at_the_consumer_timeout_is_warned_about_in_build() {
        use std::sync::{Arc, Mutex};
        /// Collects what the subscriber writes.
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let build = |timeout: Duration| {
            let sink = Sink::default();
            let writer = sink.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish();
            tracing::subscriber::with_default(subscriber, || {
                Conejo::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
                    .consumer_timeout(Duration::from_secs(60))
                    .queue_with("slow", Noop, crate::QueueConfig::new().timeout(timeout))
                    .build()
                    .unwrap()
            });
            String::from_utf8(sink.0.lock().unwrap().clone()).unwrap()
        };
        let logged = build(Duration::from_secs(60));
        assert!(
            logged.contains("WARN")
                && logged.contains("queue=slow")
                && logged.contains("not below the broker's consumer_timeout"),
            "{logged}"
        );
        assert_eq!(build(Duration::from_secs(59)), "");
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn amqps_without_the_tls_feature_fails_in_build() {
        let err = Conejo::builder("amqps://u:pw-xyz@host:5671/%2f")
            .queue("a", Noop)
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
        assert!(
            err.to_string().contains("enable conejo's `tls` feature"),
            "{err}"
        );
        assert!(!err.to_string().contains("pw-xyz"));
    }

    #[cfg(feature = "tls")]
    #[test]
    fn tls_settings_are_checked_in_build() {
        use crate::TlsConfig;
        let err = Conejo::builder("amqp://u:p@host/")
            .tls(TlsConfig::new())
            .queue("a", Noop)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("not an amqps:// URL"), "{err}");
        let err = Conejo::builder("amqps://host/")
            .tls(TlsConfig::new().external_auth())
            .queue("a", Noop)
            .build()
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("external_auth needs a client certificate"),
            "{err}"
        );
        let err = Conejo::builder("amqps://host/")
            .tls(TlsConfig::new().ca_file("/nonexistent/ca.pem"))
            .queue("a", Noop)
            .build()
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("TLS ca_file /nonexistent/ca.pem: cannot read"),
            "{err}"
        );
        // The OS roots alone, no client certificate.
        let conejo = Conejo::builder("amqps://u:pw-xyz@host/")
            .queue("a", Noop)
            .build()
            .unwrap();
        assert!(!format!("{conejo:?}").contains("pw-xyz"));
    }
}
