//! What the harness reads of the in-memory broker: its connections, and whether anything
//! is still pending for the service under test.

use super::{Memory, state};

impl Memory {
    /// The names of the open connections.
    pub(crate) fn connections(&self) -> Vec<String> {
        self.with_state(|state| {
            let mut names: Vec<String> = state
                .connections
                .values()
                .filter(|c| c.open)
                .map(|c| c.name.clone())
                .collect();
            names.sort();
            names
        })
    }

    /// What keeps the broker busy for the service under test, if anything: deliveries not
    /// yet settled, messages ready in queues with consumers, messages waiting to expire,
    /// publishes held by an alarm or a withheld confirm. What the harness's own connection
    /// holds does not count.
    pub(crate) fn busy(&self) -> Option<String> {
        self.with_state(|state| {
            let mut busy = Vec::new();
            let exempt = |channel: &state::ChanId| state.is_exempt_channel(*channel);
            let unacked: usize = state
                .channels
                .iter()
                .filter(|(id, c)| c.open && !exempt(id))
                .map(|(_, c)| c.unacked.len())
                .sum();
            if unacked > 0 {
                busy.push(format!("{unacked} deliveries unsettled"));
            }
            let mut names: Vec<&String> = state.queues.keys().collect();
            names.sort();
            for name in names {
                let queue = &state.queues[name];
                let consumed = queue.consumers.iter().any(|(channel, _)| !exempt(channel));
                if consumed && !queue.ready.is_empty() {
                    busy.push(format!("{} ready in '{name}'", queue.ready.len()));
                }
                let expiring = queue.ready.iter().filter(|m| m.expires.is_some()).count();
                if expiring > 0 {
                    busy.push(format!("{expiring} waiting to expire in '{name}'"));
                }
            }
            if !state.parked.is_empty() {
                busy.push(format!("{} publishes held by an alarm", state.parked.len()));
            }
            if !state.withheld.is_empty() {
                busy.push(format!("{} confirms withheld", state.withheld.len()));
            }
            (!busy.is_empty()).then(|| busy.join(", "))
        })
    }
}
