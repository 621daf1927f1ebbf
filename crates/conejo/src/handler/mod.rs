//! What users implement and what their handlers see: the [`Handler`] and
//! [`BlockingHandler`] traits and the blocking bridge ([`Blocking`]), handlers made of
//! functions (`function`), the message types (`message`: [`Decode`], [`Json`](crate::Json)),
//! a delivery's [`Context`] (`context`), failures and outcomes (`outcome`), the per-message
//! [`HandlerError`] (`error`), and the concurrency slot a delivery holds (`slot`).
//!
//! May use: `broker` (a delivery arrives as its `Incoming`), `headers`, `error`.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use tracing::warn;

pub(crate) mod context;
pub(crate) mod error;
mod function;
pub(crate) mod message;
pub(crate) mod outcome;
mod respond;
pub(crate) mod slot;

pub use self::{
    function::{FnHandler, handler_fn},
    respond::{Responder, Responding},
};

use crate::{Context, Decode, HandlerError};

/// Handles the messages of one or more queues. The central trait of conejo.
///
/// Implement it with a plain `async fn`. Handlers run as tasks on the application's tokio
/// runtime, up to the queue's [concurrency](crate::QueueConfig::concurrency) at once; the
/// broker connection lives on its own runtime, so a slow handler cannot starve heartbeats.
/// For CPU-heavy or blocking work, implement [`BlockingHandler`] instead and register it
/// wrapped in [`Blocking`].
///
/// - `Ok(())`: the message is acknowledged;
/// - `Err(e)` with `?` or [`HandlerError::retry`]: tried again later, per the queue's
///   [`RetryPolicy`](crate::RetryPolicy) (by default), then dead-lettered;
/// - `Err(`[`HandlerError::reject`]`(e))`: dead-lettered at once.
///
/// A panic is caught and treated as a failure (dead-lettered by default): it never kills the
/// service nor leaves the message unacknowledged.
///
/// ```
/// use conejo::{Context, Handler, HandlerError, Json};
/// use serde::Deserialize;
///
/// #[derive(Deserialize)]
/// struct Order {
///     id: u64,
///     quantity: u32,
/// }
///
/// struct Orders;
///
/// impl Handler for Orders {
///     type Message = Json<Order>;
///
///     async fn handle(&self, Json(order): Json<Order>, ctx: &Context) -> Result<(), HandlerError> {
///         if order.quantity == 0 {
///             return Err(HandlerError::reject("empty order"));
///         }
///         println!("order {} from {}", order.id, ctx.queue());
///         Ok(())
///     }
/// }
/// ```
pub trait Handler: Send + Sync + 'static {
    /// The message type: [`Json<T>`](crate::Json), `Vec<u8>`, `String` or your own
    /// [`Decode`] type.
    type Message: Decode;

    /// Handles one message.
    fn handle(
        &self,
        message: Self::Message,
        ctx: &Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// True only for [`Blocking`]: its thread outlives a timeout, and its queue's defaults
    /// (concurrency, prefetch) are a blocking handler's. Sealed: the argument's type cannot
    /// be named outside conejo, so no other handler can claim to be blocking.
    #[doc(hidden)]
    fn is_blocking(&self, _: sealed::Token) -> bool {
        false
    }
}

/// A shared handler: one instance consuming several queues (as
/// [`Builder::partitioned`](crate::Builder::partitioned) does with its partitions).
impl<H: Handler> Handler for Arc<H> {
    type Message = H::Message;

    fn handle(
        &self,
        message: Self::Message,
        ctx: &Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        H::handle(self, message, ctx)
    }

    fn is_blocking(&self, token: sealed::Token) -> bool {
        H::is_blocking(self, token)
    }
}

mod sealed {
    /// Only conejo can make one, so only conejo can call or override
    /// [`Handler::is_blocking`](super::Handler::is_blocking).
    #[derive(Debug, Clone, Copy)]
    pub struct Token;
}

/// Whether `handler` is a [`Blocking`] one.
pub(crate) fn is_blocking<H: Handler>(handler: &H) -> bool {
    handler.is_blocking(sealed::Token)
}

