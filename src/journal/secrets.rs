//! The journal's own keys: the PAN HMAC key (card look-ups, block lists, duplicate content
//! hashes) and the data keys sealing stored messages and replies.
//!
//! A switch that starts with other keys than the ones its database was started with cannot
//! open queued reversals, replay stored replies or match HMAC-keyed lists: it refuses to start.
//! The first start stores a check value of each key (an HMAC of a fixed text under the key,
//! which reveals nothing of it) in `key_checks`; every start compares. Keys come from the
//! configuration, a file (`*_file`), or the environment (`CARDSWITCH__JOURNAL__DATA_KEY` ...).
//! Without them the switch refuses to start unless `ephemeral_keys = true` (demos and tests):
//! then keys are drawn from the operating system's generator for this process only, nothing is
//! stored, and a database that holds check values refuses them.
//!
//! The PAN HMAC carries no key version: it is a look-up key compared across rows, lists and
//! clearing files, so it cannot change without re-keying all of them at once. Data keys rotate:
//! `data_key_id` names the sealing key, `retired_data_keys` keeps the older ones for opening,
//! entries sealed under any of them open, and [`reseal`] (`cardswitch reseal`) re-seals stored
//! entries under the current key so that a retired key can then be dropped.

use std::collections::BTreeMap;
use std::path::Path;

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::OsRng;
use anyhow::{bail, Context, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::db::Statement;
use super::{now_us, Backend, JournalSection};
use crate::seal::Sealer;

/// How to make a key, for the messages that ask for one.
const HOW: &str =
    "make one with `openssl rand -hex 32` (or `head -c 32 /dev/urandom | xxd -p -c 64`)";

/// The keys the journal runs with.
pub(super) struct Secrets {
    pub(super) pan_hmac: Zeroizing<Vec<u8>>,
    pub(super) sealer: Sealer,
    /// Check values to store and verify: (name, check value).
    checks: Vec<(String, String)>,
    ephemeral: bool,
}

/// A key from its value or its file (exactly one of them), hex.
fn read_key(name: &str, value: &str, file: &str) -> Result<Option<Zeroizing<Vec<u8>>>> {
    let text = match (value.is_empty(), file.is_empty()) {
        (true, true) => return Ok(None),
        (false, false) => bail!("journal.{name} and journal.{name}_file: give one of them"),
        (false, true) => Zeroizing::new(value.to_owned()),
        (true, false) => Zeroizing::new(
            std::fs::read_to_string(Path::new(file))
                .with_context(|| format!("journal.{name}_file {file}"))?,
        ),
    };
    let key = hex::decode(text.trim()).with_context(|| format!("journal.{name}: not hex"))?;
    Ok(Some(Zeroizing::new(key)))
}

fn random_key() -> Zeroizing<Vec<u8>> {
    let mut k = Zeroizing::new(vec![0u8; 32]);
    OsRng.fill_bytes(&mut k);
    k
}

/// The check value of a key: the first 8 bytes of HMAC-SHA256 of a fixed text under it, hex.
fn check_value(key: &[u8]) -> String {
    // HMAC takes keys of any length: this cannot fail.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(b"cardswitch key check value");
    let full = mac.finalize().into_bytes();
    hex::encode(full.get(..8).unwrap_or_default())
}

/// A check value's name as the configuration spells the key.
fn shown(name: &str) -> String {
    match name.strip_prefix("data_key:") {
        Some(id) => format!("journal.data_key (id {id})"),
        None => format!("journal.{name}"),
    }
}

impl Secrets {
    /// The configured keys, or the reasons they are missing or malformed.
    ///
    /// # Errors
    /// Keys missing without `ephemeral_keys`, unreadable files, keys of the wrong size.
    pub(super) fn load(config: &JournalSection) -> Result<Self> {
        let pan = read_key(
            "pan_hmac_key",
            &config.pan_hmac_key,
            &config.pan_hmac_key_file,
        )?;
        let data = read_key("data_key", &config.data_key, &config.data_key_file)?;
        let ephemeral = pan.is_none() && data.is_none() && config.ephemeral_keys;
        let missing: Vec<&str> = [
            pan.is_none().then_some("journal.pan_hmac_key"),
            data.is_none().then_some("journal.data_key"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !missing.is_empty() && !ephemeral {
            bail!(
                "{} not set: the switch needs both keys to recognise duplicates, open queued \
                 reversals and match card lists after a restart and across nodes. Set them in the \
                 configuration, in a file (journal.pan_hmac_key_file, journal.data_key_file) or \
                 in the environment (CARDSWITCH__JOURNAL__PAN_HMAC_KEY, \
                 CARDSWITCH__JOURNAL__DATA_KEY): 64 hex characters each; {HOW}. For a throwaway \
                 journal, journal.ephemeral_keys = true draws keys for this process only",
                missing.join(" and ")
            );
        }
        let pan = pan.unwrap_or_else(random_key);
        if pan.len() < 32 {
            bail!("journal.pan_hmac_key: at least 32 bytes (64 hex characters); {HOW}");
        }
        let data = data.unwrap_or_else(random_key);
        let mut retired = Vec::new();
        for (id, hex_key) in &config.retired_data_keys {
            if id == &config.data_key_id {
                bail!("journal.retired_data_keys.{id}: the same id as journal.data_key_id");
            }
            let key = read_key(&format!("retired_data_keys.{id}"), hex_key, "")?
                .with_context(|| format!("journal.retired_data_keys.{id}: empty"))?;
            retired.push((id.clone(), key));
        }
        if config.data_key_id.is_empty() || config.data_key_id.contains(':') {
            bail!("journal.data_key_id: a short name without ':' (k1, k2 ...)");
        }
        let sealer =
            Sealer::new(&config.data_key_id, &data, &retired).context("journal.data_key")?;
        let mut checks = vec![
            ("pan_hmac_key".to_owned(), check_value(&pan)),
            (
                format!("data_key:{}", config.data_key_id),
                check_value(&data),
            ),
        ];
        checks.extend(
            retired
                .iter()
                .map(|(id, k)| (format!("data_key:{id}"), check_value(k))),
        );
        Ok(Self {
            pan_hmac: pan,
            sealer,
            checks,
            ephemeral,
        })
    }

    /// Stores the check values a database does not have yet and compares the others: a node
    /// with other keys than the database's is refused.
    ///
    /// # Errors
    /// A key whose check value differs, ephemeral keys on a database that has keys, or a
    /// database that cannot be read.
    pub(super) async fn verify(&self, backend: &Backend, node: &str) -> Result<()> {
        let stored: BTreeMap<String, String> = backend
            .fetch_all(&Statement::new("SELECT name, check_value FROM key_checks"))
            .await
            .context("reading key check values")?
            .into_iter()
            .map(|r| Ok((r.get::<String>(0)?, r.get::<String>(1)?)))
            .collect::<Result<_, sqlx::Error>>()?;
        if self.ephemeral {
            if !stored.is_empty() {
                bail!(
                    "journal.ephemeral_keys: this journal was started with keys of its own \
                     (check values in key_checks); give the switch those keys"
                );
            }
            return Ok(());
        }
        for (name, check) in &self.checks {
            match stored.get(name) {
                Some(s) if s == check => {}
                Some(s) => bail!(
                    "{}: not the key this journal was started with (check value {check}, the \
                     journal's {s}); every node of a journal needs the same keys",
                    shown(name)
                ),
                None => {
                    let st = Statement::new(
                        "INSERT INTO key_checks (name, check_value, created_us, node) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING",
                    )
                    .bind(name.as_str())
                    .bind(check.as_str())
                    .bind(now_us())
                    .bind(node);
                    backend
                        .execute(&st)
                        .await
                        .context("storing a key check value")?;
                    // Another node may have stored its own in the same instant: read it back.
                    let st = Statement::new("SELECT check_value FROM key_checks WHERE name = $1")
                        .bind(name.as_str());
                    let back: Option<String> = match backend.fetch_optional(&st).await? {
                        Some(r) => Some(r.get(0)?),
                        None => None,
                    };
                    if back.as_deref() != Some(check.as_str()) {
                        bail!(
                            "{}: another node stored other keys in this journal",
                            shown(name)
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

/// What a re-seal did.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Resealed {
    /// Values re-sealed under the current data key.
    pub resealed: u64,
    /// Values under the current key already.
    pub current: u64,
    /// Values no key of this switch opens (left as they are).
    pub unopenable: u64,
}

/// The sealed columns: (table, key column, sealed column, which rows). Keys are paged in order.
const SEALED: [(&str, &str, &str, &str); 3] = [
    ("saf", "id", "payload", "state = 'pending'"),
    ("dedup", "dkey", "reply", "reply IS NOT NULL"),
    ("forwards", "txn_id", "payload", "payload IS NOT NULL"),
];

/// Re-seals every stored sealed value (pending store-and-forward entries, stored replies,
/// write-ahead records) under the current data key, after the keys are verified against the
/// database as at a start.
///
/// # Errors
/// Keys that do not load or verify, and database errors.
pub async fn reseal(config: &JournalSection, node: &str) -> Result<Resealed> {
    let secrets = Secrets::load(config)?;
    let backend = Backend::connect(&config.url).await?;
    secrets.verify(&backend, node).await?;
    let sealer = &secrets.sealer;
    let mut out = Resealed::default();
    for (table, key, column, rows) in SEALED {
        // Paged by the key as text: the same statements on both backends, whatever its type.
        let mut after = String::new();
        loop {
            let st = Statement::new(format!(
                "SELECT CAST({key} AS TEXT), {column} FROM {table} WHERE {rows} \
                 AND CAST({key} AS TEXT) > $1 ORDER BY CAST({key} AS TEXT) LIMIT 1000"
            ))
            .bind(after.as_str());
            let page = backend.fetch_all(&st).await?;
            let Some(last) = page.last() else { break };
            after = last.get::<String>(0)?;
            for r in &page {
                let old: String = r.get(1)?;
                if sealer.is_current(&old) {
                    out.current += 1;
                    continue;
                }
                let Some(clear) = sealer.open(&old) else {
                    out.unopenable += 1;
                    continue;
                };
                let new = sealer.seal(&clear);
                let st = Statement::new(format!(
                    "UPDATE {table} SET {column} = $1 WHERE {column} = $2"
                ))
                .bind(new.as_str())
                .bind(old.as_str());
                backend.execute(&st).await?;
                out.resealed += 1;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn section() -> JournalSection {
        JournalSection {
            pan_hmac_key: "ab".repeat(32),
            data_key: "cd".repeat(32),
            ..JournalSection::default()
        }
    }

    #[test]
    fn keys_are_needed_unless_ephemeral() {
        let err = Secrets::load(&JournalSection::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("journal.pan_hmac_key and journal.data_key not set")
                && err.contains("openssl rand -hex 32"),
            "{err}"
        );
        let only_pan = JournalSection {
            data_key: String::new(),
            ..section()
        };
        let err = Secrets::load(&only_pan).err().unwrap().to_string();
        assert!(err.starts_with("journal.data_key not set"), "{err}");
        // Ephemeral keys only when none is given: half a configuration is a mistake.
        let half = JournalSection {
            ephemeral_keys: true,
            ..only_pan
        };
        assert!(Secrets::load(&half).is_err());
        let e = JournalSection {
            ephemeral_keys: true,
            ..JournalSection::default()
        };
        let a = Secrets::load(&e).unwrap();
        let b = Secrets::load(&e).unwrap();
        assert_ne!(a.pan_hmac, b.pan_hmac, "drawn afresh");
        assert!(a.ephemeral);
    }

    #[test]
    fn keys_from_files_and_their_check_values() {
        let dir = std::env::temp_dir().join(format!("cardswitch-keys-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("data.key");
        std::fs::write(&f, format!("{}\n", "cd".repeat(32))).unwrap();
        let from_file = JournalSection {
            data_key: String::new(),
            data_key_file: f.display().to_string(),
            ..section()
        };
        let a = Secrets::load(&from_file).unwrap();
        let b = Secrets::load(&section()).unwrap();
        assert_eq!(a.checks, b.checks, "the same keys, however given");
        let both = JournalSection {
            data_key_file: f.display().to_string(),
            ..section()
        };
        assert!(Secrets::load(&both).is_err());
        let short = JournalSection {
            pan_hmac_key: "ab".repeat(16),
            ..section()
        };
        assert!(Secrets::load(&short).is_err());
        let _ = std::fs::remove_dir_all(&dir);
        // A check value shows nothing of the key and differs between keys.
        let c = check_value(&[0xab; 32]);
        assert_eq!(c.len(), 16);
        assert!(!c.contains("abab"));
        assert_ne!(c, check_value(&[0xac; 32]));
    }
}
