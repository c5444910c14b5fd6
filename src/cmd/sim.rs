//! `cardswitch sim ...`: the simulators from the command line.

use std::io::Write;

use anyhow::{Context, Result};
use cardswitch_codec::framing::Framing;
use cardswitch_codec::Dialect;
use cardswitch_simulators::acquirer::{AcquirerSecurity, Matching};
use cardswitch_simulators::hsm::{ClearKey, KeyType, PinFormat};
use cardswitch_simulators::terminal::TerminalSecurity;
use cardswitch_simulators::{
    terminal, Acquirer, AcquirerConfig, HsmConfig, HsmFaults, HsmSim, Load, Rules, Stop,
    TerminalConfig, TestKeys,
};

use cardswitch_codec::framing::LengthPrefix;
use clap::{Args, Subcommand};

/// Simulators.
#[derive(Debug, Subcommand)]
pub(crate) enum SimCommand {
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
pub(crate) struct HsmArgs {
    /// Address to listen on (payShield's default port is 1500).
    #[arg(long, default_value = "127.0.0.1:1500")]
    pub(crate) listen: std::net::SocketAddr,
    /// Header length in characters.
    #[arg(long, default_value_t = 4)]
    pub(crate) header_len: usize,
    /// Faults file (TOML: latency_min_ms, latency_max_ms, error, error_code, no_reply,
    /// disconnect; percentages); reloaded on SIGHUP.
    #[arg(long)]
    pub(crate) faults: Option<std::path::PathBuf>,
    /// Latency for every command, in milliseconds (a range: 2..10).
    #[arg(long)]
    pub(crate) latency_ms: Option<String>,
    /// Percentage of commands answered with --error-code.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) error_pct: f64,
    /// The error code injected.
    #[arg(long, default_value = "15")]
    pub(crate) error_code: String,
    /// Percentage of commands never answered.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) no_reply_pct: f64,
    /// Percentage of commands that close the connection.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) disconnect_pct: f64,
    /// Print the test keys (clear, and under the test LMK with check values) and exit.
    #[arg(long)]
    pub(crate) print_test_keys: bool,
}

/// `cardswitch sim acquirer`.
#[derive(Debug, Args)]
pub(crate) struct AcquirerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9583")]
    pub(crate) listen: std::net::SocketAddr,
    /// Dialect: a shipped name or a .toml file.
    #[arg(long, short, default_value = cardswitch_codec::DEFAULT_DIALECT)]
    pub(crate) dialect: String,
    /// Length prefix: bin2, bin4, ascii4, bcd2, hex4.
    #[arg(long, default_value = "bin2")]
    pub(crate) framing: LengthPrefix,
    /// Rules file (TOML); default: approve, amounts ending 51 -> 51 and 05 -> 05.
    #[arg(long)]
    pub(crate) rules: Option<std::path::PathBuf>,
    /// Print the ledger as JSON on exit (Ctrl-C).
    #[arg(long)]
    pub(crate) ledger: bool,
    /// How a reversal finds its original: `strict` (DE90 alone: MTI class, STAN, DE7, DE32,
    /// DE33 as received, as real hosts match) or `rrn` (DE90, else terminal and RRN). Overrides
    /// the rules file's `matching`.
    #[arg(long = "match", value_parser = ["strict", "rrn"])]
    pub(crate) matching: Option<String>,
    /// Share the test keys with the switch (`cardswitch sim hsm --print-test-keys`): PIN
    /// blocks must decrypt under the ZPK to --pin (else 55), MACs verify under the ZAK (else 63).
    #[arg(long)]
    pub(crate) test_keys: bool,
    /// The PIN every card has.
    #[arg(long, default_value = "1234")]
    pub(crate) pin: String,
    /// The switch's `journal.pan_hmac_key` (hex): PAN HMACs in the clearing file match the
    /// journal's.
    #[arg(long, env = "CARDSWITCH_PAN_HMAC_KEY", hide_env_values = true)]
    pub(crate) pan_hmac_key: Option<String>,
    /// Cut over (0800/201 to the switch) this often and write the closed date's clearing file.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) cutover_every: Option<std::time::Duration>,
    /// Where clearing files are written (`clearing-<endpoint-name>-<date>.csv`).
    #[arg(long, default_value = ".")]
    pub(crate) clearing_dir: std::path::PathBuf,
    /// Discrepancies put into clearing files, in percent:
    /// `drop=1,amount=0.5,duplicate=0.5,unknown=0.5,chargeback=0.5`.
    #[arg(long, value_parser = cardswitch_simulators::clearing::Injection::parse)]
    pub(crate) inject: Option<cardswitch_simulators::clearing::Injection>,
    /// The name in clearing file names.
    #[arg(long, default_value = "acquirer")]
    pub(crate) name: String,
}

