//! The `conejo-*` headers of a dead-lettered message: what they say, and how a replay
//! rewrites them.

use std::collections::BTreeMap;

use lapin::types::{AMQPValue, FieldTable, ShortString};

use crate::headers::{
    ATTEMPT, ERROR, FAILURE, FIRST_FAILURE_AT, LAST_FAILURE_AT, ORIGINAL_EXCHANGE, ORIGINAL_QUEUE,
    ORIGINAL_ROUTING_KEY, REASON, REDELIVERIES, REPLAYED, int_value,
};

/// The headers a replay removes, so that the message starts over with fresh attempts.
/// `conejo-original-*` stay: they still say where the message came from.
const CLEARED_BY_REPLAY: [&str; 7] = [
    REASON,
    FAILURE,
    ERROR,
    ATTEMPT,
    FIRST_FAILURE_AT,
    LAST_FAILURE_AT,
    REDELIVERIES,
];

/// The `conejo-*` headers of a dead-lettered message, parsed.
///
/// Each field is `None` when the header is absent or has a type the contract does not allow
/// (such a header is then reported among the message's other headers, not hidden). Integers
/// are read from any AMQP integer type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConejoHeaders {
    /// `conejo-reason`: why the message was dead-lettered — `rejected` (the handler or the
    /// policy gave up on it), `attempts-exhausted` (every retry failed) or `poison`.
    pub reason: Option<String>,
    /// `conejo-failure`: the kind of the last failure — `handler`, `decode`, `timeout` or
    /// `panic`. Absent for `poison`.
    pub failure: Option<String>,
    /// `conejo-error`: the text of the last error (at most 1024 bytes).
    pub error: Option<String>,
    /// `conejo-attempt`: how many attempts were made.
    pub attempt: Option<i64>,
    /// `conejo-original-exchange`: the exchange the message was first published to.
    pub original_exchange: Option<String>,
    /// `conejo-original-routing-key`: the routing key it was first published with.
    pub original_routing_key: Option<String>,
    /// `conejo-original-queue`: the queue it was consumed from, where a replay sends it.
    pub original_queue: Option<String>,
    /// `conejo-first-failure-at`: when the first attempt failed (RFC 3339, UTC, ms).
    pub first_failure_at: Option<String>,
    /// `conejo-last-failure-at`: when the last attempt failed (RFC 3339, UTC, ms).
    pub last_failure_at: Option<String>,
    /// `conejo-redeliveries`: deliveries that never reached a result.
    pub redeliveries: Option<i64>,
    /// `conejo-replayed`: how many times the message was already replayed.
    pub replayed: Option<i64>,
}

impl ConejoHeaders {
    /// Reads the `conejo-*` headers out of a message's headers table.
    ///
    /// ```
    /// use conejo::admin::ConejoHeaders;
    /// use conejo::types::{AMQPValue, FieldTable};
    ///
    /// let mut table = FieldTable::default();
    /// table.insert("conejo-reason".into(), AMQPValue::LongString("poison".into()));
    /// table.insert("conejo-attempt".into(), AMQPValue::LongInt(3));
    /// let headers = ConejoHeaders::parse(&table);
    /// assert_eq!(headers.reason.as_deref(), Some("poison"));
    /// assert_eq!(headers.attempt, Some(3));
    /// assert_eq!(headers.failure, None);
    /// ```
    #[must_use]
    pub fn parse(headers: &FieldTable) -> Self {
        split(Some(headers)).0
    }

    /// Stores `value` under `key` if `key` is a conejo header of the right type; else says
    /// the value belongs with the other headers.
    fn take(&mut self, key: &str, value: &AMQPValue) -> bool {
        let text = |slot: &mut Option<String>| match amqp_string(value) {
            Some(text) => {
                *slot = Some(text);
                true
            }
            None => false,
        };
        let int = |slot: &mut Option<i64>| match int_value(value) {
            Some(n) => {
                *slot = Some(n);
                true
            }
            None => false,
        };
        match key {
            REASON => text(&mut self.reason),
            FAILURE => text(&mut self.failure),
            ERROR => text(&mut self.error),
            ATTEMPT => int(&mut self.attempt),
            ORIGINAL_EXCHANGE => text(&mut self.original_exchange),
            ORIGINAL_ROUTING_KEY => text(&mut self.original_routing_key),
            ORIGINAL_QUEUE => text(&mut self.original_queue),
            FIRST_FAILURE_AT => text(&mut self.first_failure_at),
            LAST_FAILURE_AT => text(&mut self.last_failure_at),
            REDELIVERIES => int(&mut self.redeliveries),
            REPLAYED => int(&mut self.replayed),
            _ => false,
        }
    }
}

/// Splits a headers table into the conejo headers and all the others (including conejo
/// headers of an unexpected type).
pub(crate) fn split(headers: Option<&FieldTable>) -> (ConejoHeaders, FieldTable) {
    let mut conejo = ConejoHeaders::default();
    let mut other = BTreeMap::new();
    for (key, value) in headers.into_iter().flat_map(FieldTable::inner) {
        if !conejo.take(key.as_str(), value) {
            other.insert(key.clone(), value.clone());
        }
    }
    (conejo, other.into())
}

