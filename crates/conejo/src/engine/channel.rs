//! One channel of a queue: opened with its topology and its consumer (prefetch first), the
//! settle task that owns its acknowledgements, and the dispatch its deliveries share.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use super::{
    check::QueueCheck,
    dispatch::Dispatch,
    publish::Copies,
    queue::Queue,
    settle::{ChannelSink, SettleHandle, settle_task},
    topology::{self, SetupError},
};
use lapin::types::{AMQPValue, ShortString};

use crate::{
    Error,
    broker::{self, BrokerError, Connection, ConsumeOptions, Deliveries},
    config::queue::ResolvedQueue,
    config::service::Timing,
    handler::context::Signals,
    headers,
    observe::status::StatusWriter,
};

/// How long closing a channel may take before conejo gives up on it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a queue's consumer needs from the connection generation it runs in.
#[derive(Clone)]
pub(crate) struct Generation {
    /// The connection.
    pub(crate) connection: Connection,
    /// The service's publisher of retry copies and dead letters (its own connection).
    pub(crate) publisher: Arc<Copies>,
    /// Fired when the service starts shutting down.
    pub(crate) shutdown: CancellationToken,
    /// Fired when this connection is lost.
    pub(crate) lost: CancellationToken,
    /// Shutdown deadline and ack linger.
    pub(crate) timing: Timing,
    /// Where the queue reports that it consumes.
    pub(crate) status: Arc<StatusWriter>,
    /// Delays between attempts to reopen a channel.
    pub(crate) reopen: (Duration, Duration),
}

/// Why a queue opens a channel.
pub(crate) enum Opening {
    /// At startup: a dead-letter topology that cannot be declared is an error.
    Startup,
    /// After a reconnection, or the loss of the queue's channel: the queue is consumed even
    /// if its dead-letter topology cannot be declared (its dead letters wait until it can).
    Reopen,
    /// To move off a stuck channel, whose consumer this cancels: this connection declared
    /// the queue and its topology already.
    Rotation(Canceller),
}

/// One open channel of a queue, consuming.
pub(crate) struct Channel {
    /// The channel, and the connection whose runtime its calls are made on.
    pub(crate) handle: ChannelHandle,
    /// Its consumer's deliveries.
    pub(crate) deliveries: Deliveries,
    /// What each delivery's task needs; its settle handle belongs to this channel only.
    pub(crate) dispatch: Arc<Dispatch>,
    /// The signals given to this channel's handlers: `shutdown` (`Context::shutdown_requested`)
    /// fires at shutdown, and when the channel or connection is lost (their results cannot
    /// be sent).
    pub(crate) signals: Arc<Signals>,
    /// This channel's deliveries in a worker's hands.
    pub(crate) tasks: TaskTracker,
    /// When it started consuming, for the reopen back-off.
    pub(crate) opened: Instant,
}

/// A channel without its stream of deliveries, and where its calls are made: what a channel
/// that consumes no more needs (dropping the stream frees its buffer, which grew to a whole
/// prefetch window at times).
#[derive(Clone)]
pub(crate) struct ChannelHandle {
    /// The channel.
    channel: broker::Channel,
    /// Its connection.
    connection: Connection,
}

/// Cancels one consumer, from any task.
pub(crate) struct Canceller {
    /// The consumer's channel.
    handle: ChannelHandle,
    /// The consumer's tag.
    tag: String,
}

impl ChannelHandle {
    /// Closes the channel (channel.close / close-ok, at most [`CLOSE_TIMEOUT`]): what it
    /// holds unacknowledged goes back to the queue.
    pub(crate) async fn close(self) -> Result<(), BrokerError> {
        let ChannelHandle {
            channel,
            connection,
        } = self;
        connection
            .run_within(CLOSE_TIMEOUT, "channel.close", async move {
                channel.close("conejo: shutdown").await
            })
            .await
    }
}

