//! A layer made of an async function: [`from_fn`], like axum's `middleware::from_fn`.

use std::{fmt, future::Future, sync::Arc};

use super::{BoxService, Delivery, Layer, Service};
use crate::Failure;

/// The rest of the pipeline, given to a [`from_fn`] middleware.
#[derive(Debug, Clone)]
pub struct Next {
    /// What the middleware wraps.
    inner: BoxService,
}

impl Next {
    /// Passes the delivery on (to the next layer, eventually to decoding and the handler).
    pub async fn run(self, delivery: Delivery) -> Result<(), Failure> {
        self.inner.call(delivery).await
    }
}

/// A layer made of an async function or closure that receives each delivery and the rest of
/// the pipeline, like axum's `middleware::from_fn`.
///
/// ```no_run
/// use std::{collections::HashSet, sync::{Arc, Mutex}};
/// use conejo::{Conejo, Context, HandlerError, QueueConfig, handler_fn};
/// use conejo::service::{Delivery, Next, from_fn};
///
/// # async fn run() -> Result<(), conejo::Error> {
/// // Acks a message whose id was already processed, without calling the handler. (A real
/// // service keeps the ids in its database, in the handler's transaction.)
/// let seen = Arc::new(Mutex::new(HashSet::new()));
/// let idempotent = from_fn(move |delivery: Delivery, next: Next| {
///     let seen = Arc::clone(&seen);
///     async move {
///         let id = delivery.context().message_id().map(str::to_owned);
///         if let Some(id) = &id
///             && seen.lock().unwrap().contains(id)
///         {
///             return Ok(());
///         }
///         next.run(delivery).await?;
///         if let Some(id) = id {
///             seen.lock().unwrap().insert(id);
///         }
///         Ok(())
///     }
/// });
///
/// Conejo::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
///     .queue_with(
///         "payments",
///         handler_fn(|text: String, _ctx: Context| async move {
///             println!("{text}");
///             Ok::<(), HandlerError>(())
///         }),
///         QueueConfig::new().layer(idempotent),
///     )
///     .build()?
///     .run()
///     .await
/// # }
/// ```
pub fn from_fn<F, Fut>(function: F) -> FromFn<F>
where
    F: Fn(Delivery, Next) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Failure>> + Send + 'static,
{
    FromFn {
        function: Arc::new(function),
    }
}

/// The layer made by [`from_fn`].
pub struct FromFn<F> {
    /// The middleware function, shared by every queue the layer wraps.
    function: Arc<F>,
}

impl<F> Clone for FromFn<F> {
    fn clone(&self) -> Self {
        FromFn {
            function: Arc::clone(&self.function),
        }
    }
}

impl<F> fmt::Debug for FromFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FromFn")
    }
}

impl<F> Layer<BoxService> for FromFn<F> {
    type Service = FromFnService<F>;

    fn layer(&self, inner: BoxService) -> FromFnService<F> {
        FromFnService {
            function: Arc::clone(&self.function),
            next: Next { inner },
        }
    }
}

/// The service made by a [`from_fn`] layer.
pub struct FromFnService<F> {
    /// The middleware function.
    function: Arc<F>,
    /// What it wraps.
    next: Next,
}

impl<F> fmt::Debug for FromFnService<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FromFnService")
    }
}

impl<F, Fut> Service for FromFnService<F>
where
    F: Fn(Delivery, Next) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Failure>> + Send + 'static,
{
    fn call(&self, delivery: Delivery) -> impl Future<Output = Result<(), Failure>> + Send {
        (self.function)(delivery, self.next.clone())
    }
}
