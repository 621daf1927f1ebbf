//! Observability against a real broker: `/metrics` after a known load, `/readyz` and `/livez`
//! as the service connects, consumes, loses its consumer and its broker, and the runtime lag
//! of a handler runtime blocked by a handler while the connection runtime keeps time.
//!
//! Every test reads the endpoints over HTTP with a raw `GET` (no HTTP client dependency).
//! The module is in nextest's `heavy` group: one test stalls a runtime and measures lags,
//! another starts and stops a private broker node.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use conejo::{Conejo, Context, Error, Handler, HandlerError, RetryPolicy};
use conejo_tests::{
    Broker, PrivateNode, RunningService, Scenario, amqp_url, init_tracing, queue_config,
    unique_name,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(30);

/// An HTTP response: status code and body.
#[derive(Debug)]
struct Response {
    status: u16,
    body: String,
}

/// `GET path` over HTTP/1.1 (one request per connection), within 5 s.
async fn get(address: SocketAddr, path: &str) -> anyhow::Result<Response> {
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        let text = String::from_utf8(raw)?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .with_context(|| format!("no end of headers in {text:?}"))?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .with_context(|| format!("no status in {head:?}"))?;
        anyhow::Ok(Response {
            status,
            body: body.to_owned(),
        })
    })
    .await
    .with_context(|| format!("GET {path} on {address}: no answer within 5 s"))?
}

/// Polls `GET path` every 20 ms until `done` holds; errors after `timeout` with the last
/// response.
async fn get_until(
    address: SocketAddr,
    path: &str,
    timeout: Duration,
    done: impl Fn(&Response) -> bool,
) -> anyhow::Result<Response> {
    let deadline = Instant::now() + timeout;
    loop {
        let response = get(address, path).await?;
        if done(&response) {
            return Ok(response);
        }
        if Instant::now() >= deadline {
            bail!("GET {path}: still {response:?} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The samples of the Prometheus text format: `(name, labels) → value`.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

fn parse_metrics(text: &str) -> anyhow::Result<Samples> {
    let mut samples = Samples::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("no value in {line:?}"))?;
        let value: f64 = value
            .parse()
            .with_context(|| format!("bad value in {line:?}"))?;
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let rest = rest.strip_suffix('}').context("unclosed labels")?;
                let labels = rest
                    .split(',')
                    .filter(|pair| !pair.is_empty())
                    .map(|pair| {
                        let (key, value) = pair.split_once('=').context("label without =")?;
                        Ok((key.to_owned(), value.trim_matches('"').to_owned()))
                    })
                    .collect::<anyhow::Result<_>>()?;
                (name, labels)
            }
        };
        samples.insert((name.to_owned(), labels), value);
    }
    Ok(samples)
}

/// The value of `name` with exactly `labels`.
fn sample(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    samples
        .get(&(name.to_owned(), labels.clone()))
        .copied()
        .with_context(|| format!("no sample {name} {labels:?}"))
}

/// Fails "0", "10" and "20" on every attempt (retried once, then dead-lettered), rejects
/// "30"; counts its calls.
#[derive(Clone, Default)]
struct MixedOutcomes {
    calls: Arc<AtomicU32>,
}

impl Handler for MixedOutcomes {
    type Message = String;

    async fn handle(&self, body: String, _: &Context) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match body.as_str() {
            "0" | "10" | "20" => Err(HandlerError::retry("database unavailable")),
            "30" => Err(HandlerError::reject("bad order")),
            _ => Ok(()),
        }
    }
}

