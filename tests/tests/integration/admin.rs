//! The dead-letter operator tool (`conejo::admin`) against the real broker: counts, shows and
//! replays dead letters without losing or reordering any, and never prints the password.
//!
//! Why it is ~750 lines: one test per operator command and failure of the tool, each
//! self-contained (set-up, run, assertion on the broker).

use std::time::Duration;

use anyhow::{Context as _, ensure};
use conejo::AmqpUrl;
use conejo::admin::{self, AdminError, DeadLetterCommand, DeadLetterQueue};
use conejo_tests::lapin::BasicProperties;
use conejo_tests::lapin::types::{AMQPValue, FieldTable, LongString};
use conejo_tests::{Broker, DrainedMessage, amqp_url, init_tracing, unique_name};

const WAIT: Duration = Duration::from_secs(20);

fn url() -> anyhow::Result<AmqpUrl> {
    Ok(amqp_url().parse()?)
}

fn long(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text))
}

/// A dead letter as the consumer core writes it (see the contract in `conejo::admin`).
struct Letter {
    /// `conejo-reason`.
    reason: &'static str,
    /// `conejo-failure` (none for `poison`).
    failure: Option<&'static str>,
    /// `conejo-original-queue`.
    original_queue: Option<String>,
    /// `conejo-last-failure-at`.
    last_failure_at: &'static str,
}

impl Letter {
    fn new(reason: &'static str, failure: Option<&'static str>, original_queue: &str) -> Self {
        Letter {
            reason,
            failure,
            original_queue: Some(original_queue.to_owned()),
            last_failure_at: "2026-11-26T16:41:00.000Z",
        }
    }

    fn at(mut self, last_failure_at: &'static str) -> Self {
        self.last_failure_at = last_failure_at;
        self
    }

    fn headers(&self) -> FieldTable {
        let mut headers = FieldTable::default();
        let mut put = |key: &str, value: AMQPValue| {
            headers.insert(key.into(), value);
        };
        put("conejo-reason", long(self.reason));
        if let Some(failure) = self.failure {
            put("conejo-failure", long(failure));
        }
        put("conejo-error", long("order 7: stock service said 503"));
        put("conejo-attempt", AMQPValue::LongInt(5));
        put("conejo-original-exchange", long("shop"));
        put("conejo-original-routing-key", long("order.created"));
        if let Some(queue) = &self.original_queue {
            put("conejo-original-queue", long(queue));
        }
        put("conejo-first-failure-at", long("2026-11-26T16:40:01.123Z"));
        put("conejo-last-failure-at", long(self.last_failure_at));
        put("conejo-redeliveries", AMQPValue::ShortShortUInt(1));
        put("tenant", long("acme"));
        put("trace", AMQPValue::LongLongInt(42));
        headers
    }
}

/// Publishes each letter to `dlq` (body `letter-<i>`, JSON content type, a correlation id);
/// returns their message ids, in queue order.
async fn fill(broker: &Broker, dlq: &str, letters: &[Letter]) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    for (i, letter) in letters.iter().enumerate() {
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_correlation_id(format!("corr-{i}").as_str().into())
            .with_headers(letter.headers());
        let body = format!("{{\"letter\":{i}}}");
        ids.push(
            broker
                .publish_with_properties(dlq, body.as_bytes(), properties)
                .await?,
        );
    }
    Ok(ids)
}

fn ids(messages: &[DrainedMessage]) -> Vec<String> {
    messages
        .iter()
        .filter_map(|m| m.message_id.clone())
        .collect()
}

/// A consumed queue and its dead-letter queue, declared empty.
async fn queues(broker: &Broker, prefix: &str) -> anyhow::Result<(String, String)> {
    let queue = unique_name(prefix);
    let dlq = admin::dlq_name(&queue);
    broker.declare_queue(&queue).await?;
    broker.declare_queue(&dlq).await?;
    Ok((queue, dlq))
}