impl Canceller {
    /// Asks the broker to stop delivering (basic.cancel, waiting at most `limit` for
    /// cancel-ok). Afterwards the stream yields what was already delivered, then ends.
    pub(crate) async fn cancel(self, limit: Duration) -> Result<(), BrokerError> {
        let Canceller {
            handle:
                ChannelHandle {
                    channel,
                    connection,
                },
            tag,
        } = self;
        connection
            .run_within(
                limit,
                "basic.cancel",
                async move { channel.cancel(&tag).await },
            )
            .await
    }
}

impl Channel {
    /// Opens a channel, sets up the queue's topology (unless `opening` is a rotation) and its
    /// consumer (prefetch first), and starts the channel's settle task.
    pub(crate) async fn open(
        queue: &Queue,
        generation: &Generation,
        opening: Opening,
    ) -> Result<Channel, Error> {
        let settings = &queue.settings;
        let connection = &generation.connection;
        let rotation = matches!(opening, Opening::Rotation(_));
        if !rotation && let Err(error) = topology::declare_dead_letter(connection, settings).await {
            if matches!(opening, Opening::Startup) || !connection.is_connected() {
                return Err(error);
            }
            warn!(
                queue = %settings.name,
                %error,
                "cannot declare the dead-letter topology; consuming anyway (a message to \
                 dead-letter is given back until it can be)"
            );
        }
        // Short: lapin hashes the consumer tag for each of a delivery's three frames. The
        // connection's name already says which process this is.
        let tag = format!("conejo-{}", queue.index);
        // A stream's subscription starts where its cursor says.
        let stream = match &queue.cursor {
            Some(cursor) => Some((Arc::clone(cursor), cursor.subscribe().await?)),
            None => None,
        };
        let options = consume_options(settings, stream.as_ref().map(|(_, s)| &s.argument));
        let (channel, deliveries) = match opening {
            Opening::Rotation(old) => consume_instead(queue, connection, tag, options, old).await?,
            _ => consume(queue, connection, tag, options).await?,
        };
        let (settle, task) = settle_task(
            ChannelSink {
                channel: channel.clone(),
                stream: settings.stream.is_some(),
            },
            settings.prefetch,
            generation.timing.ack_linger,
            Arc::clone(&settings.name),
            Arc::clone(&queue.counters),
        );
        connection.spawn(task.run());
        if rotation {
            debug!(queue = %settings.name, "consuming on a fresh channel");
        } else {
            info!(
                queue = %settings.name,
                concurrency = settings.concurrency,
                prefetch = settings.prefetch,
                "consuming"
            );
        }
        Ok(Channel {
            handle: ChannelHandle {
                channel,
                connection: connection.clone(),
            },
            deliveries,
            dispatch: Arc::new(Dispatch {
                settings: Arc::clone(settings),
                settle,
                publisher: Arc::clone(&generation.publisher),
                counters: Arc::clone(&queue.counters),
                cursor: stream.map(|(cursor, subscription)| (cursor, subscription.epoch)),
            }),
            signals: Arc::new(Signals {
                shutdown: generation.shutdown.child_token(),
                service: generation.shutdown.clone(),
                publisher: Some(generation.publisher.publisher().clone()),
            }),
            tasks: TaskTracker::new(),
            opened: Instant::now(),
        })
    }

    /// What cancels this channel's consumer, from another task.
    pub(crate) fn canceller(&self) -> Canceller {
        Canceller {
            handle: self.handle.clone(),
            tag: self.deliveries.tag(),
        }
    }

    /// As [`Canceller::cancel`].
    pub(crate) async fn cancel(&self, limit: Duration) -> Result<(), BrokerError> {
        self.canceller().cancel(limit).await
    }

    /// The settle handle of this channel's deliveries.
    pub(crate) fn settle(&self) -> &SettleHandle {
        &self.dispatch.settle
    }
}

