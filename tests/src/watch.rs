//! Recording, over time, which broker connection carries a `connection_name`.

use crate::rabbitmqctl::{find_connections, pick};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default interval between two polls of a [`ConnectionWatch`].
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_millis(300);

/// One poll of a [`ConnectionWatch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    /// When the poll's `rabbitmqctl` call returned.
    pub at: Instant,
    /// `at` relative to the start of the watch.
    pub since_start: Duration,
    /// The broker-side name (e.g. `"127.0.0.1:54321 -> 127.0.0.1:5672"`) of the
    /// connection carrying the watched `connection_name`, `None` if absent.
    /// When several match, a `"running"` one is preferred.
    pub connection: Option<String>,
    /// How many broker connections carried the watched name (normally 0 or 1).
    pub matches: usize,
}

/// Everything a [`ConnectionWatch`] recorded.
#[derive(Clone, Debug, Default)]
pub struct WatchReport {
    /// Successful polls, in order.
    pub observations: Vec<Observation>,
    /// Failed polls (`rabbitmqctl` errors), as time since start and message.
    /// They are not observations: a failed poll says nothing about presence.
    pub errors: Vec<(Duration, String)>,
}

/// A background `std::thread` polling the broker (via `rabbitmqctl`) for the
/// connection named `connection_name`, every [`DEFAULT_WATCH_INTERVAL`] (or
/// the interval given), until stopped, dropped, or `max_duration` elapsed.
///
/// A `rabbitmqctl` call takes ~0.3 s itself, so with the default interval the
/// polls are back to back. Polls are on a fixed schedule; a slow call is not
/// followed by a catch-up burst.
#[derive(Debug)]
pub struct ConnectionWatch {
    connection_name: String,
    stop_tx: Option<mpsc::Sender<()>>,
    handle: Option<JoinHandle<()>>,
    report: Arc<Mutex<WatchReport>>,
}

impl ConnectionWatch {
    /// Starts watching `connection_name` every [`DEFAULT_WATCH_INTERVAL`], for
    /// at most `max_duration`. The first poll happens immediately.
    pub fn start(connection_name: &str, max_duration: Duration) -> ConnectionWatch {
        Self::start_with_interval(connection_name, max_duration, DEFAULT_WATCH_INTERVAL)
    }

    /// Like [`ConnectionWatch::start`] with a custom poll interval.
    ///
    /// # Panics
    ///
    /// If the OS refuses to spawn the polling thread.
    pub fn start_with_interval(
        connection_name: &str,
        max_duration: Duration,
        interval: Duration,
    ) -> ConnectionWatch {
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let report = Arc::new(Mutex::new(WatchReport::default()));
        let name = connection_name.to_owned();
        let thread_report = Arc::clone(&report);
        let handle = std::thread::Builder::new()
            .name(format!("conn-watch-{connection_name}"))
            .spawn(move || poll_loop(&name, max_duration, interval, &stop_rx, &thread_report))
            .expect("failed to spawn the ConnectionWatch thread");
        ConnectionWatch {
            connection_name: connection_name.to_owned(),
            stop_tx: Some(stop_tx),
            handle: Some(handle),
            report,
        }
    }

    /// The watched `connection_name`.
    pub fn connection_name(&self) -> &str {
        &self.connection_name
    }

    /// A copy of the observations recorded so far (the watch keeps running).
    pub fn snapshot(&self) -> Vec<Observation> {
        lock(&self.report).observations.clone()
    }

    /// Whether the polling thread has ended (stopped or `max_duration` elapsed).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the watch (waiting for an in-flight poll to finish) and returns
    /// every observation, in order.
    pub fn stop(self) -> Vec<Observation> {
        self.stop_report().observations
    }

    /// Stops the watch and returns the observations and failed polls.
    pub fn stop_report(mut self) -> WatchReport {
        self.stop_tx.take();
        if let Some(handle) = self.handle.take()
            && let Err(panic) = handle.join()
        {
            std::panic::resume_unwind(panic);
        }
        std::mem::take(&mut *lock(&self.report))
    }
}

impl Drop for ConnectionWatch {
    fn drop(&mut self) {
        // Dropping the sender wakes the thread, which exits after any in-flight
        // poll; it is not joined here so that dropping never blocks.
        self.stop_tx.take();
    }
}

fn lock(report: &Mutex<WatchReport>) -> std::sync::MutexGuard<'_, WatchReport> {
    report.lock().unwrap_or_else(PoisonError::into_inner)
}

