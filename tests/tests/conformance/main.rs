//! The conformance suite of conejo's in-memory broker: every scenario here runs twice, once
//! against the in-memory broker (`memory::<scenario>`, on tokio's paused clock) and once
//! against a real RabbitMQ (`live::<scenario>`), with the same body and the same assertions
//! on what a client observes — routing, returns, refusals and their reply codes and texts,
//! prefetch windows, acknowledgements, redeliveries, expiry and dead-lettering with its
//! headers, quorum delivery limits. A scenario that passes one way and fails the other is a
//! difference between the two brokers: the in-memory broker is the one to fix.
//!
//! The memory half needs no broker:
//!
//! ```text
//! cargo nextest run -p conejo-tests --test conformance -E 'test(/^memory::/)'
//! ```
//!
//! The live half runs against the broker at `AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`); every name is made unique to its test
//! ([`TestBroker::name`]) and deleted at its end, so the tests run in parallel on a shared
//! broker:
//!
//! ```text
//! cargo nextest run -p conejo-tests --test conformance -E 'test(/^live::/)'
//! ```
//!
//! Both halves: `cargo nextest run -p conejo-tests --test conformance`.
//!
//! Each scenario is one `async fn <scenario>(broker: &TestBroker) -> Outcome` in the module
//! of its concern, listed once in [`scenarios!`] below. Waits are bounded polls or
//! [`TestConsumer::next`](conejo::testing::TestConsumer::next) with a limit, never sleeps:
//! in memory the paused clock makes them free, live they are short (TTLs of 50–200 ms).
//! `.config/nextest.toml` kills a scenario that runs past 30 s (a hang, in memory: a clock
//! that cannot advance).
//!
//! **Which RabbitMQ.** The expectations are RabbitMQ 3.10's, the broker these scenarios
//! were checked against; a few are its own and say so (where a quorum queue puts what is
//! given back; later versions add `x-last-death-*` headers, and RabbitMQ 4 gives quorum
//! queues a delivery limit of 20 by default).
//!
//! **Not covered, not emulated.** The in-memory broker does not emulate, and these
//! scenarios do not cover: stream queues (declared, they behave as classic ones), message
//! priorities (`x-max-priority` is validated, not applied), queue expiry (`x-expires`),
//! single active consumers, consumer priorities, `alternate-exchange` routing,
//! exchange-to-exchange bindings, `CC`/`BCC` headers, server-named queues, `queue.purge`,
//! `basic.recover`, the broker's consumer timeout (a fault injects it instead), and quorum
//! dead-lettering's `at-least-once` strategy (every dead letter is published at once).

use conejo::testing::TestBroker;

mod support;

// Exchanges: direct, topic (`*`, `#`), fanout, headers (`all`, `any`), the default one and
// the `amq.*` ones; `mandatory` returns and silent drops.
mod routing;
// Expiry and dead-lettering: a TTL wait queue's retry round trip, `x-death` and
// `x-first-death-*` on a reject, a message's own expiration, expiry at the head only, an
// expired message given back, an expiry cycle, a queue at its maximum length.
mod dead_letter;
// Consumers: the prefetch window, `multiple` acks, requeues and the redelivered flag, a
// cancel, a closed channel, an auto-delete queue, turns between consumers, a queue deleted
// under its consumer.
mod consumers;
// What the broker refuses, with its reply codes and texts, and the harness working again
// on a fresh channel afterwards.
mod refusals;
// Quorum queues: delivery counts, the delivery limit, where returns go, what they refuse.
mod quorum;
// A conejo service on either broker: a retry through its wait queue, a dead letter.
mod service;

/// What a scenario returns: an error is a failed test, as a failed assertion is.
pub(crate) type Outcome = anyhow::Result<()>;

/// Runs a live scenario; on a failure, deletes what it declared before failing.
async fn live(broker: TestBroker, scenario: impl Future<Output = Outcome>) {
    use futures::FutureExt;
    let outcome = std::panic::AssertUnwindSafe(scenario).catch_unwind().await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            let _ = broker.cleanup().await;
            panic!("{error:#}");
        }
        Err(panic) => {
            let _ = broker.cleanup().await;
            std::panic::resume_unwind(panic);
        }
    }
}

/// Two tests per scenario: `memory::<scenario>` and `live::<scenario>`.
macro_rules! scenarios {
    ($($module:ident :: $scenario:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let broker = conejo::testing::TestBroker::memory();
                    if let Err(error) = crate::$module::$scenario(&broker).await {
                        panic!("{error:#}");
                    }
                }
            )*
        }

        mod live {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let broker = conejo::testing::TestBroker::live(&conejo_tests::amqp_url())
                        .expect("AMQP_URL is a valid URL");
                    crate::live(broker.clone(), crate::$module::$scenario(&broker)).await;
                }
            )*
        }
    };
}

scenarios! {
    routing::direct_routes_by_exact_key,
    routing::topic_star_is_one_word_and_hash_any,
    routing::fanout_routes_to_every_binding,
    routing::headers_match_all_or_any,
    routing::default_exchange_routes_by_queue_name,
    routing::mandatory_is_returned_else_dropped,
    dead_letter::ttl_wait_queue_round_trip,
    dead_letter::reject_writes_death_headers,
    dead_letter::message_expiration_dead_letters,
    dead_letter::expiry_happens_at_the_head,
    dead_letter::expired_while_unacked_is_dead_lettered_on_requeue,
    dead_letter::expiry_cycle_is_dropped,
    dead_letter::max_length_drops_the_head_or_refuses,
    consumers::prefetch_window,
    consumers::ack_multiple_settles_earlier_deliveries,
    consumers::requeue_marks_redelivered,
    consumers::requeued_messages_keep_their_order,
    consumers::closed_channel_requeues_unacked,
    consumers::cancel_stops_deliveries,
    consumers::auto_delete_queue_goes_with_its_last_consumer,
    consumers::consumers_take_turns,
    consumers::deleted_queue_cancels_its_consumer,
    refusals::conflicting_redeclare,
    refusals::equivalent_redeclare,
    refusals::invalid_queue_arguments,
    refusals::conflicting_exchange_redeclare,
    refusals::passive_declare_of_missing_queue,
    refusals::publish_to_missing_exchange,
    refusals::bind_refusals,
    refusals::unknown_delivery_tag,
    quorum::delivery_count_and_limit,
    quorum::where_returns_go,
    quorum::refuses_what_a_quorum_queue_cannot_be,
    service::service_retry_round_trip,
}
