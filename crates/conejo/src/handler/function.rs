//! Handlers made of functions and closures.

use std::future::Future;

use crate::{Context, Decode, Handler, HandlerError};

/// A handler made of a function or closure: `|message, ctx| async move { … }`, registered
/// like any [`Handler`]. The function receives the [`Context`] by value (a copy per message:
/// implement [`Handler`] on a struct where that copy matters).
///
/// ```no_run
/// use conejo::{Conejo, Context, HandlerError, Json, handler_fn};
///
/// #[derive(serde::Deserialize)]
/// struct Order { id: u64 }
///
/// async fn store(Json(order): Json<Order>, ctx: Context) -> Result<(), HandlerError> {
///     println!("order {} (attempt {})", order.id, ctx.attempt());
///     Ok(())
/// }
///
/// # async fn run() -> Result<(), conejo::Error> {
/// Conejo::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
///     .queue("orders", handler_fn(store))
///     .queue("audit", handler_fn(|line: String, _ctx| async move {
///         println!("{line}");
///         Ok(())
///     }))
///     .build()?
///     .run()
///     .await
/// # }
/// ```
pub fn handler_fn<M, F, Fut>(function: F) -> FnHandler<F, M>
where
    M: Decode,
    F: Fn(M, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    FnHandler {
        function,
        message: std::marker::PhantomData,
    }
}

/// A [`Handler`] made by [`handler_fn`].
pub struct FnHandler<F, M> {
    /// The user's function.
    function: F,
    /// The message type the function takes.
    message: std::marker::PhantomData<fn(M)>,
}

/// A function handler can serve several queues.
impl<F: Clone, M> Clone for FnHandler<F, M> {
    fn clone(&self) -> Self {
        FnHandler {
            function: self.function.clone(),
            message: std::marker::PhantomData,
        }
    }
}

impl<F, M> std::fmt::Debug for FnHandler<F, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FnHandler")
            .field("message", &std::any::type_name::<M>())
            .finish_non_exhaustive()
    }
}

impl<M, F, Fut> Handler for FnHandler<F, M>
where
    M: Decode,
    F: Fn(M, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    type Message = M;

    fn handle(
        &self,
        message: M,
        ctx: &Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        (self.function)(message, ctx.clone())
    }
}
