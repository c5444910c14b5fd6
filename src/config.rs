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
use cardswitch_routing::{BinTable, Route};
use serde::Deserialize;

use crate::fraud::FraudSection;
use crate::journal::JournalSection;
use crate::net::FramingConfig;
use crate::security::ListenerSecurity;
use crate::settlement::SettlementSection;
use crate::tls::{Acceptor, ServerTls};
use crate::upstream::{EndpointConfig, ValidEndpoint};

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
    /// On SIGTERM, how long the node keeps serving, with `/readyz` answering 503, before it
    /// stops accepting: longer than a balancer needs to see it (health check interval times
    /// its fall count), in milliseconds.
    pub drain_delay_ms: u64,
    /// Institution id put in DE32 when an endpoint does not set its own.
    pub acquirer_id: Option<String>,
}

impl Default for SwitchSection {
    fn default() -> Self {
        Self {
            node: "cardswitch".into(),
            shutdown_grace_ms: 5_000,
            drain_delay_ms: 5_000,
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
    /// Whether the terminals take partial approvals: an acquirer's DE39 10 is relayed with the
    /// approved DE4 (and DE6). When false (the default), a partial approval is reversed and the
    /// terminal is declined 51.
    #[serde(default)]
    pub partial_approvals: bool,
    /// Every connection begins with a PROXY protocol v2 header naming the terminal's address
    /// (a balancer in front sends it: HAProxy `send-proxy-v2`); a connection without one is
    /// closed. See [`crate::net::proxy`].
    #[serde(default)]
    pub proxy_protocol: bool,
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

/// A listener as validated: its section and what was loaded for it.
#[derive(Debug, Clone)]
pub struct ValidListener {
    /// The section as read.
    pub config: ListenerConfig,
    /// The terminals' dialect.
    pub dialect: Dialect,
    /// Their framing.
    pub framing: Framing,
    /// TLS, when configured.
    pub tls: Option<Acceptor>,
    /// Terminal keys, when configured.
    pub security: Option<ListenerSecurity>,
}

/// A validated configuration: dialects loaded, routes resolved.
#[derive(Debug, Clone)]
pub struct Validated {
    /// The configuration as read.
    pub config: Config,
    /// The listeners, in configured order.
    pub listeners: Vec<ValidListener>,
    /// The endpoints, in configured order.
    pub endpoints: Vec<ValidEndpoint>,
    /// The routing table.
    pub bins: BinTable,
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
        self.journal.check_keys()?;
        if self.journal.duplicate_retention_s < 86_400 {
            bail!("journal.duplicate_retention_s: at least 86400 (a day): STANs wrap");
        }
        let mut names = HashSet::new();
        for (kind, name) in self
            .listeners
            .iter()
            .map(|l| ("listener", &l.name))
            .chain(self.endpoints.iter().map(|e| ("endpoint", &e.name)))
        {
            if !names.insert(format!("{kind} {name}")) {
                bail!("{kind} {name}: name used twice");
            }
        }
        let listeners = self
            .listeners
            .iter()
            .map(ListenerConfig::validate)
            .collect::<Result<Vec<_>>>()?;
        let endpoints = self
            .endpoints
            .iter()
            .map(EndpointConfig::validate)
            .collect::<Result<Vec<_>>>()?;
        let bins = self.routing()?;
        let keys = listeners.iter().any(|l| l.security.is_some())
            || endpoints.iter().any(|e| e.security.is_some());
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
            fraud,
        })
    }

    /// The routing table: every route's endpoints exist.
    fn routing(&self) -> Result<BinTable> {
        let known: HashSet<&str> = self.endpoints.iter().map(|e| e.name.as_str()).collect();
        for r in &self.routes {
            for name in std::iter::once(&r.endpoint).chain(r.fallback.iter()) {
                if !known.contains(name.as_str()) {
                    bail!("route {}: no endpoint named {name}", r.prefix);
                }
            }
        }
        Ok(BinTable::new(
            self.routes
                .iter()
                .map(|r| Route {
                    prefix: r.prefix.clone(),
                    endpoint: r.endpoint.clone(),
                    fallback: r.fallback.clone(),
                })
                .collect(),
        )?)
    }
}

impl ListenerConfig {
    /// Loads the listener's dialect, framing, TLS and keys.
    ///
    /// # Errors
    /// The first thing that does not validate, named with the listener.
    pub fn validate(&self) -> Result<ValidListener> {
        let name = &self.name;
        let dialect = Dialect::load(&self.dialect).with_context(|| format!("listener {name}"))?;
        let framing = self
            .framing
            .framing()
            .with_context(|| format!("listener {name}"))?;
        if self.max_connections == 0 || self.max_in_flight_per_connection == 0 {
            bail!("listener {name}: max_connections and max_in_flight_per_connection must be positive");
        }
        let tls = self
            .tls
            .as_ref()
            .map(ServerTls::acceptor)
            .transpose()
            .with_context(|| format!("listener {name}: tls"))?;
        let security = self
            .security
            .as_ref()
            .map(|s| ListenerSecurity::from_config(s, name))
            .transpose()?;
        Ok(ValidListener {
            config: self.clone(),
            dialect,
            framing,
            tls,
            security,
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

    /// The environment `pairs`, with the journal's keys as an operator gives them there.
    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let key = "ab".repeat(32);
        [
            ("CARDSWITCH__JOURNAL__PAN_HMAC_KEY", key.as_str()),
            ("CARDSWITCH__JOURNAL__DATA_KEY", key.as_str()),
        ]
        .iter()
        .chain(pairs)
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
    fn the_example_without_keys_is_refused_with_how_to_make_them() {
        let text = include_str!("../specs/cardswitch.toml");
        let err = format!("{:#}", Config::from_toml(text, Vec::new()).unwrap_err());
        assert!(
            err.contains("journal.pan_hmac_key and journal.data_key not set")
                && err.contains("openssl rand -hex 32")
                && err.contains("ephemeral_keys"),
            "{err}"
        );
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
