//! payShield host commands: parse a command body, compute, build the reply body.
//!
//! [`execute`] takes the two command characters and the body after them and returns the reply
//! after the response code letters: the two-digit error code and the reply fields. It never
//! panics and never echoes a field value in an error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use zeroize::Zeroizing;

use super::crypto::{
    self, ClearKey, CryptoError, KeyType, Lmk, MacAlgorithm, MacChain, MacPadding, PinFormat,
    PreparedKey, Scheme, WrappedKey,
};

/// Most keys kept decrypted and scheduled; the cache starts again when full.
const CACHE_CAP: usize = 4096;

/// Keys by type and field (scheme letter and encrypted bytes).
type KeyCache = HashMap<(KeyType, Vec<u8>), Arc<PreparedKey>>;

/// The LMK and a cache of keys already decrypted under it: a switch sends the same few keys
/// (its zone and terminal keys) with every command, so each is decrypted, parity-checked and
/// scheduled once. Only keys that passed their parity check are kept.
#[derive(Debug)]
pub struct KeyStore {
    lmk: Lmk,
    cache: Mutex<KeyCache>,
}

impl KeyStore {
    /// A store over an LMK.
    #[must_use]
    pub fn new(lmk: Lmk) -> Self {
        Self {
            lmk,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The LMK.
    #[must_use]
    pub fn lmk(&self) -> &Lmk {
        &self.lmk
    }

    /// A key under the LMK, decrypted (or from the cache).
    fn key(&self, kt: KeyType, key: &WrappedKey) -> Result<Arc<PreparedKey>, CryptoError> {
        let mut id = Vec::with_capacity(key.bytes.len() + 1);
        id.push(key.scheme.letter() as u8);
        id.extend_from_slice(&key.bytes);
        let id = (kt, id);
        if let Some(k) = self.cache.lock().ok().and_then(|c| c.get(&id).cloned()) {
            return Ok(k);
        }
        let prepared = Arc::new(PreparedKey::new(self.lmk.decrypt_key(kt, key)?)?);
        if let Ok(mut c) = self.cache.lock() {
            if c.len() >= CACHE_CAP {
                c.clear();
            }
            c.insert(id, Arc::clone(&prepared));
        }
        Ok(prepared)
    }
}

/// The firmware string NC reports.
pub const FIRMWARE: &str = "0007-E000";

/// payShield error codes used here.
pub mod code {
    /// No error.
    pub const OK: &str = "00";
    /// Verification failed (PIN, CVV, MAC).
    pub const FAILED: &str = "01";
    /// Source (or only) key parity error.
    pub const SOURCE_PARITY: &str = "10";
    /// Destination key parity error.
    pub const DEST_PARITY: &str = "11";
    /// Invalid input data.
    pub const INPUT: &str = "15";
    /// PIN block does not contain valid values.
    pub const PIN_BLOCK: &str = "20";
    /// Invalid PIN block format code.
    pub const PIN_FORMAT: &str = "23";
    /// PIN length out of range.
    pub const PIN_LENGTH: &str = "24";
    /// Data length error (B2 length longer than the data).
    pub const DATA_LENGTH: &str = "80";
    /// Command code not recognised.
    pub const UNKNOWN_COMMAND: &str = "68";
}

/// The reply code letters for a command: the second letter advanced by one (CA -> CB).
#[must_use]
pub fn reply_code(cmd: [u8; 2]) -> [u8; 2] {
    let [a, b] = cmd;
    [a, b.saturating_add(1)]
}

/// Whether `cmd` is a command this simulator implements.
#[must_use]
pub fn is_known(cmd: [u8; 2]) -> bool {
    matches!(
        &cmd,
        b"NC"
            | b"B2"
            | b"BU"
            | b"A0"
            | b"A6"
            | b"A8"
            | b"CA"
            | b"CC"
            | b"DC"
            | b"EC"
            | b"CW"
            | b"CY"
            | b"M6"
            | b"M8"
    )
}

/// Runs one command; returns the error code and reply fields.
#[must_use]
pub fn execute(keys: &KeyStore, cmd: [u8; 2], body: &[u8]) -> Vec<u8> {
    let lmk = keys;
    let mut out = Vec::with_capacity(48);
    let result = match &cmd {
        b"NC" => {
            out.extend_from_slice(code::OK.as_bytes());
            out.extend_from_slice(keys.lmk().check_value().as_bytes());
            out.extend_from_slice(FIRMWARE.as_bytes());
            return out;
        }
        b"B2" => return echo(body),
        b"BU" => check_value(lmk, body, &mut out),
        b"A0" => generate_key(lmk, body, &mut out),
        b"A6" => import_key(lmk, body, &mut out),
        b"A8" => export_key(lmk, body, &mut out),
        b"CA" => translate_pin(lmk, body, KeyType::TPK, &mut out),
        b"CC" => translate_pin(lmk, body, KeyType::ZPK, &mut out),
        b"DC" => verify_pvv(lmk, body, KeyType::TPK, &mut out),
        b"EC" => verify_pvv(lmk, body, KeyType::ZPK, &mut out),
        b"CW" => generate_cvv(lmk, body, &mut out),
        b"CY" => verify_cvv(lmk, body, &mut out),
        b"M6" => mac_command(lmk, body, false, &mut out),
        b"M8" => mac_command(lmk, body, true, &mut out),
        _ => return code::UNKNOWN_COMMAND.as_bytes().to_vec(),
    };
    match result {
        Ok(()) => out,
        Err(Failure(code)) => code.as_bytes().to_vec(),
    }
}

/// A command that ends with an error code.
struct Failure(&'static str);

impl From<CryptoError> for Failure {
    fn from(e: CryptoError) -> Self {
        Self(match e {
            CryptoError::Parity => code::SOURCE_PARITY,
            CryptoError::PinBlock => code::PIN_BLOCK,
            CryptoError::PinFormat => code::PIN_FORMAT,
            CryptoError::PinLength => code::PIN_LENGTH,
            CryptoError::KeyLength | CryptoError::Input => code::INPUT,
        })
    }
}

impl From<cardswitch_codec::hsm::FieldError> for Failure {
    fn from(e: cardswitch_codec::hsm::FieldError) -> Self {
        CryptoError::from(e).into()
    }
}

type Outcome = Result<(), Failure>;

/// Reads fields off the front of a command body.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn new(body: &'a [u8]) -> Self {
        Self { rest: body }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Failure> {
        if self.rest.len() < n {
            return Err(Failure(code::INPUT));
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Ok(a)
    }

    fn text(&mut self, n: usize) -> Result<&'a str, Failure> {
        std::str::from_utf8(self.take(n)?).map_err(|_| Failure(code::INPUT))
    }

    fn digits(&mut self, n: usize) -> Result<&'a str, Failure> {
        let t = self.text(n)?;
        if !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Failure(code::INPUT));
        }
        Ok(t)
    }

    fn number(&mut self, n: usize) -> Result<usize, Failure> {
        self.digits(n)?.parse().map_err(|_| Failure(code::INPUT))
    }

    fn hex_number(&mut self, n: usize) -> Result<usize, Failure> {
        usize::from_str_radix(self.text(n)?, 16).map_err(|_| Failure(code::INPUT))
    }

    fn block(&mut self) -> Result<crypto::Block, Failure> {
        let mut b = [0u8; 8];
        hex::decode_to_slice(self.take(16)?, &mut b).map_err(|_| Failure(code::INPUT))?;
        Ok(b)
    }

    fn byte(&mut self) -> Result<u8, Failure> {
        self.take(1)?.first().copied().ok_or(Failure(code::INPUT))
    }

    fn key(&mut self, bare_len: usize) -> Result<WrappedKey, Failure> {
        let (k, used) = WrappedKey::parse_prefix(self.rest, bare_len)?;
        self.take(used)?;
        Ok(k)
    }

    fn key_type(&mut self) -> Result<KeyType, Failure> {
        Ok(KeyType::parse(self.take(3)?)?)
    }

    /// Up to (not including) `delimiter`, which is consumed.
    fn until(&mut self, delimiter: u8) -> Result<&'a str, Failure> {
        let at = self
            .rest
            .iter()
            .position(|b| *b == delimiter)
            .ok_or(Failure(code::INPUT))?;
        let t = self.text(at)?;
        self.take(1)?;
        Ok(t)
    }
}

