//! The broker a test runs against: conejo's in-memory broker, or a real RabbitMQ in live
//! mode, behind one type.

use std::{
    collections::BTreeSet,
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    runtime::{Handle, RuntimeFlavor},
    sync::OnceCell,
};

use super::{Faults, TestError, client::Client};
use crate::{AmqpUrl, Publisher, app::DeclaredNames, broker::memory::Memory};

/// The environment variable [`TestBroker::from_env`] reads: a RabbitMQ URL runs the tests
/// against that broker (live mode); unset, they run against the in-memory broker.
pub const LIVE_URL_ENV: &str = "CONEJO_TEST_AMQP_URL";

/// The URL services get in memory mode: any URL works, the transport ignores it.
const MEMORY_URL: &str = "amqp://guest:guest@conejo-memory:5672/%2f";

/// A broker for tests: conejo's in-memory broker ([`memory`](Self::memory)), or a real
/// RabbitMQ ([`live`](Self::live), [`from_env`](Self::from_env)). Start the service under
/// test on it with its unchanged builder ([`start`](Self::start)), publish to it, read
/// queues back, and — in memory — inject faults ([`faults`](Self::faults)). Cheap to clone.
///
/// **Names.** In live mode tests share a broker, and run in parallel: [`name`](Self::name)
/// makes a name unique to this `TestBroker` (`orders` → `orders-t5f3a…`); in memory it is
/// the name itself. [`cleanup`](Self::cleanup) deletes, in live mode, what was declared
/// under those names.
#[derive(Clone)]
pub struct TestBroker {
    inner: Arc<Inner>,
}

struct Inner {
    /// The in-memory broker; `None` in live mode.
    memory: Option<Memory>,
    /// The URL services connect to, as given.
    url: String,
    /// …parsed.
    parsed: AmqpUrl,
    /// Live mode: what makes this broker's names unique.
    suffix: Option<String>,
    /// The harness's connection, opened on first use.
    client: OnceCell<Client>,
    /// Live mode: what was declared under unique names, for [`TestBroker::cleanup`].
    created: Mutex<Created>,
}

#[derive(Default)]
struct Created {
    queues: BTreeSet<String>,
    exchanges: BTreeSet<String>,
}

impl TestBroker {
    /// A fresh in-memory broker, on the current tokio runtime, on tokio's paused clock: a
    /// retry's 27 s wait or a 30 s timeout passes as soon as nothing else can run. On a
    /// current-thread runtime (`#[tokio::test]`'s) the clock is paused here if it is not
    /// already; on a multi-thread runtime it runs in real time.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    #[must_use]
    pub fn memory() -> Self {
        pause_clock();
        Self::memory_in_real_time()
    }

    /// A fresh in-memory broker on the clock as it is: for tests whose handlers wait on
    /// real I/O (a database), which a paused clock would time out.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    #[must_use]
    pub fn memory_in_real_time() -> Self {
        assert!(
            Handle::try_current().is_ok(),
            "TestBroker::memory needs a tokio runtime (#[tokio::test])"
        );
        TestBroker::new(Some(Memory::new()), MEMORY_URL.to_owned(), None)
            .expect("the memory URL parses")
    }

    /// A real RabbitMQ at `url`. Names from [`name`](Self::name) are unique to this broker.
    /// Do not use it under a paused clock: time would jump while the broker answers.
    ///
    /// # Errors
    /// An invalid URL.
    pub fn live(url: &str) -> Result<Self, crate::Error> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let suffix = format!(
            "t{:x}{:x}{}",
            std::process::id(),
            nanos,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        TestBroker::new(None, url.to_owned(), Some(suffix))
    }

    /// Live mode at the URL in [`LIVE_URL_ENV`] (`CONEJO_TEST_AMQP_URL`) when it is set,
    /// else [`memory`](Self::memory): the same test body runs both ways.
    ///
    /// # Panics
    /// When the variable holds an invalid URL, or (memory) outside a tokio runtime.
    #[must_use]
    pub fn from_env() -> Self {
        match std::env::var(LIVE_URL_ENV) {
            Ok(url) if !url.trim().is_empty() => match TestBroker::live(url.trim()) {
                Ok(broker) => broker,
                Err(error) => panic!("{LIVE_URL_ENV}: {error}"),
            },
            _ => TestBroker::memory(),
        }
    }

    fn new(
        memory: Option<Memory>,
        url: String,
        suffix: Option<String>,
    ) -> Result<Self, crate::Error> {
        let parsed: AmqpUrl = url.parse()?;
        Ok(TestBroker {
            inner: Arc::new(Inner {
                memory,
                url,
                parsed,
                suffix,
                client: OnceCell::new(),
                created: Mutex::new(Created::default()),
            }),
        })
    }

