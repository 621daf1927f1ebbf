//! Partitioned queues ([`Partitions`]): one stream of messages split by key over several
//! queues by RabbitMQ's consistent-hash exchange, each queue with a single active consumer,
//! so that one key's messages are handled in order across all the replicas of a service.

use std::time::Duration;

use lapin::{
    ExchangeKind,
    types::{AMQPValue, LongString},
};

pub(crate) use crate::broker::CONSISTENT_HASH;
use crate::{Error, Exchange, OrderKey};

/// The plugin that provides it, shipped with RabbitMQ but not enabled by default.
pub(crate) const CONSISTENT_HASH_PLUGIN: &str = "rabbitmq_consistent_hash_exchange";

/// At most this many partitions.
pub(crate) const MAX_PARTITIONS: u16 = 1024;

/// How often a replica holding a partition that is not its own checks whether the
/// partition's own replica is back (and if so hands the partition over).
pub(crate) const DEFAULT_BALANCE_INTERVAL: Duration = Duration::from_secs(10);

/// A stream of messages split by key over `count` partition queues, for order per key
/// across the replicas of a service.
///
/// Declared by [`Builder::partitioned`](crate::Builder::partitioned): a durable
/// consistent-hash exchange (`x-consistent-hash`, RabbitMQ's
/// `rabbitmq_consistent_hash_exchange` plugin: it ships with the broker, enable it with
/// `rabbitmq-plugins enable rabbitmq_consistent_hash_exchange`; startup says so when it is
/// not) routing to the queues `<exchange>.0` … `<exchange>.<count - 1>`, each bound with
/// weight 1 and consumed with a [single active consumer](crate::QueueConfig::single_active_consumer).
/// The exchange hashes each message's key — its routing key by default, or a header, its
/// message id or correlation id — so that one key always goes to the same partition;
/// within a partition the queue is [ordered](crate::QueueConfig::ordered_by) by the same
/// key. So one key's messages are handled one at a time and in order by the whole
/// deployment, while up to `count` × concurrency keys run at once.
///
/// **Replicas.** Every replica of the service consumes every partition; each partition has
/// one active consumer cluster-wide, the others wait behind it and take over when it goes.
/// Tell each replica its index among `n` with [`replica`](Self::replica) (a StatefulSet's
/// ordinal, a systemd instance number): partition `p` belongs to replica `p % n`, which
/// registers it first; a replica that took over another's partition (its replica died or
/// restarted) hands it back, in order, once the partition's consumers number `n` again —
/// so the partitions spread over the replicas and come back after a restart. Without
/// `replica`, the first replica to start is active on every partition and the others are
/// standbys.
///
/// **Keep `count` fixed** for the life of the topology: another count moves keys to other
/// partitions (drain the queues before changing it).
///
/// ```no_run
/// use conejo::{Conejo, Context, HandlerError, Partitions, QueueConfig, handler_fn};
///
/// # async fn run(replica: u16) -> Result<(), conejo::Error> {
/// // Publishers publish to the exchange "orders" with the order id as routing key.
/// let orders = Partitions::new("orders", 6).replica(replica, 3);
/// Conejo::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
///     .partitioned(
///         orders,
///         handler_fn(|event: String, ctx: Context| async move {
///             println!("order {} on {}: {event}", ctx.routing_key(), ctx.queue());
///             Ok::<(), HandlerError>(())
///         }),
///         QueueConfig::new().concurrency(8).poison_limit(None),
///     )
///     .build()?
///     .run()
///     .await
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct Partitions {
    /// The consistent-hash exchange.
    pub(crate) exchange: String,
    /// The number of partition queues.
    pub(crate) count: u16,
    /// What the exchange hashes.
    pub(crate) key: PartitionKey,
    /// This replica's index and the number of replicas, if told.
    pub(crate) replica: Option<(u16, u16)>,
    /// How often a replica checks whether to hand a partition back.
    pub(crate) balance_interval: Duration,
}

/// What a [`Partitions`] exchange hashes to choose a message's partition (and what each
/// partition is ordered by).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PartitionKey {
    /// The routing key the message is published with.
    RoutingKey,
    /// The value of a header (the exchange's `hash-header`).
    Header(String),
    /// The `message_id` property (`hash-property`).
    MessageId,
    /// The `correlation_id` property (`hash-property`).
    CorrelationId,
}

impl Partitions {
    /// `count` partitions (1 to 1024) behind the consistent-hash exchange `exchange`, hashing
    /// the routing key.
    pub fn new(exchange: &str, count: u16) -> Self {
        Partitions {
            exchange: exchange.to_owned(),
            count,
            key: PartitionKey::RoutingKey,
            replica: None,
            balance_interval: DEFAULT_BALANCE_INTERVAL,
        }
    }

    /// Hashes `key` instead of the routing key.
    pub fn key(mut self, key: PartitionKey) -> Self {
        self.key = key;
        self
    }

    /// Hashes the value of the header `name` instead of the routing key.
    pub fn by_header(self, name: &str) -> Self {
        self.key(PartitionKey::Header(name.to_owned()))
    }

    /// This process is replica `index` (from 0) of `replicas`: it registers its own
    /// partitions (`p % replicas == index`) first and hands back, in order, the others it
    /// holds once their own replica is back.
    pub fn replica(mut self, index: u16, replicas: u16) -> Self {
        self.replica = Some((index, replicas));
        self
    }