/// An LMK-encrypted key with the parity error reported as the given code.
fn lmk_key(
    lmk: &KeyStore,
    kt: KeyType,
    key: &WrappedKey,
    parity: &'static str,
) -> Result<Arc<PreparedKey>, Failure> {
    lmk.key(kt, key).map_err(|e| match e {
        CryptoError::Parity => Failure(parity),
        e => e.into(),
    })
}

fn echo(body: &[u8]) -> Vec<u8> {
    let mut c = Cursor::new(body);
    let Ok(len) = c.hex_number(4) else {
        return code::INPUT.as_bytes().to_vec();
    };
    match c.rest.len().cmp(&len) {
        std::cmp::Ordering::Less => code::DATA_LENGTH.as_bytes().to_vec(),
        std::cmp::Ordering::Greater => code::INPUT.as_bytes().to_vec(),
        std::cmp::Ordering::Equal => {
            let mut out = code::OK.as_bytes().to_vec();
            out.extend_from_slice(c.rest);
            out
        }
    }
}

/// BU: key type code (2H), length flag (1N), key -> 16-digit check value.
fn check_value(lmk: &KeyStore, body: &[u8], out: &mut Vec<u8>) -> Outcome {
    let mut c = Cursor::new(body);
    let pp = u8::from_str_radix(c.text(2)?, 16).map_err(|_| Failure(code::INPUT))?;
    let kt = KeyType::from_pair_code(pp)?;
    let bare = match c.byte()? {
        b'0' => 16,
        b'1' => 32,
        b'2' => 48,
        _ => return Err(Failure(code::INPUT)),
    };
    let key = c.key(bare)?;
    let clear = lmk_key(lmk, kt, &key, code::SOURCE_PARITY)?;
    out.extend_from_slice(code::OK.as_bytes());
    out.extend_from_slice(hex::encode_upper(clear.encrypt([0; 8])).as_bytes());
    Ok(())
}

