//! The acquirer host simulator: listens in any dialect and framing, answers from a rules file,
//! injects faults on command, and keeps a ledger of what it approved.
//!
//! Requests are answered concurrently (each after its own latency), so replies on one connection
//! may go out of order, as real hosts do. The rules can be replaced while running
//! ([`Acquirer::set_rules`]), which is how tests switch a host from approving to dropping.
//!
//! The ledger is the host's truth: an approval is recorded when the host decides it, even if the
//! reply is then sent late or twice; a request dropped by the "no reply" fault is never seen and
//! never recorded. A reversal (04xx) marks its original reversed. By default the host matches
//! as real hosts do, by DE90 alone: the original's MTI class, STAN, DE7, DE32 and DE33 exactly as
//! this host received them; a reversal naming anything else finds nothing (0400: 25; 0420:
//! acknowledged, nothing changes). `matching = "rrn"` (`--match rrn`) is for hosts that also
//! fall back to the terminal and RRN.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use cardswitch_codec::framing::{Frame, FrameCodec, Framing};
use cardswitch_codec::{Dialect, Message, ResponseCode};

use crate::clearing::{self, ClearingRecord};
use crate::hsm::crypto::{self, account_of, ClearKey, MacAlgorithm, MacPadding, PinFormat, Scheme};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The default rules, also shipped as `specs/acquirer-rules.toml`.
pub const DEFAULT_RULES: &str = include_str!("../../specs/acquirer-rules.toml");

/// How the host answers. Percentages are 0 to 100.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    /// Response code when no amount rule matches.
    #[serde(default = "approve")]
    pub default_code: String,
    /// Response codes chosen by the last two digits of DE4.
    #[serde(default)]
    pub amount_rules: Vec<AmountRule>,
    /// Time to answer, drawn uniformly between the bounds.
    #[serde(default)]
    pub latency: Latency,
    /// Faults, each drawn independently per request.
    #[serde(default)]
    pub faults: Faults,
    /// How a reversal finds its original.
    #[serde(default)]
    pub matching: Matching,
}

/// How a reversal finds its original.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Matching {
    /// By DE90 alone: original MTI class, STAN, DE7, DE32, DE33 as this host received them.
    #[default]
    Strict,
    /// By DE90, else by DE41 and DE37 (the latest approval of that terminal and RRN).
    Rrn,
}

/// An original as DE90 names it: MTI version and class, STAN, DE7, DE32 and DE33 (each
/// without leading zeros, as DE90 zero-fills them).
type OriginalKey = (String, String, String, String, String);

fn original_key(mti: &str, stan: &str, de7: &str, de32: &str, de33: &str) -> OriginalKey {
    let digits = |v: &str| v.trim_start_matches('0').to_owned();
    (
        mti.get(..2).unwrap_or("").to_owned(),
        digits(stan),
        de7.to_owned(),
        digits(de32),
        digits(de33),
    )
}

/// The key DE90 of a reversal names.
fn named_by(de90: &str) -> Option<OriginalKey> {
    Some(original_key(
        de90.get(..4)?,
        de90.get(4..10)?,
        de90.get(10..20)?,
        de90.get(20..31)?,
        de90.get(31..42)?,
    ))
}

/// The key of a request as this host received it.
fn key_of(request: &Message) -> OriginalKey {
    original_key(
        request.mti().as_str(),
        &text(request, 11),
        &text(request, 7),
        &text(request, 32),
        &text(request, 33),
    )
}

fn approve() -> String {
    "00".into()
}

/// A response code for amounts ending in two given digits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AmountRule {
    /// The last two digits of DE4.
    pub suffix: String,
    /// The response code.
    pub code: String,
    /// With code 10 (partial approval): the percentage of DE4 approved, sent back as DE4 (and
    /// DE6 in proportion); 50 when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approve_percent: Option<u8>,
}

/// Latency bounds in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Latency {
    /// Shortest.
    #[serde(default)]
    pub min_ms: u64,
    /// Longest.
    #[serde(default)]
    pub max_ms: u64,
}

/// Fault injection, in percent of requests.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// The request is dropped unseen: no reply, nothing recorded.
    #[serde(default)]
    pub no_reply: f64,
    /// The reply is sent `late_ms` after its normal time.
    #[serde(default)]
    pub late: f64,
    /// How late a late reply is.
    #[serde(default)]
    pub late_ms: u64,
    /// The reply is sent twice.
    #[serde(default)]
    pub duplicate: f64,
    /// The connection is closed instead of answering.
    #[serde(default)]
    pub disconnect: f64,
    /// A frame of random bytes is sent instead of the reply.
    #[serde(default)]
    pub garbage: f64,
}

