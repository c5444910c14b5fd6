//! Configuration: defaults, then the TOML file, then `CARDSWITCH__SECTION__KEY` environment
//! variables; validated as a whole at start-up, unknown keys refused.
//!
//! Environment keys are the TOML path in upper case joined by double underscores; arrays of
//! tables take an index: `CARDSWITCH__LISTENERS__0__ADDRESS=0.0.0.0:8583`,
//! `CARDSWITCH__JOURNAL__MODE=async`. A value is read as TOML when it parses as one (numbers,
//! booleans, arrays) and as a string otherwise. The journal URL also comes from `DATABASE_URL`
//! when the file does not set it.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use cardswitch_codec::framing::{Framing, LengthPrefix, DEFAULT_MAX_FRAME};
use cardswitch_codec::Dialect;
use cardswitch_routing::{BinTable, Route, Strategy};
use serde::Deserialize;

use crate::security::{EndpointSecurity, ListenerSecurity};
use crate::tls::{Acceptor, ClientTls, Connector, ServerTls};

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "CARDSWITCH__";
/// Where the journal URL comes from when the file has none.
pub const DATABASE_URL: &str = "DATABASE_URL";

/// The whole configuration, as read.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Switch-wide settings.
    #[serde(default)]
    pub switch: SwitchSection,
    /// The transaction journal.
    #[serde(default)]
    pub journal: JournalSection,
    /// Terminal listeners.
    pub listeners: Vec<ListenerConfig>,
    /// Acquirer endpoints.
    pub endpoints: Vec<EndpointConfig>,
    /// Card ranges.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// The HSMs (needed when any listener or endpoint has security keys).
    #[serde(default)]
    pub hsm: Option<crate::hsm::HsmSection>,
    /// The admin side: metrics, dashboard, transaction look-up.
    #[serde(default)]
    pub admin: Option<crate::admin::AdminSection>,
    /// Inline fraud rules.
    #[serde(default)]
    pub fraud: Option<FraudSection>,
    /// Terminal batches and business dates.
    #[serde(default)]
    pub settlement: SettlementSection,
}

/// `[settlement]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SettlementSection {
    /// The field of terminal messages that carries the batch number (first 6 characters).
    pub batch_field: u8,
}

impl Default for SettlementSection {
    fn default() -> Self {
        Self { batch_field: 60 }
    }
}

/// `[endpoints.settlement]`: the endpoint's business date and what it charges.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EndpointSettlement {
    /// `HH:MM` (UTC): the business date advances at this time every day, besides the
    /// acquirer's 0800 cutover (DE70 201).
    pub cutover_time: Option<String>,
    /// Fee rate applied in the settlement report (a decimal fraction, e.g. "0.0125").
    pub fee_rate: Option<String>,
    /// Fixed fee per transaction in the settlement report, minor units.
    pub fee_fixed_minor: u64,
}

/// `[fraud]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FraudSection {
    /// The rules file (see `specs/fraud-rules.toml`); reloaded on SIGHUP and
    /// `POST /api/fraud/reload`.
    pub rules: std::path::PathBuf,
}

/// `[switch]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SwitchSection {
    /// Name in logs and in the journal (several switch nodes can share one database).
    pub node: String,
    /// How long shutdown waits for in-flight transactions, in milliseconds.
    pub shutdown_grace_ms: u64,
    /// Institution id put in DE32 when an endpoint does not set its own.
    pub acquirer_id: Option<String>,
}

impl Default for SwitchSection {
    fn default() -> Self {
        Self {
            node: "cardswitch".into(),
            shutdown_grace_ms: 5_000,
            acquirer_id: None,
        }
    }
}

/// `[journal]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalSection {
    /// `postgres://...` or `sqlite://...`; `DATABASE_URL` when empty.
    pub url: String,
    /// `durable`: reply after the commit; `async`: reply first, commit soon after.
    pub mode: String,
    /// Most rows in one commit.
    pub batch_max: usize,
    /// Longest a row waits for others before its batch is committed, in microseconds.
    pub batch_delay_us: u64,
    /// Key of the PAN HMAC, hex (at least 32 bytes).
    pub pan_hmac_key: String,
    /// AES-256 key sealing messages kept for store-and-forward and stored replies, hex (32 bytes).
    pub data_key: String,
    /// How long duplicate keys are kept, in seconds (at least a day: STANs wrap).
    pub duplicate_retention_s: u64,
}

