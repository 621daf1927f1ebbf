//! Operator tools for dead-letter queues: count, show and replay the messages conejo
//! dead-lettered (feature `admin`).
//!
//! When a consumed queue `Q` gives up on a message, conejo republishes it — body, properties
//! and headers intact — through the exchange `Q.dlx` into the queue `Q.dlq`, adding
//! `conejo-*` headers that say why ([`ConejoHeaders`]). This module reads those queues:
//!
//! - [`summary`]: how many dead letters, grouped by reason and failure kind, and when they
//!   failed;
//! - [`show`]: the first messages, headers parsed;
//! - [`replay`]: moves messages back to the queue they failed in (or another), with fresh
//!   attempts, once the cause is fixed.
//!
//! [`DeadLetterCommand`] wraps them as a clap subcommand a service binary can embed; the
//! `conejo` binary (crate `conejo-cli`) is that subcommand on its own.
//!
//! ## Guarantees
//! - [`summary`] and [`show`] never remove a message: they read with `basic.get` without
//!   acknowledging, then give everything back (`basic.nack`, requeue), so each message
//!   returns to its place (RabbitMQ keeps the order of requeued messages). The messages are
//!   marked redelivered by the broker, which has no other effect on a dead-letter queue.
//! - [`replay`] acknowledges a dead letter only after the broker confirmed the republished
//!   copy as routed to its queue. Interrupted at any point, a message is never lost: at worst
//!   it is in both queues. A copy that cannot be routed leaves the original in the
//!   dead-letter queue, in its place.
//! - Errors and output never contain the password of the URL.
//!
//! ## Limits
//! - Each call makes its own short-lived connection, on the caller's tokio runtime.
//! - Only *ready* messages are seen: messages held unacknowledged by some consumer of the
//!   dead-letter queue (another operator's `show` in progress, say) are not.
//! - On a quorum queue with a `delivery-limit`, every read counts as a delivery; do not
//!   inspect such a queue in a loop.

mod command;
mod error;
mod headers;
mod republish;
mod session;

use std::collections::BTreeMap;

use lapin::BasicProperties;
use lapin::types::FieldTable;

use crate::AmqpUrl;
use session::{Session, peek};

pub use error::AdminError;

pub use command::{DeadLetterCommand, DeadLetterQueue};
pub use headers::ConejoHeaders;

/// How many messages [`summary`] reads when not told otherwise
/// ([`DeadLetterCommand::List`]'s `--limit`).
pub const DEFAULT_SCAN_LIMIT: u64 = 10_000;

/// The dead-letter queue of the consumed queue `queue`, as conejo names it by default:
/// `orders` → `orders.dlq`.
#[must_use]
pub fn dlq_name(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// What [`summary`] found in a dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetterSummary {
    /// The dead-letter queue.
    pub dlq: String,
    /// Messages ready in the queue when the scan started, as the broker counts them.
    pub ready: u32,
    /// Messages read (at most the scan's limit).
    pub inspected: u64,
    /// True when the scan reached the end of the queue, false when it stopped at its limit:
    /// the counts then cover only the first `inspected` messages.
    pub complete: bool,
    /// Counts by reason and failure kind, largest first.
    pub groups: Vec<ReasonCount>,
    /// The earliest `conejo-last-failure-at` among the messages read.
    pub oldest_failure: Option<String>,
    /// The latest `conejo-last-failure-at` among the messages read.
    pub newest_failure: Option<String>,
}

/// How many dead letters share a reason and a failure kind.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReasonCount {
    /// `conejo-reason` (`None`: the message has none, so it was not dead-lettered by conejo).
    pub reason: Option<String>,
    /// `conejo-failure` (`None` for `poison`, or when absent).
    pub failure: Option<String>,
    /// How many messages.
    pub count: u64,
}

/// One dead-lettered message, as [`show`] returns it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Its place in the queue, from 1 (the next message a consumer would get).
    pub position: u64,
    /// Its AMQP properties as they are in the queue, headers included.
    pub properties: BasicProperties,
    /// Its `conejo-*` headers, parsed.
    pub conejo: ConejoHeaders,
    /// Its other headers (those of the application, and any conejo header of an
    /// unexpected type).
    pub other_headers: FieldTable,
    /// Its body.
    pub body: Vec<u8>,
}

/// What [`replay`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplayReport {
    /// The dead-letter queue.
    pub dlq: String,
    /// Messages moved: republished, confirmed, then removed from the dead-letter queue.
    pub replayed: u64,
    /// How many went to each queue.
    pub destinations: BTreeMap<String, u64>,
    /// Messages left in place because they name no queue to go back to (no
    /// `conejo-original-queue`, no `to`), or name the dead-letter queue itself.
    pub skipped: u64,
    /// Messages left in place because the broker could not route or take their copy.
    pub unroutable: Vec<Unroutable>,
    /// True when the replay stopped because it had moved `max` messages.
    pub max_reached: bool,
}

/// A dead letter [`replay`] could not move; it stays in the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Unroutable {
    /// Its `message_id` property, if any, to find it again.
    pub message_id: Option<String>,
    /// The queue it was to go to.
    pub queue: String,
    /// Why the broker did not take it (e.g. "NO_ROUTE (312)": no such queue).
    pub reason: String,
}

