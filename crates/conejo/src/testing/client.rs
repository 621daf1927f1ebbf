//! The harness's own connection and its control channel. The same calls go to the
//! in-memory broker and to RabbitMQ, through conejo's broker boundary; in memory, faults
//! pass this connection by.

use std::{future::Future, time::Duration};

use tokio::sync::Mutex;

use super::TestError;
use crate::{
    AmqpUrl,
    broker::{Broker, BrokerError, Channel, Connection},
};

/// How long the harness waits for any one answer of the broker.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The harness's connection and its control channel.
pub(crate) struct Client {
    pub(super) connection: Connection,
    /// In confirm mode; dropped after the broker closed it (a refused operation), reopened
    /// by the next operation.
    control: Mutex<Option<Channel>>,
}

impl Client {
    pub(super) async fn connect(
        memory: Option<&crate::broker::memory::Memory>,
        url: &AmqpUrl,
    ) -> Result<Client, TestError> {
        const NAME: &str = "conejo-test-harness";
        let connected = match memory {
            Some(memory) => memory
                .connect_as(url, NAME, ANSWER_TIMEOUT, true)
                .await
                .map(Connection::Memory),
            None => match Broker::amqp(crate::broker::TlsSetup::default(), false) {
                Ok(broker) => broker.connect(url, NAME, ANSWER_TIMEOUT).await,
                Err(error) => Err(error),
            },
        };
        let connection = connected.map_err(|error| TestError::Broker {
            operation: format!("connect the harness to {}", url.redacted()),
            message: error.to_string(),
        })?;
        Ok(Client {
            connection,
            control: Mutex::new(None),
        })
    }

    /// Runs `operation` on the control channel within [`ANSWER_TIMEOUT`]; a refusal drops
    /// the channel (the broker closed it).
    pub(super) async fn on_control<T, F, Fut>(
        &self,
        what: String,
        operation: F,
    ) -> Result<T, TestError>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: Future<Output = Result<T, BrokerError>>,
    {
        let mut control = self.control.lock().await;
        let channel = match control.as_ref().filter(|c| c.is_open()) {
            Some(channel) => channel.clone(),
            None => {
                let channel = answered(&what, self.connection.open_channel()).await?;
                answered(&what, channel.confirm_select()).await?;
                *control = Some(channel.clone());
                channel
            }
        };
        let result = answered(&what, operation(channel.clone())).await;
        if !channel.is_open() {
            *control = None;
        }
        result
    }

    /// A channel of its own (a consumer's).
    pub(super) async fn open_channel(&self, what: &str) -> Result<Channel, TestError> {
        answered(what, self.connection.open_channel()).await
    }
}

/// Awaits one broker answer within [`ANSWER_TIMEOUT`].
pub(super) async fn answered<T>(
    what: &str,
    operation: impl Future<Output = Result<T, BrokerError>>,
) -> Result<T, TestError> {
    match tokio::time::timeout(ANSWER_TIMEOUT, operation).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(TestError::broker(what, &error)),
        Err(_) => Err(TestError::Timeout {
            what: what.to_owned(),
            limit: ANSWER_TIMEOUT,
        }),
    }
}