impl Rules {
    /// Parses a rules file.
    ///
    /// # Errors
    /// When the TOML does not parse, has unknown keys or a code that is not two characters.
    pub fn from_toml(text: &str) -> Result<Self> {
        let rules: Self = toml::from_str(text).context("acquirer rules")?;
        for code in
            std::iter::once(&rules.default_code).chain(rules.amount_rules.iter().map(|r| &r.code))
        {
            anyhow::ensure!(
                code.len() == 2,
                "acquirer rules: response code {code:?} is not two characters"
            );
        }
        for r in &rules.amount_rules {
            anyhow::ensure!(
                r.approve_percent.is_none_or(|p| (1..=100).contains(&p)),
                "acquirer rules: approve_percent of suffix {:?} is not 1 to 100",
                r.suffix
            );
            anyhow::ensure!(
                r.suffix.len() == 2 && r.suffix.bytes().all(|b| b.is_ascii_digit()),
                "acquirer rules: amount suffix {:?} is not two digits",
                r.suffix
            );
        }
        anyhow::ensure!(
            rules.latency.min_ms <= rules.latency.max_ms,
            "acquirer rules: latency min_ms > max_ms"
        );
        Ok(rules)
    }

    /// The shipped default: approve, except amounts ending in 51 (51), 05 (05) and 10 (10, half
    /// approved).
    ///
    /// # Panics
    /// Never: the shipped file is checked by the tests.
    #[must_use]
    #[allow(clippy::expect_used)]
    pub fn default_rules() -> Self {
        Self::from_toml(DEFAULT_RULES).expect("shipped acquirer rules parse")
    }

    /// The response code for `msg`, and the percentage of its amount a partial approval
    /// approves.
    fn code_for(&self, msg: &Message) -> (String, u8) {
        let suffix = msg.get(4).and_then(|a| a.get(a.len().saturating_sub(2)..));
        self.amount_rules
            .iter()
            .find(|r| Some(r.suffix.as_bytes()) == suffix)
            .map_or_else(
                || (self.default_code.clone(), 50),
                |r| (r.code.clone(), r.approve_percent.unwrap_or(50)),
            )
    }
}

/// One transaction the host decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LedgerEntry {
    /// MTI of the request.
    pub mti: String,
    /// DE41.
    pub terminal: String,
    /// DE37.
    pub rrn: String,
    /// DE11 as the host received it.
    pub stan: String,
    /// DE4 in minor units: as approved (part of the request's for a partial approval).
    pub amount: u64,
    /// The request's DE4 in minor units.
    pub requested: u64,
    /// DE49.
    pub currency: String,
    /// The response code sent.
    pub response_code: String,
    /// DE38, when approved.
    pub auth_code: Option<String>,
    /// Whether a reversal for it arrived (in full).
    pub reversed: bool,
    /// DE3.
    pub processing_code: String,
    /// The PAN, masked.
    pub pan_masked: String,
    /// HMAC-SHA256 of the PAN under the key shared with the switch (empty without one).
    pub pan_hmac: String,
    /// The host's business date when it decided (`YYYY-MM-DD`), sent as DE15.
    pub business_date: String,
    /// Amount taken back by partial reversals, minor units.
    pub amount_reversed: u64,
}

/// A reversal the host received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReversalSeen {
    /// Its MTI (0400, 0401, 0420, 0421).
    pub mti: String,
    /// DE39 as sent (the reason: 68 for a switch's timeout reversal).
    pub reason: Option<String>,
    /// DE90.
    pub original: Option<String>,
    /// DE37.
    pub rrn: String,
    /// DE4 in minor units.
    pub amount: Option<u64>,
    /// Whether it found its original.
    pub found: bool,
}

/// Counters of what the host did.
#[derive(Debug, Default, Serialize)]
pub struct Stats {
    /// Requests received (including dropped ones).
    pub requests: AtomicU64,
    /// Replies sent.
    pub replies: AtomicU64,
    /// Requests dropped by the no-reply fault.
    pub dropped: AtomicU64,
    /// Replies sent late.
    pub late: AtomicU64,
    /// Replies sent twice.
    pub duplicated: AtomicU64,
    /// Connections closed by the disconnect fault.
    pub disconnects: AtomicU64,
    /// Garbage frames sent.
    pub garbage: AtomicU64,
    /// Frames received that did not decode.
    pub undecodable: AtomicU64,
}