/// Counts the messages of the dead-letter queue `dlq` by reason and failure kind, reading
/// at most `limit` of them, without removing or reordering any.
///
/// # Errors
/// [`AdminError::QueueNotFound`] if `dlq` does not exist; connection and broker errors.
pub async fn summary(
    url: &AmqpUrl,
    dlq: &str,
    limit: u64,
) -> Result<DeadLetterSummary, AdminError> {
    let mut groups: BTreeMap<(Option<String>, Option<String>), u64> = BTreeMap::new();
    let (mut oldest, mut newest): (Option<String>, Option<String>) = (None, None);
    let session = Session::open(url).await?;
    let scan = peek(&session, dlq, limit, |delivery| {
        let (conejo, _) = headers::split(delivery.properties.headers().as_ref());
        if let Some(at) = conejo
            .last_failure_at
            .as_ref()
            .filter(|at| headers::is_timestamp(at))
        {
            if oldest.as_ref().is_none_or(|oldest| at < oldest) {
                oldest = Some(at.clone());
            }
            if newest.as_ref().is_none_or(|newest| at > newest) {
                newest = Some(at.clone());
            }
        }
        *groups.entry((conejo.reason, conejo.failure)).or_default() += 1;
    })
    .await;
    session.close().await;
    let scan = scan?;
    let mut groups: Vec<ReasonCount> = groups
        .into_iter()
        .map(|((reason, failure), count)| ReasonCount {
            reason,
            failure,
            count,
        })
        .collect();
    groups.sort_by_key(|group| std::cmp::Reverse(group.count));
    Ok(DeadLetterSummary {
        dlq: dlq.to_owned(),
        ready: scan.ready,
        inspected: scan.read,
        complete: scan.complete,
        groups,
        oldest_failure: oldest,
        newest_failure: newest,
    })
}

/// The first `n` messages of the dead-letter queue `dlq`, in queue order, without removing
/// or reordering any.
///
/// # Errors
/// [`AdminError::QueueNotFound`] if `dlq` does not exist; connection and broker errors.
pub async fn show(url: &AmqpUrl, dlq: &str, n: usize) -> Result<Vec<DeadLetter>, AdminError> {
    let mut letters = Vec::new();
    let session = Session::open(url).await?;
    let limit = u64::try_from(n).unwrap_or(u64::MAX);
    let scan = peek(&session, dlq, limit, |delivery| {
        let (conejo, other_headers) = headers::split(delivery.properties.headers().as_ref());
        letters.push(DeadLetter {
            position: letters.len() as u64 + 1,
            properties: delivery.properties,
            conejo,
            other_headers,
            body: delivery.data,
        });
    })
    .await;
    session.close().await;
    scan?;
    Ok(letters)
}

/// Moves the messages of the dead-letter queue `dlq` back to the queue each failed in
/// (`conejo-original-queue`), or to `to` when given, at most `max` of them, in order.
///
/// Each copy goes through the default exchange (`mandatory`, publisher confirms) without
/// the failure headers (`conejo-reason`, `-failure`, `-error`, `-attempt`,
/// `-first-failure-at`, `-last-failure-at`, `-redeliveries`), so it gets fresh attempts,
/// and with `conejo-replayed` incremented; body, properties and other headers are kept.
/// The dead letter is acknowledged only once its copy is confirmed. A message with no
/// queue to go to, or whose copy the broker returns (the queue does not exist), stays in
/// the dead-letter queue, in its place, and is reported.
///
/// Only the messages present when the replay starts are considered, so messages that fail
/// again while it runs are not replayed in a loop.
///
/// # Errors
/// [`AdminError::QueueNotFound`] if `dlq` (or `to`) does not exist,
/// [`AdminError::Invalid`] if `to` is `dlq`; connection and broker errors. After an error
/// every dead letter not yet confirmed elsewhere is still in `dlq`.
pub async fn replay(
    url: &AmqpUrl,
    dlq: &str,
    to: Option<&str>,
    max: Option<u64>,
) -> Result<ReplayReport, AdminError> {
    if to == Some(dlq) {
        return Err(AdminError::Invalid {
            reason: format!("cannot replay '{dlq}' into itself"),
        });
    }
    let session = Session::open(url).await?;
    let report = republish::move_letters(&session, dlq, to, max).await;
    session.close().await;
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn operations_can_be_spawned() {
        let url: AmqpUrl = "amqp://guest:guest@127.0.0.1:5672/%2f".parse().unwrap();
        assert_send(&summary(&url, "q.dlq", 1));
        assert_send(&show(&url, "q.dlq", 1));
        assert_send(&replay(&url, "q.dlq", None, None));
        assert_send(
            &DeadLetterCommand::List {
                queue: DeadLetterQueue::named("q"),
                limit: 1,
            }
            .run(&url),
        );
    }

    #[test]
    fn default_dlq_name() {
        assert_eq!(dlq_name("orders"), "orders.dlq");
    }
}
