//! Card security settings: which keys each terminal and acquirer uses, held only as the HSM
//! encrypted them under its LMK, each with its check value.
//!
//! Terminals (per listener, with per-terminal overrides by DE41) have a TPK for PIN blocks and
//! a TAK for MACs; acquirers (per endpoint) a ZPK, a ZAK, a ZMK for key exchange and a CVK for
//! stand-in CVV checks. At start every key's check value is computed by the HSM and compared
//! with the configured one; a mismatch stops the switch. A ZPK received in a key exchange
//! replaces the configured one and is kept in the journal database (under the LMK), so a
//! restart continues with it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use anyhow::{bail, Context, Result};
use cardswitch_codec::hsm::{KeyType, WrappedKey};
use serde::Deserialize;

use crate::hsm::Hsm;

/// A key under the LMK and its check value, as configured: `{ key = "U...", check = "ABC123" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The key under the LMK: 16 hex digits, or a scheme letter (U, X, T, Y) and its digits.
    pub key: String,
    /// Its check value (6 or 16 hex digits).
    pub check: String,
}

/// `[listeners.security]`: keys of the terminals on a listener.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TerminalSecurityConfig {
    /// Terminal PIN key used when no per-terminal key is set.
    #[serde(default)]
    pub tpk: Option<KeyConfig>,
    /// Terminal authentication key used when no per-terminal key is set.
    #[serde(default)]
    pub tak: Option<KeyConfig>,
    /// PIN block format of the terminals (Thales code: 01 ISO-0, 05 ISO-1, 47 ISO-3).
    #[serde(default = "iso0")]
    pub pin_format: String,
    /// Require and verify a MAC (DE64/DE128) on every card message; default: when a TAK is set.
    #[serde(default)]
    pub verify_mac: Option<bool>,
    /// Keys of particular terminals, by DE41.
    #[serde(default)]
    pub terminals: Vec<TerminalKeysConfig>,
}

/// One terminal's own keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalKeysConfig {
    /// DE41.
    pub terminal: String,
    /// Its TPK.
    #[serde(default)]
    pub tpk: Option<KeyConfig>,
    /// Its TAK.
    #[serde(default)]
    pub tak: Option<KeyConfig>,
}

/// `[endpoints.security]`: keys shared with an acquirer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSecurityConfig {
    /// Zone PIN key: PIN blocks are translated to it.
    #[serde(default)]
    pub zpk: Option<KeyConfig>,
    /// Zone authentication key: requests to the acquirer are MACed with it.
    #[serde(default)]
    pub zak: Option<KeyConfig>,
    /// Zone master key: new ZPKs arrive under it in key exchanges.
    #[serde(default)]
    pub zmk: Option<KeyConfig>,
    /// Card verification key pair, for CVV checks in stand-in.
    #[serde(default)]
    pub cvk: Option<KeyConfig>,
    /// PIN block format the acquirer expects.
    #[serde(default = "iso0")]
    pub pin_format: String,
    /// MAC every request sent (DE64/DE128); default: when a ZAK is set.
    #[serde(default)]
    pub generate_mac: Option<bool>,
    /// DE70 of the acquirer's key change (161 on most networks, 101 on some).
    #[serde(default = "default_key_change")]
    pub key_exchange_code: u16,
    /// Field carrying the new key: its scheme letter and digits under the ZMK, then its
    /// 6-digit check value.
    #[serde(default = "default_key_field")]
    pub key_field: u8,
}

fn iso0() -> String {
    "01".into()
}
const fn default_key_change() -> u16 {
    161
}
const fn default_key_field() -> u8 {
    48
}

/// A key under the LMK with its check value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// The key as the HSM encrypted it.
    pub key: WrappedKey,
    /// Its check value as configured or received (6 or 16 hex digits).
    pub check: String,
    /// What kind of key it is.
    pub kind: KeyType,
}

