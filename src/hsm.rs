//! The switch's HSM client: a pool of pipelined connections to payShield-style HSMs.
//!
//! Each connection is a task owning one TCP stream (2-byte length framing). A request gets a
//! 4-digit header unique among that connection's requests in flight, so many requests share a
//! connection and replies may come back in any order. A connection that drops fails its
//! waiting requests at once and reconnects with backoff; requests go to the ready connection
//! with the fewest in flight. When none is ready the caller learns it immediately
//! ([`HsmError::Unavailable`]) rather than waiting for a timeout.
//!
//! Keys pass through here only as the HSM's own encrypted fields ([`WrappedKey`], under the
//! LMK); PIN blocks only encrypted. Nothing here holds or logs a clear key or PIN.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cardswitch_codec::hsm::{framing, KeyType, WrappedKey};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::net::connection::{keep_connected, Backoff, Ended, Peer};
use crate::net::write::write_coalesced;

/// `[hsm]`: where the HSMs are and how to use them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmSection {
    /// `host:port` of each HSM.
    pub addresses: Vec<String>,
    /// Connections per address.
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// How long a command may take, in milliseconds.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Header length in characters (payShield default 4).
    #[serde(default = "default_header")]
    pub header_len: usize,
    /// Most commands in flight on one connection.
    #[serde(default = "default_in_flight")]
    pub max_in_flight_per_connection: usize,
    /// First reconnection delay, in milliseconds (doubles up to 5 s).
    #[serde(default = "default_reconnect")]
    pub reconnect_min_ms: u64,
}

const fn default_connections() -> usize {
    2
}
const fn default_timeout() -> u64 {
    1_000
}
const fn default_header() -> usize {
    4
}
const fn default_in_flight() -> usize {
    512
}
const fn default_reconnect() -> u64 {
    100
}

/// Why a command gave no result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    /// No connection to any HSM is up.
    #[error("no HSM connection is up")]
    Unavailable,
    /// The HSM did not answer in time (or the connection dropped while waiting).
    #[error("HSM did not answer in time")]
    Timeout,
    /// The HSM answered with an error code.
    #[error("HSM error code {}", String::from_utf8_lossy(.0))]
    Refused([u8; 2]),
    /// The reply could not be read.
    #[error("HSM reply not understood")]
    Malformed,
}

impl HsmError {
    /// Whether the PIN block itself is at fault (payShield 20, 23 or 24): the terminal gets 55.
    #[must_use]
    pub fn is_bad_pin_block(self) -> bool {
        matches!(self, Self::Refused(c) if matches!(&c, b"20" | b"23" | b"24"))
    }
}

/// Connection health, for operators and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HsmHealth {
    /// Connections up now.
    pub up: usize,
    /// Connections configured.
    pub total: usize,
    /// Commands sent.
    pub commands: u64,
    /// Commands that failed: unavailable, timed out or unreadable (not HSM error codes).
    pub failures: u64,
}

struct Conn {
    addr: String,
    up: AtomicBool,
    in_flight: AtomicUsize,
    header: AtomicU32,
    pending: Mutex<HashMap<u32, oneshot::Sender<Bytes>>>,
    queue: mpsc::Sender<Bytes>,
    /// Timeouts in a row; at [`STRIKES`] the connection is dropped and made again.
    strikes: AtomicU32,
    reset: tokio::sync::Notify,
}

/// Timeouts in a row after which a connection is taken for hung and reconnected.
const STRIKES: u32 = 3;

/// A pool of HSM connections.
pub struct Hsm {
    conns: Vec<Arc<Conn>>,
    turn: AtomicUsize,
    timeout: Duration,
    header_len: usize,
    max_in_flight: usize,
    commands: AtomicU64,
    failures: AtomicU64,
}

impl std::fmt::Debug for Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hsm")
            .field("connections", &self.conns.len())
            .field("health", &self.health())
            .finish_non_exhaustive()
    }
}