/// The headers of the replayed copy: the failure bookkeeping removed, everything else kept,
/// `conejo-replayed` incremented.
pub(crate) fn replay_headers(headers: Option<&FieldTable>) -> FieldTable {
    let mut kept: BTreeMap<ShortString, AMQPValue> = headers
        .into_iter()
        .flat_map(FieldTable::inner)
        .filter(|(key, _)| !CLEARED_BY_REPLAY.contains(&key.as_str()))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    let before = kept.get(REPLAYED).and_then(int_value).unwrap_or(0);
    let after = i32::try_from(before.saturating_add(1).max(1)).unwrap_or(i32::MAX);
    kept.insert(ShortString::from(REPLAYED), AMQPValue::LongInt(after));
    kept.into()
}

/// True for the contract's timestamp format, `2026-11-26T16:40:01.123Z`: the only one whose
/// text order is its time order.
pub(crate) fn is_timestamp(text: &str) -> bool {
    const SHAPE: &[u8; 24] = b"dddd-dd-ddTdd:dd:dd.dddZ";
    text.len() == SHAPE.len()
        && text.bytes().zip(SHAPE).all(|(byte, &shape)| match shape {
            b'd' => byte.is_ascii_digit(),
            other => byte == other,
        })
}

fn amqp_string(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::LongString;

    fn long(text: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(text))
    }

    fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in entries {
            table.insert(key.into(), value);
        }
        table
    }

    fn dead_letter_table() -> FieldTable {
        table(vec![
            ("conejo-reason", long("attempts-exhausted")),
            ("conejo-failure", long("timeout")),
            ("conejo-error", long("deadline of 5s passed")),
            ("conejo-attempt", AMQPValue::LongInt(5)),
            ("conejo-original-exchange", long("shop")),
            ("conejo-original-routing-key", long("order.created")),
            ("conejo-original-queue", long("orders")),
            ("conejo-first-failure-at", long("2026-11-26T16:40:01.123Z")),
            ("conejo-last-failure-at", long("2026-11-26T16:41:07.004Z")),
            ("conejo-redeliveries", AMQPValue::ShortShortUInt(2)),
            ("tenant", long("acme")),
        ])
    }

    #[test]
    fn parses_every_conejo_header_and_keeps_the_others_apart() {
        let (conejo, other) = split(Some(&dead_letter_table()));
        assert_eq!(
            conejo,
            ConejoHeaders {
                reason: Some("attempts-exhausted".into()),
                failure: Some("timeout".into()),
                error: Some("deadline of 5s passed".into()),
                attempt: Some(5),
                original_exchange: Some("shop".into()),
                original_routing_key: Some("order.created".into()),
                original_queue: Some("orders".into()),
                first_failure_at: Some("2026-11-26T16:40:01.123Z".into()),
                last_failure_at: Some("2026-11-26T16:41:07.004Z".into()),
                redeliveries: Some(2),
                replayed: None,
            }
        );
        assert_eq!(other, table(vec![("tenant", long("acme"))]));
    }

    #[test]
    fn integers_of_any_width_and_short_strings_are_read() {
        for (value, expected) in [
            (AMQPValue::ShortShortInt(-1), -1),
            (AMQPValue::ShortShortUInt(7), 7),
            (AMQPValue::ShortInt(300), 300),
            (AMQPValue::ShortUInt(60_000), 60_000),
            (AMQPValue::LongInt(70_000), 70_000),
            (AMQPValue::LongUInt(4_000_000_000), 4_000_000_000),
            (AMQPValue::LongLongInt(1 << 40), 1 << 40),
        ] {
            let parsed = ConejoHeaders::parse(&table(vec![("conejo-attempt", value)]));
            assert_eq!(parsed.attempt, Some(expected));
        }
        let parsed = ConejoHeaders::parse(&table(vec![(
            "conejo-reason",
            AMQPValue::ShortString("poison".into()),
        )]));
        assert_eq!(parsed.reason.as_deref(), Some("poison"));
    }

    #[test]
    fn a_conejo_header_of_the_wrong_type_is_shown_with_the_others() {
        let odd = table(vec![
            ("conejo-attempt", long("three")),
            ("conejo-reason", AMQPValue::Boolean(true)),
        ]);
        let (conejo, other) = split(Some(&odd));
        assert_eq!(conejo, ConejoHeaders::default());
        assert_eq!(other, odd);
        assert_eq!(
            split(None),
            (ConejoHeaders::default(), FieldTable::default())
        );
    }

    #[test]
    fn replay_clears_the_failure_bookkeeping_and_counts_the_replay() {
        let mut headers = dead_letter_table();
        let replayed = replay_headers(Some(&headers));
        assert_eq!(
            replayed,
            table(vec![
                ("conejo-original-exchange", long("shop")),
                ("conejo-original-routing-key", long("order.created")),
                ("conejo-original-queue", long("orders")),
                ("conejo-replayed", AMQPValue::LongInt(1)),
                ("tenant", long("acme")),
            ])
        );

        headers.insert("conejo-replayed".into(), AMQPValue::LongLongInt(2));
        let again = replay_headers(Some(&headers));
        assert_eq!(
            again.inner().get("conejo-replayed"),
            Some(&AMQPValue::LongInt(3))
        );
        assert_eq!(
            replay_headers(None),
            table(vec![("conejo-replayed", AMQPValue::LongInt(1))])
        );
    }

    #[test]
    fn only_the_contract_timestamp_format_is_ordered_as_text() {
        assert!(is_timestamp("2026-11-26T16:40:01.123Z"));
        for odd in [
            "2026-11-26T16:40:01Z",
            "2026-11-26T16:40:01.123+00:00",
            "2026-11-26 16:40:01.123Z",
            "2026-11-26T16:40:01.1234Z",
            "yesterday",
            "",
        ] {
            assert!(!is_timestamp(odd), "{odd}");
        }
    }
}