/// A synchronous handler for CPU-heavy or blocking work (image processing, compression,
/// blocking I/O, FFI). Register it wrapped in [`Blocking`]: each call runs on tokio's
/// blocking thread pool (`spawn_blocking`), never on an async worker, at most the queue's
/// [concurrency](crate::QueueConfig::concurrency) at a time.
///
/// A thread cannot be cancelled: past the queue's [timeout](crate::QueueConfig::timeout) its
/// message counts as failed (and is retried or dead-lettered), while the thread runs on,
/// keeping its concurrency slot until it returns — so the bound holds — and is logged as
/// abandoned.
///
/// ```
/// use conejo::{BlockingHandler, Context, HandlerError, Json};
/// use serde::Deserialize;
///
/// #[derive(Deserialize)]
/// struct Resize {
///     width: u32,
/// }
///
/// struct Thumbnailer;
///
/// impl BlockingHandler for Thumbnailer {
///     type Message = Json<Resize>;
///
///     fn handle(&self, Json(job): Json<Resize>, _ctx: &Context) -> Result<(), HandlerError> {
///         let _pixels: u64 = (0..job.width as u64).map(|x| x * x).sum();
///         Ok(())
///     }
/// }
/// ```
pub trait BlockingHandler: Send + Sync + 'static {
    /// The message type, as for [`Handler::Message`].
    type Message: Decode;

    /// Handles one message, on a blocking-pool thread.
    fn handle(&self, message: Self::Message, ctx: &Context) -> Result<(), HandlerError>;
}

/// Runs a [`BlockingHandler`] through `tokio::task::spawn_blocking`; registers like any
/// [`Handler`].
///
/// ```no_run
/// # use conejo::{BlockingHandler, Context, HandlerError};
/// # struct Thumbnailer;
/// # impl BlockingHandler for Thumbnailer {
/// #     type Message = Vec<u8>;
/// #     fn handle(&self, _: Vec<u8>, _: &Context) -> Result<(), HandlerError> { Ok(()) }
/// # }
/// use conejo::{Blocking, Conejo, QueueConfig};
///
/// # async fn run() -> Result<(), conejo::Error> {
/// Conejo::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
///     .queue_with("thumbnails", Blocking::new(Thumbnailer), QueueConfig::new().concurrency(2))
///     .build()?
///     .run()
///     .await
/// # }
/// ```
#[derive(Debug)]
pub struct Blocking<H> {
    /// Shared with the blocking-pool closures, which must be `'static`.
    inner: Arc<H>,
}

impl<H: BlockingHandler> Blocking<H> {
    /// Wraps a blocking handler.
    pub fn new(handler: H) -> Self {
        Blocking {
            inner: Arc::new(handler),
        }
    }
}

impl<H: BlockingHandler> Handler for Blocking<H> {
    type Message = H::Message;

    async fn handle(&self, message: H::Message, ctx: &Context) -> Result<(), HandlerError> {
        let handler = Arc::clone(&self.inner);
        // The thread holds the delivery's concurrency slot until it returns, even if this
        // future is dropped (a timeout) before that.
        let slot = ctx.take_slot();
        let ctx = ctx.clone();
        let mut abandoned = Abandoned {
            flag: Arc::new(AtomicBool::new(false)),
            armed: true,
        };
        let flag = Arc::clone(&abandoned.flag);
        let started = Instant::now();
        let thread = tokio::task::spawn_blocking(move || {
            let result = handler.handle(message, &ctx);
            if flag.load(Ordering::Acquire) {
                warn!(
                    queue = ctx.queue(),
                    delivery_tag = ctx.delivery_tag(),
                    ran_for = ?started.elapsed(),
                    "an abandoned blocking handler returned; its concurrency slot is free again"
                );
            }
            drop(slot);
            result
        });
        let joined = thread.await;
        abandoned.armed = false;
        match joined {
            Ok(result) => result,
            // Re-raised here so that the erased handler reports it as a panic, like an async
            // handler's.
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(error) => Err(HandlerError::retry(error)),
        }
    }

