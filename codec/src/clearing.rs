//! The acquirer's clearing file: what it presents for one business date, as CSV. The format
//! shared by the acquirer simulator, which writes it, and the switch's reconciliation, which
//! reads it; the caller supplies the reader or writer.
//!
//! Columns: `rrn, auth_code, pan_masked, pan_hmac, amount_minor, currency, business_date, type,
//! reason`. `type` is `presentment` (a debit), `refund` (a credit), `reversal` (a reversal the
//! host processed whose original it does not present) or `chargeback` (a cardholder dispute of
//! an earlier presentment, `reason` its code). The PAN appears only masked and as HMAC-SHA256
//! under the key the host shares with the switch's journal (hex), so the two can be matched
//! without card data in the file.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// The file could not be read or written (IO, or a CSV writer error). A malformed line is not
/// this error: [`read`] reports it with its line number and goes on.
#[derive(Debug, thiserror::Error)]
#[error("clearing file: {0}")]
pub struct ClearingError(#[from] csv::Error);

/// One line of a clearing file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClearingRecord {
    /// DE37.
    pub rrn: String,
    /// DE38.
    pub auth_code: String,
    /// First six and last four digits.
    pub pan_masked: String,
    /// HMAC-SHA256 of the PAN, hex.
    pub pan_hmac: String,
    /// Minor units.
    pub amount_minor: u64,
    /// ISO 4217 numeric.
    pub currency: String,
    /// `YYYY-MM-DD`.
    pub business_date: String,
    /// `presentment`, `refund`, `reversal` or `chargeback`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Chargeback reason code; empty otherwise.
    #[serde(default)]
    pub reason: String,
}

/// Record types.
pub mod kinds {
    /// A debit presented for settlement.
    pub const PRESENTMENT: &str = "presentment";
    /// A credit (refund) presented.
    pub const REFUND: &str = "refund";
    /// A reversal processed by the host.
    pub const REVERSAL: &str = "reversal";
    /// A cardholder dispute.
    pub const CHARGEBACK: &str = "chargeback";
}

/// Writes records as CSV with a header line.
///
/// # Errors
/// The writer fails.
pub fn write<W: Write>(out: W, records: &[ClearingRecord]) -> Result<(), ClearingError> {
    let mut w = csv::Writer::from_writer(out);
    for r in records {
        w.serialize(r)?;
    }
    w.flush().map_err(|e| ClearingError(e.into()))?;
    Ok(())
}

/// Reads a clearing file, calling `each` with the line number (1 = first record) and the
/// record, or the line's error (a malformed line does not stop the rest).
///
/// # Errors
/// The reader fails.
pub fn read<R: Read>(
    input: R,
    mut each: impl FnMut(u64, Result<ClearingRecord, String>),
) -> Result<(), ClearingError> {
    let mut r = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(input);
    let mut raw = csv::StringRecord::new();
    let headers = r.headers()?.clone();
    let mut line = 0u64;
    loop {
        match r.read_record(&mut raw) {
            Ok(false) => break,
            Ok(true) => {
                line += 1;
                each(
                    line,
                    raw.deserialize::<ClearingRecord>(Some(&headers))
                        .map_err(|e| e.to_string()),
                );
            }
            Err(e) if e.is_io_error() => return Err(ClearingError(e)),
            Err(e) => {
                line += 1;
                each(line, Err(e.to_string()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn rec(i: u64) -> ClearingRecord {
        ClearingRecord {
            rrn: format!("{i:012}"),
            auth_code: format!("{i:06}"),
            pan_masked: "476173******0010".into(),
            pan_hmac: "ab".repeat(32),
            amount_minor: 1000 + i,
            currency: "978".into(),
            business_date: "2026-11-21".into(),
            kind: kinds::PRESENTMENT.into(),
            reason: String::new(),
        }
    }

    #[test]
    fn csv_round_trips_and_bad_lines_are_reported_not_fatal() {
        let recs: Vec<_> = (0..3).map(rec).collect();
        let mut buf = Vec::new();
        write(&mut buf, &recs).unwrap();
        let text = String::from_utf8(buf.clone()).unwrap();
        assert!(text.starts_with(
            "rrn,auth_code,pan_masked,pan_hmac,amount_minor,currency,business_date,type,reason\n"
        ));
        let mut back = Vec::new();
        read(&buf[..], |_, r| back.push(r.unwrap())).unwrap();
        assert_eq!(back, recs);
        let bad =
            format!("{text}x,y,z\n000000000009,1,2,3,notanumber,978,2026-11-21,presentment,\n");
        let mut errors = Vec::new();
        read(bad.as_bytes(), |line, r| {
            if r.is_err() {
                errors.push(line);
            }
        })
        .unwrap();
        assert_eq!(errors, vec![4, 5]);
    }
}
