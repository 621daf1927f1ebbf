//! The publishing link: one task, on the connection runtime, that owns the publishing
//! connection — connected on the first request, reconnected when lost — and its channel in
//! confirm mode. Requests arrive through a queue; each is published at once (frames queued
//! on the channel) and its confirm awaited among all the others in flight, so throughput
//! never pays a round trip per message. Requests that arrive while there is no connection
//! wait in the queue for the next one; their callers bound the wait.
//!
//! Why it is ~700 lines: one task's state machine (connect, publish, confirm, reopen, give
//! up), which reads best in one place; its tests are in `publish/tests.rs`.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use futures::{StreamExt, stream::FuturesUnordered};
use lapin::{BasicProperties, types::ShortString};
use tokio::{
    sync::{OwnedSemaphorePermit, mpsc, oneshot},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    completion::Completion,
    error::{PublishError, RequestError},
    reply::Reply,
    state::{LinkShared, PublisherState},
};
use crate::{
    Error,
    backoff::Backoff,
    broker::{
        self, AmqpUrl, Broker, BrokerError, Confirmed, Connection, ConsumeOptions, Deliveries,
        Event,
    },
    observe::stats::PublishCounters,
};

/// RabbitMQ's direct reply-to pseudo-queue.
pub(crate) const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// How long a shutting-down link waits for the confirms still in flight.
const DRAIN: Duration = Duration::from_secs(5);

/// Where and how the link connects.
#[derive(Clone)]
pub(crate) struct LinkTarget {
    /// The transport, and the runtime its tasks run on.
    pub(crate) broker: Broker,
    /// The broker's addresses, tried in turn.
    pub(crate) urls: Vec<AmqpUrl>,
    /// The publishing connection's name, as the broker shows it.
    pub(crate) name: String,
    /// How long one connection attempt may take.
    pub(crate) connect_timeout: Duration,
    /// Back-off between connection attempts: initial delay and cap.
    pub(crate) backoff: (Duration, Duration),
}

/// What a caller hands the link.
pub(crate) enum Request {
    /// Publish a message.
    Publish(Outgoing),
    /// Publish a request with a direct reply-to, and route its reply back.
    Ask(Ask),
    /// Run declarations on the publishing connection (a wait queue before its first copy),
    /// told which connection generation it runs in.
    Run(Box<dyn FnOnce(Connection, u64) -> BoxFuture + Send>),
}

/// A boxed future the link runs on its connection.
pub(crate) type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A message on its way to the broker.
pub(crate) struct Outgoing {
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) body: Bytes,
    pub(crate) properties: BasicProperties,
    pub(crate) mandatory: bool,
    /// Who hears of the confirm (nobody, for fire-and-forget).
    pub(crate) done: Done,
    /// Its place among the unconfirmed messages, freed with the confirm.
    pub(crate) permit: OwnedSemaphorePermit,
}

/// Who hears how a publish ended.
pub(crate) enum Answer {
    /// The caller, awaiting it.
    Caller(oneshot::Sender<Result<(), PublishError>>),
    /// Shared by the caller and its delivery (a handler's publish).
    Shared(Arc<Completion>),
    /// Nobody: fire-and-forget.
    Nobody,
}

/// How a publish's end is told: once, by [`Done::finish`] — or, if a path drops it
/// unanswered, as "the connection was lost" (it may or may not be on the broker), so that no
/// caller is ever left without an answer.
pub(crate) struct Done(Option<Answer>);

impl Done {
    pub(crate) fn caller(sender: oneshot::Sender<Result<(), PublishError>>) -> Self {
        Done(Some(Answer::Caller(sender)))
    }

    pub(crate) fn shared(completion: Arc<Completion>) -> Self {
        Done(Some(Answer::Shared(completion)))
    }

    pub(crate) fn nobody() -> Self {
        Done(Some(Answer::Nobody))
    }

    fn gave_up(&self) -> bool {
        match &self.0 {
            Some(Answer::Caller(sender)) => sender.is_closed(),
            Some(Answer::Shared(completion)) => completion.expired(),
            Some(Answer::Nobody) | None => false,
        }
    }

