//! Failure semantics against a real broker: retries held by the broker with backoff and
//! attempt counting (`retries`), dead letters with reasons and routes (`dead_letters`),
//! timeouts and panics anywhere (`crashes`). The scripted handler they share is here.

mod crashes;
mod dead_letters;
mod retries;

pub(super) use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

pub(super) use conejo::{
    Blocking, BlockingHandler, Conejo, Context, Exchange, Failure, Handler, HandlerError, Json,
    Outcome, QueueConfig, RetryPolicy, types::BasicProperties,
};
pub(super) use conejo_tests::{
    Broker, RunningService, Scenario, amqp_url, init_tracing, queue_config, unique_name,
};
pub(super) use lapin::ExchangeKind;

pub(super) const WAIT: Duration = Duration::from_secs(30);

/// One call of a [`Scripted`] handler.
#[derive(Debug, Clone)]
pub(super) struct Call {
    pub(super) body: String,
    pub(super) attempt: u32,
    pub(super) redelivered: bool,
    pub(super) at: Instant,
    /// The exchange and routing key the message came by, as the context tells.
    pub(super) route: (String, String),
}

/// What a [`Scripted`] handler does with a body on an attempt.
pub(super) type Script = fn(&str, u32) -> Result<(), HandlerError>;

/// Records every call, then does what its script says.
#[derive(Clone)]
pub(super) struct Scripted {
    calls: Arc<Mutex<Vec<Call>>>,
    script: Script,
}

impl Scripted {
    pub(super) fn new(script: Script) -> Self {
        Scripted {
            calls: Arc::default(),
            script,
        }
    }

    pub(super) fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    pub(super) fn calls_of(&self, body: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.body == body)
            .collect()
    }
}

impl Handler for Scripted {
    type Message = String;

    async fn handle(&self, body: String, ctx: &Context) -> Result<(), HandlerError> {
        self.calls.lock().unwrap().push(Call {
            body: body.clone(),
            attempt: ctx.attempt(),
            redelivered: ctx.redelivered(),
            at: Instant::now(),
            route: (ctx.exchange().to_owned(), ctx.routing_key().to_owned()),
        });
        (self.script)(&body, ctx.attempt())
    }
}

/// No jitter, so that observed delays can be compared with the policy.
pub(super) fn fast_retries(attempts: u32) -> RetryPolicy {
    RetryPolicy::default()
        .max_attempts(attempts)
        .initial_delay(Duration::from_millis(300))
        .multiplier(2.0)
        .jitter(0.0)
}
