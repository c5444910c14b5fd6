//! The cryptography behind the HSM simulator, the terminal simulator's PIN blocks and MACs, and
//! the acquirer simulator's checks: DES keys, the Thales test LMK with its variants, keys under
//! a key-encrypting key in the payShield schemes, PIN block formats, Visa CVV and PVV, and the
//! ISO 9797-1 / X9.19 MACs.
//!
//! Block ciphers come from RustCrypto (`des`, `aes`, `cbc`); what is written here is only the
//! payment-specific glue around them (variants, PIN block layouts, decimalisation). Clear keys
//! live in [`ClearKey`], which masks itself in `Debug` and zeroizes on drop.

use std::fmt;

use aes::Aes128;
use cbc::cipher::{BlockDecrypt, BlockEncrypt, BlockEncryptMut, KeyInit, KeyIvInit};
use des::{Des, TdesEde2, TdesEde3};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

pub use cardswitch_codec::hsm::{account_of, KeyType, PinFormat, Scheme, WrappedKey};

/// One 8-byte DES block.
pub type Block = [u8; 8];

/// What went wrong, as a payShield error code where there is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// A key is not 8, 16 or 24 bytes.
    #[error("key length")]
    KeyLength,
    /// A key does not have odd parity (payShield 10 or 11).
    #[error("key parity")]
    Parity,
    /// The PIN block does not decode to a PIN (payShield 20).
    #[error("PIN block does not contain valid values")]
    PinBlock,
    /// The PIN block format code is not supported (payShield 23).
    #[error("PIN block format")]
    PinFormat,
    /// The PIN is shorter than 4 or longer than 12 digits (payShield 24).
    #[error("PIN length")]
    PinLength,
    /// A field is not what the command needs (payShield 15).
    #[error("invalid input")]
    Input,
}

impl From<cardswitch_codec::hsm::FieldError> for CryptoError {
    fn from(e: cardswitch_codec::hsm::FieldError) -> Self {
        match e {
            cardswitch_codec::hsm::FieldError::PinFormat => Self::PinFormat,
            _ => Self::Input,
        }
    }
}

/// A clear DES key: single, double or triple length. Masked in `Debug`, zeroized on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct ClearKey {
    bytes: [u8; 24],
    len: usize,
}

impl fmt::Debug for ClearKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClearKey([{} bytes masked])", self.len)
    }
}

impl ClearKey {
    /// A key from 8, 16 or 24 bytes.
    ///
    /// # Errors
    /// [`CryptoError::KeyLength`] for any other length.
    pub fn new(bytes: &[u8]) -> Result<Self, CryptoError> {
        if !matches!(bytes.len(), 8 | 16 | 24) {
            return Err(CryptoError::KeyLength);
        }
        let mut key = Self {
            bytes: [0; 24],
            len: bytes.len(),
        };
        key.bytes
            .get_mut(..bytes.len())
            .ok_or(CryptoError::KeyLength)?
            .copy_from_slice(bytes);
        Ok(key)
    }

    /// A key from 16, 32 or 48 hex digits.
    ///
    /// # Errors
    /// Not hex, or a length that is not a key's.
    pub fn from_hex(text: &str) -> Result<Self, CryptoError> {
        let bytes = Zeroizing::new(hex::decode(text).map_err(|_| CryptoError::Input)?);
        Self::new(&bytes)
    }

    /// The key bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or(&[])
    }

    /// 8, 16 or 24.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never: a key has at least 8 bytes.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The 8-byte part `i` (0, 1 or 2).
    fn part(&self, i: usize) -> Option<ClearKey> {
        let p = self.bytes.get(i * 8..i * 8 + 8)?;
        if i * 8 >= self.len {
            return None;
        }
        Self::new(p).ok()
    }

    /// Encrypts one block: DES, or two/three-key triple DES (EDE). The key schedule is made
    /// for this one call; [`PreparedKey`] keeps it.
    #[must_use]
    pub fn encrypt(&self, block: Block) -> Block {
        Cipher::new(self).map_or(block, |c| c.encrypt(block))
    }

    /// Decrypts one block.
    #[must_use]
    pub fn decrypt(&self, block: Block) -> Block {
        Cipher::new(self).map_or(block, |c| c.decrypt(block))
    }

    /// Whether every byte has odd parity, as DES keys must.
    #[must_use]
    pub fn has_odd_parity(&self) -> bool {
        self.as_bytes().iter().all(|b| b.count_ones() % 2 == 1)
    }

    /// The same key with each byte's low bit set for odd parity.
    #[must_use]
    pub fn with_odd_parity(&self) -> Self {
        let mut k = self.clone();
        for b in k.bytes.iter_mut().take(k.len) {
            if b.count_ones() % 2 == 0 {
                *b ^= 1;
            }
        }
        k
    }

    /// A fresh random key with odd parity.
    #[must_use]
    pub fn random(len: usize) -> Self {
        let len = if matches!(len, 8 | 16 | 24) { len } else { 16 };
        let mut k = Self {
            bytes: [0; 24],
            len,
        };
        for b in k.bytes.iter_mut().take(len) {
            *b = fastrand::u8(..);
        }
        k.with_odd_parity()
    }

    /// The key check value: the key encrypting eight zero bytes.
    #[must_use]
    pub fn check_value(&self) -> Block {
        self.encrypt([0; 8])
    }

    /// The first 6 hex digits of the check value, as payShield prints it.
    #[must_use]
    pub fn kcv6(&self) -> String {
        let mut s = hex::encode_upper(self.check_value());
        s.truncate(6);
        s
    }

    /// A copy with `byte` XORed into byte `at`.
    fn xor_at(&self, at: usize, byte: u8) -> Self {
        let mut k = self.clone();
        if let Some(b) = k.bytes.get_mut(at) {
            *b ^= byte;
        }
        k
    }
}

