//! Inline fraud rules: read from a TOML file, evaluated in the authorization path, pure and
//! synchronous, with bounded state.
//!
//! A rules file (`specs/fraud-rules.toml`) lists rules in order; each has a `name`, a `kind`, a
//! `mode` (`off`, `shadow`: evaluated and recorded but never declining, `active`), an `action`
//! (the response code when it declines; default `settings.decline_code`; `"none"`: it only adds
//! its weight to the score), a `weight` for the score rule and, for stateful kinds, `max_keys`
//! (default `settings.max_keys`). The first active rule that fires
//! with an action declines. Kinds:
//!
//! | kind | fires when |
//! |---|---|
//! | `velocity` | more than `max_count` transactions, or more than `max_amount_minor`, for one `key` (`pan`, `terminal`, `merchant`) within `window_s` (this one included) |
//! | `card_testing` | more than `max_distinct_cards` cards at one terminal within `window_s` |
//! | `mcc_amount_limit` | the amount is above the limit for the MCC |
//! | `high_risk_mcc` | the MCC is listed |
//! | `block_list` | the PAN HMAC or a card-range prefix is listed |
//! | `country_mismatch` | the card range's country (table `card_ranges`) differs from DE19, or with `currency = true` its currency from DE49 |
//! | `card_not_present` | the entry mode (DE22, first two digits) is a card-not-present one and the amount is above `max_amount_minor` |
//! | `expired_card` | the expiry (DE14 or track 2) is before this month |
//! | `chip_fallback` | DE22 starts with 80 |
//! | `impossible_travel` | the card was used at another terminal (table `terminals`, lat/lon) faster than `max_speed_kmh` apart |
//! | `score` | the weights of the active rules that fired add up to `decline_at` (declines) or `flag_at` (flags) |
//!
//! Evaluation allocates nothing: keys are hashes, look-ups take `&str`, and the keyed state lives
//! in fixed-size tables ([`table`]) made when the rules are loaded, bounded by
//! `settings.max_keys` per rule (the stalest key of a full set makes room).

pub mod table;

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cardswitch_codec::ResponseCode;
use serde::Deserialize;

use table::{Distinct, LastSeen, Table, Window, BUCKETS, SEEN};

/// `[fraud]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FraudSection {
    /// The rules file (see `specs/fraud-rules.toml`); reloaded on SIGHUP and
    /// `POST /api/fraud/reload`.
    pub rules: std::path::PathBuf,
}


/// Most rules in one file (the verdict is a 64-bit mask).
pub const MAX_RULES: usize = 64;

/// `off`, `shadow` or `active`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Not evaluated.
    Off,
    /// Evaluated and recorded; never declines.
    Shadow,
    /// Evaluated; declines when it fires.
    Active,
}

/// What a velocity rule counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyBy {
    /// The card (its HMAC).
    Pan,
    /// DE41.
    Terminal,
    /// DE42.
    Merchant,
}

/// An MCC and its amount limit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MccLimit {
    /// Merchant category code.
    pub mcc: u16,
    /// Largest amount allowed, minor units.
    pub max_amount_minor: u64,
}

/// A card range's home.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardRange {
    /// PAN prefix.
    pub prefix: String,
    /// ISO 3166 numeric country.
    pub country: u16,
    /// ISO 4217 numeric currency.
    pub currency: u16,
}

/// Where a terminal is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalLocation {
    /// DE41.
    pub terminal: String,
    /// Degrees.
    pub lat: f64,
    /// Degrees.
    pub lon: f64,
}