/// `cardswitch sim terminal`.
#[derive(Debug, Args)]
pub(crate) struct TerminalArgs {
    /// The switch's terminal listener.
    #[arg(long, default_value = "127.0.0.1:8583")]
    pub(crate) target: std::net::SocketAddr,
    /// Dialect: a shipped name or a .toml file.
    #[arg(long, short, default_value = cardswitch_codec::DEFAULT_DIALECT)]
    pub(crate) dialect: String,
    /// Length prefix: bin2, bin4, ascii4, bcd2, hex4.
    #[arg(long, default_value = "bin2")]
    pub(crate) framing: LengthPrefix,
    /// Open loop at this many requests per second (latency from the intended send time).
    #[arg(long, conflicts_with = "depth")]
    pub(crate) rate: Option<u64>,
    /// Connections.
    #[arg(long, default_value_t = 4)]
    pub(crate) connections: usize,
    /// Closed loop: requests in flight per connection.
    #[arg(long, default_value_t = 1)]
    pub(crate) depth: usize,
    /// Open a connection per transaction (with --connections workers).
    #[arg(long, conflicts_with_all = ["rate", "depth"])]
    pub(crate) per_transaction: bool,
    /// Run for this long (e.g. 30s, 2m).
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "count")]
    pub(crate) duration: Option<std::time::Duration>,
    /// Send this many requests.
    #[arg(long)]
    pub(crate) count: Option<u64>,
    /// A request with no reply within this is counted as timed out.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub(crate) timeout: std::time::Duration,
    /// Account-range prefixes to draw PANs from, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "476173,541333")]
    pub(crate) bins: Vec<String>,
    /// Only authorization and financial requests (no echo tests, no reversals).
    #[arg(long)]
    pub(crate) card_only: bool,
    /// Use the test keys (`cardswitch sim hsm --print-test-keys`): PIN blocks under the TPK,
    /// MACs under the TAK.
    #[arg(long)]
    pub(crate) test_keys: bool,
    /// Terminal PIN key, clear hex (instead of the test key).
    #[arg(long, env = "CARDSWITCH_TERMINAL_TPK", hide_env_values = true)]
    pub(crate) tpk: Option<String>,
    /// Terminal MAC key, clear hex (instead of the test key).
    #[arg(long, env = "CARDSWITCH_TERMINAL_TAK", hide_env_values = true)]
    pub(crate) tak: Option<String>,
    /// The PIN in every PIN block.
    #[arg(long, default_value = "1234")]
    pub(crate) pin: String,
    /// A PIN block on every request (default: chip and swipe only, as cards are used).
    #[arg(long)]
    pub(crate) pin_every: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Runs a simulator until it finishes (terminal) or Ctrl-C (acquirer).
///
/// # Errors
/// Bad arguments, a rules file that does not validate, an address that cannot be used.
pub(crate) async fn run(cmd: SimCommand, out: &mut dyn Write) -> Result<()> {
    match cmd {
        SimCommand::Acquirer(args) => acquirer(args, out).await,
        SimCommand::Terminal(args) => terminal_run(args, out).await,
        SimCommand::Hsm(args) => hsm(args, out).await,
    }
}

