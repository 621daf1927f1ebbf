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

use std::{
    any::Any,
    fmt,
    future::Future,
    panic::AssertUnwindSafe,
    sync::{Arc, atomic::AtomicUsize},
    time::Duration,
};

use bytes::Bytes;
use futures::{FutureExt, future::BoxFuture};

use crate::{
    Context, Decode, Failure, Handler,
    engine::consumer::{Job, work},
};

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

impl BoxService {
    /// A worker of a queue whose pipeline this is: it takes deliveries from `jobs` one at a
    /// time, calling the erased service directly — monomorphic, with no allocation per
    /// delivery, when the queue has no layers.
    pub(crate) fn worker(
        &self,
        jobs: flume::Receiver<Job>,
        idle: Arc<AtomicUsize>,
    ) -> BoxFuture<'static, ()> {
        Arc::clone(&self.inner).worker(jobs, idle)
    }
}

/// The object-safe form of [`Service`].
trait DynService: Send + Sync + 'static {
    fn call_boxed(&self, delivery: Delivery) -> BoxFuture<'_, Result<(), Failure>>;

    fn worker(
        self: Arc<Self>,
        jobs: flume::Receiver<Job>,
        idle: Arc<AtomicUsize>,
    ) -> BoxFuture<'static, ()>;
}

impl<S: Service> DynService for S {
    fn call_boxed(&self, delivery: Delivery) -> BoxFuture<'_, Result<(), Failure>> {
        Box::pin(self.call(delivery))
    }

    fn worker(
        self: Arc<Self>,
        jobs: flume::Receiver<Job>,
        idle: Arc<AtomicUsize>,
    ) -> BoxFuture<'static, ()> {
        Box::pin(work(self, jobs, idle))
    }
}

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

/// A layer as a queue stores it: applied to the erased pipeline when the service runs.
pub(crate) type BoxLayer = Arc<dyn Fn(BoxService) -> BoxService + Send + Sync>;

/// The user's layers of a queue or of the service, innermost (registered first) first.
#[derive(Clone, Default)]
pub(crate) struct Layers(pub(crate) Vec<BoxLayer>);

impl Layers {
    /// Adds `layer` around the ones registered before.
    pub(crate) fn push<L>(&mut self, layer: L)
    where
        L: Layer<BoxService> + Send + Sync + 'static,
        L::Service: Service,
    {
        self.0
            .push(Arc::new(move |inner| BoxService::new(layer.layer(inner))));
    }
}

impl fmt::Debug for Layers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} layer(s)", self.0.len())
    }
}

/// Decodes the body into the handler's message type and calls the handler: the innermost
/// service of every queue.
struct HandlerService<H> {
    /// The user's handler.
    handler: H,
}

impl<H: Handler> Service for HandlerService<H> {
    async fn call(&self, delivery: Delivery) -> Result<(), Failure> {
        let (body, ctx) = delivery.into_parts();
        let message = H::Message::decode_shared(&body, &ctx).map_err(Failure::Decode)?;
        self.handler
            .handle(message, &ctx)
            .await
            .map_err(Failure::Handler)
    }
}

/// Turns a panic anywhere inside — in the handler, the decoder or a user's layer, while
/// building its future or while polling it — into [`Failure::Panic`].
struct CatchPanic<S> {
    /// What it guards.
    inner: S,
}

impl<S: Service> Service for CatchPanic<S> {
    async fn call(&self, delivery: Delivery) -> Result<(), Failure> {
        let future = std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(delivery)))
            .map_err(|panic| Failure::Panic(panic_message(&*panic)))?;
        AssertUnwindSafe(future)
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| Err(Failure::Panic(panic_message(&*panic))))
    }
}

/// Fails a delivery whose pipeline runs longer than the queue's timeout with
/// [`Failure::Timeout`], dropping (cancelling) what runs inside.
struct Timeout<S> {
    /// What it limits.
    inner: S,
    /// The limit.
    limit: Duration,
}

impl<S: Service> Service for Timeout<S> {
    async fn call(&self, delivery: Delivery) -> Result<(), Failure> {
        tokio::time::timeout(self.limit, self.inner.call(delivery))
            .await
            .unwrap_or(Err(Failure::Timeout(self.limit)))
    }
}

/// Builds a queue's pipeline from its layers and timeout.
type Assemble = Box<dyn FnOnce(&[BoxLayer], Option<Duration>) -> BoxService + Send + Sync>;

/// A registered handler, until the service is built and its queue's pipeline assembled.
pub(crate) struct Registration {
    /// Builds the pipeline around the handler: monomorphic (one allocation per delivery)
    /// when the queue has no layers.
    assemble: Assemble,
    /// The concurrency to use when the queue's configuration does not set one.
    pub(crate) default_concurrency: usize,
    /// True for a [`Blocking`](crate::Blocking) handler, whose thread outlives a timeout.
    pub(crate) blocking: bool,
}

/// Concurrency of an async handler when the queue does not set one.
pub(crate) const DEFAULT_ASYNC_CONCURRENCY: usize = 16;

impl Registration {
    pub(crate) fn new<H: Handler>(handler: H) -> Self {
        let own_default = handler.default_concurrency();
        Registration {
            // Only `Blocking` sets a default concurrency of its own.
            blocking: own_default.is_some(),
            default_concurrency: own_default.unwrap_or(DEFAULT_ASYNC_CONCURRENCY),
            assemble: Box::new(move |layers, timeout| {
                let core = HandlerService { handler };
                if layers.is_empty() {
                    guard(core, timeout)
                } else {
                    let inner = layers
                        .iter()
                        .fold(BoxService::new(core), |inner, layer| layer(inner));
                    guard(inner, timeout)
                }
            }),
        }
    }