/// The kind of a rule and its parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Kind {
    /// Count and amount over a sliding window.
    Velocity {
        /// What to count by.
        key: KeyBy,
        /// Window length, seconds (at least 8).
        window_s: u32,
        /// More transactions than this fire.
        #[serde(default)]
        max_count: Option<u32>,
        /// A larger total amount fires.
        #[serde(default)]
        max_amount_minor: Option<u64>,
    },
    /// Distinct cards per terminal.
    CardTesting {
        /// Window length, seconds.
        window_s: u32,
        /// More distinct cards than this fire (at most 31).
        max_distinct_cards: u32,
    },
    /// Amount limits by MCC.
    MccAmountLimit {
        /// The limits.
        limits: Vec<MccLimit>,
    },
    /// MCCs that always fire.
    HighRiskMcc {
        /// The MCCs.
        mccs: Vec<u16>,
    },
    /// Cards and ranges that always fire.
    BlockList {
        /// PAN HMACs as in the journal (hex).
        #[serde(default)]
        pan_hmacs: Vec<String>,
        /// Card-range prefixes.
        #[serde(default)]
        ranges: Vec<String>,
    },
    /// Card country (and currency) against the transaction's.
    CountryMismatch {
        /// Also compare the card's currency with DE49.
        #[serde(default)]
        currency: bool,
    },
    /// Card-not-present above an amount.
    CardNotPresent {
        /// DE22 prefixes that mean card not present.
        #[serde(default = "cnp_modes")]
        entry_modes: Vec<String>,
        /// A larger amount fires.
        max_amount_minor: u64,
    },
    /// Expired card.
    ExpiredCard {},
    /// Magnetic stripe read after a chip failure (DE22 80x).
    ChipFallback {},
    /// Two uses too far apart for the time between them.
    ImpossibleTravel {
        /// Fastest believable travel, km/h.
        max_speed_kmh: u32,
    },
    /// Weighted score of the other rules.
    Score {
        /// Flag (record) at this score.
        flag_at: u32,
        /// Decline at this score.
        decline_at: u32,
    },
}

fn cnp_modes() -> Vec<String> {
    ["01", "10", "81"].map(str::to_owned).to_vec()
}

/// `[settings]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Keys tracked per stateful rule.
    pub max_keys: usize,
    /// Response code of a decline when the rule names none (59: suspected fraud).
    pub decline_code: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_keys: 1_000_000,
            decline_code: "59".into(),
        }
    }
}

/// A compiled rule.
struct Rule {
    name: String,
    reason: String,
    mode: Mode,
    /// `None`: the rule only adds its weight to the score.
    action: Option<ResponseCode>,
    weight: u32,
    check: Check,
    hits: AtomicU64,
    shadow_hits: AtomicU64,
}

enum Check {
    Velocity {
        key: KeyBy,
        bucket_s: u32,
        max_count: Option<u32>,
        max_amount: Option<u64>,
        state: Arc<Table<Window>>,
    },
    CardTesting {
        window_s: u32,
        max: u32,
        state: Arc<Table<Distinct>>,
    },
    MccAmount(HashMap<u16, u64>),
    HighRiskMcc(HashSet<u16>),
    BlockList {
        hmacs: HashSet<String>,
        ranges: Vec<String>,
    },
    CountryMismatch {
        currency: bool,
    },
    CardNotPresent {
        modes: Vec<String>,
        max: u64,
    },
    Expired,
    ChipFallback,
    ImpossibleTravel {
        max_kmh: f64,
        state: Arc<Table<LastSeen>>,
    },
    Score {
        flag_at: u32,
        decline_at: u32,
    },
}

/// What the engine needs to know of a transaction, borrowed from the request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Txn<'a> {
    /// PAN digits.
    pub pan: &'a str,
    /// PAN HMAC (hex), as in the journal.
    pub pan_hmac: &'a str,
    /// DE41.
    pub terminal: &'a str,
    /// DE42.
    pub merchant: &'a str,
    /// DE4, minor units.
    pub amount: u64,
    /// DE18.
    pub mcc: Option<u16>,
    /// DE49.
    pub currency: Option<u16>,
    /// DE19.
    pub country: Option<u16>,
    /// DE22.
    pub entry_mode: Option<&'a str>,
    /// YYMM (DE14 or track 2).
    pub expiry: Option<&'a str>,
    /// This month, YYMM.
    pub month: &'a str,
    /// Now, Unix seconds.
    pub now_s: u32,
}

