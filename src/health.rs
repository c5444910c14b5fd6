//! Health and readiness, for a TCP load balancer in front of several nodes.
//!
//! A node is healthy while its process answers (`/healthz`). It is ready (`/readyz`) when it
//! is not draining, its journal takes writes (the journal's breaker is closed) and its acquirer
//! links are up as `[admin] readiness_links` asks: `every` endpoint with a ready link (the
//! default), `any` endpoint with one, or `ignore` the links. A balancer's health check sends new
//! connections only to ready nodes; a node that is not ready still serves the connections it
//! has.
//!
//! On SIGTERM a node drains: `/readyz` answers 503 at once, and the node keeps serving, new
//! connections included, for `[switch] drain_delay_ms` (so that the balancer's checks see it
//! and move new connections elsewhere); then it stops accepting and reading, lets in-flight
//! transactions finish within `shutdown_grace_ms`, and stops.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

/// Which links readiness needs (`[admin] readiness_links`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadinessLinks {
    /// Every endpoint has a ready link.
    #[default]
    Every,
    /// At least one endpoint has a ready link.
    Any,
    /// Links do not count.
    Ignore,
}

/// Whether the node is draining.
#[derive(Debug, Default)]
pub struct Drain(AtomicBool);

impl Drain {
    /// From now on the node is not ready.
    pub fn start(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether draining has started.
    #[must_use]
    pub fn is_draining(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// One endpoint's links as readiness sees them.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointLinks {
    /// The endpoint.
    pub endpoint: String,
    /// Links ready.
    pub ready: usize,
    /// Links configured.
    pub links: usize,
}

/// The node's readiness and why (the body of `/readyz`).
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    /// Whether a balancer should send it new connections.
    pub ready: bool,
    /// SIGTERM received: finishing what it has.
    pub draining: bool,
    /// The journal takes writes (its breaker is closed).
    pub journal_writable: bool,
    /// What links readiness needs.
    pub links_needed: ReadinessLinks,
    /// Each endpoint's links.
    pub endpoints: Vec<EndpointLinks>,
}

impl Readiness {
    /// Readiness from its parts.
    #[must_use]
    pub fn of(
        draining: bool,
        journal_writable: bool,
        links_needed: ReadinessLinks,
        endpoints: Vec<EndpointLinks>,
    ) -> Self {
        let links_ok = match links_needed {
            ReadinessLinks::Every => endpoints.iter().all(|e| e.ready > 0),
            ReadinessLinks::Any => endpoints.is_empty() || endpoints.iter().any(|e| e.ready > 0),
            ReadinessLinks::Ignore => true,
        };
        Self {
            ready: !draining && journal_writable && links_ok,
            draining,
            journal_writable,
            links_needed,
            endpoints,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(ready: &[usize]) -> Vec<EndpointLinks> {
        ready
            .iter()
            .enumerate()
            .map(|(i, &ready)| EndpointLinks {
                endpoint: format!("e{i}"),
                ready,
                links: 2,
            })
            .collect()
    }

    #[test]
    fn ready_needs_no_drain_a_writable_journal_and_the_links_asked_for() {
        let r = |d, j, n, l: &[usize]| Readiness::of(d, j, n, links(l)).ready;
        assert!(r(false, true, ReadinessLinks::Every, &[1, 2]));
        assert!(!r(true, true, ReadinessLinks::Every, &[1, 2]), "draining");
        assert!(!r(false, false, ReadinessLinks::Every, &[1, 2]), "journal");
        assert!(!r(false, true, ReadinessLinks::Every, &[1, 0]));
        assert!(r(false, true, ReadinessLinks::Any, &[1, 0]));
        assert!(!r(false, true, ReadinessLinks::Any, &[0, 0]));
        assert!(r(false, true, ReadinessLinks::Ignore, &[0, 0]));
        assert!(!r(true, true, ReadinessLinks::Ignore, &[0, 0]));
    }

    #[test]
    fn draining_is_one_way() {
        let d = Drain::default();
        assert!(!d.is_draining());
        d.start();
        d.start();
        assert!(d.is_draining());
    }
}