fn scheme_len(s: Scheme) -> usize {
    match s {
        Scheme::Single => 8,
        Scheme::DoubleAnsi | Scheme::DoubleVariant => 16,
        Scheme::TripleAnsi | Scheme::TripleVariant => 24,
    }
}

/// A0: mode (0 generate, 1 generate and export), key type, LMK scheme, [ZMK, ZMK scheme].
fn generate_key(lmk: &KeyStore, body: &[u8], out: &mut Vec<u8>) -> Outcome {
    let mut c = Cursor::new(body);
    let mode = c.byte()?;
    let kt = c.key_type()?;
    let scheme = Scheme::from_flag(c.byte()?)?;
    let clear = ClearKey::random(scheme_len(scheme));
    let under_lmk = lmk.lmk().encrypt_key(kt, scheme, &clear)?;
    out.extend_from_slice(code::OK.as_bytes());
    out.extend_from_slice(under_lmk.to_field().as_bytes());
    match mode {
        b'0' => {}
        b'1' => {
            let zmk = c.key(16)?;
            let zmk = lmk_key(lmk, KeyType::ZMK, &zmk, code::DEST_PARITY)?;
            let zmk_scheme = Scheme::from_flag(c.byte()?)?;
            let under_zmk = crypto::wrap(zmk.key(), zmk_scheme, &clear)?;
            out.extend_from_slice(under_zmk.to_field().as_bytes());
        }
        _ => return Err(Failure(code::INPUT)),
    }
    out.extend_from_slice(clear.kcv6().as_bytes());
    Ok(())
}