#[tokio::test]
async fn metrics_count_a_known_load() -> anyhow::Result<()> {
    let scenario = Scenario::new("observed").await?;
    let Scenario { broker, queue } = &scenario;
    // 50 messages: 45 fine, 3 failing twice (retried, then out of attempts), 1 rejected,
    // 1 that is not UTF-8 (a decode failure, dead-lettered).
    for n in 0..50 {
        if n == 40 {
            broker.publish_bytes(queue, &[0xff, 0xfe]).await?;
        } else {
            broker
                .publish_bytes(queue, n.to_string().as_bytes())
                .await?;
        }
    }
    let handler = MixedOutcomes::default();
    let retry = RetryPolicy::default()
        .max_attempts(2)
        .initial_delay(Duration::from_millis(100))
        .jitter(0.0);
    let conejo = Conejo::builder(amqp_url())
        .queue_with(
            queue,
            handler.clone(),
            queue_config().retry(retry).prefetch(20),
        )
        .health_port(0)
        .build()?;
    let address = conejo.health_addr().context("no health address")?;
    assert!(address.ip().is_loopback(), "{address}");
    let service = RunningService::spawn(conejo);
    // 50 first deliveries + 3 retries, all acked (5 of them once their dead letter was
    // confirmed, 3 once their retry copy was).
    let stats = service
        .wait_for(queue, WAIT, |s| s.acked == 53 && s.dead_lettered == 5)
        .await?;
    // A delivery's task ends just after it hands over its settlement: wait for the last.
    let in_flight_gauge = format!("conejo_in_flight{{queue=\"{queue}\"}} 0\n");
    let response = get_until(address, "/metrics", WAIT, |r| {
        r.body.contains(&in_flight_gauge)
    })
    .await?;
    assert_eq!(response.status, 200);
    let metrics = parse_metrics(&response.body)?;
    eprintln!("{stats:?}");
    let q = [("queue", queue.as_str())];
    let of = |name: &str| sample(&metrics, name, &q);
    let with = |name: &str, key: &str, value: &str| {
        sample(&metrics, name, &[("queue", queue.as_str()), (key, value)])
    };
    assert_eq!(of("conejo_deliveries_total")?, 53.0);
    assert_eq!(of("conejo_acks_total")?, 53.0);
    assert_eq!(with("conejo_outcomes_total", "outcome", "acked")?, 45.0);
    assert_eq!(with("conejo_outcomes_total", "outcome", "retried")?, 3.0);
    assert_eq!(
        with("conejo_outcomes_total", "outcome", "dead_lettered")?,
        5.0
    );
    assert_eq!(with("conejo_outcomes_total", "outcome", "requeued")?, 0.0);
    assert_eq!(with("conejo_failures_total", "failure", "handler")?, 7.0);
    assert_eq!(with("conejo_failures_total", "failure", "decode")?, 1.0);
    assert_eq!(with("conejo_failures_total", "failure", "panic")?, 0.0);
    assert_eq!(with("conejo_failures_total", "failure", "timeout")?, 0.0);
    assert_eq!(with("conejo_failures_total", "failure", "publish")?, 0.0);
    // The copies went through the service's publisher: 3 retry copies and 5 dead letters,
    // each confirmed.
    let published =
        |outcome: &str| sample(&metrics, "conejo_publishes_total", &[("outcome", outcome)]);
    assert_eq!(published("confirmed")?, 8.0);
    assert_eq!(
        published("returned")? + published("nacked")? + published("lost")?,
        0.0
    );
    assert_eq!(sample(&metrics, "conejo_publish_in_flight", &[])?, 0.0);
    assert_eq!(
        sample(&metrics, "conejo_publish_confirm_seconds_count", &[])?,
        8.0
    );
    for (anomaly, value) in [
        ("abandoned", stats.abandoned),
        ("poison", stats.poison),
        ("unsettled", stats.unsettled),
        ("publish_failure", stats.publish_failures),
        ("ack_failure", stats.ack_failures),
        ("late_settlement", stats.late_settlements),
    ] {
        assert_eq!(
            with("conejo_anomalies_total", "anomaly", anomaly)?,
            value as f64,
            "{anomaly}"
        );
    }
    let frames = of("conejo_ack_frames_total")?;
    assert_eq!(frames, stats.ack_frames as f64);
    assert!((1.0..=53.0).contains(&frames), "{frames} ack frames");
    eprintln!("acks per frame: {:.1}", 53.0 / frames);
    assert_eq!(of("conejo_in_flight")?, 0.0);
    assert_eq!(of("conejo_prefetch")?, 20.0);
    assert_eq!(of("conejo_consuming")?, 1.0);
    // Every delivery went through the handler (decoding included): 53 durations.
    assert_eq!(of("conejo_handler_duration_seconds_count")?, 53.0);
    assert_eq!(
        handler.calls.load(Ordering::Relaxed),
        52,
        "decode failures skip it"
    );
    let state = |s: &str| sample(&metrics, "conejo_connection_state", &[("state", s)]);
    assert_eq!(state("connected")?, 1.0);
    assert_eq!(state("reconnecting")?, 0.0);
    assert_eq!(sample(&metrics, "conejo_connection_blocked", &[])?, 0.0);
    assert_eq!(sample(&metrics, "conejo_reconnects_total", &[])?, 0.0);
    for lag in [
        "conejo_connection_runtime_lag_seconds",
        "conejo_handler_runtime_lag_seconds",
    ] {
        let seconds = sample(&metrics, lag, &[])?;
        eprintln!("{lag} {seconds}");
        assert!((0.0..1.0).contains(&seconds), "{lag} {seconds}");
    }
    // No label but `queue` and the fixed kinds: bounded cardinality.
    for (name, labels) in metrics.keys() {
        assert!(name.starts_with("conejo_"), "{name}");
        for key in labels.keys() {
            assert!(
                ["queue", "outcome", "failure", "anomaly", "state", "le"].contains(&key.as_str()),
                "{name} has label {key}"
            );
        }
    }
    assert_eq!(get(address, "/livez").await?.status, 200);
    let ready = get(address, "/readyz").await?;
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));
    service.stop().await??;
    // Stopped with the service (its socket closes on the connection runtime's thread).
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(address, "/livez").await.is_ok() {
        ensure!(
            Instant::now() < deadline,
            "the health server outlived the service"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    scenario.cleanup().await
}

#[tokio::test]
async fn metrics_show_the_active_role_and_the_ordering_gauges() -> anyhow::Result<()> {
    let ordered = Scenario::undeclared("observed-ordered").await?;
    let plain = Scenario::new("observed-plain").await?;
    let (queue, other) = (ordered.queue.as_str(), plain.queue.as_str());
    let conejo = Conejo::builder(amqp_url())
        .queue_with(
            queue,
            MixedOutcomes::default(),
            queue_config()
                .single_active_consumer()
                .ordered_by(conejo::OrderKey::routing_key())
                .poison_limit(None),
        )
        .queue_with(other, MixedOutcomes::default(), queue_config())
        .health_port(0)
        .build()?;
    let address = conejo.health_addr().context("no health address")?;
    let service = RunningService::spawn(conejo);
    ordered
        .broker
        .wait_for_consumer_count(queue, 1, WAIT)
        .await?;
    let active = format!("conejo_active_consumer{{queue=\"{queue}\"}}");
    // Registered, nothing delivered yet: not known to hold the role.
    get_until(address, "/metrics", WAIT, |r| {
        r.body.contains(&format!("{active} 0\n"))
    })
    .await?;
    for n in 1..=5 {
        ordered
            .broker
            .publish_bytes(queue, format!("{n}").as_bytes())
            .await?;
    }
    service.wait_for(queue, WAIT, |s| s.acked == 5).await?;
    let response = get_until(address, "/metrics", WAIT, |r| {
        r.body.contains(&format!("{active} 1\n"))
    })
    .await?;
    let metrics = parse_metrics(&response.body)?;
    let q = [("queue", queue)];
    for gauge in [
        "conejo_ordering_waiting",
        "conejo_ordering_keys_busy",
        "conejo_ordering_oldest_wait_seconds",
    ] {
        assert_eq!(sample(&metrics, gauge, &q)?, 0.0, "{gauge}");
    }
    // Only where they mean something: not on a plain queue.
    for name in ["conejo_active_consumer", "conejo_ordering_waiting"] {
        assert!(
            sample(&metrics, name, &[("queue", other)]).is_err(),
            "{name} on a plain queue"
        );
    }
    assert_eq!(service.stats().queue(other).unwrap().active, None);
    service.stop().await??;
    ordered.cleanup().await?;
    plain.cleanup().await
}

#[tokio::test]
async fn readyz_fails_while_connecting_and_when_the_consumer_is_gone() -> anyhow::Result<()> {
    init_tracing();
    // Nothing listens on port 1: conejo keeps trying, alive and not ready.
    let conejo = Conejo::builder("amqp://guest:guest@127.0.0.1:1/%2f")
        .queue_with("never", MixedOutcomes::default(), queue_config())
        .health_port(0)
        .build()?;
    let address = conejo.health_addr().context("no health address")?;
    let service = RunningService::spawn(conejo);
    let ready = get_until(address, "/readyz", WAIT, |r| {
        r.body.contains("connecting (attempt")
    })
    .await?;
    assert_eq!(ready.status, 503);
    assert!(
        ready.body.contains("queue not consumed: never"),
        "{ready:?}"
    );
    assert_eq!(get(address, "/livez").await?.status, 200);
    service.stop().await??;

    // Consuming, then the queue is deleted: the broker cancels the consumer, and a passive
    // queue cannot be consumed again.
    let scenario = Scenario::new("vanishing").await?;
    let Scenario { broker, queue } = &scenario;
    let conejo = Conejo::builder(amqp_url())
        .queue_with(queue, MixedOutcomes::default(), queue_config().passive())
        .health_port(0)
        .build()?;
    let address = conejo.health_addr().context("no health address")?;
    let service = RunningService::spawn(conejo);
    get_until(address, "/readyz", WAIT, |r| r.status == 200).await?;
    broker.delete_queue(queue).await?;
    let ready = get_until(address, "/readyz", WAIT, |r| r.status == 503).await?;
    assert_eq!(
        ready.body,
        format!("not ready\nqueue not consumed: {queue}\n"),
        "connected, so only the queue is named"
    );
    assert_eq!(get(address, "/livez").await?.status, 200);
    assert!(!service.is_finished());
    scenario.finish(service).await
}

#[tokio::test]
async fn readyz_follows_the_broker_going_away_and_coming_back() -> anyhow::Result<()> {
    init_tracing();
    let mut node = PrivateNode::start("health").await?;
    let broker = Broker::connect_to(&node.amqp_url()).await?;
    let queue = unique_name("health");
    broker.declare_queue(&queue).await?;
    drop(broker);
    let conejo = Conejo::builder(node.amqp_url())
        .queue_with(&queue, MixedOutcomes::default(), queue_config())
        .health_port(0)
        .build()?;
    let address = conejo.health_addr().context("no health address")?;
    let service = RunningService::spawn(conejo);
    get_until(address, "/readyz", WAIT, |r| r.status == 200).await?;
    node.stop().await?;
    let ready = get_until(address, "/readyz", WAIT, |r| r.status == 503).await?;
    assert!(ready.body.contains("connection: "), "{ready:?}");
    // Alive all along: reconnecting is conejo's job, not a reason to restart it.
    assert_eq!(get(address, "/livez").await?.status, 200);
    let metrics = parse_metrics(&get(address, "/metrics").await?.body)?;
    assert_eq!(
        sample(
            &metrics,
            "conejo_connection_state",
            &[("state", "connected")]
        )?,
        0.0
    );
    node.start_again().await?;
    get_until(address, "/readyz", Duration::from_secs(60), |r| {
        r.status == 200
    })
    .await?;
    let metrics = parse_metrics(&get(address, "/metrics").await?.body)?;
    assert_eq!(sample(&metrics, "conejo_reconnects_total", &[])?, 1.0);
    service.stop().await??;
    Ok(())
}

/// Blocks its thread — the mistake of calling blocking code from an async handler.
struct BlocksItsThread;

impl Handler for BlocksItsThread {
    type Message = String;

    async fn handle(&self, _: String, _: &Context) -> Result<(), HandlerError> {
        std::thread::sleep(Duration::from_millis(1500));
        Ok(())
    }
}

#[tokio::test]
async fn a_blocked_handler_runtime_shows_its_lag_and_the_connection_runtime_none()
-> anyhow::Result<()> {
    let scenario = Scenario::new("lag").await?;
    let Scenario { broker, queue } = &scenario;
    // The service's own runtime, with one worker: a handler that blocks blocks it all.
    let handler_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let conejo = Conejo::builder(amqp_url())
        .queue_with(queue, BlocksItsThread, queue_config().concurrency(1))
        .health_port(0)
        .build()?;
    let address = conejo.health_addr().context("no health address")?;
    let stats = conejo.stats();
    let shutdown = conejo.shutdown_handle();
    let run = handler_runtime.spawn(conejo.run_until(std::future::pending()));
    get_until(address, "/readyz", WAIT, |r| r.status == 200).await?;
    let idle_handler_lag = stats.handler_runtime_lag();
    assert!(
        idle_handler_lag < Duration::from_millis(500),
        "{idle_handler_lag:?} before any handler ran"
    );

    for _ in 0..3 {
        broker.publish_bytes(queue, b"block").await?;
    }
    // While the handlers block, from this (other) runtime: the handler runtime's lag rises,
    // the connection runtime's stays low, and the health server (on the connection runtime)
    // answers throughout.
    let deadline = Instant::now() + WAIT;
    let mut worst_connection_lag = Duration::ZERO;
    let mut handler_lag = Duration::ZERO;
    let mut scraped = None;
    while Instant::now() < deadline {
        worst_connection_lag = worst_connection_lag.max(stats.connection_runtime_lag());
        handler_lag = handler_lag.max(stats.handler_runtime_lag());
        if handler_lag >= Duration::from_secs(1) && scraped.is_none() {
            let started = Instant::now();
            let metrics = parse_metrics(&get(address, "/metrics").await?.body)?;
            let livez = get(address, "/livez").await?;
            scraped = Some((
                sample(&metrics, "conejo_handler_runtime_lag_seconds", &[])?,
                sample(&metrics, "conejo_connection_runtime_lag_seconds", &[])?,
                livez.status,
                started.elapsed(),
            ));
        }
        if stats.queue(queue).context("queue")?.acked == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "handler runtime lag {handler_lag:?}, connection runtime lag at worst \
         {worst_connection_lag:?}; scraped while blocked: {scraped:?}"
    );
    ensure!(
        stats.queue(queue).context("queue")?.acked == 3,
        "not all handled"
    );
    assert!(handler_lag >= Duration::from_secs(1), "{handler_lag:?}");
    assert!(
        worst_connection_lag < Duration::from_millis(500),
        "{worst_connection_lag:?}"
    );
    let (scraped_handler, scraped_connection, livez, took) =
        scraped.context("never scraped while blocked")?;
    assert!(scraped_handler >= 1.0, "{scraped_handler}");
    assert!(scraped_connection < 0.5, "{scraped_connection}");
    assert_eq!(livez, 200, "busy handlers do not fail liveness");
    assert!(took < Duration::from_millis(500), "scrape took {took:?}");

    shutdown.shutdown();
    tokio::time::timeout(WAIT, run).await???;
    handler_runtime.shutdown_background();
    scenario.cleanup().await
}

#[tokio::test]
async fn a_health_address_in_use_is_a_startup_error_naming_it() -> anyhow::Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let address = taken.local_addr()?;
    let error = Conejo::builder(amqp_url())
        .queue("q", MixedOutcomes::default())
        .health(address)
        .build()
        .err()
        .context("bound an address in use")?;
    assert!(matches!(error, Error::Health { address: a, .. } if a == address));
    assert!(error.to_string().contains(&address.to_string()), "{error}");
    Ok(())
}