fn hsm_faults(args: &HsmArgs) -> Result<HsmFaults> {
    if let Some(path) = &args.faults {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        return toml::from_str(&text).with_context(|| format!("HSM faults {}", path.display()));
    }
    let (min, max) = match args.latency_ms.as_deref() {
        None => (0, 0),
        Some(r) => match r.split_once("..") {
            Some((a, b)) => (a.trim().parse()?, b.trim().parse()?),
            None => {
                let v = r.trim().parse()?;
                (v, v)
            }
        },
    };
    anyhow::ensure!(
        args.error_code.len() == 2,
        "--error-code must be two characters"
    );
    Ok(HsmFaults {
        latency_min_ms: min,
        latency_max_ms: max,
        error: args.error_pct,
        error_code: args.error_code.clone(),
        no_reply: args.no_reply_pct,
        disconnect: args.disconnect_pct,
    })
}

async fn hsm(args: HsmArgs, out: &mut dyn Write) -> Result<()> {
    if args.print_test_keys {
        let keys = TestKeys::fixed();
        for (name, key, kt) in [
            ("TPK", &keys.tpk, KeyType::TPK),
            ("TAK", &keys.tak, KeyType::TAK),
            ("ZPK", &keys.zpk, KeyType::ZPK),
            ("ZAK", &keys.zak, KeyType::ZAK),
            ("ZMK", &keys.zmk, KeyType::ZMK),
        ] {
            writeln!(
                out,
                "{name}  clear {}  under LMK {}  check value {}",
                hex::encode_upper(key.as_bytes()),
                TestKeys::under_lmk(key, kt),
                key.kcv6()
            )?;
        }
        return Ok(());
    }
    let sim = HsmSim::start(HsmConfig {
        listen: args.listen,
        header_len: args.header_len,
        faults: hsm_faults(&args)?,
    })
    .await?;
    writeln!(
        out,
        "HSM simulator on {} (Thales test LMK, check value {}); Ctrl-C to stop",
        sim.local_addr(),
        cardswitch_simulators::hsm::Lmk::test_set().check_value()
    )?;
    out.flush()?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        tokio::select! {
            r = tokio::signal::ctrl_c() => { r?; break; }
            _ = hup.recv() => match hsm_faults(&args) {
                Ok(f) => {
                    tracing::info!(?f, "HSM simulator: faults reloaded");
                    sim.set_faults(f);
                }
                Err(e) => tracing::error!(error = %e, "HSM simulator: faults not reloaded"),
            },
        }
    }
    writeln!(out, "{}", serde_json::to_string_pretty(&sim.stats())?)?;
    sim.stop().await;
    Ok(())
}

async fn acquirer(args: AcquirerArgs, out: &mut dyn Write) -> Result<()> {
    let mut rules = match &args.rules {
        Some(path) => Rules::from_toml(
            &std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?,
        )?,
        None => Rules::default_rules(),
    };
    match args.matching.as_deref() {
        Some("rrn") => rules.matching = Matching::Rrn,
        Some(_) => rules.matching = Matching::Strict,
        None => {}
    }
    let acquirer = Acquirer::start(AcquirerConfig {
        listen: args.listen,
        dialect: Dialect::load(&args.dialect)?,
        framing: Framing::with_prefix(args.framing),
        rules,
        tls: None,
        security: args.test_keys.then(|| {
            let k = TestKeys::fixed();
            AcquirerSecurity {
                zpk: Some(k.zpk),
                zak: Some(k.zak),
                zmk: Some(k.zmk),
                pin: args.pin.clone(),
                pin_format: PinFormat::Iso0,
            }
        }),
    })
    .await?;
    if let Some(k) = &args.pan_hmac_key {
        acquirer.set_pan_hmac_key(&hex::decode(k).context("--pan-hmac-key: not hex")?);
    }
    writeln!(
        out,
        "acquirer simulator on {} ({}, {}); Ctrl-C to stop",
        acquirer.local_addr(),
        args.dialect,
        args.framing
    )?;
    out.flush()?;
    match args.cutover_every {
        None => tokio::signal::ctrl_c().await?,
        Some(every) => {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tokio::select! {
                    r = tokio::signal::ctrl_c() => { r?; break; }
                    _ = tick.tick() => {
                        match acquirer.cutover(std::time::Duration::from_secs(5)).await {
                            Ok((closed, answer)) => {
                                // Replies already computed for the closed date may still be
                                // on their way: give them a moment before the file is cut.
                                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                                let path = write_clearing(&acquirer, &args, closed)?;
                                writeln!(out, "cutover: {closed} closed (switch answered {}); {}", answer.as_deref().unwrap_or("nothing"), path.display())?;
                            }
                            Err(e) => writeln!(out, "cutover: {e:#}")?,
                        }
                        out.flush()?;
                    }
                }
            }
        }
    }
    acquirer.stop().await;
    if args.ledger {
        writeln!(out, "{}", serde_json::to_string_pretty(&acquirer.ledger())?)?;
    }
    Ok(())
}

