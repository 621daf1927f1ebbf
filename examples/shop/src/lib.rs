//! The shop: message types and handlers shared by the example binaries.
//!
//! - `orders-service`: typed JSON orders from the `shop` exchange, handled by an async
//!   [`Orders`] handler behind an [`Idempotency`] layer (a duplicate order message is acked
//!   without storing it twice), which reserves the items with the [`Stock`] service and
//!   announces each stored order as `order.stored`. [`orders_service`] is the whole service,
//!   for the binary and for its tests (`tests/service.rs` runs it without a broker).
//! - `thumbnail-service`: CPU-heavy [`Thumbnailer`] jobs through the blocking bridge.
//! - `shop-publisher`: publishes sample messages to both queues.
//! - `shop-demo`: all of the above in one process, then exits.

use std::{
    fmt,
    future::Future,
    time::{Duration, Instant},
};

mod idempotency;
pub use idempotency::{Idempotency, Idempotent};

use conejo::{
    BlockingHandler, Builder, Context, Exchange, Handler, HandlerError, Json, Message, QueueConfig,
};
use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions},
    types::{FieldTable, ShortString},
};
use serde::{Deserialize, Serialize};

/// The shop's topic exchange: the front end publishes [`ORDER_CREATED`] there, the orders
/// service announces [`ORDER_STORED`].
pub const SHOP: &str = "shop";
/// The routing key of a new order.
pub const ORDER_CREATED: &str = "order.created";
/// The routing key of the event the orders service publishes once an order is stored.
pub const ORDER_STORED: &str = "order.stored";
/// The order queue, bound to [`SHOP`] with [`ORDER_CREATED`].
pub const ORDERS: &str = "shop.orders";
/// The thumbnail queue.
pub const THUMBNAILS: &str = "shop.thumbnails";

/// The sample load the publisher and the demo publish.
#[derive(Debug, Clone, clap::Args)]
pub struct Samples {
    /// Orders to publish (order 3 has no items; one malformed order is added).
    #[arg(long, default_value_t = 10)]
    pub orders: u64,
    /// CPU-heavy thumbnail jobs to publish.
    #[arg(long, default_value_t = 4)]
    pub thumbnails: u64,
    /// CPU milliseconds per thumbnail.
    #[arg(long, default_value_t = 1500)]
    pub work_ms: u64,
}

/// The broker option every example binary takes.
#[derive(Debug, clap::Args)]
pub struct Broker {
    /// Broker URL (its password is never printed).
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub amqp_url: String,
}

/// Logs to stderr through [`conejo::logging::init`]: text lines, `info` and no lapin
/// (conejo reports every connection event itself, saying what it does next); `RUST_LOG`
/// replaces that filter. The services get the same from `conejo::cli`, configurable with
/// `CONEJO_LOG_FORMAT` and `CONEJO_LOG_LEVEL`.
pub fn init_tracing() -> Result<(), conejo::Error> {
    conejo::logging::init(conejo::LogFormat::Text, None)
}

/// An order, as published by the shop's front end.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Order {
    /// Order number.
    pub id: u64,
    /// Stock-keeping unit.
    pub sku: String,
    /// How many items.
    pub quantity: u32,
}

/// The orders service: the [`SHOP`] topic exchange, and the [`ORDERS`] queue bound to it
/// with [`ORDER_CREATED`], handled by [`Orders`] (reserving with `stock`) behind an
/// [`Idempotency`] layer. `conejo` is the builder to register it on (`cli::main`'s, made
/// from the settings; a test's, made from its broker's URL).
pub fn orders_service(conejo: Builder, stock: impl Stock) -> Builder {
    conejo
        .connection_name("orders-service")
        .exchange(Exchange::topic(SHOP))
        .queue_with(
            ORDERS,
            Orders::new(stock),
            QueueConfig::new()
                .bind(SHOP, ORDER_CREATED)
                .concurrency(32)
                // Duplicates (a redelivery after a lost ack, a re-sent order) are skipped.
                .layer(Idempotency::new(100_000)),
        )
}

/// The stock service, where an order's items are reserved before it is stored.
pub trait Stock: Send + Sync + 'static {
    /// Reserves `order.quantity` items of `order.sku` for `order`.
    fn reserve(&self, order: &Order) -> impl Future<Output = Result<(), StockError>> + Send;
}

/// Why the stock service did not reserve an order's items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StockError {
    /// It cannot answer now (restarting, overloaded) and asks to be called again after
    /// `retry_after`: the order is tried again then.
    Unavailable {
        /// When to call again (its `Retry-After`).
        retry_after: Duration,
    },
    /// Not enough items of the SKU: the order cannot be fulfilled as placed.
    OutOfStock {
        /// The SKU.
        sku: String,
        /// How many are left.
        available: u32,
    },
}

impl fmt::Display for StockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StockError::Unavailable { retry_after } => write!(
                f,
                "the stock service is unavailable (retry after {retry_after:?})"
            ),
            StockError::OutOfStock { sku, available } => {
                write!(f, "{sku} is out of stock ({available} left)")
            }
        }
    }
}

impl std::error::Error for StockError {}

/// The stock service as the example binaries run it: a short async wait stands for the
/// call, and every SKU is in stock. A deployment puts its inventory client here.
#[derive(Debug, Clone, Copy, Default)]
pub struct Warehouse;

impl Stock for Warehouse {
    async fn reserve(&self, _order: &Order) -> Result<(), StockError> {
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok(())
    }
}

/// Handles orders: checks them, reserves their items with the [`Stock`] service, "stores"
/// them (a short async wait stands for a database), then announces them on [`SHOP`] as
/// [`ORDER_STORED`] — the order is acked only once the broker confirmed that event.
#[derive(Debug, Default)]
pub struct Orders<S = Warehouse> {
    stock: S,
}

