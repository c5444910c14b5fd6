//! Card-range routing: the longest matching account-range prefix (6 to 11 digits) wins.
//!
//! The table keeps one hash map per prefix length; a look-up tries the PAN's first 11 digits,
//! then 10, down to 6: at most six hash probes, whatever the table's size.

use std::collections::HashMap;

use cardswitch_codec::Pan;

/// Shortest account-range prefix.
pub const MIN_PREFIX: usize = 6;
/// Longest account-range prefix.
pub const MAX_PREFIX: usize = 11;

/// Where a card range goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The account-range prefix, as configured.
    pub prefix: String,
    /// The endpoint that serves the range.
    pub endpoint: String,
    /// The endpoint that takes requests the first one cannot (no ready link), if any.
    pub fallback: Option<String>,
}

/// Why a routing table cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BinTableError {
    /// A prefix that is not 6 to 11 digits.
    #[error("account range {0:?}: a prefix is 6 to 11 digits")]
    BadPrefix(String),
    /// The same prefix twice.
    #[error("account range {0}: defined twice")]
    Duplicate(String),
}

/// Account-range prefixes to routes.
#[derive(Debug, Clone, Default)]
pub struct BinTable {
    /// Indexed by prefix length minus `MIN_PREFIX`; keys are the prefix digits as a number.
    by_len: [HashMap<u64, usize>; MAX_PREFIX - MIN_PREFIX + 1],
    routes: Vec<Route>,
}

fn prefix_number(digits: &[u8]) -> u64 {
    digits
        .iter()
        .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'))
}

impl BinTable {
    /// Builds a table.
    ///
    /// # Errors
    /// [`BinTableError`] for a prefix that is not 6 to 11 digits or appears twice.
    pub fn new(routes: Vec<Route>) -> Result<Self, BinTableError> {
        let mut table = Self::default();
        for (i, route) in routes.iter().enumerate() {
            let p = route.prefix.as_bytes();
            if !(MIN_PREFIX..=MAX_PREFIX).contains(&p.len()) || !p.iter().all(u8::is_ascii_digit) {
                return Err(BinTableError::BadPrefix(route.prefix.clone()));
            }
            let map = table
                .by_len
                .get_mut(p.len() - MIN_PREFIX)
                .ok_or_else(|| BinTableError::BadPrefix(route.prefix.clone()))?;
            if map.insert(prefix_number(p), i).is_some() {
                return Err(BinTableError::Duplicate(route.prefix.clone()));
            }
        }
        table.routes = routes;
        Ok(table)
    }

    /// The route of the longest prefix matching the PAN. A PAN needs at least four digits beyond
    /// the prefix, so a short PAN only matches short prefixes.
    #[must_use]
    pub fn lookup(&self, pan: &Pan) -> Option<&Route> {
        let digits = pan.expose().as_bytes();
        let longest = MAX_PREFIX.min(digits.len().saturating_sub(4));
        (MIN_PREFIX..=longest).rev().find_map(|len| {
            let key = prefix_number(digits.get(..len)?);
            let i = *self.by_len.get(len - MIN_PREFIX)?.get(&key)?;
            self.routes.get(i)
        })
    }

    /// Every route, in the order given.
    #[must_use]
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str, endpoint: &str) -> Route {
        Route {
            prefix: prefix.into(),
            endpoint: endpoint.into(),
            fallback: None,
        }
    }

    fn pan(s: &str) -> Pan {
        Pan::new(s.as_bytes()).unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let table = BinTable::new(vec![
            route("411111", "visa-a"),
            route("41111111", "visa-b"),
            route("41111111111", "visa-c"),
            route("555555", "mc"),
        ])
        .unwrap();
        assert_eq!(
            table.lookup(&pan("4111111111111111")).unwrap().endpoint,
            "visa-c"
        );
        assert_eq!(
            table.lookup(&pan("4111111122222222")).unwrap().endpoint,
            "visa-b"
        );
        assert_eq!(
            table.lookup(&pan("4111119999999999")).unwrap().endpoint,
            "visa-a"
        );
        assert_eq!(
            table.lookup(&pan("5555555555554444")).unwrap().endpoint,
            "mc"
        );
        assert!(table.lookup(&pan("4242424242424242")).is_none());
        // Too short to carry an 11-digit prefix plus four digits: the 8-digit range applies.
        assert_eq!(
            table.lookup(&pan("411111111111")).unwrap().endpoint,
            "visa-b"
        );
    }

    #[test]
    fn bad_tables_are_refused() {
        assert_eq!(
            BinTable::new(vec![route("41111", "x")]).unwrap_err(),
            BinTableError::BadPrefix("41111".into())
        );
        assert_eq!(
            BinTable::new(vec![route("411111111111", "x")]).unwrap_err(),
            BinTableError::BadPrefix("411111111111".into())
        );
        assert_eq!(
            BinTable::new(vec![route("41111a", "x")]).unwrap_err(),
            BinTableError::BadPrefix("41111a".into())
        );
        assert_eq!(
            BinTable::new(vec![route("411111", "x"), route("411111", "y")]).unwrap_err(),
            BinTableError::Duplicate("411111".into())
        );
    }
}