#[derive(Default)]
struct Ledger {
    entries: Vec<LedgerEntry>,
    /// (DE41, DE37) -> entries, oldest first.
    by_rrn: HashMap<(String, String), Vec<usize>>,
    /// How DE90 names an original -> entry.
    by_original: HashMap<OriginalKey, usize>,
}

impl Ledger {
    /// The entry a reversal names: by DE90 (as this host received the original), and with
    /// [`Matching::Rrn`] else by DE41 and DE37 (the latest approval).
    fn original_of(&self, reversal: &Message, matching: Matching) -> Option<usize> {
        if let Some(&i) = reversal
            .get_str(90)
            .and_then(named_by)
            .and_then(|k| self.by_original.get(&k))
        {
            return Some(i);
        }
        if matching == Matching::Strict {
            return None;
        }
        let list = self.by_rrn.get(&(text(reversal, 41), text(reversal, 37)))?;
        list.iter()
            .rev()
            .find(|&&i| self.entries.get(i).is_some_and(|e| e.auth_code.is_some()))
            .or(list.last())
            .copied()
    }

    fn push(&mut self, entry: LedgerEntry, key: OriginalKey) {
        let i = self.entries.len();
        self.by_rrn
            .entry((entry.terminal.clone(), entry.rrn.clone()))
            .or_default()
            .push(i);
        self.by_original.insert(key, i);
        self.entries.push(entry);
    }
}

/// What a ledger holds, by (DE41, DE37).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LedgerSummary {
    /// Keys with an approval standing (approved, not reversed).
    pub charged: std::collections::BTreeSet<(String, String)>,
    /// What stands of each charged key, minor units (approved less partly reversed).
    pub amounts: std::collections::BTreeMap<(String, String), u64>,
    /// Keys with more than one approval standing.
    pub double_charges: Vec<(String, String)>,
    /// Entries in all.
    pub entries: usize,
    /// Entries reversed.
    pub reversed: usize,
}

impl LedgerSummary {
    /// Summarises ledger entries.
    #[must_use]
    pub fn of(entries: &[LedgerEntry]) -> Self {
        let mut standing: HashMap<(String, String), usize> = HashMap::new();
        let mut out = Self {
            entries: entries.len(),
            ..Self::default()
        };
        for e in entries {
            if e.reversed {
                out.reversed += 1;
            }
            if e.auth_code.is_some() && !e.reversed {
                let k = (e.terminal.clone(), e.rrn.clone());
                *out.amounts.entry(k.clone()).or_default() +=
                    e.amount.saturating_sub(e.amount_reversed);
                *standing.entry(k).or_default() += 1;
            }
        }
        for (k, n) in standing {
            if n > 1 {
                out.double_charges.push(k.clone());
            }
            out.charged.insert(k);
        }
        out.double_charges.sort();
        out
    }
}

/// The keys a host shares with the switch, clear (a host keeps them in its own HSM), and the
/// PIN it expects. With a ZAK, card messages must carry a valid X9.19 MAC (else 63, nothing
/// recorded); with a ZPK, a PIN block must decrypt to the expected PIN (else 55).
#[derive(Debug, Clone)]
pub struct AcquirerSecurity {
    /// Zone PIN key.
    pub zpk: Option<ClearKey>,
    /// Zone MAC key.
    pub zak: Option<ClearKey>,
    /// Zone master key, for key exchange.
    pub zmk: Option<ClearKey>,
    /// The PIN every card has.
    pub pin: String,
    /// PIN block format expected.
    pub pin_format: PinFormat,
}

/// How security checks ended for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checked {
    Passed,
    BadMac,
    BadPin,
}

struct State {
    dialect: Dialect,
    security: RwLock<Option<AcquirerSecurity>>,
    /// Key changes sent and not yet answered: STAN -> the new ZPK.
    key_changes: Mutex<HashMap<String, (ClearKey, Option<String>)>>,
    /// Each connection's writer, for messages the host starts (key changes).
    writers: Mutex<Vec<mpsc::Sender<Frame>>>,
    rules: RwLock<Arc<Rules>>,
    ledger: Mutex<Ledger>,
    reversals: Mutex<Vec<ReversalSeen>>,
    stats: Stats,
    auth_codes: AtomicU64,
    /// The open business date (Julian day number).
    business_day: AtomicI32,
    /// The PAN HMAC key shared with the switch's journal.
    pan_key: RwLock<Option<Vec<u8>>>,
    /// Cutovers sent and not yet answered: STAN -> answer.
    cutovers: Mutex<HashMap<String, Option<String>>>,
}