    fn is_blocking(&self, _: sealed::Token) -> bool {
        true
    }
}

/// Marks a blocking call's thread as abandoned when the future awaiting it is dropped
/// before the thread returned.
struct Abandoned {
    /// Read by the thread when it returns.
    flag: Arc<AtomicBool>,
    /// Cleared once the thread's result was received.
    armed: bool,
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if self.armed {
            self.flag.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        Failure, Json,
        service::{BoxService, Delivery, Service, assemble},
    };
    use bytes::Bytes;

    fn erase<H: Handler>(handler: H) -> BoxService {
        assemble(handler, &[], None)
    }

    struct Doubler;
    impl Handler for Doubler {
        type Message = Json<u32>;
        async fn handle(&self, Json(n): Json<u32>, _ctx: &Context) -> Result<(), HandlerError> {
            match n {
                0 => panic!("zero"),
                1 => Err(HandlerError::reject("one")),
                _ => Ok(()),
            }
        }
    }

    struct Burner;
    impl BlockingHandler for Burner {
        type Message = String;
        fn handle(&self, text: String, _ctx: &Context) -> Result<(), HandlerError> {
            if text == "panic" {
                panic!("blocking {text}");
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn failures_are_values() {
        let handler = erase(Doubler);
        let ctx = Context::detached("q");
        let body = |b: &'static [u8]| Bytes::from_static(b);
        assert!(
            handler
                .call(Delivery::new(body(b"2"), ctx.clone()))
                .await
                .is_ok()
        );
        assert!(matches!(
            handler.call(Delivery::new(body(b"x"), ctx.clone())).await,
            Err(Failure::Decode(_))
        ));
        assert!(
            matches!(handler.call(Delivery::new(body(b"1"), ctx.clone())).await, Err(Failure::Handler(e)) if e.is_reject())
        );
        match handler.call(Delivery::new(body(b"0"), ctx.clone())).await {
            Err(Failure::Panic(message)) => assert_eq!(message, "zero"),
            other => panic!("expected a panic failure, got {other:?}"),
        }
        assert!(!is_blocking(&Doubler));
    }

    #[tokio::test]
    async fn functions_and_closures_are_handlers() {
        async fn double(Json(n): Json<u32>, _: Context) -> Result<(), HandlerError> {
            if n == 1 {
                return Err(HandlerError::reject("one"));
            }
            Ok(())
        }
        let ctx = Context::detached("q");
        let handler = erase(handler_fn(double));
        assert!(
            handler
                .call(Delivery::new(Bytes::from_static(b"2"), ctx.clone()))
                .await
                .is_ok()
        );
        assert!(matches!(
            handler.call(Delivery::new(Bytes::from_static(b"1"), ctx.clone())).await,
            Err(Failure::Handler(e)) if e.is_reject()
        ));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let closure = erase(handler_fn(move |text: String, ctx: Context| {
            let sink = Arc::clone(&sink);
            async move {
                sink.lock().unwrap().push((text, ctx.attempt()));
                Ok(())
            }
        }));
        closure
            .call(Delivery::new(
                Bytes::from_static(b"hi"),
                ctx.clone().with_attempt(3),
            ))
            .await
            .unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![("hi".to_owned(), 3)]);
    }

    #[tokio::test]
    async fn blocking_panics_are_caught() {
        let handler = erase(Blocking::new(Burner));
        let ctx = Context::detached("q");
        assert!(
            handler
                .call(Delivery::new(Bytes::from_static(b"ok"), ctx.clone()))
                .await
                .is_ok()
        );
        match handler
            .call(Delivery::new(Bytes::from_static(b"panic"), ctx.clone()))
            .await
        {
            Err(Failure::Panic(message)) => assert_eq!(message, "blocking panic"),
            other => panic!("expected a panic failure, got {other:?}"),
        }
        assert!(is_blocking(&Blocking::new(Burner)));
        assert!(!is_blocking(&Doubler));
    }
}
