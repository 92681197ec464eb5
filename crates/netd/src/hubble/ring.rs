//! The flow ring buffer: the last `capacity` flows (and lost-event notices) in arrival order, each
//! with a sequence number, so that a follower can tell exactly how many it missed when it fell
//! behind and the entries it had not read were overwritten.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use sigil_proto::flow as fpb;
use tokio::sync::watch;

/// One entry: a flow, or a notice that events were lost before they became flows.
// Items live behind an `Arc` in the ring, so the size difference costs nothing per notice.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// A flow.
    Flow(fpb::Flow),
    /// Events lost before this point.
    Lost(fpb::LostEvent),
}

/// An entry as stored: its sequence number, its time (Unix nanoseconds) and the item.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Increases by one per entry, from 1.
    pub seq: u64,
    /// When the event happened (flows) or was noticed (lost events), Unix nanoseconds.
    pub time_ns: i64,
    /// The flow or the notice.
    pub item: Arc<Item>,
}

/// What a reader gets after a sequence number: how many entries it missed, and the ones still held.
#[derive(Debug, Default)]
pub struct ReadAfter {
    /// Entries overwritten before this read reached them.
    pub missed: u64,
    /// The entries after the given sequence number, oldest first.
    pub entries: Vec<Entry>,
}

struct Inner {
    buf: VecDeque<Entry>,
    flows: usize,
}

/// A bounded ring of flows shared by the event reader (one writer) and the API (many readers).
///
/// The lock is held only to push or to clone `Arc`s out, never across an `.await`.
pub struct FlowRing {
    inner: Mutex<Inner>,
    capacity: usize,
    seen_flows: AtomicU64,
    last_seq: watch::Sender<u64>,
}

impl FlowRing {
    /// A ring holding at most `capacity` entries (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            inner: Mutex::new(Inner {
                buf: VecDeque::with_capacity(capacity.min(1 << 16)),
                flows: 0,
            }),
            capacity,
            seen_flows: AtomicU64::new(0),
            last_seq: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a consistent deque (push and pop are each
        // complete), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `item` observed at `time_ns`, overwriting the oldest entry when full.
    pub fn push(&self, time_ns: i64, item: Item) -> u64 {
        let is_flow = matches!(item, Item::Flow(_));
        let seq = {
            let mut g = self.lock();
            let seq = g
                .buf
                .back()
                .map_or(*self.last_seq.borrow() + 1, |e| e.seq + 1);
            if g.buf.len() == self.capacity
                && let Some(old) = g.buf.pop_front()
                && matches!(*old.item, Item::Flow(_))
            {
                g.flows -= 1;
            }
            if is_flow {
                g.flows += 1;
            }
            g.buf.push_back(Entry {
                seq,
                time_ns,
                item: Arc::new(item),
            });
            seq
        };
        if is_flow {
            self.seen_flows.fetch_add(1, Ordering::Relaxed);
        }
        self.last_seq.send_replace(seq);
        seq
    }

    /// Every entry held, oldest first, and the sequence number of the newest (0 when none ever).
    pub fn entries(&self) -> (Vec<Entry>, u64) {
        let g = self.lock();
        let last = g.buf.back().map_or(*self.last_seq.borrow(), |e| e.seq);
        (g.buf.iter().cloned().collect(), last)
    }

    /// The entries after `seq`, and how many after it were already overwritten.
    pub fn read_after(&self, seq: u64) -> ReadAfter {
        let g = self.lock();
        let Some(oldest) = g.buf.front().map(|e| e.seq) else {
            return ReadAfter::default();
        };
        let missed = oldest.saturating_sub(seq + 1);
        let skip = usize::try_from((seq + 1).saturating_sub(oldest)).unwrap_or(usize::MAX);
        ReadAfter {
            missed,
            entries: g.buf.iter().skip(skip).cloned().collect(),
        }
    }

    /// Wakes on every push; the value is the newest sequence number.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.last_seq.subscribe()
    }

    /// Flows held now.
    pub fn num_flows(&self) -> usize {
        self.lock().flows
    }

    /// Capacity in entries.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Flows pushed since the ring was made.
    pub fn seen_flows(&self) -> u64 {
        self.seen_flows.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(n: u32) -> Item {
        Item::Flow(fpb::Flow {
            drop_reason: n,
            ..Default::default()
        })
    }

    #[test]
    fn the_ring_keeps_the_newest_and_counts_what_a_slow_reader_missed() {
        let ring = FlowRing::new(3);
        for n in 1..=5 {
            assert_eq!(ring.push(i64::from(n), flow(n)), u64::from(n));
        }
        let (entries, last) = ring.entries();
        assert_eq!(last, 5);
        assert_eq!(
            entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!((ring.num_flows(), ring.seen_flows()), (3, 5));

        // A reader at 1 missed 2 (overwritten) and gets 3..=5.
        let r = ring.read_after(1);
        assert_eq!(r.missed, 1);
        assert_eq!(r.entries.len(), 3);
        let r = ring.read_after(0);
        assert_eq!(r.missed, 2);
        // Up to date: nothing missed, nothing new.
        let r = ring.read_after(5);
        assert_eq!((r.missed, r.entries.len()), (0, 0));
        let r = ring.read_after(4);
        assert_eq!((r.missed, r.entries.len()), (0, 1));

        // Lost-event notices take a place but are not flows.
        ring.push(
            6,
            Item::Lost(fpb::LostEvent {
                num_events_lost: 9,
                ..Default::default()
            }),
        );
        assert_eq!((ring.num_flows(), ring.seen_flows()), (2, 5));
        assert_eq!(*ring.subscribe().borrow(), 6);
    }
}
