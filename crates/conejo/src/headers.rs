//! The headers conejo reads and writes on messages it republishes: attempt counting, where a
//! message came from, why it was dead-lettered. Pure functions over AMQP properties.
//!
//! | header | type | on | meaning |
//! |---|---|---|---|
//! | `conejo-attempt` | integer | retry copies, dead letters | the attempt the copy is for (retry) or the attempts made (dead letter); absent = 1 |
//! | `conejo-redeliveries` | integer | copies of redelivered messages (classic queues), dead letters | deliveries that never reached a result (crash loop detection) |
//! | `conejo-original-exchange` | string | retry copies, dead letters | the exchange the message was first published to |
//! | `conejo-original-routing-key` | string | retry copies, dead letters | its routing key then |
//! | `conejo-original-queue` | string | retry copies, dead letters | the queue conejo consumed it from |
//! | `conejo-first-failure-at` | RFC 3339 string | retry copies, dead letters | when its first attempt failed |
//! | `conejo-last-failure-at` | RFC 3339 string | dead letters | when it was dead-lettered |
//! | `conejo-reason` | string | dead letters | `rejected`, `attempts-exhausted` or `poison` |
//! | `conejo-failure` | string | dead letters | kind of the last failure: `handler`, `decode`, `timeout`, `panic` |
//! | `conejo-error` | string | dead letters | the last error's text, at most 1024 bytes |
//! | `conejo-replayed` | integer | messages replayed from a dead-letter queue | how often it was replayed |

use std::time::SystemTime;

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

pub(crate) const ATTEMPT: &str = "conejo-attempt";
pub(crate) const REDELIVERIES: &str = "conejo-redeliveries";
pub(crate) const ORIGINAL_EXCHANGE: &str = "conejo-original-exchange";
pub(crate) const ORIGINAL_ROUTING_KEY: &str = "conejo-original-routing-key";
pub(crate) const ORIGINAL_QUEUE: &str = "conejo-original-queue";
pub(crate) const FIRST_FAILURE_AT: &str = "conejo-first-failure-at";
pub(crate) const LAST_FAILURE_AT: &str = "conejo-last-failure-at";
pub(crate) const REASON: &str = "conejo-reason";
pub(crate) const FAILURE: &str = "conejo-failure";
pub(crate) const ERROR: &str = "conejo-error";
#[cfg(feature = "admin")]
pub(crate) const REPLAYED: &str = "conejo-replayed";
/// Set by quorum queues on redeliveries: how often the message was returned.
pub(crate) const DELIVERY_COUNT: &str = "x-delivery-count";
/// Set by stream queues on every delivery: the message's offset in the stream.
pub(crate) const STREAM_OFFSET: &str = "x-stream-offset";

/// The longest error text written into `conejo-error`.
pub(crate) const MAX_ERROR_LEN: usize = 1024;

/// Headers the broker sets on its own, dropped from copies so they describe the copy only.
const BROKER_HEADERS: [&str; 7] = [
    DELIVERY_COUNT,
    STREAM_OFFSET,
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-reason",
];

/// An integer header, whatever integer type the publisher used.
pub(crate) fn int(headers: Option<&FieldTable>, name: &str) -> Option<i64> {
    int_value(headers?.inner().get(name)?)
}

/// A stream delivery's offset (`x-stream-offset`); `None` on other queues.
pub(crate) fn stream_offset(headers: Option<&FieldTable>) -> Option<u64> {
    int(headers, STREAM_OFFSET).and_then(|offset| u64::try_from(offset).ok())
}

/// An integer value of any AMQP integer type.
pub(crate) fn int_value(value: &AMQPValue) -> Option<i64> {
    Some(match *value {
        AMQPValue::LongLongInt(v) => v,
        AMQPValue::LongInt(v) => i64::from(v),
        AMQPValue::LongUInt(v) => i64::from(v),
        AMQPValue::ShortInt(v) => i64::from(v),
        AMQPValue::ShortUInt(v) => i64::from(v),
        AMQPValue::ShortShortInt(v) => i64::from(v),
        AMQPValue::ShortShortUInt(v) => i64::from(v),
        _ => return None,
    })
}

/// A string header (long or short string).
pub(crate) fn text<'a>(headers: Option<&'a FieldTable>, name: &str) -> Option<&'a str> {
    match headers?.inner().get(name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// The attempt a delivery is for: `conejo-attempt`, 1 when absent or nonsensical.
pub(crate) fn attempt(headers: Option<&FieldTable>) -> u32 {
    int(headers, ATTEMPT)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// An RFC 3339 timestamp (UTC, milliseconds).
pub(crate) fn timestamp(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// Truncates `text` to at most `max` bytes, on a character boundary.
pub(crate) fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Builds the properties of a copy: the original's, without the broker's own headers, with
/// `set` applied.
pub(crate) fn copy_properties(
    original: &BasicProperties,
    set: impl FnOnce(&mut FieldTable),
) -> BasicProperties {
    let kept: std::collections::BTreeMap<ShortString, AMQPValue> = original
        .headers()
        .as_ref()
        .map(|found| {
            found
                .inner()
                .iter()
                .filter(|(name, _)| !BROKER_HEADERS.contains(&name.as_str()))
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect()
        })
        .unwrap_or_default();
    let mut headers = FieldTable::from(kept);
    set(&mut headers);
    original.clone().with_headers(headers)
}

/// Sets a string header.
pub(crate) fn set_text(headers: &mut FieldTable, name: &str, value: &str) {
    headers.insert(
        ShortString::from(name),
        AMQPValue::LongString(LongString::from(value)),
    );
}

/// Sets an integer header (written as a signed 32-bit integer, the type every client reads).
pub(crate) fn set_int(headers: &mut FieldTable, name: &str, value: u32) {
    headers.insert(
        ShortString::from(name),
        AMQPValue::LongInt(i32::try_from(value).unwrap_or(i32::MAX)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_default_to_one() {
        assert_eq!(attempt(None), 1);
        let mut h = FieldTable::default();
        assert_eq!(attempt(Some(&h)), 1);
        set_int(&mut h, ATTEMPT, 3);
        assert_eq!(attempt(Some(&h)), 3);
        h.insert(ATTEMPT.into(), AMQPValue::LongLongInt(-4));
        assert_eq!(attempt(Some(&h)), 1);
        h.insert(ATTEMPT.into(), AMQPValue::ShortShortUInt(2));
        assert_eq!(attempt(Some(&h)), 2);
    }

    #[test]
    fn copies_drop_the_brokers_headers_and_keep_the_users() {
        let mut h = FieldTable::default();
        set_text(&mut h, "tenant", "acme");
        h.insert(DELIVERY_COUNT.into(), AMQPValue::LongLongInt(2));
        h.insert("x-death".into(), AMQPValue::Void);
        let original = BasicProperties::default()
            .with_message_id("m1".into())
            .with_delivery_mode(2)
            .with_headers(h);
        let copy = copy_properties(&original, |h| set_int(h, ATTEMPT, 2));
        let headers = copy.headers().as_ref().unwrap();
        assert_eq!(text(Some(headers), "tenant"), Some("acme"));
        assert_eq!(attempt(Some(headers)), 2);
        assert!(!headers.contains_key(DELIVERY_COUNT));
        assert!(!headers.contains_key("x-death"));
        assert_eq!(copy.message_id().as_ref().unwrap().as_str(), "m1");
        assert_eq!(*copy.delivery_mode(), Some(2));
    }

    #[test]
    fn truncation_respects_characters() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
        assert!(timestamp(SystemTime::UNIX_EPOCH).starts_with("1970-01-01T00:00:00.000Z"));
    }
}
