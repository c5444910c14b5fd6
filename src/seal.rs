//! Sealing card data that must be kept to be sent again (store-and-forward messages, replies
//! kept for duplicates): AES-256-GCM under the configured data key, never stored in clear.
//!
//! A sealed value is `<key id>:<hex of nonce and ciphertext>`; the key id leaves room for key
//! rotation (several keys, the newest sealing, any of them opening).

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use anyhow::{bail, Context, Result};
use zeroize::Zeroizing;

/// Seals with the current key and opens with it or any retired key (a key ring): after a
/// rotation, entries sealed under older key ids still open.
#[derive(Clone)]
pub struct Sealer {
    id: String,
    cipher: Aes256Gcm,
    retired: Vec<(String, Aes256Gcm)>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("id", &self.id)
            .field(
                "retired",
                &self.retired.iter().map(|r| &r.0).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

const NONCE: usize = 12;

fn cipher(key: &[u8]) -> Result<Aes256Gcm> {
    if key.len() != 32 {
        bail!("32 bytes (64 hex characters) are needed");
    }
    Ok(Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key)))
}

impl Sealer {
    /// A sealer from a hex key of 32 bytes; an empty key draws a random one from the operating
    /// system (sealed values then do not survive a restart).
    ///
    /// # Errors
    /// A key that is not 64 hex characters.
    pub fn from_hex(id: &str, key_hex: &str) -> Result<Self> {
        let key = if key_hex.is_empty() {
            Zeroizing::new(Aes256Gcm::generate_key(OsRng).to_vec())
        } else {
            Zeroizing::new(hex::decode(key_hex).context("not hex")?)
        };
        Self::new(id, &key, &[])
    }

    /// A sealer sealing under `key` (id `id`) and opening under it and the retired keys.
    ///
    /// # Errors
    /// A key that is not 32 bytes.
    pub fn new(id: &str, key: &[u8], retired: &[(String, Zeroizing<Vec<u8>>)]) -> Result<Self> {
        Ok(Self {
            id: id.to_owned(),
            cipher: cipher(key)?,
            retired: retired
                .iter()
                .map(|(id, k)| Ok((id.clone(), cipher(k).with_context(|| format!("key {id}"))?)))
                .collect::<Result<_>>()?,
        })
    }

    /// The id of the key that seals.
    #[must_use]
    pub fn key_id(&self) -> &str {
        &self.id
    }

    /// Whether a sealed value is under the key that seals now (re-sealing skips it).
    #[must_use]
    pub fn is_current(&self, sealed: &str) -> bool {
        sealed.split_once(':').is_some_and(|(id, _)| id == self.id)
    }

    /// The sealed form of `clear`.
    #[must_use]
    pub fn seal(&self, clear: &[u8]) -> String {
        let nonce = Aes256Gcm::generate_nonce(&mut rand::thread_rng());
        // Encryption with a 12-byte nonce into a Vec cannot fail.
        let sealed = self.cipher.encrypt(&nonce, clear).unwrap_or_default();
        let mut out = String::with_capacity(self.id.len() + 1 + 2 * (NONCE + sealed.len()));
        out.push_str(&self.id);
        out.push(':');
        out.push_str(&hex::encode(nonce));
        out.push_str(&hex::encode(sealed));
        out
    }

    /// The clear bytes of a sealed value; `None` when it was sealed under another key or altered.
    #[must_use]
    pub fn open(&self, sealed: &str) -> Option<Zeroizing<Vec<u8>>> {
        let (id, body) = sealed.split_once(':')?;
        let cipher = if id == self.id {
            &self.cipher
        } else {
            &self.retired.iter().find(|(r, _)| r == id)?.1
        };
        let bytes = hex::decode(body).ok()?;
        let (nonce, ct) = (bytes.get(..NONCE)?, bytes.get(NONCE..)?);
        cipher
            .decrypt(Nonce::from_slice(nonce), ct)
            .ok()
            .map(Zeroizing::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_and_detects_tampering() {
        let s = Sealer::from_hex("k1", &"11".repeat(32)).unwrap();
        let sealed = s.seal(b"4761739001010010");
        assert!(!sealed.contains("4761739001010010"));
        assert!(sealed.starts_with("k1:"));
        assert_eq!(&s.open(&sealed).unwrap()[..], b"4761739001010010");
        let mut tampered = sealed.clone().into_bytes();
        let last = tampered.len() - 1;
        tampered[last] = if tampered[last] == b'0' { b'1' } else { b'0' };
        assert!(s.open(std::str::from_utf8(&tampered).unwrap()).is_none());
        let other = Sealer::from_hex("k1", &"22".repeat(32)).unwrap();
        assert!(other.open(&sealed).is_none());
        assert!(Sealer::from_hex("k1", "abcd").is_err());
    }

    #[test]
    fn a_rotated_ring_opens_old_entries_and_seals_under_the_new_key() {
        let old = Sealer::from_hex("k1", &"11".repeat(32)).unwrap();
        let sealed_old = old.seal(b"old entry");
        let ring = Sealer::new(
            "k2",
            &[0x22; 32],
            &[("k1".to_owned(), Zeroizing::new(vec![0x11; 32]))],
        )
        .unwrap();
        assert_eq!(&ring.open(&sealed_old).unwrap()[..], b"old entry");
        assert!(!ring.is_current(&sealed_old));
        let sealed_new = ring.seal(b"new entry");
        assert!(sealed_new.starts_with("k2:") && ring.is_current(&sealed_new));
        assert!(
            old.open(&sealed_new).is_none(),
            "the old key alone cannot open it"
        );
        // A retired key of the wrong size is refused.
        assert!(Sealer::new("k2", &[0; 32], &[("k1".into(), Zeroizing::new(vec![1; 5]))]).is_err());
    }
}