impl Key {
    fn parse(cfg: &KeyConfig, kind: KeyType, what: &str) -> Result<Self> {
        let key = WrappedKey::parse(&cfg.key).map_err(|_| {
            anyhow::anyhow!(
                "{what}: key is not a key under the LMK (16 hex digits, or U/X/T/Y and 32/48)"
            )
        })?;
        let check = cfg.check.to_ascii_uppercase();
        if !matches!(check.len(), 6 | 16) || !check.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("{what}: check value must be 6 or 16 hex digits");
        }
        Ok(Self { key, check, kind })
    }

    /// Asks the HSM for the key's check value and compares.
    ///
    /// # Errors
    /// The HSM cannot be asked or computes another value.
    pub async fn verify(&self, hsm: &Hsm, what: &str) -> Result<()> {
        let computed = hsm
            .check_value(self.kind, &self.key)
            .await
            .with_context(|| format!("{what}: check value"))?;
        if !computed.starts_with(&self.check) {
            bail!(
                "{what}: check value {} does not match the key (the HSM computes {})",
                self.check,
                computed.get(..self.check.len()).unwrap_or(&computed)
            );
        }
        Ok(())
    }
}

fn pin_format(code: &str, what: &str) -> Result<String> {
    if !matches!(code, "01" | "03" | "05" | "47") {
        bail!("{what}: pin_format {code:?} is not 01 (ISO-0), 03, 05 (ISO-1) or 47 (ISO-3)");
    }
    Ok(code.to_owned())
}

/// Keys of one terminal (or the listener's default).
#[derive(Debug, Clone, Default)]
pub(crate) struct TerminalKeys {
    /// PIN key.
    pub tpk: Option<Key>,
    /// MAC key.
    pub tak: Option<Key>,
}

/// A listener's terminal keys, resolved.
#[derive(Debug, Clone)]
pub struct ListenerSecurity {
    default: TerminalKeys,
    by_terminal: HashMap<String, TerminalKeys>,
    /// PIN block format of the terminals.
    pub pin_format: String,
    /// Whether card messages must carry a valid MAC.
    pub verify_mac: bool,
}

impl ListenerSecurity {
    /// Validates a listener's section.
    ///
    /// # Errors
    /// A key or check value that does not parse, or MACs required with no TAK.
    pub fn from_config(cfg: &TerminalSecurityConfig, listener: &str) -> Result<Self> {
        let what = |k: &str| format!("listener {listener}: security.{k}");
        let keys =
            |tpk: &Option<KeyConfig>, tak: &Option<KeyConfig>, at: &str| -> Result<TerminalKeys> {
                Ok(TerminalKeys {
                    tpk: tpk
                        .as_ref()
                        .map(|k| Key::parse(k, KeyType::TPK, &what(&format!("{at}tpk"))))
                        .transpose()?,
                    tak: tak
                        .as_ref()
                        .map(|k| Key::parse(k, KeyType::TAK, &what(&format!("{at}tak"))))
                        .transpose()?,
                })
            };
        let default = keys(&cfg.tpk, &cfg.tak, "")?;
        let mut by_terminal = HashMap::new();
        for t in &cfg.terminals {
            let k = keys(&t.tpk, &t.tak, &format!("terminals[{}].", t.terminal))?;
            if by_terminal.insert(t.terminal.clone(), k).is_some() {
                bail!(
                    "{}: terminal {} listed twice",
                    what("terminals"),
                    t.terminal
                );
            }
        }
        let any_tak = default.tak.is_some() || by_terminal.values().any(|k| k.tak.is_some());
        let verify_mac = cfg.verify_mac.unwrap_or(any_tak);
        if verify_mac && default.tak.is_none() && by_terminal.values().all(|k| k.tak.is_none()) {
            bail!("{}: verify_mac needs a tak", what("verify_mac"));
        }
        Ok(Self {
            default,
            by_terminal,
            pin_format: pin_format(&cfg.pin_format, &what("pin_format"))?,
            verify_mac,
        })
    }

    /// The keys of a terminal: its own where set, else the listener's.
    #[must_use]
    pub fn keys_for(&self, terminal: Option<&str>) -> (&Option<Key>, &Option<Key>) {
        let own = terminal.and_then(|t| self.by_terminal.get(t.trim_end()));
        let tpk = own.map(|k| &k.tpk).filter(|k| k.is_some());
        let tak = own.map(|k| &k.tak).filter(|k| k.is_some());
        (
            tpk.unwrap_or(&self.default.tpk),
            tak.unwrap_or(&self.default.tak),
        )
    }

    /// Every key with a name for messages.
    fn all(&self) -> Vec<(String, &Key)> {
        let mut v = Vec::new();
        for (who, k) in std::iter::once(("terminals".to_owned(), &self.default)).chain(
            self.by_terminal
                .iter()
                .map(|(t, k)| (format!("terminal {t}"), k)),
        ) {
            if let Some(x) = &k.tpk {
                v.push((format!("{who} TPK"), x));
            }
            if let Some(x) = &k.tak {
                v.push((format!("{who} TAK"), x));
            }
        }
        v
    }

