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
//! Each kind has its own file under [`kinds`], with how its parameters compile and when it fires.
//!
//! Evaluation allocates nothing: keys are hashes, look-ups take `&str`, and the keyed state lives
//! in fixed-size tables ([`table`]) made when the rules are loaded, bounded by
//! `settings.max_keys` per rule (the stalest key of a full set makes room).

mod kinds;
mod model;
pub mod table;

use model::{hash_str, Compiling, Seen};
pub use model::{CardRange, KeyBy, MccLimit, Txn};

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cardswitch_codec::ResponseCode;
use serde::Deserialize;

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

/// A compiled check: one variant per rule kind, each in its own file under [`kinds`].
enum Check {
    Velocity(kinds::Velocity),
    CardTesting(kinds::CardTesting),
    MccAmount(kinds::MccAmountLimit),
    HighRiskMcc(kinds::HighRiskMcc),
    BlockList(kinds::BlockList),
    CountryMismatch(kinds::CountryMismatch),
    CardNotPresent(kinds::CardNotPresent),
    Expired(kinds::ExpiredCard),
    ChipFallback(kinds::ChipFallback),
    ImpossibleTravel(kinds::ImpossibleTravel),
    Score(kinds::Score),
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

/// The table key of a PAN HMAC: its first 16 hex digits.
fn pan_key(hmac: &str) -> u64 {
    hmac.get(..16)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or_else(|| hash_str(hmac))
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
            let c = Compiling { what: &what, cap };
            let prior = previous
                .and_then(|p| p.rules.iter().find(|r| r.name == name))
                .map(|r| &r.check);
            let (check, reason) = match kind {
                Kind::Velocity {
                    key,
                    window_s,
                    max_count,
                    max_amount_minor,
                } => {
                    let (v, why) = kinds::Velocity::compile(
                        &c,
                        match prior {
                            Some(Check::Velocity(p)) => Some(p),
                            _ => None,
                        },
                        key,
                        window_s,
                        max_count,
                        max_amount_minor,
                    )?;
                    (Check::Velocity(v), why)
                }
                Kind::CardTesting {
                    window_s,
                    max_distinct_cards,
                } => {
                    let prior = match prior {
                        Some(Check::CardTesting(p)) => Some(p),
                        _ => None,
                    };
                    let (v, why) =
                        kinds::CardTesting::compile(&c, prior, window_s, max_distinct_cards)?;
                    (Check::CardTesting(v), why)
                }
                Kind::MccAmountLimit { limits } => {
                    let (v, why) = kinds::MccAmountLimit::compile(&limits);
                    (Check::MccAmount(v), why)
                }
                Kind::HighRiskMcc { mccs } => {
                    let (v, why) = kinds::HighRiskMcc::compile(mccs);
                    (Check::HighRiskMcc(v), why)
                }
                Kind::BlockList { pan_hmacs, ranges } => {
                    let (v, why) = kinds::BlockList::compile(&pan_hmacs, ranges);
                    (Check::BlockList(v), why)
                }
                Kind::CountryMismatch { currency } => {
                    let (v, why) = kinds::CountryMismatch::compile(currency);
                    (Check::CountryMismatch(v), why)
                }
                Kind::CardNotPresent {
                    entry_modes,
                    max_amount_minor,
                } => {
                    let (v, why) = kinds::CardNotPresent::compile(entry_modes, max_amount_minor);
                    (Check::CardNotPresent(v), why)
                }
                Kind::ExpiredCard {} => {
                    let (v, why) = kinds::ExpiredCard::compile();
                    (Check::Expired(v), why)
                }
                Kind::ChipFallback {} => {
                    let (v, why) = kinds::ChipFallback::compile();
                    (Check::ChipFallback(v), why)
                }
                Kind::ImpossibleTravel { max_speed_kmh } => {
                    let prior = match prior {
                        Some(Check::ImpossibleTravel(p)) => Some(p),
                        _ => None,
                    };
                    let (v, why) = kinds::ImpossibleTravel::compile(&c, prior, max_speed_kmh);
                    (Check::ImpossibleTravel(v), why)
                }
                Kind::Score {
                    flag_at,
                    decline_at,
                } => {
                    scores += 1;
                    let (v, why) = kinds::Score::compile(&c, flag_at, decline_at)?;
                    (Check::Score(v), why)
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
                Check::Velocity(v) => v.state.bytes(),
                Check::CardTesting(v) => v.state.bytes(),
                Check::ImpossibleTravel(v) => v.state.bytes(),
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

    /// Evaluates every rule that is not off, updates their state, counts hits.
    #[must_use]
    pub fn evaluate(&self, t: &Txn<'_>) -> Verdict {
        let mut v = Verdict::default();
        let seen = Seen {
            txn: t,
            pan_key: pan_key(t.pan_hmac),
            ranges: &self.ranges,
            terminals: &self.terminals,
        };
        let mut score_rule = None;
        for (i, r) in self.rules.iter().enumerate() {
            if r.mode == Mode::Off {
                continue;
            }
            let fired = match &r.check {
                Check::Velocity(c) => c.fires(&seen),
                Check::CardTesting(c) => c.fires(&seen),
                Check::MccAmount(c) => c.fires(&seen),
                Check::HighRiskMcc(c) => c.fires(&seen),
                Check::BlockList(c) => c.fires(&seen),
                Check::CountryMismatch(c) => c.fires(&seen),
                Check::CardNotPresent(c) => c.fires(&seen),
                Check::Expired(c) => c.fires(&seen),
                Check::ChipFallback(c) => c.fires(&seen),
                Check::ImpossibleTravel(c) => c.fires(&seen),
                Check::Score(_) => {
                    score_rule = Some(i);
                    false
                }
            };
            if fired {
                hit(&mut v, i, r, r.weight);
            }
        }
        if let Some(i) = score_rule {
            if let Some(r) = self.rules.get(i) {
                if let Check::Score(kinds::Score {
                    flag_at,
                    decline_at,
                }) = r.check
                {
                    v.flagged = v.score >= flag_at;
                    if v.score >= decline_at {
                        // The score adds nothing to itself.
                        hit(&mut v, i, r, 0);
                    }
                }
            }
        }
        v
    }
}

/// Records that rule `i` fired: its bit and hit counter and, when active, its decline and
/// `weight` added to the score.
fn hit(v: &mut Verdict, i: usize, r: &Rule, weight: u32) {
    let bit = 1u64 << i;
    match r.mode {
        Mode::Active => {
            v.fired |= bit;
            v.score = v.score.saturating_add(weight);
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