/// A clear key with its key schedule built once: what the simulator keeps in its key cache so
/// that a key used by every transaction is not decrypted and scheduled again each time.
pub struct PreparedKey {
    key: ClearKey,
    cipher: Cipher,
}

/// The RustCrypto cipher for a key's length (key schedules zeroize on drop).
enum Cipher {
    Single(Des),
    Double(TdesEde2),
    Triple(TdesEde3),
}

impl Cipher {
    fn new(key: &ClearKey) -> Result<Self, CryptoError> {
        let bytes = key.as_bytes();
        let bad = |_| CryptoError::KeyLength;
        Ok(match key.len() {
            8 => Self::Single(Des::new_from_slice(bytes).map_err(bad)?),
            16 => Self::Double(TdesEde2::new_from_slice(bytes).map_err(bad)?),
            _ => Self::Triple(TdesEde3::new_from_slice(bytes).map_err(bad)?),
        })
    }

    fn encrypt(&self, block: Block) -> Block {
        let mut b = block.into();
        match self {
            Self::Single(c) => c.encrypt_block(&mut b),
            Self::Double(c) => c.encrypt_block(&mut b),
            Self::Triple(c) => c.encrypt_block(&mut b),
        }
        b.into()
    }

    fn decrypt(&self, block: Block) -> Block {
        let mut b = block.into();
        match self {
            Self::Single(c) => c.decrypt_block(&mut b),
            Self::Double(c) => c.decrypt_block(&mut b),
            Self::Triple(c) => c.decrypt_block(&mut b),
        }
        b.into()
    }
}

impl fmt::Debug for PreparedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PreparedKey({:?})", self.key)
    }
}

impl PreparedKey {
    /// Schedules a key.
    ///
    /// # Errors
    /// Never for a [`ClearKey`] (its length is always 8, 16 or 24).
    pub fn new(key: ClearKey) -> Result<Self, CryptoError> {
        let cipher = Cipher::new(&key)?;
        Ok(Self { key, cipher })
    }

    /// The clear key.
    #[must_use]
    pub fn key(&self) -> &ClearKey {
        &self.key
    }

    /// Encrypts one block.
    #[must_use]
    pub fn encrypt(&self, block: Block) -> Block {
        self.cipher.encrypt(block)
    }

    /// Decrypts one block.
    #[must_use]
    pub fn decrypt(&self, block: Block) -> Block {
        self.cipher.decrypt(block)
    }
}

fn block_of(bytes: &[u8]) -> Block {
    let mut b = [0u8; 8];
    for (d, s) in b.iter_mut().zip(bytes) {
        *d = *s;
    }
    b
}

fn xor(a: Block, b: Block) -> Block {
    let mut out = [0u8; 8];
    for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
        *o = x ^ y;
    }
    out
}

/// The Racal/Thales variant bytes selected by the first digit of a key type (1 to 9).
const VARIANTS: [u8; 9] = [0xA6, 0x5A, 0x6A, 0xDE, 0x2B, 0x50, 0x74, 0x9C, 0xFA];
/// Applied to the second half of the encrypting key, per part of a double-length key (`U`).
const DOUBLE_VARIANTS: [u8; 2] = [0xA6, 0x5A];
/// The same for triple-length keys (`T`).
const TRIPLE_VARIANTS: [u8; 3] = [0x6A, 0xDE, 0x2B];

