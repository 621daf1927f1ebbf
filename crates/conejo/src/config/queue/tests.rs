//! Prefetch, validation and the declared arguments.

use super::*;

#[test]
fn prefetch_is_derived_and_bounded() {
    // async handlers: 16 per slot, capped at 250, never below 2 per slot
    assert_eq!(QueueConfig::new().concurrency(1).resolve(false), (1, 16));
    assert_eq!(QueueConfig::new().concurrency(8).resolve(false), (8, 128));
    assert_eq!(QueueConfig::new().resolve(false), (16, 250));
    assert_eq!(
        QueueConfig::new().concurrency(200).resolve(false),
        (200, 400)
    );
    // blocking handlers: 2 per slot, at least 10
    assert_eq!(QueueConfig::new().concurrency(1).resolve(true), (1, 10));
    assert_eq!(QueueConfig::new().concurrency(8).resolve(true), (8, 16));
    assert_eq!(QueueConfig::new().concurrency(2).resolve(true), (2, 10));
    for blocking in [false, true] {
        assert_eq!(
            QueueConfig::new().concurrency(1 << 20).resolve(blocking).1,
            u16::MAX
        );
        // an explicit prefetch below the concurrency caps it
        assert_eq!(
            QueueConfig::new()
                .concurrency(50)
                .prefetch(20)
                .resolve(blocking),
            (20, 20)
        );
    }
}

#[test]
fn invalid_configurations_are_named() {
    let err = QueueConfig::new().concurrency(0).validate("q").unwrap_err();
    assert!(
        err.to_string()
            .contains("'q': concurrency must be at least 1"),
        "{err}"
    );
    assert!(QueueConfig::new().prefetch(0).validate("q").is_err());
    assert!(
        QueueConfig::new()
            .quorum()
            .durable(false)
            .validate("q")
            .is_err()
    );
    assert!(QueueConfig::new().validate("").is_err());
    assert!(QueueConfig::new().quorum().validate("q").is_ok());
    assert!(QueueConfig::new().validate(&"q".repeat(250)).is_err());
    for bad in [
        QueueConfig::new().timeout(Duration::ZERO),
        QueueConfig::new().timeout(Duration::MAX),
        QueueConfig::new().poison_limit(Some(0)),
        QueueConfig::new().dead_letter_exchange(""),
        QueueConfig::new().retry(RetryPolicy::default().max_attempts(0)),
    ] {
        let err = bad.validate("q").unwrap_err();
        assert_eq!(err.queue(), Some("q"), "{err}");
    }
}

#[test]
fn quorum_queues_get_a_delivery_limit_and_a_dead_letter_exchange() {
    let args = QueueConfig::new().quorum().declared_arguments("q");
    assert_eq!(
        args.inner().get("x-delivery-limit"),
        Some(&AMQPValue::LongInt(DEFAULT_POISON_LIMIT as i32))
    );
    assert_eq!(
        args.inner().get("x-dead-letter-exchange"),
        Some(&AMQPValue::LongString("q.dlx".into()))
    );
    // the user's own settings win; classic queues are left alone
    let args = QueueConfig::new()
        .quorum()
        .argument("x-delivery-limit", AMQPValue::LongInt(50))
        .dead_letter_exchange("errors")
        .declared_arguments("q");
    assert_eq!(
        args.inner().get("x-delivery-limit"),
        Some(&AMQPValue::LongInt(50))
    );
    assert_eq!(
        args.inner().get("x-dead-letter-exchange"),
        Some(&AMQPValue::LongString("errors".into()))
    );
    assert!(
        QueueConfig::new()
            .declared_arguments("q")
            .inner()
            .is_empty()
    );
    // Without detection, no limit, explicitly: not the broker's default (20 on
    // RabbitMQ 4, dropping the message without a dead-letter exchange).
    let args = QueueConfig::new()
        .quorum()
        .poison_limit(None)
        .declared_arguments("q");
    assert_eq!(
        args.inner().get("x-delivery-limit"),
        Some(&AMQPValue::LongInt(i32::MAX))
    );
    assert!(args.inner().get("x-dead-letter-exchange").is_none());
}

#[test]
fn stream_queues_are_consumed_as_streams_and_refuse_what_streams_cannot_do() {
    use crate::{OffsetStore, OffsetStoreError, StreamOffset};

    struct Nowhere;
    impl OffsetStore for Nowhere {
        async fn load(&self, _: &str) -> Result<Option<u64>, OffsetStoreError> {
            Ok(None)
        }
        async fn store(&self, _: &str, _: u64) -> Result<(), OffsetStoreError> {
            Ok(())
        }
    }

    let stream = QueueConfig::new()
        .stream(StreamOffset::Offset(7))
        .ordered_by(crate::OrderKey::routing_key());
    assert!(
        stream.validate("q").is_ok(),
        "ordered streams need no poison_limit(None)"
    );
    let settings = stream.settings(Arc::from("q"), false);
    let resolved = settings.stream.as_ref().expect("a stream");
    assert_eq!(resolved.from, StreamOffset::Offset(7));
    assert!(settings.retry_in_place && settings.keeps_consumer);
    assert_eq!(settings.poison_limit, None, "a stream never redelivers");
    assert!(!settings.arguments.contains_key("x-dead-letter-exchange"));

    // A stream declared through its argument alone is still consumed as one, from `next`.
    let by_argument = QueueConfig::new()
        .argument("x-queue-type", AMQPValue::LongString("stream".into()))
        .settings(Arc::from("q"), false);
    assert_eq!(by_argument.stream.map(|s| s.from), Some(StreamOffset::Next));

    for (bad, says) in [
        (
            QueueConfig::new()
                .stream(StreamOffset::First)
                .durable(false),
            "durable",
        ),
        (
            QueueConfig::new()
                .stream(StreamOffset::First)
                .single_active_consumer(),
            "single active consumer",
        ),
        (QueueConfig::new().offset_store(Nowhere), "stream queues"),
    ] {
        let err = bad.validate("q").unwrap_err();
        assert!(err.to_string().contains(says), "{err}");
    }
}