/// The engine's answer for one transaction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Active rules that fired (bit = rule index).
    pub fired: u64,
    /// Shadow rules that fired.
    pub shadow: u64,
    /// The weighted score of the active rules that fired.
    pub score: u32,
    /// The score reached a flag threshold.
    pub flagged: bool,
    /// The decline: rule index and response code.
    pub decline: Option<(usize, ResponseCode)>,
}

impl Verdict {
    /// Whether anything fired or flagged (worth recording).
    #[must_use]
    pub fn is_notable(&self) -> bool {
        self.fired != 0 || self.shadow != 0 || self.flagged
    }
}

/// Hit counters of one rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleStats {
    /// Rule name.
    pub name: String,
    /// `off`, `shadow`, `active`.
    pub mode: Mode,
    /// Times it fired (active).
    pub hits: u64,
    /// Times it fired in shadow mode.
    pub shadow_hits: u64,
}

/// A loaded rule set with its state.
pub struct Engine {
    rules: Vec<Rule>,
    ranges: Vec<CardRange>,
    terminals: HashMap<String, (f64, f64)>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("rules", &self.rules.len())
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    settings: Settings,
    #[serde(default)]
    rules: Vec<toml::Table>,
    #[serde(default)]
    card_ranges: Vec<CardRange>,
    #[serde(default)]
    terminals: Vec<TerminalLocation>,
}

fn code(c: &str, what: &str) -> Result<ResponseCode> {
    let b: [u8; 2] = c
        .as_bytes()
        .try_into()
        .map_err(|_| anyhow::anyhow!("{what}: response code {c:?} is not two characters"))?;
    ResponseCode::new(b).ok_or_else(|| anyhow::anyhow!("{what}: response code {c:?} is not valid"))
}

