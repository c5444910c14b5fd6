//! `[[endpoints]]`: an acquirer, its links and what the switch does for it (store-and-forward,
//! stand-in, keys, business date).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use cardswitch_codec::framing::Framing;
use cardswitch_codec::Dialect;
use cardswitch_routing::Strategy;
use serde::Deserialize;

use crate::net::FramingConfig;
use crate::security::EndpointSecurity;
use crate::settlement::EndpointSettlement;
use crate::stand_in::StandInConfig;
use crate::tls::{ClientTls, Connector};

/// `[[endpoints]]`: an acquirer reached over a pool of links.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// Name used by routes.
    pub name: String,
    /// The acquirer's dialect.
    #[serde(default = "crate::net::default_dialect")]
    pub dialect: String,
    /// The acquirer's framing.
    #[serde(default)]
    pub framing: FramingConfig,
    /// `host:port` of each link.
    pub links: Vec<String>,
    /// `primary-secondary`, `round-robin` or `least-in-flight`.
    #[serde(default = "default_strategy")]
    pub strategy: String,
    /// DE32 sent to this acquirer.
    #[serde(default)]
    pub acquirer_id: Option<String>,
    /// How long the acquirer has to answer, in milliseconds.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_ms: u64,
    /// Most requests in flight on one link.
    #[serde(default = "default_link_in_flight")]
    pub max_in_flight_per_link: u32,
    /// Sign on (0800/001) before a link takes traffic.
    #[serde(default = "yes")]
    pub sign_on: bool,
    /// Idle time before an echo test (0800/301), in milliseconds.
    #[serde(default = "default_echo")]
    pub echo_interval_ms: u64,
    /// Echo tests missed in a row before the link is dropped and reconnected.
    #[serde(default = "default_missed")]
    pub max_missed_echoes: u32,
    /// First reconnection delay, in milliseconds (doubles up to the maximum).
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min_ms: u64,
    /// Longest reconnection delay, in milliseconds.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_ms: u64,
    /// TLS: CA to trust, optional server name and client certificate.
    #[serde(default)]
    pub tls: Option<ClientTls>,
    /// Store-and-forward of reversals and advices to this endpoint.
    #[serde(default)]
    pub saf: SafConfig,
    /// Stand-in processing when this endpoint cannot answer.
    #[serde(default)]
    pub stand_in: StandInConfig,
    /// Keys shared with the acquirer: PIN translation, MACs, key exchange, CVV.
    #[serde(default)]
    pub security: Option<crate::security::EndpointSecurityConfig>,
    /// Business date cutover and fees.
    #[serde(default)]
    pub settlement: EndpointSettlement,
}

/// `[endpoints.saf]`: how queued reversals and advices are sent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SafConfig {
    /// Delay before the first transmission, in milliseconds.
    pub initial_delay_ms: u64,
    /// Delay before the first retransmission, in milliseconds; doubles each time.
    pub retry_min_ms: u64,
    /// Longest delay between retransmissions, in milliseconds.
    pub retry_max_ms: u64,
    /// Most transmissions (0: until expiry).
    pub max_tries: u32,
    /// An entry not delivered after this long is given up, in seconds.
    pub expire_after_s: u64,
    /// Response codes that end an entry as delivered.
    pub valid_codes: Vec<String>,
    /// Response codes that retry it (`ZZ`: no response). Any other code ends it as refused.
    pub retry_codes: Vec<String>,
    /// Most entries of this endpoint in flight at once (different cards).
    pub max_in_flight: usize,
    /// How often the queue is read when nothing new was queued here, in milliseconds.
    pub poll_ms: u64,
}

impl Default for SafConfig {
    fn default() -> Self {
        Self {
            initial_delay_ms: 500,
            retry_min_ms: 1_000,
            retry_max_ms: 60_000,
            max_tries: 0,
            expire_after_s: 86_400,
            valid_codes: ["00", "12", "21", "25", "94"].map(String::from).to_vec(),
            retry_codes: ["91", "96", "ZZ"].map(String::from).to_vec(),
            max_in_flight: 256,
            poll_ms: 250,
        }
    }
}

