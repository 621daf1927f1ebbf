//! What conejo declares on the broker, through the boundary: the service's exchanges, each
//! queue (or its passive check) and bindings, its dead-letter exchange and queue, and the
//! wait queues of retries. The names and arguments are `config::topology`'s.
//!
//! Declarations that the broker may refuse run on a channel of their own: a refusal closes
//! the channel it was made on, never a consumer's.

use lapin::{ExchangeKind, types::FieldTable};

use crate::{
    Error, Exchange,
    broker::{self, BrokerError, Channel, Connection, ExchangeOptions, QueueState},
    config::{
        partitions::{CONSISTENT_HASH, CONSISTENT_HASH_PLUGIN},
        queue::ResolvedQueue,
        topology::{Durability, dead_letter_queue_name, wait_queue_arguments, wait_queue_name},
    },
};

/// Declares (or checks, when passive) the service's exchanges, in order.
pub(crate) async fn declare_exchanges(
    connection: &Connection,
    exchanges: &[Exchange],
) -> Result<(), Error> {
    if exchanges.is_empty() {
        return Ok(());
    }
    let on = connection.clone();
    let exchanges = exchanges.to_vec();
    let declared = connection
        .spawn(async move {
            let channel = on.open_channel().await.map_err(|source| Error::Topology {
                what: "exchanges (open channel)".to_owned(),
                source,
            })?;
            for exchange in &exchanges {
                channel
                    .declare_exchange(
                        exchange.name(),
                        exchange.kind.clone(),
                        exchange.options(),
                        exchange.arguments.clone(),
                    )
                    .await
                    .map_err(|source| exchange_error(exchange, source))?;
            }
            let _ = channel.close("declared").await;
            Ok(())
        })
        .await;
    declared.unwrap_or_else(|join| Err(Error::internal(format!("exchange setup task: {join}"))))
}

/// What a refused exchange declaration means: an unknown type (RabbitMQ's 503
/// COMMAND_INVALID, a plugin not enabled), or another refusal.
fn exchange_error(exchange: &Exchange, source: BrokerError) -> Error {
    if let ExchangeKind::Custom(kind) = &exchange.kind
        && broker::reply_code(&source) == Some(503)
        && source.to_string().contains("unknown exchange type")
    {
        return Error::UnknownExchangeType {
            exchange: exchange.name.clone(),
            kind: kind.clone(),
            plugin: (kind == CONSISTENT_HASH).then_some(CONSISTENT_HASH_PLUGIN),
        };
    }
    Error::Topology {
        what: format!("exchange '{}'", exchange.name),
        source,
    }
}

/// Declares the queue's dead-letter topology — conejo's `<queue>.dlx` → `<queue>.dlq`, or a
/// check that the user's exchange exists — on a channel of its own.
pub(crate) async fn declare_dead_letter(
    connection: &Connection,
    settings: &ResolvedQueue,
) -> Result<(), Error> {
    let on = connection.clone();
    let route = settings.dead_letter.clone();
    let durability = settings.durability;
    let queue = settings.name.to_string();
    let declared = connection
        .run(async move {
            let channel = on.open_channel().await?;
            let declared = if route.owned {
                declare_owned_dead_letter(&channel, &queue, &route.exchange, durability).await
            } else {
                channel
                    .declare_exchange(
                        &route.exchange,
                        ExchangeKind::Direct, // ignored for a passive declaration
                        ExchangeOptions {
                            passive: true,
                            ..ExchangeOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
            };
            if channel.is_open() {
                let _ = channel.close("declared").await;
            }
            declared
        })
        .await;
    let route = &settings.dead_letter;
    let queue = &settings.name;
    declared.map_err(|source| {
        if !route.owned && broker::is_not_found(&source) {
            Error::DeadLetterExchangeNotFound {
                queue: queue.to_string(),
                exchange: route.exchange.clone(),
            }
        } else if route.owned {
            Error::Topology {
                what: format!(
                    "dead-letter exchange '{}' and queue '{}'",
                    route.exchange,
                    dead_letter_queue_name(queue)
                ),
                source,
            }
        } else {
            Error::Topology {
                what: format!("dead-letter exchange '{}'", route.exchange),
                source,
            }
        }
    })
}

/// `<queue>.dlx` (fanout) → `<queue>.dlq`.
async fn declare_owned_dead_letter(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    durability: Durability,
) -> Result<(), BrokerError> {
    let dlq = dead_letter_queue_name(queue);
    channel
        .declare_exchange(
            exchange,
            ExchangeKind::Fanout,
            ExchangeOptions {
                durable: durability.durable,
                ..ExchangeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .declare_queue(&dlq, durability.queue_options(), durability.arguments())
        .await?;
    channel
        .bind_queue(&dlq, exchange, "", FieldTable::default())
        .await
}

/// The step of a queue's set-up that failed, and what the broker said.
pub(crate) type SetupError = (&'static str, BrokerError);

/// Declares the queue (or checks it exists) and its bindings, on `channel`.
pub(crate) async fn declare_queue(
    channel: &Channel,
    settings: &ResolvedQueue,
) -> Result<QueueState, SetupError> {
    let declared = channel
        .declare_queue(&settings.name, settings.options, settings.arguments.clone())
        .await
        .map_err(|e| ("declare", e))?;
    for binding in &settings.bindings {
        channel
            .bind_queue(
                &settings.name,
                &binding.exchange,
                &binding.routing_key,
                binding.arguments.clone(),
            )
            .await
            .map_err(|e| ("bind", e))?;
    }
    Ok(declared)
}

/// The error for a failed step of `settings`' set-up.
pub(crate) fn setup_error(settings: &ResolvedQueue, (step, source): SetupError) -> Error {
    let queue = settings.name.to_string();
    match step {
        "declare" if broker::is_not_found(&source) => Error::QueueNotFound { queue },
        "bind" => Error::Topology {
            what: format!(
                "a binding of queue '{queue}' ({})",
                settings
                    .bindings
                    .iter()
                    .map(|b| format!("exchange '{}', key '{}'", b.exchange, b.routing_key))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            source,
        },
        step => Error::QueueSetup {
            queue,
            step,
            source,
        },
    }
}

/// Declares the wait queue that holds `queue`'s retries for `ttl_ms`, then dead-letters
/// them back to `queue` through the default exchange.
pub(crate) async fn declare_wait_queue(
    channel: &Channel,
    queue: &str,
    ttl_ms: u32,
    durability: Durability,
) -> Result<(), BrokerError> {
    channel
        .declare_queue(
            &wait_queue_name(queue, ttl_ms),
            durability.queue_options(),
            wait_queue_arguments(queue, ttl_ms, durability),
        )
        .await
        .map(drop)
}