fn hash_str(s: &str) -> u64 {
    // SipHash with fixed keys: the same key on every node and after every reload.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// The table key of a PAN HMAC: its first 16 hex digits.
fn pan_key(hmac: &str) -> u64 {
    hmac.get(..16)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or_else(|| hash_str(hmac))
}

fn km_between(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (la1, lo1) = (a.0.to_radians(), a.1.to_radians());
    let (la2, lo2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * 6_371.0 * h.sqrt().min(1.0).asin()
}

impl Engine {
    /// Parses and compiles a rules file.
    ///
    /// # Errors
    /// A message naming the rule and the problem; nothing is half-loaded.
    pub fn from_toml(text: &str) -> Result<Self> {
        Self::from_toml_keeping(text, None)
    }

    /// As [`Engine::from_toml`], keeping the state of rules of `previous` whose name, kind and
    /// state-shaping parameters are unchanged (a reload does not forget velocity windows).
    ///
    /// # Errors
    /// As [`Engine::from_toml`].
    pub fn from_toml_keeping(text: &str, previous: Option<&Engine>) -> Result<Self> {
        let raw: RawFile = toml::from_str(text).context("fraud rules")?;
        if raw.rules.len() > MAX_RULES {
            bail!("fraud rules: at most {MAX_RULES} rules");
        }
        let default_action = code(&raw.settings.decline_code, "settings.decline_code")?;
        if raw.settings.max_keys == 0 {
            bail!("settings.max_keys: must be positive");
        }
        let mut names = HashSet::new();
        let mut rules = Vec::new();
        let mut scores = 0;
        for (i, mut t) in raw.rules.into_iter().enumerate() {
            let name = match t.remove("name") {
                Some(toml::Value::String(s)) if !s.is_empty() => s,
                _ => bail!("rule {}: a name is needed", i + 1),
            };
            let what = format!("rule {name}");
            if !names.insert(name.clone()) {
                bail!("{what}: name used twice");
            }
            let mode: Mode = match t.remove("mode") {
                Some(v) => v.try_into().with_context(|| format!("{what}: mode"))?,
                None => Mode::Active,
            };
            let action = match t.remove("action") {
                Some(toml::Value::String(s)) if s == "none" => None,
                Some(toml::Value::String(s)) => Some(code(&s, &what)?),
                Some(_) => bail!("{what}: action must be a response code or \"none\""),
                None => Some(default_action),
            };
            let cap = match t.remove("max_keys") {
                Some(toml::Value::Integer(k)) if k > 0 => {
                    usize::try_from(k).map_err(|_| anyhow::anyhow!("{what}: max_keys too large"))?
                }
                Some(_) => bail!("{what}: max_keys must be a positive number"),
                None => raw.settings.max_keys,
            };
            let weight = match t.remove("weight") {
                Some(toml::Value::Integer(w)) => u32::try_from(w)
                    .map_err(|_| anyhow::anyhow!("{what}: weight 0 to 4294967295"))?,
                Some(_) => bail!("{what}: weight must be a number"),
                None => 0,
            };
            let kind: Kind = toml::Value::Table(t)
                .try_into()
                .with_context(|| what.clone())?;
            let kept = |matches: &dyn Fn(&Check) -> bool| {
                previous
                    .and_then(|p| p.rules.iter().find(|r| r.name == name))
                    .filter(|r| matches(&r.check))
            };
            let (check, reason) = match kind {
                Kind::Velocity {
                    key,
                    window_s,
                    max_count,
                    max_amount_minor,
                } => {
                    if window_s < 8 {
                        bail!("{what}: window_s at least 8");
                    }
                    if max_count.is_none() && max_amount_minor.is_none() {
                        bail!("{what}: max_count or max_amount_minor is needed");
                    }
                    let bucket_s = window_s / u32::try_from(BUCKETS).unwrap_or(8);
                    let state = kept(&|c| {
                        matches!(c, Check::Velocity { key: k, bucket_s: b, state: s, .. }
                            if *k == key && *b == bucket_s && s.capacity() >= cap)
                    })
                    .and_then(|r| match &r.check {
                        Check::Velocity { state, .. } => Some(Arc::clone(state)),
                        _ => None,
                    })
                    .unwrap_or_else(|| Arc::new(Table::new(cap)));
                    (
                        Check::Velocity {
                            key,
                            bucket_s,
                            max_count,
                            max_amount: max_amount_minor,
                            state,
                        },
                        format!(
                            "{key:?} velocity over {window_s} s{}{}",
                            max_count.map_or(String::new(), |c| format!(" > {c} transactions")),
                            max_amount_minor
                                .map_or(String::new(), |a| format!(" or > {a} minor units"))
                        ),
                    )
                }
                Kind::CardTesting {
                    window_s,
                    max_distinct_cards,
                } => {
                    if max_distinct_cards == 0
                        || max_distinct_cards >= u32::try_from(SEEN).unwrap_or(32)
                    {
                        bail!("{what}: max_distinct_cards 1 to {}", SEEN - 1);
                    }
                    let state = kept(&|c| {
                        matches!(c, Check::CardTesting { state: s, .. } if s.capacity() >= cap)
                    })
                    .and_then(|r| match &r.check {
                        Check::CardTesting { state, .. } => Some(Arc::clone(state)),
                        _ => None,
                    })
                    .unwrap_or_else(|| Arc::new(Table::new(cap)));
                    (
                        Check::CardTesting {
                            window_s,
                            max: max_distinct_cards,
                            state,
                        },
                        format!(
                            "more than {max_distinct_cards} cards at the terminal in {window_s} s"
                        ),
                    )
                }
                Kind::MccAmountLimit { limits } => (
                    Check::MccAmount(limits.iter().map(|l| (l.mcc, l.max_amount_minor)).collect()),
                    "amount above the MCC's limit".into(),
                ),
                Kind::HighRiskMcc { mccs } => (
                    Check::HighRiskMcc(mccs.into_iter().collect()),
                    "high-risk MCC".into(),
                ),
                Kind::BlockList { pan_hmacs, ranges } => (
                    Check::BlockList {
                        hmacs: pan_hmacs.iter().map(|h| h.to_ascii_lowercase()).collect(),
                        ranges,
                    },
                    "card or range on the block list".into(),
                ),
                Kind::CountryMismatch { currency } => (
                    Check::CountryMismatch { currency },
                    if currency {
                        "card country or currency differs from the transaction's".into()
                    } else {
                        "card country differs from the transaction's".into()
                    },
                ),
                Kind::CardNotPresent {
                    entry_modes,
                    max_amount_minor,
                } => (
                    Check::CardNotPresent {
                        modes: entry_modes,
                        max: max_amount_minor,
                    },
                    format!("card not present above {max_amount_minor} minor units"),
                ),
                Kind::ExpiredCard {} => (Check::Expired, "expired card".into()),
                Kind::ChipFallback {} => (
                    Check::ChipFallback,
                    "chip fallback to magnetic stripe".into(),
                ),
                Kind::ImpossibleTravel { max_speed_kmh } => {
                    let state = kept(&|c| {
                        matches!(c, Check::ImpossibleTravel { state: s, .. } if s.capacity() >= cap)
                    })
                    .and_then(|r| match &r.check {
                        Check::ImpossibleTravel { state, .. } => Some(Arc::clone(state)),
                        _ => None,
                    })
                    .unwrap_or_else(|| Arc::new(Table::new(cap)));
                    (
                        Check::ImpossibleTravel {
                            max_kmh: f64::from(max_speed_kmh),
                            state,
                        },
                        format!("travel faster than {max_speed_kmh} km/h"),
                    )
                }
                Kind::Score {
                    flag_at,
                    decline_at,
                } => {
                    scores += 1;
                    if flag_at > decline_at {
                        bail!("{what}: flag_at above decline_at");
                    }
                    (
                        Check::Score {
                            flag_at,
                            decline_at,
                        },
                        format!("score at or above {decline_at}"),
                    )
                }
            };
            // Hit counters go on across reloads for a rule of the same name.
            let before = previous.and_then(|p| p.rules.iter().find(|r| r.name == name));
            let count = |f: fn(&Rule) -> &AtomicU64| {
                AtomicU64::new(before.map_or(0, |r| f(r).load(Ordering::Relaxed)))
            };
            rules.push(Rule {
                hits: count(|r| &r.hits),
                shadow_hits: count(|r| &r.shadow_hits),
                name,
                reason,
                mode,
                action,
                weight,
                check,
            });
        }
        if scores > 1 {
            bail!("fraud rules: at most one score rule");
        }
        let mut ranges = raw.card_ranges;
        ranges.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        let terminals = raw
            .terminals
            .into_iter()
            .map(|t| (t.terminal, (t.lat, t.lon)))
            .collect();
        Ok(Self {
            rules,
            ranges,
            terminals,
        })
    }

    /// Rules loaded.
    #[must_use]
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether no rule is loaded.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Memory of the keyed state, bytes.
    #[must_use]
    pub fn state_bytes(&self) -> usize {
        self.rules
            .iter()
            .map(|r| match &r.check {
                Check::Velocity { state, .. } => state.bytes(),
                Check::CardTesting { state, .. } => state.bytes(),
                Check::ImpossibleTravel { state, .. } => state.bytes(),
                _ => 0,
            })
            .sum()
    }

    /// Hit counters per rule.
    #[must_use]
    pub fn stats(&self) -> Vec<RuleStats> {
        self.rules
            .iter()
            .map(|r| RuleStats {
                name: r.name.clone(),
                mode: r.mode,
                hits: r.hits.load(Ordering::Relaxed),
                shadow_hits: r.shadow_hits.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// The rule's name and reason, by index.
    #[must_use]
    pub fn rule(&self, ix: usize) -> Option<(&str, &str, Mode)> {
        self.rules
            .get(ix)
            .map(|r| (r.name.as_str(), r.reason.as_str(), r.mode))
    }

    /// The fired rules of a verdict as `name (reason)` items, `shadow:` before shadow ones.
    #[must_use]
    pub fn explain(&self, v: &Verdict) -> Vec<String> {
        let mut out = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            let bit = 1u64 << i;
            if v.fired & bit != 0 {
                out.push(format!("{} ({})", r.name, r.reason));
            } else if v.shadow & bit != 0 {
                out.push(format!("shadow:{} ({})", r.name, r.reason));
            }
        }
        if v.flagged && v.decline.is_none() {
            out.push(format!("flagged: score {}", v.score));
        }
        out
    }

    fn card_home(&self, pan: &str) -> Option<&CardRange> {
        self.ranges
            .iter()
            .find(|r| pan.starts_with(r.prefix.as_str()))
    }

    /// Evaluates every rule that is not off, updates their state, counts hits.
    #[must_use]
    pub fn evaluate(&self, t: &Txn<'_>) -> Verdict {
        let mut v = Verdict::default();
        let pan_k = pan_key(t.pan_hmac);
        let mut score_rule = None;
        for (i, r) in self.rules.iter().enumerate() {
            if r.mode == Mode::Off {
                continue;
            }
            let fired = match &r.check {
                Check::Velocity {
                    key,
                    bucket_s,
                    max_count,
                    max_amount,
                    state,
                } => {
                    let k = match key {
                        KeyBy::Pan => pan_k,
                        KeyBy::Terminal => hash_str(t.terminal),
                        KeyBy::Merchant => hash_str(t.merchant),
                    };
                    state
                        .with(k, t.now_s, |w| w.add(t.now_s, *bucket_s, t.amount))
                        .is_some_and(|(count, amount)| {
                            max_count.is_some_and(|m| count > m)
                                || max_amount.is_some_and(|m| amount > m)
                        })
                }
                Check::CardTesting {
                    window_s,
                    max,
                    state,
                } => {
                    let card = u32::try_from((pan_k ^ (pan_k >> 32)) & 0xFFFF_FFFF).unwrap_or(1);
                    state
                        .with(hash_str(t.terminal), t.now_s, |d| {
                            d.add(card, t.now_s, t.now_s.saturating_sub(*window_s))
                        })
                        .is_some_and(|n| n > *max)
                }
                Check::MccAmount(limits) => t
                    .mcc
                    .and_then(|m| limits.get(&m))
                    .is_some_and(|limit| t.amount > *limit),
                Check::HighRiskMcc(mccs) => t.mcc.is_some_and(|m| mccs.contains(&m)),
                Check::BlockList { hmacs, ranges } => {
                    hmacs.contains(t.pan_hmac)
                        || ranges.iter().any(|p| t.pan.starts_with(p.as_str()))
                }
                Check::CountryMismatch { currency } => self.card_home(t.pan).is_some_and(|h| {
                    t.country.is_some_and(|c| c != h.country)
                        || (*currency && t.currency.is_some_and(|c| c != h.currency))
                }),
                Check::CardNotPresent { modes, max } => {
                    t.amount > *max
                        && t.entry_mode
                            .is_some_and(|e| modes.iter().any(|m| e.starts_with(m.as_str())))
                }
                Check::Expired => t.expiry.is_some_and(|e| e.len() == 4 && e < t.month),
                Check::ChipFallback => t.entry_mode.is_some_and(|e| e.starts_with("80")),
                Check::ImpossibleTravel { max_kmh, state } => {
                    match self.terminals.get(t.terminal) {
                        None => false,
                        Some(&(lat, lon)) => state
                            .with(pan_k, t.now_s, |last| {
                                let fired = last.known && {
                                    let km = km_between((last.lat, last.lon), (lat, lon));
                                    let hours =
                                        f64::from(t.now_s.saturating_sub(last.at_s)) / 3600.0;
                                    km > 50.0 && (hours <= 0.0 || km / hours > *max_kmh)
                                };
                                *last = LastSeen {
                                    lat,
                                    lon,
                                    at_s: t.now_s,
                                    known: true,
                                };
                                fired
                            })
                            .unwrap_or(false),
                    }
                }
                Check::Score { .. } => {
                    score_rule = Some(i);
                    false
                }
            };
            if fired {
                let bit = 1u64 << i;
                match r.mode {
                    Mode::Active => {
                        v.fired |= bit;
                        v.score = v.score.saturating_add(r.weight);
                        r.hits.fetch_add(1, Ordering::Relaxed);
                        if let (None, Some(action)) = (v.decline, r.action) {
                            v.decline = Some((i, action));
                        }
                    }
                    Mode::Shadow => {
                        v.shadow |= bit;
                        r.shadow_hits.fetch_add(1, Ordering::Relaxed);
                    }
                    Mode::Off => {}
                }
            }
        }
        if let Some(i) = score_rule {
            if let Some(r) = self.rules.get(i) {
                if let Check::Score {
                    flag_at,
                    decline_at,
                } = r.check
                {
                    let bit = 1u64 << i;
                    v.flagged = v.score >= flag_at;
                    if v.score >= decline_at {
                        match r.mode {
                            Mode::Active => {
                                v.fired |= bit;
                                r.hits.fetch_add(1, Ordering::Relaxed);
                                if let (None, Some(action)) = (v.decline, r.action) {
                                    v.decline = Some((i, action));
                                }
                            }
                            Mode::Shadow => {
                                v.shadow |= bit;
                                r.shadow_hits.fetch_add(1, Ordering::Relaxed);
                            }
                            Mode::Off => {}
                        }
                    }
                }
            }
        }
        v
    }
}

/// A rules file and the engine loaded from it; reloaded whole or not at all.
#[derive(Debug)]
pub struct Rules {
    path: std::path::PathBuf,
    engine: std::sync::RwLock<Arc<Engine>>,
}

impl Rules {
    /// Loads the file.
    ///
    /// # Errors
    /// The file cannot be read or does not validate.
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let engine = Engine::from_toml(&text).with_context(|| format!("{}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            engine: std::sync::RwLock::new(Arc::new(engine)),
        })
    }

    /// The engine in use.
    #[must_use]
    pub fn engine(&self) -> Option<Arc<Engine>> {
        self.engine.read().ok().map(|e| Arc::clone(&e))
    }

    /// Reads the file again; a file that does not validate changes nothing. The state of
    /// unchanged stateful rules is kept. Returns the number of rules now in use.
    ///
    /// # Errors
    /// The file cannot be read or does not validate (the running rules stay).
    pub fn reload(&self) -> Result<usize> {
        let text = std::fs::read_to_string(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        let current = self.engine();
        let engine = Engine::from_toml_keeping(&text, current.as_deref())
            .with_context(|| format!("{}", self.path.display()))?;
        let n = engine.len();
        if let Ok(mut e) = self.engine.write() {
            *e = Arc::new(engine);
        }
        Ok(n)
    }
}

/// YYMM of a Unix time (UTC), without allocating: days to civil date (H. Hinnant's algorithm).
#[must_use]
pub fn yymm(unix_s: u64) -> [u8; 4] {
    let days = i64::try_from(unix_s / 86_400).unwrap_or(0) + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let digit = |v: i64| u8::try_from(v.rem_euclid(10)).map_or(b'0', |d| b'0' + d);
    [
        digit(year / 10),
        digit(year),
        digit(month / 10),
        digit(month),
    ]
}

#[cfg(test)]
mod tests;
