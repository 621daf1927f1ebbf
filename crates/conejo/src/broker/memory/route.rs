//! How exchanges match: topic patterns and headers bindings, as RabbitMQ matches them.

use lapin::types::{AMQPValue, FieldTable};

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
}