/// A6: key type, ZMK, key under ZMK, LMK scheme -> key under LMK and check value.
fn import_key(lmk: &KeyStore, body: &[u8], out: &mut Vec<u8>) -> Outcome {
    let mut c = Cursor::new(body);
    let kt = c.key_type()?;
    let zmk = c.key(16)?;
    let zmk = lmk_key(lmk, KeyType::ZMK, &zmk, code::SOURCE_PARITY)?;
    let key = c.key(16)?;
    let scheme = Scheme::from_flag(c.byte()?)?;
    let clear = crypto::unwrap(zmk.key(), &key)?;
    if !clear.has_odd_parity() {
        return Err(Failure(code::DEST_PARITY));
    }
    let under_lmk = lmk
        .lmk()
        .encrypt_key(kt, scheme_for(scheme, &clear), &clear)?;
    out.extend_from_slice(code::OK.as_bytes());
    out.extend_from_slice(under_lmk.to_field().as_bytes());
    out.extend_from_slice(clear.kcv6().as_bytes());
    Ok(())
}

/// The scheme flag says the family; a single-length key stays single.
fn scheme_for(flag: Scheme, clear: &ClearKey) -> Scheme {
    if clear.len() == 8 {
        Scheme::Single
    } else {
        flag
    }
}

/// A8: key type, ZMK, key under LMK, ZMK scheme -> key under ZMK and check value.
fn export_key(lmk: &KeyStore, body: &[u8], out: &mut Vec<u8>) -> Outcome {
    let mut c = Cursor::new(body);
    let kt = c.key_type()?;
    let zmk = c.key(16)?;
    let zmk = lmk_key(lmk, KeyType::ZMK, &zmk, code::SOURCE_PARITY)?;
    let key = c.key(16)?;
    let clear = lmk_key(lmk, kt, &key, code::DEST_PARITY)?;
    let clear = clear.key();
    let scheme = Scheme::from_flag(c.byte()?)?;
    let under_zmk = crypto::wrap(zmk.key(), scheme_for(scheme, clear), clear)?;
    out.extend_from_slice(code::OK.as_bytes());
    out.extend_from_slice(under_zmk.to_field().as_bytes());
    out.extend_from_slice(clear.kcv6().as_bytes());
    Ok(())
}

/// CA (TPK to ZPK) and CC (ZPK to ZPK): source key, destination ZPK, maximum PIN length,
/// PIN block, source format, destination format, account.
fn translate_pin(lmk: &KeyStore, body: &[u8], source_type: KeyType, out: &mut Vec<u8>) -> Outcome {
    let mut c = Cursor::new(body);
    let src = c.key(16)?;
    let dst = c.key(16)?;
    let max_len = c.number(2)?;
    let block = c.block()?;
    let src_fmt = PinFormat::from_code(c.digits(2)?)?;
    let dst_fmt = PinFormat::from_code(c.digits(2)?)?;
    let account = c.digits(12)?;
    let src = lmk_key(lmk, source_type, &src, code::SOURCE_PARITY)?;
    let dst = lmk_key(lmk, KeyType::ZPK, &dst, code::DEST_PARITY)?;
    let pin = crypto::pin_of(src_fmt, src.decrypt(block), account)?;
    if pin.len() > max_len {
        return Err(Failure(code::PIN_LENGTH));
    }
    let clear = Zeroizing::new(crypto::pin_block(dst_fmt, &pin, account)?);
    let encrypted = dst.encrypt(*clear);
    out.extend_from_slice(code::OK.as_bytes());
    out.extend_from_slice(format!("{:02}", pin.len()).as_bytes());
    out.extend_from_slice(hex::encode_upper(encrypted).as_bytes());
    out.extend_from_slice(dst_fmt.code().as_bytes());
    Ok(())
}

/// DC (TPK) and EC (ZPK): key, PVK pair, PIN block, format, account, PVKI, PVV -> 00 or 01.
fn verify_pvv(lmk: &KeyStore, body: &[u8], key_type: KeyType, out: &mut Vec<u8>) -> Outcome {
    let mut c = Cursor::new(body);
    let pin_key = c.key(16)?;
    let pvk = c.key(32)?;
    let block = c.block()?;
    let fmt = PinFormat::from_code(c.digits(2)?)?;
    let account = c.digits(12)?;
    let pvki = c.digits(1)?.bytes().next().map_or(0, |b| b - b'0');
    let expected = c.digits(4)?;
    let pin_key = lmk_key(lmk, key_type, &pin_key, code::SOURCE_PARITY)?;
    let pvk = lmk_key(lmk, KeyType::TPK, &pvk, code::DEST_PARITY)?;
    let pin = crypto::pin_of(fmt, pin_key.decrypt(block), account)?;
    let pvv = crypto::pvv(pvk.key(), account, pvki, &pin)?;
    let ok: bool = subtle::ConstantTimeEq::ct_eq(pvv.as_bytes(), expected.as_bytes()).into();
    out.extend_from_slice(if ok { code::OK } else { code::FAILED }.as_bytes());
    Ok(())
}

