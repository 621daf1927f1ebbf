//! How exchanges match: topic patterns and headers bindings, as RabbitMQ matches them.

use lapin::types::{AMQPValue, FieldTable};

/// A topic exchange's match: words separated by `.`, `*` one word, `#` zero or more.
pub(super) fn topic_matches(pattern: &str, routing_key: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = if routing_key.is_empty() {
        Vec::new()
    } else {
        routing_key.split('.').collect()
    };
    matches_from(&pattern, &key)
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

/// A headers exchange's match: every (`x-match: all`, the default) or any (`any`) binding
/// argument not starting with `x-` equals the message's header of that name.
pub(super) fn headers_match(binding: &FieldTable, headers: &Option<FieldTable>) -> bool {
    let any = matches!(
        binding.inner().get("x-match"),
        Some(AMQPValue::LongString(mode)) if mode.as_bytes().starts_with(b"any")
    );
    let mut wanted = binding
        .inner()
        .iter()
        .filter(|(key, _)| !key.as_str().starts_with("x-"))
        .peekable();
    if wanted.peek().is_none() {
        return true;
    }
    let found = |key: &str, value: &AMQPValue| {
        headers
            .as_ref()
            .and_then(|h| h.inner().get(key))
            .is_some_and(|have| have == value || matches!(value, AMQPValue::Void))
    };
    if any {
        wanted.any(|(key, value)| found(key.as_str(), value))
    } else {
        wanted.all(|(key, value)| found(key.as_str(), value))
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
    }
}
