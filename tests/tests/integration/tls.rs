//! TLS: conejo against a private RabbitMQ node with a TLS listener that asks for a client
//! certificate (`verify_peer`, `fail_if_no_peer_cert`). A throwaway PKI (two CAs, a server
//! certificate for `127.0.0.1`, a client certificate) is made by the `openssl` CLI in a
//! temporary directory at test time.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use conejo::{Conejo, Error, TlsConfig};
use conejo_tests::{
    Broker, NodeOptions, PrivateNode, RunningService, TlsListener, init_tracing, unique_name,
};

use crate::handlers::AcksEverything;

/// The client certificate's CN: the user SASL EXTERNAL logs in as.
const CLIENT_CN: &str = "conejo-client";

/// A throwaway PKI in a temporary directory, removed on drop.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new() -> anyhow::Result<Pki> {
        let dir = std::env::temp_dir().join(unique_name("conejo-pki"));
        std::fs::create_dir_all(&dir)?;
        let pki = Pki { dir };
        for ca in ["ca", "other-ca"] {
            pki.openssl(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=conejo test {ca}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ])?;
        }
        pki.leaf(
            "server",
            "localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )?;
        pki.leaf("client", CLIENT_CN, "extendedKeyUsage=clientAuth\n")?;
        Ok(pki)
    }

    /// A key and a certificate signed by `ca`.
    fn leaf(&self, name: &str, cn: &str, extensions: &str) -> anyhow::Result<()> {
        std::fs::write(
            self.dir.join(format!("{name}.ext")),
            format!("basicConstraints=CA:FALSE\n{extensions}"),
        )?;
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ])?;
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ])
    }

    fn openssl(&self, args: &[&str]) -> anyhow::Result<()> {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .context("cannot run the openssl CLI (apt-get install openssl)")?;
        ensure!(
            output.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn listener(&self) -> TlsListener {
        TlsListener {
            ca_file: self.path("ca.pem"),
            cert_file: self.path("server.pem"),
            key_file: self.path("server.key"),
        }
    }

    /// The right CA and the client certificate.
    fn client(&self) -> TlsConfig {
        TlsConfig::new()
            .ca_file(self.path("ca.pem"))
            .client_cert(self.path("client.pem"), self.path("client.key"))
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn tls_node(pki: &Pki, options: NodeOptions) -> anyhow::Result<(PrivateNode, u16)> {
    let options = NodeOptions {
        tls: Some(pki.listener()),
        ..options
    };
    let node = PrivateNode::start_with_options("tls", &options).await?;
    let port = node.amqps_port().context("the node has no TLS listener")?;
    Ok((node, port))
}

/// Publishes one message on the node's plain listener, runs `conejo` until it acked it, and
/// returns the running service.
async fn consume_one(
    node: &PrivateNode,
    queue: &str,
    service: RunningService,
) -> anyhow::Result<RunningService> {
    let broker = Broker::connect_to(&node.amqp_url()).await?;
    // conejo declares the queue (durable, dead-lettered): wait until it consumes.
    broker
        .wait_for_consumer_count(queue, 1, Duration::from_secs(20))
        .await?;
    let before = service.stats().queue(queue).map_or(0, |s| s.acked);
    broker.publish_bytes(queue, b"over tls").await?;
    service
        .wait_for(queue, Duration::from_secs(20), |s| s.acked > before)
        .await?;
    broker
        .wait_for_count(queue, 0, Duration::from_secs(5))
        .await?;
    broker.close().await?;
    Ok(service)
}

/// How the service's `run` ended, within 20 s.
async fn failure(conejo: Conejo) -> anyhow::Result<(Error, Duration)> {
    let started = Instant::now();
    let service = RunningService::spawn(conejo);
    let result = service.join(Duration::from_secs(20)).await?;
    let error = result
        .err()
        .context("run succeeded against a refusing broker")?;
    Ok((error, started.elapsed()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_consumes_acks_reconnects_and_refuses_bad_certificates() -> anyhow::Result<()> {
    init_tracing();
    let pki = Pki::new()?;
    let (node, port) = tls_node(&pki, NodeOptions::default()).await?;
    let url = format!("amqps://guest:guest@127.0.0.1:{port}/%2f");
    let queue = unique_name("tls.mutual");

    // The right CA and a client certificate: a message consumed and acked over TLS.
    let conejo = Conejo::builder(&url)
        .tls(pki.client())
        .connection_name("conejo-tls-test")
        .queue(&queue, AcksEverything)
        .build()?;
    let shown = format!("{conejo:?}");
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    let service = RunningService::spawn(conejo);
    let service = consume_one(&node, &queue, service).await?;
    let connections = node
        .rabbitmqctl(&["-q", "list_connections", "name", "ssl", "peer_cert_subject"])
        .await?;
    println!("connections: {connections}");
    // The consumer's connection (the test publishes through the plain listener).
    assert!(
        connections
            .lines()
            .any(|l| l.contains("\ttrue\t") && l.contains(&format!("CN={CLIENT_CN}"))),
        "{connections}"
    );

    // The broker drops the connection: conejo reconnects with the same TLS material.
    node.close_all_connections().await?;
    let service = consume_one(&node, &queue, service).await?;
    println!("status after reconnection: {:?}", service.status().state());
    service.stop().await??;

    // A CA that did not sign the broker's certificate: refused at once, and said so.
    let conejo = Conejo::builder(&url)
        .tls(
            TlsConfig::new()
                .ca_file(pki.path("other-ca.pem"))
                .client_cert(pki.path("client.pem"), pki.path("client.key")),
        )
        .queue(&queue, AcksEverything)
        .build()?;
    let (error, took) = failure(conejo).await?;
    println!("wrong CA ({took:?}): {error}");
    assert!(error.is_refused(), "{error:?}");
    let text = error.to_string();
    assert!(text.contains("invalid peer certificate"), "{text}");
    assert!(text.contains("UnknownIssuer"), "{text}");
    assert!(!text.contains("guest:guest"), "{text}");

    // The right CA, no client certificate: the broker refuses it. Under TLS 1.3 the client's
    // handshake completes before the broker checks its certificate; the broker then sends the
    // `certificate_required` alert and closes, and the client sees either that alert or — when
    // the close resets the socket first — a plain connection reset (both seen here). So each
    // attempt fails, but only the alert is recognisable as a refusal.
    let mut alerts = 0;
    for attempt in 1..=5 {
        let conejo = Conejo::builder(&url)
            .tls(TlsConfig::new().ca_file(pki.path("ca.pem")))
            .wait_for_broker(false)
            .queue(&queue, AcksEverything)
            .build()?;
        let (error, took) = failure(conejo).await?;
        println!("no client certificate, attempt {attempt} ({took:?}): {error}");
        let text = error.to_string();
        if text.contains("CertificateRequired") {
            assert!(error.is_refused(), "{error:?}");
            alerts += 1;
        } else {
            assert!(text.contains("Connection reset by peer"), "{error:?}");
            assert!(!error.is_refused(), "{error:?}");
        }
    }
    println!("no client certificate: {alerts} of 5 attempts saw the alert");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_auth_logs_in_as_the_certificate() -> anyhow::Result<()> {
    init_tracing();
    let pki = Pki::new()?;
    let options = NodeOptions {
        plugins: vec!["rabbitmq_auth_mechanism_ssl".to_owned()],
        config: "auth_mechanisms.1 = EXTERNAL\n\
                 auth_mechanisms.2 = PLAIN\n\
                 auth_mechanisms.3 = AMQPLAIN\n\
                 ssl_cert_login_from = common_name\n"
            .to_owned(),
        ..NodeOptions::default()
    };
    let (node, port) = tls_node(&pki, options).await?;
    // The user exists, has no password, and may use vhost `/`.
    node.rabbitmqctl(&["add_user", CLIENT_CN, "unused-password"])
        .await?;
    node.rabbitmqctl(&["clear_password", CLIENT_CN]).await?;
    node.rabbitmqctl(&["set_permissions", "-p", "/", CLIENT_CN, ".*", ".*", ".*"])
        .await?;
    let queue = unique_name("tls.external");

    // No user nor password in the URL.
    let conejo = Conejo::builder(format!("amqps://127.0.0.1:{port}/%2f"))
        .tls(pki.client().external_auth())
        .connection_name("conejo-tls-external")
        .queue(&queue, AcksEverything)
        .build()?;
    let service = RunningService::spawn(conejo);
    let service = consume_one(&node, &queue, service).await?;
    let connections = node
        .rabbitmqctl(&["-q", "list_connections", "name", "user", "auth_mechanism"])
        .await?;
    println!("connections: {connections}");
    assert!(
        connections
            .lines()
            .any(|l| l.ends_with(&format!("\t{CLIENT_CN}\tEXTERNAL"))),
        "{connections}"
    );
    service.stop().await??;
    Ok(())
}

/// Bad TLS files fail in `build()`, naming the setting and the file, never quoting a key.
#[test]
fn build_checks_the_tls_files() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let build = |config: TlsConfig| {
        Conejo::builder("amqps://u:pw@127.0.0.1:5671/%2f")
            .tls(config)
            .queue("q", AcksEverything)
            .build()
            .map(|_| ())
    };
    let key = std::fs::read_to_string(pki.path("client.key"))?;
    let key_body = key.lines().nth(1).context("key file too short")?;
    let check = |result: Result<(), Error>, expected: &[&str]| -> anyhow::Result<()> {
        let error = result.err().context("build() accepted a bad TLS file")?;
        let shown = format!("{error} {error:?}");
        println!("{error}");
        ensure!(matches!(error, Error::InvalidConfig { .. }), "{shown}");
        for part in expected {
            ensure!(shown.contains(part), "{part:?} missing from: {shown}");
        }
        ensure!(!shown.contains(key_body), "the key leaked: {shown}");
        Ok(())
    };
    let missing = pki.path("missing.pem");
    let missing_shown = missing.display().to_string();
    check(
        build(TlsConfig::new().ca_file(&missing)),
        &["ca_file", &missing_shown, "cannot read"],
    )?;
    // A key where a CA was expected.
    let key_path = pki.path("client.key").display().to_string();
    check(
        build(TlsConfig::new().ca_file(pki.path("client.key"))),
        &["ca_file", &key_path, "no PEM CERTIFICATE"],
    )?;
    // A certificate where the key was expected.
    let cert_path = pki.path("client.pem").display().to_string();
    check(
        build(TlsConfig::new().client_cert(pki.path("client.pem"), pki.path("client.pem"))),
        &[
            "client_cert (key)",
            &cert_path,
            "no unencrypted PEM private key",
        ],
    )?;
    // The server's key with the client's certificate.
    check(
        build(TlsConfig::new().client_cert(pki.path("client.pem"), pki.path("server.key"))),
        &["client_cert", &cert_path, "server.key"],
    )?;
    check(
        build(TlsConfig::new().client_cert(pki.path("client.pem"), &missing)),
        &["client_cert (key)", &missing_shown, "cannot read"],
    )?;
    // The good files pass, and `Debug` shows paths, not keys.
    build(pki.client().external_auth())?;
    let shown = format!(
        "{:?}",
        Conejo::builder("amqps://127.0.0.1:5671/%2f")
            .tls(pki.client())
            .queue("q", AcksEverything)
            .build()?
    );
    assert!(
        !shown.contains(key_body) && !shown.contains("PRIVATE"),
        "{shown}"
    );
    assert!(shown.contains("client.pem"), "{shown}");
    Ok(())
}
