//! One delivery's way through conejo, on the handler runtime: poison check → the queue's
//! pipeline (timeout, panic isolation, the user's layers, decode, handler) → outcome →
//! settlement. Failures become a retry copy in a wait
//! queue or a dead letter, each confirmed by the broker before the delivery is acked.

use std::{panic::AssertUnwindSafe, sync::Arc, time::Duration, time::SystemTime};

use bytes::Bytes;
use tracing::{Instrument, Span, debug, error, field, info_span, warn};

use super::{
    cursor::Cursor,
    publish::Copies,
    settle::{SettleHandle, tracker::Settlement},
};
use crate::{
    Context, Failure, Outcome, PublishError,
    config::{
        queue::ResolvedQueue,
        retry::{MAX_RETRY_DELAY, wait_ttl_ms},
        topology,
    },
    handler::slot::Slot,
    headers,
    observe::{journal::HandledAs, stats::QueueCounters},
    service::{Delivery, Service},
};

/// How long a delivery whose copy could not be published waits before it is given back, so
/// that a broker refusing copies does not turn into a hot redelivery loop.
const PUBLISH_FAILURE_PAUSE: Duration = Duration::from_secs(5);

/// Everything one channel's deliveries need, shared by their tasks.
pub(crate) struct Dispatch {
    /// The queue's settings: its name, failure policy, retries, poison limit, dead-letter
    /// route, the flags of its wait queues.
    pub(crate) settings: Arc<ResolvedQueue>,
    /// Where settlements go; the settle task runs on the connection runtime and owns the
    /// channel that delivered these messages.
    pub(crate) settle: SettleHandle,
    /// Publishes retry copies and dead letters, with confirms.
    pub(crate) publisher: Arc<Copies>,
    /// This queue's counters.
    pub(crate) counters: Arc<QueueCounters>,
    /// A stream queue's cursor, and the epoch of this channel's subscription.
    pub(crate) cursor: Option<(Arc<Cursor>, u64)>,
}

/// What a failure comes to.
enum Failed {
    /// The delivery is settled so.
    Settled(Settlement),
    /// An ordered queue's retry, in place: handle it again, at its next attempt.
    Again,
}

/// Why a message is dead-lettered (`conejo-reason`).
#[derive(Debug, Clone, Copy)]
enum Reason {
    /// The failure policy said [`Outcome::Reject`].
    Rejected,
    /// Retries used up.
    AttemptsExhausted,
    /// Delivered this often without ever reaching a result.
    Poison(u32),
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Rejected => "rejected",
            Reason::AttemptsExhausted => "attempts-exhausted",
            Reason::Poison(_) => "poison",
        }
    }
}

/// A delivery not yet settled. Dropping it without [`settle`](Self::settle) — a panic
/// anywhere, a cancelled or dropped task — gives the message back to the broker, the way an
/// `OwnedSemaphorePermit` frees its slot: no delivery can stay unacked for good. It holds its
/// own channel's settle handle, so its result can only ever reach that channel.
pub(crate) struct Unsettled {
    /// The delivery tag, on the channel of `dispatch.settle`.
    tag: u64,
    /// The queue's shared state.
    dispatch: Arc<Dispatch>,
    /// Cleared once settled.
    armed: bool,
}

impl Unsettled {
    pub(crate) fn new(tag: u64, dispatch: Arc<Dispatch>) -> Self {
        Unsettled {
            tag,
            dispatch,
            armed: true,
        }
    }

    /// Runs the delivery through `pipeline` (its queue's) and settles it. Returns the
    /// delivery's concurrency slot, for the caller to free once it is ready for the next
    /// delivery: the slot goes with the settlement, whatever copies of the context a handler
    /// kept (`None` if a blocking handler's abandoned thread took it).
    pub(crate) async fn process<S: Service>(
        self,
        pipeline: &S,
        ctx: Context,
        body: Bytes,
    ) -> Option<Slot> {
        let how = self.dispatch.handle(pipeline, &ctx, &body).await;
        self.settle(how);
        ctx.take_slot()
    }

    fn settle(mut self, how: Settlement) {
        self.armed = false;
        self.dispatch.settled(self.tag, how);
    }

