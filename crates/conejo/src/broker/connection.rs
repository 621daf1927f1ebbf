//! The broker connection: opened on the connection runtime, and the channels and consumers
//! made from it.

use std::{future::Future, sync::Arc, time::Duration};

use lapin::{
    ConnectionProperties, ErrorKind,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions},
    types::{FieldTable, LongString, ShortString},
};

use crate::{
    AmqpUrl, Error, Exchange, QueueConfig, broker::runtime::ConnectionRuntime,
    broker::tls::TlsSetup, config::topology,
};

/// How long closing a channel or the connection may take before conejo gives up on it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// An open connection, bound to the connection runtime.
pub(crate) struct Connection {
    /// lapin's connection; its tasks live on `runtime`.
    inner: Arc<lapin::Connection>,
    /// Where every lapin call is made.
    runtime: Arc<ConnectionRuntime>,
}

/// A queue's consumer on its own channel: the channel's delivery tags belong to it alone,
/// which is what lets acknowledgements be coalesced (`multiple = true`).
pub(crate) struct QueueConsumer {
    /// The channel the consumer lives on; acknowledgements must go to this channel only.
    pub(crate) channel: lapin::Channel,
    /// The stream of deliveries.
    pub(crate) consumer: lapin::Consumer,
    /// Where the channel's calls are made.
    runtime: Arc<ConnectionRuntime>,
}

impl QueueConsumer {
    /// Runs `task` (the channel's settle task) on the connection runtime.
    pub(crate) fn spawn_on_connection_runtime(
        &self,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        self.runtime.spawn(task);
    }

    /// Asks the broker to stop delivering (basic.cancel, waiting at most `limit` for
    /// cancel-ok). Afterwards the stream yields what was already delivered, then ends.
    pub(crate) async fn cancel(&self, limit: Duration) -> Result<(), lapin::Error> {
        self.canceller().cancel(limit).await
    }

    /// What cancels this consumer, from another task.
    pub(crate) fn canceller(&self) -> Canceller {
        Canceller {
            channel: self.handle(),
            tag: self.consumer.tag(),
        }
    }

    /// Closes the channel (channel.close / close-ok, at most [`CLOSE_TIMEOUT`]).
    pub(crate) async fn close(&self) -> Result<(), lapin::Error> {
        self.handle().close().await
    }

    /// The channel without its stream of deliveries: what a channel that consumes no more
    /// needs (dropping the stream frees its buffer, which grew to a whole prefetch window
    /// at times).
    pub(crate) fn handle(&self) -> ChannelHandle {
        ChannelHandle {
            channel: self.channel.clone(),
            runtime: Arc::clone(&self.runtime),
        }
    }
}

/// A channel and the runtime its calls are made on.
pub(crate) struct ChannelHandle {
    channel: lapin::Channel,
    runtime: Arc<ConnectionRuntime>,
}

impl ChannelHandle {
    /// As [`QueueConsumer::close`].
    pub(crate) async fn close(self) -> Result<(), lapin::Error> {
        let ChannelHandle { channel, runtime } = self;
        runtime
            .run_within(CLOSE_TIMEOUT, "channel.close", async move {
                channel
                    .close(200, ShortString::from("conejo: shutdown"))
                    .await
            })
            .await
    }
}

/// Cancels one consumer ([`QueueConsumer::cancel`]), from any task.
pub(crate) struct Canceller {
    channel: ChannelHandle,
    tag: ShortString,
}

impl Canceller {
    /// As [`QueueConsumer::cancel`].
    pub(crate) async fn cancel(self, limit: Duration) -> Result<(), lapin::Error> {
        let Canceller {
            channel: ChannelHandle { channel, runtime },
            tag,
        } = self;
        runtime
            .run_within(limit, "basic.cancel", async move {
                channel
                    .basic_cancel(tag, BasicCancelOptions::default())
                    .await
            })
            .await
    }
}

impl Connection {
    /// Connects on the connection runtime.
    pub(crate) async fn open(
        url: &AmqpUrl,
        connection_name: &str,
        runtime: Arc<ConnectionRuntime>,
        timeout: Duration,
        tls: &TlsSetup,
    ) -> Result<Self, Error> {
        let properties = ConnectionProperties::default()
            .with_connection_name(LongString::from(connection_name))
            .with_client_property(
                ShortString::from("product"),
                LongString::from(concat!("conejo/", env!("CARGO_PKG_VERSION"))),
            );
        let uri = url.uri();
        let lapin_runtime = async_rs::Runtime::tokio_with_handle(runtime.handle().clone());
        // The checked TLS material, the same on every attempt (reconnections included).
        #[cfg(feature = "tls")]
        let connect = lapin::Connection::connect_uri_with_config(
            uri,
            properties,
            tls.lapin_config(),
            lapin_runtime,
        );
        #[cfg(not(feature = "tls"))]
        let connect = {
            let _ = tls;
            lapin::Connection::connect_uri_with_runtime(uri, properties, lapin_runtime)
        };
        let inner = runtime
            .run_within(timeout, "connect", connect)
            .await
            .map_err(|source| Error::Connect {
                url: url.redacted().to_owned(),
                source,
            })?;
        Ok(Connection {
            inner: Arc::new(inner),
            runtime,
        })
    }