impl Default for JournalSection {
    fn default() -> Self {
        Self {
            url: String::new(),
            mode: "durable".into(),
            batch_max: 512,
            batch_delay_us: 0,
            pan_hmac_key: String::new(),
            data_key: String::new(),
            duplicate_retention_s: 90_000,
        }
    }
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

/// `[[listeners]]`: where terminals connect.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Name in logs and metrics.
    pub name: String,
    /// Address to listen on.
    pub address: SocketAddr,
    /// Dialect of the terminals.
    #[serde(default = "default_dialect")]
    pub dialect: String,
    /// Framing of the terminals.
    #[serde(default)]
    pub framing: FramingConfig,
    /// Most concurrent connections; more are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A connection with no frame for this long is closed, in milliseconds.
    #[serde(default = "default_idle_ms")]
    pub idle_timeout_ms: u64,
    /// Most requests one connection may have in flight.
    #[serde(default = "default_pipeline")]
    pub max_in_flight_per_connection: usize,
    /// TLS: server certificate and key, optional client CA.
    #[serde(default)]
    pub tls: Option<ServerTls>,
    /// Terminal keys: PIN translation and MAC verification.
    #[serde(default)]
    pub security: Option<crate::security::TerminalSecurityConfig>,
}

fn default_dialect() -> String {
    cardswitch_codec::DEFAULT_DIALECT.into()
}
const fn default_max_connections() -> usize {
    10_000
}
const fn default_idle_ms() -> u64 {
    300_000
}
const fn default_pipeline() -> usize {
    256
}

/// `[[endpoints]]`: an acquirer reached over a pool of links.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// Name used by routes.
    pub name: String,
    /// The acquirer's dialect.
    #[serde(default = "default_dialect")]
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

/// `[[routes]]`: a card range and where it goes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// 6 to 11 leading PAN digits.
    pub prefix: String,
    /// Endpoint name.
    pub endpoint: String,
    /// Endpoint that takes requests when no link of the first is ready.
    #[serde(default)]
    pub fallback: Option<String>,
}

/// A validated configuration: dialects loaded, routes resolved.
#[derive(Debug, Clone)]
pub struct Validated {
    /// The configuration as read.
    pub config: Config,
    /// Listener dialects, framings and TLS acceptors, in listener order.
    pub listeners: Vec<(Dialect, Framing, Option<Acceptor>)>,
    /// Endpoint dialects, framings, strategies and TLS connectors, in endpoint order.
    pub endpoints: Vec<(Dialect, Framing, Strategy, Option<Connector>)>,
    /// The routing table.
    pub bins: BinTable,
    /// Terminal keys per listener, in listener order.
    pub listener_security: Vec<Option<ListenerSecurity>>,
    /// Acquirer keys per endpoint, in endpoint order.
    pub endpoint_security: Vec<Option<Arc<EndpointSecurity>>>,
    /// The fraud rules, loaded and validated.
    pub fraud: Option<Arc<crate::fraud::Rules>>,
}

impl EndpointConfig {
    /// Request timeout.
    #[must_use]
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

impl Config {
    /// Reads a file, applies the environment, validates.
    ///
    /// # Errors
    /// A message naming the file, the key and the problem.
    pub fn load(path: &Path) -> Result<Validated> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_toml(&text, std::env::vars())
            .with_context(|| format!("configuration {}", path.display()))
    }

