//! The anti-replay window (RFC 6479's idea: a bitmap that slides with the highest counter seen).

/// Counters this far behind the highest accepted one are too old.
pub const WINDOW: u64 = 2048;
const WORDS: usize = (WINDOW / 64) as usize;

/// Which counters of a receive direction were accepted. A counter is accepted once; one older
/// than the window is refused. Update only after the packet authenticated, so forged packets
/// cannot move the window.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// The highest accepted counter + 1 (0: nothing accepted yet).
    next: u64,
    bits: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    /// An empty window.
    pub const fn new() -> Self {
        ReplayWindow {
            next: 0,
            bits: [0; WORDS],
        }
    }

    fn slot(counter: u64) -> (usize, u64) {
        let bit = counter % WINDOW;
        ((bit / 64) as usize, 1u64 << (bit % 64))
    }

    /// Whether `counter` could be accepted (new, and not older than the window).
    pub fn check(&self, counter: u64) -> bool {
        if counter >= self.next {
            return true;
        }
        if self.next - counter > WINDOW {
            return false;
        }
        let (w, m) = Self::slot(counter);
        self.bits[w] & m == 0
    }

    /// Records `counter` as accepted; returns false (and changes nothing) when [`check`] would
    /// have refused it.
    ///
    /// [`check`]: ReplayWindow::check
    pub fn accept(&mut self, counter: u64) -> bool {
        if !self.check(counter) {
            return false;
        }
        if counter >= self.next {
            // Clear the slots the window slides over (all of them after a long jump).
            let advance = counter + 1 - self.next;
            if advance >= WINDOW {
                self.bits = [0; WORDS];
            } else {
                for c in self.next..=counter {
                    let (w, m) = Self::slot(c);
                    self.bits[w] &= !m;
                }
            }
            self.next = counter + 1;
        }
        let (w, m) = Self::slot(counter);
        self.bits[w] |= m;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn each_counter_once_and_nothing_older_than_the_window() {
        let mut w = ReplayWindow::new();
        assert!(w.accept(0));
        assert!(!w.accept(0));
        assert!(w.accept(5));
        assert!(w.accept(3), "out of order inside the window");
        assert!(!w.accept(3));
        assert!(w.accept(5000));
        assert!(!w.accept(5000 - WINDOW - 1), "older than the window");
        assert!(w.accept(5000 - WINDOW + 1));
        assert!(!w.check(5), "slid out");
        assert!(w.accept(u64::MAX - 1));
        assert!(!w.accept(u64::MAX - 1));
    }

    proptest! {
        /// Against a plain reference: the set of every accepted counter plus the highest.
        #[test]
        fn matches_a_reference(seq in proptest::collection::vec(0u64..6000, 1..400)) {
            let mut w = ReplayWindow::new();
            let mut seen = std::collections::BTreeSet::new();
            for c in seq {
                let top = seen.iter().next_back().copied();
                let want = !seen.contains(&c) && top.is_none_or(|t: u64| c > t || t - c < WINDOW);
                prop_assert_eq!(w.accept(c), want, "counter {} top {:?}", c, top);
                if want { seen.insert(c); }
            }
        }
    }
}