/// The public Thales test LMK set: 20 double-length keys, pairs 00-01 to 38-39.
const TEST_LMK: [&str; 20] = [
    "01010101010101017902CD1FD36EF8BA",
    "20202020202020203131313131313131",
    "40404040404040405151515151515151",
    "61616161616161617070707070707070",
    "80808080808080809191919191919191",
    "A1A1A1A1A1A1A1A1B0B0B0B0B0B0B0B0",
    "C1C1010101010101D0D0010101010101",
    "E0E0010101010101F1F1010101010101",
    "1C587F1C13924FEF0101010101010101",
    "01010101010101010101010101010101",
    "02020202020202020404040404040404",
    "07070707070707071010101010101010",
    "13131313131313131515151515151515",
    "16161616161616161919191919191919",
    "1A1A1A1A1A1A1A1A1C1C1C1C1C1C1C1C",
    "23232323232323232525252525252525",
    "26262626262626262929292929292929",
    "2A2A2A2A2A2A2A2A2C2C2C2C2C2C2C2C",
    "2F2F2F2F2F2F2F2F3131313131313131",
    "01010101010101010101010101010101",
];

/// The local master keys.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Lmk {
    pairs: Vec<ClearKey>,
}

impl fmt::Debug for Lmk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Lmk([masked])")
    }
}

impl Lmk {
    /// The public Thales test LMK set (never for production keys).
    #[must_use]
    pub fn test_set() -> Self {
        Self {
            pairs: TEST_LMK
                .iter()
                .filter_map(|h| ClearKey::from_hex(h).ok())
                .collect(),
        }
    }

    /// The 16-digit LMK check value (pair 00-01 encrypting zeros), as NC reports it.
    #[must_use]
    pub fn check_value(&self) -> String {
        self.pairs
            .first()
            .map(|k| hex::encode_upper(k.check_value()))
            .unwrap_or_default()
    }

    /// The LMK pair for a key type with its variant applied to byte 0.
    fn kek(&self, kt: KeyType) -> Result<ClearKey, CryptoError> {
        let pair = self
            .pairs
            .get(kt.lmk_index().ok_or(CryptoError::Input)?)
            .ok_or(CryptoError::Input)?;
        Ok(match kt.variant() {
            0 => pair.clone(),
            v => pair.xor_at(
                0,
                *VARIANTS.get(usize::from(v) - 1).ok_or(CryptoError::Input)?,
            ),
        })
    }

    /// Decrypts a key held under this LMK and checks its parity.
    ///
    /// # Errors
    /// A bad key field or a decrypted key without odd parity.
    pub fn decrypt_key(&self, kt: KeyType, key: &WrappedKey) -> Result<ClearKey, CryptoError> {
        let clear = unwrap(&self.kek(kt)?, key)?;
        if !clear.has_odd_parity() {
            return Err(CryptoError::Parity);
        }
        Ok(clear)
    }

    /// Encrypts a clear key under this LMK in a scheme.
    ///
    /// # Errors
    /// A scheme that does not fit the key's length.
    pub fn encrypt_key(
        &self,
        kt: KeyType,
        scheme: Scheme,
        clear: &ClearKey,
    ) -> Result<WrappedKey, CryptoError> {
        wrap(&self.kek(kt)?, scheme, clear)
    }
}

/// The encrypting key for part `i` of a key in a variant scheme: byte 8 (first byte of the
/// second half) XORed with the part's variant.
fn part_kek(kek: &ClearKey, scheme: Scheme, i: usize) -> ClearKey {
    let v = match scheme {
        Scheme::DoubleVariant => DOUBLE_VARIANTS.get(i).copied(),
        Scheme::TripleVariant => TRIPLE_VARIANTS.get(i).copied(),
        _ => None,
    };
    match v {
        Some(v) => kek.xor_at(8, v),
        None => kek.clone(),
    }
}

/// Decrypts a wrapped key under `kek`.
///
/// # Errors
/// A key of the wrong length for its scheme.
pub fn unwrap(kek: &ClearKey, key: &WrappedKey) -> Result<ClearKey, CryptoError> {
    if key.bytes.len() != key.scheme.key_len() {
        return Err(CryptoError::Input);
    }
    let mut clear = Zeroizing::new(Vec::with_capacity(key.bytes.len()));
    for (i, c) in key.bytes.chunks_exact(8).enumerate() {
        clear.extend_from_slice(&part_kek(kek, key.scheme, i).decrypt(block_of(c)));
    }
    ClearKey::new(&clear)
}