impl Hsm {
    /// Starts the pool's connection tasks; they stop with `shutdown`.
    #[must_use]
    pub fn start(
        cfg: &HsmSection,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Arc<Self> {
        let mut conns = Vec::new();
        for addr in &cfg.addresses {
            for _ in 0..cfg.connections.max(1) {
                let (tx, rx) = mpsc::channel(cfg.max_in_flight_per_connection.max(1));
                let conn = Arc::new(Conn {
                    addr: addr.clone(),
                    up: AtomicBool::new(false),
                    in_flight: AtomicUsize::new(0),
                    header: AtomicU32::new(fastrand::u32(0..10_000)),
                    pending: Mutex::new(HashMap::new()),
                    queue: tx,
                    strikes: AtomicU32::new(0),
                    reset: tokio::sync::Notify::new(),
                });
                tracker.spawn(run(
                    Arc::clone(&conn),
                    rx,
                    cfg.header_len,
                    Duration::from_millis(cfg.reconnect_min_ms.max(1)),
                    shutdown.clone(),
                ));
                conns.push(conn);
            }
        }
        Arc::new(Self {
            conns,
            turn: AtomicUsize::new(0),
            timeout: Duration::from_millis(cfg.timeout_ms.max(1)),
            header_len: cfg.header_len,
            max_in_flight: cfg.max_in_flight_per_connection.max(1),
            commands: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        })
    }

    /// Connections up and counters.
    #[must_use]
    pub fn health(&self) -> HsmHealth {
        HsmHealth {
            up: self
                .conns
                .iter()
                .filter(|c| c.up.load(Ordering::Acquire))
                .count(),
            total: self.conns.len(),
            commands: self.commands.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }

    /// Waits until at least one connection is up, at most `wait`.
    pub async fn wait_ready(&self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.health().up > 0 {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pick(&self) -> Option<&Arc<Conn>> {
        let n = self.conns.len();
        let start = self.turn.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .filter_map(|i| self.conns.get((start + i) % n.max(1)))
            .filter(|c| c.up.load(Ordering::Acquire))
            .filter(|c| c.in_flight.load(Ordering::Relaxed) < self.max_in_flight)
            .min_by_key(|c| c.in_flight.load(Ordering::Relaxed))
    }

    /// Sends a command and returns the reply fields after the error code `00` (or `01` for a
    /// verification that failed, which is a result, not an error).
    ///
    /// # Errors
    /// [`HsmError`]: no connection, no answer in time, an error code, an unreadable reply.
    pub async fn call(&self, command: &[u8; 2], body: &[u8]) -> Result<(bool, Bytes), HsmError> {
        self.commands.fetch_add(1, Ordering::Relaxed);
        let result = self.call_inner(command, body).await;
        if matches!(
            result,
            Err(HsmError::Unavailable | HsmError::Timeout | HsmError::Malformed)
        ) {
            self.failures.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(crate::telemetry::HSM_FAILURES).increment(1);
        }
        result
    }

    async fn call_inner(&self, command: &[u8; 2], body: &[u8]) -> Result<(bool, Bytes), HsmError> {
        let conn = self.pick().ok_or(HsmError::Unavailable)?;
        let (tx, rx) = oneshot::channel();
        let header = {
            let mut pending = conn.pending.lock().map_err(|_| HsmError::Unavailable)?;
            let mut h = conn.header.fetch_add(1, Ordering::Relaxed) % 10_000;
            // 10,000 headers, at most `max_in_flight` in use: a free one is always near.
            while pending.contains_key(&h) {
                h = conn.header.fetch_add(1, Ordering::Relaxed) % 10_000;
            }
            pending.insert(h, tx);
            h
        };
        let mut frame = BytesMut::with_capacity(self.header_len + 2 + body.len());
        let digits = format!("{header:0width$}", width = self.header_len.max(4));
        frame.extend_from_slice(digits.as_bytes().get(..self.header_len).unwrap_or(b""));
        frame.extend_from_slice(command);
        frame.extend_from_slice(body);
        if conn.queue.try_send(frame.freeze()).is_err() {
            forget(conn, header);
            return Err(HsmError::Unavailable);
        }
        conn.in_flight.fetch_add(1, Ordering::Relaxed);
        let reply = tokio::time::timeout(self.timeout, rx).await;
        conn.in_flight.fetch_sub(1, Ordering::Relaxed);
        let reply = match reply {
            Ok(Ok(r)) => {
                conn.strikes.store(0, Ordering::Relaxed);
                r
            }
            // The connection dropped while waiting.
            Ok(Err(_)) => return Err(HsmError::Unavailable),
            Err(_) => {
                forget(conn, header);
                if conn.strikes.fetch_add(1, Ordering::Relaxed) + 1 >= STRIKES {
                    conn.strikes.store(0, Ordering::Relaxed);
                    conn.reset.notify_one();
                }
                return Err(HsmError::Timeout);
            }
        };
        // Header, response letters, error code, fields.
        let expected = [command[0], command[1].saturating_add(1)];
        let rest = reply.get(self.header_len..).ok_or(HsmError::Malformed)?;
        if rest.get(..2) != Some(&expected[..]) {
            return Err(HsmError::Malformed);
        }
        let code: [u8; 2] = rest
            .get(2..4)
            .and_then(|c| c.try_into().ok())
            .ok_or(HsmError::Malformed)?;
        let fields = reply.slice(self.header_len + 4..);
        match &code {
            b"00" => Ok((true, fields)),
            b"01" => Ok((false, fields)),
            _ => Err(HsmError::Refused(code)),
        }
    }

    /// BU: the 16-digit check value of a key under the LMK.
    ///
    /// # Errors
    /// As [`Hsm::call`].
    pub async fn check_value(&self, kt: KeyType, key: &WrappedKey) -> Result<String, HsmError> {
        let flag = match key.bytes.len() {
            8 => '0',
            16 => '1',
            _ => '2',
        };
        let body = format!("{:02X}{flag}{}", kt.pair_code(), key.to_field());
        let (_, fields) = self.call(b"BU", body.as_bytes()).await?;
        String::from_utf8(fields.to_vec()).map_err(|_| HsmError::Malformed)
    }

    /// CA: translates a PIN block from a terminal's TPK to a zone's ZPK.
    ///
    /// # Errors
    /// As [`Hsm::call`]; error codes 20, 23 and 24 mean the PIN block itself is bad.
    pub async fn translate_pin(
        &self,
        tpk: &WrappedKey,
        zpk: &WrappedKey,
        block: &[u8],
        from_format: &str,
        to_format: &str,
        account: &str,
    ) -> Result<[u8; 8], HsmError> {
        let body = format!(
            "{}{}12{}{from_format}{to_format}{account}",
            tpk.to_field(),
            zpk.to_field(),
            hex::encode_upper(block)
        );
        let (_, fields) = self.call(b"CA", body.as_bytes()).await?;
        // PIN length (2), PIN block (16), destination format (2).
        let hex_block = fields.get(2..18).ok_or(HsmError::Malformed)?;
        let mut out = [0u8; 8];
        hex::decode_to_slice(hex_block, &mut out).map_err(|_| HsmError::Malformed)?;
        Ok(out)
    }

    fn mac_body(kt: KeyType, key: &WrappedKey, data: &[u8]) -> Result<Vec<u8>, HsmError> {
        // Single part, binary input (the declared length delimits it, so a 0x19 inside is
        // data, not a trailer), 8-byte MAC, X9.19, ISO 9797 padding method 1.
        let len = u16::try_from(data.len()).map_err(|_| HsmError::Malformed)?;
        let field = key.to_field();
        let mut body = Vec::with_capacity(16 + field.len() + data.len() + 16);
        body.extend_from_slice(b"00131");
        body.extend_from_slice(kt.code().as_bytes());
        body.extend_from_slice(field.as_bytes());
        body.extend_from_slice(format!("{len:04X}").as_bytes());
        body.extend_from_slice(data);
        Ok(body)
    }

    /// M6: an X9.19 MAC over `data` under a TAK or ZAK.
    ///
    /// # Errors
    /// As [`Hsm::call`].
    pub async fn generate_mac(
        &self,
        kt: KeyType,
        key: &WrappedKey,
        data: &[u8],
    ) -> Result<[u8; 8], HsmError> {
        let body = Self::mac_body(kt, key, data)?;
        let (_, fields) = self.call(b"M6", &body).await?;
        let mut out = [0u8; 8];
        hex::decode_to_slice(fields.get(..16).ok_or(HsmError::Malformed)?, &mut out)
            .map_err(|_| HsmError::Malformed)?;
        Ok(out)
    }

    /// M8: whether `mac` is the X9.19 MAC of `data`.
    ///
    /// # Errors
    /// As [`Hsm::call`].
    pub async fn verify_mac(
        &self,
        kt: KeyType,
        key: &WrappedKey,
        data: &[u8],
        mac: &[u8],
    ) -> Result<bool, HsmError> {
        let mut body = Self::mac_body(kt, key, data)?;
        body.extend_from_slice(hex::encode_upper(mac).as_bytes());
        let (ok, _) = self.call(b"M8", &body).await?;
        Ok(ok)
    }

    /// CY: whether a CVV is right for a card.
    ///
    /// # Errors
    /// As [`Hsm::call`].
    pub async fn verify_cvv(
        &self,
        cvk: &WrappedKey,
        cvv: &str,
        pan: &str,
        expiry: &str,
        service_code: &str,
    ) -> Result<bool, HsmError> {
        let body = format!("{}{cvv}{pan};{expiry}{service_code}", cvk.to_field());
        let (ok, _) = self.call(b"CY", body.as_bytes()).await?;
        Ok(ok)
    }

    /// A6: imports a key sent under a ZMK; returns it under the LMK (scheme U for
    /// double-length keys) and its 6-digit check value.
    ///
    /// # Errors
    /// As [`Hsm::call`].
    pub async fn import_key(
        &self,
        kt: KeyType,
        zmk: &WrappedKey,
        key_under_zmk: &WrappedKey,
    ) -> Result<(WrappedKey, String), HsmError> {
        let body = format!(
            "{}{}{}U",
            kt.code(),
            zmk.to_field(),
            key_under_zmk.to_field()
        );
        let (_, fields) = self.call(b"A6", body.as_bytes()).await?;
        let text = std::str::from_utf8(&fields).map_err(|_| HsmError::Malformed)?;
        let kcv_at = text.len().checked_sub(6).ok_or(HsmError::Malformed)?;
        let (key, kcv) = text.split_at(kcv_at);
        let key = WrappedKey::parse(key).map_err(|_| HsmError::Malformed)?;
        Ok((key, kcv.to_owned()))
    }
}

fn forget(conn: &Conn, header: u32) {
    if let Ok(mut p) = conn.pending.lock() {
        p.remove(&header);
    }
}

/// One HSM connection as the reconnecting loop sees it.
struct HsmPeer {
    conn: Arc<Conn>,
    queue: mpsc::Receiver<Bytes>,
    header_len: usize,
    shutdown: CancellationToken,
    was_up: bool,
}

impl Peer for HsmPeer {
    fn addr(&self) -> &str {
        &self.conn.addr
    }

    async fn serve(&mut self, stream: TcpStream) -> Ended {
        self.conn.up.store(true, Ordering::Release);
        if !self.was_up {
            info!(hsm = %self.conn.addr, "HSM connection up");
        }
        self.was_up = true;
        let framed = Framed::new(stream, framing());
        if serve(
            &self.conn,
            framed,
            &mut self.queue,
            self.header_len,
            &self.shutdown,
        )
        .await
        {
            Ended::Shutdown
        } else {
            Ended::Broken
        }
    }

    fn ended(&mut self, how: Ended) {
        self.conn.up.store(false, Ordering::Release);
        // Whoever waits on this connection learns at once.
        if let Ok(mut p) = self.conn.pending.lock() {
            p.clear();
        }
        while self.queue.try_recv().is_ok() {}
        if how != Ended::Shutdown {
            warn!(hsm = %self.conn.addr, "HSM connection lost");
        }
    }

    fn unreachable(&mut self) {
        if self.was_up {
            warn!(hsm = %self.conn.addr, "HSM unreachable");
        }
        self.was_up = false;
        debug!(hsm = %self.conn.addr, "HSM connect failed");
    }
}

async fn run(
    conn: Arc<Conn>,
    queue: mpsc::Receiver<Bytes>,
    header_len: usize,
    reconnect_min: Duration,
    shutdown: CancellationToken,
) {
    let mut peer = HsmPeer {
        conn,
        queue,
        header_len,
        shutdown: shutdown.clone(),
        was_up: false,
    };
    let backoff = Backoff::new(reconnect_min, Duration::from_secs(5));
    keep_connected(&mut peer, Duration::from_secs(2), backoff, &shutdown).await;
}

/// Serves one connection; `true` when it ended for shutdown.
async fn serve(
    conn: &Conn,
    mut framed: Framed<TcpStream, tokio_util::codec::LengthDelimitedCodec>,
    queue: &mut mpsc::Receiver<Bytes>,
    header_len: usize,
    shutdown: &CancellationToken,
) -> bool {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return true,
            () = conn.reset.notified() => {
                warn!(hsm = %conn.addr, "HSM connection not answering; reconnecting");
                return false;
            }
            out = queue.recv() => {
                let Some(out) = out else { return true };
                if write_coalesced(&mut framed, out, queue).await.is_err() {
                    return false;
                }
            }
            incoming = framed.next() => {
                let Some(Ok(frame)) = incoming else { return false };
                let header = frame
                    .get(..header_len)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| h.parse::<u32>().ok());
                let waiter = header.and_then(|h| conn.pending.lock().ok().and_then(|mut p| p.remove(&h)));
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(frame.freeze());
                    }
                    None => debug!(hsm = %conn.addr, "HSM reply with an unknown header ignored"),
                }
            }
        }
    }
}
