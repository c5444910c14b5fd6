//! Command-line shape, kept stable and documented in README.md.

use clap::{Args, Parser, Subcommand};

use cardswitch_codec::framing::LengthPrefix;

/// cardswitch: an ISO 8583 card switch.
#[derive(Debug, Parser)]
#[command(name = "cardswitch", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the switch.
    Run(RunArgs),
    /// A working demo: the switch, two acquirer simulators and a terminal simulator, no services needed.
    Demo,
    /// Decode one message from hex and print its fields, card data masked.
    Decode(DecodeArgs),
    /// Encode a message from JSON (the shape `decode --json` prints) and print it as hex.
    Encode(EncodeArgs),
    /// List the shipped dialects, or validate dialect files.
    Dialects(DialectsArgs),
    /// Run a simulator: an acquirer host or a terminal load generator.
    #[command(subcommand)]
    Sim(SimCommand),
    /// The ledger check: mixed traffic against a faulty acquirer with a switch restart in the
    /// middle, then the journal, the acquirer's ledger and the terminals' view compared.
    Soak(SoakArgs),
    /// Transaction look-up through the admin API: a filtered list, or one transaction's story.
    Txn(TxnArgs),
    /// Reconcile an acquirer's clearing file for a business date against the journal.
    Reconcile(ReconcileArgs),
    /// The settlement report of a business date: counts and amounts by endpoint, currency and
    /// type, fees and nets.
    Settlement(SettlementArgs),
}

/// Where the journal is: `--database`, else `journal.url` of `--config`, else `$DATABASE_URL`.
#[derive(Debug, Args)]
pub struct DatabaseArgs {
    /// The journal database (postgres://... or sqlite://...).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database: Option<String>,
    /// The switch's configuration file (its journal URL and endpoint fee settings).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
}

/// Output of `reconcile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    /// Counts, totals and every exception as a table.
    Table,
    /// The whole report as JSON.
    Json,
    /// The exceptions as CSV.
    Csv,
}

/// `cardswitch reconcile`.
#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// The endpoint (as named in the configuration and the journal).
    #[arg(long)]
    pub endpoint: String,
    /// The business date (YYYY-MM-DD).
    #[arg(long, value_parser = crate::settlement::date_arg)]
    pub date: String,
    /// The clearing file (CSV).
    #[arg(long)]
    pub file: std::path::PathBuf,
    /// How the result is printed.
    #[arg(long, value_enum, default_value = "table")]
    pub format: ReportFormat,
    /// How many days before the date an approval may still be presented (late presentment).
    #[arg(long, default_value_t = 45)]
    pub late_days: i64,
    /// The journal.
    #[command(flatten)]
    pub db: DatabaseArgs,
}

/// `cardswitch settlement`.
#[derive(Debug, Args)]
pub struct SettlementArgs {
    /// The business date (YYYY-MM-DD).
    #[arg(long, value_parser = crate::settlement::date_arg)]
    pub date: String,
    /// Only this endpoint.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// The journal.
    #[command(flatten)]
    pub db: DatabaseArgs,
}

/// `cardswitch txn`.
#[derive(Debug, Args)]
pub struct TxnArgs {
    /// A transaction id: print its whole story (request, route, reply, reversals, events).
    pub id: Option<i64>,
    /// The switch's admin address.
    #[arg(
        long,
        env = "CARDSWITCH_ADMIN",
        default_value = "http://127.0.0.1:9090"
    )]
    pub admin: String,
    /// The admin bearer token.
    #[arg(long, env = "CARDSWITCH_ADMIN_TOKEN", hide_env_values = true)]
    pub token: String,
    /// DE37.
    #[arg(long)]
    pub rrn: Option<String>,
    /// DE11.
    #[arg(long)]
    pub stan: Option<String>,
    /// DE41.
    #[arg(long)]
    pub terminal: Option<String>,
    /// DE42.
    #[arg(long)]
    pub merchant: Option<String>,
    /// Response code.
    #[arg(long)]
    pub rc: Option<String>,
    /// Only transactions received in the last (e.g. 10m, 2h).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<std::time::Duration>,
    /// Most rows.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// How the switch is restarted in the middle of a soak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Restart {
    /// SIGKILL: nothing is drained.
    Kill,
    /// SIGTERM: in-flight transactions finish.
    Term,
    /// No restart.
    None,
}

