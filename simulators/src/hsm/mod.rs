//! The HSM simulator: payShield-style host commands over TCP, with the public Thales test LMK.
//!
//! A request is a 2-byte big-endian length, a header (4 characters unless configured), two
//! command letters and the command's fields, optionally followed by 0x19 and a trailer. The
//! reply echoes the header, carries the paired response letters (CA -> CB), a two-digit error
//! code and the reply fields, then the trailer if there was one. Several requests may be in
//! flight on one connection; with latency injected their replies may come back in any order, so
//! clients match them by header.
//!
//! Commands: NC, B2, BU, A0, A6, A8, CA, CC, DC, EC, CW, CY, M6, M8 (see [`commands`]).
//! Faults are injected per request ([`HsmFaults`]) and can be changed while running.

pub mod commands;
pub mod crypto;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crypto::{ClearKey, KeyType, Lmk, PinFormat, Scheme, WrappedKey};

pub use cardswitch_codec::hsm::{framing, DEFAULT_PORT, MAX_FRAME, TRAILER};

/// Faults, in percent of requests, and latency.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HsmFaults {
    /// Shortest time to answer, in milliseconds.
    #[serde(default)]
    pub latency_min_ms: u64,
    /// Longest time to answer.
    #[serde(default)]
    pub latency_max_ms: u64,
    /// Requests answered with `error_code` instead of being executed.
    #[serde(default)]
    pub error: f64,
    /// The error code injected (two digits).
    #[serde(default = "default_error_code")]
    pub error_code: String,
    /// Requests never answered.
    #[serde(default)]
    pub no_reply: f64,
    /// Requests that close the connection instead.
    #[serde(default)]
    pub disconnect: f64,
}

fn default_error_code() -> String {
    "15".into()
}

impl Default for HsmFaults {
    fn default() -> Self {
        Self {
            latency_min_ms: 0,
            latency_max_ms: 0,
            error: 0.0,
            error_code: default_error_code(),
            no_reply: 0.0,
            disconnect: 0.0,
        }
    }
}

/// How to run the simulator.
#[derive(Debug, Clone)]
pub struct HsmConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Header length in characters (payShield default 4).
    pub header_len: usize,
    /// Faults at start.
    pub faults: HsmFaults,
}

/// What the simulator has done.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HsmStats {
    /// Requests executed, by command code.
    pub commands: BTreeMap<String, u64>,
    /// Replies with an error code other than 00 (and 01, a verification result).
    pub errors: u64,
    /// Requests that met an injected fault.
    pub faults: u64,
    /// Connections accepted.
    pub connections: u64,
}

const KNOWN: [&[u8; 2]; 14] = [
    b"NC", b"B2", b"BU", b"A0", b"A6", b"A8", b"CA", b"CC", b"DC", b"EC", b"CW", b"CY", b"M6",
    b"M8",
];

struct Shared {
    keys: commands::KeyStore,
    header_len: usize,
    faults: RwLock<HsmFaults>,
    counts: [AtomicU64; 14],
    errors: AtomicU64,
    faulted: AtomicU64,
    connections: AtomicU64,
}

/// A running HSM simulator.
#[derive(Debug)]
pub struct HsmSim {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("header_len", &self.header_len)
            .finish_non_exhaustive()
    }
}

impl HsmSim {
    /// Binds and starts serving.
    ///
    /// # Errors
    /// The address cannot be bound.
    pub async fn start(config: HsmConfig) -> Result<Self> {
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("HSM simulator: binding {}", config.listen))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            keys: commands::KeyStore::new(Lmk::test_set()),
            header_len: config.header_len,
            faults: RwLock::new(config.faults),
            counts: Default::default(),
            errors: AtomicU64::new(0),
            faulted: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        });
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        {
            let shared = Arc::clone(&shared);
            let shutdown = shutdown.clone();
            let inner = tracker.clone();
            tracker.spawn(async move {
                loop {
                    let accepted = tokio::select! {
                        () = shutdown.cancelled() => return,
                        a = listener.accept() => a,
                    };
                    let Ok((stream, _)) = accepted else { continue };
                    let _ = stream.set_nodelay(true);
                    shared.connections.fetch_add(1, Ordering::Relaxed);
                    inner.spawn(serve(stream, Arc::clone(&shared), shutdown.clone()));
                }
            });
        }
        Ok(Self {
            addr,
            shared,
            shutdown,
            tracker,
        })
    }

    /// The bound address.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the faults; applies to the next request.
    pub fn set_faults(&self, faults: HsmFaults) {
        if let Ok(mut f) = self.shared.faults.write() {
            *f = faults;
        }
    }

    /// Counters so far.
    #[must_use]
    pub fn stats(&self) -> HsmStats {
        let commands = KNOWN
            .iter()
            .zip(&self.shared.counts)
            .filter_map(|(c, n)| {
                let n = n.load(Ordering::Relaxed);
                (n > 0).then(|| (String::from_utf8_lossy(*c).into_owned(), n))
            })
            .collect();
        HsmStats {
            commands,
            errors: self.shared.errors.load(Ordering::Relaxed),
            faults: self.shared.faulted.load(Ordering::Relaxed),
            connections: self.shared.connections.load(Ordering::Relaxed),
        }
    }

    /// Closes the listener and every connection.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// What to do with one request.