#[tokio::test]
async fn summary_counts_by_reason_and_failure_and_leaves_the_queue_as_it_was() -> anyhow::Result<()>
{
    init_tracing();
    let broker = Broker::connect().await?;
    let (queue, dlq) = queues(&broker, "admin.summary").await?;
    let letters = vec![
        Letter::new("attempts-exhausted", Some("handler"), &queue).at("2026-11-26T16:45:00.500Z"),
        Letter::new("rejected", Some("decode"), &queue).at("2026-11-26T16:42:00.000Z"),
        Letter::new("attempts-exhausted", Some("handler"), &queue).at("2026-11-26T17:01:00.000Z"),
        Letter::new("poison", None, &queue).at("2026-11-26T16:41:59.999Z"),
        Letter::new("attempts-exhausted", Some("timeout"), &queue),
        Letter::new("attempts-exhausted", Some("handler"), &queue),
        Letter::new("rejected", Some("panic"), &queue),
    ];
    let published = fill(&broker, &dlq, &letters).await?;
    // A message without conejo headers (dead-lettered by something else).
    let stray = broker.publish_bytes(&dlq, b"stray").await?;

    let summary = admin::summary(&url()?, &dlq, admin::DEFAULT_SCAN_LIMIT).await?;
    assert_eq!(summary.dlq, dlq);
    assert_eq!(
        (summary.ready, summary.inspected, summary.complete),
        (8, 8, true)
    );
    let groups: Vec<_> = summary
        .groups
        .iter()
        .map(|g| (g.reason.as_deref(), g.failure.as_deref(), g.count))
        .collect();
    assert_eq!(groups[0], (Some("attempts-exhausted"), Some("handler"), 3));
    let mut rest = groups[1..].to_vec();
    rest.sort();
    assert_eq!(
        rest,
        vec![
            (None, None, 1),
            (Some("attempts-exhausted"), Some("timeout"), 1),
            (Some("poison"), None, 1),
            (Some("rejected"), Some("decode"), 1),
            (Some("rejected"), Some("panic"), 1),
        ]
    );
    assert_eq!(
        summary.oldest_failure.as_deref(),
        Some("2026-11-26T16:41:00.000Z")
    );
    assert_eq!(
        summary.newest_failure.as_deref(),
        Some("2026-11-26T17:01:00.000Z")
    );

    // A bounded scan says it is partial; a bound equal to the count is complete.
    let partial = admin::summary(&url()?, &dlq, 3).await?;
    assert_eq!((partial.inspected, partial.complete), (3, false));
    assert_eq!(partial.groups.iter().map(|g| g.count).sum::<u64>(), 3);
    let exact = admin::summary(&url()?, &dlq, 8).await?;
    assert_eq!((exact.inspected, exact.complete), (8, true));

    // Nothing was taken, nothing moved.
    broker.wait_for_count(&dlq, 8, WAIT).await?;
    let mut expected = published;
    expected.push(stray);
    assert_eq!(ids(&broker.drain(&dlq).await?), expected);
    broker.delete_queues(&[&queue, &dlq]).await?;
    Ok(())
}

