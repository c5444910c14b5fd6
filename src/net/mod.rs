//! The network kit that terminal sessions, acquirer links and the HSM client share: frame
//! delimiting as configured, the coalescing writer ([`write`]) and the reconnecting-connection
//! loop ([`connection`]).

pub(crate) mod connection;
pub(crate) mod proxy;
pub(crate) mod write;

use anyhow::{anyhow, Result};
use cardswitch_codec::framing::{Framing, LengthPrefix, DEFAULT_MAX_FRAME};
use serde::Deserialize;

/// The dialect a listener or endpoint speaks when its section names none.
pub(crate) fn default_dialect() -> String {
    cardswitch_codec::DEFAULT_DIALECT.into()
}

/// How frames are delimited, as configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FramingConfig {
    /// `bin2`, `bin4`, `ascii4`, `bcd2` or `hex4`.
    pub prefix: String,
    /// The length counts its own bytes.
    pub includes_prefix: bool,
    /// A 5-byte TPDU follows the length.
    pub tpdu: bool,
    /// Largest frame accepted.
    pub max_frame: usize,
}

impl Default for FramingConfig {
    fn default() -> Self {
        Self {
            prefix: "bin2".into(),
            includes_prefix: false,
            tpdu: false,
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

impl FramingConfig {
    /// The framing.
    ///
    /// # Errors
    /// An unknown prefix name.
    pub fn framing(&self) -> Result<Framing> {
        let prefix: LengthPrefix = self.prefix.parse().map_err(|e: String| anyhow!(e))?;
        Ok(Framing {
            prefix,
            includes_prefix: self.includes_prefix,
            tpdu: self.tpdu,
            trailer: None,
            max_frame: self.max_frame,
        })
    }
}
