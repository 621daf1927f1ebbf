//! The pipeline a delivery goes through before conejo decides its outcome: a [`Service`]
//! (decode, then the handler) wrapped in [`Layer`]s — conejo's own (timeout, panic
//! isolation) and the user's (idempotency, authorisation, custom metrics…).
//!
//! The vocabulary is tower's: a [`Layer`] (tower's own trait, re-exported) wraps a service
//! into another. The [`Service`] trait is conejo's, shaped for a consumer: it takes `&self`
//! (a queue's deliveries run concurrently through one pipeline), needs no readiness (the
//! queue's concurrency bound is the back-pressure) and answers with `Result<(), Failure>`,
//! which the queue's failure policy maps to an outcome.
//!
//! ```text
//!  broker → Delivery ─┬─ timeout ─ panic isolation ─ your layers ─ decode ─ handler
//!                     └──────────── Result<(), Failure> ──→ outcome → ack / retry / dead-letter
//! ```

mod from_fn;
mod pipeline;

use std::{fmt, future::Future, sync::Arc};

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::{Context, Failure};

pub use self::from_fn::{FromFn, FromFnService, Next, from_fn};
#[cfg(any(test, feature = "test-util"))]
pub(crate) use self::pipeline::assemble;
pub(crate) use self::pipeline::{BoxLayer, Layers, Visit, assemble_with};
pub use tower_layer::{Layer, layer_fn};

/// One delivery on its way through a queue's pipeline: the raw body and its [`Context`],
/// owned, so that a layer can keep, move or replace them.
#[derive(Debug)]
pub struct Delivery {
    /// The message body, as received (shared, not copied).
    body: Bytes,
    /// The delivery's metadata.
    ctx: Context,
}

impl Delivery {
    /// A delivery of `body` with `ctx`: what conejo builds for each message, and what a test
    /// of a layer builds with [`Context::detached`].
    pub fn new(body: impl Into<Bytes>, ctx: Context) -> Self {
        Delivery {
            body: body.into(),
            ctx,
        }
    }

    /// The raw body.
    #[must_use]
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The delivery's metadata.
    #[must_use]
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// The body and the context.
    #[must_use]
    pub fn into_parts(self) -> (Bytes, Context) {
        (self.body, self.ctx)
    }
}

/// A step of a queue's pipeline: takes a [`Delivery`], answers whether it was processed.
///
/// `Ok(())` acks the message; a [`Failure`] goes to the queue's failure policy (retry or
/// dead-letter). A layer's service usually calls the service it wraps, or answers by itself
/// (a duplicate acked without calling the handler, an unauthorised message rejected).
///
/// Implement it with an `async fn`, or write a layer as a closure with [`from_fn`].
///
/// ```
/// use conejo::{Failure, HandlerError};
/// use conejo::service::{Delivery, Layer, Service};
///
/// /// Rejects messages without an `x-tenant` header, before they are decoded.
/// struct RequireTenant<S>(S);
///
/// impl<S: Service> Service for RequireTenant<S> {
///     async fn call(&self, delivery: Delivery) -> Result<(), Failure> {
///         if delivery.context().header("x-tenant").is_none() {
///             return Err(Failure::Handler(HandlerError::reject("no x-tenant header")));
///         }
///         self.0.call(delivery).await
///     }
/// }
///
/// /// The layer that wraps a queue's pipeline in [`RequireTenant`].
/// struct RequireTenantLayer;
///
/// impl<S> Layer<S> for RequireTenantLayer {
///     type Service = RequireTenant<S>;
///     fn layer(&self, inner: S) -> RequireTenant<S> {
///         RequireTenant(inner)
///     }
/// }
/// ```
pub trait Service: Send + Sync + 'static {
    /// Processes one delivery.
    fn call(&self, delivery: Delivery) -> impl Future<Output = Result<(), Failure>> + Send;
}

/// A type-erased [`Service`]: what layers registered on a queue or on the service wrap.
/// Cloning is cheap (one reference count).
#[derive(Clone)]
pub struct BoxService {
    /// The erased service.
    inner: Arc<dyn DynService>,
}

impl BoxService {
    /// Erases `service`.
    pub fn new(service: impl Service) -> Self {
        BoxService {
            inner: Arc::new(service),
        }
    }
}

impl fmt::Debug for BoxService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BoxService")
    }
}

impl Service for BoxService {
    fn call(&self, delivery: Delivery) -> impl Future<Output = Result<(), Failure>> + Send {
        self.inner.call_boxed(delivery)
    }
}

/// The object-safe form of [`Service`].
trait DynService: Send + Sync + 'static {
    fn call_boxed(&self, delivery: Delivery) -> BoxFuture<'_, Result<(), Failure>>;
}

impl<S: Service> DynService for S {
    fn call_boxed(&self, delivery: Delivery) -> BoxFuture<'_, Result<(), Failure>> {
        Box::pin(self.call(delivery))
    }
}
