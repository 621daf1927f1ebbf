//! How exchanges match: topic patterns and headers bindings, as RabbitMQ matches them; and
//! the consistent-hash exchange's choice of one queue per key.

use std::hash::{DefaultHasher, Hash, Hasher};

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};

/// A topic exchange's match: words separated by `.`, `*` one word, `#` zero or more. An
/// empty key (binding or routing) has no words, as RabbitMQ splits it: the empty binding key
/// matches the empty routing key only.
pub(super) fn topic_matches(pattern: &str, routing_key: &str) -> bool {
    matches_from(&words(pattern), &words(routing_key))
}

/// A key's words: none for the empty key.
fn words(key: &str) -> Vec<&str> {
    if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    }
}

fn matches_from(pattern: &[&str], key: &[&str]) -> bool {
    match pattern.split_first() {
        None => key.is_empty(),
        Some((&"#", rest)) => (0..=key.len()).any(|skip| matches_from(rest, &key[skip..])),
        Some((&word, rest)) => match key.split_first() {
            Some((&first, tail)) if word == "*" || word == first => matches_from(rest, tail),
            _ => false,
        },
    }
}

/// How a headers binding matches (`x-match`): every bound header or any of them, with the
/// `x-` ones left out (`all`, `any`) or counted (`all-with-x`, `any-with-x`). Anything else
/// is `all`, as with RabbitMQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MatchKind {
    All,
    Any,
    AllWithX,
    AnyWithX,
}

impl MatchKind {
    fn of(binding: &FieldTable) -> Self {
        let mode = match binding.inner().get("x-match") {
            Some(AMQPValue::LongString(mode)) => mode.as_bytes(),
            _ => b"all",
        };
        match mode {
            b"any" => MatchKind::Any,
            b"all-with-x" => MatchKind::AllWithX,
            b"any-with-x" => MatchKind::AnyWithX,
            _ => MatchKind::All,
        }
    }

    fn any(self) -> bool {
        matches!(self, MatchKind::Any | MatchKind::AnyWithX)
    }

    /// Whether the binding argument `key` is a header to match.
    fn compares(self, key: &str) -> bool {
        match self {
            MatchKind::All | MatchKind::Any => !key.starts_with("x-"),
            MatchKind::AllWithX | MatchKind::AnyWithX => key != "x-match",
        }
    }
}

/// A headers exchange's match, as RabbitMQ's: with `all` every bound header must equal the
/// message's header of that name, with `any` one must; a header bound as void needs only be
/// present. A binding without headers to match matches every message with `all`, none with
/// `any`.
pub(super) fn headers_match(binding: &FieldTable, headers: &Option<FieldTable>) -> bool {
    let kind = MatchKind::of(binding);
    let mut wanted = binding
        .inner()
        .iter()
        .filter(|(key, _)| kind.compares(key.as_str()));
    let found = |key: &str, value: &AMQPValue| {
        headers
            .as_ref()
            .and_then(|h| h.inner().get(key))
            .is_some_and(|have| matches!(value, AMQPValue::Void) || same_value(have, value))
    };
    if kind.any() {
        wanted.any(|(key, value)| found(key.as_str(), value))
    } else {
        wanted.all(|(key, value)| found(key.as_str(), value))
    }
}

/// Equal as RabbitMQ compares header values (Erlang's `==` on the decoded values): numbers by
/// value whatever their width or signedness (an integer equals a float of the same value),
/// strings and byte arrays by their bytes, the rest by type and value.
fn same_value(a: &AMQPValue, b: &AMQPValue) -> bool {
    match (number(a), number(b)) {
        (Some(Number::Int(x)), Some(Number::Int(y))) => x == y,
        (Some(x), Some(y)) => x.as_f64() == y.as_f64(),
        _ => match (bytes(a), bytes(b)) {
            (Some(x), Some(y)) => x == y,
            _ => a == b,
        },
    }
}

/// A header's number.
#[derive(Debug, Clone, Copy)]
enum Number {
    Int(i128),
    Float(f64),
}