    /// lapin's connection (for events and status).
    pub(crate) fn lapin(&self) -> &lapin::Connection {
        &self.inner
    }

    /// False once the connection failed or was closed.
    pub(crate) fn is_connected(&self) -> bool {
        self.inner.status().connected()
    }

    /// lapin's connection, shared (for the publisher).
    pub(crate) fn shared(&self) -> Arc<lapin::Connection> {
        Arc::clone(&self.inner)
    }

    /// Declares (or checks, when passive) the service's exchanges, in order.
    pub(crate) async fn declare_exchanges(&self, exchanges: &[Exchange]) -> Result<(), Error> {
        if exchanges.is_empty() {
            return Ok(());
        }
        let connection = Arc::clone(&self.inner);
        let exchanges = exchanges.to_vec();
        self.runtime
            .spawn(async move {
                let channel =
                    connection
                        .create_channel()
                        .await
                        .map_err(|source| Error::Topology {
                            what: "exchanges (open channel)".to_owned(),
                            source,
                        })?;
                for exchange in &exchanges {
                    exchange
                        .declare(&channel)
                        .await
                        .map_err(|source| Error::Topology {
                            what: format!("exchange '{}'", exchange.name),
                            source,
                        })?;
                }
                let _ = channel.close(200, ShortString::from("declared")).await;
                Ok(())
            })
            .await
            .unwrap_or_else(|join| {
                Err(Error::Runtime(std::io::Error::other(format!(
                    "exchange setup task failed: {join}"
                ))))
            })
    }

    /// Declares the queue's dead-letter topology (or checks the user's exchange), on a
    /// channel of its own: a refusal closes that channel, not the consumer's.
    pub(crate) async fn declare_dead_letter(
        &self,
        queue: &str,
        config: &QueueConfig,
    ) -> Result<(), Error> {
        let connection = Arc::clone(&self.inner);
        let route = config.dead_letter_route(queue);
        let durability = config.durability();
        let name = queue.to_owned();
        let declared = {
            let route = route.clone();
            self.runtime
                .run(async move {
                    let channel = connection.create_channel().await?;
                    let declared =
                        topology::declare_dead_letter(&channel, &name, &route, durability).await;
                    if channel.status().connected() {
                        let _ = channel.close(200, ShortString::from("declared")).await;
                    }
                    declared
                })
                .await
        };
        declared.map_err(|source| {
            if !route.owned && is_not_found(&source) {
                Error::DeadLetterExchangeNotFound {
                    queue: queue.to_owned(),
                    exchange: route.exchange,
                }
            } else if route.owned {
                Error::Topology {
                    what: format!(
                        "dead-letter exchange '{}' and queue '{}'",
                        route.exchange,
                        topology::dead_letter_queue_name(queue)
                    ),
                    source,
                }
            } else {
                Error::Topology {
                    what: format!("dead-letter exchange '{}'", route.exchange),
                    source,
                }
            }
        })
    }

    /// Opens a channel, applies the prefetch, declares the queue (or checks it exists) and
    /// its bindings, and starts consuming — in this order, so the prefetch is in force
    /// before the first delivery.
    pub(crate) async fn consume(
        &self,
        queue: &str,
        config: &QueueConfig,
        prefetch: u16,
        consumer_tag: String,
    ) -> Result<QueueConsumer, Error> {
        let (channel, _, consumer) = self
            .set_up_queue(queue, config, Some((prefetch, consumer_tag)))
            .await?;
        Ok(QueueConsumer {
            channel,
            consumer: consumer.expect("a consumer was asked for"),
            runtime: Arc::clone(&self.runtime),
        })
    }

