//! The journal's row model: one row per transaction, the `transactions` columns it writes
//! (declared once), and what a reversal needs of its original.

use cardswitch_codec::{Dialect, Message};

use super::db::Arg;
use crate::state::TxnState;

/// Who decided a transaction's response code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecidedBy {
    /// The acquirer's reply.
    Acquirer,
    /// The switch itself (format, card, route, availability, journal).
    Switch,
    /// No reply from the acquirer in time.
    Timeout,
    /// Stand-in processing.
    StandIn,
    /// The reply of an earlier copy of the same request.
    Duplicate,
    /// A fraud rule declined it.
    Fraud,
}

impl DecidedBy {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Acquirer => "acquirer",
            Self::Switch => "switch",
            Self::Timeout => "timeout",
            Self::StandIn => "stand_in",
            Self::Duplicate => "duplicate",
            Self::Fraud => "fraud",
        }
    }
}

/// One journal row. Built by [`Journal::row`], which is where card data is masked and hashed
/// (so a row, spooled as JSON, carries no card data in clear).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Row {
    pub(super) id: i64,
    pub(super) received_us: i64,
    pub(super) listener: String,
    pub(super) mti: String,
    pub(super) processing_code: Option<String>,
    pub(super) stan: Option<String>,
    pub(super) rrn: Option<String>,
    pub(super) transmission_time: Option<String>,
    pub(super) terminal_id: Option<String>,
    pub(super) merchant_id: Option<String>,
    pub(super) pan_masked: Option<String>,
    pub(super) pan_hmac: Option<String>,
    /// DE4 as approved, minor units: the acquirer's DE4 of a partial approval (DE39 10), else
    /// the request's.
    pub(super) amount_minor: Option<i64>,
    /// DE4 as the terminal asked, minor units.
    #[serde(default)]
    pub(super) amount_requested_minor: Option<i64>,
    pub(super) currency: Option<String>,
    /// The matching account range.
    pub route: Option<String>,
    /// The endpoint the request went to.
    pub endpoint: Option<String>,
    /// The link it went over.
    pub link: Option<String>,
    pub(super) response_code: String,
    pub(super) decided_by: DecidedBy,
    pub(super) auth_code: Option<String>,
    pub(super) request_summary: String,
    pub(super) reply_summary: String,
    /// Time waiting for the acquirer, microseconds.
    pub t_upstream_us: Option<i64>,
    /// Time decoding the request, microseconds.
    pub t_decode_us: Option<i64>,
    /// Time from decoded to the acquirer being asked (checks, routing), microseconds.
    pub t_route_us: Option<i64>,
    pub(super) t_total_us: i64,
    /// The transaction's state.
    pub state: TxnState,
    /// DE11 as sent to the acquirer.
    pub upstream_stan: Option<String>,
    /// For a reversal: the transaction it reverses.
    pub original_id: Option<i64>,
    /// Amount reversed so far, minor units.
    pub amount_reversed_minor: Option<i64>,
    pub(super) acquirer_inst: Option<String>,
    /// The fraud rules that fired (shadow ones marked), when any did.
    pub fraud: Option<String>,
    /// The business date it settles on (`YYYY-MM-DD`).
    pub business_date: Option<String>,
    /// The terminal's batch number.
    pub batch_number: Option<String>,
}

impl Row {
    /// The row's id (the transaction id).
    #[must_use]
    pub fn id(&self) -> i64 {
        self.id
    }

    /// Gives the row the id its transaction was known by (from [`Journal::new_id`]).
    pub fn set_id(&mut self, id: i64) {
        self.id = id;
    }

    /// The row's response code.
    #[must_use]
    pub fn response_code(&self) -> &str {
        &self.response_code
    }

    /// Who decided.
    #[must_use]
    pub fn decided_by(&self) -> DecidedBy {
        self.decided_by
    }

    /// The terminal was answered the journal's failure code (96) instead of this row's reply:
    /// decided by the switch, no authorization code, nothing charged; a queued reversal of an
    /// acquirer's approval leaves it pending reversal.
    pub(super) fn answered_unrecorded(&mut self, reversal_queued: bool) {
        cardswitch_routing::Failure::JournalUnavailable
            .response_code()
            .as_str()
            .clone_into(&mut self.response_code);
        self.decided_by = DecidedBy::Switch;
        self.auth_code = None;
        if reversal_queued {
            self.state = TxnState::ReversalPending;
        } else if self.state.is_charged() {
            self.state = TxnState::Declined;
        }
    }

