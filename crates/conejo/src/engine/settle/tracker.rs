//! Which delivery tags of one channel are settled, and how to tell the broker with as few
//! frames as possible. Pure logic: the settle task feeds it and sends what it returns.
//!
//! A channel carries exactly one consumer, so its delivery tags are 1, 2, 3… in delivery
//! order. Acknowledgements are coalesced: when every outstanding tag up to `t` is finished,
//! one `basic.ack(t, multiple = true)` settles them. A tag finished behind a still-running one
//! waits (a `multiple` ack would also ack the running one) until the gap closes or the linger
//! time forces individual acks — the fewest frames the protocol allows. Requeues go out at
//! once, one tag each; a later `multiple` ack does not touch them, since the broker no longer
//! holds them. Nothing is ever settled twice.
//!
//! The state is exact and bounded by the prefetch, whatever the handler latencies: the tags
//! known to be running, and the finished ones not yet acked — never one slot per tag since
//! the oldest running delivery. A flush costs what is pending, not the age of that delivery.

use std::collections::BTreeSet;

/// What to send to the broker, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// `basic.ack`; `count` is how many deliveries it settles.
    Ack {
        tag: u64,
        multiple: bool,
        count: u64,
    },
    /// `basic.nack(requeue = true)`; `count` is how many deliveries it settles.
    Requeue {
        tag: u64,
        multiple: bool,
        count: u64,
    },
}

/// How a delivery ended, as far as the broker is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settlement {
    /// Acknowledge (coalesced).
    Ack,
    /// Give it back at once (`basic.nack(requeue = true)`): shutdown gives back a message it
    /// did not handle, a delivery ended without a result, or its copy could not be published.
    Requeue,
}

/// Why a settlement was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// That tag was already settled.
    Duplicate,
    /// The tracker was closed (shutdown gave the message back, or the channel is gone).
    Closed,
}

/// The settlement state of one channel's deliveries.
#[derive(Debug)]
pub(crate) struct AckTracker {
    /// Every tag below it is settled with the broker.
    low: u64,
    /// The highest tag seen so far; every tag up to it has been delivered.
    seen: u64,
    /// Tags seen to be delivered (a higher tag was settled) but not finished: the running
    /// handlers. At most the prefetch.
    running: BTreeSet<u64>,
    /// Tags finished with an ack not sent yet, in arrival order (sorted at flush). At most
    /// the prefetch.
    pending: Vec<u64>,
    /// Set by [`AckTracker::abandon`] or [`AckTracker::close`]: every later settlement is
    /// refused.
    closed: bool,
}

impl AckTracker {
    /// A tracker for a fresh channel (first delivery tag is 1).
    pub(crate) fn new() -> Self {
        AckTracker {
            low: 1,
            seen: 0,
            running: BTreeSet::new(),
            pending: Vec::new(),
            closed: false,
        }
    }

    /// Acks finished but not yet sent.
    pub(crate) fn pending_acks(&self) -> usize {
        self.pending.len()
    }

    /// When acks are held behind a running delivery (what [`flush(false)`](Self::flush)
    /// leaves): the oldest running tag, and how many tags were delivered after it.
    pub(crate) fn blocker(&self) -> Option<(u64, u64)> {
        if self.pending.is_empty() {
            return None;
        }
        let first = self.running.first().copied()?;
        Some((first, self.seen - first))
    }

    /// How many deliveries delivered after the oldest running one have finished (settled,
    /// acked or not): how many of its successors it has outlived.
    pub(crate) fn outlived(&self) -> u64 {
        match self.running.first() {
            Some(&first) => (self.seen - first) - (self.running.len() as u64 - 1),
            None => 0,
        }
    }