    /// Opens a channel with the prefetch, then starts consuming the queue (declared on this
    /// connection already) there while cancelling the `old` consumer: both requests go out
    /// together, so the broker neither pauses the queue nor feeds both consumers for a round
    /// trip. On failure the old consumer may be cancelled or not; the fresh one is closed.
    pub(crate) async fn consume_instead(
        &self,
        queue: &str,
        prefetch: u16,
        consumer_tag: String,
        old: Canceller,
    ) -> Result<QueueConsumer, Error> {
        let connection = Arc::clone(&self.inner);
        let name = ShortString::from(queue);
        let setup = self.runtime.spawn(async move {
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| ("open channel", e))?;
            channel
                .basic_qos(prefetch, BasicQosOptions { global: false })
                .await
                .map_err(|e| ("qos", e))?;
            let (consumed, cancelled) = futures::join!(
                channel.basic_consume(
                    name,
                    ShortString::from(consumer_tag),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                ),
                old.channel
                    .channel
                    .basic_cancel(old.tag, BasicCancelOptions::default()),
            );
            let failed = match (consumed, cancelled) {
                (Ok(consumer), Ok(())) => return Ok((channel, consumer)),
                (Err(error), _) => ("consume", error),
                (Ok(_), Err(error)) => ("cancel the old consumer", error),
            };
            // Closing the fresh channel gives back what it may have received.
            let _ = channel
                .close(200, ShortString::from("conejo: not needed"))
                .await;
            Err(failed)
        });
        match setup.await {
            Ok(Ok((channel, consumer))) => Ok(QueueConsumer {
                channel,
                consumer,
                runtime: Arc::clone(&self.runtime),
            }),
            Ok(Err((step, source))) => Err(Error::QueueSetup {
                queue: queue.to_owned(),
                step,
                source,
            }),
            Err(join) => Err(Error::Runtime(std::io::Error::other(format!(
                "queue setup task failed: {join}"
            )))),
        }
    }

    /// Declares the queue (or checks it exists) and its bindings exactly as
    /// [`consume`](Self::consume) does, without consuming; then closes the channel. Returns
    /// the broker's answer to the declaration (messages ready, consumers).
    pub(crate) async fn declare_queue(
        &self,
        queue: &str,
        config: &QueueConfig,
    ) -> Result<(u32, u32), Error> {
        let (channel, declared, _) = self.set_up_queue(queue, config, None).await?;
        let _ = self
            .runtime
            .run_within(CLOSE_TIMEOUT, "channel.close", async move {
                channel.close(200, ShortString::from("checked")).await
            })
            .await;
        Ok(declared)
    }

    /// A queue's setup on a new channel: prefetch and consumer when `consume` is given,
    /// declaration (passive or not) and bindings always.
    async fn set_up_queue(
        &self,
        queue: &str,
        config: &QueueConfig,
        consume: Option<(u16, String)>,
    ) -> Result<(lapin::Channel, (u32, u32), Option<lapin::Consumer>), Error> {
        let connection = Arc::clone(&self.inner);
        let name = ShortString::from(queue);
        let options = QueueDeclareOptions {
            passive: !config.declare,
            durable: config.durable,
            exclusive: false,
            auto_delete: config.auto_delete,
            nowait: false,
        };
        let arguments = if config.declare {
            config.declared_arguments(queue)
        } else {
            FieldTable::default()
        };
        let bindings = config.bindings.clone();
        let queue_name = queue.to_owned();
        let setup = self.runtime.spawn(async move {
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| ("open channel", e))?;
            if let Some((prefetch, _)) = &consume {
                channel
                    .basic_qos(*prefetch, BasicQosOptions { global: false })
                    .await
                    .map_err(|e| ("qos", e))?;
            }
            let declared = channel
                .queue_declare(name.clone(), options, arguments)
                .await
                .map_err(|e| ("declare", e))?;
            for binding in &bindings {
                topology::bind(&channel, &queue_name, binding)
                    .await
                    .map_err(|e| ("bind", e))?;
            }
            let consumer = match consume {
                Some((_, consumer_tag)) => Some(
                    channel
                        .basic_consume(
                            name,
                            ShortString::from(consumer_tag),
                            BasicConsumeOptions::default(),
                            FieldTable::default(),
                        )
                        .await
                        .map_err(|e| ("consume", e))?,
                ),
                None => None,
            };
            let counts = (declared.message_count(), declared.consumer_count());
            Ok((channel, counts, consumer))
        });
        let queue = queue.to_owned();
        match setup.await {
            Ok(Ok(set_up)) => Ok(set_up),
            Ok(Err(("declare", source))) if is_not_found(&source) => {
                Err(Error::QueueNotFound { queue })
            }
            Ok(Err(("bind", source))) => Err(Error::Topology {
                what: format!(
                    "a binding of queue '{queue}' ({})",
                    describe_bindings(&config.bindings)
                ),
                source,
            }),
            Ok(Err((step, source))) => Err(Error::QueueSetup {
                queue,
                step,
                source,
            }),
            Err(join) => Err(Error::Runtime(std::io::Error::other(format!(
                "queue setup task failed: {join}"
            )))),
        }
    }

    /// Closes the connection cleanly (connection.close / close-ok).
    pub(crate) async fn close(&self) -> Result<(), lapin::Error> {
        let connection = Arc::clone(&self.inner);
        if !connection.status().connected() {
            return Ok(());
        }
        self.runtime
            .run_within(CLOSE_TIMEOUT, "connection.close", async move {
                connection
                    .close(200, ShortString::from("conejo shutting down"))
                    .await
            })
            .await
    }
}

fn describe_bindings(bindings: &[topology::Binding]) -> String {
    bindings
        .iter()
        .map(|b| format!("exchange '{}', key '{}'", b.exchange, b.routing_key))
        .collect::<Vec<_>>()
        .join("; ")
}

/// True for the broker's 404 NOT_FOUND (a passive declaration of a missing queue).
fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404)
}