impl Number {
    #[allow(clippy::cast_precision_loss)]
    fn as_f64(self) -> f64 {
        match self {
            Number::Int(n) => n as f64,
            Number::Float(f) => f,
        }
    }
}

fn number(value: &AMQPValue) -> Option<Number> {
    Some(match *value {
        AMQPValue::ShortShortInt(n) => Number::Int(n.into()),
        AMQPValue::ShortShortUInt(n) => Number::Int(n.into()),
        AMQPValue::ShortInt(n) => Number::Int(n.into()),
        AMQPValue::ShortUInt(n) => Number::Int(n.into()),
        AMQPValue::LongInt(n) => Number::Int(n.into()),
        AMQPValue::LongUInt(n) => Number::Int(n.into()),
        AMQPValue::LongLongInt(n) => Number::Int(n.into()),
        AMQPValue::Timestamp(n) => Number::Int(n.into()),
        AMQPValue::Float(f) => Number::Float(f.into()),
        AMQPValue::Double(f) => Number::Float(f),
        _ => return None,
    })
}

fn bytes(value: &AMQPValue) -> Option<&[u8]> {
    match value {
        AMQPValue::LongString(s) => Some(s.as_bytes()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
        AMQPValue::ByteArray(b) => Some(b.as_slice()),
        _ => None,
    }
}

/// The queue a consistent-hash exchange (`x-consistent-hash`) routes a message to: each
/// binding's routing key is its weight (its share of the points on a hash ring); the message's key — its
/// routing key, or the header (`hash-header`) or property (`hash-property`) the exchange's
/// arguments name — hashes to a point, and the next binding point clockwise takes it. One
/// key always goes to the same queue; keys spread over the queues by weight. The points are
/// not RabbitMQ's (which queue a given key lands on differs), the properties are.
/// A message without the key to hash is not routed.
pub(super) fn consistent_hash<'a>(
    arguments: &FieldTable,
    bindings: &'a [(String, String, FieldTable)],
    routing_key: &str,
    properties: &BasicProperties,
) -> Option<&'a str> {
    let key = hash_key(arguments, routing_key, properties)?;
    let point = hash(&key);
    let mut ring: Vec<(u64, &str)> = bindings
        .iter()
        .flat_map(|(queue, weight, _)| {
            let points = weight.parse::<u32>().unwrap_or(0) * POINTS_PER_WEIGHT;
            (0..points).map(move |n| (hash(&(queue.as_str(), n)), queue.as_str()))
        })
        .collect();
    ring.sort_unstable();
    let next = ring.iter().find(|(at, _)| *at >= point).or(ring.first());
    next.map(|&(_, queue)| queue)
}

/// Points on the ring per unit of a binding's weight: enough for keys to spread evenly.
const POINTS_PER_WEIGHT: u32 = 64;

/// What a consistent-hash exchange hashes for a message, as its arguments say.
fn hash_key(
    arguments: &FieldTable,
    routing_key: &str,
    properties: &BasicProperties,
) -> Option<Vec<u8>> {
    let text = |name: &str| {
        arguments
            .inner()
            .get(name)
            .and_then(bytes)
            .map(<[u8]>::to_vec)
    };
    if let Some(header) = text("hash-header") {
        let header = String::from_utf8_lossy(&header).into_owned();
        let value = properties
            .headers()
            .as_ref()?
            .inner()
            .get(header.as_str())?;
        return Some(match bytes(value) {
            Some(raw) => raw.to_vec(),
            None => format!("{value:?}").into_bytes(),
        });
    }
    match text("hash-property").as_deref() {
        Some(b"message_id") => properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().as_bytes().to_vec()),
        Some(b"correlation_id") => properties
            .correlation_id()
            .as_ref()
            .map(|id| id.as_str().as_bytes().to_vec()),
        Some(b"timestamp") => properties.timestamp().map(|t| t.to_be_bytes().to_vec()),
        Some(_) => None,
        None => Some(routing_key.as_bytes().to_vec()),
    }
}

