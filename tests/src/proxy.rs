//! A TCP proxy between a client and a broker, to inject network faults: a stall (connections
//! stay open, no byte moves), a cut (every connection closed at once), refused connections.
//!
//! Why it is ~670 lines: the proxy's accept loop, its per-connection pumps, the fault
//! switches and the tests of each, which share one state machine.

use anyhow::{Context, anyhow, bail};
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// How long a proxied connection waits for the target to accept it before the client's side
/// is reset.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Upper bound of the synchronous controls ([`TcpProxy::cut`], [`TcpProxy::refuse`],
/// [`TcpProxy::accept`]) waiting for the proxy's thread to have done it (normally well under a
/// millisecond).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);

/// How long dropping the proxy waits for its thread to finish.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

/// Forwarding buffer per direction and connection.
const BUFFER: usize = 16 * 1024;

/// Whether a [`TcpProxy`] forwards bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// Bytes are forwarded both ways.
    Pass,
    /// Connections stay open but no byte is forwarded either way (nothing is read, so nothing
    /// is lost: it stays in the sockets' buffers until [`ProxyMode::Pass`] again).
    Stall,
}

/// A TCP proxy on `127.0.0.1:<ephemeral port>` forwarding every connection to a target address,
/// with fault controls: [`TcpProxy::stall`] / [`TcpProxy::pass`], [`TcpProxy::cut`],
/// [`TcpProxy::refuse`] / [`TcpProxy::accept`].
///
/// It runs on a thread of its own with its own current-thread tokio runtime, not on the
/// caller's runtime: conejo's tests deliberately block every worker of a runtime (handlers that
/// hog their thread) and bind lapin to runtimes of their choosing, and a proxy sharing such a
/// runtime would stall whenever the code under test does — a fault the test did not ask for. Its
/// own thread also makes it usable from synchronous code and from any runtime, and the controls
/// synchronous: when [`TcpProxy::cut`] returns, the connections are closed.
///
/// A connection counts (see [`TcpProxy::connections`]) from the moment both its client and its
/// target side are connected until both are closed. If the target refuses or does not answer
/// within 5 s, the client's connection is reset.
///
/// Dropping the proxy closes its listener and every connection (with a FIN) and ends its thread.
pub struct TcpProxy {
    addr: SocketAddr,
    target: SocketAddr,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    finished: std_mpsc::Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

/// State shared by the handle and the proxy's thread.
#[derive(Debug)]
struct Shared {
    mode: watch::Sender<ProxyMode>,
    /// The latest cut's number: connections opened before it are closed.
    cut: watch::Sender<u64>,
    connections: Mutex<Connections>,
    /// Notified whenever a connection is closed.
    closed: Condvar,
}

#[derive(Debug, Default)]
struct Connections {
    /// The number of the latest cut.
    epoch: u64,
    next_id: u64,
    /// Open connections: id → the cut epoch at their opening.
    open: HashMap<u64, u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Connections> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Removes a connection from the count (and wakes up [`TcpProxy::cut`]) when dropped, even if
/// its task is cancelled.
struct Registration {
    shared: Arc<Shared>,
    id: u64,
    epoch: u64,
}

impl Registration {
    fn new(shared: &Arc<Shared>) -> Registration {
        let mut connections = shared.lock();
        let id = connections.next_id;
        connections.next_id += 1;
        let epoch = connections.epoch;
        connections.open.insert(id, epoch);
        Registration {
            shared: Arc::clone(shared),
            id,
            epoch,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.lock().open.remove(&self.id);
        self.shared.closed.notify_all();
    }
}

#[derive(Debug)]
enum Command {
    Refuse(std_mpsc::SyncSender<()>),
    Accept(std_mpsc::SyncSender<io::Result<()>>),
}

impl fmt::Debug for TcpProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpProxy")
            .field("addr", &self.addr)
            .field("target", &self.target)
            .field("mode", &self.mode())
            .field("connections", &self.connections())
            .finish()
    }
}

impl TcpProxy {
    /// Starts a proxy to `target` on `127.0.0.1:<ephemeral port>`, in [`ProxyMode::Pass`] and
    /// accepting connections. The listener is bound when this returns. Needs no tokio runtime.
    pub fn start(target: SocketAddr) -> anyhow::Result<TcpProxy> {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("failed to bind the proxy's listener on 127.0.0.1")?;
        listener
            .set_nonblocking(true)
            .context("failed to make the proxy's listener non-blocking")?;
        let addr = listener
            .local_addr()
            .context("the proxy's listener has no address")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .context("failed to build the proxy's runtime")?;
        let listener = {
            let _entered = runtime.enter();
            TcpListener::from_std(listener).context("failed to register the proxy's listener")?
        };
        let shared = Arc::new(Shared {
            mode: watch::Sender::new(ProxyMode::Pass),
            cut: watch::Sender::new(0),
            connections: Mutex::new(Connections::default()),
            closed: Condvar::new(),
        });
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (finished_tx, finished) = std_mpsc::channel();
        let task_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("tcp-proxy-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(serve_listener(
                    Some(listener),
                    addr,
                    target,
                    task_shared,
                    command_rx,
                ));
                // Cancels the connection tasks: their sockets are closed.
                runtime.shutdown_timeout(Duration::from_secs(1));
                let _ = finished_tx.send(());
            })
            .context("failed to spawn the proxy's thread")?;
        Ok(TcpProxy {
            addr,
            target,
            shared,
            commands,
            finished,
            thread: Some(thread),
        })
    }

    /// Starts a proxy to the host and port of the AMQP URL `url` (`amqp://…` default port 5672,
    /// `amqps://…` 5671; an IPv4 address is preferred when the host resolves to several). Use
    /// [`TcpProxy::url`] to connect through it.
    pub fn start_for_url(url: &str) -> anyhow::Result<TcpProxy> {
        let parts = UrlParts::parse(url)?;
        let host = parts.host.trim_start_matches('[').trim_end_matches(']');
        let host = if host.is_empty() { "localhost" } else { host };
        let addrs: Vec<SocketAddr> = (host, parts.port)
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve {host}:{}", parts.port))?
            .collect();
        let target = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| addrs.first())
            .copied()
            .ok_or_else(|| anyhow!("{host}:{} resolves to no address", parts.port))?;
        Self::start(target)
    }

    /// The proxy's own address (`127.0.0.1:<port>`): connect here instead of to the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the proxy forwards to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// `amqp_url` with its `host[:port]` replaced by the proxy's `127.0.0.1:<port>`; scheme,
    /// credentials, vhost and query (e.g. `?heartbeat=1`) are kept.
    pub fn url(&self, amqp_url: &str) -> anyhow::Result<String> {
        rewrite_url(amqp_url, self.addr)
    }

    /// The current mode.
    pub fn mode(&self) -> ProxyMode {
        *self.shared.mode.borrow()
    }

    /// Forwards bytes again (after [`TcpProxy::stall`]); what was held back flows on.
    pub fn pass(&self) {
        self.shared.mode.send_replace(ProxyMode::Pass);
    }

    /// Stops forwarding bytes in both directions while keeping every connection open, as a
    /// network that silently drops everything would: heartbeats stop getting through, so each
    /// side eventually gives up on its peer. New connections are still accepted and connected
    /// to the target, but stalled too. Effective within microseconds (a chunk being written at
    /// that moment is completed).
    pub fn stall(&self) {
        self.shared.mode.send_replace(ProxyMode::Stall);
    }

    /// Closes every current connection at once, on both sides, with a TCP reset (as a broken
    /// network path or a crashed middlebox would: no AMQP close handshake, no FIN). New
    /// connections are still accepted (unless [`TcpProxy::refuse`]d). Returns how many
    /// connections were cut, once they are closed (it blocks the calling thread for at most
    /// 2 s, normally much less than a millisecond — safe on a runtime, since the work is done
    /// by the proxy's thread).
    pub fn cut(&self) -> usize {
        // Counted before the cut is announced: the proxy's thread may close them at once.
        let (epoch, cut) = {
            let mut connections = self.shared.lock();
            connections.epoch += 1;
            (connections.epoch, connections.open.len())
        };
        self.shared.cut.send_replace(epoch);
        let deadline = Instant::now() + CONTROL_TIMEOUT;
        let mut connections = self.shared.lock();
        while connections.open.values().any(|e| *e < epoch) {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                tracing::warn!(proxy = %self.addr, "connections still open {CONTROL_TIMEOUT:?} after a cut");
                break;
            };
            connections = self
                .shared
                .closed
                .wait_timeout(connections, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        cut
    }

    /// Stops accepting connections: the listening socket is closed, so connecting gets
    /// "connection refused" at once, as with a broker that is down. Current connections are
    /// not affected (see [`TcpProxy::cut`]). Returns once the listener is closed.
    pub fn refuse(&self) -> anyhow::Result<()> {
        let (reply, done) = std_mpsc::sync_channel(1);
        self.command(Command::Refuse(reply))?;
        done.recv_timeout(CONTROL_TIMEOUT)
            .map_err(|_| anyhow!("the proxy's thread did not close the listener"))
    }

    /// Accepts connections again after [`TcpProxy::refuse`], on the same address (the port is
    /// bound again; this fails in the unlikely case another socket took it meanwhile). Returns
    /// once the listener is bound.
    pub fn accept(&self) -> anyhow::Result<()> {
        let (reply, done) = std_mpsc::sync_channel(1);
        self.command(Command::Accept(reply))?;
        done.recv_timeout(CONTROL_TIMEOUT)
            .map_err(|_| anyhow!("the proxy's thread did not reopen the listener"))?
            .with_context(|| format!("failed to bind {} again", self.addr))
    }

    fn command(&self, command: Command) -> anyhow::Result<()> {
        self.commands
            .send(command)
            .map_err(|_| anyhow!("the proxy's thread has stopped"))
    }

    /// How many proxied connections are open (client and target side both connected).
    pub fn connections(&self) -> usize {
        self.shared.lock().open.len()
    }

    /// Polls [`TcpProxy::connections`] every 10 ms until it equals `expected`; errors after
    /// `timeout` with the last count.
    pub async fn wait_for_connections(
        &self,
        expected: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.connections();
            if now == expected {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "proxy {}: expected {expected} connections within {timeout:?}, last seen {now}",
                    self.addr
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        // Closing the command channel ends the accept loop, then the thread's runtime.
        let (closed, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.commands, closed));
        if self.finished.recv_timeout(SHUTDOWN_TIMEOUT).is_ok()
            && let Some(thread) = self.thread.take()
        {
            let _ = thread.join();
        }
    }
}