/// `cardswitch soak`.
#[derive(Debug, Args)]
pub struct SoakArgs {
    /// How long traffic runs (then it drains and checks).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    pub duration: std::time::Duration,
    /// Requests per second.
    #[arg(long, default_value_t = 2000)]
    pub rate: u64,
    /// Terminal connections.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// PostgreSQL (a fresh schema is made in it) or sqlite:// URL; default $DATABASE_URL, else
    /// postgres://postgres@127.0.0.1:5432/test.
    #[arg(long)]
    pub database_url: Option<String>,
    /// How the switch is restarted half-way.
    #[arg(long, value_enum, default_value = "kill")]
    pub restart: Restart,
    /// Acquirer faults in percent: requests dropped.
    #[arg(long, default_value_t = 5.0)]
    pub drop: f64,
    /// Replies sent late (after the switch's timeout).
    #[arg(long, default_value_t = 2.0)]
    pub late: f64,
    /// Requests answered by closing the connection.
    #[arg(long, default_value_t = 1.0)]
    pub disconnect: f64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Simulators.
#[derive(Debug, Subcommand)]
pub enum SimCommand {
    /// An acquirer host: answers from a rules file, injects faults, keeps a ledger.
    Acquirer(AcquirerArgs),
    /// A terminal load generator: closed loop, open loop or one connection per transaction.
    Terminal(TerminalArgs),
    /// A payShield-style HSM with the public Thales test LMK: PIN translation, MACs, CVV,
    /// PVV, key generation, import and export; injects latency, errors and disconnects.
    Hsm(HsmArgs),
}

/// `cardswitch sim hsm`.
#[derive(Debug, Args)]
pub struct HsmArgs {
    /// Address to listen on (payShield's default port is 1500).
    #[arg(long, default_value = "127.0.0.1:1500")]
    pub listen: std::net::SocketAddr,
    /// Header length in characters.
    #[arg(long, default_value_t = 4)]
    pub header_len: usize,
    /// Faults file (TOML: latency_min_ms, latency_max_ms, error, error_code, no_reply,
    /// disconnect; percentages); reloaded on SIGHUP.
    #[arg(long)]
    pub faults: Option<std::path::PathBuf>,
    /// Latency for every command, in milliseconds (a range: 2..10).
    #[arg(long)]
    pub latency_ms: Option<String>,
    /// Percentage of commands answered with --error-code.
    #[arg(long, default_value_t = 0.0)]
    pub error_pct: f64,
    /// The error code injected.
    #[arg(long, default_value = "15")]
    pub error_code: String,
    /// Percentage of commands never answered.
    #[arg(long, default_value_t = 0.0)]
    pub no_reply_pct: f64,
    /// Percentage of commands that close the connection.
    #[arg(long, default_value_t = 0.0)]
    pub disconnect_pct: f64,
    /// Print the test keys (clear, and under the test LMK with check values) and exit.
    #[arg(long)]
    pub print_test_keys: bool,
}

/// `cardswitch sim acquirer`.
#[derive(Debug, Args)]
pub struct AcquirerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9583")]
    pub listen: std::net::SocketAddr,
    /// Dialect: a shipped name or a .toml file.
    #[arg(long, short, default_value = cardswitch_codec::DEFAULT_DIALECT)]
    pub dialect: String,
    /// Length prefix: bin2, bin4, ascii4, bcd2, hex4.
    #[arg(long, default_value = "bin2")]
    pub framing: LengthPrefix,
    /// Rules file (TOML); default: approve, amounts ending 51 -> 51 and 05 -> 05.
    #[arg(long)]
    pub rules: Option<std::path::PathBuf>,
    /// Print the ledger as JSON on exit (Ctrl-C).
    #[arg(long)]
    pub ledger: bool,
    /// Share the test keys with the switch (`cardswitch sim hsm --print-test-keys`): PIN
    /// blocks must decrypt under the ZPK to --pin (else 55), MACs verify under the ZAK (else 63).
    #[arg(long)]
    pub test_keys: bool,
    /// The PIN every card has.
    #[arg(long, default_value = "1234")]
    pub pin: String,
    /// The switch's `journal.pan_hmac_key` (hex): PAN HMACs in the clearing file match the
    /// journal's.
    #[arg(long, env = "CARDSWITCH_PAN_HMAC_KEY", hide_env_values = true)]
    pub pan_hmac_key: Option<String>,
    /// Cut over (0800/201 to the switch) this often and write the closed date's clearing file.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub cutover_every: Option<std::time::Duration>,
    /// Where clearing files are written (`clearing-<endpoint-name>-<date>.csv`).
    #[arg(long, default_value = ".")]
    pub clearing_dir: std::path::PathBuf,
    /// Discrepancies put into clearing files, in percent:
    /// `drop=1,amount=0.5,duplicate=0.5,unknown=0.5,chargeback=0.5`.
    #[arg(long, value_parser = cardswitch_simulators::clearing::Injection::parse)]
    pub inject: Option<cardswitch_simulators::clearing::Injection>,
    /// The name in clearing file names.
    #[arg(long, default_value = "acquirer")]
    pub name: String,
}