/// Encrypts a clear key under `kek` in `scheme`.
///
/// # Errors
/// A scheme that does not fit the key's length.
pub fn wrap(kek: &ClearKey, scheme: Scheme, clear: &ClearKey) -> Result<WrappedKey, CryptoError> {
    if clear.len() != scheme.key_len() {
        return Err(CryptoError::Input);
    }
    let mut bytes = Vec::with_capacity(clear.len());
    for (i, c) in clear.as_bytes().chunks_exact(8).enumerate() {
        bytes.extend_from_slice(&part_kek(kek, scheme, i).encrypt(block_of(c)));
    }
    Ok(WrappedKey { scheme, bytes })
}

// ---------------------------------------------------------------------------------------------
// PIN blocks
fn nibble(d: u8) -> Option<u8> {
    (d as char).to_digit(16).and_then(|n| u8::try_from(n).ok())
}

/// Packs 16 hex nibbles into a block.
fn pack(nibbles: &[u8; 16]) -> Block {
    let mut b = [0u8; 8];
    for (o, pair) in b.iter_mut().zip(nibbles.chunks_exact(2)) {
        if let [hi, lo] = pair {
            *o = (hi << 4) | lo;
        }
    }
    b
}

fn unpack(b: Block) -> [u8; 16] {
    let mut n = [0u8; 16];
    for (pair, byte) in n.chunks_exact_mut(2).zip(b) {
        if let [hi, lo] = pair {
            *hi = byte >> 4;
            *lo = byte & 0x0F;
        }
    }
    n
}

fn account_block(account: &str) -> Result<Block, CryptoError> {
    if account.len() != 12 {
        return Err(CryptoError::Input);
    }
    let mut n = [0u8; 16];
    for (o, d) in n.iter_mut().skip(4).zip(account.bytes()) {
        *o = nibble(d).filter(|v| *v < 10).ok_or(CryptoError::Input)?;
    }
    Ok(pack(&n))
}

/// Builds a clear PIN block.
///
/// # Errors
/// A PIN that is not 4 to 12 digits, or an account that is not 12 digits.
pub fn pin_block(format: PinFormat, pin: &str, account: &str) -> Result<Block, CryptoError> {
    if !(4..=12).contains(&pin.len()) || !pin.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CryptoError::PinLength);
    }
    let mut n = Zeroizing::new([0u8; 16]);
    let digits = pin.bytes().filter_map(nibble);
    match format {
        PinFormat::Diebold => {
            n.fill(0xF);
            for (o, d) in n.iter_mut().zip(digits) {
                *o = d;
            }
            return Ok(pack(&n));
        }
        PinFormat::Iso0 | PinFormat::Iso1 | PinFormat::Iso3 => {
            let (code, fill): (u8, fn() -> u8) = match format {
                PinFormat::Iso0 => (0, || 0xF),
                PinFormat::Iso1 => (1, || fastrand::u8(0..16)),
                _ => (3, || fastrand::u8(10..16)),
            };
            let head: &mut [u8; 16] = &mut n;
            head[0] = code;
            head[1] = u8::try_from(pin.len()).map_err(|_| CryptoError::PinLength)?;
            for o in n.iter_mut().skip(2) {
                *o = fill();
            }
            for (o, d) in n.iter_mut().skip(2).zip(digits) {
                *o = d;
            }
        }
    }
    let block = pack(&n);
    Ok(match format {
        PinFormat::Iso1 => block,
        _ => xor(block, account_block(account)?),
    })
}

/// Reads the PIN out of a clear PIN block.
///
/// # Errors
/// [`CryptoError::PinBlock`] when the block is not a valid block of the format (wrong key,
/// wrong account, garbage), [`CryptoError::PinLength`] for a length outside 4 to 12.
pub fn pin_of(
    format: PinFormat,
    block: Block,
    account: &str,
) -> Result<Zeroizing<String>, CryptoError> {
    let plain = match format {
        PinFormat::Iso0 | PinFormat::Iso3 => xor(block, account_block(account)?),
        PinFormat::Iso1 | PinFormat::Diebold => block,
    };
    let n = Zeroizing::new(unpack(plain));
    let (len, pin_digits, fill): (usize, &[u8], &[u8]) = match format {
        PinFormat::Diebold => {
            let len = n.iter().take_while(|d| **d < 10).count();
            let (p, f) = n.split_at(len);
            if !f.iter().all(|d| *d == 0xF) {
                return Err(CryptoError::PinBlock);
            }
            (len, p, &[])
        }
        _ => {
            let code = match format {
                PinFormat::Iso0 => 0,
                PinFormat::Iso1 => 1,
                _ => 3,
            };
            let [c, l, rest @ ..] = &*n;
            if *c != code {
                return Err(CryptoError::PinBlock);
            }
            let len = usize::from(*l);
            if !(4..=12).contains(&len) {
                return Err(CryptoError::PinLength);
            }
            let (p, f) = rest.split_at(len);
            (len, p, f)
        }
    };
    if !(4..=12).contains(&len) {
        return Err(CryptoError::PinLength);
    }
    if !pin_digits.iter().all(|d| *d < 10) {
        return Err(CryptoError::PinBlock);
    }
    let fill_ok = match format {
        PinFormat::Iso0 => fill.iter().all(|d| *d == 0xF),
        PinFormat::Iso3 => fill.iter().all(|d| *d >= 0xA),
        _ => true,
    };
    if !fill_ok {
        return Err(CryptoError::PinBlock);
    }
    let mut pin = Zeroizing::new(String::with_capacity(len));
    for d in pin_digits {
        pin.push(char::from(b'0' + d));
    }
    Ok(pin)
}