/// Opens a channel, applies the prefetch, declares the queue (or checks it exists) and its
/// bindings, and starts consuming — in this order, so the prefetch is in force before the
/// first delivery.
async fn consume(
    queue: &Queue,
    connection: &Connection,
    tag: String,
    options: ConsumeOptions,
) -> Result<(broker::Channel, Deliveries), Error> {
    let settings = Arc::clone(&queue.settings);
    let on = connection.clone();
    let set_up = connection
        .spawn(async move {
            let channel = on.open_channel().await.map_err(|e| ("open channel", e))?;
            channel
                .qos(settings.prefetch)
                .await
                .map_err(|e| ("qos", e))?;
            topology::declare_queue(&channel, &settings).await?;
            let deliveries = channel
                .consume(&settings.name, &tag, options)
                .await
                .map_err(|e| ("consume", e))?;
            Ok::<_, SetupError>((channel, deliveries))
        })
        .await;
    match set_up {
        Ok(Ok(consuming)) => Ok(consuming),
        Ok(Err(failed)) => Err(topology::setup_error(&queue.settings, failed)),
        Err(join) => Err(Error::internal(format!("queue setup task: {join}"))),
    }
}

/// Opens a channel with the prefetch, then starts consuming the queue (declared on this
/// connection already) there while cancelling the `old` consumer: both requests go out
/// together, so the broker neither pauses the queue nor feeds both consumers for a round
/// trip. On failure the old consumer may be cancelled or not; the fresh one is closed.
async fn consume_instead(
    queue: &Queue,
    connection: &Connection,
    tag: String,
    options: ConsumeOptions,
    old: Canceller,
) -> Result<(broker::Channel, Deliveries), Error> {
    let settings = Arc::clone(&queue.settings);
    let on = connection.clone();
    let set_up = connection
        .spawn(async move {
            let channel = on.open_channel().await.map_err(|e| ("open channel", e))?;
            channel
                .qos(settings.prefetch)
                .await
                .map_err(|e| ("qos", e))?;
            let (consumed, cancelled) = futures::join!(
                channel.consume(&settings.name, &tag, options),
                old.handle.channel.cancel(&old.tag),
            );
            let failed = match (consumed, cancelled) {
                (Ok(deliveries), Ok(())) => return Ok((channel, deliveries)),
                (Err(error), _) => ("consume", error),
                (Ok(_), Err(error)) => ("cancel the old consumer", error),
            };
            // Closing the fresh channel gives back what it may have received.
            let _ = channel.close("conejo: not needed").await;
            Err(failed)
        })
        .await;
    match set_up {
        Ok(Ok(consuming)) => Ok(consuming),
        Ok(Err(failed)) => Err(topology::setup_error(&queue.settings, failed)),
        Err(join) => Err(Error::internal(format!("queue setup task: {join}"))),
    }
}

/// Declares what [`Channel::open`] declares at startup — the dead-letter topology, the queue
/// and its bindings — with the same code, and consumes nothing.
pub(crate) async fn check(queue: &Queue, connection: &Connection) -> Result<QueueCheck, Error> {
    let settings = &queue.settings;
    topology::declare_dead_letter(connection, settings).await?;
    let declared = {
        let settings = Arc::clone(settings);
        let on = connection.clone();
        connection
            .spawn(async move {
                let channel = on.open_channel().await.map_err(|e| ("open channel", e))?;
                let declared = topology::declare_queue(&channel, &settings).await;
                let _ = channel.close("checked").await;
                declared
            })
            .await
    };
    let state = match declared {
        Ok(Ok(state)) => state,
        Ok(Err(failed)) => return Err(topology::setup_error(settings, failed)),
        Err(join) => return Err(Error::internal(format!("queue check task: {join}"))),
    };
    Ok(QueueCheck {
        name: settings.name.to_string(),
        messages: state.messages,
        consumers: state.consumers,
        dead_letter_exchange: settings.dead_letter.exchange.clone(),
        concurrency: settings.concurrency,
        prefetch: settings.prefetch,
    })
}

/// How the queue's consumer registers: with its arguments (`x-priority`) and, for a stream,
/// where its subscription starts (`x-stream-offset`).
fn consume_options(settings: &ResolvedQueue, stream_offset: Option<&AMQPValue>) -> ConsumeOptions {
    let mut arguments = settings.consumer_arguments.clone();
    if let Some(offset) = stream_offset {
        arguments.insert(ShortString::from(headers::STREAM_OFFSET), offset.clone());
    }
    ConsumeOptions {
        arguments,
        ..ConsumeOptions::default()
    }
}
