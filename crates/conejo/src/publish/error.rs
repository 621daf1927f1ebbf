//! Why a publish or a request did not succeed.

use std::{sync::Arc, time::Duration};

use super::message::EncodeError;
use crate::broker::BrokerError;

/// Why a publish was not confirmed.
///
/// What `Ok` means is exact: the broker confirmed the message (and, published `mandatory`,
/// routed it to a queue). An error says what happened; after [`ConnectionLost`], [`Timeout`]
/// or [`Channel`] the message may or may not be on the broker (a retry may then make a
/// duplicate: consumers deduplicate on the message id). After [`Returned`], [`Nacked`],
/// [`Encode`] and [`Closed`] it is not.
///
/// [`ConnectionLost`]: PublishError::ConnectionLost
/// [`Timeout`]: PublishError::Timeout
/// [`Channel`]: PublishError::Channel
/// [`Returned`]: PublishError::Returned
/// [`Nacked`]: PublishError::Nacked
/// [`Encode`]: PublishError::Encode
/// [`Closed`]: PublishError::Closed
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// Published `mandatory`, and no queue took it: the broker returned it.
    #[error(
        "unroutable: returned by the broker ({code} {text}) from exchange '{exchange}' with key '{routing_key}'"
    )]
    Returned {
        /// The broker's reply code (312 NO_ROUTE).
        code: u16,
        /// The broker's reply text.
        text: String,
        /// The exchange it was published to.
        exchange: String,
        /// Its routing key.
        routing_key: String,
    },
    /// The broker refused it (`basic.nack`): it could not take responsibility for it (a
    /// queue at its length limit with `reject-publish`, an internal error).
    #[error("refused by the broker (publisher confirm nack)")]
    Nacked,
    /// No confirm within the publish timeout: no connection came back in time, the broker
    /// blocked the connection (a resource alarm) all that time, or did not answer.
    #[error("not confirmed within {0:?}")]
    Timeout(Duration),
    /// The connection was lost after the message was sent and before its confirm.
    #[error("the connection was lost before the broker confirmed the message")]
    ConnectionLost,
    /// The broker closed the publishing channel (a missing exchange is 404 NOT_FOUND).
    #[error("the broker closed the publishing channel: {0}")]
    Channel(Arc<BrokerError>),
    /// The body could not be encoded: nothing was sent.
    #[error(transparent)]
    Encode(Arc<EncodeError>),
    /// The publisher is closed (its service stopped, or it was closed): nothing was sent.
    #[error("the publisher is closed")]
    Closed,
}

impl PublishError {
    /// True when the message may be on the broker though the publish failed (a retry may
    /// make a duplicate).
    #[must_use]
    pub fn may_have_been_published(&self) -> bool {
        matches!(
            self,
            PublishError::ConnectionLost | PublishError::Timeout(_) | PublishError::Channel(_)
        )
    }

    /// The error's kind, for logs and metrics: `returned`, `nacked`, `timeout`,
    /// `connection_lost`, `channel`, `encode`, `closed`.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            PublishError::Returned { .. } => "returned",
            PublishError::Nacked => "nacked",
            PublishError::Timeout(_) => "timeout",
            PublishError::ConnectionLost => "connection_lost",
            PublishError::Channel(_) => "channel",
            PublishError::Encode(_) => "encode",
            PublishError::Closed => "closed",
        }
    }
}

/// Why a request got no reply.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The request itself was not confirmed.
    #[error("the request was not published: {0}")]
    Publish(#[from] PublishError),
    /// Nothing answered within the timeout (no consumer, or one too slow, or gone).
    #[error("no reply within {0:?}")]
    NoReply(Duration),
    /// The connection was lost while the reply was awaited: a reply sent to it is lost.
    #[error("the connection was lost while the reply was awaited")]
    ConnectionLost,
}