    /// Gives the message back unstarted (shutdown).
    pub(crate) fn give_back(self) {
        self.settle(Settlement::Requeue);
    }

    /// True once its channel is lost (or its settlements refused): its result could not be
    /// sent, the broker redelivers it.
    pub(crate) fn is_lost(&self) -> bool {
        self.dispatch.settle.is_closed()
    }

    /// Drops it without a settlement: its channel is lost, the broker redelivers it.
    pub(crate) fn abandon(mut self) {
        self.armed = false;
    }
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        if self.armed {
            QueueCounters::add(&self.dispatch.counters.unsettled, 1);
            warn!(
                queue = %self.dispatch.settings.name,
                delivery_tag = self.tag,
                "a delivery ended without a result (a panic outside the handler, or its task \
                 was dropped); giving the message back"
            );
            self.dispatch.settled(self.tag, Settlement::Requeue);
        }
    }
}

impl Dispatch {
    /// Sends a delivery's settlement to the settle task and, on a stream queue, tells the
    /// cursor.
    #[inline]
    fn settled(&self, tag: u64, how: Settlement) {
        if let Some((cursor, epoch)) = &self.cursor {
            cursor.settled(*epoch, tag, how);
        }
        self.settle.settle(tag, how);
    }

    /// Runs the pipeline and says how to settle the delivery, inside the delivery's span.
    async fn handle<S: Service>(&self, pipeline: &S, ctx: &Context, body: &Bytes) -> Settlement {
        let span = info_span!(
            "delivery",
            queue = %self.settings.name,
            delivery_tag = ctx.delivery_tag(),
            message_id = ctx.message_id(),
            attempt = ctx.attempt(),
            outcome = field::Empty,
            handler_ms = field::Empty,
        );
        #[cfg(feature = "opentelemetry")]
        crate::observe::trace_context::adopt_parent(&span, ctx.headers());
        self.handle_in_span(pipeline, ctx, body, span.clone())
            .instrument(span)
            .await
    }

    /// `span` is the span this runs in (a handle to it, so the fast path does not look it
    /// up; the rare paths record their outcome through `Span::current`).
    async fn handle_in_span<S: Service>(
        &self,
        pipeline: &S,
        ctx: &Context,
        body: &Bytes,
        span: Span,
    ) -> Settlement {
        // The rare paths are boxed: awaited inline, their futures (publishing with confirms)
        // would make every delivery's task several times larger, and tokio copies a task's
        // future when it spawns it and as it completes.
        if let Some(limit) = self.settings.poison_limit
            && let Some((count, counted_by_broker)) = redelivery_count(ctx)
            && let Some(settled) =
                Box::pin(self.check_poison(ctx, body, limit, count, counted_by_broker)).await
        {
            return settled;
        }
        // No clock read unless the span is recorded by some subscriber.
        let started = (!span.is_disabled()).then(std::time::Instant::now);
        let call = pipeline.call(Delivery::new(body.clone(), ctx.clone()));
        let result = self.counters.timed(call).await;
        if let Some(started) = started {
            span.record("handler_ms", started.elapsed().as_secs_f64() * 1e3);
        }
        // What the handler published through its context is confirmed before the delivery
        // is acked; an unconfirmed one fails the delivery.
        let result = match (result, ctx.ledger()) {
            (Ok(()), Some(ledger)) => Box::pin(ledger.settle()).await.map_err(Failure::Publish),
            (result, _) => result,
        };
        match result {
            Ok(()) => {
                self.ended(&span, ctx, body, HandledAs::Acked, None, None);
                Settlement::Ack
            }
            Err(failure) => Box::pin(self.failed(pipeline, failure, ctx, body)).await,
        }
    }

    /// One more attempt (an ordered queue's retry in place), as the first one runs in
    /// [`handle_in_span`](Self::handle_in_span).
    async fn attempt<S: Service>(
        &self,
        pipeline: &S,
        ctx: &Context,
        body: &Bytes,
    ) -> Result<(), Failure> {
        let call = pipeline.call(Delivery::new(body.clone(), ctx.clone()));
        let result = self.counters.timed(call).await;
        match (result, ctx.ledger()) {
            (Ok(()), Some(ledger)) => Box::pin(ledger.settle()).await.map_err(Failure::Publish),
            (result, _) => result,
        }
    }