fn card_fields<'a>(c: &mut Cursor<'a>) -> Result<(&'a str, &'a str, &'a str), Failure> {
    let pan = c.until(b';')?;
    if !(12..=19).contains(&pan.len()) || !pan.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Failure(code::INPUT));
    }
    let expiry = c.digits(4)?;
    let service = c.digits(3)?;
    Ok((pan, expiry, service))
}

/// CW: CVK pair, PAN, ';', expiry, service code -> CVV.
fn generate_cvv(lmk: &KeyStore, body: &[u8], out: &mut Vec<u8>) -> Outcome {
    let mut c = Cursor::new(body);
    let cvk = c.key(32)?;
    let (pan, expiry, service) = card_fields(&mut c)?;
    let cvk = lmk_key(lmk, KeyType::CVK, &cvk, code::SOURCE_PARITY)?;
    let cvv = crypto::cvv(cvk.key(), pan, expiry, service)?;
    out.extend_from_slice(code::OK.as_bytes());
    out.extend_from_slice(cvv.as_bytes());
    Ok(())
}

/// CY: CVK pair, CVV, PAN, ';', expiry, service code -> 00 or 01.
fn verify_cvv(lmk: &KeyStore, body: &[u8], out: &mut Vec<u8>) -> Outcome {
    let mut c = Cursor::new(body);
    let cvk = c.key(32)?;
    let given = c.digits(3)?;
    let (pan, expiry, service) = card_fields(&mut c)?;
    let cvk = lmk_key(lmk, KeyType::CVK, &cvk, code::SOURCE_PARITY)?;
    let cvv = crypto::cvv(cvk.key(), pan, expiry, service)?;
    let ok: bool = subtle::ConstantTimeEq::ct_eq(cvv.as_bytes(), given.as_bytes()).into();
    out.extend_from_slice(if ok { code::OK } else { code::FAILED }.as_bytes());
    Ok(())
}