    /// True against a real RabbitMQ.
    #[must_use]
    pub fn is_live(&self) -> bool {
        self.inner.memory.is_none()
    }

    /// The URL to build the service under test with (in memory, any URL works).
    #[must_use]
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// `base`, unique to this broker in live mode (`orders` → `orders-t5f3a…`), itself in
    /// memory.
    #[must_use]
    pub fn name(&self, base: &str) -> String {
        match &self.inner.suffix {
            Some(suffix) => format!("{base}-{suffix}"),
            None => base.to_owned(),
        }
    }

    /// Fault injection, on the in-memory broker; `None` in live mode (where a test that
    /// needs faults should skip, or use a private broker node it controls).
    #[must_use]
    pub fn faults(&self) -> Option<Faults> {
        self.inner.memory.clone().map(Faults::new)
    }

    /// The faults of the in-memory broker, or a clear error in live mode (for a test that
    /// cannot run without them).
    ///
    /// # Errors
    /// [`TestError::Unsupported`](TestError::Unsupported) in live mode.
    pub fn require_faults(&self, test: &str) -> Result<Faults, TestError> {
        self.faults()
            .ok_or_else(|| TestError::Unsupported(test.to_owned()))
    }

    /// A [`Publisher`] on this broker, of the kind an application without consumers uses
    /// ([`Publisher::connect`]).
    ///
    /// # Errors
    /// When it cannot connect.
    pub async fn publisher(&self) -> Result<Publisher, TestError> {
        let builder = Publisher::builder(&self.inner.url);
        let builder = match &self.inner.memory {
            Some(memory) => builder.memory(memory),
            None => builder,
        };
        Ok(builder.connect().await?)
    }

    /// Live mode: deletes the queues and exchanges declared under this broker's unique
    /// names — by the harness and by the services it started (their queues, wait queues,
    /// dead-letter queues and exchanges). Names without the unique suffix are never
    /// touched. In memory, nothing to do.
    ///
    /// # Errors
    /// When the broker refuses a deletion.
    pub async fn cleanup(&self) -> Result<(), TestError> {
        let Some(suffix) = &self.inner.suffix else {
            return Ok(());
        };
        let Created { queues, exchanges } = std::mem::take(&mut *self.created());
        for queue in queues.iter().filter(|q| q.contains(suffix.as_str())) {
            self.delete_queue(queue).await?;
        }
        for exchange in exchanges.iter().filter(|e| e.contains(suffix.as_str())) {
            self.delete_exchange(exchange).await?;
        }
        Ok(())
    }

    pub(crate) fn memory_broker(&self) -> Option<&Memory> {
        self.inner.memory.as_ref()
    }

    /// The harness's connection, opened on first use.
    pub(crate) async fn client(&self) -> Result<&Client, TestError> {
        let memory = self.inner.memory.as_ref();
        self.inner
            .client
            .get_or_try_init(|| Client::connect(memory, &self.inner.parsed))
            .await
    }

    fn created(&self) -> std::sync::MutexGuard<'_, Created> {
        self.inner.created.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn created_queue(&self, name: &str) {
        if self.is_live() {
            self.created().queues.insert(name.to_owned());
        }
    }

    pub(crate) fn created_exchange(&self, name: &str) {
        if self.is_live() {
            self.created().exchanges.insert(name.to_owned());
        }
    }

    pub(crate) fn record(&self, declared: &DeclaredNames) {
        if !self.is_live() {
            return;
        }
        let mut created = self.created();
        let queues = declared
            .consumed
            .iter()
            .chain(&declared.wait_queues)
            .chain(&declared.queues);
        created.queues.extend(queues.cloned());
        created.exchanges.extend(declared.exchanges.iter().cloned());
    }
}

impl fmt::Debug for TestBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestBroker")
            .field("live", &self.is_live())
            .field("url", &self.inner.parsed.redacted())
            .finish_non_exhaustive()
    }
}

/// Pauses tokio's clock on a current-thread runtime, unless it is paused already.
fn pause_clock() {
    let Ok(handle) = Handle::try_current() else {
        panic!("TestBroker::memory needs a tokio runtime (#[tokio::test])");
    };
    if handle.runtime_flavor() != RuntimeFlavor::CurrentThread {
        return;
    }
    // A paused clock does not move while this thread sleeps; a running one does.
    let before = tokio::time::Instant::now();
    std::thread::sleep(Duration::from_millis(1));
    if tokio::time::Instant::now() != before {
        tokio::time::pause();
    }
}