    /// A failed attempt: retried through a wait queue or dead-lettered — or, on an ordered
    /// queue, retried in place, attempt after attempt, until one succeeds or the failure is
    /// settled otherwise.
    async fn failed<S: Service>(
        &self,
        pipeline: &S,
        failure: Failure,
        ctx: &Context,
        body: &Bytes,
    ) -> Settlement {
        let (mut failure, mut again): (Failure, Option<Context>) = (failure, None);
        let settled = loop {
            let current = again.as_ref().unwrap_or(ctx);
            match self.fail(failure, current, body).await {
                Failed::Settled(settled) => break settled,
                Failed::Again => {
                    let next = current.next_attempt();
                    let result = self.attempt(pipeline, &next, body).await;
                    again = Some(next);
                    match result {
                        Ok(()) => {
                            let last = again.as_ref().unwrap_or(ctx);
                            self.ended(&Span::current(), last, body, HandledAs::Acked, None, None);
                            break Settlement::Ack;
                        }
                        Err(next_failure) => failure = next_failure,
                    }
                }
            }
        };
        // The slot goes back with the delivery, wherever its attempts moved it.
        if let Some(last) = again
            && let Some(slot) = last.take_slot()
        {
            ctx.put_slot(slot);
        }
        settled
    }

    /// Says how the delivery ended: the delivery span's `outcome`, and (feature
    /// `test-util`) the test harness's journal.
    #[inline]
    fn ended(
        &self,
        span: &Span,
        ctx: &Context,
        body: &Bytes,
        how: HandledAs,
        failure: Option<&Failure>,
        sent_to: Option<&str>,
    ) {
        span.record("outcome", how.as_str());
        #[cfg(feature = "test-util")]
        self.counters
            .journal
            .record(|| crate::observe::journal::Handled {
                queue: self.settings.name.to_string(),
                message_id: ctx.message_id().map(str::to_owned),
                routing_key: ctx.routing_key().to_owned(),
                attempt: ctx.attempt(),
                redelivered: ctx.redelivered(),
                outcome: how,
                failure: failure.map(|f| format!("{}: {}", f.kind(), describe(f))),
                sent_to: sent_to.map(str::to_owned),
                body: body.clone(),
            });
        #[cfg(not(feature = "test-util"))]
        let _ = (ctx, body, failure, sent_to);
    }

    /// Crash-loop detection of a delivery with a [`redelivery_count`]: past the limit the
    /// message is dead-lettered; on a classic queue, the count is kept on a republished copy.
    /// `Some` when the delivery was dealt with here.
    async fn check_poison(
        &self,
        ctx: &Context,
        body: &Bytes,
        limit: u32,
        count: i64,
        counted_by_broker: bool,
    ) -> Option<Settlement> {
        if count >= i64::from(limit) {
            QueueCounters::add(&self.counters.poison, 1);
            let count = u32::try_from(count).unwrap_or(u32::MAX);
            return Some(
                self.dead_letter(Reason::Poison(count), None, ctx, body)
                    .await,
            );
        }
        if counted_by_broker {
            return None;
        }
        let properties = headers::copy_properties(ctx.properties(), |h| {
            // The copy goes through the default exchange: keep the route it came by.
            self.mark_route(h, ctx);
            headers::set_int(
                h,
                headers::REDELIVERIES,
                u32::try_from(count).unwrap_or(u32::MAX),
            );
        });
        match self
            .publisher
            .publish("", &self.settings.name, body.clone(), properties)
            .await
        {
            Ok(()) => {
                self.ended(
                    &Span::current(),
                    ctx,
                    body,
                    HandledAs::RedeliveryCounted,
                    None,
                    None,
                );
                Some(Settlement::Ack)
            }
            // Not counted this time; handle it rather than give it back again.
            Err(error) => {
                QueueCounters::add(&self.counters.publish_failures, 1);
                warn!(queue = %self.settings.name, %error, "cannot count a redelivery; handling the message");
                None
            }
        }
    }