    /// Parses TOML text with the given environment.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Validated> {
        let mut value: toml::Value = toml::from_str(text)?;
        let mut database_url = None;
        for (key, raw) in env {
            if key == DATABASE_URL {
                database_url = Some(raw);
                continue;
            }
            let Some(path) = key.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let parts: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
            set_path(&mut value, &parts, parse_env_value(&raw))
                .with_context(|| format!("environment {key}"))?;
        }
        let mut config: Self = value.try_into()?;
        if config.journal.url.is_empty() {
            config.journal.url = database_url.unwrap_or_default();
        }
        config.validate()
    }

    fn validate(self) -> Result<Validated> {
        if self.listeners.is_empty() {
            bail!("at least one [[listeners]] is needed");
        }
        if !matches!(self.journal.mode.as_str(), "durable" | "async") {
            bail!(
                "journal.mode: {:?} is not durable or async",
                self.journal.mode
            );
        }
        if self.journal.duplicate_retention_s < 86_400 {
            bail!("journal.duplicate_retention_s: at least 86400 (a day): STANs wrap");
        }
        let mut names = HashSet::new();
        let mut listeners = Vec::new();
        for l in &self.listeners {
            if !names.insert(format!("listener {}", l.name)) {
                bail!("listener {}: name used twice", l.name);
            }
            let dialect =
                Dialect::load(&l.dialect).with_context(|| format!("listener {}", l.name))?;
            let framing = l
                .framing
                .framing()
                .with_context(|| format!("listener {}", l.name))?;
            if l.max_connections == 0 || l.max_in_flight_per_connection == 0 {
                bail!("listener {}: max_connections and max_in_flight_per_connection must be positive", l.name);
            }
            let tls = l
                .tls
                .as_ref()
                .map(ServerTls::acceptor)
                .transpose()
                .with_context(|| format!("listener {}: tls", l.name))?;
            listeners.push((dialect, framing, tls));
        }
        let mut endpoints = Vec::new();
        for e in &self.endpoints {
            if !names.insert(format!("endpoint {}", e.name)) {
                bail!("endpoint {}: name used twice", e.name);
            }
            let dialect =
                Dialect::load(&e.dialect).with_context(|| format!("endpoint {}", e.name))?;
            let framing = e
                .framing
                .framing()
                .with_context(|| format!("endpoint {}", e.name))?;
            let strategy: Strategy = e
                .strategy
                .parse()
                .map_err(|m: String| anyhow!("endpoint {}: {m}", e.name))?;
            if let Some(t) = &e.settlement.cutover_time {
                crate::settlement::parse_time(t)
                    .with_context(|| format!("endpoint {}: settlement.cutover_time", e.name))?;
            }
            if let Some(r) = &e.settlement.fee_rate {
                r.parse::<rust_decimal::Decimal>().map_err(|_| {
                    anyhow!(
                        "endpoint {}: settlement.fee_rate {r:?} is not a decimal",
                        e.name
                    )
                })?;
            }
            if e.links.is_empty() || e.links.len() > 64 {
                bail!("endpoint {}: 1 to 64 links", e.name);
            }
            if e.max_in_flight_per_link == 0 || e.request_timeout_ms == 0 {
                bail!(
                    "endpoint {}: max_in_flight_per_link and request_timeout_ms must be positive",
                    e.name
                );
            }
            for code in e.saf.valid_codes.iter().chain(&e.saf.retry_codes) {
                if code.len() != 2 {
                    bail!(
                        "endpoint {}: saf response code {code:?} is not two characters",
                        e.name
                    );
                }
            }
            if e.saf.retry_min_ms == 0
                || e.saf.retry_max_ms < e.saf.retry_min_ms
                || e.saf.max_in_flight == 0
            {
                bail!(
                    "endpoint {}: saf needs 0 < retry_min_ms <= retry_max_ms and max_in_flight > 0",
                    e.name
                );
            }
            for f in &e.stand_in.floor_limits {
                if let Some(p) = &f.prefix {
                    if p.is_empty() || p.len() > 11 || !p.bytes().all(|b| b.is_ascii_digit()) {
                        bail!(
                            "endpoint {}: stand_in floor limit prefix {p:?} is not 1 to 11 digits",
                            e.name
                        );
                    }
                }
            }
            if let Some(id) = &e.acquirer_id {
                if id.is_empty() || id.len() > 11 || !id.bytes().all(|b| b.is_ascii_digit()) {
                    bail!("endpoint {}: acquirer_id must be 1 to 11 digits", e.name);
                }
            }
            let tls = e
                .tls
                .as_ref()
                .map(ClientTls::connector)
                .transpose()
                .with_context(|| format!("endpoint {}: tls", e.name))?;
            endpoints.push((dialect, framing, strategy, tls));
        }
        let known: HashSet<&str> = self.endpoints.iter().map(|e| e.name.as_str()).collect();
        for r in &self.routes {
            for name in std::iter::once(&r.endpoint).chain(r.fallback.iter()) {
                if !known.contains(name.as_str()) {
                    bail!("route {}: no endpoint named {name}", r.prefix);
                }
            }
        }
        let bins = BinTable::new(
            self.routes
                .iter()
                .map(|r| Route {
                    prefix: r.prefix.clone(),
                    endpoint: r.endpoint.clone(),
                    fallback: r.fallback.clone(),
                })
                .collect(),
        )?;
        let listener_security = self
            .listeners
            .iter()
            .map(|l| {
                l.security
                    .as_ref()
                    .map(|s| ListenerSecurity::from_config(s, &l.name))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        let endpoint_security = self
            .endpoints
            .iter()
            .map(|e| {
                let sec = e
                    .security
                    .as_ref()
                    .map(|s| EndpointSecurity::from_config(s, &e.name).map(Arc::new))
                    .transpose()?;
                if e.stand_in.verify_cvv && sec.as_ref().is_none_or(|s| s.cvk.is_none()) {
                    bail!(
                        "endpoint {}: stand_in.verify_cvv needs security.cvk",
                        e.name
                    );
                }
                Ok(sec)
            })
            .collect::<Result<Vec<_>>>()?;
        let keys = listener_security.iter().any(Option::is_some)
            || endpoint_security.iter().any(Option::is_some);
        if let Some(a) = &self.admin {
            if a.token.len() < 16 {
                bail!("admin.token: at least 16 characters");
            }
        }
        match &self.hsm {
            None if keys => bail!("security keys are configured: an [hsm] section is needed"),
            Some(h) if h.addresses.is_empty() => bail!("hsm.addresses: at least one address"),
            Some(h) if !(1..=8).contains(&h.header_len) => bail!("hsm.header_len: 1 to 8"),
            _ => {}
        }
        let fraud = self
            .fraud
            .as_ref()
            .map(|f| crate::fraud::Rules::load(&f.rules).map(Arc::new))
            .transpose()
            .context("fraud.rules")?;
        Ok(Validated {
            config: self,
            listeners,
            endpoints,
            bins,
            listener_security,
            endpoint_security,
            fraud,
        })
    }
}

fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn set_path(value: &mut toml::Value, path: &[String], new: toml::Value) -> Result<()> {
    let Some((first, rest)) = path.split_first() else {
        *value = new;
        return Ok(());
    };
    match value {
        toml::Value::Table(t) => {
            let entry = t
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            set_path(entry, rest, new)
        }
        toml::Value::Array(a) => {
            let i: usize = first
                .parse()
                .map_err(|_| anyhow!("{first}: an array index is needed here"))?;
            let len = a.len();
            let entry = a
                .get_mut(i)
                .ok_or_else(|| anyhow!("index {i}: the array has {len} entries"))?;
            set_path(entry, rest, new)
        }
        _ => bail!("{first}: not a table"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[listeners]]
name = "pos"
address = "127.0.0.1:8583"

[[endpoints]]
name = "acq"
links = ["127.0.0.1:9583"]

[[routes]]
prefix = "476173"
endpoint = "acq"
"#;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_shipped_example_validates() {
        let text = include_str!("../specs/cardswitch.toml");
        let v = Config::from_toml(text, env(&[])).unwrap();
        assert_eq!(v.config.listeners[0].address.to_string(), "127.0.0.1:8583");
        assert_eq!(v.config.endpoints[0].links, ["127.0.0.1:9583"]);
    }

    #[test]
    fn environment_overrides_any_key() {
        let v = Config::from_toml(
            MINIMAL,
            env(&[
                ("CARDSWITCH__LISTENERS__0__ADDRESS", "0.0.0.0:9999"),
                ("CARDSWITCH__JOURNAL__MODE", "async"),
                ("CARDSWITCH__ENDPOINTS__0__REQUEST_TIMEOUT_MS", "250"),
                ("DATABASE_URL", "postgres://localhost/test"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(v.config.listeners[0].address.to_string(), "0.0.0.0:9999");
        assert_eq!(v.config.journal.mode, "async");
        assert_eq!(v.config.endpoints[0].request_timeout_ms, 250);
        assert_eq!(v.config.journal.url, "postgres://localhost/test");
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            (
                format!("{MINIMAL}\n[switch]\nnodee = \"x\""),
                "unknown field `nodee`",
            ),
            (
                MINIMAL.replace("prefix = \"476173\"", "prefix = \"4761\""),
                "account range \"4761\"",
            ),
            (
                MINIMAL.replace("endpoint = \"acq\"", "endpoint = \"nope\""),
                "no endpoint named nope",
            ),
            (
                MINIMAL.replace("links = [\"127.0.0.1:9583\"]", "links = []"),
                "1 to 64 links",
            ),
            (
                format!("{MINIMAL}\n[journal]\nmode = \"sometimes\""),
                "not durable or async",
            ),
        ];
        for (text, expected) in cases {
            let err = format!("{:#}", Config::from_toml(&text, env(&[])).unwrap_err());
            assert!(err.contains(expected), "{err}\n  want: {expected}");
        }
        let err = format!(
            "{:#}",
            Config::from_toml(MINIMAL, env(&[("CARDSWITCH__ENDPOINTS__3__NAME", "x")]))
                .unwrap_err()
        );
        assert!(err.contains("index 3"), "{err}");
    }
}