/// Settings of one simulated host.
#[derive(Clone)]
pub struct AcquirerConfig {
    /// Where to listen (port 0 picks one).
    pub listen: SocketAddr,
    /// The wire dialect.
    pub dialect: Dialect,
    /// The framing.
    pub framing: Framing,
    /// How to answer.
    pub rules: Rules,
    /// Serve TLS with this acceptor instead of plain TCP.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Keys shared with the switch.
    pub security: Option<AcquirerSecurity>,
}

impl std::fmt::Debug for AcquirerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcquirerConfig")
            .field("listen", &self.listen)
            .field("dialect", &self.dialect)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// A running acquirer simulator.
#[derive(Clone)]
pub struct Acquirer {
    addr: SocketAddr,
    state: Arc<State>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Acquirer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acquirer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Acquirer {
    /// Binds and starts serving.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn start(config: AcquirerConfig) -> Result<Self> {
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            dialect: config.dialect,
            security: RwLock::new(config.security),
            key_changes: Mutex::new(HashMap::new()),
            writers: Mutex::new(Vec::new()),
            rules: RwLock::new(Arc::new(config.rules)),
            ledger: Mutex::new(Ledger::default()),
            reversals: Mutex::new(Vec::new()),
            stats: Stats::default(),
            auth_codes: AtomicU64::new(1),
            business_day: AtomicI32::new(time::OffsetDateTime::now_utc().date().to_julian_day()),
            pan_key: RwLock::new(None),
            cutovers: Mutex::new(HashMap::new()),
        });
        let acquirer = Self {
            addr,
            state,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
        };
        let this = acquirer.clone();
        let framing = config.framing;
        let tls = config.tls;
        acquirer.tracker.spawn(async move {
            loop {
                tokio::select! {
                    () = this.shutdown.cancelled() => break,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let _ = stream.set_nodelay(true);
                        let conn = this.clone();
                        let tls = tls.clone();
                        this.tracker.spawn(async move {
                            match tls {
                                None => conn.serve(stream, framing).await,
                                Some(acceptor) => {
                                    if let Ok(Ok(secure)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                                        conn.serve(secure, framing).await;
                                    }
                                }
                            }
                        });
                    }
                }
            }
        });
        Ok(acquirer)
    }

    /// The address it listens on.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the rules; requests from now on follow them.
    pub fn set_rules(&self, rules: Rules) {
        if let Ok(mut r) = self.state.rules.write() {
            *r = Arc::new(rules);
        }
    }

    /// The current rules.
    #[must_use]
    pub fn rules(&self) -> Rules {
        self.state
            .rules
            .read()
            .map(|r| (**r).clone())
            .unwrap_or_else(|_| Rules::default_rules())
    }

    /// What the host decided, in order.
    #[must_use]
    pub fn ledger(&self) -> Vec<LedgerEntry> {
        self.state
            .ledger
            .lock()
            .map(|l| l.entries.clone())
            .unwrap_or_default()
    }

    /// The reversals received, in order.
    #[must_use]
    pub fn reversals(&self) -> Vec<ReversalSeen> {
        self.state
            .reversals
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// The counters.
    #[must_use]
    pub fn stats(&self) -> &Stats {
        &self.state.stats
    }

    /// Sends a key change (0800, DE70 `code`) on every connection: a fresh ZPK under the ZMK
    /// in DE48 with its check value. The host uses the new key once a switch answers 00; the
    /// response code (or `None` when no answer came within `wait`) is returned.
    ///
    /// # Errors
    /// No ZMK configured, or no connection to send it on.
    pub async fn change_zpk(&self, code: u16, wait: Duration) -> Result<Option<String>> {
        let zmk = self
            .state
            .security
            .read()
            .ok()
            .and_then(|s| s.as_ref().and_then(|s| s.zmk.clone()))
            .context("key change: the acquirer has no ZMK")?;
        let new = ClearKey::random(16);
        let under_zmk = crypto::wrap(&zmk, Scheme::DoubleVariant, &new)
            .map_err(|e| anyhow::anyhow!("key change: {e}"))?;
        let stan = format!("{:06}", fastrand::u32(1..999_999));
        let (de7, _, _) = cardswitch_codec::clock::now_fields();
        let msg = Message::builder(cardswitch_codec::Mti::NETWORK_REQUEST)
            .field(7, de7)
            .field(11, &stan)
            .field(48, format!("{}{}", under_zmk.to_field(), new.kcv6()))
            .field(70, format!("{code:03}"))
            .build();
        let body = Bytes::from(self.state.dialect.encode_to_vec(&msg)?);
        if let Ok(mut k) = self.state.key_changes.lock() {
            k.insert(stan.clone(), (new, None));
        }
        self.broadcast(body, "key change").await?;
        Ok(answered(wait, || {
            self.state
                .key_changes
                .lock()
                .ok()
                .and_then(|k| k.get(&stan).and_then(|(_, a)| a.clone()))
        })
        .await)
    }

    /// Sends a message the host starts on every open connection.
    async fn broadcast(&self, body: Bytes, what: &str) -> Result<()> {
        let writers: Vec<_> = self
            .state
            .writers
            .lock()
            .map(|w| w.iter().filter(|t| !t.is_closed()).cloned().collect())
            .unwrap_or_default();
        anyhow::ensure!(!writers.is_empty(), "{what}: no connection");
        for w in writers {
            let _ = w
                .send(Frame {
                    tpdu: None,
                    body: body.clone(),
                })
                .await;
        }
        Ok(())
    }

    /// Sets the key of the PAN HMACs in the ledger and the clearing file (the switch's
    /// `journal.pan_hmac_key`).
    pub fn set_pan_hmac_key(&self, key: &[u8]) {
        if let Ok(mut k) = self.state.pan_key.write() {
            *k = Some(key.to_vec());
        }
    }

    /// The host's open business date.
    #[must_use]
    pub fn business_date(&self) -> time::Date {
        self.state.business_date()
    }

    /// Sets the host's open business date (without telling the switch).
    pub fn set_business_date(&self, date: time::Date) {
        self.state
            .business_day
            .store(date.to_julian_day(), Ordering::Release);
    }

    /// Cutover: closes the business date, opens the next and tells every connection (0800,
    /// DE70 201, DE15 the new date). Returns the closed date and the switch's answer (`None`
    /// when none came within `wait`).
    ///
    /// # Errors
    /// No connection to send it on.
    pub async fn cutover(&self, wait: Duration) -> Result<(time::Date, Option<String>)> {
        let closed = self.business_date();
        let opened = closed.next_day().unwrap_or(closed);
        self.set_business_date(opened);
        let stan = format!("{:06}", fastrand::u32(1..999_999));
        let (de7, _, _) = cardswitch_codec::clock::now_fields();
        let msg = Message::builder(cardswitch_codec::Mti::NETWORK_REQUEST)
            .field(7, de7)
            .field(11, &stan)
            .field(15, self.state.settlement_mmdd())
            .field(70, "201")
            .build();
        let body = Bytes::from(self.state.dialect.encode_to_vec(&msg)?);
        if let Ok(mut c) = self.state.cutovers.lock() {
            c.insert(stan.clone(), None);
        }
        self.broadcast(body, "cutover").await?;
        let answer = answered(wait, || {
            self.state
                .cutovers
                .lock()
                .ok()
                .and_then(|c| c.get(&stan).cloned().flatten())
        })
        .await;
        Ok((closed, answer))
    }

    /// The clean clearing file for a business date: every approval of that date still
    /// standing (for what stands after partial reversals), debits as presentments and refunds
    /// as refunds; fully reversed ones and inquiries are not presented.
    #[must_use]
    pub fn clearing_file(&self, date: time::Date) -> Vec<ClearingRecord> {
        let day = date.to_string();
        let Ok(ledger) = self.state.ledger.lock() else {
            return Vec::new();
        };
        ledger
            .entries
            .iter()
            .filter(|e| {
                e.business_date == day
                    && e.auth_code.is_some()
                    && !e.reversed
                    && matches!(e.mti.get(1..2), Some("1" | "2"))
                    && !e.processing_code.starts_with('3')
                    && e.amount > e.amount_reversed
            })
            .map(|e| ClearingRecord {
                rrn: e.rrn.clone(),
                auth_code: e.auth_code.clone().unwrap_or_default(),
                pan_masked: e.pan_masked.clone(),
                pan_hmac: e.pan_hmac.clone(),
                amount_minor: e.amount - e.amount_reversed,
                currency: e.currency.clone(),
                business_date: day.clone(),
                kind: if e.processing_code.starts_with('2') {
                    clearing::kinds::REFUND
                } else {
                    clearing::kinds::PRESENTMENT
                }
                .to_owned(),
                reason: String::new(),
            })
            .collect()
    }

    /// The ZPK the host uses now (tests compare it with what the switch translates to).
    #[must_use]
    pub fn zpk(&self) -> Option<ClearKey> {
        self.state
            .security
            .read()
            .ok()
            .and_then(|s| s.as_ref().and_then(|s| s.zpk.clone()))
    }

    /// Stops accepting, closes every connection and waits for the tasks.
    pub async fn stop(&self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    async fn serve<S>(&self, stream: S, framing: Framing)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        let (mut sink, mut frames) = Framed::new(stream, FrameCodec::new(framing)).split();
        let (tx, mut rx) = mpsc::channel::<Frame>(4096);
        if let Ok(mut w) = self.state.writers.lock() {
            w.retain(|t| !t.is_closed());
            w.push(tx.clone());
        }
        let closed = CancellationToken::new();
        let writer_closed = closed.clone();
        let writer = self.tracker.spawn(async move {
            while let Some(frame) = rx.recv().await {
                if sink.send(frame).await.is_err() {
                    break;
                }
            }
            writer_closed.cancel();
        });
        loop {
            let next = tokio::select! {
                () = self.shutdown.cancelled() => break,
                () = closed.cancelled() => break,
                next = frames.next() => next,
            };
            let Some(Ok(frame)) = next else { break };
            if frame.is_keepalive() {
                let _ = tx.send(frame).await;
                continue;
            }
            let stats = &self.state.stats;
            let Ok(request) = self.state.dialect.decode(&frame.body) else {
                stats.undecodable.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if request.mti() == cardswitch_codec::Mti::NETWORK_RESPONSE {
                // The answer to a key change or a cutover this host sent.
                self.state.key_change_answered(&request);
                if let Ok(mut c) = self.state.cutovers.lock() {
                    if let Some(a) = c.get_mut(&text(&request, 11)) {
                        a.get_or_insert_with(|| text(&request, 39));
                    }
                }
                continue;
            }
            stats.requests.fetch_add(1, Ordering::Relaxed);
            let checked = self.state.check(&frame.body, &request);
            let rules = self.rules_now();
            // Faults hit card transactions; network management (sign-on, echo) is answered.
            let faults = if request.mti().class() == 8 {
                Faults::default()
            } else {
                rules.faults
            };
            if chance(faults.disconnect) {
                stats.disconnects.fetch_add(1, Ordering::Relaxed);
                break;
            }
            if chance(faults.garbage) {
                stats.garbage.fetch_add(1, Ordering::Relaxed);
                let junk: Vec<u8> = (0..fastrand::usize(1..64))
                    .map(|_| fastrand::u8(..))
                    .collect();
                let _ = tx
                    .send(Frame {
                        tpdu: frame.tpdu,
                        body: Bytes::from(junk),
                    })
                    .await;
                continue;
            }
            if chance(faults.no_reply) {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let state = Arc::clone(&self.state);
            let tx = tx.clone();
            let tpdu = frame.tpdu.map(cardswitch_codec::framing::Tpdu::swapped);
            self.tracker.spawn(async move {
                let Latency { min_ms, max_ms } = rules.latency;
                let mut delay = Duration::from_millis(fastrand::u64(min_ms..=max_ms));
                if chance(faults.late) {
                    state.stats.late.fetch_add(1, Ordering::Relaxed);
                    delay += Duration::from_millis(faults.late_ms);
                }
                let reply = state.answer(&request, &rules, checked);
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let Some(reply) = reply else { return };
                let Ok(body) = state.dialect.encode_to_vec(&reply) else {
                    return;
                };
                let body = Bytes::from(body);
                let copies = if chance(faults.duplicate) {
                    state.stats.duplicated.fetch_add(1, Ordering::Relaxed);
                    2
                } else {
                    1
                };
                for _ in 0..copies {
                    if tx
                        .send(Frame {
                            tpdu,
                            body: body.clone(),
                        })
                        .await
                        .is_ok()
                    {
                        state.stats.replies.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        drop(tx);
        writer.abort();
    }

    fn rules_now(&self) -> Arc<Rules> {
        self.state
            .rules
            .read()
            .map(|r| Arc::clone(&r))
            .unwrap_or_else(|_| Arc::new(Rules::default_rules()))
    }
}

/// Polls `answer` until it gives one or `wait` has passed.
async fn answered(wait: Duration, answer: impl Fn() -> Option<String>) -> Option<String> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let a = answer();
        if a.is_some() || tokio::time::Instant::now() >= deadline {
            return a;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn chance(percent: f64) -> bool {
    percent > 0.0 && fastrand::f64() * 100.0 < percent
}

impl State {
    /// The MAC (over the frame as received) and PIN checks of a card message.
    fn check(&self, body: &[u8], request: &Message) -> Checked {
        if !matches!(request.mti().class(), 1 | 2 | 4) {
            return Checked::Passed;
        }
        let Ok(guard) = self.security.read() else {
            return Checked::Passed;
        };
        let Some(sec) = guard.as_ref() else {
            return Checked::Passed;
        };
        if let Some(zak) = &sec.zak {
            let ok = self
                .dialect
                .mac_span(body, request)
                .is_some_and(|(data, mac)| {
                    crypto::mac(zak, MacAlgorithm::X919, MacPadding::Method1, data)
                        .is_ok_and(|m| m.as_slice() == mac)
                });
            if !ok {
                return Checked::BadMac;
            }
        }
        if let (Some(zpk), Some(block)) = (&sec.zpk, request.get(52)) {
            let pan = request
                .pan()
                .or_else(|| request.track2().and_then(|t| t.pan()));
            let block: Option<crypto::Block> = block.try_into().ok();
            let ok = match (pan, block) {
                (Some(pan), Some(block)) => account_of(pan.expose()).is_some_and(|acct| {
                    crypto::pin_of(sec.pin_format, zpk.decrypt(block), &acct)
                        .is_ok_and(|p| *p == sec.pin)
                }),
                _ => false,
            };
            if !ok {
                return Checked::BadPin;
            }
        }
        Checked::Passed
    }

    /// Records a switch's answer to a key change; on 00 the new ZPK takes over.
    fn key_change_answered(&self, reply: &Message) {
        let stan = text(reply, 11);
        let code = text(reply, 39);
        let Ok(mut changes) = self.key_changes.lock() else {
            return;
        };
        let Some((key, answer)) = changes.get_mut(&stan) else {
            return;
        };
        if answer.is_some() {
            return;
        }
        *answer = Some(code.clone());
        if code == "00" {
            if let Ok(mut sec) = self.security.write() {
                if let Some(s) = sec.as_mut() {
                    s.zpk = Some(key.clone());
                }
            }
        }
    }

    /// The reply to a request, recording approvals and reversals in the ledger.
    fn answer(&self, request: &Message, rules: &Rules, checked: Checked) -> Option<Message> {
        let mti = request.mti();
        let mut reply = request.response()?;
        // Fields a host adds or returns beyond the echo.
        for f in [14, 18, 22, 25, 52, 64, 128] {
            reply.remove(f);
        }
        if checked == Checked::BadMac {
            // Not authentic: answered, never recorded.
            reply.set_response_code(ResponseCode::SECURITY_VIOLATION);
            return Some(reply);
        }
        match mti.class() {
            8 => reply.set_response_code(ResponseCode::APPROVED),
            // An advice of a stand-in approval: acknowledged, and the approval recorded (once,
            // however often it is repeated).
            1 | 2 if mti.function() == 2 => {
                reply.set_response_code(ResponseCode::APPROVED);
                if let Ok(mut ledger) = self.ledger.lock() {
                    let key = (text(request, 41), text(request, 37));
                    let seen = ledger.by_rrn.get(&key).is_some_and(|l| {
                        l.iter().any(|&i| {
                            ledger
                                .entries
                                .get(i)
                                .is_some_and(|e| e.mti.get(2..3) == Some("2"))
                        })
                    });
                    if !seen {
                        let entry = LedgerEntry {
                            mti: request.mti().original().to_string(),
                            terminal: key.0,
                            rrn: key.1,
                            stan: text(request, 11),
                            amount: request.amount().unwrap_or(0),
                            requested: request.amount().unwrap_or(0),
                            currency: text(request, 49),
                            response_code: "00".into(),
                            auth_code: request.auth_code().map(str::to_owned),
                            reversed: false,
                            ..self.entry_details(request)
                        };
                        ledger.push(entry, key_of(request));
                    }
                }
            }
            1 | 2 => {
                let (code, percent) = if checked == Checked::BadPin {
                    ("55".to_owned(), 0)
                } else {
                    rules.code_for(request)
                };
                reply.set(39, code.as_bytes());
                let mut amount = request.amount().unwrap_or(0);
                if code == "10" {
                    // A partial approval: part of DE4 (and of DE6) approved, sent back in them.
                    let part = |a: u64| (a * u64::from(percent) / 100).max(1).min(a);
                    amount = part(amount);
                    reply.set_amount(amount);
                    if let Some(billing) = request.get_str(6).and_then(|b| b.parse::<u64>().ok()) {
                        reply.set(6, format!("{:012}", part(billing)).as_bytes());
                    }
                }
                reply.set(15, self.settlement_mmdd().as_bytes());
                let approved = ResponseCode::new(code.as_bytes().try_into().unwrap_or(*b"96"))
                    .is_some_and(|c| c.is_approved());
                let auth_code = approved.then(|| {
                    format!(
                        "{:06}",
                        self.auth_codes.fetch_add(1, Ordering::Relaxed) % 1_000_000
                    )
                });
                if let Some(a) = &auth_code {
                    reply.set(38, a.as_bytes());
                }
                self.record(request, &code, amount, auth_code);
            }
            // A reversal marks its original reversed (again: no change). An 0400 whose original
            // is unknown is answered 25; an 0420 is acknowledged whatever it finds.
            4 => {
                // DE95 with a smaller amount than the original: a partial reversal.
                let standing = request
                    .get_str(95)
                    .and_then(|v| v.get(..12))
                    .and_then(|v| v.parse::<u64>().ok());
                let found = self.ledger.lock().ok().and_then(|mut ledger| {
                    let i = ledger.original_of(request, rules.matching)?;
                    let e = ledger.entries.get_mut(i)?;
                    match standing {
                        Some(s) if s > 0 && s < e.amount => e.amount_reversed = e.amount - s,
                        _ => e.reversed = true,
                    }
                    Some(())
                });
                if let Ok(mut seen) = self.reversals.lock() {
                    seen.push(ReversalSeen {
                        mti: mti.to_string(),
                        reason: request.get_str(39).map(str::to_owned),
                        original: request.get_str(90).map(str::to_owned),
                        rrn: text(request, 37),
                        amount: request.amount(),
                        found: found.is_some(),
                    });
                }
                let code = if found.is_none() && mti.function() == 0 {
                    ResponseCode::RECORD_NOT_FOUND
                } else {
                    ResponseCode::APPROVED
                };
                reply.set_response_code(code);
            }
            _ => reply.set_response_code(ResponseCode::INVALID_TRANSACTION),
        }
        Some(reply)
    }

    fn business_date(&self) -> time::Date {
        time::Date::from_julian_day(self.business_day.load(Ordering::Acquire))
            .unwrap_or_else(|_| time::OffsetDateTime::now_utc().date())
    }

    fn settlement_mmdd(&self) -> String {
        let d = self.business_date();
        format!("{:02}{:02}", u8::from(d.month()), d.day())
    }

    /// What the ledger keeps of a request besides the decision: card (masked and HMAC),
    /// processing code, business date.
    fn entry_details(&self, request: &Message) -> LedgerEntry {
        let pan = request
            .pan()
            .or_else(|| request.track2().and_then(|t| t.pan()));
        let key = self.pan_key.read().ok().and_then(|k| k.clone());
        LedgerEntry {
            mti: String::new(),
            terminal: String::new(),
            rrn: String::new(),
            stan: String::new(),
            amount: 0,
            requested: 0,
            currency: String::new(),
            response_code: String::new(),
            auth_code: None,
            reversed: false,
            processing_code: text(request, 3),
            pan_masked: pan
                .as_ref()
                .map(|p| p.masked().to_string())
                .unwrap_or_default(),
            pan_hmac: match (&pan, key) {
                (Some(p), Some(k)) => clearing::pan_hmac(&k, p.expose()),
                _ => String::new(),
            },
            business_date: self.business_date().to_string(),
            amount_reversed: 0,
        }
    }

    /// Records a decision on `request`; `amount` is what was approved.
    fn record(&self, request: &Message, code: &str, amount: u64, auth_code: Option<String>) {
        let entry = LedgerEntry {
            mti: request.mti().to_string(),
            terminal: text(request, 41),
            rrn: text(request, 37),
            stan: text(request, 11),
            amount,
            requested: request.amount().unwrap_or(0),
            currency: text(request, 49),
            response_code: code.to_owned(),
            auth_code,
            reversed: false,
            ..self.entry_details(request)
        };
        if let Ok(mut ledger) = self.ledger.lock() {
            ledger.push(entry, key_of(request));
        }
    }
}

fn text(msg: &Message, field: u8) -> String {
    msg.get_str(field).unwrap_or_default().to_owned()
}
