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

use anyhow::{anyhow, bail, Context, Result};
use cardswitch_codec::framing::Framing;
use cardswitch_codec::Dialect;
use cardswitch_routing::{BinTable, Route, Strategy};
use serde::Deserialize;

use crate::fraud::FraudSection;
use crate::journal::JournalSection;
use crate::net::FramingConfig;
use crate::security::{EndpointSecurity, ListenerSecurity};
use crate::settlement::SettlementSection;
use crate::upstream::EndpointConfig;
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

/// `[[listeners]]`: where terminals connect.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Name in logs and metrics.
    pub name: String,
    /// Address to listen on.
    pub address: SocketAddr,
    /// Dialect of the terminals.
    #[serde(default = "crate::net::default_dialect")]
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

const fn default_max_connections() -> usize {
    10_000
}
const fn default_idle_ms() -> u64 {
    300_000
}
const fn default_pipeline() -> usize {
    256
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
        assert_eq!(v.config.journal.mode, crate::journal::JournalMode::Async);
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