    pub(super) fn auth_code(&self) -> Option<&str> {
        self.auth_code.as_deref()
    }

    pub(super) fn reply_summary(&self) -> &str {
        &self.reply_summary
    }

    /// The amount the acquirer approved, when the terminal was told something else (a partial
    /// approval reversed because the terminal does not take them).
    pub(crate) fn set_amount_approved(&mut self, minor: u64) {
        self.amount_minor = i64::try_from(minor).ok();
    }

    /// Its reply summary, after the reply changed.
    pub(crate) fn set_reply_summary(&mut self, dialect: &Dialect, reply: &Message) {
        self.reply_summary = summary(dialect, reply);
    }
}

/// How a reversal names its original.
#[derive(Debug, Clone, Copy)]
pub struct OriginalKeys<'a> {
    /// DE41.
    pub terminal: &'a str,
    /// The original DE11 (from DE90).
    pub stan: Option<&'a str>,
    /// The original DE7 (from DE90).
    pub transmission_time: Option<&'a str>,
    /// DE37, used when there is no DE90.
    pub rrn: Option<&'a str>,
}

impl<'a> OriginalKeys<'a> {
    /// Appends the condition these keys name to `st`, whose text ends in `... WHERE`: the
    /// terminal and the original's DE11 and DE7 (in columns `stan` and `time`), or without
    /// them the terminal and DE37. False when the keys name nothing.
    pub(super) fn push_condition(
        &self,
        st: &mut super::db::Statement<'a>,
        stan: &str,
        time: &str,
    ) -> bool {
        st.push(" terminal_id = ").arg(self.terminal);
        match (self.stan, self.transmission_time, self.rrn) {
            (Some(s), Some(de7), _) => {
                st.push(&format!(" AND {stan} = ")).arg(s);
                st.push(&format!(" AND {time} = ")).arg(de7);
            }
            (_, _, Some(rrn)) => {
                st.push(" AND rrn = ").arg(rrn);
            }
            _ => return false,
        }
        true
    }
}

/// What a reversal needs of its original.
#[derive(Debug, Clone)]
pub struct Original {
    /// Its id.
    pub id: i64,
    /// Its MTI.
    pub mti: String,
    /// The endpoint it went to.
    pub endpoint: Option<String>,
    /// Its state.
    pub state: TxnState,
    /// DE4, minor units.
    pub amount_minor: Option<i64>,
    /// Reversed so far.
    pub amount_reversed_minor: Option<i64>,
    /// DE11 as the acquirer saw it.
    pub upstream_stan: Option<String>,
    /// DE7.
    pub transmission_time: Option<String>,
    /// The PAN HMAC (the store-and-forward order key).
    pub pan_hmac: Option<String>,
    /// Its response code.
    pub response_code: String,
}

/// The masked field list of a message, as JSON (`{"mti":"0100","2":"476173******0010",...}`).
pub(super) fn summary(dialect: &Dialect, msg: &Message) -> String {
    msg.summary_json(dialect)
}

/// One column of `transactions`: its name, whether operators see it in look-ups (an
/// allow-list: the PAN HMAC and DE32 are not shown), and how its value is read off a row (the
/// second argument is the node name).
#[derive(Clone, Copy)]
pub(super) struct Column {
    pub(super) name: &'static str,
    /// An integer column (else text).
    pub(super) int: bool,
    pub(super) shown: bool,
    pub(super) value: Read,
}

type Read = for<'a> fn(&'a Row, &'a str) -> Arg<'a>;

const fn text(name: &'static str, shown: bool, value: Read) -> Column {
    Column {
        name,
        int: false,
        shown,
        value,
    }
}

const fn int(name: &'static str, shown: bool, value: Read) -> Column {
    Column {
        name,
        int: true,
        shown,
        value,
    }
}

