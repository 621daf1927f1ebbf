//! Moving dead letters back: publish, await the confirm, then acknowledge.

use lapin::Confirmation;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use lapin::types::ShortString;

use super::session::{Session, ready_count, step};
use super::{AdminError, ReplayReport, Unroutable, headers};

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
    confirm: lapin::PublisherConfirm,
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
    step(
        dlq,
        "confirm.select",
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;

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
            let get = channel.basic_get(dlq.into(), BasicGetOptions { no_ack: false });
            let Some(message) = step(dlq, "basic.get", get).await? else {
                exhausted = true;
                break;
            };
            taken += 1;
            let delivery = message.delivery;
            let properties = &delivery.properties;
            let original = headers::split(properties.headers().as_ref())
                .0
                .original_queue;
            let target = to
                .map(str::to_owned)
                .or(original)
                .filter(|queue| queue != dlq);
            let Some((queue, routing_key)) =
                target.and_then(|queue| Some((queue.clone(), ShortString::try_new(queue).ok()?)))
            else {
                report.skipped += 1;
                keep_up_to = keep_up_to.max(Some(delivery.delivery_tag));
                continue;
            };
            let copy = properties
                .clone()
                .with_headers(headers::replay_headers(properties.headers().as_ref()));
            let options = BasicPublishOptions {
                mandatory: true,
                immediate: false,
            };
            let publish = channel.basic_publish(
                ShortString::from(""),
                routing_key,
                options,
                &delivery.data,
                copy,
            );
            window.push(InFlight {
                tag: delivery.delivery_tag,
                message_id: properties.message_id().as_ref().map(ToString::to_string),
                confirm: step(&queue, "basic.publish", publish).await?,
                queue,
            });
        }
        for copy in window {
            let why = match step(&copy.queue, "publisher confirm", copy.confirm).await? {
                Confirmation::Ack(None) => {
                    let ack = channel.basic_ack(copy.tag, BasicAckOptions { multiple: false });
                    step(dlq, "basic.ack", ack).await?;
                    report.replayed += 1;
                    *report.destinations.entry(copy.queue).or_default() += 1;
                    continue;
                }
                Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                    format!("{} ({})", returned.reply_text, returned.reply_code)
                }
                Confirmation::Nack(None) => "refused by the broker (nack)".to_owned(),
                Confirmation::NotRequested => "not confirmed by the broker".to_owned(),
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
        let options = BasicNackOptions {
            multiple: true,
            requeue: true,
        };
        step(dlq, "basic.nack", channel.basic_nack(tag, options)).await?;
    }
    // close-ok comes after the broker has processed every ack and nack.
    step(
        dlq,
        "channel.close",
        channel.close(200, ShortString::from("conejo-admin: replayed")),
    )
    .await?;
    Ok(report)
}