/// The accept loop, until the [`TcpProxy`] is dropped.
async fn serve_listener(
    mut listener: Option<TcpListener>,
    addr: SocketAddr,
    target: SocketAddr,
    shared: Arc<Shared>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    enum Event {
        Command(Option<Command>),
        Accepted(io::Result<(TcpStream, SocketAddr)>),
    }
    loop {
        let event = tokio::select! {
            command = commands.recv() => Event::Command(command),
            accepted = accept(listener.as_ref()) => Event::Accepted(accepted),
        };
        match event {
            Event::Command(None) => return,
            Event::Command(Some(Command::Refuse(reply))) => {
                listener = None;
                let _ = reply.send(());
            }
            Event::Command(Some(Command::Accept(reply))) => {
                let result = match listener {
                    Some(_) => Ok(()),
                    None => TcpListener::bind(addr).await.map(|l| listener = Some(l)),
                };
                let _ = reply.send(result);
            }
            Event::Accepted(Ok((client, _))) => {
                tokio::spawn(serve_connection(client, target, Arc::clone(&shared)));
            }
            Event::Accepted(Err(err)) => {
                // E.g. out of file descriptors: do not spin.
                tracing::warn!(proxy = %addr, "accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn accept(listener: Option<&TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Forwards one connection until either side closes it, an error, or a cut.
async fn serve_connection(mut client: TcpStream, target: SocketAddr, shared: Arc<Shared>) {
    let mut upstream =
        match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(target)).await {
            Ok(Ok(upstream)) => upstream,
            Ok(Err(err)) => {
                tracing::debug!(%target, "proxy could not connect: {err}");
                let _ = client.set_zero_linger();
                return;
            }
            Err(_) => {
                tracing::debug!(%target, "proxy timed out connecting");
                let _ = client.set_zero_linger();
                return;
            }
        };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let registration = Registration::new(&shared);
    let mut cut_rx = shared.cut.subscribe();
    let cut = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let forward = async {
            tokio::try_join!(
                pump(client_read, upstream_write, shared.mode.subscribe()),
                pump(upstream_read, client_write, shared.mode.subscribe()),
            )
        };
        tokio::select! {
            result = forward => {
                tracing::debug!(%target, ?result, "proxied connection ended");
                false
            }
            () = cut_after(&mut cut_rx, registration.epoch) => true,
        }
    };
    if cut {
        // Closing with SO_LINGER 0 sends a reset instead of a FIN.
        let _ = client.set_zero_linger();
        let _ = upstream.set_zero_linger();
    }
    drop(client);
    drop(upstream);
    // Counted as closed only now that both sockets are.
    drop(registration);
}

/// Resolves once a cut newer than `epoch` is announced.
async fn cut_after(cut: &mut watch::Receiver<u64>, epoch: u64) {
    loop {
        if *cut.borrow_and_update() > epoch {
            return;
        }
        if cut.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Copies `from` to `to` while the mode is [`ProxyMode::Pass`]; at end-of-file, shuts `to`'s
/// write side down (half-close) and returns.
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mut mode: watch::Receiver<ProxyMode>,
) -> io::Result<()> {
    let mut buffer = vec![0u8; BUFFER];
    loop {
        wait_for_mode(&mut mode, ProxyMode::Pass).await;
        let read = tokio::select! {
            read = from.read(&mut buffer) => read?,
            // Stalled while waiting for bytes: stop reading (`read` is cancel-safe).
            () = wait_for_mode(&mut mode, ProxyMode::Stall) => continue,
        };
        if read == 0 {
            to.shutdown().await?;
            return Ok(());
        }
        // Bytes read just before a stall are held back too.
        wait_for_mode(&mut mode, ProxyMode::Pass).await;
        to.write_all(&buffer[..read]).await?;
    }
}

/// Resolves once the mode is `wanted` (never, should the handle be gone).
async fn wait_for_mode(mode: &mut watch::Receiver<ProxyMode>, wanted: ProxyMode) {
    loop {
        if *mode.borrow_and_update() == wanted {
            return;
        }
        if mode.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// The pieces of `scheme://[userinfo@]host[:port][/path][?query]`.
#[derive(Debug, PartialEq, Eq)]
struct UrlParts<'a> {
    /// Everything up to and including `@` (or `scheme://` when there are no credentials).
    prefix: &'a str,
    /// The host as written (an IPv6 literal keeps its brackets).
    host: &'a str,
    /// The explicit port, or the scheme's default.
    port: u16,
    /// Everything from the first `/`, `?` or `#` after the authority.
    suffix: &'a str,
}

impl<'a> UrlParts<'a> {
    fn parse(url: &'a str) -> anyhow::Result<UrlParts<'a>> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| anyhow!("not an AMQP URL (no `://`): {url}"))?;
        let default_port = match scheme.to_ascii_lowercase().as_str() {
            "amqp" => 5672,
            "amqps" => 5671,
            _ => bail!("not an AMQP URL (scheme {scheme:?}): {url}"),
        };
        let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, suffix) = rest.split_at(authority_len);
        let host_start = authority.rfind('@').map_or(0, |at| at + 1);
        let host_port = &authority[host_start..];
        let prefix = &url[..scheme.len() + 3 + host_start];
        let (host, port) = if host_port.starts_with('[') {
            let close = host_port
                .find(']')
                .ok_or_else(|| anyhow!("unclosed IPv6 literal in {url}"))?;
            let (host, after) = host_port.split_at(close + 1);
            (host, after.strip_prefix(':'))
        } else {
            match host_port.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (host_port, None),
            }
        };
        let port = match port {
            Some(port) => port
                .parse()
                .with_context(|| format!("bad port {port:?} in {url}"))?,
            None => default_port,
        };
        Ok(UrlParts {
            prefix,
            host,
            port,
            suffix,
        })
    }
}

fn rewrite_url(url: &str, addr: SocketAddr) -> anyhow::Result<String> {
    let parts = UrlParts::parse(url)?;
    Ok(format!("{}{addr}{}", parts.prefix, parts.suffix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_amqp_urls() {
        let p = UrlParts::parse("amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=1").unwrap();
        assert_eq!(p.prefix, "amqp://guest:guest@");
        assert_eq!((p.host, p.port), ("127.0.0.1", 5672));
        assert_eq!(p.suffix, "/%2f?heartbeat=1");

        let p = UrlParts::parse("AMQPS://localhost").unwrap();
        assert_eq!(
            (p.prefix, p.host, p.port, p.suffix),
            ("AMQPS://", "localhost", 5671, "")
        );

        let p = UrlParts::parse("amqp://u:p@w@[::1]:5999?x=1").unwrap();
        assert_eq!((p.prefix, p.host, p.port), ("amqp://u:p@w@", "[::1]", 5999));
        assert_eq!(p.suffix, "?x=1");

        assert!(UrlParts::parse("http://x").is_err());
        assert!(UrlParts::parse("localhost:5672").is_err());
        assert!(UrlParts::parse("amqp://h:notaport/").is_err());
        assert!(UrlParts::parse("amqp://[::1/").is_err());
    }

    #[test]
    fn rewrites_host_and_port_only() {
        let proxy: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        assert_eq!(
            rewrite_url(
                "amqp://guest:guest@broker.example:5672/%2f?heartbeat=1",
                proxy
            )
            .unwrap(),
            "amqp://guest:guest@127.0.0.1:40001/%2f?heartbeat=1"
        );
        assert_eq!(
            rewrite_url("amqp://localhost", proxy).unwrap(),
            "amqp://127.0.0.1:40001"
        );
    }

    #[test]
    fn forwards_cuts_and_refuses_without_a_runtime() {
        use std::io::{Read, Write};
        // An echo server on a plain thread.
        let echo = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let target = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in echo.incoming() {
                let Ok(mut stream) = stream else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 || stream.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let proxy = TcpProxy::start(target).unwrap();
        let timeout = Some(Duration::from_secs(5));
        let mut client = std::net::TcpStream::connect(proxy.addr()).unwrap();
        client.set_read_timeout(timeout).unwrap();
        client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        assert_eq!(proxy.connections(), 1);

        // Stalled: nothing comes back; after pass, it does.
        proxy.stall();
        client.write_all(b"pong").unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let err = client.read(&mut buf).unwrap_err();
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{err}"
        );
        proxy.pass();
        client.set_read_timeout(timeout).unwrap();
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");

        // Cut: the client sees a reset (or end of file) right away.
        assert_eq!(proxy.cut(), 1);
        assert_eq!(proxy.connections(), 0);
        match client.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("read {n} bytes after a cut"),
            Err(err) => assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}"),
        }

        // Refused, then accepted again on the same port.
        proxy.refuse().unwrap();
        let err = std::net::TcpStream::connect(proxy.addr()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
        proxy.accept().unwrap();
        let mut again = std::net::TcpStream::connect(proxy.addr()).unwrap();
        again.set_read_timeout(timeout).unwrap();
        again.write_all(b"back").unwrap();
        again.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"back");
        drop(proxy);
        // The proxy's end of `again` was closed with it.
        assert_eq!(again.read(&mut buf).unwrap_or(0), 0);
    }
}
