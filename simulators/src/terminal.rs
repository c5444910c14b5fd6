//! The terminal simulator: a load generator speaking any dialect and framing.
//!
//! Three ways to load a switch:
//! - closed loop: N connections, each keeping K requests in flight (finds the ceiling);
//! - open loop: a constant rate spread over N connections, latency measured from each request's
//!   intended send time, so a stalled switch cannot hide its stall (no coordinated omission);
//! - one connection per transaction: connect, send, wait for the reply, close.
//!
//! The traffic is a realistic mix (chip with DE55, magnetic stripe with track 2, manual entry,
//! card not present, refunds, echo tests, reversals of earlier approvals) on test card ranges
//! with valid Luhn digits. Replies are matched by DE11, so pipelined replies may come back in any
//! order.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cardswitch_codec::framing::{Frame, FrameCodec, Framing};
use cardswitch_codec::{sample, Dialect, Message, Mti};

use crate::hsm::crypto::{self, account_of, ClearKey, MacAlgorithm, MacPadding, PinFormat};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

/// How load is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    /// `connections` connections, each with `depth` requests in flight.
    Closed {
        /// Connections.
        connections: usize,
        /// Requests in flight per connection.
        depth: usize,
    },
    /// `rate` requests per second over `connections` connections.
    Open {
        /// Requests per second.
        rate: u64,
        /// Connections.
        connections: usize,
    },
    /// `concurrency` workers, each opening one connection per transaction.
    PerTransaction {
        /// Workers.
        concurrency: usize,
    },
}

/// When to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// After this long.
    After(Duration),
    /// After this many requests.
    Count(u64),
}

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct TerminalConfig {
    /// The switch's terminal listener.
    pub target: SocketAddr,
    /// Wire dialect.
    pub dialect: Dialect,
    /// Framing.
    pub framing: Framing,
    /// Load shape.
    pub load: Load,
    /// When to stop.
    pub stop: Stop,
    /// A request not answered within this is counted as timed out.
    pub timeout: Duration,
    /// Account-range prefixes the PANs are drawn from (6 digits each).
    pub bins: Vec<String>,
    /// Only authorization and financial requests (no echo tests or reversals).
    pub card_only: bool,
    /// Terminal keys: PIN blocks under the TPK and MACs under the TAK.
    pub security: Option<TerminalSecurity>,
}

/// What a terminal with keys does to each request: the PIN block (DE52, where the request has
/// one) built for its card and encrypted under the TPK, and an X9.19 MAC under the TAK in DE64
/// (DE128 with a secondary bitmap) on every card message.
#[derive(Debug, Clone)]
pub struct TerminalSecurity {
    /// Terminal PIN key, clear (a terminal holds it in its PIN pad).
    pub tpk: Option<ClearKey>,
    /// Terminal MAC key, clear.
    pub tak: Option<ClearKey>,
    /// The PIN the cardholder types.
    pub pin: String,
    /// PIN block format.
    pub pin_format: PinFormat,
    /// Put a PIN block on every authorization and financial request (not only chip and swipe).
    pub pin_on_every: bool,
}

