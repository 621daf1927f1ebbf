//! Routing: each exchange type, the default exchange and the `amq.*` ones, `mandatory`.

use anyhow::ensure;
use conejo::{
    Exchange, Message,
    testing::{Published, TestBroker, TestQueue, header_binding},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

use crate::{
    Outcome,
    support::{no_route, publish, publish_to, take_bodies},
};

/// A direct exchange routes to the queues bound with exactly the routing key — every one of
/// them, once — and a mandatory message matching no binding comes back.
pub(crate) async fn direct_routes_by_exact_key(broker: &TestBroker) -> Outcome {
    let exchange = broker.name("conformance.direct");
    let (a, b) = (
        broker.name("conformance.direct.a"),
        broker.name("conformance.direct.b"),
    );
    broker
        .declare_exchange(&Exchange::direct(&exchange))
        .await?;
    for queue in [&a, &b] {
        broker.declare_queue(&TestQueue::new(queue)).await?;
    }
    broker.bind(&a, &exchange, "orders").await?;
    broker.bind(&b, &exchange, "orders").await?;
    broker.bind(&b, &exchange, "refunds").await?;
    // The same binding twice is one binding.
    broker.bind(&b, &exchange, "refunds").await?;

    for (key, body) in [("orders", "order"), ("refunds", "refund")] {
        assert_eq!(
            publish_to(broker, &exchange, key, body).await?,
            Published::Accepted
        );
    }
    for key in ["Orders", "orders.eu", "order", ""] {
        assert_eq!(
            publish_to(broker, &exchange, key, "lost").await?,
            no_route(),
            "{key:?}"
        );
    }

    let in_a = broker.take(&a).await?;
    assert_eq!(in_a.len(), 1);
    assert_eq!(in_a[0].text(), "order");
    assert_eq!(in_a[0].exchange(), exchange);
    assert_eq!(in_a[0].routing_key(), "orders");
    assert!(!in_a[0].redelivered());
    assert_eq!(take_bodies(broker, &b).await?, ["order", "refund"]);
    broker.cleanup().await?;
    Ok(())
}

/// A topic exchange matches words separated by dots: `*` is exactly one word, `#` zero or
/// more; an empty binding key matches only the empty routing key; a message matching
/// several bindings of one queue reaches it once.
pub(crate) async fn topic_star_is_one_word_and_hash_any(broker: &TestBroker) -> Outcome {
    let exchange = broker.name("conformance.topic");
    broker.declare_exchange(&Exchange::topic(&exchange)).await?;
    let bindings = [
        ("star", "order.*"),
        ("hash", "order.#"),
        ("tail", "#.eu"),
        ("middle", "*.created.*"),
        ("exact", "order.created"),
        ("empty", ""),
        ("all", "#"),
    ];
    let mut queues = Vec::new();
    for (queue, pattern) in bindings {
        let queue = broker.name(&format!("conformance.topic.{queue}"));
        broker.declare_queue(&TestQueue::new(&queue)).await?;
        broker.bind(&queue, &exchange, pattern).await?;
        queues.push(queue);
    }
    // The `star` queue is bound a second way: still one copy per message.
    broker.bind(&queues[0], &exchange, "*.created").await?;

    for key in [
        "order.created",
        "order.created.eu",
        "order",
        "order.",
        "refund.created.us",
        "eu",
        "",
        "order..eu",
    ] {
        assert_eq!(
            publish_to(broker, &exchange, key, "m").await?,
            Published::Accepted
        );
    }

    let mut keys = Vec::new();
    for queue in &queues {
        let got: Vec<String> = broker
            .take(queue)
            .await?
            .iter()
            .map(|m| m.routing_key().to_owned())
            .collect();
        keys.push(got);
    }
    let expected: [&[&str]; 7] = [
        // order.*, *.created
        &["order.created", "order."],
        // order.#
        &[
            "order.created",
            "order.created.eu",
            "order",
            "order.",
            "order..eu",
        ],
        // #.eu
        &["order.created.eu", "eu", "order..eu"],
        // *.created.*
        &["order.created.eu", "refund.created.us"],
        // order.created
        &["order.created"],
        // ""
        &[""],
        // #
        &[
            "order.created",
            "order.created.eu",
            "order",
            "order.",
            "refund.created.us",
            "eu",
            "",
            "order..eu",
        ],
    ];
    for ((queue, pattern), (got, expected)) in bindings.iter().zip(keys.iter().zip(expected)) {
        assert_eq!(got, expected, "queue '{queue}' bound with '{pattern}'");
    }
    broker.cleanup().await?;
    Ok(())
}

/// A fanout exchange routes to every bound queue whatever the keys; the message keeps its
/// own routing key.
pub(crate) async fn fanout_routes_to_every_binding(broker: &TestBroker) -> Outcome {
    let exchange = broker.name("conformance.fanout");
    broker
        .declare_exchange(&Exchange::fanout(&exchange))
        .await?;
    // Nothing bound yet: nowhere to go.
    assert_eq!(
        publish_to(broker, &exchange, "any", "lost").await?,
        no_route()
    );
    let (a, b) = (
        broker.name("conformance.fanout.a"),
        broker.name("conformance.fanout.b"),
    );
    for (queue, key) in [(&a, ""), (&b, "ignored")] {
        broker.declare_queue(&TestQueue::new(queue)).await?;
        broker.bind(queue, &exchange, key).await?;
    }
    // Bound twice with other keys: still one copy.
    broker.bind(&b, &exchange, "other").await?;
    assert_eq!(
        publish_to(broker, &exchange, "k1", "one").await?,
        Published::Accepted
    );
    assert_eq!(
        publish_to(broker, &exchange, "", "two").await?,
        Published::Accepted
    );
    for queue in [&a, &b] {
        let got = broker.take(queue).await?;
        let routes: Vec<(String, String)> = got
            .iter()
            .map(|m| (m.text(), m.routing_key().to_owned()))
            .collect();
        assert_eq!(
            routes,
            [
                ("one".to_owned(), "k1".to_owned()),
                ("two".to_owned(), String::new())
            ],
            "{queue}"
        );
    }
    broker.cleanup().await?;
    Ok(())
}

/// A headers exchange: `x-match: all` (the default) needs every bound header, `any` one of
/// them; values compare as values (an integer of any width), a header bound without a
/// value needs only be present, `x-` arguments are not headers to match, and a binding
/// with no headers matches everything with `all`, nothing with `any`.
pub(crate) async fn headers_match_all_or_any(broker: &TestBroker) -> Outcome {
    let exchange = broker.name("conformance.headers");
    broker
        .declare_exchange(&Exchange::headers(&exchange))
        .await?;
    let all = broker.name("conformance.headers.all");
    let any = broker.name("conformance.headers.any");
    let default = broker.name("conformance.headers.default");
    let wide = broker.name("conformance.headers.wide");
    let present = broker.name("conformance.headers.present");
    let everything = broker.name("conformance.headers.everything");
    let nothing = broker.name("conformance.headers.nothing");
    let with_x = broker.name("conformance.headers.with-x");
    for queue in [
        &all,
        &any,
        &default,
        &wide,
        &present,
        &everything,
        &nothing,
        &with_x,
    ] {
        broker.declare_queue(&TestQueue::new(queue)).await?;
    }
    broker
        .bind_with(
            &all,
            &exchange,
            "",
            header_binding(true, [("region", "eu"), ("tier", "gold")]),
        )
        .await?;
    broker
        .bind_with(
            &any,
            &exchange,
            "",
            header_binding(false, [("region", "eu"), ("tier", "gold")]),
        )
        .await?;
    // No x-match: all.
    let mut table = FieldTable::default();
    table.insert(ShortString::from("region"), long_string("eu"));
    table.insert(ShortString::from("tier"), long_string("gold"));
    broker.bind_with(&default, &exchange, "", table).await?;
    // A 32-bit integer bound; messages carry 64-bit ones.
    let mut table = header_binding(true, []);
    table.insert(ShortString::from("level"), AMQPValue::LongInt(5));
    broker.bind_with(&wide, &exchange, "", table).await?;
    // Presence only.
    let mut table = header_binding(true, []);
    table.insert(ShortString::from("trace"), AMQPValue::Void);
    broker.bind_with(&present, &exchange, "", table).await?;
    broker
        .bind_with(&everything, &exchange, "", header_binding(true, []))
        .await?;
    broker
        .bind_with(&nothing, &exchange, "", header_binding(false, []))
        .await?;
    // `any-with-x`: `x-` headers count too.
    let mut table = FieldTable::default();
    table.insert(ShortString::from("x-match"), long_string("any-with-x"));
    table.insert(ShortString::from("x-tenant"), long_string("acme"));
    broker.bind_with(&with_x, &exchange, "", table).await?;

    let message = |body: &'static str| Message::new(&exchange, "any.key", body).mandatory(false);
    let sent = [
        message("eu-gold")
            .header("region", "eu")
            .header("tier", "gold"),
        message("eu-silver")
            .header("region", "eu")
            .header("tier", "silver"),
        message("us-gold")
            .header("region", "us")
            .header("tier", "gold"),
        message("us").header("region", "us"),
        message("bare"),
        message("gold-extra")
            .header("tier", "gold")
            .header("region", "eu")
            .header("extra", "x"),
        message("level-5").header("level", 5),
        message("level-6").header("level", 6),
        message("level-text").header("level", "5"),
        message("traced").header("trace", "abc"),
        message("x-match-header").header("x-match", "any"),
        message("x-tenant").header("x-tenant", "acme"),
    ];
    for message in sent {
        assert_eq!(publish(broker, message).await?, Published::Accepted);
    }
    let expect = [
        (&all, vec!["eu-gold", "gold-extra"]),
        (&any, vec!["eu-gold", "eu-silver", "us-gold", "gold-extra"]),
        (&default, vec!["eu-gold", "gold-extra"]),
        (&wide, vec!["level-5"]),
        (&present, vec!["traced"]),
        (
            &everything,
            vec![
                "eu-gold",
                "eu-silver",
                "us-gold",
                "us",
                "bare",
                "gold-extra",
                "level-5",
                "level-6",
                "level-text",
                "traced",
                "x-match-header",
                "x-tenant",
            ],
        ),
        (&nothing, vec![]),
        (&with_x, vec!["x-tenant"]),
    ];
    for (queue, bodies) in expect {
        assert_eq!(take_bodies(broker, queue).await?, bodies, "{queue}");
    }
    broker.cleanup().await?;
    Ok(())
}

/// The default exchange routes to the queue named by the routing key, as exchange `""`; the
/// `amq.*` exchanges exist on every broker.
pub(crate) async fn default_exchange_routes_by_queue_name(broker: &TestBroker) -> Outcome {
    let queue = broker.name("conformance.default");
    broker.declare_queue(&TestQueue::new(&queue)).await?;
    assert_eq!(
        publish_to(broker, "", &queue, "direct").await?,
        Published::Accepted
    );
    broker.send(&queue, "sent").await?;
    let missing = broker.name("conformance.default.missing");
    assert_eq!(publish_to(broker, "", &missing, "lost").await?, no_route());
    let got = broker.take(&queue).await?;
    let routes: Vec<(String, &str, &str)> = got
        .iter()
        .map(|m| (m.text(), m.exchange(), m.routing_key()))
        .collect();
    assert_eq!(
        routes,
        [
            ("direct".to_owned(), "", queue.as_str()),
            ("sent".to_owned(), "", queue.as_str())
        ]
    );

    for (exchange, key) in [
        ("amq.direct", "conformance"),
        ("amq.topic", "conformance.*"),
        ("amq.fanout", ""),
    ] {
        broker.bind(&queue, exchange, key).await?;
    }
    // amq.direct: exact; amq.topic: a pattern; amq.fanout: anything.
    assert_eq!(
        publish_to(broker, "amq.direct", "conformance", "d").await?,
        Published::Accepted
    );
    assert_eq!(
        publish_to(broker, "amq.topic", "conformance.x", "t").await?,
        Published::Accepted
    );
    assert_eq!(
        publish_to(broker, "amq.fanout", "whatever", "f").await?,
        Published::Accepted
    );
    assert_eq!(take_bodies(broker, &queue).await?, ["d", "t", "f"]);
    // The predeclared exchanges pass a passive check, and a declaration equivalent to theirs.
    broker
        .declare_exchange(&Exchange::topic("amq.topic").passive())
        .await?;
    broker
        .declare_exchange(&Exchange::direct("amq.direct"))
        .await?;
    broker.cleanup().await?;
    Ok(())
}

/// `mandatory`: a message no queue takes comes back (312 NO_ROUTE) and is still confirmed;
/// without it, it is dropped and confirmed; routed, it is accepted either way.
pub(crate) async fn mandatory_is_returned_else_dropped(broker: &TestBroker) -> Outcome {
    let exchange = broker.name("conformance.mandatory");
    let queue = broker.name("conformance.mandatory.q");
    broker
        .declare_exchange(&Exchange::direct(&exchange))
        .await?;
    broker.declare_queue(&TestQueue::new(&queue)).await?;
    broker.bind(&queue, &exchange, "routed").await?;
    let message =
        |key: &str, mandatory: bool| Message::new(&exchange, key, "m").mandatory(mandatory);
    assert_eq!(publish(broker, message("nowhere", true)).await?, no_route());
    assert_eq!(
        publish(broker, message("nowhere", false)).await?,
        Published::Accepted
    );
    assert_eq!(
        publish(broker, message("routed", true)).await?,
        Published::Accepted
    );
    assert_eq!(
        publish(broker, message("routed", false)).await?,
        Published::Accepted
    );
    // Default exchange, no such queue.
    let missing = broker.name("conformance.mandatory.missing");
    assert_eq!(
        publish(broker, Message::to_queue(&missing, "m").mandatory(false)).await?,
        Published::Accepted
    );
    assert_eq!(
        publish(broker, Message::to_queue(&missing, "m")).await?,
        no_route()
    );
    // The returned and dropped ones are nowhere.
    assert_eq!(broker.ready(&queue).await?, 2);
    ensure!(
        broker
            .take(&queue)
            .await?
            .iter()
            .all(|m| m.routing_key() == "routed")
    );
    broker.cleanup().await?;
    Ok(())
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}
