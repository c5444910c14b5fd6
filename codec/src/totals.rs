//! Reconciliation totals (ISO 8583:1987 DE74 to DE89 and DE97), as a terminal's 0500 carries
//! them and a switch's 0510 answers with its own.
//!
//! Definitions, shared by both sides so that they can agree:
//! - **debits** (DE76 number, DE88 amount): approved financial transactions that debit the
//!   cardholder (purchase, cash, purchase with cashback ...) still standing, each for the
//!   amount that stands after partial reversals;
//! - **credits** (DE74, DE86): the same for refunds (processing code 20-29);
//! - **reversals** (DE75/DE87 of credits, DE77/DE89 of debits): transactions reversed in full
//!   (their whole amount) or in part (the amount taken back); a partially reversed transaction
//!   counts once as a debit and once as a reversal;
//! - **inquiries** (DE80): approved balance inquiries; **authorizations** (DE81): approved
//!   0100 authorizations (no amount: they move no money by themselves);
//! - **net** (DE97): debits minus credits, `C` when the merchant is owed (zero is `C`), `D`
//!   when it owes. Fee fields (DE82 to DE85) and transfers (DE78/DE79) are carried as zeros.

use crate::Message;

/// One batch's or business date's totals, in minor units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// DE74.
    pub credits: u64,
    /// DE75.
    pub credit_reversals: u64,
    /// DE76.
    pub debits: u64,
    /// DE77.
    pub debit_reversals: u64,
    /// DE80.
    pub inquiries: u64,
    /// DE81.
    pub authorizations: u64,
    /// DE86.
    pub credits_amount: u64,
    /// DE87.
    pub credit_reversals_amount: u64,
    /// DE88.
    pub debits_amount: u64,
    /// DE89.
    pub debit_reversals_amount: u64,
}

/// A totals field that is absent or not digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("reconciliation total DE{0} missing or not a number")]
pub struct BadTotal(pub u8);

impl Totals {
    /// Net settlement amount in minor units (debits minus credits), signed.
    #[must_use]
    pub fn net(&self) -> i128 {
        i128::from(self.debits_amount) - i128::from(self.credits_amount)
    }

    /// DE97: `C` or `D` and 16 digits.
    #[must_use]
    pub fn net_field(&self) -> String {
        let net = self.net();
        let sign = if net >= 0 { 'C' } else { 'D' };
        format!("{sign}{:016}", net.unsigned_abs())
    }

    /// Adds one transaction to the totals.
    pub fn add(&mut self, kind: Kind, amount: u64, reversed: u64, in_full: bool) {
        let (count, sum, rev_count, rev_sum) = match kind {
            Kind::Debit => (
                &mut self.debits,
                &mut self.debits_amount,
                &mut self.debit_reversals,
                &mut self.debit_reversals_amount,
            ),
            Kind::Credit => (
                &mut self.credits,
                &mut self.credits_amount,
                &mut self.credit_reversals,
                &mut self.credit_reversals_amount,
            ),
            Kind::Inquiry => {
                self.inquiries += 1;
                return;
            }
            Kind::Authorization => {
                self.authorizations += 1;
                return;
            }
        };
        if in_full {
            *rev_count += 1;
            *rev_sum += amount;
            return;
        }
        *count += 1;
        *sum += amount.saturating_sub(reversed);
        if reversed > 0 {
            *rev_count += 1;
            *rev_sum += reversed.min(amount);
        }
    }

    /// Writes DE74 to DE89 and DE97 into a message.
    pub fn write(&self, msg: &mut Message) {
        let n10 = |v: u64| format!("{:010}", v % 10_000_000_000);
        let n12 = |v: u64| format!("{:012}", v % 1_000_000_000_000);
        let n16 = |v: u64| format!("{:016}", v % 10_000_000_000_000_000);
        for (f, v) in [
            (74, self.credits),
            (75, self.credit_reversals),
            (76, self.debits),
            (77, self.debit_reversals),
            (78, 0),
            (79, 0),
            (80, self.inquiries),
            (81, self.authorizations),
        ] {
            msg.set(f, n10(v).as_bytes());
        }
        for f in 82..=85 {
            msg.set(f, n12(0).as_bytes());
        }
        for (f, v) in [
            (86, self.credits_amount),
            (87, self.credit_reversals_amount),
            (88, self.debits_amount),
            (89, self.debit_reversals_amount),
        ] {
            msg.set(f, n16(v).as_bytes());
        }
        msg.set(97, self.net_field().as_bytes());
    }