/// ISO 9564 format 4 (AES): encrypts a PIN for a PAN under a 16-byte AES key.
///
/// # Errors
/// A PIN that is not 4 to 12 digits or a PAN that is not 12 to 19 digits.
pub fn iso4_encrypt(key: &[u8; 16], pin: &str, pan: &str) -> Result<[u8; 16], CryptoError> {
    if !(4..=12).contains(&pin.len()) || !pin.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CryptoError::PinLength);
    }
    let mut field = Zeroizing::new([0u8; 32]);
    let head: &mut [u8; 32] = &mut field;
    head[0] = 4;
    head[1] = u8::try_from(pin.len()).map_err(|_| CryptoError::PinLength)?;
    for (i, o) in field.iter_mut().enumerate().skip(2) {
        *o = if i < 16 { 0xA } else { fastrand::u8(0..16) };
    }
    for (o, d) in field.iter_mut().skip(2).zip(pin.bytes()) {
        *o = d - b'0';
    }
    let cipher = Aes128::new(key.into());
    let mut b = pack32(&field).into();
    cipher.encrypt_block(&mut b);
    let mut inter: [u8; 16] = b.into();
    for (x, p) in inter.iter_mut().zip(iso4_pan_field(pan)?) {
        *x ^= p;
    }
    let mut b = inter.into();
    cipher.encrypt_block(&mut b);
    Ok(b.into())
}

/// ISO 9564 format 4: the PIN inside a block.
///
/// # Errors
/// A block that does not decode to a format 4 PIN field.
pub fn iso4_decrypt(
    key: &[u8; 16],
    block: [u8; 16],
    pan: &str,
) -> Result<Zeroizing<String>, CryptoError> {
    let cipher = Aes128::new(key.into());
    let mut b = block.into();
    cipher.decrypt_block(&mut b);
    let mut inter: [u8; 16] = b.into();
    for (x, p) in inter.iter_mut().zip(iso4_pan_field(pan)?) {
        *x ^= p;
    }
    let mut b = inter.into();
    cipher.decrypt_block(&mut b);
    let plain: [u8; 16] = b.into();
    let mut n = Zeroizing::new([0u8; 32]);
    for (pair, byte) in n.chunks_exact_mut(2).zip(plain) {
        if let [hi, lo] = pair {
            *hi = byte >> 4;
            *lo = byte & 0x0F;
        }
    }
    let [4, l, rest @ ..] = &*n else {
        return Err(CryptoError::PinBlock);
    };
    let len = usize::from(*l);
    if !(4..=12).contains(&len) {
        return Err(CryptoError::PinLength);
    }
    let (digits, fill) = rest.split_at(len);
    let fill_end = 14usize.checked_sub(len).ok_or(CryptoError::PinBlock)?;
    if !digits.iter().all(|d| *d < 10) || !fill.iter().take(fill_end).all(|d| *d == 0xA) {
        return Err(CryptoError::PinBlock);
    }
    Ok(Zeroizing::new(
        digits.iter().map(|d| char::from(b'0' + d)).collect(),
    ))
}

fn pack32(n: &[u8; 32]) -> [u8; 16] {
    let mut b = [0u8; 16];
    for (o, pair) in b.iter_mut().zip(n.chunks_exact(2)) {
        if let [hi, lo] = pair {
            *o = (hi << 4) | lo;
        }
    }
    b
}

fn iso4_pan_field(pan: &str) -> Result<[u8; 16], CryptoError> {
    if !(12..=19).contains(&pan.len()) || !pan.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CryptoError::Input);
    }
    let mut n = [0u8; 32];
    n[0] = u8::try_from(pan.len() - 12).map_err(|_| CryptoError::Input)?;
    for (o, d) in n.iter_mut().skip(1).zip(pan.bytes()) {
        *o = d - b'0';
    }
    Ok(pack32(&n))
}

// ---------------------------------------------------------------------------------------------
// Card verification values