/// M6 (generate) and M8 (verify): mode, input format, MAC size, algorithm, padding, key type
/// (003 TAK, 008 ZAK), key, [IV for modes 2 and 3], message length (4H, in characters as
/// sent), message, [MAC for M8].
fn mac_command(lmk: &KeyStore, body: &[u8], verify: bool, out: &mut Vec<u8>) -> Outcome {
    let mut c = Cursor::new(body);
    let mode = c.byte()?;
    let input = c.byte()?;
    let size = match c.byte()? {
        b'0' => 4,
        b'1' => 8,
        _ => return Err(Failure(code::INPUT)),
    };
    let algorithm = MacAlgorithm::from_code(c.byte()?)?;
    let padding = MacPadding::from_code(c.byte()?)?;
    let kt = c.key_type()?;
    if kt != KeyType::TAK && kt != KeyType::ZAK {
        return Err(Failure(code::INPUT));
    }
    let key = c.key(16)?;
    let iv = match mode {
        b'0' | b'1' => [0u8; 8],
        b'2' | b'3' => c.block()?,
        _ => return Err(Failure(code::INPUT)),
    };
    let len = c.hex_number(4)?;
    let raw = c.take(len)?;
    let data = match input {
        b'0' | b'2' => raw.to_vec(),
        b'1' => hex::decode(raw).map_err(|_| Failure(code::INPUT))?,
        _ => return Err(Failure(code::INPUT)),
    };
    let key = lmk_key(lmk, kt, &key, code::SOURCE_PARITY)?;
    let mut chain = MacChain::new(key.key(), algorithm, iv);
    let mac = match mode {
        b'1' | b'2' => {
            chain.update(&data)?;
            if verify {
                return Err(Failure(code::INPUT));
            }
            out.extend_from_slice(code::OK.as_bytes());
            out.extend_from_slice(hex::encode_upper(chain.iv()).as_bytes());
            return Ok(());
        }
        _ => chain.finish(&data, padding)?,
    };
    let mac_hex = hex::encode_upper(mac.get(..size).unwrap_or(&mac));
    if verify {
        let given = c.take(size * 2)?;
        let ok: bool = subtle::ConstantTimeEq::ct_eq(mac_hex.as_bytes(), given).into();
        out.extend_from_slice(if ok { code::OK } else { code::FAILED }.as_bytes());
    } else {
        out.extend_from_slice(code::OK.as_bytes());
        out.extend_from_slice(mac_hex.as_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    fn run(cmd: &str, body: &str) -> String {
        let keys = KeyStore::new(Lmk::test_set());
        let c: [u8; 2] = cmd.as_bytes().try_into().unwrap();
        // Twice: the second answer comes from the key cache and must be the same.
        let first = String::from_utf8(execute(&keys, c, body.as_bytes())).unwrap();
        let second = String::from_utf8(execute(&keys, c, body.as_bytes())).unwrap();
        if cmd != "A0" {
            assert_eq!(first, second);
        }
        first
    }

    #[test]
    fn published_vectors() {
        // The published payShield host-command examples under the Thales test LMK.
        assert_eq!(
            run(
                "CA",
                "0406FBB23A5214DFBAB32D775A38E4AB12DC80B186C30902B00303550000025321"
            ),
            "0004F7808F2CBEC6316803"
        );
        assert_eq!(
            run(
                "CW",
                "0A61E674E88C6A7EEABC38C2B2BB492F4123456789012345;8701101"
            ),
            "00561"
        );
        assert_eq!(
            run(
                "EC",
                "BAB32D775A38E4ABX367930344805B1FAD6146EF4ED7502B3F7808F2CBEC631680355000002532114402"
            ),
            "00"
        );
    }

    #[test]
    fn more_thales_vectors() {
        // CA to ISO-0, from ISO-0, and with double-length keys.
        assert_eq!(
            run(
                "CA",
                "0406FBB23A5214DFBAB32D775A38E4AB12DC80B186C30902B00301550000025321"
            ),
            "0004E98FFDA17099AF5501"
        );
        assert_eq!(
            run(
                "CA",
                "0406FBB23A5214DFBAB32D775A38E4AB12AE7A708F877571A90101550000025321"
            ),
            "0004E98FFDA17099AF5501"
        );
        assert_eq!(
            run("CA", "U8463435FC4B4DAA0C49025272C29B12CU1EF828AA8F6B80EB83E19FBC373F3A85126428EB94035AF53B0103550000025321"),
            "000482206CCD872229C203"
        );
        assert_eq!(
            run("CC", "BAB32D775A38E4ABU1EF828AA8F6B80EB83E19FBC373F3A8512F7808F2CBEC631680301550000025321"),
            "000491DDDA0A7C12CFAA01"
        );
        assert_eq!(
            run(
                "CY",
                "U9B4934384B19946B040CD702B4D581455614123456789012345;8701101"
            ),
            "00"
        );
        assert_eq!(
            run(
                "CY",
                "0A61E674E88C6A7EEABC38C2B2BB492F1114999988887777;9105111"
            ),
            "01"
        );
        assert_eq!(run("BU", "0200406FBB23A5214DF"), "000035BBE340A4B763");
        assert_eq!(
            run("BU", "011U1EF828AA8F6B80EB83E19FBC373F3A85"),
            "006F1E3F74F826B7EB"
        );
        // DC: the same PIN (1234) under the TPK in ISO-0, same PVK and PVV as the EC vector.
        assert_eq!(
            run("DC", "0406FBB23A5214DF367930344805B1FAD6146EF4ED7502B3AE7A708F877571A90155000002532114402"),
            "00"
        );
        assert_eq!(
            run("DC", "0406FBB23A5214DF367930344805B1FAD6146EF4ED7502B3AE7A708F877571A90155000002532114403"),
            "01"
        );
        // Import and export under a ZMK.
        assert_eq!(
            run(
                "A6",
                "001U1457FF6ADF6250C66C368416B4C9D3832B930A07119F93A8Z"
            ),
            "00BAB32D775A38E4AB73936E"
        );
        assert_eq!(
            run(
                "A6",
                "001U71979DEB8587E2734F1E99D5DCAEF9ACU482C4E722BB0CF1845E1E5BD16310119U"
            ),
            "00U0E07CDC0161A0DE3B5AA44DF227EC9DEABDEBC"
        );
        assert_eq!(
            run(
                "A8",
                "002U1457FF6ADF6250C66C368416B4C9D383U8463435FC4B4DAA0C49025272C29B12CU"
            ),
            "00U2C62A23D001B97412950CD8BE66C7639070753"
        );
        assert_eq!(run("B2", "0004PING"), "00PING");
    }

    #[test]
    fn errors_are_codes() {
        // Wrong PIN block format code.
        assert_eq!(
            run(
                "CA",
                "0406FBB23A5214DFBAB32D775A38E4AB12DC80B186C30902B00903550000025321"
            ),
            "23"
        );
        // A PIN block under another key does not decode.
        assert_eq!(
            run(
                "CA",
                "0406FBB23A5214DFBAB32D775A38E4AB120123456789ABCDEF0101550000025321"
            ),
            "20"
        );
        // Parity errors name the key.
        assert_eq!(
            run(
                "CA",
                "0406FBB23A5214DEBAB32D775A38E4AB12DC80B186C30902B00303550000025321"
            ),
            "10"
        );
        assert_eq!(
            run(
                "CA",
                "0406FBB23A5214DFBAB32D775A38E4AA12DC80B186C30902B00303550000025321"
            ),
            "11"
        );
        assert_eq!(run("CA", "0406"), "15");
        assert_eq!(run("ZZ", ""), "68");
        assert_eq!(run("B2", "0010PING"), "80");
    }

    #[test]
    fn mac_generate_and_verify() {
        let lmk = Lmk::test_set();
        let tak = ClearKey::from_hex("0123456789ABCDEFFEDCBA9876543210").unwrap();
        let tak_lmk = lmk
            .encrypt_key(KeyType::TAK, Scheme::DoubleVariant, &tak)
            .unwrap()
            .to_field();
        let msg = "Now is the time for all ";
        let body = format!("00131003{tak_lmk}{:04X}{msg}", msg.len());
        let reply = run("M6", &body);
        assert_eq!(reply, "00A1C72E74EA3FA9B6");
        assert_eq!(run("M8", &format!("{body}A1C72E74EA3FA9B6")), "00");
        assert_eq!(run("M8", &format!("{body}A1C72E74EA3FA9B7")), "01");
        // A TAK presented as a ZAK decrypts to another key: parity error or mismatch.
        let as_zak = format!("00131008{tak_lmk}{:04X}{msg}A1C72E74EA3FA9B6", msg.len());
        assert_ne!(run("M8", &as_zak), "00");
        // Two-part chain gives the same MAC.
        let first = run("M6", &format!("10131003{tak_lmk}0008Now is t"));
        let iv = &first[2..];
        let rest = "he time for all ";
        assert_eq!(
            run(
                "M6",
                &format!("30131003{tak_lmk}{iv}{:04X}{rest}", rest.len())
            ),
            "00A1C72E74EA3FA9B6"
        );
    }

    #[test]
    fn generate_then_export_then_import() {
        let lmk = Lmk::test_set();
        let zmk = run("A0", "0000U");
        assert_eq!(&zmk[..2], "00");
        let zmk_field = &zmk[2..35];
        let gen = run("A0", &format!("1001U{zmk_field}U"));
        assert_eq!(&gen[..2], "00");
        let zpk_lmk = &gen[2..35];
        let zpk_zmk = &gen[35..68];
        let kcv = &gen[68..];
        let imported = run("A6", &format!("001{zmk_field}{zpk_zmk}U"));
        assert_eq!(imported, format!("00{zpk_lmk}{kcv}"));
        let exported = run("A8", &format!("001{zmk_field}{zpk_lmk}U"));
        assert_eq!(exported, format!("00{zpk_zmk}{kcv}"));
        let _ = lmk;
    }
}