impl TerminalSecurity {
    /// PIN block and MAC for one request; `None` when the message cannot be encoded.
    #[must_use]
    pub fn apply(&self, dialect: &Dialect, msg: &mut Message) -> Option<()> {
        let wants_pin = msg.has(52)
            || (self.pin_on_every
                && matches!(msg.mti().class(), 1 | 2)
                && msg.mti().function() == 0);
        if let (Some(tpk), true) = (&self.tpk, wants_pin) {
            let pan = msg.pan().or_else(|| msg.track2().and_then(|t| t.pan()))?;
            let account = account_of(pan.expose())?;
            let clear = crypto::pin_block(self.pin_format, &self.pin, &account).ok()?;
            msg.set(52, &tpk.encrypt(clear));
        }
        if let (Some(tak), true) = (&self.tak, matches!(msg.mti().class(), 1 | 2 | 4)) {
            let (field, data) = dialect.mac_input(msg).ok()?;
            let mac = crypto::mac(tak, MacAlgorithm::X919, MacPadding::Method1, &data).ok()?;
            msg.set(field, &mac);
        }
        Some(())
    }
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Requests written.
    pub sent: u64,
    /// Replies matched to a request.
    pub received: u64,
    /// Requests with no reply in time.
    pub timeouts: u64,
    /// Connection failures and undecodable replies.
    pub errors: u64,
    /// Wall time of the run, seconds.
    pub elapsed_s: f64,
    /// Replies per second.
    pub tps: f64,
    /// Latency percentiles in microseconds: p50, p90, p99, p99.9, max.
    pub latency_us: Percentiles,
    /// Replies by response code.
    pub response_codes: BTreeMap<String, u64>,
    /// Approved share of authorization and financial replies, 0 to 1.
    pub approval_rate: f64,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th.
    pub p90: u64,
    /// 99th.
    pub p99: u64,
    /// 99.9th.
    pub p999: u64,
    /// Maximum.
    pub max: u64,
}

impl Report {
    /// A human-readable summary.
    #[must_use]
    pub fn summary(&self) -> String {
        let codes: Vec<String> = self
            .response_codes
            .iter()
            .map(|(c, n)| format!("{c}:{n}"))
            .collect();
        let l = self.latency_us;
        format!(
            "sent {} received {} timeouts {} errors {} in {:.1}s: {:.0} TPS; latency us p50 {} p90 {} p99 {} p99.9 {} max {}; approval {:.1}%; codes {}",
            self.sent,
            self.received,
            self.timeouts,
            self.errors,
            self.elapsed_s,
            self.tps,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            self.approval_rate * 100.0,
            codes.join(" ")
        )
    }
}

/// Per-connection tallies, merged at the end (no shared lock on the hot path).
struct Tally {
    hist: Histogram<u64>,
    codes: HashMap<String, u64>,
    sent: u64,
    received: u64,
    timeouts: u64,
    errors: u64,
    card_replies: u64,
    approved: u64,
}

impl Tally {
    #[allow(clippy::expect_used)] // constant, valid bounds
    fn new() -> Self {
        Self {
            hist: Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds"),
            codes: HashMap::new(),
            sent: 0,
            received: 0,
            timeouts: 0,
            errors: 0,
            card_replies: 0,
            approved: 0,
        }
    }

    fn reply(&mut self, msg: &Message, latency: Duration) {
        self.received += 1;
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let _ = self.hist.record(us.min(120_000_000));
        let code = msg
            .response_code()
            .map_or_else(|| "--".to_owned(), |c| c.to_string());
        if matches!(msg.mti().class(), 1 | 2) {
            self.card_replies += 1;
            if msg.response_code().is_some_and(|c| c.is_approved()) {
                self.approved += 1;
            }
        }
        *self.codes.entry(code).or_default() += 1;
    }

    fn merge(&mut self, other: Self) {
        let _ = self.hist.add(&other.hist);
        for (c, n) in other.codes {
            *self.codes.entry(c).or_default() += n;
        }
        self.sent += other.sent;
        self.received += other.received;
        self.timeouts += other.timeouts;
        self.errors += other.errors;
        self.card_replies += other.card_replies;
        self.approved += other.approved;
    }
}

/// Builds requests: a realistic mix on test card ranges.
pub struct Generator {
    bins: Vec<String>,
    terminal: String,
    stan: u32,
    rrn_base: u64,
    approved: Vec<Message>,
    card_only: bool,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("terminal", &self.terminal)
            .finish_non_exhaustive()
    }
}

/// Appends the Luhn check digit to `digits`.
#[must_use]
pub fn with_luhn(digits: &str) -> String {
    let check = cardswitch_codec::luhn_digit(digits.as_bytes()).unwrap_or(0);
    format!("{digits}{check}")
}

impl Generator {
    /// A generator for one simulated terminal.
    #[must_use]
    pub fn new(bins: Vec<String>, terminal: u32, card_only: bool) -> Self {
        Self {
            bins,
            terminal: format!("T{:07}", terminal % 10_000_000),
            stan: fastrand::u32(0..900_000),
            rrn_base: fastrand::u64(100_000..1_000_000),
            approved: Vec::new(),
            card_only,
        }
    }