/// Decimalisation as Visa does it: the decimal digits of the hex string in order, then the
/// letters A-F as 0-5, the first `n` of them.
fn decimalise(hex_nibbles: &[u8], n: usize) -> String {
    hex_nibbles
        .iter()
        .filter(|d| **d < 10)
        .chain(hex_nibbles.iter().filter(|d| **d >= 10))
        .take(n)
        .map(|d| char::from(b'0' + d % 10))
        .collect()
}

fn digits_block(digits: &[u8]) -> Result<Block, CryptoError> {
    let mut n = [0u8; 16];
    for (o, d) in n.iter_mut().zip(digits) {
        *o = nibble(*d).filter(|v| *v < 10).ok_or(CryptoError::Input)?;
    }
    Ok(pack(&n))
}

/// The Visa CVV (also CVV2 and iCVV with their service codes) for a double-length CVK.
///
/// # Errors
/// A CVK that is not double length or fields that are not digits.
pub fn cvv(
    cvk: &ClearKey,
    pan: &str,
    expiry: &str,
    service_code: &str,
) -> Result<String, CryptoError> {
    let (Some(a), Some(_)) = (cvk.part(0), cvk.part(1)) else {
        return Err(CryptoError::KeyLength);
    };
    if cvk.len() != 16 {
        return Err(CryptoError::KeyLength);
    }
    let mut data: Vec<u8> = pan
        .bytes()
        .chain(expiry.bytes())
        .chain(service_code.bytes())
        .collect();
    if data.len() > 32 {
        return Err(CryptoError::Input);
    }
    data.resize(32, b'0');
    let (d1, d2) = data.split_at(16);
    let r = a.encrypt(digits_block(d1)?);
    let r = cvk.encrypt(xor(r, digits_block(d2)?));
    Ok(decimalise(&unpack(r), 3))
}

/// The Visa PIN verification value.
///
/// # Errors
/// A PVK that is not double length, an account that is not 12 digits, a PIN shorter than 4.
pub fn pvv(pvk: &ClearKey, account: &str, pvki: u8, pin: &str) -> Result<String, CryptoError> {
    if pvk.len() != 16 {
        return Err(CryptoError::KeyLength);
    }
    let acct = account.get(1..12).ok_or(CryptoError::Input)?;
    let pin4 = pin.get(..4).ok_or(CryptoError::PinLength)?;
    if pvki > 9 {
        return Err(CryptoError::Input);
    }
    let tsp: Vec<u8> = acct
        .bytes()
        .chain(std::iter::once(b'0' + pvki))
        .chain(pin4.bytes())
        .collect();
    let r = pvk.encrypt(digits_block(&tsp)?);
    Ok(decimalise(&unpack(r), 4))
}

// ---------------------------------------------------------------------------------------------
// MACs

/// MAC algorithm, by its payShield M6 code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacAlgorithm {
    /// 1: ISO 9797-1 algorithm 1 (CBC-MAC with the whole key).
    Iso9797Alg1,
    /// 3: ISO 9797-1 algorithm 3, ANSI X9.19 retail MAC (single-DES chain, triple-DES last block).
    X919,
}

impl MacAlgorithm {
    /// From the M6 code.
    ///
    /// # Errors
    /// Any other code.
    pub fn from_code(c: u8) -> Result<Self, CryptoError> {
        match c {
            b'1' => Ok(Self::Iso9797Alg1),
            b'3' => Ok(Self::X919),
            _ => Err(CryptoError::Input),
        }
    }
}

/// Padding before MACing, by its payShield M6 code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacPadding {
    /// 0: none (the data must be whole blocks).
    None,
    /// 1: ISO 9797-1 method 1, zeros to a whole block.
    Method1,
    /// 2: ISO 9797-1 method 2, 0x80 then zeros.
    Method2,
}

impl MacPadding {
    /// From the M6 code.
    ///
    /// # Errors
    /// Any other code.
    pub fn from_code(c: u8) -> Result<Self, CryptoError> {
        match c {
            b'0' => Ok(Self::None),
            b'1' => Ok(Self::Method1),
            b'2' => Ok(Self::Method2),
            _ => Err(CryptoError::Input),
        }
    }
}

/// A CBC-MAC computation that may span several calls (M6 modes 1 to 3).
#[derive(Debug)]
pub struct MacChain<'k> {
    key: &'k ClearKey,
    algorithm: MacAlgorithm,
    iv: Block,
}

impl<'k> MacChain<'k> {
    /// Starts a chain with an initial vector (zeros for a single-part MAC).
    #[must_use]
    pub fn new(key: &'k ClearKey, algorithm: MacAlgorithm, iv: Block) -> Self {
        Self { key, algorithm, iv }
    }

