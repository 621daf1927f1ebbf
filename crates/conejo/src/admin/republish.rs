//! Moving dead letters back: publish, await the confirm, then acknowledge.

use super::session::{Session, ready_count, step};
use super::{AdminError, ReplayReport, Unroutable, headers};
use crate::broker::{Confirm, Confirmed};

/// How many republished copies [`replay`](super::replay) has awaiting their confirms at once.
const REPLAY_WINDOW: u64 = 64;

/// A copy published by [`replay`](super::replay), awaiting its confirm.
struct InFlight {
    /// The dead letter's delivery tag, acknowledged once the copy is confirmed.
    tag: u64,
    /// Where the copy went.
    queue: String,
    /// The message's `message_id`, for the report.
    message_id: Option<String>,
    /// The broker's answer to come.
    confirm: Confirm,
}

/// The body of [`replay`](super::replay), on `session`'s connection.
pub(super) async fn move_letters(
    session: &Session,
    dlq: &str,
    to: Option<&str>,
    max: Option<u64>,
) -> Result<ReplayReport, AdminError> {
    if let Some(to) = to {
        // A throwaway channel: a missing queue closes it.
        ready_count(&session.channel(to).await?, to).await?;
    }
    let channel = session.channel(dlq).await?;
    let present = u64::from(ready_count(&channel, dlq).await?);
    step(dlq, "confirm.select", channel.confirm_select()).await?;

    let mut report = ReplayReport {
        dlq: dlq.to_owned(),
        ..ReplayReport::default()
    };
    // Messages left in place stay unacknowledged until the end (requeued now, they would
    // come straight back); this is the highest of their tags.
    let mut keep_up_to: Option<u64> = None;
    let mut taken = 0;
    let mut exhausted = false;
    while !exhausted && taken < present {
        let room = max.map_or(u64::MAX, |max| max.saturating_sub(report.replayed));
        if room == 0 {
            break;
        }
        let mut window = Vec::new();
        while (window.len() as u64) < room.min(REPLAY_WINDOW) && taken < present {
            let Some(got) = step(dlq, "basic.get", channel.get(dlq)).await? else {
                exhausted = true;
                break;
            };
            taken += 1;
            let delivery = got.message;
            let properties = &delivery.properties;
            let original = headers::split(properties.headers().as_ref())
                .0
                .original_queue;
            let target = to
                .map(str::to_owned)
                .or(original)
                .filter(|queue| queue != dlq);
            // A routing key is at most 255 bytes: a longer "queue" cannot be one.
            let Some(queue) = target.filter(|queue| queue.len() <= 255) else {
                report.skipped += 1;
                keep_up_to = keep_up_to.max(Some(delivery.delivery_tag));
                continue;
            };
            let copy = properties
                .clone()
                .with_headers(headers::replay_headers(properties.headers().as_ref()));
            let publish = channel.publish("", &queue, true, &delivery.data, copy);
            window.push(InFlight {
                tag: delivery.delivery_tag,
                message_id: properties.message_id().as_ref().map(ToString::to_string),
                confirm: step(&queue, "basic.publish", publish).await?,
                queue,
            });
        }
        for copy in window {
            let why = match step(&copy.queue, "publisher confirm", copy.confirm).await? {
                Confirmed::Ack => {
                    step(dlq, "basic.ack", channel.ack(copy.tag, false)).await?;
                    report.replayed += 1;
                    *report.destinations.entry(copy.queue).or_default() += 1;
                    continue;
                }
                Confirmed::Returned { code, text } => format!("{text} ({code})"),
                Confirmed::Nack => "refused by the broker (nack)".to_owned(),
                Confirmed::NotRequested => "not confirmed by the broker".to_owned(),
            };
            keep_up_to = keep_up_to.max(Some(copy.tag));
            report.unroutable.push(Unroutable {
                message_id: copy.message_id,
                queue: copy.queue,
                reason: why,
            });
        }
    }
    report.max_reached = max.is_some_and(|max| report.replayed >= max);
    if let Some(tag) = keep_up_to {
        // Every other delivery is acknowledged by now: this requeues exactly those kept.
        step(dlq, "basic.nack", channel.nack(tag, true, true)).await?;
    }
    // close-ok comes after the broker has processed every ack and nack.
    step(
        dlq,
        "channel.close",
        channel.close("conejo-admin: replayed"),
    )
    .await?;
    Ok(report)
}
