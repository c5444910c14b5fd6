//! The reconnecting-connection loop that acquirer links and HSM connections share: connect
//! (with a timeout), serve the connection until it ends, let the peer fail what waited on it,
//! back off with jitter, and again, until shutdown.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Why a served connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The switch is stopping.
    Shutdown,
    /// The connection broke (or stopped answering) after it was up.
    Broken,
    /// It never came up (a TLS handshake failed): the backoff keeps growing.
    NotUp,
}

/// A peer the loop keeps connected.
pub(crate) trait Peer {
    /// `host:port`.
    fn addr(&self) -> &str;
    /// Serves a fresh connection until it ends.
    async fn serve(&mut self, stream: TcpStream) -> Ended;
    /// The connection served has ended: whatever waited on it is failed now.
    fn ended(&mut self, how: Ended);
    /// A connection attempt failed.
    fn unreachable(&mut self);
}

/// Exponential backoff between attempts: from `min`, doubling up to `max`, with up to a quarter
/// of jitter so that peers restarted together do not reconnect in step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    /// Back to the shortest delay (a connection was up).
    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }

    /// The next delay with its jitter, and the one after it doubled.
    pub(crate) fn step(&mut self) -> Duration {
        let base = self.next;
        let quarter = u64::try_from(base.as_millis()).unwrap_or(u64::MAX) / 4;
        self.next = (base * 2).min(self.max);
        base + Duration::from_millis(fastrand::u64(0..=quarter + 1))
    }
}

/// Keeps `peer` connected until `shutdown`.
pub(crate) async fn keep_connected(
    peer: &mut impl Peer,
    connect_timeout: Duration,
    mut backoff: Backoff,
    shutdown: &CancellationToken,
) {
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let connected = tokio::select! {
            () = shutdown.cancelled() => return,
            c = tokio::time::timeout(connect_timeout, TcpStream::connect(peer.addr())) => c,
        };
        if let Ok(Ok(stream)) = connected {
            let _ = stream.set_nodelay(true);
            let ended = peer.serve(stream).await;
            if ended != Ended::NotUp {
                backoff.reset();
            }
            peer.ended(ended);
            if ended == Ended::Shutdown {
                return;
            }
        } else {
            peer.unreachable();
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff.step()) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_ceiling_with_bounded_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let steps: Vec<Duration> = (0..5).map(|_| b.step()).collect();
        for (s, base) in steps.iter().zip([100, 200, 400, 500, 500]) {
            assert!(*s >= Duration::from_millis(base), "{s:?} < {base}");
            assert!(*s <= Duration::from_millis(base + base / 4 + 1), "{s:?}");
        }
        b.reset();
        assert!(b.step() <= Duration::from_millis(126));
    }
}
