//! Per-key ordering: which key a delivery belongs to ([`OrderKey`]).

use std::{fmt, sync::Arc};

use crate::{Context, headers};

/// What a delivery's ordering key is computed with.
pub(crate) type KeyFn = Arc<dyn Fn(&Context, &[u8]) -> Option<String> + Send + Sync>;

/// The key that orders a queue's deliveries ([`QueueConfig::ordered_by`]): deliveries with
/// the same key are handled one at a time, in the order the broker delivered them;
/// deliveries with different keys run in parallel, up to the queue's concurrency. A
/// delivery without a key (the header is missing, the function says `None`) is not ordered
/// with any other.
///
/// ```
/// use conejo::{OrderKey, QueueConfig};
///
/// // All events of one order in order; different orders in parallel.
/// let by_order = QueueConfig::new().quorum().ordered_by(OrderKey::header("order-id"));
/// let by_route = QueueConfig::new().quorum().ordered_by(OrderKey::routing_key());
/// let by_body = QueueConfig::new().quorum().ordered_by(OrderKey::from_fn(|_ctx, body| {
///     body.split(|&b| b == b':').next().map(|id| String::from_utf8_lossy(id).into_owned())
/// }));
/// # let _ = (by_order, by_route, by_body);
/// ```
///
/// [`QueueConfig::ordered_by`]: crate::QueueConfig::ordered_by
#[derive(Clone)]
pub struct OrderKey {
    pub(crate) key: KeyFn,
    /// For `Debug`.
    what: String,
}

impl OrderKey {
    /// The value of the header `name` (text, or an integer written in decimal).
    #[must_use]
    pub fn header(name: &str) -> Self {
        let header = name.to_owned();
        OrderKey {
            what: format!("header '{name}'"),
            key: Arc::new(move |ctx: &Context, _: &[u8]| {
                let found = ctx.headers();
                headers::text(found, &header)
                    .map(str::to_owned)
                    .or_else(|| headers::int(found, &header).map(|n| n.to_string()))
            }),
        }
    }

    /// The routing key the message was first published with (a retried copy keeps it).
    #[must_use]
    pub fn routing_key() -> Self {
        OrderKey {
            what: "routing key".to_owned(),
            key: Arc::new(|ctx: &Context, _: &[u8]| Some(ctx.routing_key().to_owned())),
        }
    }

    /// The `message_id` property.
    #[must_use]
    pub fn message_id() -> Self {
        OrderKey {
            what: "message id".to_owned(),
            key: Arc::new(|ctx: &Context, _: &[u8]| ctx.message_id().map(str::to_owned)),
        }
    }

    /// The `correlation_id` property.
    #[must_use]
    pub fn correlation_id() -> Self {
        OrderKey {
            what: "correlation id".to_owned(),
            key: Arc::new(|ctx: &Context, _: &[u8]| ctx.correlation_id().map(str::to_owned)),
        }
    }

    /// A key computed from the delivery's context and raw body (before decoding). It runs
    /// on the consume loop for every delivery: keep it cheap.
    #[must_use]
    pub fn from_fn<F>(key: F) -> Self
    where
        F: Fn(&Context, &[u8]) -> Option<String> + Send + Sync + 'static,
    {
        OrderKey {
            what: "a function".to_owned(),
            key: Arc::new(key),
        }
    }
}

impl fmt::Debug for OrderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("OrderKey").field(&self.what).finish()
    }
}
