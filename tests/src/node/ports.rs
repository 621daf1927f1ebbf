//! The block of loopback ports each private node reserves for its whole life.

use anyhow::{Context, bail};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// A reserved block of [`PortBlock::SIZE`] consecutive loopback ports: AMQP, distribution, the
/// CLI tools' distribution range, and AMQPS (used only by a node with a TLS listener). Released
/// (for this process) when dropped.
#[derive(Debug)]
pub(super) struct PortBlock {
    /// The block's first port (the AMQP listener's); the others follow it, so one number both
    /// names the block in [`RESERVED_BLOCKS`] and gives every port.
    base: u16,
}

/// Blocks handed out by this process and not yet released.
static RESERVED_BLOCKS: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

impl PortBlock {
    /// AMQP, distribution, six CLI distribution ports, AMQPS.
    const SIZE: u16 = 9;
    /// First port of the first block.
    const LOW: u16 = 20_000;
    /// Blocks end below Linux's default ephemeral range (32768–60999), so an outgoing
    /// connection's local port never takes a stopped node's port.
    const HIGH: u16 = 32_768;

    /// Reserves a block whose ports are all free, starting the search at a pid-derived block so
    /// that concurrent test processes rarely look at the same ports.
    pub(super) fn reserve() -> anyhow::Result<PortBlock> {
        static CALLS: AtomicU64 = AtomicU64::new(0);
        let blocks = u64::from((Self::HIGH - Self::LOW) / Self::SIZE);
        let start = u64::from(std::process::id()) * 7919 + CALLS.fetch_add(1, Ordering::Relaxed);
        let mut reserved = RESERVED_BLOCKS
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for k in 0..blocks {
            let index = u16::try_from((start + k) % blocks).context("port block index")?;
            let base = Self::LOW + index * Self::SIZE;
            if reserved.contains(&base) {
                continue;
            }
            if (base..base + Self::SIZE).all(port_is_free) {
                reserved.insert(base);
                return Ok(PortBlock { base });
            }
        }
        bail!(
            "no block of {} free ports between {} and {}",
            Self::SIZE,
            Self::LOW,
            Self::HIGH
        )
    }

    /// The AMQP listener's port.
    pub(super) fn amqp(&self) -> u16 {
        self.base
    }

    /// The Erlang distribution port.
    pub(super) fn dist(&self) -> u16 {
        self.base + 1
    }

    /// The first port of the CLI tools' distribution range.
    pub(super) fn cli_min(&self) -> u16 {
        self.base + 2
    }

    /// The last port of the CLI tools' distribution range.
    pub(super) fn cli_max(&self) -> u16 {
        self.base + Self::SIZE - 2
    }

    /// The TLS listener's port (bound only by a node started with one).
    pub(super) fn amqps(&self) -> u16 {
        self.base + Self::SIZE - 1
    }
}

impl Drop for PortBlock {
    fn drop(&mut self) {
        RESERVED_BLOCKS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.base);
    }
}

/// Whether `port` can be bound on loopback now.
fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_blocks_are_distinct_and_free_when_released() {
        let a = PortBlock::reserve().unwrap();
        let b = PortBlock::reserve().unwrap();
        assert_ne!(a.base, b.base);
        assert!(a.base >= PortBlock::LOW && a.amqps() < PortBlock::HIGH);
        assert_eq!(a.amqps() - a.amqp() + 1, PortBlock::SIZE);
        assert!(a.cli_min() < a.cli_max() && a.cli_max() < a.amqps());
        let base = a.base;
        drop(a);
        assert!(!RESERVED_BLOCKS.lock().unwrap().contains(&base));
    }
}