/// Writes the clearing file of a closed date, with the configured discrepancies.
fn write_clearing(
    acquirer: &Acquirer,
    args: &AcquirerArgs,
    date: time::Date,
) -> Result<std::path::PathBuf> {
    let clean = acquirer.clearing_file(date);
    let records = match &args.inject {
        Some(inj) => cardswitch_simulators::clearing::inject(clean, inj, fastrand::u64(..)).0,
        None => clean,
    };
    let path = args.clearing_dir.join(format!(
        "clearing-{}-{}.csv",
        args.name,
        cardswitch::settlement::format_date(date)
    ));
    let file = std::fs::File::create(&path).with_context(|| format!("{}", path.display()))?;
    cardswitch_simulators::clearing::write(std::io::BufWriter::new(file), &records)?;
    Ok(path)
}

fn terminal_security(args: &TerminalArgs) -> Result<Option<TerminalSecurity>> {
    let key = |hex: &Option<String>, test: &ClearKey, what: &str| -> Result<Option<ClearKey>> {
        match hex {
            Some(h) => ClearKey::from_hex(h)
                .map(Some)
                .map_err(|_| anyhow::anyhow!("--{what}: 16, 32 or 48 hex digits")),
            None => Ok(args.test_keys.then(|| test.clone())),
        }
    };
    let test = TestKeys::fixed();
    let tpk = key(&args.tpk, &test.tpk, "tpk")?;
    let tak = key(&args.tak, &test.tak, "tak")?;
    if tpk.is_none() && tak.is_none() {
        return Ok(None);
    }
    Ok(Some(TerminalSecurity {
        tpk,
        tak,
        pin: args.pin.clone(),
        pin_format: PinFormat::Iso0,
        pin_on_every: args.pin_every,
    }))
}

async fn terminal_run(args: TerminalArgs, out: &mut dyn Write) -> Result<()> {
    let load = match (args.rate, args.per_transaction) {
        (Some(rate), _) => Load::Open {
            rate,
            connections: args.connections,
        },
        (None, true) => Load::PerTransaction {
            concurrency: args.connections,
        },
        (None, false) => Load::Closed {
            connections: args.connections,
            depth: args.depth,
        },
    };
    let stop = match (args.count, args.duration) {
        (Some(n), _) => Stop::Count(n),
        (None, Some(d)) => Stop::After(d),
        (None, None) => Stop::After(std::time::Duration::from_secs(10)),
    };
    let security = terminal_security(&args)?;
    let report = terminal::run(TerminalConfig {
        target: args.target,
        dialect: Dialect::load(&args.dialect)?,
        framing: Framing::with_prefix(args.framing),
        load,
        stop,
        timeout: args.timeout,
        bins: args.bins,
        card_only: args.card_only,
        security,
    })
    .await?;
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        writeln!(out, "{}", report.summary())?;
    }
    Ok(())
}