#[tokio::test]
async fn show_parses_the_first_messages_and_leaves_the_queue_as_it_was() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let (queue, dlq) = queues(&broker, "admin.show").await?;
    let letters = vec![
        Letter::new("attempts-exhausted", Some("timeout"), &queue),
        Letter::new("poison", None, &queue),
        Letter::new("rejected", Some("handler"), &queue),
        Letter::new("rejected", Some("decode"), &queue),
    ];
    let published = fill(&broker, &dlq, &letters).await?;

    let shown = admin::show(&url()?, &dlq, 2).await?;
    assert_eq!(shown.len(), 2);
    let first = &shown[0];
    assert_eq!(first.position, 1);
    assert_eq!(
        first.properties.message_id().as_ref().map(|s| s.as_str()),
        Some(published[0].as_str())
    );
    assert_eq!(
        first.properties.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(
        first
            .properties
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("corr-0")
    );
    assert_eq!(first.body, br#"{"letter":0}"#);
    let headers = &first.conejo;
    assert_eq!(headers.reason.as_deref(), Some("attempts-exhausted"));
    assert_eq!(headers.failure.as_deref(), Some("timeout"));
    assert_eq!(
        headers.error.as_deref(),
        Some("order 7: stock service said 503")
    );
    assert_eq!(headers.attempt, Some(5));
    assert_eq!(headers.original_exchange.as_deref(), Some("shop"));
    assert_eq!(
        headers.original_routing_key.as_deref(),
        Some("order.created")
    );
    assert_eq!(headers.original_queue.as_deref(), Some(queue.as_str()));
    assert_eq!(
        headers.first_failure_at.as_deref(),
        Some("2026-11-26T16:40:01.123Z")
    );
    assert_eq!(
        headers.last_failure_at.as_deref(),
        Some("2026-11-26T16:41:00.000Z")
    );
    assert_eq!(headers.redeliveries, Some(1));
    assert_eq!(headers.replayed, None);
    let mut other = FieldTable::default();
    other.insert("tenant".into(), long("acme"));
    other.insert("trace".into(), AMQPValue::LongLongInt(42));
    assert_eq!(first.other_headers, other);
    assert_eq!(shown[1].position, 2);
    assert_eq!(shown[1].conejo.reason.as_deref(), Some("poison"));
    assert_eq!(shown[1].conejo.failure, None);

    // Asking for more than there is gives them all, in order, again.
    let all = admin::show(&url()?, &dlq, 100).await?;
    let all_ids: Vec<_> = all
        .iter()
        .map(|l| {
            l.properties
                .message_id()
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(all_ids, published);

    broker.wait_for_count(&dlq, 4, WAIT).await?;
    assert_eq!(ids(&broker.drain(&dlq).await?), published);
    broker.delete_queues(&[&queue, &dlq]).await?;
    Ok(())
}

/// Checks a replayed message: the failure bookkeeping is gone, the rest kept.
fn assert_replayed(message: &DrainedMessage, index: usize, replayed: i32) -> anyhow::Result<()> {
    for gone in [
        "conejo-reason",
        "conejo-failure",
        "conejo-error",
        "conejo-attempt",
        "conejo-first-failure-at",
        "conejo-last-failure-at",
        "conejo-redeliveries",
    ] {
        ensure!(
            message.header(gone).is_none(),
            "{gone} kept: {:?}",
            message.headers
        );
    }
    ensure!(message.header_str("conejo-original-exchange").as_deref() == Some("shop"));
    ensure!(message.header_str("conejo-original-routing-key").as_deref() == Some("order.created"));
    ensure!(message.header_str("tenant").as_deref() == Some("acme"));
    ensure!(message.header("trace") == Some(&AMQPValue::LongLongInt(42)));
    ensure!(
        message.header("conejo-replayed") == Some(&AMQPValue::LongInt(replayed)),
        "conejo-replayed: {:?}",
        message.header("conejo-replayed")
    );
    ensure!(message.body == format!("{{\"letter\":{index}}}").as_bytes());
    ensure!(message.content_type.as_deref() == Some("application/json"));
    Ok(())
}

#[tokio::test]
async fn replay_moves_dead_letters_back_with_fresh_attempts() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let (queue, dlq) = queues(&broker, "admin.replay").await?;
    let other_queue = unique_name("admin.replay.other");
    broker.declare_queue(&other_queue).await?;
    let letters = vec![
        Letter::new("attempts-exhausted", Some("handler"), &queue),
        Letter::new("rejected", Some("decode"), &other_queue),
        Letter::new("poison", None, &queue),
        Letter::new("attempts-exhausted", Some("panic"), &queue),
    ];
    let published = fill(&broker, &dlq, &letters).await?;

    let report = admin::replay(&url()?, &dlq, None, None).await?;
    assert_eq!(report.replayed, 4);
    assert_eq!(report.destinations[&queue], 3);
    assert_eq!(report.destinations[&other_queue], 1);
    assert_eq!(
        (report.skipped, report.unroutable.len(), report.max_reached),
        (0, 0, false)
    );

    assert_eq!(broker.message_count(&dlq).await?, 0);
    broker.wait_for_count(&queue, 3, WAIT).await?;
    let moved = broker.drain(&queue).await?;
    assert_eq!(
        ids(&moved),
        vec![
            published[0].clone(),
            published[2].clone(),
            published[3].clone()
        ]
    );
    for (message, index) in moved.iter().zip([0, 2, 3]) {
        assert_replayed(message, index, 1)?;
        assert_eq!(
            message.header_str("conejo-original-queue"),
            Some(queue.clone())
        );
    }
    let elsewhere = broker.drain(&other_queue).await?;
    assert_eq!(ids(&elsewhere), vec![published[1].clone()]);
    assert_replayed(&elsewhere[0], 1, 1)?;

    // A message replayed before, dead-lettered again and replayed again counts twice.
    let mut twice = Letter::new("rejected", Some("handler"), &queue).headers();
    twice.insert("conejo-replayed".into(), AMQPValue::ShortShortUInt(1));
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(twice);
    broker
        .publish_with_properties(&dlq, br#"{"letter":9}"#, properties)
        .await?;
    assert_eq!(admin::replay(&url()?, &dlq, None, None).await?.replayed, 1);
    broker.wait_for_count(&queue, 1, WAIT).await?;
    assert_replayed(&broker.drain(&queue).await?[0], 9, 2)?;

    broker.delete_queues(&[&queue, &dlq, &other_queue]).await?;
    Ok(())
}

#[tokio::test]
async fn replay_stops_at_max_and_takes_the_first_ones() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let (queue, dlq) = queues(&broker, "admin.max").await?;
    let letters: Vec<_> = (0..5)
        .map(|_| Letter::new("attempts-exhausted", Some("handler"), &queue))
        .collect();
    let published = fill(&broker, &dlq, &letters).await?;

    let report = admin::replay(&url()?, &dlq, None, Some(2)).await?;
    assert_eq!((report.replayed, report.max_reached), (2, true));
    broker.wait_for_count(&queue, 2, WAIT).await?;
    assert_eq!(ids(&broker.drain(&queue).await?), published[..2]);
    broker.wait_for_count(&dlq, 3, WAIT).await?;

    let none = admin::replay(&url()?, &dlq, None, Some(0)).await?;
    assert_eq!(none.replayed, 0);
    let rest = admin::replay(&url()?, &dlq, None, Some(10)).await?;
    assert_eq!((rest.replayed, rest.max_reached), (3, false));
    broker.wait_for_count(&queue, 3, WAIT).await?;
    assert_eq!(ids(&broker.drain(&queue).await?), published[2..]);
    assert_eq!(broker.message_count(&dlq).await?, 0);
    broker.delete_queues(&[&queue, &dlq]).await?;
    Ok(())
}

#[tokio::test]
async fn messages_that_cannot_go_back_stay_in_the_dead_letter_queue_in_order() -> anyhow::Result<()>
{
    init_tracing();
    let broker = Broker::connect().await?;
    let (queue, dlq) = queues(&broker, "admin.stay").await?;
    let gone = unique_name("admin.stay.gone"); // never declared
    let mut nowhere = Letter::new("poison", None, &queue);
    nowhere.original_queue = None;
    let letters = vec![
        Letter::new("rejected", Some("handler"), &gone),
        Letter::new("rejected", Some("handler"), &queue),
        nowhere,
        Letter::new("attempts-exhausted", Some("timeout"), &queue),
        Letter::new("attempts-exhausted", Some("timeout"), &gone),
    ];
    let published = fill(&broker, &dlq, &letters).await?;

    let report = admin::replay(&url()?, &dlq, None, None).await?;
    assert_eq!(report.replayed, 2);
    assert_eq!(report.skipped, 1);
    let unroutable: Vec<_> = report
        .unroutable
        .iter()
        .map(|u| (u.message_id.clone(), u.queue.clone()))
        .collect();
    assert_eq!(
        unroutable,
        vec![
            (Some(published[0].clone()), gone.clone()),
            (Some(published[4].clone()), gone.clone())
        ]
    );
    assert!(
        report.unroutable[0].reason.contains("NO_ROUTE"),
        "{:?}",
        report.unroutable
    );

    broker.wait_for_count(&queue, 2, WAIT).await?;
    assert_eq!(
        ids(&broker.drain(&queue).await?),
        vec![published[1].clone(), published[3].clone()]
    );
    broker.wait_for_count(&dlq, 3, WAIT).await?;
    let kept = broker.drain(&dlq).await?;
    assert_eq!(
        ids(&kept),
        vec![
            published[0].clone(),
            published[2].clone(),
            published[4].clone()
        ]
    );
    // Left as they were: the failure headers are still there.
    assert!(
        kept.iter()
            .all(|m| m.header("conejo-reason").is_some() && m.header("conejo-replayed").is_none())
    );
    broker.delete_queues(&[&queue, &dlq]).await?;
    Ok(())
}

#[tokio::test]
async fn replay_to_another_queue_takes_every_message_there() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let (queue, dlq) = queues(&broker, "admin.to").await?;
    let target = unique_name("admin.to.target");
    broker.declare_queue(&target).await?;
    let mut nowhere = Letter::new("poison", None, &queue);
    nowhere.original_queue = None;
    let letters = vec![Letter::new("rejected", Some("handler"), &queue), nowhere];
    let published = fill(&broker, &dlq, &letters).await?;

    // A target that does not exist, or the DLQ itself, is refused before anything moves.
    let absent = unique_name("admin.to.absent"); // never declared
    let missing = admin::replay(&url()?, &dlq, Some(&absent), None).await;
    match missing {
        Err(AdminError::QueueNotFound { queue }) => assert_eq!(queue, absent),
        other => panic!("expected QueueNotFound, got {other:?}"),
    }
    let itself = admin::replay(&url()?, &dlq, Some(&dlq), None).await;
    assert!(
        matches!(itself, Err(AdminError::Invalid { .. })),
        "{itself:?}"
    );
    assert_eq!(broker.message_count(&dlq).await?, 2);

    let report = admin::replay(&url()?, &dlq, Some(&target), None).await?;
    assert_eq!((report.replayed, report.skipped), (2, 0));
    broker.wait_for_count(&target, 2, WAIT).await?;
    assert_eq!(ids(&broker.drain(&target).await?), published);
    assert_eq!(broker.message_count(&queue).await?, 0);
    assert_eq!(broker.message_count(&dlq).await?, 0);
    broker.delete_queues(&[&queue, &dlq, &target]).await?;
    Ok(())
}

#[tokio::test]
async fn a_missing_dead_letter_queue_is_a_clear_error() -> anyhow::Result<()> {
    init_tracing();
    let missing = unique_name("admin.missing");
    let dlq = admin::dlq_name(&missing);
    let url = url()?;
    for result in [
        admin::summary(&url, &dlq, 10).await.map(drop),
        admin::show(&url, &dlq, 10).await.map(drop),
        admin::replay(&url, &dlq, None, None).await.map(drop),
    ] {
        match result {
            Err(AdminError::QueueNotFound { queue }) => assert_eq!(queue, dlq),
            other => panic!("expected QueueNotFound, got {other:?}"),
        }
    }
    Ok(())
}

/// Runs `rabbitmqctl` (or `$RABBITMQCTL`) with `args`.
async fn rabbitmqctl(args: &[&str]) -> anyhow::Result<()> {
    let bin = std::env::var("RABBITMQCTL")
        .ok()
        .filter(|bin| !bin.trim().is_empty())
        .unwrap_or_else(|| "rabbitmqctl".to_owned());
    let output = tokio::process::Command::new(&bin)
        .args(args)
        .output()
        .await
        .with_context(|| format!("cannot run {bin}"))?;
    ensure!(
        output.status.success(),
        "{bin} {} failed: {}",
        args[0],
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// The test broker's URL with other credentials, and its vhost.
fn with_credentials(user: &str, password: &str) -> anyhow::Result<(String, String)> {
    let url = amqp_url();
    let (scheme, rest) = url.split_once("://").context("AMQP_URL has no scheme")?;
    let rest = rest.rsplit_once('@').map_or(rest, |(_, rest)| rest);
    let path = rest.split_once('/').map_or("", |(_, path)| path);
    let vhost = path.split('?').next().unwrap_or_default();
    let vhost = match vhost {
        "" => "/".to_owned(),
        vhost => vhost.replace("%2f", "/").replace("%2F", "/"),
    };
    Ok((format!("{scheme}://{user}:{password}@{rest}"), vhost))
}

#[tokio::test]
async fn output_and_errors_never_show_the_password() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let (queue, dlq) = queues(&broker, "admin.secret").await?;
    let letters = vec![
        Letter::new("rejected", Some("handler"), &queue),
        Letter::new("poison", None, &queue),
    ];
    fill(&broker, &dlq, &letters).await?;

    // A user of its own, so that the password differs from everything else shown.
    let user = unique_name("conejo-admin-test");
    let password = format!("pw-{}", unique_name("s3cret"));
    let (raw_url, vhost) = with_credentials(&user, &password)?;
    rabbitmqctl(&["add_user", &user, &password]).await?;
    let result = async {
        rabbitmqctl(&["set_permissions", "-p", &vhost, &user, ".*", ".*", ".*"]).await?;
        let url: AmqpUrl = raw_url.parse()?;
        let mut shown = String::new();
        for command in [
            DeadLetterCommand::List {
                queue: DeadLetterQueue::named(&queue),
                limit: 100,
            },
            DeadLetterCommand::Show {
                queue: DeadLetterQueue::dlq(&dlq),
                n: 5,
            },
            DeadLetterCommand::Replay {
                queue: DeadLetterQueue::named(&queue),
                to: None,
                max: None,
            },
        ] {
            let mut out = Vec::new();
            command.run_to(&url, &mut out).await?;
            shown.push_str(&String::from_utf8(out)?);
        }
        assert!(shown.contains(&format!("{dlq}: 2 dead letters")), "{shown}");
        assert!(shown.contains("#2 reason=poison"), "{shown}");
        assert!(
            shown.contains(&format!("{dlq}: 2 replayed (2 to {queue})")),
            "{shown}"
        );

        let wrong: AmqpUrl = with_credentials(&user, &format!("{password}-wrong"))?
            .0
            .parse()?;
        let missing = DeadLetterCommand::List {
            queue: DeadLetterQueue::named(&unique_name("admin.absent")),
            limit: 1,
        };
        for (url, command) in [(&url, &missing), (&wrong, &missing)] {
            let err = command
                .run_to(url, &mut Vec::new())
                .await
                .expect_err("fails");
            shown.push_str(&format!("{err} {err:?}\n"));
        }
        assert!(
            shown.contains(&format!("cannot connect to amqp://{user}:***@")),
            "{shown}"
        );
        assert!(!shown.contains(&password), "{shown}");
        anyhow::Ok(())
    }
    .await;
    rabbitmqctl(&["delete_user", &user]).await?;
    result?;
    broker.wait_for_count(&queue, 2, WAIT).await?;
    broker.delete_queues(&[&queue, &dlq]).await?;
    Ok(())
}

#[tokio::test]
async fn a_long_replay_keeps_the_order_of_moved_and_kept_messages() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let (queue, dlq) = queues(&broker, "admin.long").await?;
    let gone = unique_name("admin.long.gone"); // never declared
    // More than one window of confirms, with unroutable messages spread among them.
    let letters: Vec<_> = (0..300)
        .map(|i| {
            let to = if i % 7 == 3 { &gone } else { &queue };
            Letter::new("attempts-exhausted", Some("handler"), to)
        })
        .collect();
    let published = fill(&broker, &dlq, &letters).await?;
    let (kept, moved): (Vec<_>, Vec<_>) = published
        .iter()
        .cloned()
        .enumerate()
        .partition(|(i, _)| i % 7 == 3);
    let strip = |pairs: Vec<(usize, String)>| -> Vec<String> {
        pairs.into_iter().map(|(_, id)| id).collect()
    };

    let report = admin::replay(&url()?, &dlq, None, Some(250)).await?;
    assert_eq!(report.replayed, 250);
    assert!(report.max_reached);
    let rest = admin::replay(&url()?, &dlq, None, None).await?;
    assert_eq!(rest.replayed as usize, moved.len() - 250);
    // The second run met every kept message again, and left them again.
    assert_eq!(rest.unroutable.len(), kept.len());

    broker
        .wait_for_count(&queue, moved.len() as u32, WAIT)
        .await?;
    assert_eq!(ids(&broker.drain(&queue).await?), strip(moved));
    broker.wait_for_count(&dlq, kept.len() as u32, WAIT).await?;
    assert_eq!(ids(&broker.drain(&dlq).await?), strip(kept));
    broker.delete_queues(&[&queue, &dlq]).await?;
    Ok(())
}

#[tokio::test]
async fn a_copy_the_broker_refuses_leaves_the_dead_letter_in_place() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let queue = unique_name("admin.full");
    let dlq = admin::dlq_name(&queue);
    // A queue that holds one message and nacks any further publish.
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    args.insert("x-overflow".into(), long("reject-publish"));
    broker.declare_queue_with_args(&queue, args).await?;
    broker.declare_queue(&dlq).await?;
    let letters: Vec<_> = (0..3)
        .map(|_| Letter::new("rejected", Some("handler"), &queue))
        .collect();
    let published = fill(&broker, &dlq, &letters).await?;

    let report = admin::replay(&url()?, &dlq, None, None).await?;
    assert_eq!(report.replayed, 1);
    let refused: Vec<_> = report
        .unroutable
        .iter()
        .map(|u| u.message_id.clone())
        .collect();
    assert_eq!(
        refused,
        vec![Some(published[1].clone()), Some(published[2].clone())]
    );
    broker.wait_for_count(&dlq, 2, WAIT).await?;
    assert_eq!(ids(&broker.drain(&dlq).await?), published[1..]);
    assert_eq!(ids(&broker.drain(&queue).await?), published[..1]);
    broker.delete_queues(&[&queue, &dlq]).await?;
    Ok(())
}