    /// Records a finished delivery. Acks are held for [`flush`](Self::flush); a requeue is
    /// returned to be sent now.
    pub(crate) fn settle(&mut self, tag: u64, how: Settlement) -> Result<Option<Action>, Refused> {
        if self.closed {
            return Err(Refused::Closed);
        }
        if tag < self.low || tag == 0 {
            return Err(Refused::Duplicate);
        }
        if tag > self.seen {
            // Every tag between was delivered before this one: those handlers still run.
            self.running.extend(self.seen.max(self.low - 1) + 1..tag);
            self.seen = tag;
        } else if !self.running.remove(&tag) {
            return Err(Refused::Duplicate);
        }
        Ok(match how {
            Settlement::Ack => {
                self.pending.push(tag);
                None
            }
            Settlement::Requeue => {
                self.advance();
                Some(Action::Requeue {
                    tag,
                    multiple: false,
                    count: 1,
                })
            }
        })
    }

    /// The acks to send now: one `multiple` ack for the finished tags below the oldest
    /// running one, and — when `force` (the linger time is up) — single acks for the tags
    /// finished behind it.
    pub(crate) fn flush(&mut self, force: bool) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.pending.is_empty() {
            return actions;
        }
        self.pending.sort_unstable();
        let first_running = self.first_running();
        let below = self.pending.partition_point(|&tag| tag < first_running);
        if below > 0 {
            actions.push(Action::Ack {
                tag: self.pending[below - 1],
                multiple: below > 1,
                count: below as u64,
            });
        }
        if force {
            actions.extend(self.pending[below..].iter().map(|&tag| Action::Ack {
                tag,
                multiple: false,
                count: 1,
            }));
            self.pending.clear();
        } else {
            self.pending.drain(..below);
        }
        self.advance();
        actions
    }

    /// Shutdown deadline passed: sends every finished ack, then gives back (requeues) every
    /// delivery up to `last_delivered` that is still unfinished, and refuses all later
    /// settlements (a handler finishing after this must not ack a message the broker has
    /// already requeued).
    pub(crate) fn abandon(&mut self, last_delivered: u64) -> Vec<Action> {
        let mut actions = self.flush(true);
        self.closed = true;
        let unseen = last_delivered.saturating_sub(self.seen.max(self.low - 1));
        let count = self.running.len() as u64 + unseen;
        // The highest unsettled tag: a tag the broker still holds, as `multiple` requires.
        let highest = if unseen > 0 {
            Some(last_delivered)
        } else {
            self.running.last().copied()
        };
        if let Some(tag) = highest {
            actions.push(Action::Requeue {
                tag,
                multiple: count > 1,
                count,
            });
        }
        self.running.clear();
        self.low = self.low.max(last_delivered + 1);
        self.seen = self.seen.max(last_delivered);
        actions
    }

    /// Closes the tracker: the channel is gone, nothing more can be settled.
    pub(crate) fn close(&mut self) {
        self.closed = true;
    }

    /// The oldest tag not finished: a running one, or the next to come.
    fn first_running(&self) -> u64 {
        self.running.first().copied().unwrap_or(self.seen + 1)
    }

    /// Moves `low` up to the oldest tag the broker may still hold unsettled.
    fn advance(&mut self) {
        let oldest_pending = self.pending.iter().copied().min();
        let first_running = self.first_running();
        self.low = oldest_pending.map_or(first_running, |p| p.min(first_running));
    }

    /// Bookkeeping size, for the memory tests.
    #[cfg(test)]
    fn footprint(&self) -> usize {
        self.running.len() + self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Settlement::*;

    fn ack(tag: u64, multiple: bool, count: u64) -> Action {
        Action::Ack {
            tag,
            multiple,
            count,
        }
    }

    #[test]
    fn contiguous_acks_coalesce() {
        let mut t = AckTracker::new();
        for tag in [2, 1, 3] {
            assert_eq!(t.settle(tag, Ack), Ok(None));
        }
        assert_eq!(t.pending_acks(), 3);
        assert_eq!(t.flush(false), vec![ack(3, true, 3)]);
        assert_eq!(t.pending_acks(), 0);
        assert_eq!(t.flush(true), vec![]);
        assert_eq!(t.settle(4, Ack), Ok(None));
        assert_eq!(t.flush(false), vec![ack(4, false, 1)]);
    }

    #[test]
    fn a_running_delivery_holds_back_later_acks_until_forced() {
        let mut t = AckTracker::new();
        t.settle(1, Ack).unwrap();
        t.settle(3, Ack).unwrap();
        t.settle(4, Ack).unwrap();
        // 2 is still running: only 1 can go
        assert_eq!(t.flush(false), vec![ack(1, false, 1)]);
        assert_eq!(t.pending_acks(), 2);
        assert_eq!(t.flush(false), vec![]);
        // linger time up: 3 and 4 go one by one, 2 stays open
        assert_eq!(t.flush(true), vec![ack(3, false, 1), ack(4, false, 1)]);
        t.settle(2, Ack).unwrap();
        assert_eq!(t.flush(false), vec![ack(2, false, 1)]);
        assert_eq!(t.footprint(), 0);
        assert_eq!(t.low, 5);
    }

    #[test]
    fn the_blocker_is_the_oldest_running_tag_behind_held_acks() {
        let mut t = AckTracker::new();
        assert_eq!(t.blocker(), None);
        t.settle(1, Ack).unwrap();
        assert_eq!(t.blocker(), None, "nothing runs");
        t.settle(4, Ack).unwrap(); // 2 and 3 still run
        assert_eq!(t.flush(false), vec![ack(1, false, 1)]);
        // 4 is held behind 2, which has seen 2 later deliveries (3 and 4)
        assert_eq!(t.blocker(), Some((2, 2)));
        t.flush(true);
        assert_eq!(t.blocker(), None, "nothing held");
    }

    #[test]
    fn the_oldest_running_tag_outlives_what_finished_after_it() {
        let mut t = AckTracker::new();
        assert_eq!(t.outlived(), 0);
        for tag in [2, 4, 5] {
            t.settle(tag, Ack).unwrap(); // 1 and 3 still run
        }
        assert_eq!(t.outlived(), 3, "2, 4 and 5 finished after 1");
        t.flush(true);
        assert_eq!(t.outlived(), 3, "sent or not, they finished");
        t.settle(1, Ack).unwrap();
        assert_eq!(
            t.outlived(),
            2,
            "3 is the oldest now: 4 and 5 finished after it"
        );
        t.settle(3, Ack).unwrap();
        assert_eq!(t.outlived(), 0, "nothing runs");
    }

    #[test]
    fn requeues_go_at_once_and_are_skipped_by_multiple() {
        let requeue = |tag| Action::Requeue {
            tag,
            multiple: false,
            count: 1,
        };
        let mut t = AckTracker::new();
        t.settle(1, Ack).unwrap();
        assert_eq!(t.settle(2, Requeue), Ok(Some(requeue(2))));
        t.settle(3, Ack).unwrap();
        assert_eq!(t.settle(4, Requeue), Ok(Some(requeue(4))));
        // 1..=4 all settled: one multiple ack up to the last *acked* tag (3), a tag the
        // broker still holds
        assert_eq!(t.flush(false), vec![ack(3, true, 2)]);
        assert_eq!(t.low, 5);
    }

    #[test]
    fn nothing_is_settled_twice() {
        let mut t = AckTracker::new();
        t.settle(1, Ack).unwrap();
        assert_eq!(t.settle(1, Ack), Err(Refused::Duplicate));
        assert_eq!(t.settle(1, Requeue), Err(Refused::Duplicate));
        t.flush(false);
        assert_eq!(t.settle(1, Ack), Err(Refused::Duplicate));
        t.settle(3, Requeue).unwrap();
        assert_eq!(t.settle(3, Ack), Err(Refused::Duplicate));
    }

    #[test]
    fn abandon_acks_the_finished_and_requeues_the_rest() {
        let mut t = AckTracker::new();
        t.settle(1, Ack).unwrap();
        t.settle(3, Ack).unwrap();
        // 2 and 4 still running, 5 and 6 delivered but never settled
        let actions = t.abandon(6);
        assert_eq!(
            actions,
            vec![
                ack(1, false, 1),
                ack(3, false, 1),
                Action::Requeue {
                    tag: 6,
                    multiple: true,
                    count: 4,
                }
            ]
        );
        // a handler finishing late must not ack what the broker requeued
        assert_eq!(t.settle(2, Ack), Err(Refused::Closed));
    }

    #[test]
    fn abandon_with_everything_settled_sends_no_requeue() {
        let mut t = AckTracker::new();
        t.settle(1, Ack).unwrap();
        t.settle(2, Requeue).unwrap();
        assert_eq!(t.abandon(2), vec![ack(1, false, 1)]);
    }

    #[test]
    fn abandon_targets_an_open_tag() {
        let mut t = AckTracker::new();
        t.settle(2, Ack).unwrap();
        t.settle(3, Requeue).unwrap();
        // 1 is open, 2 acked-pending (held back), 3 requeued: requeue only 1
        let actions = t.abandon(3);
        assert_eq!(
            actions,
            vec![
                ack(2, false, 1),
                Action::Requeue {
                    tag: 1,
                    multiple: false,
                    count: 1,
                }
            ]
        );
    }

    #[test]
    fn random_orders_settle_every_tag_exactly_once() {
        // A small deterministic generator: no extra dependency for a property test.
        let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let n = 1 + next() % 60;
            let mut tags: Vec<u64> = (1..=n).collect();
            for i in (1..tags.len()).rev() {
                tags.swap(i, (next() % (i as u64 + 1)) as usize);
            }
            let mut t = AckTracker::new();
            let mut settled = vec![0u32; n as usize + 1];
            let mut apply = |actions: &[Action], outstanding: &mut Vec<u64>| {
                for action in actions {
                    let (tag, multiple) = match *action {
                        Action::Ack { tag, multiple, .. }
                        | Action::Requeue { tag, multiple, .. } => (tag, multiple),
                    };
                    // the broker's rule: the tag must be outstanding
                    assert!(outstanding.contains(&tag), "tag {tag} not outstanding");
                    let covered: Vec<u64> = if multiple {
                        outstanding.iter().copied().filter(|&o| o <= tag).collect()
                    } else {
                        vec![tag]
                    };
                    outstanding.retain(|o| !covered.contains(o));
                    for c in covered {
                        settled[c as usize] += 1;
                    }
                }
            };
            let mut outstanding: Vec<u64> = (1..=n).collect();
            for (i, &tag) in tags.iter().enumerate() {
                let how = if next() % 5 == 0 { Requeue } else { Ack };
                if let Some(action) = t.settle(tag, how).unwrap() {
                    apply(&[action], &mut outstanding);
                }
                if i % 3 == 0 {
                    let forced = next() % 4 == 0;
                    apply(&t.flush(forced), &mut outstanding);
                }
            }
            apply(&t.flush(true), &mut outstanding);
            assert!(outstanding.is_empty(), "left outstanding: {outstanding:?}");
            assert!(settled[1..].iter().all(|&s| s == 1), "{settled:?}");
        }
    }

    /// A broker that delivers only while fewer than `prefetch` tags are outstanding, handlers
    /// that finish in random order — one of them never — and a tracker that must stay within
    /// the prefetch, never ack a tag before it finished, and settle each exactly once.
    #[test]
    fn memory_stays_within_the_prefetch_behind_a_delivery_that_never_finishes() {
        let mut seed = 0xD1B5_4A32_D192_ED03_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..20 {
            let prefetch = 1 + (next() % 64) as usize;
            let total = 10_000u64;
            let stuck = 1 + next() % 50; // this delivery's handler never returns
            let mut t = AckTracker::new();
            let mut outstanding = std::collections::BTreeSet::new(); // broker side
            let mut running: Vec<u64> = Vec::new(); // handlers side
            let mut finished_ok = std::collections::BTreeSet::new();
            let mut settled = vec![0u32; total as usize + 1];
            let mut delivered = 0u64;
            let mut frames = 0usize;
            let mut apply = |actions: Vec<Action>,
                             outstanding: &mut std::collections::BTreeSet<u64>,
                             finished_ok: &std::collections::BTreeSet<u64>,
                             frames: &mut usize| {
                for action in actions {
                    *frames += 1;
                    let (tag, multiple, ack) = match action {
                        Action::Ack { tag, multiple, .. } => (tag, multiple, true),
                        Action::Requeue { tag, multiple, .. } => (tag, multiple, false),
                    };
                    assert!(outstanding.contains(&tag), "tag {tag} not outstanding");
                    let covered: Vec<u64> = if multiple {
                        outstanding.range(..=tag).copied().collect()
                    } else {
                        vec![tag]
                    };
                    for c in covered {
                        if ack {
                            assert!(finished_ok.contains(&c), "tag {c} acked before it finished");
                        }
                        outstanding.remove(&c);
                        settled[c as usize] += 1;
                    }
                }
            };
            while delivered < total || running.len() > 1 {
                // the broker pushes while the window has room
                while delivered < total && outstanding.len() < prefetch {
                    delivered += 1;
                    outstanding.insert(delivered);
                    running.push(delivered);
                }
                // a random handler (never the stuck one) finishes
                let candidates: Vec<usize> = (0..running.len())
                    .filter(|&i| running[i] != stuck)
                    .collect();
                if candidates.is_empty() {
                    // nothing running but finished acks waiting: the linger time forces them
                    apply(t.flush(true), &mut outstanding, &finished_ok, &mut frames);
                    if delivered < total && outstanding.len() < prefetch {
                        continue;
                    }
                    break;
                }
                let i = candidates[(next() % candidates.len() as u64) as usize];
                let tag = running.swap_remove(i);
                let how = if next() % 50 == 0 { Requeue } else { Ack };
                if how == Ack {
                    finished_ok.insert(tag);
                }
                if let Some(action) = t.settle(tag, how).unwrap() {
                    apply(vec![action], &mut outstanding, &finished_ok, &mut frames);
                }
                assert!(
                    t.footprint() <= prefetch,
                    "round {round}: {} > {prefetch}",
                    t.footprint()
                );
                if next() % 4 == 0 {
                    let forced = next() % 3 == 0;
                    apply(t.flush(forced), &mut outstanding, &finished_ok, &mut frames);
                }
            }
            apply(t.flush(true), &mut outstanding, &finished_ok, &mut frames);
            // only the stuck one is left; shutdown gives it back
            assert_eq!(
                outstanding.iter().copied().collect::<Vec<_>>(),
                vec![stuck],
                "round {round}, prefetch {prefetch}, delivered {delivered}"
            );
            apply(
                t.abandon(delivered),
                &mut outstanding,
                &finished_ok,
                &mut frames,
            );
            assert!(outstanding.is_empty());
            // (with a prefetch of 1 the stuck delivery holds the whole window: the broker
            // delivers nothing more, as it should)
            let delivered_tags = &settled[1..=delivered as usize];
            assert!(delivered_tags.iter().all(|&n| n == 1), "round {round}");
            assert_eq!(t.settle(stuck, Ack), Err(Refused::Closed));
        }
    }

    #[test]
    fn a_flush_behind_a_running_delivery_costs_what_is_pending() {
        // tag 1 runs for ever; 2..=100_000 finish in order, flushed every 64
        let mut t = AckTracker::new();
        let mut acked = 0u64;
        for tag in 2..=100_000u64 {
            t.settle(tag, Ack).unwrap();
            if tag % 64 == 0 {
                let actions = t.flush(true);
                assert!(actions.len() <= 64);
                acked += actions.len() as u64;
                // the running delivery is the only thing remembered
                assert_eq!(t.footprint(), 1);
            }
        }
        acked += t.flush(true).len() as u64;
        assert_eq!(acked, 99_999);
        // once it finishes, it is acked alone
        t.settle(1, Ack).unwrap();
        assert_eq!(t.flush(false), vec![ack(1, false, 1)]);
        assert_eq!(t.footprint(), 0);
    }
}