/// `cardswitch sim terminal`.
#[derive(Debug, Args)]
pub struct TerminalArgs {
    /// The switch's terminal listener.
    #[arg(long, default_value = "127.0.0.1:8583")]
    pub target: std::net::SocketAddr,
    /// Dialect: a shipped name or a .toml file.
    #[arg(long, short, default_value = cardswitch_codec::DEFAULT_DIALECT)]
    pub dialect: String,
    /// Length prefix: bin2, bin4, ascii4, bcd2, hex4.
    #[arg(long, default_value = "bin2")]
    pub framing: LengthPrefix,
    /// Open loop at this many requests per second (latency from the intended send time).
    #[arg(long, conflicts_with = "depth")]
    pub rate: Option<u64>,
    /// Connections.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Closed loop: requests in flight per connection.
    #[arg(long, default_value_t = 1)]
    pub depth: usize,
    /// Open a connection per transaction (with --connections workers).
    #[arg(long, conflicts_with_all = ["rate", "depth"])]
    pub per_transaction: bool,
    /// Run for this long (e.g. 30s, 2m).
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "count")]
    pub duration: Option<std::time::Duration>,
    /// Send this many requests.
    #[arg(long)]
    pub count: Option<u64>,
    /// A request with no reply within this is counted as timed out.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub timeout: std::time::Duration,
    /// Account-range prefixes to draw PANs from, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "476173,541333")]
    pub bins: Vec<String>,
    /// Only authorization and financial requests (no echo tests, no reversals).
    #[arg(long)]
    pub card_only: bool,
    /// Use the test keys (`cardswitch sim hsm --print-test-keys`): PIN blocks under the TPK,
    /// MACs under the TAK.
    #[arg(long)]
    pub test_keys: bool,
    /// Terminal PIN key, clear hex (instead of the test key).
    #[arg(long, env = "CARDSWITCH_TERMINAL_TPK", hide_env_values = true)]
    pub tpk: Option<String>,
    /// Terminal MAC key, clear hex (instead of the test key).
    #[arg(long, env = "CARDSWITCH_TERMINAL_TAK", hide_env_values = true)]
    pub tak: Option<String>,
    /// The PIN in every PIN block.
    #[arg(long, default_value = "1234")]
    pub pin: String,
    /// A PIN block on every request (default: chip and swipe only, as cards are used).
    #[arg(long)]
    pub pin_every: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `cardswitch run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (TOML); see specs/cardswitch.toml.
    #[arg(long, short)]
    pub config: std::path::PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    pub check: bool,
    /// Log as JSON lines.
    #[arg(long)]
    pub json_logs: bool,
}

/// Options shared by decode and encode.
#[derive(Debug, Args)]
pub struct WireArgs {
    /// Dialect: a shipped name (see `cardswitch dialects`) or a path to a .toml file.
    #[arg(long, short, default_value = cardswitch_codec::DEFAULT_DIALECT)]
    pub dialect: String,
    /// The hex includes (decode) or should include (encode) the transport length prefix.
    #[arg(long)]
    pub framed: bool,
    /// Length prefix used with --framed: bin2, bin4, ascii4, bcd2, hex4.
    #[arg(long, default_value = "bin2")]
    pub framing: LengthPrefix,
    /// With --framed: a 5-byte TPDU follows the length prefix.
    #[arg(long)]
    pub tpdu: bool,
}

/// `cardswitch decode`.
#[derive(Debug, Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub wire: WireArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The input is the message itself as text (an all-ASCII dialect), not hex.
    #[arg(long)]
    pub text: bool,
    /// The message in hex, or `-` to read it from standard input (whitespace ignored).
    pub input: String,
}

/// `cardswitch encode`.
#[derive(Debug, Args)]
pub struct EncodeArgs {
    #[command(flatten)]
    pub wire: WireArgs,
    /// A JSON file, or `-` (the default) for standard input.
    #[arg(default_value = "-")]
    pub input: String,
}

/// `cardswitch dialects`.
#[derive(Debug, Args)]
pub struct DialectsArgs {
    /// Dialect files to validate; without any, the shipped dialects are listed.
    pub files: Vec<std::path::PathBuf>,
}
