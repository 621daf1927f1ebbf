//! Which delivery tags of one channel are settled, and how to tell the broker with as few
//! frames as possible. Pure logic: the settle task feeds it and sends what it returns.
//!
//! A channel carries exactly one consumer, so its delivery tags are 1, 2, 3… in delivery
//! order. Acknowledgements are coalesced: when tags `low..=t` are all finished, one
//! `basic.ack(t, multiple = true)` settles them. A tag finished behind a still-running one
//! waits (it cannot be covered by `multiple` without also acking the running one) until the
//! gap closes or the linger time forces individual acks. Requeues go out at once, one tag
//! each; a later `multiple` ack does not touch them, since the broker no longer holds them.
//! Nothing is ever settled twice.

use std::collections::VecDeque;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Delivered (or not yet seen), not finished.
    Open,
    /// Finished with an ack that is not sent yet.
    AckPending,
    /// Settled with the broker.
    Done,
}

/// The settlement state of one channel's deliveries.
#[derive(Debug)]
pub(crate) struct AckTracker {
    /// Every tag below it is settled with the broker; `window[0]` is this tag.
    low: u64,
    /// States of tags `low, low + 1, …`; never longer than the prefetch window.
    window: VecDeque<Slot>,
    /// Number of `AckPending` slots.
    pending: usize,
    /// Set by [`AckTracker::abandon`]: every later settlement is refused.
    closed: bool,
}

impl AckTracker {
    /// A tracker for a fresh channel (first delivery tag is 1).
    pub(crate) fn new() -> Self {
        AckTracker {
            low: 1,
            window: VecDeque::new(),
            pending: 0,
            closed: false,
        }
    }

    /// Acks finished but not yet sent.
    pub(crate) fn pending_acks(&self) -> usize {
        self.pending
    }

    /// Records a finished delivery. Acks are held for [`flush`](Self::flush); a requeue is
    /// returned to be sent now.
    pub(crate) fn settle(&mut self, tag: u64, how: Settlement) -> Result<Option<Action>, Refused> {
        if self.closed {
            return Err(Refused::Closed);
        }
        if tag < self.low {
            return Err(Refused::Duplicate);
        }
        let index = usize::try_from(tag - self.low).map_err(|_| Refused::Duplicate)?;
        if index >= self.window.len() {
            self.window.resize(index + 1, Slot::Open);
        }
        if self.window[index] != Slot::Open {
            return Err(Refused::Duplicate);
        }
        let action = match how {
            Settlement::Ack => {
                self.window[index] = Slot::AckPending;
                self.pending += 1;
                None
            }
            Settlement::Requeue => {
                self.window[index] = Slot::Done;
                Some(Action::Requeue {
                    tag,
                    multiple: false,
                    count: 1,
                })
            }
        };
        self.trim_done();
        Ok(action)
    }

    /// The acks to send now: one `multiple` ack for the finished prefix, and — when `force`
    /// (the linger time is up) — single acks for tags finished behind an unfinished one.
    pub(crate) fn flush(&mut self, force: bool) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut last_acked = None;
        let mut count = 0;
        while let Some(&front) = self.window.front() {
            match front {
                Slot::Open => break,
                Slot::AckPending => {
                    last_acked = Some(self.low);
                    count += 1;
                }
                Slot::Done => {}
            }
            self.window.pop_front();
            self.low += 1;
        }
        self.pending -= count as usize;
        if let Some(tag) = last_acked {
            actions.push(Action::Ack {
                tag,
                multiple: count > 1,
                count,
            });
        }
        if force && self.pending > 0 {
            for (offset, slot) in self.window.iter_mut().enumerate() {
                if *slot == Slot::AckPending {
                    *slot = Slot::Done;
                    actions.push(Action::Ack {
                        tag: self.low + offset as u64,
                        multiple: false,
                        count: 1,
                    });
                }
            }
            self.pending = 0;
        }
        self.trim_done();
        actions
    }

    /// Shutdown deadline passed: sends every finished ack, then gives back (requeues) every
    /// delivery up to `last_delivered` that is still unfinished, and refuses all later
    /// settlements (a handler finishing after this must not ack a message the broker has
    /// already requeued).
    pub(crate) fn abandon(&mut self, last_delivered: u64) -> Vec<Action> {
        let mut actions = self.flush(true);
        self.closed = true;
        let beyond_window = self.low + self.window.len() as u64;
        let unseen = last_delivered.saturating_sub(beyond_window.saturating_sub(1));
        let mut open_in_window = self
            .window
            .iter()
            .enumerate()
            .filter(|(offset, slot)| {
                **slot == Slot::Open && self.low + (*offset as u64) <= last_delivered
            })
            .map(|(offset, _)| self.low + offset as u64);
        let count = open_in_window.clone().count() as u64 + unseen;
        // The highest unsettled tag: a tag the broker still holds, as `multiple` requires.
        let highest = if unseen > 0 {
            Some(last_delivered)
        } else {
            open_in_window.next_back()
        };
        if let Some(tag) = highest {
            actions.push(Action::Requeue {
                tag,
                multiple: count > 1,
                count,
            });
        }
        self.window.clear();
        self.low = self.low.max(last_delivered + 1);
        actions
    }

    /// Closes the tracker: the channel is gone, nothing more can be settled.
    pub(crate) fn close(&mut self) {
        self.closed = true;
    }

    /// Drops settled tags at the front, so the window starts at an unsettled one.
    fn trim_done(&mut self) {
        while self.window.front() == Some(&Slot::Done) {
            self.window.pop_front();
            self.low += 1;
        }
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
        assert!(t.window.is_empty());
        assert_eq!(t.low, 5);
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
}
