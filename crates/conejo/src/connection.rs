//! The broker connection: opened on the connection runtime, and the channels and consumers
//! made from it.

use std::sync::Arc;

use lapin::{
    ConnectionProperties, ErrorKind,
    options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions},
    types::{FieldTable, LongString, ShortString},
};

use crate::{AmqpUrl, Error, QueueConfig, consumer::CLOSE_TIMEOUT, runtime::ConnectionRuntime};

/// How long connecting (TCP, TLS, AMQP handshake) may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// An open connection, bound to the connection runtime.
#[derive(Clone)]
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
}

impl Connection {
    /// Connects on the connection runtime.
    pub(crate) async fn open(
        url: &AmqpUrl,
        connection_name: &str,
        runtime: Arc<ConnectionRuntime>,
    ) -> Result<Self, Error> {
        let properties = ConnectionProperties::default()
            .with_connection_name(LongString::from(connection_name))
            .with_client_property(
                ShortString::from("product"),
                LongString::from(concat!("conejo/", env!("CARGO_PKG_VERSION"))),
            );
        let uri = url.uri();
        let lapin_runtime = async_rs::Runtime::tokio_with_handle(runtime.handle().clone());
        let inner = runtime
            .run_within(
                CONNECT_TIMEOUT,
                "connect",
                lapin::Connection::connect_uri_with_runtime(uri, properties, lapin_runtime),
            )
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

    /// The runtime lapin runs on.
    pub(crate) fn runtime(&self) -> &Arc<ConnectionRuntime> {
        &self.runtime
    }

    /// lapin's connection (for events and status).
    pub(crate) fn lapin(&self) -> &lapin::Connection {
        &self.inner
    }

    /// Opens a channel, applies the prefetch, declares the queue (or checks it exists) and
    /// starts consuming — in this order, so the prefetch is in force before the first
    /// delivery.
    pub(crate) async fn consume(
        &self,
        queue: &str,
        config: &QueueConfig,
        prefetch: u16,
        consumer_tag: String,
    ) -> Result<QueueConsumer, Error> {
        let setup = |step: &'static str| {
            let queue = queue.to_owned();
            move |source: lapin::Error| {
                if is_not_found(&source) && step == "declare" {
                    Error::QueueNotFound { queue }
                } else {
                    Error::QueueSetup {
                        queue,
                        step,
                        source,
                    }
                }
            }
        };
        let connection = Arc::clone(&self.inner);
        let channel = self
            .runtime
            .run(async move { connection.create_channel().await })
            .await
            .map_err(setup("open channel"))?;

        let qos_channel = channel.clone();
        self.runtime
            .run(async move {
                qos_channel
                    .basic_qos(prefetch, BasicQosOptions { global: false })
                    .await
            })
            .await
            .map_err(setup("qos"))?;

        let options = QueueDeclareOptions {
            passive: !config.declare,
            durable: config.durable,
            exclusive: false,
            auto_delete: config.auto_delete,
            nowait: false,
        };
        let arguments = if config.declare {
            config.arguments.clone()
        } else {
            FieldTable::default()
        };
        let declare_channel = channel.clone();
        let name = ShortString::from(queue);
        self.runtime
            .run(async move {
                declare_channel
                    .queue_declare(name, options, arguments)
                    .await
            })
            .await
            .map_err(setup("declare"))?;

        let consume_channel = channel.clone();
        let name = ShortString::from(queue);
        let consumer = self
            .runtime
            .run(async move {
                consume_channel
                    .basic_consume(
                        name,
                        ShortString::from(consumer_tag),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
            })
            .await
            .map_err(setup("consume"))?;
        Ok(QueueConsumer { channel, consumer })
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

/// True for the broker's 404 NOT_FOUND (a passive declaration of a missing queue).
fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404)
}