    fn next_stan(&mut self) -> u32 {
        self.stan = self.stan % 999_999 + 1;
        self.stan
    }

    fn pan(&self) -> String {
        let bin = self
            .bins
            .get(fastrand::usize(..self.bins.len().max(1)))
            .map_or("476173", String::as_str);
        let mut digits = bin.to_owned();
        while digits.len() < 15 {
            digits.push(char::from(b'0' + fastrand::u8(0..10)));
        }
        with_luhn(&digits)
    }

    /// Remembers an approved request so that a later reversal can refer to it.
    pub fn approved(&mut self, request: Message) {
        if self.approved.len() < 64 {
            self.approved.push(request);
        }
    }

    /// The next request and its STAN.
    pub fn next_request(&mut self) -> (u32, Message) {
        let stan = self.next_stan();
        let (de7, de12, de13) = cardswitch_codec::clock::now_fields();
        let roll = fastrand::u8(0..100);
        if !self.card_only && roll < 5 {
            let msg = Message::builder(Mti::NETWORK_REQUEST)
                .field(7, &de7)
                .stan(stan)
                .field(70, "301")
                .build();
            return (stan, msg);
        }
        if !self.card_only && roll < 10 {
            if let Some(original) = self.approved.pop() {
                let mut rev = original.clone();
                rev.set_mti(Mti::REVERSAL_REQUEST);
                let orig90 = format!(
                    "{}{}{}{:0>11}{:0>11}",
                    original.mti(),
                    original.get_str(11).unwrap_or("000000"),
                    original.get_str(7).unwrap_or("0000000000"),
                    original.get_str(32).unwrap_or(""),
                    ""
                );
                rev.set(90, orig90.as_bytes());
                rev.set(7, de7.as_bytes());
                rev.set_stan(stan);
                rev.remove(52);
                rev.remove(55);
                return (stan, rev);
            }
        }
        let mut msg = sample::auth_request();
        let (mti, pcode) = match roll % 10 {
            0..=4 => (Mti::AUTH_REQUEST, "000000"),
            5..=7 => (Mti::FINANCIAL_REQUEST, "000000"),
            8 => (Mti::FINANCIAL_REQUEST, "200000"),
            _ => (Mti::FINANCIAL_REQUEST, "010000"),
        };
        msg.set_mti(mti);
        msg.set(3, pcode.as_bytes());
        msg.set_amount(fastrand::u64(100..100_000));
        msg.set(7, de7.as_bytes());
        msg.set_stan(stan);
        msg.set(12, de12.as_bytes());
        msg.set(13, de13.as_bytes());
        // Unique per terminal until its STAN wraps.
        let rrn = format!("{:06}{stan:06}", self.rrn_base);
        msg.set(37, rrn.as_bytes());
        msg.set(41, self.terminal.as_bytes());
        let pan = self.pan();
        match roll % 4 {
            // chip: PAN, track 2 equivalent, DE55 (from the sample), PIN block
            0 => {
                msg.set(2, pan.as_bytes());
                msg.set(35, format!("{pan}=28122011143878089").as_bytes());
            }
            // magnetic stripe: track 2 only
            1 => {
                msg.remove(2);
                msg.remove(55);
                msg.remove(14);
                msg.set(22, b"901");
                msg.set(35, format!("{pan}=28122011143878089").as_bytes());
            }
            // manual entry
            2 => {
                msg.set(2, pan.as_bytes());
                msg.remove(35);
                msg.remove(55);
                msg.remove(52);
                msg.set(22, b"012");
            }
            // card not present (e-commerce)
            _ => {
                msg.set(2, pan.as_bytes());
                msg.remove(35);
                msg.remove(55);
                msg.remove(52);
                msg.set(22, b"812");
                msg.set(25, b"59");
            }
        }
        (stan, msg)
    }
}