enum Fate {
    Answer(Duration),
    Error(Duration, [u8; 2]),
    Drop,
    Disconnect,
}

fn fate(shared: &Shared) -> Fate {
    let Ok(f) = shared.faults.read() else {
        return Fate::Answer(Duration::ZERO);
    };
    let roll = |pct: f64| pct > 0.0 && fastrand::f64() * 100.0 < pct;
    let latency = if f.latency_max_ms > 0 {
        Duration::from_millis(fastrand::u64(
            f.latency_min_ms.min(f.latency_max_ms)..=f.latency_max_ms,
        ))
    } else {
        Duration::from_millis(f.latency_min_ms)
    };
    if roll(f.disconnect) {
        return Fate::Disconnect;
    }
    if roll(f.no_reply) {
        return Fate::Drop;
    }
    if roll(f.error) {
        let mut code = [b'1', b'5'];
        if let [a, b] = f.error_code.as_bytes() {
            code = [*a, *b];
        }
        return Fate::Error(latency, code);
    }
    Fate::Answer(latency)
}

/// Builds the reply to one request frame; `None` when the frame is too short to answer.
fn reply(shared: &Shared, frame: &[u8], injected: Option<[u8; 2]>) -> Option<Bytes> {
    let (header, rest) = frame.split_at_checked(shared.header_len)?;
    let (cmd, body) = rest.split_at_checked(2)?;
    let cmd: [u8; 2] = cmd.try_into().ok()?;
    let fields = match injected {
        Some(code) => code.to_vec(),
        None => {
            if let Some(i) = KNOWN.iter().position(|k| **k == cmd) {
                if let Some(n) = shared.counts.get(i) {
                    n.fetch_add(1, Ordering::Relaxed);
                }
            }
            Vec::new()
        }
    };
    // A 0x19 starts the trailer, unless it is a byte of binary data (M6/M8 input format 0):
    // when the command fails on the part before it, it is run on the whole body instead.
    let (fields, trailer) = match (injected, body.iter().position(|b| *b == TRAILER)) {
        (Some(_), at) => (fields, at.map_or(&[][..], |at| body.split_at(at).1)),
        (None, None) => (commands::execute(&shared.keys, cmd, body), &[][..]),
        (None, Some(at)) => {
            let (head, trailer) = body.split_at(at);
            let first = commands::execute(&shared.keys, cmd, head);
            if first.get(..2) == Some(commands::code::INPUT.as_bytes()) {
                (commands::execute(&shared.keys, cmd, body), &[][..])
            } else {
                (first, trailer)
            }
        }
    };
    if !matches!(fields.get(..2), Some(b"00" | b"01")) {
        shared.errors.fetch_add(1, Ordering::Relaxed);
    }
    let mut out = BytesMut::with_capacity(header.len() + 2 + fields.len() + trailer.len());
    out.extend_from_slice(header);
    out.extend_from_slice(&commands::reply_code(cmd));
    out.extend_from_slice(&fields);
    out.extend_from_slice(trailer);
    Some(out.freeze())
}

