//! Settings onto the builder: `build()` applies them over what the code set.

use super::{
    Settings,
    queue::{QueueSettings, Target, env_name},
};
use crate::{Builder, Conejo, Error, app::ApplySettings};

impl Settings {
    /// Applies these settings onto `builder` (called by `build()`, so that the settings win
    /// over the code whatever the order of the calls). A queue setting must tune a
    /// registered queue.
    fn apply(&self, builder: &mut Builder) -> Result<(), Error> {
        if let Some(urls) = &self.urls {
            builder.given.urls = Ok(urls.clone());
        }
        if let Some(name) = &self.connection_name {
            builder.given.connection_name = Some(name.clone());
        }
        if let Some(timeout) = self.connect_timeout {
            builder.config.connect.timeout = timeout;
        }
        if let Some(wait) = self.wait_for_broker {
            builder.config.connect.wait_for_broker = wait;
        }
        if let Some(timeout) = self.shutdown_timeout {
            builder.config.timing.shutdown_timeout = timeout;
        }
        #[cfg(feature = "health")]
        if let Some(address) = self.health_addr {
            builder.health = Some(address);
        }
        #[cfg(not(feature = "health"))]
        if self.health_addr.is_some() {
            return Err(Error::InvalidSetting {
                key: "health_addr (CONEJO_HEALTH_ADDR)".to_owned(),
                reason: "this build of conejo serves no health endpoint: enable its `health` \
                         feature"
                    .to_owned(),
            });
        }
        for entry in &self.queues {
            let matching: Vec<&str> = builder
                .queues
                .iter()
                .filter(|spec| entry.target.matches(&spec.name))
                .map(|spec| &*spec.name)
                .collect();
            match matching.as_slice() {
                [_] => {}
                [] => {
                    let registered: Vec<String> = builder
                        .queues
                        .iter()
                        .map(|spec| match entry.target {
                            Target::Exact(_) => format!("'{}'", spec.name),
                            Target::Env(_) => {
                                format!("'{}' as {}", spec.name, env_name(&spec.name))
                            }
                        })
                        .collect();
                    return Err(Error::InvalidSetting {
                        key: entry.key.clone(),
                        reason: format!(
                            "no such queue is registered (registered: {})",
                            if registered.is_empty() {
                                "none".to_owned()
                            } else {
                                registered.join(", ")
                            }
                        ),
                    });
                }
                several if matches!(entry.target, Target::Env(_)) => {
                    return Err(Error::InvalidSetting {
                        key: entry.key.clone(),
                        reason: format!(
                            "names several queues ({}): set it in the file, by exact name",
                            several.join(", ")
                        ),
                    });
                }
                // The same name twice: `build()` reports it.
                _ => {}
            }
        }
        for spec in &mut builder.queues {
            let settings = self.queue(&spec.name);
            if settings != QueueSettings::default() {
                spec.config = settings.apply(spec.config.clone());
            }
        }
        Ok(())
    }
}

impl ApplySettings for Settings {
    fn apply_to(&self, builder: &mut Builder) -> Result<(), Error> {
        self.apply(builder)
    }
}

impl Builder {
    /// Settings from a file and the environment ([`settings`](crate::settings)): applied by
    /// [`build`](Self::build) over what the code set, whatever the order of the calls, and
    /// checked there: a queue setting must name a registered queue. Replaces settings given
    /// before.
    #[cfg(feature = "config")]
    #[cfg_attr(docsrs, doc(cfg(feature = "config")))]
    pub fn settings(mut self, settings: &crate::settings::Settings) -> Self {
        self.settings = Some(Box::new(settings.clone()));
        self
    }
}

impl Conejo {
    /// Starts building a service configured by `settings` (from a file and the environment,
    /// see [`settings`](crate::settings)): it connects to their `url`, or to
    /// [`DEFAULT_URL`](crate::settings::DEFAULT_URL) when they name none. Same as
    /// `Conejo::builder(url).settings(settings)`.
    ///
    /// ```no_run
    /// # struct Orders;
    /// # impl conejo::Handler for Orders {
    /// #     type Message = Vec<u8>;
    /// #     async fn handle(&self, _: Vec<u8>, _: &conejo::Context) -> Result<(), conejo::HandlerError> { Ok(()) }
    /// # }
    /// # async fn run() -> Result<(), conejo::Error> {
    /// use conejo::{Conejo, settings::Settings};
    ///
    /// // CONEJO_URL, CONEJO_QUEUES__ORDERS__CONCURRENCY=8, …
    /// let settings = Settings::load(None)?;
    /// Conejo::builder_from(&settings).queue("orders", Orders).build()?.run().await
    /// # }
    /// ```
    #[cfg(feature = "config")]
    #[cfg_attr(docsrs, doc(cfg(feature = "config")))]
    pub fn builder_from(settings: &crate::settings::Settings) -> Builder {
        Conejo::builder(crate::settings::DEFAULT_URL).settings(settings)
    }
}
