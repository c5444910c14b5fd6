//! Which link of an endpoint takes a request.
//!
//! Only links that are ready (signed on) and below their in-flight cap are eligible; links the
//! request already failed on (never written) are excluded by the caller's mask. When no link is
//! eligible the answer is `None`, and the caller answers at once instead of queueing.

/// How an endpoint spreads requests over its links.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Strategy {
    /// The first eligible link in configured order: the others stand by.
    #[default]
    PrimarySecondary,
    /// Each request starts one link further along.
    RoundRobin,
    /// The eligible link with the fewest requests in flight (ties go round-robin).
    LeastInFlight,
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "primary-secondary" => Ok(Self::PrimarySecondary),
            "round-robin" => Ok(Self::RoundRobin),
            "least-in-flight" => Ok(Self::LeastInFlight),
            other => Err(format!(
                "unknown strategy {other:?} (primary-secondary, round-robin, least-in-flight)"
            )),
        }
    }
}

/// What the strategy needs to know of one link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkView {
    /// Signed on and not out of service.
    pub ready: bool,
    /// Requests written and not yet answered or timed out.
    pub in_flight: u32,
    /// Most requests this link may have in flight.
    pub cap: u32,
}

impl LinkView {
    fn eligible(&self) -> bool {
        self.ready && self.in_flight < self.cap
    }
}

impl Strategy {
    /// The link to try, given `turn` (a counter the caller advances per request) and `excluded`
    /// (bit `i` set: link `i` already refused this request). Links past the 64th are ignored.
    #[must_use]
    pub fn choose(self, links: &[LinkView], turn: usize, excluded: u64) -> Option<usize> {
        let n = links.len().min(64);
        if n == 0 {
            return None;
        }
        let ok =
            |i: usize| excluded & (1u64 << i) == 0 && links.get(i).is_some_and(LinkView::eligible);
        match self {
            Self::PrimarySecondary => (0..n).find(|&i| ok(i)),
            Self::RoundRobin => (0..n).map(|k| (turn + k) % n).find(|&i| ok(i)),
            Self::LeastInFlight => (0..n)
                .map(|k| (turn + k) % n)
                .filter(|&i| ok(i))
                .min_by_key(|&i| links.get(i).map_or(u32::MAX, |l| l.in_flight)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(ready: bool, in_flight: u32) -> LinkView {
        LinkView {
            ready,
            in_flight,
            cap: 4,
        }
    }

    #[test]
    fn primary_secondary_prefers_the_first_ready_link() {
        let links = [link(true, 0), link(true, 0)];
        assert_eq!(Strategy::PrimarySecondary.choose(&links, 7, 0), Some(0));
        assert_eq!(
            Strategy::PrimarySecondary.choose(&[link(false, 0), link(true, 3)], 0, 0),
            Some(1)
        );
        // Excluded after a failed write: the secondary takes it.
        assert_eq!(Strategy::PrimarySecondary.choose(&links, 0, 0b01), Some(1));
        assert_eq!(Strategy::PrimarySecondary.choose(&links, 0, 0b11), None);
    }

    #[test]
    fn round_robin_rotates_and_skips_unready_links() {
        let links = [link(true, 0), link(false, 0), link(true, 0)];
        let picks: Vec<_> = (0..4)
            .map(|t| Strategy::RoundRobin.choose(&links, t, 0))
            .collect();
        assert_eq!(picks, [Some(0), Some(2), Some(2), Some(0)]);
    }

    #[test]
    fn least_in_flight_and_caps() {
        let links = [link(true, 3), link(true, 1), link(true, 2)];
        assert_eq!(Strategy::LeastInFlight.choose(&links, 0, 0), Some(1));
        // A link at its cap is not eligible, whatever the strategy.
        let full = [link(true, 4), link(true, 4)];
        for s in [
            Strategy::PrimarySecondary,
            Strategy::RoundRobin,
            Strategy::LeastInFlight,
        ] {
            assert_eq!(s.choose(&full, 0, 0), None);
            assert_eq!(s.choose(&[], 0, 0), None);
        }
    }
}