    fn finish(mut self, result: Result<(), PublishError>) {
        match self.0.take() {
            Some(Answer::Caller(sender)) => {
                let _ = sender.send(result);
            }
            Some(Answer::Shared(completion)) => completion.set(result),
            Some(Answer::Nobody) => {
                if let Err(error) = result {
                    warn!(%error, "a fire-and-forget publish was not confirmed");
                }
            }
            None => {}
        }
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        if self.0.is_some() {
            Done(self.0.take()).finish(Err(PublishError::ConnectionLost));
        }
    }
}

/// A request awaiting its reply.
pub(crate) struct Ask {
    /// The request message; its `done` is unused (the reply's sender says it all).
    pub(crate) message: Outgoing,
    /// Its correlation id.
    pub(crate) correlation: String,
    /// Where the reply (or why none comes) goes.
    pub(crate) reply: oneshot::Sender<Result<Reply, RequestError>>,
}

/// How one connection's service ended.
enum Served {
    /// The connection was lost: connect again.
    Lost,
    /// The link is done.
    Closed,
}

/// Runs the link until its queue is closed and drained or `stop` fires: connects on the
/// first request, publishes, reconnects.
///
/// `first` is a connection made by the caller (a standalone publisher connects before it
/// returns, so that a refused connection is its caller's error).
pub(crate) async fn run(
    target: LinkTarget,
    mut requests: mpsc::UnboundedReceiver<Request>,
    shared: Arc<LinkShared>,
    stop: CancellationToken,
    mut first: Option<Connection>,
) {
    let mut retry: VecDeque<Request> = VecDeque::new();
    let mut backoff = Backoff::new(target.backoff.0, target.backoff.1);
    let mut address = 0usize;
    'link: loop {
        // Connect only when there is something to publish.
        if retry.is_empty() && first.is_none() {
            shared.set_state(PublisherState::Idle);
            tokio::select! {
                biased;
                () = stop.cancelled() => break 'link,
                request = requests.recv() => match request {
                    Some(request) => {
                        shared.counters().take_waiting();
                        retry.push_back(request);
                    }
                    None => break 'link,
                },
            }
        }
        shared.set_state(PublisherState::Connecting);
        let connection = loop {
            if let Some(connection) = first.take() {
                break connection;
            }
            let url = &target.urls[address % target.urls.len()];
            let attempt = tokio::select! {
                biased;
                () = stop.cancelled() => break 'link,
                attempt = target.broker.connect(url, &target.name, target.connect_timeout) => attempt,
            };
            match attempt {
                Ok(connection) => {
                    backoff.reset();
                    info!(%url, name = %target.name, "publisher connected");
                    break connection;
                }
                Err(error) => {
                    address += 1;
                    let delay = backoff.next_delay();
                    if backoff.worth_logging() {
                        warn!(%error, "the publisher cannot connect; trying again in {delay:?}");
                    }
                    if let Error::Connect { source, .. } = &error {
                        shared.set_connect_error(source.to_string());
                    }
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => break 'link,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };
        shared.next_generation();
        shared.set_state(PublisherState::Connected);
        let served = serve(&connection, &mut requests, &mut retry, &shared, &stop).await;
        match served {
            Served::Closed => {
                close(&connection).await;
                break 'link;
            }
            Served::Lost => {
                address += 1;
                warn!(name = %target.name, "the publisher's connection was lost; reconnecting");
            }
        }
    }
    shared.set_state(PublisherState::Closed);
    // What never reached a connection fails now.
    requests.close();
    while let Some(request) = retry.pop_front().or_else(|| requests.try_recv().ok()) {
        fail(
            request,
            &PublishError::Closed,
            RequestError::Publish(PublishError::Closed),
        );
    }
}

/// A message in flight: what to tell when its confirm comes.
struct InFlight {
    done: Done,
    /// Held until the confirm.
    _permit: OwnedSemaphorePermit,
    /// For the error: where it went.
    exchange: String,
    routing_key: String,
    /// When it was sent, for the confirm latency.
    sent: Instant,
    /// For a request: its correlation id, whose waiter learns of a failed publish.
    correlation: Option<String>,
}

/// What serving one connection holds.
struct Session<'a> {
    /// The connection.
    connection: &'a Connection,
    /// Its publishing channel, in confirm mode (replaced when the broker closes it).
    channel: broker::Channel,
    /// The messages in flight and their confirms.
    pending: Flights,
    /// The direct reply-to consumer, once a request needed it.
    replies: Option<Deliveries>,
    /// Requests awaiting their reply, by correlation id.
    waiting: HashMap<String, oneshot::Sender<Result<Reply, RequestError>>>,
    /// The publisher's counters.
    counters: &'a PublishCounters,
    /// The connection's generation, for declarations.
    generation: u64,
}

/// Serves requests on one connection until it is lost or the link closes.
async fn serve(
    connection: &Connection,
    requests: &mut mpsc::UnboundedReceiver<Request>,
    retry: &mut VecDeque<Request>,
    shared: &Arc<LinkShared>,
    stop: &CancellationToken,
) -> Served {
    let mut events = connection.events();
    let channel = match open(connection).await {
        Ok(channel) => channel,
        Err(error) => {
            debug!(%error, "the publisher cannot open its channel");
            return Served::Lost;
        }
    };
    let mut session = Session {
        connection,
        channel,
        pending: Flights::default(),
        replies: None,
        waiting: HashMap::new(),
        counters: shared.counters(),
        generation: shared.generation(),
    };
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    let mut draining: Option<Instant> = None;
    loop {
        // Requests held back from a lost connection go first, in order.
        if let Some(request) = retry.pop_front() {
            if let Err(lost) = session.handle(request).await {
                retry.push_front(lost);
                session.fail_in_flight();
                return Served::Lost;
            }
            continue;
        }
        if let Some(deadline) = draining
            && (session.pending.is_empty() || Instant::now() >= deadline)
            && requests.is_empty()
        {
            if !session.pending.is_empty() {
                warn!(
                    in_flight = session.pending.len(),
                    "the publisher closed with confirms still due"
                );
            }
            session.fail_in_flight();
            return Served::Closed;
        }
        tokio::select! {
            biased;
            () = stop.cancelled(), if draining.is_none() => {
                draining = Some(Instant::now() + DRAIN);
                requests.close();
            }
            event = events.next() => match event {
                Some(Event::Blocked(reason)) => {
                    warn!(%reason, "the broker blocked the publisher's connection (resource alarm); publishes wait");
                    shared.set_state(PublisherState::Blocked(reason));
                }
                Some(Event::Unblocked) => {
                    info!("the broker unblocked the publisher's connection");
                    shared.set_state(PublisherState::Connected);
                }
                Some(Event::Error(_)) | None if !connection.is_connected() => {
                    session.fail_in_flight();
                    return Served::Lost;
                }
                Some(Event::Error(error)) if !session.channel.is_open() => {
                    // The broker closed the channel (a publish to a missing exchange): what
                    // was in flight on it is lost; a fresh channel takes over.
                    session.fail_channel(&Arc::new(error));
                    match open(connection).await {
                        Ok(fresh) => session.channel = fresh,
                        Err(_) => return Served::Lost,
                    }
                }
                _ => {}
            },
            Some((confirmed, flight)) = session.pending.next(), if !session.pending.is_empty() => {
                session.finish(confirmed, flight);
            }
            reply = next_reply(&mut session.replies), if session.replies.is_some() => match reply {
                Some(Ok(reply)) => session.route_reply(reply),
                Some(Err(_)) | None => session.replies = None,
            },
            request = requests.recv(), if draining.is_none() || !requests.is_empty() => match request {
                Some(request) => {
                    session.counters.take_waiting();
                    if let Err(lost) = session.handle(request).await {
                        retry.push_front(lost);
                        session.fail_in_flight();
                        return Served::Lost;
                    }
                }
                None => draining = Some(draining.unwrap_or_else(|| Instant::now() + DRAIN)),
            },
            _ = sweep.tick() => session.waiting.retain(|_, waiter| !waiter.is_closed()),
        }
    }
}

/// The publishing channel, in confirm mode.
async fn open(connection: &Connection) -> Result<broker::Channel, BrokerError> {
    let channel = connection.open_channel().await?;
    channel.confirm_select().await?;
    Ok(channel)
}

/// The confirms awaited: each yields its flight's number.
type Pending = Pin<Box<dyn Future<Output = (u64, Result<Confirmed, BrokerError>)> + Send>>;

/// The messages in flight, by number, and their confirms.
#[derive(Default)]
struct Flights {
    /// Confirms to come.
    pending: FuturesUnordered<Pending>,
    /// What each confirm is for.
    flights: HashMap<u64, InFlight>,
    /// The next flight's number.
    next: u64,
}

impl Flights {
    fn is_empty(&self) -> bool {
        self.flights.is_empty()
    }

    fn len(&self) -> usize {
        self.flights.len()
    }

    fn push(&mut self, flight: InFlight, confirm: broker::Confirm) {
        let number = self.next;
        self.next += 1;
        self.flights.insert(number, flight);
        self.pending
            .push(Box::pin(async move { (number, confirm.await) }));
    }

    /// The next confirm, with its flight.
    async fn next(&mut self) -> Option<(Result<Confirmed, BrokerError>, InFlight)> {
        loop {
            let (number, confirmed) = self.pending.next().await?;
            if let Some(flight) = self.flights.remove(&number) {
                return Some((confirmed, flight));
            }
        }
    }

    /// Every flight, its confirm no longer awaited.
    fn take_all(&mut self) -> Vec<InFlight> {
        self.pending = FuturesUnordered::new();
        let mut flights: Vec<(u64, InFlight)> = self.flights.drain().collect();
        flights.sort_by_key(|(number, _)| *number);
        flights.into_iter().map(|(_, flight)| flight).collect()
    }
}

impl Session<'_> {
    /// Publishes one request. `Err` gives it back when the connection is gone (it is
    /// published on the next one).
    async fn handle(&mut self, request: Request) -> Result<(), Request> {
        match request {
            Request::Run(work) => {
                work(self.connection.clone(), self.generation).await;
                Ok(())
            }
            Request::Publish(outgoing) => {
                if outgoing.done.gave_up() {
                    // Its caller timed out before it could be sent: it is not sent at all.
                    return Ok(());
                }
                self.publish(outgoing, None).await.map_err(Request::Publish)
            }
            Request::Ask(ask) => self.ask(ask).await,
        }
    }

    /// Publishes a request, consuming direct reply-to on the channel first if need be.
    async fn ask(&mut self, ask: Ask) -> Result<(), Request> {
        if ask.reply.is_closed() {
            return Ok(());
        }
        if self.replies.is_none() {
            let options = ConsumeOptions {
                no_ack: true,
                ..ConsumeOptions::default()
            };
            match self
                .channel
                .consume(REPLY_TO, "conejo-replies", options)
                .await
            {
                Ok(deliveries) => self.replies = Some(deliveries),
                Err(error) if self.connection.is_connected() => {
                    let error = PublishError::Channel(Arc::new(error));
                    let _ = ask.reply.send(Err(RequestError::Publish(error)));
                    return Ok(());
                }
                Err(_) => return Err(Request::Ask(ask)),
            }
        }
        let Ask {
            message,
            correlation,
            reply,
        } = ask;
        self.waiting.insert(correlation.clone(), reply);
        match self.publish(message, Some(correlation.clone())).await {
            Ok(()) => Ok(()),
            Err(message) => {
                let reply = self.waiting.remove(&correlation).expect("registered above");
                Err(Request::Ask(Ask {
                    message,
                    correlation,
                    reply,
                }))
            }
        }
    }

    /// Hands a reply to the request that waits for it.
    fn route_reply(&mut self, reply: broker::Incoming) {
        let correlation = reply
            .properties
            .correlation_id()
            .as_ref()
            .map(ShortString::to_string);
        match correlation.and_then(|c| self.waiting.remove(&c)) {
            Some(waiter) => {
                let _ = waiter.send(Ok(Reply::new(Bytes::from(reply.data), reply.properties)));
            }
            None => debug!("a reply nobody waits for (late, or not ours); dropped"),
        }
    }

    /// Sends one message and puts its confirm among those in flight.
    async fn publish(
        &mut self,
        outgoing: Outgoing,
        correlation: Option<String>,
    ) -> Result<(), Outgoing> {
        let mut sent = Self::send(&self.channel, &outgoing).await;
        if sent.is_err() && self.connection.is_connected() && !self.channel.is_open() {
            // The broker is closing the channel (an earlier publish to a missing exchange):
            // the message goes out on a fresh one. What was in flight on the old one fails.
            if let Err(error) = &sent {
                self.fail_channel(&Arc::new(error.clone()));
            }
            match open(self.connection).await {
                Ok(fresh) => {
                    self.channel = fresh;
                    sent = Self::send(&self.channel, &outgoing).await;
                }
                Err(_) => return Err(outgoing),
            }
        }
        let confirm = match sent {
            Ok(confirm) => confirm,
            Err(_) if !self.connection.is_connected() => return Err(outgoing),
            Err(error) => {
                self.counters.count_failed();
                outgoing
                    .done
                    .finish(Err(PublishError::Channel(Arc::new(error))));
                return Ok(());
            }
        };
        self.counters.count_sent();
        let flight = InFlight {
            done: outgoing.done,
            _permit: outgoing.permit,
            exchange: outgoing.exchange,
            routing_key: outgoing.routing_key,
            sent: Instant::now(),
            correlation,
        };
        self.pending.push(flight, confirm);
        Ok(())
    }

    /// Sends `outgoing`'s frames on `channel`.
    async fn send(
        channel: &broker::Channel,
        outgoing: &Outgoing,
    ) -> Result<broker::Confirm, BrokerError> {
        channel
            .publish(
                &outgoing.exchange,
                &outgoing.routing_key,
                outgoing.mandatory,
                &outgoing.body,
                outgoing.properties.clone(),
            )
            .await
    }

    /// Tells how a confirm came back.
    fn finish(&mut self, confirmed: Result<Confirmed, BrokerError>, flight: InFlight) {
        let counters = self.counters;
        counters.confirm_latency(flight.sent.elapsed());
        let result = match confirmed {
            Ok(Confirmed::Ack | Confirmed::NotRequested) => {
                counters.count_confirmed();
                Ok(())
            }
            Ok(Confirmed::Returned { code, text }) => {
                counters.count_returned();
                Err(PublishError::Returned {
                    code,
                    text,
                    exchange: flight.exchange,
                    routing_key: flight.routing_key,
                })
            }
            Ok(Confirmed::Nack) => {
                counters.count_nacked();
                Err(PublishError::Nacked)
            }
            Err(error) => {
                counters.count_lost();
                Err(PublishError::Channel(Arc::new(error)))
            }
        };
        if let (Some(correlation), Err(error)) = (&flight.correlation, &result)
            && let Some(waiter) = self.waiting.remove(correlation)
        {
            let _ = waiter.send(Err(RequestError::Publish(error.clone())));
        }
        flight.done.finish(result);
    }

    /// Fails every message in flight: their connection is gone, or the link closes. A
    /// confirm already there still counts.
    fn fail_in_flight(&mut self) {
        while let Some(Some((confirmed, flight))) =
            futures::FutureExt::now_or_never(self.pending.next())
        {
            match confirmed {
                Ok(_) => self.finish(confirmed, flight),
                // The confirm says the connection went: that is what the caller learns.
                Err(_) => {
                    self.counters.count_lost();
                    flight.done.finish(Err(PublishError::ConnectionLost));
                }
            }
        }
        for flight in self.pending.take_all() {
            self.counters.count_lost();
            if let Some(waiter) = flight
                .correlation
                .as_ref()
                .and_then(|c| self.waiting.remove(c))
            {
                let _ = waiter.send(Err(RequestError::ConnectionLost));
            }
            flight.done.finish(Err(PublishError::ConnectionLost));
        }
        for (_, waiter) in self.waiting.drain() {
            let _ = waiter.send(Err(RequestError::ConnectionLost));
        }
    }

    /// Fails every message in flight on a channel the broker closed: their confirms will not
    /// come. Requests lose the reply consumer with it.
    fn fail_channel(&mut self, error: &Arc<BrokerError>) {
        for flight in self.pending.take_all() {
            self.counters.count_lost();
            flight
                .done
                .finish(Err(PublishError::Channel(Arc::clone(error))));
        }
        for (_, waiter) in self.waiting.drain() {
            let error = PublishError::Channel(Arc::clone(error));
            let _ = waiter.send(Err(RequestError::Publish(error)));
        }
        self.replies = None;
    }
}

async fn next_reply(
    replies: &mut Option<Deliveries>,
) -> Option<Result<broker::Incoming, BrokerError>> {
    match replies {
        Some(deliveries) => deliveries.next().await,
        None => std::future::pending().await,
    }
}

fn fail(request: Request, publish: &PublishError, ask: RequestError) {
    match request {
        Request::Publish(outgoing) => outgoing.done.finish(Err(publish.clone())),
        Request::Ask(question) => {
            let _ = question.reply.send(Err(ask));
        }
        Request::Run(_) => {}
    }
}

async fn close(connection: &Connection) {
    let on = connection.clone();
    let _ = connection
        .run_within(DRAIN, "connection.close", async move {
            on.close("conejo publisher closing").await
        })
        .await;
}