impl<S: Stock> Orders<S> {
    /// Orders reserving their items with `stock`.
    pub fn new(stock: S) -> Self {
        Orders { stock }
    }
}

impl<S: Stock> Handler for Orders<S> {
    type Message = Json<Order>;

    async fn handle(&self, Json(order): Json<Order>, ctx: &Context) -> Result<(), HandlerError> {
        if order.quantity == 0 {
            // Will never succeed: reject (dead-letter) rather than retry.
            return Err(HandlerError::reject(format!(
                "order {} has no items",
                order.id
            )));
        }
        match self.stock.reserve(&order).await {
            Ok(()) => {}
            // Tried again when the stock service says, wherever the retry policy would be.
            Err(error @ StockError::Unavailable { retry_after }) => {
                return Err(HandlerError::retry_after(
                    format!("order {}: {error}", order.id),
                    retry_after,
                ));
            }
            Err(error @ StockError::OutOfStock { .. }) => {
                return Err(HandlerError::reject(format!("order {}: {error}", order.id)));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        tracing::info!(
            order = order.id,
            sku = %order.sku,
            quantity = order.quantity,
            attempt = ctx.attempt(),
            redelivered = ctx.redelivered(),
            "order stored"
        );
        // Held by this delivery: the order is acked once the broker confirmed the event; an
        // event it does not take (a nack, a lost connection) fails the order, which is
        // retried. An event goes to whoever subscribes to it, none being no error: not
        // `mandatory`.
        let id = format!("order-{}-stored", order.id);
        let event = Message::new(SHOP, ORDER_STORED, Json(order))
            .message_id(id)
            .mandatory(false);
        ctx.publish(event).await?;
        Ok(())
    }
}

/// A thumbnail to render.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Thumbnail {
    /// Image name.
    pub image: String,
    /// Milliseconds of CPU the rendering takes (a stand-in for image size).
    pub work_ms: u64,
}

/// Renders thumbnails: pure CPU work, run on the blocking pool.
#[derive(Debug, Default)]
pub struct Thumbnailer;

impl BlockingHandler for Thumbnailer {
    type Message = Json<Thumbnail>;

    fn handle(&self, Json(job): Json<Thumbnail>, _ctx: &Context) -> Result<(), HandlerError> {
        let started = Instant::now();
        let checksum = burn_cpu(Duration::from_millis(job.work_ms));
        tracing::info!(
            image = %job.image,
            took_ms = started.elapsed().as_millis() as u64,
            checksum,
            "thumbnail rendered"
        );
        Ok(())
    }
}

/// Keeps one core busy for `duration` (no sleeping, no yielding); returns a checksum so the
/// work cannot be optimised away.
pub fn burn_cpu(duration: Duration) -> u64 {
    let started = Instant::now();
    let mut x = 0x9E37_79B9_7F4A_7C15_u64;
    while started.elapsed() < duration {
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
    }
    x
}

/// A publisher for the examples (conejo consumes; publishing here is plain lapin).
#[allow(missing_debug_implementations)]
pub struct Publisher {
    channel: lapin::Channel,
    _connection: Connection,
}

impl Publisher {
    /// Connects, enables publisher confirms, declares the shop's queues (durable, as the
    /// services declare them).
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        for queue in [ORDERS, THUMBNAILS] {
            channel
                .queue_declare(
                    ShortString::from(queue),
                    QueueDeclareOptions::durable(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(Publisher {
            channel,
            _connection: connection,
        })
    }

    /// Publishes raw bytes (persistent) and waits for the broker's confirm.
    pub async fn publish(&self, queue: &str, body: &[u8]) -> anyhow::Result<()> {
        self.publish_with(queue, body, BasicProperties::default())
            .await
    }

    /// Publishes raw bytes (persistent, JSON) with `properties` (a message id…) and waits
    /// for the broker's confirm.
    pub async fn publish_with(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> anyhow::Result<()> {
        let confirm = self
            .channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(queue),
                BasicPublishOptions::default(),
                body,
                properties
                    .with_content_type(ShortString::from("application/json"))
                    .with_delivery_mode(2),
            )
            .await?
            .await?;
        anyhow::ensure!(confirm.is_ack(), "broker refused the message");
        Ok(())
    }

    /// Publishes `value` as JSON.
    pub async fn publish_json<T: Serialize>(&self, queue: &str, value: &T) -> anyhow::Result<()> {
        self.publish(queue, &serde_json::to_vec(value)?).await
    }

    /// Publishes the sample load; returns how many messages were published.
    pub async fn publish_samples(&self, samples: &Samples) -> anyhow::Result<u64> {
        let Samples {
            orders,
            thumbnails,
            work_ms,
        } = *samples;
        for id in 1..=orders {
            let quantity = if id == 3 { 0 } else { (id % 5 + 1) as u32 };
            let order = Order {
                id,
                sku: format!("SKU-{:03}", id * 7 % 100),
                quantity,
            };
            // The front end names each order message, so a re-sent one is recognised.
            let id = ShortString::from(format!("order-{id}"));
            self.publish_with(
                ORDERS,
                &serde_json::to_vec(&order)?,
                BasicProperties::default().with_message_id(id),
            )
            .await?;
        }
        self.publish(ORDERS, b"{\"id\": 99, \"sku\": oops").await?;
        for n in 1..=thumbnails {
            let job = Thumbnail {
                image: format!("photo-{n}.jpg"),
                work_ms,
            };
            self.publish_json(THUMBNAILS, &job).await?;
        }
        Ok(orders + 1 + thumbnails)
    }
}