    /// Feeds whole blocks.
    ///
    /// # Errors
    /// Data that is not whole blocks.
    pub fn update(&mut self, data: &[u8]) -> Result<(), CryptoError> {
        if data.len() % 8 != 0 {
            return Err(CryptoError::Input);
        }
        let chain_key = match self.algorithm {
            MacAlgorithm::Iso9797Alg1 => self.key.clone(),
            MacAlgorithm::X919 => self.key.part(0).ok_or(CryptoError::KeyLength)?,
        };
        // CBC encryption of the data; the last ciphertext block is the chaining value.
        match chain_key.len() {
            8 => cbc_last::<Des>(chain_key.as_bytes(), &mut self.iv, data),
            16 => cbc_last::<TdesEde2>(chain_key.as_bytes(), &mut self.iv, data),
            _ => cbc_last::<TdesEde3>(chain_key.as_bytes(), &mut self.iv, data),
        }
    }

    /// The chaining value so far (M6 modes 1 and 2 return it).
    #[must_use]
    pub fn iv(&self) -> Block {
        self.iv
    }

    /// Pads and feeds the last part and returns the MAC.
    ///
    /// # Errors
    /// Unpadded data that is not whole blocks.
    pub fn finish(mut self, data: &[u8], padding: MacPadding) -> Result<Block, CryptoError> {
        let padded = pad(data, padding)?;
        self.update(&padded)?;
        Ok(match self.algorithm {
            MacAlgorithm::Iso9797Alg1 => self.iv,
            MacAlgorithm::X919 => {
                let (Some(kl), Some(kr)) = (self.key.part(0), self.key.part(1)) else {
                    return Err(CryptoError::KeyLength);
                };
                kl.encrypt(kr.decrypt(self.iv))
            }
        })
    }
}

fn cbc_last<C>(key: &[u8], iv: &mut Block, data: &[u8]) -> Result<(), CryptoError>
where
    C: cbc::cipher::BlockCipher + BlockEncrypt + KeyInit,
    C: cbc::cipher::BlockSizeUser<BlockSize = cbc::cipher::consts::U8>,
{
    let mut enc =
        cbc::Encryptor::<C>::new_from_slices(key, iv).map_err(|_| CryptoError::KeyLength)?;
    for chunk in data.chunks_exact(8) {
        let mut b = block_of(chunk).into();
        enc.encrypt_block_mut(&mut b);
        *iv = b.into();
    }
    Ok(())
}

fn pad(data: &[u8], padding: MacPadding) -> Result<Vec<u8>, CryptoError> {
    let mut v = data.to_vec();
    match padding {
        MacPadding::None => {
            if v.len() % 8 != 0 {
                return Err(CryptoError::Input);
            }
        }
        MacPadding::Method1 => {
            if v.is_empty() || v.len() % 8 != 0 {
                v.resize(v.len().div_ceil(8).max(1) * 8, 0);
            }
        }
        MacPadding::Method2 => {
            v.push(0x80);
            v.resize(v.len().div_ceil(8) * 8, 0);
        }
    }
    Ok(v)
}