    /// The queue's whole pipeline: `layers` from the innermost (applied first) out, inside
    /// panic isolation and the timeout.
    pub(crate) fn assemble(self, layers: &[BoxLayer], timeout: Option<Duration>) -> BoxService {
        (self.assemble)(layers, timeout)
    }
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("default_concurrency", &self.default_concurrency)
            .field("blocking", &self.blocking)
            .finish_non_exhaustive()
    }
}

/// conejo's own outer layers: panic isolation, then the timeout.
fn guard(inner: impl Service, timeout: Option<Duration>) -> BoxService {
    let inner = CatchPanic { inner };
    match timeout {
        Some(limit) => BoxService::new(Timeout { inner, limit }),
        None => BoxService::new(inner),
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{HandlerError, handler_fn};

    type Log = Arc<Mutex<Vec<String>>>;

    /// A layer that records its name on the way in and out.
    fn tracing_layer(name: &'static str, log: &Log) -> BoxLayer {
        let log = Arc::clone(log);
        let mut layers = Layers::default();
        layers.push(from_fn(move |delivery: Delivery, next: Next| {
            let log = Arc::clone(&log);
            async move {
                log.lock().unwrap().push(format!("{name} in"));
                let result = next.run(delivery).await;
                log.lock().unwrap().push(format!("{name} out"));
                result
            }
        }));
        layers.0.pop().unwrap()
    }

    fn recording_handler(log: &Log) -> Registration {
        let log = Arc::clone(log);
        Registration::new(handler_fn(move |text: String, _ctx: Context| {
            let log = Arc::clone(&log);
            async move {
                if text == "panic" {
                    panic!("handler panicked");
                }
                if text == "slow" {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                log.lock().unwrap().push(format!("handler {text}"));
                Ok::<(), HandlerError>(())
            }
        }))
    }

    fn delivery(body: &'static str) -> Delivery {
        Delivery::new(Bytes::from_static(body.as_bytes()), Context::detached("q"))
    }

    #[tokio::test]
    async fn layers_wrap_outward_in_registration_order() {
        let log = Log::default();
        let layers = [tracing_layer("queue", &log), tracing_layer("service", &log)];
        let pipeline = recording_handler(&log).assemble(&layers, None);
        pipeline.call(delivery("hi")).await.unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            [
                "service in",
                "queue in",
                "handler hi",
                "queue out",
                "service out"
            ]
        );
    }

    #[tokio::test]
    async fn a_layer_can_answer_without_the_handler() {
        let log = Log::default();
        let mut layers = Layers::default();
        layers.push(from_fn(|delivery: Delivery, next: Next| async move {
            if delivery.context().header("x-tenant").is_none() {
                return Err(Failure::Handler(HandlerError::reject("no tenant")));
            }
            next.run(delivery).await
        }));
        let pipeline = recording_handler(&log).assemble(&layers.0, None);
        let refused = pipeline.call(delivery("hi")).await;
        assert!(matches!(refused, Err(Failure::Handler(e)) if e.is_reject()));
        assert!(log.lock().unwrap().is_empty(), "the handler never ran");
    }

    /// A layer whose `call` panics before returning its future.
    struct PanicsEarly;

    impl Service for PanicsEarly {
        #[allow(clippy::manual_async_fn)]
        fn call(&self, _: Delivery) -> impl Future<Output = Result<(), Failure>> + Send {
            panic!("layer panicked while building its future");
            #[allow(unreachable_code)]
            async {
                Ok(())
            }
        }
    }

    #[tokio::test]
    async fn panics_in_handlers_and_layers_are_failures() {
        let log = Log::default();
        let pipeline = recording_handler(&log).assemble(&[], None);
        match pipeline.call(delivery("panic")).await {
            Err(Failure::Panic(message)) => assert_eq!(message, "handler panicked"),
            other => panic!("expected a panic failure, got {other:?}"),
        }
        let early: BoxLayer = Arc::new(|_inner| BoxService::new(PanicsEarly));
        let pipeline = recording_handler(&log).assemble(&[early], None);
        match pipeline.call(delivery("hi")).await {
            Err(Failure::Panic(message)) => {
                assert_eq!(message, "layer panicked while building its future");
            }
            other => panic!("expected a panic failure, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_timeout_covers_the_layers() {
        let log = Log::default();
        let mut layers = Layers::default();
        layers.push(from_fn(|delivery: Delivery, next: Next| async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            next.run(delivery).await
        }));
        let limit = Duration::from_secs(1);
        let pipeline = recording_handler(&log).assemble(&layers.0, Some(limit));
        assert!(matches!(
            pipeline.call(delivery("hi")).await,
            Err(Failure::Timeout(d)) if d == limit
        ));
        let pipeline = recording_handler(&log).assemble(&[], Some(limit));
        assert!(matches!(
            pipeline.call(delivery("slow")).await,
            Err(Failure::Timeout(_))
        ));
        assert!(log.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn tower_layers_compose() {
        let log = Log::default();
        let stack = tower_layer::Stack::new(
            layer_fn(|inner: BoxService| inner),
            tower_layer::Identity::new(),
        );
        let mut layers = Layers::default();
        layers.push(stack);
        let pipeline = recording_handler(&log).assemble(&layers.0, None);
        pipeline.call(delivery("x")).await.unwrap();
        assert_eq!(*log.lock().unwrap(), ["handler x"]);
    }
}
