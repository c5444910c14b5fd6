//! Stand-in processing: the switch approves small, safe transactions itself when an endpoint
//! cannot answer (no link ready, or no reply in time), and tells the acquirer afterwards with an
//! advice through store-and-forward.
//!
//! A request is approved in stand-in when its card is not on the negative list (PAN HMAC or
//! card range), not expired, and its amount is within the floor limit of the most specific
//! entry matching its card range and MCC (a prefix and MCC match beats a prefix match, which
//! beats an MCC match; longer prefixes beat shorter ones). Anything else is declined 91.

use cardswitch_codec::{Message, Pan};
use serde::Deserialize;

/// `[endpoints.stand_in]`: the switch decides when the acquirer cannot.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StandInConfig {
    /// Stand-in on at all.
    pub enabled: bool,
    /// Decide when the acquirer did not answer in time.
    pub on_timeout: bool,
    /// Decide when no link is ready.
    pub on_unavailable: bool,
    /// Floor limit when no entry of `floor_limits` matches, minor units (0: decline).
    pub default_limit_minor: u64,
    /// Floor limits by card range and MCC; the most specific match wins.
    pub floor_limits: Vec<FloorLimit>,
    /// PAN HMACs (hex, as in the journal) never approved in stand-in.
    pub negative_pan_hmacs: Vec<String>,
    /// Card-range prefixes never approved in stand-in.
    pub negative_ranges: Vec<String>,
    /// Decline expired cards (DE14 or the track's expiry).
    pub check_expiry: bool,
    /// Verify the CVV in track 2 through the HSM (needs `security.cvk`); a wrong one declines
    /// with 05, an HSM that cannot answer leaves the transaction to 91.
    pub verify_cvv: bool,
    /// Where the CVV starts in track 2's discretionary data (after the service code); 5
    /// skips a PVKI and PVV.
    pub cvv_offset: usize,
}

impl StandInConfig {
    /// Checks the floor limits' card ranges.
    ///
    /// # Errors
    /// A prefix that is not 1 to 11 digits, named with the endpoint.
    pub fn check(&self, endpoint: &str) -> anyhow::Result<()> {
        for f in &self.floor_limits {
            if let Some(p) = &f.prefix {
                if p.is_empty() || p.len() > 11 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    anyhow::bail!(
                        "endpoint {endpoint}: stand_in floor limit prefix {p:?} is not 1 to 11 digits"
                    );
                }
            }
        }
        Ok(())
    }
}

impl Default for StandInConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            on_timeout: true,
            on_unavailable: true,
            default_limit_minor: 0,
            floor_limits: Vec::new(),
            negative_pan_hmacs: Vec::new(),
            negative_ranges: Vec::new(),
            check_expiry: true,
            verify_cvv: false,
            cvv_offset: 5,
        }
    }
}

/// A stand-in floor limit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FloorLimit {
    /// Card-range prefix (any when absent).
    #[serde(default)]
    pub prefix: Option<String>,
    /// Merchant category code, DE18 (any when absent).
    #[serde(default)]
    pub mcc: Option<u16>,
    /// Highest amount approved, minor units.
    pub limit_minor: u64,
}

/// Why stand-in declined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The card or its range is on the negative list.
    NegativeList,
    /// The card has expired.
    Expired,
    /// The amount is above the floor limit.
    OverLimit,
    /// The request has no amount.
    NoAmount,
}

impl Refusal {
    /// A short reason for the journal.
    #[must_use]
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::NegativeList => "negative list",
            Self::Expired => "expired card",
            Self::OverLimit => "over floor limit",
            Self::NoAmount => "no amount",
        }
    }
}

/// The floor limit for a card and MCC.
#[must_use]
pub(crate) fn floor_limit(config: &StandInConfig, pan: &str, mcc: Option<u16>) -> u64 {
    let mut best: Option<(u8, usize, u64)> = None;
    for f in &config.floor_limits {
        let prefix_len = match &f.prefix {
            Some(p) if pan.starts_with(p.as_str()) => p.len(),
            Some(_) => continue,
            None => 0,
        };
        let mcc_match = match f.mcc {
            Some(m) if Some(m) == mcc => 1,
            Some(_) => continue,
            None => 0,
        };
        // Rank: both > prefix only > MCC only; then the longer prefix.
        let rank = match (prefix_len > 0, mcc_match == 1) {
            (true, true) => 3,
            (true, false) => 2,
            (false, true) => 1,
            (false, false) => 0,
        };
        if best.is_none_or(|(r, l, _)| (rank, prefix_len) > (r, l)) {
            best = Some((rank, prefix_len, f.limit_minor));
        }
    }
    best.map_or(config.default_limit_minor, |(_, _, limit)| limit)
}

