//! The set-up and clean-up most integration tests share: a broker connection, a queue of the
//! test's own, a service spawned from the builder the test writes, and the deletion of what
//! the test and conejo declared.

use conejo::QueueConfig;

use crate::{Broker, RunningService, init_tracing, unique_name};

/// A test's connection to the shared broker and the queue under test.
///
/// It does what every test does first and last, and nothing a test varies: the handler, the
/// [`QueueConfig`], the builder's settings and any other names stay in the test's body.
///
/// ```no_run
/// # use std::time::Duration;
/// # async fn test() -> anyhow::Result<()> {
/// use conejo::{Conejo, Context, HandlerError, handler_fn};
/// use conejo_tests::{Scenario, amqp_url, queue_config};
///
/// let scenario = Scenario::new("greetings").await?;
/// let Scenario { broker, queue } = &scenario;
/// broker.publish_bytes(queue, b"hello").await?;
/// let handler = handler_fn(|_: String, _: Context| async { Ok::<(), HandlerError>(()) });
/// let service = scenario.spawn(
///     Conejo::builder(amqp_url()).queue_with(queue, handler, queue_config().concurrency(4)),
/// )?;
/// service.wait_for(queue, Duration::from_secs(20), |s| s.acked == 1).await?;
/// scenario.finish(service).await
/// # }
/// ```
#[derive(Debug)]
pub struct Scenario {
    /// The test's own connection ([`Broker::connect`]): it publishes, counts, drains and
    /// deletes independently of the service under test.
    pub broker: Broker,
    /// The queue under test, `<prefix>.<pid>.<nanos>.<n>` ([`unique_name`]), so that tests
    /// can run in parallel against the same broker.
    pub queue: String,
}

impl Scenario {
    /// Installs the test's tracing ([`init_tracing`]), connects to the shared broker and
    /// declares a non-durable queue named after `prefix` (as [`Broker::declare_queue`] does:
    /// configure conejo's side with [`queue_config`]).
    pub async fn new(prefix: &str) -> anyhow::Result<Scenario> {
        let scenario = Scenario::undeclared(prefix).await?;
        scenario.broker.declare_queue(&scenario.queue).await?;
        Ok(scenario)
    }

    /// As [`Scenario::new`], without declaring the queue: conejo declares it (with its
    /// dead-letter queue, bindings or queue type), or the test does.
    pub async fn undeclared(prefix: &str) -> anyhow::Result<Scenario> {
        init_tracing();
        Ok(Scenario {
            broker: Broker::connect().await?,
            queue: unique_name(prefix),
        })
    }

    /// Builds the service the test configured and spawns it on the test's runtime.
    pub fn spawn(&self, builder: conejo::Builder) -> anyhow::Result<RunningService> {
        Ok(RunningService::spawn(builder.build()?))
    }

    /// Stops `service`, which must stop cleanly, then [`Scenario::cleanup`].
    pub async fn finish(self, service: RunningService) -> anyhow::Result<()> {
        service.stop().await??;
        self.cleanup().await
    }

    /// Deletes the queue and what conejo declared for it ([`Broker::delete_consumed_queue`]):
    /// the end of a test that stopped its service itself, to check the broker after the stop.
    pub async fn cleanup(self) -> anyhow::Result<()> {
        self.broker.delete_consumed_queue(&self.queue).await
    }
}

/// The [`QueueConfig`] that matches a queue the support library declares (non-durable, as
/// [`Broker::declare_queue`] and [`Scenario::new`] declare it): where a test's queue settings
/// start from.
pub fn queue_config() -> QueueConfig {
    QueueConfig::new().durable(false)
}