async fn serve(stream: TcpStream, shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut framed = Framed::new(stream, framing());
    // Delayed replies come back through here so that one slow request never holds up others.
    let (tx, mut rx) = mpsc::channel::<Bytes>(1024);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            Some(delayed) = rx.recv() => {
                if framed.send(delayed).await.is_err() {
                    return;
                }
            }
            incoming = framed.next() => {
                let Some(Ok(first)) = incoming else { return };
                // Answer every request already read before flushing once: one write for many
                // replies when a client pipelines.
                let mut next = Some(first);
                while let Some(frame) = next.take() {
                    match handle(&shared, &frame, &tx) {
                        Handled::Close => return,
                        Handled::Later | Handled::Nothing => {}
                        Handled::Now(out) => {
                            if framed.feed(out).await.is_err() {
                                return;
                            }
                        }
                    }
                    if let Some(Some(Ok(more))) = framed.next().now_or_never() {
                        next = Some(more);
                    }
                }
                if SinkExt::<Bytes>::flush(&mut framed).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// What became of one request.
enum Handled {
    /// The reply, to write now.
    Now(Bytes),
    /// The reply goes out after its injected latency.
    Later,
    /// No reply (dropped, or too short to answer).
    Nothing,
    /// The connection is to be closed (injected fault).
    Close,
}

fn handle(shared: &Arc<Shared>, frame: &[u8], tx: &mpsc::Sender<Bytes>) -> Handled {
    let (latency, injected) = match fate(shared) {
        Fate::Disconnect => {
            shared.faulted.fetch_add(1, Ordering::Relaxed);
            return Handled::Close;
        }
        Fate::Drop => {
            shared.faulted.fetch_add(1, Ordering::Relaxed);
            return Handled::Nothing;
        }
        Fate::Error(l, code) => {
            shared.faulted.fetch_add(1, Ordering::Relaxed);
            (l, Some(code))
        }
        Fate::Answer(l) => (l, None),
    };
    let Some(out) = reply(shared, frame, injected) else {
        tracing::debug!("HSM simulator: request shorter than header and command");
        return Handled::Nothing;
    };
    if latency.is_zero() {
        return Handled::Now(out);
    }
    let tx = tx.clone();
    tokio::spawn(async move {
        tokio::time::sleep(latency).await;
        let _ = tx.send(out).await;
    });
    Handled::Later
}

/// Test keys for the demo, the tests and the simulators: clear values a terminal or acquirer
/// would hold, and the same keys under the test LMK as the switch's configuration holds them.
#[derive(Debug, Clone)]
pub struct TestKeys {
    /// Terminal PIN key, clear (terminal simulator).
    pub tpk: ClearKey,
    /// Terminal authentication key, clear.
    pub tak: ClearKey,
    /// Zone PIN key shared with the acquirer, clear (acquirer simulator).
    pub zpk: ClearKey,
    /// Zone authentication key, clear.
    pub zak: ClearKey,
    /// Zone master key, clear (acquirer simulator, for key exchange).
    pub zmk: ClearKey,
}

impl TestKeys {
    /// Fixed double-length test keys (odd parity).
    #[must_use]
    pub fn fixed() -> Self {
        let k = |h: &str| {
            ClearKey::from_hex(h)
                .map(|k| k.with_odd_parity())
                .unwrap_or_else(|_| ClearKey::random(16))
        };
        Self {
            tpk: k("0B681FC20E62C7345D7A13F2A8C4E691"),
            tak: k("2A4C6E80A2C4E6081A3C5E7092B4D6F8"),
            zpk: k("13F10E5D868A529E7C2A4B8F1D3E5A6C"),
            zak: k("4C5E6F708192A3B4C5D6E7F801122334"),
            zmk: k("1C587F1C13924FEF4A7B2C3D5E6F7081"),
        }
    }

    /// A key under the test LMK in scheme U, as a configuration file carries it.
    #[must_use]
    pub fn under_lmk(key: &ClearKey, kt: KeyType) -> String {
        Lmk::test_set()
            .encrypt_key(kt, Scheme::DoubleVariant, key)
            .map(|w| w.to_field())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    #[test]
    fn header_is_echoed_and_trailer_kept() {
        let shared = Shared {
            keys: commands::KeyStore::new(Lmk::test_set()),
            header_len: 4,
            faults: RwLock::new(HsmFaults::default()),
            counts: Default::default(),
            errors: AtomicU64::new(0),
            faulted: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        };
        let r = reply(&shared, b"9999B20004PING", None).unwrap();
        assert_eq!(&r[..], b"9999B300PING");
        let r = reply(&shared, b"0001B20004PING\x19XYZ", None).unwrap();
        assert_eq!(&r[..], b"0001B300PING\x19XYZ");
        let r = reply(&shared, b"0002CA", Some(*b"96")).unwrap();
        assert_eq!(&r[..], b"0002CB96");
        assert!(reply(&shared, b"000", None).is_none());
        // Binary MAC data holding 0x19 is data, not a trailer.
        let mut m6 = b"0004M60013100316161616161616160008".to_vec();
        m6.extend_from_slice(&[0x19, 1, 2, 3, 4, 5, 6, 7]);
        let r = reply(&shared, &m6, None).unwrap();
        assert_ne!(&r[6..8], b"15", "{r:?}");
        let nc = reply(&shared, b"0003NC", None).unwrap();
        assert_eq!(&nc[..8], b"0003ND00");
        assert_eq!(nc.len(), 8 + 16 + 9);
    }
}