fn poll_loop(
    name: &str,
    max_duration: Duration,
    interval: Duration,
    stop_rx: &mpsc::Receiver<()>,
    report: &Mutex<WatchReport>,
) {
    let start = Instant::now();
    let end = start + max_duration;
    let mut next = start;
    loop {
        let result = find_connections(name);
        let at = Instant::now();
        let since_start = at - start;
        match result {
            Ok(matching) => {
                let matches = matching.len();
                let connection = pick(matching).map(|c| c.name);
                lock(report).observations.push(Observation {
                    at,
                    since_start,
                    connection,
                    matches,
                });
            }
            Err(err) => {
                tracing::warn!(
                    connection_name = name,
                    "ConnectionWatch poll failed: {err:#}"
                );
                lock(report).errors.push((since_start, format!("{err:#}")));
            }
        }
        next += interval;
        let now = Instant::now();
        if next < now {
            // The call overran the interval: skip missed ticks, poll right away.
            next = now;
        }
        if next >= end {
            return;
        }
        match stop_rx.recv_timeout(next - now) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// `Ok(broker-side name)` if every observation saw the same single connection
/// present; otherwise `Err` describing the first problem: no observations, an
/// absence, a change of broker-side connection (a reconnect), or several
/// connections carrying the name at once.
pub fn always_same_connection(observations: &[Observation]) -> Result<String, String> {
    let Some(first) = observations.first() else {
        return Err("no observations were recorded".to_owned());
    };
    let Some(expected) = first.connection.clone() else {
        return Err(format!(
            "connection absent at the first observation (t={:?})",
            first.since_start
        ));
    };
    for (i, obs) in observations.iter().enumerate() {
        match &obs.connection {
            None => {
                return Err(format!(
                    "connection {expected:?} absent at observation #{i} (t={:?})",
                    obs.since_start
                ));
            }
            Some(name) if *name != expected => {
                return Err(format!(
                    "connection changed from {expected:?} to {name:?} at observation #{i} (t={:?})",
                    obs.since_start
                ));
            }
            Some(_) if obs.matches > 1 => {
                return Err(format!(
                    "{} broker connections carried the name at observation #{i} (t={:?}), \
                     expected only {expected:?}",
                    obs.matches, obs.since_start
                ));
            }
            Some(_) => {}
        }
    }
    Ok(expected)
}

/// The time since the start of the watch ([`Observation::since_start`]) of
/// the first observation that found the connection absent after at least one
/// observation had found it present; `None` if it never disappeared (or was
/// never seen).
pub fn first_absence_after_presence(observations: &[Observation]) -> Option<Duration> {
    let first_present = observations.iter().position(|o| o.connection.is_some())?;
    observations[first_present..]
        .iter()
        .find(|o| o.connection.is_none())
        .map(|o| o.since_start)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(secs: u64, conn: Option<&str>) -> Observation {
        Observation {
            at: Instant::now(),
            since_start: Duration::from_secs(secs),
            connection: conn.map(str::to_owned),
            matches: usize::from(conn.is_some()),
        }
    }

    #[test]
    fn same_connection() {
        let o = [obs(0, Some("a")), obs(1, Some("a"))];
        assert_eq!(always_same_connection(&o), Ok("a".to_owned()));
        assert_eq!(first_absence_after_presence(&o), None);
    }

    #[test]
    fn change_absence_and_empty() {
        assert!(always_same_connection(&[]).is_err());
        let changed = [obs(0, Some("a")), obs(1, Some("b"))];
        let err = always_same_connection(&changed).unwrap_err();
        assert!(err.contains("changed") && err.contains("\"b\""), "{err}");
        let gone = [obs(0, Some("a")), obs(1, None), obs(2, Some("b"))];
        assert!(
            always_same_connection(&gone)
                .unwrap_err()
                .contains("absent")
        );
        assert_eq!(
            first_absence_after_presence(&gone),
            Some(Duration::from_secs(1))
        );
        let late = [
            obs(0, None),
            obs(1, Some("a")),
            obs(2, Some("a")),
            obs(3, None),
        ];
        assert_eq!(
            first_absence_after_presence(&late),
            Some(Duration::from_secs(3))
        );
        assert!(always_same_connection(&late).is_err());
        assert_eq!(first_absence_after_presence(&[obs(0, None)]), None);
        let mut dup = obs(0, Some("a"));
        dup.matches = 2;
        assert!(
            always_same_connection(&[dup])
                .unwrap_err()
                .contains("2 broker")
        );
    }
}