    /// Verifies every key's check value with the HSM.
    ///
    /// # Errors
    /// The first key whose check value cannot be confirmed.
    pub async fn verify(&self, hsm: &Hsm, listener: &str) -> Result<()> {
        for (name, key) in self.all() {
            key.verify(hsm, &format!("listener {listener}: {name}"))
                .await?;
        }
        Ok(())
    }
}

/// An endpoint's keys, resolved. The ZPK can change while running (key exchange).
#[derive(Debug)]
pub struct EndpointSecurity {
    zpk: RwLock<Option<Arc<Key>>>,
    /// MAC key.
    pub zak: Option<Key>,
    /// Key-exchange key.
    pub zmk: Option<Key>,
    /// CVV key.
    pub cvk: Option<Key>,
    /// PIN block format the acquirer expects.
    pub pin_format: String,
    /// Whether requests to the acquirer carry a MAC.
    pub generate_mac: bool,
    /// DE70 of a key change.
    pub key_exchange_code: u16,
    /// Field carrying the new key.
    pub key_field: u8,
}

impl EndpointSecurity {
    /// Validates an endpoint's section.
    ///
    /// # Errors
    /// A key or check value that does not parse, or MACs wanted with no ZAK.
    pub fn from_config(cfg: &EndpointSecurityConfig, endpoint: &str) -> Result<Self> {
        let what = |k: &str| format!("endpoint {endpoint}: security.{k}");
        let parse = |k: &Option<KeyConfig>, kt: KeyType, name: &str| {
            k.as_ref()
                .map(|k| Key::parse(k, kt, &what(name)))
                .transpose()
        };
        let zak = parse(&cfg.zak, KeyType::ZAK, "zak")?;
        let generate_mac = cfg.generate_mac.unwrap_or(zak.is_some());
        if generate_mac && zak.is_none() {
            bail!("{}: generate_mac needs a zak", what("generate_mac"));
        }
        if !matches!(cfg.key_field, 48 | 53 | 96 | 120 | 123..=127) {
            bail!(
                "{}: key_field {} cannot carry a key",
                what("key_field"),
                cfg.key_field
            );
        }
        Ok(Self {
            zpk: RwLock::new(parse(&cfg.zpk, KeyType::ZPK, "zpk")?.map(Arc::new)),
            zak,
            zmk: parse(&cfg.zmk, KeyType::ZMK, "zmk")?,
            cvk: parse(&cfg.cvk, KeyType::CVK, "cvk")?,
            pin_format: pin_format(&cfg.pin_format, &what("pin_format"))?,
            generate_mac,
            key_exchange_code: cfg.key_exchange_code,
            key_field: cfg.key_field,
        })
    }

    /// The ZPK in use.
    #[must_use]
    pub fn zpk(&self) -> Option<Arc<Key>> {
        self.zpk.read().ok().and_then(|z| z.clone())
    }

    /// Replaces the ZPK (after a key exchange, or from the database at start).
    pub fn set_zpk(&self, key: Key) {
        if let Ok(mut z) = self.zpk.write() {
            *z = Some(Arc::new(key));
        }
    }

    /// Verifies every key's check value with the HSM.
    ///
    /// # Errors
    /// The first key whose check value cannot be confirmed.
    pub async fn verify(&self, hsm: &Hsm, endpoint: &str) -> Result<()> {
        let zpk = self.zpk();
        let keys = [
            ("ZPK", zpk.as_deref()),
            ("ZAK", self.zak.as_ref()),
            ("ZMK", self.zmk.as_ref()),
            ("CVK", self.cvk.as_ref()),
        ];
        for (name, key) in keys {
            if let Some(k) = key {
                k.verify(hsm, &format!("endpoint {endpoint}: {name}"))
                    .await?;
            }
        }
        Ok(())
    }

    /// Reads a key-change field: the new key under the ZMK, then its 6-digit check value.
    #[must_use]
    pub fn parse_key_field(value: &[u8]) -> Option<(WrappedKey, String)> {
        let text = std::str::from_utf8(value).ok()?.trim();
        let at = text.len().checked_sub(6)?;
        let (key, check) = text.split_at(at);
        let key = WrappedKey::parse(key).ok()?;
        check
            .bytes()
            .all(|b| b.is_ascii_hexdigit())
            .then(|| (key, check.to_ascii_uppercase()))
    }
}