    /// Applies the failure policy (a panicking policy rejects), then retries (through a wait
    /// queue, or in place on an ordered queue) or dead-letters.
    async fn fail(&self, failure: Failure, ctx: &Context, body: &Bytes) -> Failed {
        let counters = &self.counters;
        let counter = match failure {
            Failure::Handler(_) => &counters.handler_errors,
            Failure::Decode(_) => &counters.decode_failures,
            Failure::Panic(_) => &counters.panics,
            Failure::Timeout(_) => &counters.timeouts,
            Failure::Publish(_) => &counters.handler_publish_failures,
        };
        QueueCounters::add(counter, 1);
        if matches!(failure, Failure::Timeout(_)) && self.settings.blocking {
            QueueCounters::add(&counters.abandoned, 1);
            warn!(
                queue = %self.settings.name,
                delivery_tag = ctx.delivery_tag(),
                "a blocking handler passed its timeout; its thread is abandoned and keeps \
                 its concurrency slot until it returns"
            );
        }
        // Counted above whatever becomes of the result: a failing dependency shows in the
        // failure counters even while connections are being lost.
        if self.settle.is_closed() {
            // The channel is lost, or the message was given back at the shutdown deadline:
            // the broker redelivers the original, so no copy is published. The result is
            // dropped and counted as a late settlement where it is settled.
            debug!(
                queue = %self.settings.name,
                delivery_tag = ctx.delivery_tag(),
                failure = failure.kind(),
                "failed after its delivery was given back; no retry copy or dead letter"
            );
            self.ended(
                &Span::current(),
                ctx,
                body,
                HandledAs::Dropped,
                Some(&failure),
                None,
            );
            return Failed::Settled(Settlement::Requeue);
        }
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| (self.settings.policy)(&failure, ctx)))
            .unwrap_or_else(|_| {
                error!(queue = %self.settings.name, "failure policy panicked; dead-lettering the message");
                Outcome::Reject
            });
        match outcome {
            Outcome::Ack => {
                warn!(
                    queue = %self.settings.name,
                    delivery_tag = ctx.delivery_tag(),
                    message_id = ctx.message_id(),
                    failure = failure.kind(),
                    "{}; acked (dropped) as the failure policy says",
                    describe(&failure)
                );
                self.ended(
                    &Span::current(),
                    ctx,
                    body,
                    HandledAs::Acked,
                    Some(&failure),
                    None,
                );
                Failed::Settled(Settlement::Ack)
            }
            Outcome::Retry
                if ctx.attempt() < self.settings.retry.attempts()
                    && self.settings.retry_in_place =>
            {
                self.retry_in_place(&failure, ctx, body).await
            }
            Outcome::Retry if ctx.attempt() < self.settings.retry.attempts() => {
                Failed::Settled(self.retry_later(&failure, ctx, body).await)
            }
            Outcome::Retry => Failed::Settled(
                self.dead_letter(Reason::AttemptsExhausted, Some(&failure), ctx, body)
                    .await,
            ),
            _ => Failed::Settled(
                self.dead_letter(Reason::Rejected, Some(&failure), ctx, body)
                    .await,
            ),
        }
    }

    /// An ordered or stream queue's retry: waits the delay holding the delivery (and its key), then
    /// says to handle it again — or, if shutdown or the channel's loss comes first, gives
    /// it back.
    async fn retry_in_place(&self, failure: &Failure, ctx: &Context, body: &Bytes) -> Failed {
        let delay = self.retry_delay(failure, ctx.attempt());
        warn!(
            queue = %self.settings.name,
            delivery_tag = ctx.delivery_tag(),
            message_id = ctx.message_id(),
            failure = failure.kind(),
            attempt = ctx.attempt(),
            "{}; attempt {} of {} in {delay:?}, in place",
            describe(failure),
            ctx.attempt() + 1,
            self.settings.retry.attempts()
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = ctx.shutdown_requested() => {
                self.ended(&Span::current(), ctx, body, HandledAs::Requeued, Some(failure), None);
                return Failed::Settled(Settlement::Requeue);
            }
        }
        QueueCounters::add(&self.counters.retried, 1);
        self.ended(
            &Span::current(),
            ctx,
            body,
            HandledAs::Retried,
            Some(failure),
            None,
        );
        Failed::Again
    }

    /// How long to wait before the next attempt: what the handler asked for (bounded), else
    /// the policy's delay.
    fn retry_delay(&self, failure: &Failure, attempt: u32) -> Duration {
        failure
            .retry_delay()
            .map(|asked| asked.min(MAX_RETRY_DELAY))
            .unwrap_or_else(|| self.settings.retry.delay(attempt))
    }

    /// Republishes a copy for the next attempt to the wait queue of its delay.
    async fn retry_later(&self, failure: &Failure, ctx: &Context, body: &Bytes) -> Settlement {
        let attempt = ctx.attempt();
        let delay = self.retry_delay(failure, attempt);
        let ttl = wait_ttl_ms(delay);
        let now = headers::timestamp(SystemTime::now());
        let properties = headers::copy_properties(ctx.properties(), |h| {
            self.mark_origin(h, ctx, &now);
            headers::set_int(h, headers::ATTEMPT, attempt + 1);
        });
        let wait_queue = topology::wait_queue_name(&self.settings.name, ttl);
        let published = match self
            .publisher
            .ensure_wait_queue(&self.settings.name, ttl, self.settings.durability)
            .await
        {
            Ok(()) => {
                self.publisher
                    .publish("", &wait_queue, body.clone(), properties)
                    .await
            }
            Err(error) => Err(error),
        };
        match published {
            Ok(()) => {
                QueueCounters::add(&self.counters.retried, 1);
                warn!(
                    queue = %self.settings.name,
                    delivery_tag = ctx.delivery_tag(),
                    message_id = ctx.message_id(),
                    failure = failure.kind(),
                    attempt,
                    "{}; attempt {} of {} in {ttl} ms",
                    describe(failure),
                    attempt + 1,
                    self.settings.retry.attempts()
                );
                self.ended(
                    &Span::current(),
                    ctx,
                    body,
                    HandledAs::Retried,
                    Some(failure),
                    Some(&wait_queue),
                );
                Settlement::Ack
            }
            Err(error) => {
                if matches!(error, PublishError::Returned { .. }) {
                    // Unroutable: the wait queue was deleted since this connection declared
                    // it. Declare it again next time.
                    self.publisher.forget_wait_queue(&wait_queue).await;
                }
                self.publish_failed(ctx, body, &wait_queue, error).await
            }
        }
    }

    /// Republishes the message with reason headers to the dead-letter exchange.
    async fn dead_letter(
        &self,
        reason: Reason,
        failure: Option<&Failure>,
        ctx: &Context,
        body: &Bytes,
    ) -> Settlement {
        let now = headers::timestamp(SystemTime::now());
        let error_text = failure.map(describe);
        let properties = headers::copy_properties(ctx.properties(), |h| {
            self.mark_origin(h, ctx, &now);
            headers::set_text(h, headers::LAST_FAILURE_AT, &now);
            headers::set_text(h, headers::REASON, reason.as_str());
            headers::set_int(h, headers::ATTEMPT, ctx.attempt());
            if let Reason::Poison(count) = reason {
                headers::set_int(h, headers::REDELIVERIES, count);
            }
            if let (Some(failure), Some(text)) = (failure, &error_text) {
                headers::set_text(h, headers::FAILURE, failure.kind());
                headers::set_text(
                    h,
                    headers::ERROR,
                    headers::truncate(text, headers::MAX_ERROR_LEN),
                );
            }
        });
        let route = &self.settings.dead_letter;
        let routing_key = route.routing_key.as_deref().unwrap_or(ctx.routing_key());
        // A stream cannot take the message back: its dead letter is tried again after each
        // pause, holding the message (and its offset), until shutdown or the loss of the
        // channel — then the next subscription reads it again.
        let published = loop {
            let published = self
                .publisher
                .publish(
                    &route.exchange,
                    routing_key,
                    body.clone(),
                    properties.clone(),
                )
                .await;
            match published {
                Err(error)
                    if self.settings.stream.is_some()
                        && !ctx.is_shutting_down()
                        && !self.settle.is_closed() =>
                {
                    self.pause_after(ctx, &route.exchange, &error, "trying again")
                        .await;
                }
                published => break published,
            }
        };
        match published {
            Ok(()) => {
                QueueCounters::add(&self.counters.dead_lettered, 1);
                warn!(
                    queue = %self.settings.name,
                    delivery_tag = ctx.delivery_tag(),
                    message_id = ctx.message_id(),
                    reason = reason.as_str(),
                    failure = failure.map(Failure::kind),
                    attempt = ctx.attempt(),
                    "{}; dead-lettered to exchange '{}'",
                    error_text.as_deref().unwrap_or("delivered too often without a result"),
                    route.exchange
                );
                self.ended(
                    &Span::current(),
                    ctx,
                    body,
                    HandledAs::DeadLettered,
                    failure,
                    Some(&route.exchange),
                );
                Settlement::Ack
            }
            Err(error) => self.publish_failed(ctx, body, &route.exchange, error).await,
        }
    }

    /// The copy was not confirmed: the delivery is given back after a pause (shortened by
    /// shutdown), so nothing is lost and nothing loops hot.
    async fn publish_failed(
        &self,
        ctx: &Context,
        body: &Bytes,
        target: &str,
        error: PublishError,
    ) -> Settlement {
        self.pause_after(ctx, target, &error, "giving it back")
            .await;
        self.ended(&Span::current(), ctx, body, HandledAs::Requeued, None, None);
        Settlement::Requeue
    }

    /// Counts and logs a copy the broker did not confirm, then waits
    /// [`PUBLISH_FAILURE_PAUSE`] (shortened by shutdown) before `then` happens.
    async fn pause_after(&self, ctx: &Context, target: &str, error: &PublishError, then: &str) {
        QueueCounters::add(&self.counters.publish_failures, 1);
        error!(
            queue = %self.settings.name,
            delivery_tag = ctx.delivery_tag(),
            message_id = ctx.message_id(),
            %error,
            "cannot republish the message to '{target}'; {then} in {PUBLISH_FAILURE_PAUSE:?}"
        );
        tokio::select! {
            () = tokio::time::sleep(PUBLISH_FAILURE_PAUSE) => {}
            () = ctx.shutdown_requested() => {}
        }
    }

    /// Where the message came from and when it first failed, set once; with the
    /// `opentelemetry` feature, this delivery's trace context, parent of the copy's.
    fn mark_origin(&self, h: &mut lapin::types::FieldTable, ctx: &Context, now: &str) {
        #[cfg(feature = "opentelemetry")]
        crate::observe::trace_context::inject_current(h);
        self.mark_route(h, ctx);
        if !h.contains_key(headers::FIRST_FAILURE_AT) {
            headers::set_text(h, headers::FIRST_FAILURE_AT, now);
        }
    }

    /// The exchange, routing key and queue the message first came by (a copy of a copy
    /// keeps them: the context reads them back from the headers).
    fn mark_route(&self, h: &mut lapin::types::FieldTable, ctx: &Context) {
        headers::set_text(h, headers::ORIGINAL_EXCHANGE, ctx.exchange());
        headers::set_text(h, headers::ORIGINAL_ROUTING_KEY, ctx.routing_key());
        headers::set_text(h, headers::ORIGINAL_QUEUE, &self.settings.name);
    }
}

/// How often the message was delivered before without a result, and whether the broker
/// counted it: quorum queues count redeliveries themselves (`x-delivery-count`); for a
/// redelivered message of a classic queue conejo keeps the count in `conejo-redeliveries`.
/// `None` for a first delivery.
fn redelivery_count(ctx: &Context) -> Option<(i64, bool)> {
    let found = ctx.headers();
    match headers::int(found, headers::DELIVERY_COUNT) {
        Some(count) => Some((count, true)),
        None if ctx.redelivered() => Some((
            headers::int(found, headers::REDELIVERIES).unwrap_or(0) + 1,
            false,
        )),
        None => None,
    }
}

/// The failure's text; a `Display` that panics does not take the delivery down with it.
fn describe(failure: &Failure) -> String {
    std::panic::catch_unwind(AssertUnwindSafe(|| failure.to_string()))
        .unwrap_or_else(|_| format!("{} failure (its error's Display panicked)", failure.kind()))
}