/// A single-part MAC over `data`.
///
/// # Errors
/// A key of the wrong length for the algorithm, or unpadded data that is not whole blocks.
pub fn mac(
    key: &ClearKey,
    algorithm: MacAlgorithm,
    padding: MacPadding,
    data: &[u8],
) -> Result<Block, CryptoError> {
    MacChain::new(key, algorithm, [0; 8]).finish(data, padding)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    fn key(h: &str) -> ClearKey {
        ClearKey::from_hex(h).unwrap()
    }

    #[test]
    fn lmk_decrypts_the_published_test_keys() {
        let lmk = Lmk::test_set();
        let tpk = lmk
            .decrypt_key(
                KeyType::TPK,
                &WrappedKey::parse("0406FBB23A5214DF").unwrap(),
            )
            .unwrap();
        assert_eq!(tpk, key("0B681FC20E62C734"));
        let zpk = lmk
            .decrypt_key(
                KeyType::ZPK,
                &WrappedKey::parse("BAB32D775A38E4AB").unwrap(),
            )
            .unwrap();
        assert_eq!(zpk, key("13F10E5D868A529E"));
        assert_eq!(hex::encode_upper(tpk.check_value()), "0035BBE340A4B763");
        let cvk = lmk
            .decrypt_key(
                KeyType::CVK,
                &WrappedKey::parse("0A61E674E88C6A7EEABC38C2B2BB492F").unwrap(),
            )
            .unwrap();
        assert_eq!(cvk, key("0123456789ABCDEFFEDCBA9876543210"));
        // Encrypting back gives the same field, in both schemes.
        let again = lmk.encrypt_key(KeyType::TPK, Scheme::Single, &tpk).unwrap();
        assert_eq!(again.to_field(), "0406FBB23A5214DF");
        let u = lmk
            .encrypt_key(KeyType::CVK, Scheme::DoubleVariant, &cvk)
            .unwrap();
        assert_eq!(u.to_field(), "U9B4934384B19946B040CD702B4D58145");
    }

    #[test]
    fn parity_is_checked() {
        let lmk = Lmk::test_set();
        // One bit flipped in the encrypted key gives a clear key with bad parity (almost surely).
        let bad = WrappedKey::parse("0406FBB23A5214DE").unwrap();
        assert_eq!(
            lmk.decrypt_key(KeyType::TPK, &bad),
            Err(CryptoError::Parity)
        );
    }

    #[test]
    fn iso0_block_matches_the_published_vector() {
        let block = pin_block(
            PinFormat::Iso0,
            "1234",
            &account_of("5544332211009966").unwrap(),
        )
        .unwrap();
        assert_eq!(hex::encode_upper(block), "041277CDDEEFF669");
        assert_eq!(
            &*pin_of(PinFormat::Iso0, block, "433221100996").unwrap(),
            "1234"
        );
        // The wrong account does not give the PIN back.
        assert!(pin_of(PinFormat::Iso0, block, "433221100997").is_err());
    }

    #[test]
    fn iso1_and_iso3_round_trip() {
        for f in [PinFormat::Iso1, PinFormat::Iso3, PinFormat::Diebold] {
            let b = pin_block(f, "987654", "400000123456").unwrap();
            assert_eq!(&*pin_of(f, b, "400000123456").unwrap(), "987654");
        }
        assert_eq!(
            pin_block(PinFormat::Iso0, "123", "400000123456"),
            Err(CryptoError::PinLength)
        );
    }

    #[test]
    fn iso4_matches_the_published_vector() {
        let k: [u8; 16] = hex::decode("00112233445566778899AABBCCDDEEFF")
            .unwrap()
            .try_into()
            .unwrap();
        let block: [u8; 16] = hex::decode("E4BE5B623AF7E006AC319E5B93544564")
            .unwrap()
            .try_into()
            .unwrap();
        assert_eq!(
            &*iso4_decrypt(&k, block, "1234567890123456").unwrap(),
            "1234"
        );
        let mine = iso4_encrypt(&k, "56789", "1234567890123456").unwrap();
        assert_eq!(
            &*iso4_decrypt(&k, mine, "1234567890123456").unwrap(),
            "56789"
        );
        assert!(iso4_decrypt(&k, mine, "1234567890123457").is_err());
    }

    #[test]
    fn cvv_and_pvv_match_the_published_vectors() {
        let k = key("0123456789ABCDEFFEDCBA9876543210");
        assert_eq!(cvv(&k, "1234567890123456", "9912", "220").unwrap(), "170");
        assert_eq!(cvv(&k, "4123456789012345", "8701", "101").unwrap(), "561");
        assert_eq!(cvv(&k, "4999988887777", "9105", "111").unwrap(), "649");
        let acct = account_of("1122334455667788").unwrap();
        assert_eq!(pvv(&k, &acct, 3, "4524").unwrap(), "4021");
    }

    #[test]
    fn x919_and_alg1_macs() {
        // ANSI X9.19 example: key 0123456789ABCDEF FEDCBA9876543210, "Now is the time for all "
        let k = key("0123456789ABCDEFFEDCBA9876543210");
        let m = mac(
            &k,
            MacAlgorithm::X919,
            MacPadding::Method1,
            b"Now is the time for all ",
        )
        .unwrap();
        assert_eq!(hex::encode_upper(m), "A1C72E74EA3FA9B6");
        // Single-DES CBC-MAC (X9.9): same data, key 0123456789ABCDEF.
        let s = key("0123456789ABCDEF");
        let m1 = mac(
            &s,
            MacAlgorithm::Iso9797Alg1,
            MacPadding::Method1,
            b"Now is the time for all ",
        )
        .unwrap();
        assert_eq!(hex::encode_upper(m1), "70A30640CC76DD8B");
        // Chained in parts gives the same as in one go.
        let mut chain = MacChain::new(&k, MacAlgorithm::X919, [0; 8]);
        chain.update(b"Now is t").unwrap();
        let parts = chain
            .finish(b"he time for all ", MacPadding::Method1)
            .unwrap();
        assert_eq!(parts, m);
        assert_ne!(
            mac(
                &k,
                MacAlgorithm::X919,
                MacPadding::Method2,
                b"Now is the time for all "
            )
            .unwrap(),
            m
        );
    }
}
