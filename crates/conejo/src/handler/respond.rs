//! The server side of request-reply: a handler whose result is a reply, published to the
//! request's `reply-to` with its correlation id before the request is acked.

use std::future::Future;

use tracing::warn;

use crate::{Context, Decode, Encode, Handler, HandlerError, Message};

/// Answers requests (from [`Publisher::request`](crate::Publisher::request), or any client
/// that sets `reply-to`): register it wrapped in [`Responding`]. Its reply is published to
/// the request's `reply-to` (through the default exchange, with the request's correlation
/// id) and confirmed before the request is acked; a failure is a failure like any handler's
/// (retried, then dead-lettered, per the queue's policy), and no reply is sent.
///
/// A request without `reply-to` is handled and its reply dropped, with a warning. Replies are
/// not `mandatory`: a client that went away before the reply came leaves nobody to take it,
/// and retrying the request would not bring it back.
///
/// ```no_run
/// use conejo::{Conejo, Context, HandlerError, Json, Responder, Responding};
///
/// struct Prices;
/// impl Responder for Prices {
///     type Request = Json<String>;
///     type Reply = Json<u64>;
///     async fn respond(&self, Json(sku): Json<String>, _: &Context) -> Result<Json<u64>, HandlerError> {
///         Ok(Json(if sku == "SKU-1" { 1999 } else { 0 }))
///     }
/// }
///
/// # async fn run() -> Result<(), conejo::Error> {
/// Conejo::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
///     .queue("prices", Responding::new(Prices))
///     .build()?
///     .run()
///     .await
/// # }
/// ```
pub trait Responder: Send + Sync + 'static {
    /// What a request decodes into.
    type Request: Decode;
    /// What the reply is encoded from.
    type Reply: Encode + Send;

    /// Answers one request.
    fn respond(
        &self,
        request: Self::Request,
        ctx: &Context,
    ) -> impl Future<Output = Result<Self::Reply, HandlerError>> + Send;
}

/// A [`Responder`] registered as a [`Handler`].
#[derive(Debug)]
pub struct Responding<R> {
    /// The responder.
    inner: R,
}

impl<R: Responder> Responding<R> {
    /// Wraps a responder.
    pub fn new(responder: R) -> Self {
        Responding { inner: responder }
    }
}

impl<R: Responder> Handler for Responding<R> {
    type Message = R::Request;

    async fn handle(&self, request: R::Request, ctx: &Context) -> Result<(), HandlerError> {
        let reply = self.inner.respond(request, ctx).await?;
        let Some(reply_to) = ctx.reply_to() else {
            warn!(
                queue = ctx.queue(),
                message_id = ctx.message_id(),
                "a request without reply-to was handled; its reply is dropped"
            );
            return Ok(());
        };
        let mut message = Message::new("", reply_to, reply)
            .mandatory(false)
            .persistent(false);
        if let Some(correlation) = ctx.correlation_id() {
            message = message.correlation_id(correlation);
        }
        // Tracked by the delivery: acked once the reply is confirmed.
        ctx.publish(message).await.map_err(HandlerError::retry)
    }
}