/// The card's expiry, YYMM: DE14, or the track's.
fn expiry(request: &Message) -> Option<String> {
    if let Some(e) = request.expiry() {
        return Some(e.to_owned());
    }
    let track = request.get(35)?;
    let sep = track.iter().position(|&b| b == b'=' || b == b'D')?;
    let yymm = track.get(sep + 1..sep + 5)?;
    std::str::from_utf8(yymm).ok().map(str::to_owned)
}

/// This month as YYMM.
#[must_use]
pub(crate) fn this_month() -> String {
    let now = humantime::format_rfc3339(std::time::SystemTime::now()).to_string();
    // 2026-11-21T...: YY from 2..4, MM from 5..7
    format!(
        "{}{}",
        now.get(2..4).unwrap_or("00"),
        now.get(5..7).unwrap_or("01")
    )
}

/// Stand-in's decision for a request: `Ok` approves.
///
/// # Errors
/// The reason it declines.
pub(crate) fn decide(
    config: &StandInConfig,
    request: &Message,
    pan: &Pan,
    pan_hmac: &str,
    month: &str,
) -> Result<(), Refusal> {
    let digits = pan.expose();
    if config
        .negative_pan_hmacs
        .iter()
        .any(|h| h.eq_ignore_ascii_case(pan_hmac))
        || config
            .negative_ranges
            .iter()
            .any(|r| digits.starts_with(r.as_str()))
    {
        return Err(Refusal::NegativeList);
    }
    if config.check_expiry {
        match expiry(request) {
            Some(e) if e.len() == 4 && e.as_str() >= month => {}
            _ => return Err(Refusal::Expired),
        }
    }
    let amount = request.amount().ok_or(Refusal::NoAmount)?;
    if amount > floor_limit(config, digits, request.mcc()) {
        return Err(Refusal::OverLimit);
    }
    Ok(())
}

/// An authorization code for a stand-in approval: `S` and five digits from the transaction id.
#[must_use]
pub(crate) fn auth_code(txn_id: i64) -> String {
    format!("S{:05}", txn_id.rem_euclid(100_000))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cardswitch_codec::sample;

    fn config() -> StandInConfig {
        StandInConfig {
            enabled: true,
            default_limit_minor: 1_000,
            floor_limits: vec![
                FloorLimit {
                    prefix: Some("476173".into()),
                    mcc: None,
                    limit_minor: 5_000,
                },
                FloorLimit {
                    prefix: Some("4761739".into()),
                    mcc: None,
                    limit_minor: 7_000,
                },
                FloorLimit {
                    prefix: Some("476173".into()),
                    mcc: Some(5999),
                    limit_minor: 9_000,
                },
                FloorLimit {
                    prefix: None,
                    mcc: Some(5411),
                    limit_minor: 3_000,
                },
            ],
            negative_ranges: vec!["4761731".into()],
            ..StandInConfig::default()
        }
    }

    #[test]
    fn the_most_specific_floor_limit_wins() {
        let c = config();
        assert_eq!(floor_limit(&c, "4761739001010010", Some(5999)), 9_000);
        assert_eq!(floor_limit(&c, "4761739001010010", Some(1234)), 7_000);
        assert_eq!(floor_limit(&c, "4761730001010010", Some(1234)), 5_000);
        assert_eq!(floor_limit(&c, "5413330001010010", Some(5411)), 3_000);
        assert_eq!(floor_limit(&c, "5413330001010010", Some(1234)), 1_000);
    }

    #[test]
    fn approves_under_the_limit_only_for_good_cards() {
        let c = config();
        let mut m = sample::auth_request();
        m.set(14, b"2812");
        m.set(18, b"1234");
        let pan = m.pan().unwrap();
        m.set_amount(7_000);
        assert_eq!(decide(&c, &m, &pan, "ab", "2611"), Ok(()));
        m.set_amount(7_001);
        assert_eq!(decide(&c, &m, &pan, "ab", "2611"), Err(Refusal::OverLimit));
        m.set_amount(100);
        assert_eq!(decide(&c, &m, &pan, "ab", "2901"), Err(Refusal::Expired));
        assert_eq!(decide(&c, &m, &pan, "ab", "2812"), Ok(()));
        let mut c2 = c.clone();
        c2.negative_pan_hmacs = vec!["AB".into()];
        assert_eq!(
            decide(&c2, &m, &pan, "ab", "2611"),
            Err(Refusal::NegativeList)
        );
        m.set(2, b"4761731000000004");
        let pan = m.pan().unwrap();
        assert_eq!(
            decide(&c, &m, &pan, "cd", "2611"),
            Err(Refusal::NegativeList)
        );
        assert_eq!(auth_code(1_234_567), "S34567");
    }
}