fn default_strategy() -> String {
    "primary-secondary".into()
}
const fn default_request_timeout() -> u64 {
    5_000
}
const fn default_link_in_flight() -> u32 {
    512
}
const fn yes() -> bool {
    true
}
const fn default_echo() -> u64 {
    30_000
}
const fn default_missed() -> u32 {
    3
}
const fn default_reconnect_min() -> u64 {
    100
}
const fn default_reconnect_max() -> u64 {
    10_000
}

impl EndpointConfig {
    /// Request timeout.
    #[must_use]
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

/// An endpoint as validated: its section and what was loaded for it.
#[derive(Debug, Clone)]
pub struct ValidEndpoint {
    /// The section as read.
    pub config: EndpointConfig,
    /// The acquirer's dialect.
    pub dialect: Dialect,
    /// Its framing.
    pub framing: Framing,
    /// How links are chosen.
    pub strategy: Strategy,
    /// TLS, when configured.
    pub tls: Option<Connector>,
    /// The keys shared with the acquirer, when configured.
    pub security: Option<Arc<EndpointSecurity>>,
}

impl EndpointConfig {
    /// Loads the endpoint's dialect, framing, TLS and keys, and checks its settings.
    ///
    /// # Errors
    /// The first thing that does not validate, named with the endpoint.
    pub fn validate(&self) -> Result<ValidEndpoint> {
        let name = &self.name;
        let dialect = Dialect::load(&self.dialect).with_context(|| format!("endpoint {name}"))?;
        let framing = self
            .framing
            .framing()
            .with_context(|| format!("endpoint {name}"))?;
        let strategy: Strategy = self
            .strategy
            .parse()
            .map_err(|m: String| anyhow!("endpoint {name}: {m}"))?;
        self.check_limits()?;
        self.saf.check(name)?;
        self.stand_in.check(name)?;
        self.settlement.check(name)?;
        let tls = self
            .tls
            .as_ref()
            .map(ClientTls::connector)
            .transpose()
            .with_context(|| format!("endpoint {name}: tls"))?;
        let security = self
            .security
            .as_ref()
            .map(|s| EndpointSecurity::from_config(s, name).map(Arc::new))
            .transpose()?;
        if self.stand_in.verify_cvv && security.as_ref().is_none_or(|s| s.cvk.is_none()) {
            bail!("endpoint {name}: stand_in.verify_cvv needs security.cvk");
        }
        Ok(ValidEndpoint {
            config: self.clone(),
            dialect,
            framing,
            strategy,
            tls,
            security,
        })
    }

    fn check_limits(&self) -> Result<()> {
        let name = &self.name;
        if self.links.is_empty() || self.links.len() > 64 {
            bail!("endpoint {name}: 1 to 64 links");
        }
        if self.max_in_flight_per_link == 0 || self.request_timeout_ms == 0 {
            bail!(
                "endpoint {name}: max_in_flight_per_link and request_timeout_ms must be positive"
            );
        }
        if let Some(id) = &self.acquirer_id {
            if id.is_empty() || id.len() > 11 || !id.bytes().all(|b| b.is_ascii_digit()) {
                bail!("endpoint {name}: acquirer_id must be 1 to 11 digits");
            }
        }
        Ok(())
    }
}

impl SafConfig {
    fn check(&self, endpoint: &str) -> Result<()> {
        for code in self.valid_codes.iter().chain(&self.retry_codes) {
            if code.len() != 2 {
                bail!("endpoint {endpoint}: saf response code {code:?} is not two characters");
            }
        }
        if self.retry_min_ms == 0
            || self.retry_max_ms < self.retry_min_ms
            || self.max_in_flight == 0
        {
            bail!(
                "endpoint {endpoint}: saf needs 0 < retry_min_ms <= retry_max_ms and max_in_flight > 0"
            );
        }
        Ok(())
    }
}