#[tokio::test]
async fn a_replay_cut_short_at_any_point_loses_nothing() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let (queue, dlq) = queues(&broker, "admin.cut").await?;
    let letters: Vec<_> = (0..400)
        .map(|_| Letter::new("attempts-exhausted", Some("handler"), &queue))
        .collect();
    let published = fill(&broker, &dlq, &letters).await?;
    let total = published.len() as u32;

    // Drop the replay after a few milliseconds, again and again: wherever it is cut, every
    // message is in one queue or the other (or, at worst, both) once the broker has
    // requeued what the dropped connection held.
    let url = url()?;
    // Cuts that left messages in both queues: the replay was stopped half-way.
    let mut halfway = 0;
    let mut millis = 1;
    while halfway < 3 && millis < 5_000 {
        let run = admin::replay(&url, &dlq, None, None);
        let cut = tokio::time::timeout(Duration::from_millis(millis), run)
            .await
            .is_err();
        millis += millis / 4 + 1;
        let deadline = tokio::time::Instant::now() + WAIT;
        let (left, moved) = loop {
            let left = broker.message_count(&dlq).await?;
            let moved = broker.message_count(&queue).await?;
            if left + moved >= total {
                break (left, moved);
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "only {} of {total} messages left",
                left + moved
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if left == 0 {
            break;
        }
        if cut && moved > 0 {
            halfway += 1;
        }
    }
    admin::replay(&url, &dlq, None, None).await?;
    assert!(halfway > 0, "no replay was cut short half-way");

    assert_eq!(broker.message_count(&dlq).await?, 0);
    let mut moved = ids(&broker.drain(&queue).await?);
    moved.sort();
    moved.dedup();
    let mut expected = published;
    expected.sort();
    assert_eq!(moved, expected);
    broker.delete_queues(&[&queue, &dlq]).await?;
    Ok(())
}