fn hash(value: &impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use lapin::types::{LongString, ShortString};

    use super::*;

    #[test]
    fn topic_patterns_match_as_rabbitmq_matches_them() {
        assert!(topic_matches("order.*", "order.created"));
        assert!(!topic_matches("order.*", "order.created.eu"));
        assert!(topic_matches("order.#", "order.created.eu"));
        assert!(topic_matches("order.#", "order"));
        assert!(topic_matches("#", ""));
        assert!(topic_matches("#.eu", "order.created.eu"));
        assert!(!topic_matches("*.eu", "order.created.eu"));
        assert!(topic_matches("*.*.eu", "order.created.eu"));
        assert!(topic_matches("order.created", "order.created"));
        assert!(!topic_matches("order.created", "order.stored"));
        assert!(topic_matches("", ""));
        assert!(!topic_matches("", "order"));
        assert!(!topic_matches("*", ""));
        assert!(topic_matches("order.*", "order."));
    }

    #[test]
    fn headers_bindings_match_all_or_any() {
        let table = |pairs: &[(&str, &str)]| {
            let mut table = FieldTable::default();
            for (key, value) in pairs {
                table.insert(
                    ShortString::from(*key),
                    AMQPValue::LongString(LongString::from(*value)),
                );
            }
            table
        };
        let message = Some(table(&[("region", "eu"), ("tier", "gold")]));
        assert!(headers_match(&table(&[("region", "eu")]), &message));
        assert!(!headers_match(
            &table(&[("region", "eu"), ("tier", "silver")]),
            &message
        ));
        assert!(headers_match(
            &table(&[("x-match", "any"), ("region", "eu"), ("tier", "silver")]),
            &message
        ));
        assert!(!headers_match(&table(&[("region", "us")]), &None));
        assert!(headers_match(&table(&[("x-match", "all")]), &None));
        assert!(!headers_match(&table(&[("x-match", "any")]), &message));
        let mut wide = table(&[]);
        wide.insert(ShortString::from("level"), AMQPValue::LongInt(5));
        let mut level = table(&[]);
        level.insert(ShortString::from("level"), AMQPValue::LongLongInt(5));
        assert!(headers_match(&wide, &Some(level)));
        let tenant = Some(table(&[("x-tenant", "acme")]));
        assert!(headers_match(
            &table(&[("x-match", "any-with-x"), ("x-tenant", "acme")]),
            &tenant
        ));
        assert!(!headers_match(
            &table(&[("x-match", "any"), ("x-tenant", "acme")]),
            &tenant
        ));
    }

    #[test]
    fn a_consistent_hash_sends_each_key_to_one_queue_and_spreads_keys_by_weight() {
        let bindings: Vec<(String, String, FieldTable)> = (0..4)
            .map(|p| (format!("q.{p}"), "1".to_owned(), FieldTable::default()))
            .collect();
        let none = FieldTable::default();
        let props = BasicProperties::default();
        let mut counts = std::collections::HashMap::new();
        for key in 0..4000 {
            let key = format!("order-{key}");
            let queue = consistent_hash(&none, &bindings, &key, &props).unwrap();
            assert_eq!(consistent_hash(&none, &bindings, &key, &props), Some(queue));
            *counts.entry(queue).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 4, "{counts:?}");
        // Equal weights, shares near equal.
        assert!(counts.values().all(|&n| n > 700), "{counts:?}");

        let mut by_header = FieldTable::default();
        by_header.insert(
            ShortString::from("hash-header"),
            AMQPValue::LongString(LongString::from("order-id")),
        );
        let mut headers = FieldTable::default();
        headers.insert(ShortString::from("order-id"), AMQPValue::LongInt(42));
        let with = BasicProperties::default().with_headers(headers);
        let a = consistent_hash(&by_header, &bindings, "x", &with);
        assert!(a.is_some());
        assert_eq!(consistent_hash(&by_header, &bindings, "y", &with), a);
        assert_eq!(consistent_hash(&by_header, &bindings, "x", &props), None);
    }
}
