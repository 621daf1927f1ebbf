//! A queue's pipeline, assembled once when the service starts: the queue's timeout and panic
//! isolation around the user's layers (boxed, only when there are any) around decoding and
//! the handler.

use std::{any::Any, fmt, panic::AssertUnwindSafe, sync::Arc, time::Duration};

use futures::FutureExt;

use super::{BoxService, Delivery, Layer, Service};
use crate::{Decode, Failure, Handler};

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
pub(crate) struct HandlerService<H> {
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
pub(crate) struct CatchPanic<S> {
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
pub(crate) struct Timeout<S> {
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

/// Receives a queue's assembled pipeline as its concrete type: what lets the engine run it
/// in workers that call it directly (no allocation per delivery, no virtual call).
pub(crate) trait Visit {
    /// What the visitor makes of the pipeline.
    type Output;

    /// Takes the pipeline.
    fn visit<S: Service>(self, pipeline: S) -> Self::Output;
}

/// Assembles a queue's pipeline — `layers` from the innermost (applied first) out, inside
/// panic isolation and the timeout — and hands it to `visit` as its concrete type. Without
/// layers, decoding and the handler are called directly; with layers, those are boxed.
pub(crate) fn assemble_with<H: Handler, V: Visit>(
    handler: H,
    layers: &[BoxLayer],
    timeout: Option<Duration>,
    visit: V,
) -> V::Output {
    let core = HandlerService { handler };
    let layered = |core: HandlerService<H>| {
        layers
            .iter()
            .fold(BoxService::new(core), |inner, layer| layer(inner))
    };
    match (layers.is_empty(), timeout) {
        (true, None) => visit.visit(CatchPanic { inner: core }),
        (true, Some(limit)) => visit.visit(Timeout {
            inner: CatchPanic { inner: core },
            limit,
        }),
        (false, None) => visit.visit(CatchPanic {
            inner: layered(core),
        }),
        (false, Some(limit)) => visit.visit(Timeout {
            inner: CatchPanic {
                inner: layered(core),
            },
            limit,
        }),
    }
}

/// The pipeline as one erased service: for what needs no monomorphic worker (a test of a
/// handler, [`testing::outcome`](crate::testing)).
#[cfg(any(test, feature = "test-util"))]
pub(crate) fn assemble<H: Handler>(
    handler: H,
    layers: &[BoxLayer],
    timeout: Option<Duration>,
) -> BoxService {
    struct Erase;
    impl Visit for Erase {
        type Output = BoxService;
        fn visit<S: Service>(self, pipeline: S) -> BoxService {
            BoxService::new(pipeline)
        }
    }
    assemble_with(handler, layers, timeout, Erase)
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

    use std::future::Future;

    use bytes::Bytes;

    use super::*;
    use crate::{
        Context, HandlerError, handler_fn,
        service::{Next, from_fn, layer_fn},
    };

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

    fn recording_handler(log: &Log) -> impl Handler {
        let log = Arc::clone(log);
        handler_fn(move |text: String, _ctx: Context| {
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
        })
    }

    fn delivery(body: &'static str) -> Delivery {
        Delivery::new(Bytes::from_static(body.as_bytes()), Context::detached("q"))
    }

    #[tokio::test]
    async fn layers_wrap_outward_in_registration_order() {
        let log = Log::default();
        let layers = [tracing_layer("queue", &log), tracing_layer("service", &log)];
        let pipeline = assemble(recording_handler(&log), &layers, None);
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
        let pipeline = assemble(recording_handler(&log), &layers.0, None);
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
        let pipeline = assemble(recording_handler(&log), &[], None);
        match pipeline.call(delivery("panic")).await {
            Err(Failure::Panic(message)) => assert_eq!(message, "handler panicked"),
            other => panic!("expected a panic failure, got {other:?}"),
        }
        let early: BoxLayer = Arc::new(|_inner| BoxService::new(PanicsEarly));
        let pipeline = assemble(recording_handler(&log), &[early], None);
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
        let pipeline = assemble(recording_handler(&log), &layers.0, Some(limit));
        assert!(matches!(
            pipeline.call(delivery("hi")).await,
            Err(Failure::Timeout(d)) if d == limit
        ));
        let pipeline = assemble(recording_handler(&log), &[], Some(limit));
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
        let pipeline = assemble(recording_handler(&log), &layers.0, None);
        pipeline.call(delivery("x")).await.unwrap();
        assert_eq!(*log.lock().unwrap(), ["handler x"]);
    }
}