#[tokio::test]
async fn livez_fails_while_the_connection_runtime_is_wedged_and_recovers() -> anyhow::Result<()> {
    let scenario = Scenario::new("wedged").await?;
    let queue = &scenario.queue;
    let conejo = Conejo::builder(amqp_url())
        .queue_with(queue, MixedOutcomes::default(), queue_config())
        .health_port(0)
        .build()?;
    let address = conejo.health_addr().context("no health address")?;
    let wedge = conejo.connection_runtime_wedge();
    let service = RunningService::spawn(conejo);
    get_until(address, "/readyz", WAIT, |r| r.status == 200).await?;
    assert_eq!(get(address, "/livez").await?.status, 200);

    // Blocked for longer than the liveness bound (5 s) and than `get`'s own 5 s timeout:
    // the server runs on that runtime, so the probe gets no answer at all…
    let wedged_for = Duration::from_secs(8);
    ensure!(wedge.wedge(wedged_for), "the connection runtime is not up");
    let wedged_at = Instant::now();
    // (A probe the runtime took before the wedge started is answered at once.)
    loop {
        match get(address, "/livez").await {
            Err(_) => break,
            Ok(answer) => ensure!(
                wedged_at.elapsed() < Duration::from_secs(1),
                "a wedged runtime answered: {answer:?}"
            ),
        }
    }
    // …and once it runs again, the lag it suffered fails liveness for a while.
    let after = get(address, "/livez").await?;
    assert!(wedged_at.elapsed() >= wedged_for);
    assert_eq!(after.status, 503, "{after:?}");
    assert!(after.body.contains("late"), "{after:?}");
    // The lag ages out (it is the worst over the last 2 s): alive again, same connection.
    get_until(address, "/livez", WAIT, |r| r.status == 200).await?;
    assert_eq!(service.status().reconnects(), 0);
    scenario.finish(service).await
}