/// Runs the load and returns what it measured.
///
/// # Errors
/// When no connection to the target can be opened at all.
pub async fn run(config: TerminalConfig) -> Result<Report> {
    // Fail fast when nothing listens.
    drop(
        TcpStream::connect(config.target)
            .await
            .with_context(|| format!("connecting to {}", config.target))?,
    );
    let started = Instant::now();
    let budget = Arc::new(Budget::new(config.stop, started));
    let mut tasks = Vec::new();
    match config.load {
        Load::Closed { connections, depth } => {
            for i in 0..connections.max(1) {
                let (cfg, budget) = (config.clone(), Arc::clone(&budget));
                tasks.push(tokio::spawn(closed_connection(
                    cfg,
                    i,
                    depth.max(1),
                    budget,
                )));
            }
        }
        Load::PerTransaction { concurrency } => {
            for i in 0..concurrency.max(1) {
                let (cfg, budget) = (config.clone(), Arc::clone(&budget));
                tasks.push(tokio::spawn(per_transaction(cfg, i, budget)));
            }
        }
        Load::Open { rate, connections } => {
            tasks = open_loop(
                &config,
                rate.max(1),
                connections.max(1),
                Arc::clone(&budget),
            );
        }
    }
    let mut total = Tally::new();
    for t in tasks {
        if let Ok(tally) = t.await {
            total.merge(tally);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let h = &total.hist;
    let nonzero = |v: u64| if total.received == 0 { 0 } else { v };
    #[allow(clippy::cast_precision_loss)] // counts far below 2^52
    let (tps, approval_rate) = (
        total.received as f64 / elapsed.max(1e-9),
        if total.card_replies == 0 {
            0.0
        } else {
            total.approved as f64 / total.card_replies as f64
        },
    );
    Ok(Report {
        sent: total.sent,
        received: total.received,
        timeouts: total.timeouts,
        errors: total.errors,
        elapsed_s: elapsed,
        tps,
        latency_us: Percentiles {
            p50: nonzero(h.value_at_quantile(0.5)),
            p90: nonzero(h.value_at_quantile(0.9)),
            p99: nonzero(h.value_at_quantile(0.99)),
            p999: nonzero(h.value_at_quantile(0.999)),
            max: nonzero(h.max()),
        },
        response_codes: total.codes.into_iter().collect(),
        approval_rate,
    })
}

/// Shared stop condition.
struct Budget {
    stop: Stop,
    started: Instant,
    issued: AtomicU64,
    done: AtomicBool,
}

impl Budget {
    fn new(stop: Stop, started: Instant) -> Self {
        Self {
            stop,
            started,
            issued: AtomicU64::new(0),
            done: AtomicBool::new(false),
        }
    }

    /// Takes one request from the budget; false once the run is over.
    fn take(&self) -> bool {
        if self.done.load(Ordering::Relaxed) {
            return false;
        }
        let ok = match self.stop {
            Stop::After(d) => self.started.elapsed() < d,
            Stop::Count(n) => self.issued.fetch_add(1, Ordering::Relaxed) < n,
        };
        if !ok {
            self.done.store(true, Ordering::Relaxed);
        }
        ok
    }
}

fn encode(cfg: &TerminalConfig, msg: &mut Message) -> Option<Frame> {
    if let Some(sec) = &cfg.security {
        sec.apply(&cfg.dialect, msg)?;
    }
    cfg.dialect.encode_to_vec(msg).ok().map(Frame::new)
}

async fn closed_connection(
    cfg: TerminalConfig,
    index: usize,
    depth: usize,
    budget: Arc<Budget>,
) -> Tally {
    let mut tally = Tally::new();
    let Ok(stream) = TcpStream::connect(cfg.target).await else {
        tally.errors += 1;
        return tally;
    };
    let _ = stream.set_nodelay(true);
    let mut framed = Framed::new(stream, FrameCodec::new(cfg.framing));
    let mut gen = Generator::new(
        cfg.bins.clone(),
        u32::try_from(index).unwrap_or(0),
        cfg.card_only,
    );
    let mut in_flight: HashMap<u32, (Instant, Message)> = HashMap::new();
    let mut exhausted = false;
    loop {
        while !exhausted && in_flight.len() < depth {
            if !budget.take() {
                exhausted = true;
                break;
            }
            let (stan, mut msg) = gen.next_request();
            let Some(frame) = encode(&cfg, &mut msg) else {
                continue;
            };
            if framed.feed(frame).await.is_err() {
                tally.errors += 1;
                return tally;
            }
            tally.sent += 1;
            in_flight.insert(stan, (Instant::now(), msg));
        }
        if framed.flush().await.is_err() {
            tally.errors += 1;
            return tally;
        }
        if in_flight.is_empty() {
            return tally;
        }
        match tokio::time::timeout(cfg.timeout, framed.next()).await {
            Ok(Some(Ok(frame))) => {
                if frame.is_keepalive() {
                    continue;
                }
                match cfg.dialect.decode(&frame.body) {
                    Ok(reply) => {
                        if let Some((sent_at, request)) =
                            reply.stan().and_then(|s| in_flight.remove(&s))
                        {
                            tally.reply(&reply, sent_at.elapsed());
                            if reply.response_code().is_some_and(|c| c.is_approved())
                                && matches!(request.mti().class(), 1 | 2)
                            {
                                gen.approved(request);
                            }
                        }
                    }
                    Err(_) => tally.errors += 1,
                }
            }
            Ok(_) => {
                // The switch closed the connection: what was in flight is lost.
                tally.errors += 1;
                tally.timeouts += u64::try_from(in_flight.len()).unwrap_or(0);
                return tally;
            }
            Err(_) => {
                tally.timeouts += u64::try_from(in_flight.len()).unwrap_or(0);
                in_flight.clear();
            }
        }
    }
}

async fn per_transaction(cfg: TerminalConfig, index: usize, budget: Arc<Budget>) -> Tally {
    let mut tally = Tally::new();
    let mut gen = Generator::new(
        cfg.bins.clone(),
        u32::try_from(index).unwrap_or(0),
        cfg.card_only,
    );
    while budget.take() {
        let started = Instant::now();
        let (stan, mut msg) = gen.next_request();
        let Some(frame) = encode(&cfg, &mut msg) else {
            continue;
        };
        let Ok(stream) = TcpStream::connect(cfg.target).await else {
            tally.errors += 1;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut framed = Framed::new(stream, FrameCodec::new(cfg.framing));
        tally.sent += 1;
        if framed.send(frame).await.is_err() {
            tally.errors += 1;
            continue;
        }
        match tokio::time::timeout(cfg.timeout, framed.next()).await {
            Ok(Some(Ok(frame))) => match cfg.dialect.decode(&frame.body) {
                Ok(reply) if reply.stan() == Some(stan) => tally.reply(&reply, started.elapsed()),
                _ => tally.errors += 1,
            },
            Ok(_) => tally.errors += 1,
            Err(_) => tally.timeouts += 1,
        }
    }
    tally
}

/// Open loop: one scheduler hands out requests at their intended times; each connection sends
/// what it is handed and measures from the intended time.
fn open_loop(
    cfg: &TerminalConfig,
    rate: u64,
    connections: usize,
    budget: Arc<Budget>,
) -> Vec<tokio::task::JoinHandle<Tally>> {
    let mut senders = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..connections {
        let (tx, rx) = mpsc::channel::<Instant>(65_536);
        senders.push(tx);
        tasks.push(tokio::spawn(open_connection(cfg.clone(), i, rx)));
    }
    // The schedule runs on its own thread: `std::thread::sleep` wakes within tens of
    // microseconds, where tokio's timer rounds to milliseconds and would send in bursts.
    let scheduler = std::thread::spawn(move || {
        let start = Instant::now();
        let interval = Duration::from_nanos(1_000_000_000 / rate);
        let mut i: u32 = 0;
        while budget.take() {
            let intended = start + interval * i;
            let now = Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            }
            let Some(tx) = senders.get(usize::try_from(i).unwrap_or(0) % senders.len()) else {
                break;
            };
            if tx.blocking_send(intended).is_err() {
                break;
            }
            i = i.wrapping_add(1);
        }
    });
    let scheduler = tokio::task::spawn_blocking(move || {
        let _ = scheduler.join();
        Tally::new()
    });
    tasks.push(scheduler);
    tasks
}

async fn open_connection(
    cfg: TerminalConfig,
    index: usize,
    mut schedule: mpsc::Receiver<Instant>,
) -> Tally {
    let mut tally = Tally::new();
    let Ok(stream) = TcpStream::connect(cfg.target).await else {
        tally.errors += 1;
        return tally;
    };
    let _ = stream.set_nodelay(true);
    let (mut sink, mut frames) = Framed::new(stream, FrameCodec::new(cfg.framing)).split();
    let in_flight: Arc<Mutex<HashMap<u32, Instant>>> = Arc::default();
    let reader_in_flight = Arc::clone(&in_flight);
    let dialect = cfg.dialect.clone();
    let timeout = cfg.timeout;
    let stop = tokio_util::sync::CancellationToken::new();
    let reader_stop = stop.clone();
    let reader = tokio::spawn(async move {
        let mut tally = Tally::new();
        loop {
            let next = tokio::select! {
                () = reader_stop.cancelled() => break,
                next = tokio::time::timeout(timeout, frames.next()) => next,
            };
            match next {
                Ok(Some(Ok(frame))) if !frame.is_keepalive() => match dialect.decode(&frame.body) {
                    Ok(reply) => {
                        let sent = reply
                            .stan()
                            .and_then(|s| reader_in_flight.lock().ok()?.remove(&s));
                        if let Some(intended) = sent {
                            tally.reply(&reply, intended.elapsed());
                        }
                    }
                    Err(_) => tally.errors += 1,
                },
                Ok(Some(Ok(_))) => {}
                Ok(_) => break,
                Err(_) => {
                    let empty = reader_in_flight
                        .lock()
                        .map(|m| m.is_empty())
                        .unwrap_or(true);
                    if empty {
                        break;
                    }
                }
            }
        }
        tally
    });
    let mut gen = Generator::new(
        cfg.bins.clone(),
        u32::try_from(index).unwrap_or(0),
        cfg.card_only,
    );
    while let Some(intended) = schedule.recv().await {
        let (stan, mut msg) = gen.next_request();
        let Some(frame) = encode(&cfg, &mut msg) else {
            continue;
        };
        if let Ok(mut m) = in_flight.lock() {
            m.insert(stan, intended);
        }
        if sink.send(frame).await.is_err() {
            tally.errors += 1;
            break;
        }
        tally.sent += 1;
    }
    // Wait for the last replies, then count what never came.
    let deadline = Instant::now() + cfg.timeout;
    while Instant::now() < deadline && in_flight.lock().map(|m| !m.is_empty()).unwrap_or(false) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = sink.close().await;
    tally.timeouts += in_flight
        .lock()
        .map(|m| u64::try_from(m.len()).unwrap_or(0))
        .unwrap_or(0);
    stop.cancel();
    if let Ok(r) = reader.await {
        tally.merge(r);
    }
    tally
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_pans_pass_luhn_and_requests_encode() {
        let dialect = Dialect::builtin("iso87-ascii").unwrap();
        let mut gen = Generator::new(vec!["476173".into(), "541333".into()], 1, false);
        for _ in 0..500 {
            let (stan, msg) = gen.next_request();
            assert_eq!(msg.stan(), Some(stan));
            if let Some(pan) = msg.pan().or_else(|| msg.track2().and_then(|t| t.pan())) {
                assert!(pan.luhn_valid(), "{pan}");
            }
            dialect.encode_to_vec(&msg).unwrap();
            if matches!(msg.mti().class(), 1 | 2) {
                gen.approved(msg);
            }
        }
        assert_eq!(with_luhn("411111111111111"), "4111111111111111");
        let (de7, de12, de13) = cardswitch_codec::clock::now_fields();
        assert_eq!((de7.len(), de12.len(), de13.len()), (10, 6, 4));
        assert!(de7.starts_with(&de13));
    }
}
