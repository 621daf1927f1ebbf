//! The production transport: RabbitMQ through lapin, every lapin task on conejo's dedicated
//! connection runtime ([`runtime`]).

pub(crate) mod runtime;

use std::{sync::Arc, time::Duration};

use lapin::{
    BasicProperties, Confirmation, ConnectionProperties, ExchangeKind, PublisherConfirm,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions,
        BasicNackOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
        ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    },
    types::{FieldTable, LongString, ShortString},
};

use self::runtime::ConnectionRuntime;
use super::{
    AmqpUrl, BrokerError, Confirmed, ConsumeOptions, Event, ExchangeOptions, Got, QueueOptions,
    QueueState, TlsSetup,
};
use crate::Error;

/// lapin over AMQP: the connection runtime, and the TLS material of every connection.
#[derive(Clone)]
pub(crate) struct Amqp {
    /// Where lapin's tasks run.
    runtime: Arc<ConnectionRuntime>,
    /// Checked by `build()`; the same for every attempt, reconnections included.
    tls: TlsSetup,
}

/// One lapin connection and the runtime it is bound to.
#[derive(Clone)]
pub(crate) struct AmqpConnection {
    /// lapin's connection; its tasks live on `runtime`.
    inner: Arc<lapin::Connection>,
    /// Where its calls are made.
    runtime: Arc<ConnectionRuntime>,
}

impl Amqp {
    pub(crate) fn new(tls: TlsSetup, dedicated_runtime: bool) -> Result<Self, Error> {
        let runtime = if dedicated_runtime {
            ConnectionRuntime::dedicated()?
        } else {
            ConnectionRuntime::current()
        };
        Ok(Amqp {
            runtime: Arc::new(runtime),
            tls,
        })
    }

    pub(crate) fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime.handle()
    }

    /// Connects on the connection runtime.
    pub(crate) async fn connect(
        &self,
        url: &AmqpUrl,
        name: &str,
        timeout: Duration,
    ) -> Result<AmqpConnection, Error> {
        let properties = ConnectionProperties::default()
            .with_connection_name(LongString::from(name))
            .with_client_property(
                ShortString::from("product"),
                LongString::from(concat!("conejo/", env!("CARGO_PKG_VERSION"))),
            );
        let uri = url.uri();
        let lapin_runtime = async_rs::Runtime::tokio_with_handle(self.runtime.handle().clone());
        // The checked TLS material, the same on every attempt (reconnections included).
        #[cfg(feature = "tls")]
        let connect = lapin::Connection::connect_uri_with_config(
            uri,
            properties,
            self.tls.lapin_config(),
            lapin_runtime,
        );
        #[cfg(not(feature = "tls"))]
        let connect = {
            let _ = &self.tls;
            lapin::Connection::connect_uri_with_runtime(uri, properties, lapin_runtime)
        };
        let connected = match tokio::time::timeout(timeout, self.runtime.spawn(connect)).await {
            Ok(Ok(connected)) => connected,
            Ok(Err(join)) => Err(super::other(format!("connect task failed: {join}"))),
            Err(_) => Err(super::timed_out("connect", timeout)),
        };
        let inner = connected.map_err(|source| Error::Connect {
            url: url.redacted().to_owned(),
            source,
        })?;
        Ok(AmqpConnection {
            inner: Arc::new(inner),
            runtime: Arc::clone(&self.runtime),
        })
    }
}

impl AmqpConnection {
    pub(crate) fn lapin(&self) -> &lapin::Connection {
        &self.inner
    }

    pub(crate) fn runtime(&self) -> &ConnectionRuntime {
        &self.runtime
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.inner.status().connected()
    }
}

pub(crate) async fn qos(channel: &lapin::Channel, prefetch: u16) -> Result<(), BrokerError> {
    channel
        .basic_qos(prefetch, BasicQosOptions { global: false })
        .await
}

pub(crate) async fn declare_exchange(
    channel: &lapin::Channel,
    name: &str,
    kind: ExchangeKind,
    options: ExchangeOptions,
    arguments: FieldTable,
) -> Result<(), BrokerError> {
    channel
        .exchange_declare(
            ShortString::from(name),
            kind,
            ExchangeDeclareOptions {
                passive: options.passive,
                durable: options.durable,
                auto_delete: options.auto_delete,
                internal: false,
                nowait: false,
            },
            arguments,
        )
        .await
}