    /// Reads DE74 to DE77, DE80, DE81 and DE86 to DE89 (DE97 is checked against them).
    ///
    /// # Errors
    /// The first field that is missing or not a number, or DE97 disagreeing with the amounts.
    pub fn read(msg: &Message) -> Result<Self, BadTotal> {
        let num = |f: u8| -> Result<u64, BadTotal> {
            msg.get_str(f)
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse().ok())
                .ok_or(BadTotal(f))
        };
        let totals = Self {
            credits: num(74)?,
            credit_reversals: num(75)?,
            debits: num(76)?,
            debit_reversals: num(77)?,
            inquiries: num(80)?,
            authorizations: num(81)?,
            credits_amount: num(86)?,
            credit_reversals_amount: num(87)?,
            debits_amount: num(88)?,
            debit_reversals_amount: num(89)?,
        };
        if let Some(de97) = msg.get_str(97) {
            if de97 != totals.net_field() {
                return Err(BadTotal(97));
            }
        }
        Ok(totals)
    }
}

/// How a transaction counts in the totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Debits the cardholder.
    Debit,
    /// Credits the cardholder (refund).
    Credit,
    /// Balance inquiry.
    Inquiry,
    /// Authorization only (0100).
    Authorization,
}

impl Kind {
    /// The kind of a transaction from its MTI class and processing code (first two digits).
    #[must_use]
    pub fn of(mti_class: u8, processing_code: &str) -> Self {
        let ty = processing_code.get(..2).unwrap_or("00");
        if mti_class == 1 {
            return Self::Authorization;
        }
        match ty.as_bytes().first() {
            Some(b'2') => Self::Credit,
            Some(b'3') => Self::Inquiry,
            _ => Self::Debit,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::Mti;

    #[test]
    fn totals_round_trip_through_a_message_and_net_is_signed() {
        let mut t = Totals::default();
        t.add(Kind::Debit, 1000, 0, false);
        t.add(Kind::Debit, 500, 200, false);
        t.add(Kind::Debit, 700, 0, true);
        t.add(Kind::Credit, 300, 0, false);
        t.add(Kind::Authorization, 999, 0, false);
        assert_eq!((t.debits, t.debits_amount), (2, 1300));
        assert_eq!((t.debit_reversals, t.debit_reversals_amount), (2, 900));
        assert_eq!((t.credits, t.credits_amount), (1, 300));
        assert_eq!(t.authorizations, 1);
        assert_eq!(t.net_field(), "C0000000000001000");
        let mut m = Message::new("0500".parse::<Mti>().unwrap());
        t.write(&mut m);
        assert_eq!(Totals::read(&m), Ok(t));
        m.set(97, b"D0000000000001000");
        assert_eq!(Totals::read(&m), Err(BadTotal(97)));
        m.set(88, b"12x");
        assert_eq!(Totals::read(&m), Err(BadTotal(88)));
        let credit_only = Totals {
            credits: 1,
            credits_amount: 5,
            ..Totals::default()
        };
        assert_eq!(credit_only.net_field(), "D0000000000000005");
    }

    #[test]
    fn kinds_follow_the_processing_code() {
        assert_eq!(Kind::of(2, "000000"), Kind::Debit);
        assert_eq!(Kind::of(2, "090000"), Kind::Debit);
        assert_eq!(Kind::of(2, "200000"), Kind::Credit);
        assert_eq!(Kind::of(2, "310000"), Kind::Inquiry);
        assert_eq!(Kind::of(1, "000000"), Kind::Authorization);
    }
}