/// The `transactions` columns a row writes, in order: the one declaration that COPY, the
/// SQLite insert and the look-ups use.
pub(super) const COLUMNS: [Column; 36] = [
    int("id", true, |r, _| Arg::Int(Some(r.id))),
    text("node", true, |_, node| Arg::Text(Some(node))),
    int("received_us", true, |r, _| Arg::Int(Some(r.received_us))),
    text("listener", true, |r, _| Arg::Text(Some(&r.listener))),
    text("mti", true, |r, _| Arg::Text(Some(&r.mti))),
    text("processing_code", true, |r, _| {
        Arg::Text(r.processing_code.as_deref())
    }),
    text("stan", true, |r, _| Arg::Text(r.stan.as_deref())),
    text("rrn", true, |r, _| Arg::Text(r.rrn.as_deref())),
    text("transmission_time", true, |r, _| {
        Arg::Text(r.transmission_time.as_deref())
    }),
    text("terminal_id", true, |r, _| {
        Arg::Text(r.terminal_id.as_deref())
    }),
    text("merchant_id", true, |r, _| {
        Arg::Text(r.merchant_id.as_deref())
    }),
    text("pan_masked", true, |r, _| {
        Arg::Text(r.pan_masked.as_deref())
    }),
    text("pan_hmac", false, |r, _| Arg::Text(r.pan_hmac.as_deref())),
    int("amount_minor", true, |r, _| Arg::Int(r.amount_minor)),
    int("amount_requested_minor", true, |r, _| {
        Arg::Int(r.amount_requested_minor)
    }),
    text("currency", true, |r, _| Arg::Text(r.currency.as_deref())),
    text("route", true, |r, _| Arg::Text(r.route.as_deref())),
    text("endpoint", true, |r, _| Arg::Text(r.endpoint.as_deref())),
    text("link", true, |r, _| Arg::Text(r.link.as_deref())),
    text("response_code", true, |r, _| {
        Arg::Text(Some(&r.response_code))
    }),
    text("decided_by", true, |r, _| {
        Arg::Text(Some(r.decided_by.as_str()))
    }),
    text("auth_code", true, |r, _| Arg::Text(r.auth_code.as_deref())),
    text("request_summary", true, |r, _| {
        Arg::Text(Some(&r.request_summary))
    }),
    text("reply_summary", true, |r, _| {
        Arg::Text(Some(&r.reply_summary))
    }),
    int("t_upstream_us", true, |r, _| Arg::Int(r.t_upstream_us)),
    int("t_total_us", true, |r, _| Arg::Int(Some(r.t_total_us))),
    int("t_decode_us", true, |r, _| Arg::Int(r.t_decode_us)),
    int("t_route_us", true, |r, _| Arg::Int(r.t_route_us)),
    text("state", true, |r, _| Arg::Text(Some(r.state.as_str()))),
    text("upstream_stan", true, |r, _| {
        Arg::Text(r.upstream_stan.as_deref())
    }),
    int("original_id", true, |r, _| Arg::Int(r.original_id)),
    int("amount_reversed_minor", true, |r, _| {
        Arg::Int(r.amount_reversed_minor)
    }),
    text("acquirer_inst", false, |r, _| {
        Arg::Text(r.acquirer_inst.as_deref())
    }),
    text("fraud", true, |r, _| Arg::Text(r.fraud.as_deref())),
    text("business_date", true, |r, _| {
        Arg::Text(r.business_date.as_deref())
    }),
    text("batch_number", true, |r, _| {
        Arg::Text(r.batch_number.as_deref())
    }),
];

/// The names of `columns`, comma-separated, for a statement.
pub(super) fn column_list<'c>(columns: impl IntoIterator<Item = &'c Column>) -> String {
    columns
        .into_iter()
        .map(|c| c.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every column written, comma-separated (made once).
pub(super) fn written_columns() -> &'static str {
    static LIST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    LIST.get_or_init(|| column_list(&COLUMNS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_column_is_declared_once() {
        let mut names: Vec<_> = COLUMNS.iter().map(|c| c.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), COLUMNS.len());
        assert!(written_columns().starts_with("id, node, received_us, listener, mti,"));
        assert!(written_columns().ends_with("fraud, business_date, batch_number"));
        let hidden: Vec<_> = COLUMNS
            .iter()
            .filter(|c| !c.shown)
            .map(|c| c.name)
            .collect();
        assert_eq!(hidden, ["pan_hmac", "acquirer_inst"]);
        let ints = COLUMNS.iter().filter(|c| c.int).count();
        assert_eq!(ints, 10);
    }
}