pub(crate) async fn declare_queue(
    channel: &lapin::Channel,
    name: &str,
    options: QueueOptions,
    arguments: FieldTable,
) -> Result<QueueState, BrokerError> {
    let declared = channel
        .queue_declare(
            ShortString::from(name),
            QueueDeclareOptions {
                passive: options.passive,
                durable: options.durable,
                exclusive: options.exclusive,
                auto_delete: options.auto_delete,
                nowait: false,
            },
            arguments,
        )
        .await?;
    Ok(QueueState {
        messages: declared.message_count(),
        consumers: declared.consumer_count(),
    })
}

pub(crate) async fn delete_queue(channel: &lapin::Channel, name: &str) -> Result<(), BrokerError> {
    channel
        .queue_delete(
            ShortString::from(name),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .map(drop)
}

pub(crate) async fn delete_exchange(
    channel: &lapin::Channel,
    name: &str,
) -> Result<(), BrokerError> {
    channel
        .exchange_delete(
            ShortString::from(name),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await
}

pub(crate) async fn bind_queue(
    channel: &lapin::Channel,
    queue: &str,
    exchange: &str,
    routing_key: &str,
    arguments: FieldTable,
) -> Result<(), BrokerError> {
    channel
        .queue_bind(
            ShortString::from(queue),
            ShortString::from(exchange),
            ShortString::from(routing_key),
            QueueBindOptions::default(),
            arguments,
        )
        .await
}

pub(crate) async fn consume(
    channel: &lapin::Channel,
    queue: &str,
    tag: &str,
    options: ConsumeOptions,
) -> Result<lapin::Consumer, BrokerError> {
    channel
        .basic_consume(
            ShortString::from(queue),
            ShortString::from(tag),
            BasicConsumeOptions {
                exclusive: options.exclusive,
                no_ack: options.no_ack,
                ..BasicConsumeOptions::default()
            },
            options.arguments,
        )
        .await
}

pub(crate) async fn cancel(channel: &lapin::Channel, tag: &str) -> Result<(), BrokerError> {
    channel
        .basic_cancel(ShortString::from(tag), BasicCancelOptions::default())
        .await
}

pub(crate) async fn ack(
    channel: &lapin::Channel,
    tag: u64,
    multiple: bool,
) -> Result<(), BrokerError> {
    channel.basic_ack(tag, BasicAckOptions { multiple }).await
}

pub(crate) async fn nack(
    channel: &lapin::Channel,
    tag: u64,
    multiple: bool,
    requeue: bool,
) -> Result<(), BrokerError> {
    channel
        .basic_nack(tag, BasicNackOptions { multiple, requeue })
        .await
}

pub(crate) async fn confirm_select(channel: &lapin::Channel) -> Result<(), BrokerError> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
}

pub(crate) async fn publish(
    channel: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    mandatory: bool,
    body: &[u8],
    properties: BasicProperties,
) -> Result<PublisherConfirm, BrokerError> {
    channel
        .basic_publish(
            ShortString::from(exchange),
            ShortString::from(routing_key),
            BasicPublishOptions {
                mandatory,
                immediate: false,
            },
            body,
            properties,
        )
        .await
}

#[cfg_attr(not(feature = "admin"), allow(dead_code))]
pub(crate) async fn get(channel: &lapin::Channel, queue: &str) -> Result<Option<Got>, BrokerError> {
    let got = channel
        .basic_get(ShortString::from(queue), BasicGetOptions { no_ack: false })
        .await?;
    Ok(got.map(|got| Got {
        remaining: got.message_count,
        message: got.delivery,
    }))
}

pub(crate) fn confirmed(confirmation: Confirmation) -> Confirmed {
    match confirmation {
        Confirmation::Ack(None) => Confirmed::Ack,
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
            Confirmed::Returned {
                code: returned.reply_code,
                text: returned.reply_text.to_string(),
            }
        }
        Confirmation::Nack(None) => Confirmed::Nack,
        Confirmation::NotRequested => Confirmed::NotRequested,
    }
}

pub(crate) fn event(event: lapin::Event) -> Event {
    match event {
        lapin::Event::Error(error) => Event::Error(error),
        lapin::Event::ConnectionBlocked(reason) => Event::Blocked(reason),
        lapin::Event::ConnectionUnblocked => Event::Unblocked,
        _ => Event::Other,
    }
}
