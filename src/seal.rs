//! Sealing card data that must be kept to be sent again (store-and-forward messages, replies
//! kept for duplicates): AES-256-GCM under the configured data key, never stored in clear.
//!
//! A sealed value is `<key id>:<hex of nonce and ciphertext>`; the key id leaves room for key
//! rotation (several keys, the newest sealing, any of them opening).

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use anyhow::{bail, Context, Result};
use zeroize::Zeroizing;

/// Seals and opens with one key.
#[derive(Clone)]
pub struct Sealer {
    id: String,
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

const NONCE: usize = 12;

impl Sealer {
    /// A sealer from a hex key of 32 bytes; an empty key draws a random one (sealed values then
    /// do not survive a restart).
    ///
    /// # Errors
    /// A key that is not 64 hex characters.
    pub fn from_hex(id: &str, key_hex: &str) -> Result<Self> {
        let key = if key_hex.is_empty() {
            Zeroizing::new(Aes256Gcm::generate_key(OsRng).to_vec())
        } else {
            let key = Zeroizing::new(hex::decode(key_hex).context("not hex")?);
            if key.len() != 32 {
                bail!("32 bytes (64 hex characters) are needed");
            }
            key
        };
        Ok(Self {
            id: id.to_owned(),
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key)),
        })
    }

    /// The sealed form of `clear`.
    #[must_use]
    pub fn seal(&self, clear: &[u8]) -> String {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
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
        if id != self.id {
            return None;
        }
        let bytes = hex::decode(body).ok()?;
        let (nonce, ct) = (bytes.get(..NONCE)?, bytes.get(NONCE..)?);
        self.cipher
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
}