    /// How often a replica holding another's partition checks whether that replica is back
    /// (default 10 s).
    pub fn balance_interval(mut self, interval: Duration) -> Self {
        self.balance_interval = interval;
        self
    }

    /// The exchange's name.
    #[must_use]
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The name of partition `index`'s queue: `<exchange>.<index>`.
    #[must_use]
    pub fn queue_name(&self, index: u16) -> String {
        format!("{}.{index}", self.exchange)
    }

    /// The partitions' queue names, in order.
    #[must_use]
    pub fn queue_names(&self) -> Vec<String> {
        (0..self.count).map(|p| self.queue_name(p)).collect()
    }

    /// Whether partition `index` is this replica's own (always, without [`replica`](Self::replica)).
    pub(crate) fn is_home(&self, index: u16) -> bool {
        self.replica
            .is_none_or(|(replica, replicas)| index % replicas == replica)
    }

    /// What each partition queue is ordered by: the key the exchange hashes.
    pub(crate) fn order_key(&self) -> OrderKey {
        match &self.key {
            PartitionKey::RoutingKey => OrderKey::routing_key(),
            PartitionKey::Header(name) => OrderKey::header(name),
            PartitionKey::MessageId => OrderKey::message_id(),
            PartitionKey::CorrelationId => OrderKey::correlation_id(),
        }
    }

    /// The consistent-hash exchange, with what it hashes.
    pub(crate) fn declared_exchange(&self) -> Exchange {
        let exchange = Exchange::of_kind(
            &self.exchange,
            ExchangeKind::Custom(CONSISTENT_HASH.to_owned()),
        );
        let text = |value: &str| AMQPValue::LongString(LongString::from(value));
        match &self.key {
            PartitionKey::RoutingKey => exchange,
            PartitionKey::Header(name) => exchange.argument("hash-header", text(name)),
            PartitionKey::MessageId => exchange.argument("hash-property", text("message_id")),
            PartitionKey::CorrelationId => {
                exchange.argument("hash-property", text("correlation_id"))
            }
        }
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        let invalid = |reason: String| {
            Err(Error::config(
                None,
                format!("partitions '{}': {reason}", self.exchange),
            ))
        };
        if self.exchange.is_empty() || self.exchange.starts_with("amq.") {
            return invalid("the exchange needs a name of its own (not '' or 'amq.*')".into());
        }
        if self.count == 0 || self.count > MAX_PARTITIONS {
            return invalid(format!("count must be 1 to {MAX_PARTITIONS}"));
        }
        if let PartitionKey::Header(name) = &self.key
            && name.is_empty()
        {
            return invalid("the header to hash must be named".into());
        }
        if let Some((index, replicas)) = self.replica
            && (replicas == 0 || index >= replicas)
        {
            return invalid(format!(
                "replica {index} of {replicas}: the index must be below the number of replicas"
            ));
        }
        if self.balance_interval < Duration::from_millis(100)
            || self.balance_interval > Duration::from_secs(3600)
        {
            return invalid("the balance interval must be 100 ms to 1 h".into());
        }
        Ok(())
    }
}

/// A partition queue's place in its [`Partitions`], for the consumer that hands it back.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Borrowed {
    /// The number of replicas: the partition's own replica is back when the partition has
    /// this many consumers.
    pub(crate) replicas: u16,
    /// How often to check.
    pub(crate) interval: Duration,
}

impl From<&str> for PartitionKey {
    /// A header's name.
    fn from(header: &str) -> Self {
        PartitionKey::Header(header.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_belong_to_replicas_round_robin() {
        let p = Partitions::new("orders", 6).replica(1, 3);
        let home: Vec<u16> = (0..6).filter(|&i| p.is_home(i)).collect();
        assert_eq!(home, [1, 4]);
        assert!((0..6).all(|i| Partitions::new("orders", 6).is_home(i)));
        assert_eq!(
            p.queue_names(),
            [
                "orders.0", "orders.1", "orders.2", "orders.3", "orders.4", "orders.5"
            ]
        );
    }

    #[test]
    fn bad_partitions_are_refused() {
        for bad in [
            Partitions::new("orders", 0),
            Partitions::new("orders", 2000),
            Partitions::new("", 4),
            Partitions::new("amq.orders", 4),
            Partitions::new("orders", 4).replica(3, 3),
            Partitions::new("orders", 4).replica(0, 0),
            Partitions::new("orders", 4).by_header(""),
            Partitions::new("orders", 4).balance_interval(Duration::ZERO),
        ] {
            let error = bad.validate().expect_err(&format!("{bad:?}"));
            assert!(error.to_string().contains("partitions '"), "{error}");
        }
        Partitions::new("orders", 4)
            .replica(2, 3)
            .validate()
            .unwrap();
    }

    #[test]
    fn the_exchange_hashes_what_the_queues_are_ordered_by() {
        let by_header = Partitions::new("orders", 4).by_header("order-id");
        let exchange = by_header.declared_exchange();
        assert!(matches!(&exchange.kind, ExchangeKind::Custom(kind) if kind == CONSISTENT_HASH));
        assert!(exchange.arguments.inner().contains_key("hash-header"));
        assert!(format!("{:?}", by_header.order_key()).contains("order-id"));
        let by_id = Partitions::new("orders", 4).key(PartitionKey::MessageId);
        assert!(
            by_id
                .declared_exchange()
                .arguments
                .inner()
                .contains_key("hash-property")
        );
    }
}
