//! `cardswitch soak`: the ledger check.
//!
//! Runs an acquirer simulator that drops, delays and disconnects on command, the switch as a
//! child process journaling to a fresh PostgreSQL schema (or SQLite), and terminals sending a
//! steady mix for the given duration; the switch is killed (or stopped) half-way and started
//! again. The terminals behave as real ones do: a request with no reply (timeout, or the
//! connection lost) is reversed with an 0420, repeated as 0421 until acknowledged; now and then
//! a terminal reverses an approval of its own (0400), or sends a completed request again and
//! expects the same reply.
//!
//! When the traffic stops, the terminals finish their reversals, the switch's store-and-forward
//! queue drains, and three views are compared by (terminal, RRN):
//! - the acquirer's ledger: approved and not reversed;
//! - the switch's journal: authorization and financial rows whose state still charges;
//! - the terminals: answered approved and not reversed by the terminal.
//!
//! They must be the same sets, with the same amount standing for each key in all three, and no
//! key charged twice anywhere. Amounts ending in 10 are approved in part by the acquirer (DE39
//! 10, half the amount): half the terminals connect to a listener that takes partial approvals
//! and count what was approved, the other half to one that does not, where the switch reverses
//! them and declines (51).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cardswitch_codec::framing::{Frame, FrameCodec, Framing};
use cardswitch_codec::{Dialect, Message, Mti};
use cardswitch_simulators::acquirer::{Faults, Latency};
use cardswitch_simulators::terminal::Generator;
use cardswitch_simulators::{Acquirer, AcquirerConfig, LedgerSummary, Rules};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

use super::cluster::OwnCluster;
use cardswitch::journal::db::Statement;
use cardswitch::journal::Backend;
use clap::Args;

/// How the switch is restarted in the middle of a soak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Restart {
    /// SIGKILL: nothing is drained.
    Kill,
    /// SIGTERM: in-flight transactions finish.
    Term,
    /// No restart.
    None,
}

/// `cardswitch soak`.
#[derive(Debug, Args)]
pub(crate) struct SoakArgs {
    /// How long traffic runs (then it drains and checks).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    pub(crate) duration: std::time::Duration,
    /// Requests per second.
    #[arg(long, default_value_t = 2000)]
    pub(crate) rate: u64,
    /// Terminal connections.
    #[arg(long, default_value_t = 16)]
    pub(crate) connections: usize,
    /// PostgreSQL (a fresh schema is made in it) or sqlite:// URL; default $DATABASE_URL, else
    /// postgres://postgres@127.0.0.1:5432/test.
    #[arg(long)]
    pub(crate) database_url: Option<String>,
    /// How the switch is restarted.
    #[arg(long, value_enum, default_value = "kill")]
    pub(crate) restart: Restart,
    /// How many times the switch is restarted, each at a random moment of its own stretch of
    /// the traffic (with requests in flight at the acquirer and the queue busy).
    #[arg(long, default_value_t = 3)]
    pub(crate) kills: u32,
    /// Journal to a PostgreSQL cluster of the soak's own (made with initdb on a spare port,
    /// removed afterwards) and restart it once at a random moment, down for 3 seconds.
    #[arg(long)]
    pub(crate) restart_db: bool,
    /// Like `--restart-db`, with PostgreSQL down for this many seconds (a journal outage:
    /// requests meanwhile are answered 96 and nothing is forwarded).
    #[arg(long)]
    pub(crate) db_outage: Option<f64>,
    /// With `--restart-db` or `--db-outage` (or alone, as `--restart-db`): PostgreSQL is stopped
    /// by crashing it (immediate shutdown: no checkpoint; what is committed without waiting for
    /// the disk and not yet written out is lost).
    #[arg(long)]
    pub(crate) db_crash: bool,
    /// The switch's `journal.mode`: `durable` (replies after their commit) or `async` (replies
    /// first; a kill then loses what was not committed, which the report counts).
    #[arg(long, default_value = "durable", value_parser = ["durable", "async"])]
    pub(crate) journal_mode: String,
    /// Acquirer faults in percent: requests dropped.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) drop: f64,
    /// Replies sent late (after the switch's timeout).
    #[arg(long, default_value_t = 2.0)]
    pub(crate) late: f64,
    /// Requests answered by closing the connection.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) disconnect: f64,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

const KEY: &str = "5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed";
/// A terminal gives up waiting for a reply after this long.
const TERMINAL_TIMEOUT: Duration = Duration::from_secs(5);
/// The switch's timeout for the acquirer (late replies come after it).
const ENDPOINT_TIMEOUT_MS: u64 = 1_000;

/// What a soak found.
#[derive(Debug, Serialize)]
pub(crate) struct SoakReport {
    /// Seconds of traffic.
    pub(crate) duration_s: f64,
    /// Restarts of the switch during the traffic (`--restart` says how), seconds into it.
    pub(crate) restarts_at_s: Vec<f64>,
    /// Restarts of PostgreSQL (`--restart-db`), seconds into the traffic.
    pub(crate) db_restarts_at_s: Vec<f64>,
    /// Requests the terminals sent (first transmissions of authorizations and financials).
    pub(crate) requests: u64,
    /// Their rate.
    pub(crate) tps: f64,
    /// Replies by response code (first transmissions).
    pub(crate) response_codes: BTreeMap<String, u64>,
    /// Of those, 96 answers received while PostgreSQL was down.
    pub(crate) outage_96: u64,
    /// Requests with no reply (reversed by the terminal).
    pub(crate) unanswered: u64,
    /// Reversals the terminals sent (their own and for unanswered requests), counting repeats.
    pub(crate) terminal_reversals_sent: u64,
    /// Completed requests sent again, and how many got a different reply.
    pub(crate) resends: u64,
    /// Resends answered differently from the first time.
    pub(crate) resend_mismatches: u64,
    /// Reversals still unacknowledged at the end.
    pub(crate) unresolved: u64,
    /// Faults the acquirer injected.
    pub(crate) faults: BTreeMap<String, u64>,
    /// Store-and-forward entries by final state.
    pub(crate) saf: BTreeMap<String, i64>,
    /// Journal rows by state.
    pub(crate) journal_states: BTreeMap<String, i64>,
    /// Approved and standing, per view.
    pub(crate) charged: BTreeMap<String, usize>,
    /// Keys charged by the acquirer but not in the journal, and so on.
    pub(crate) differences: BTreeMap<String, Vec<String>>,
    /// Keys charged twice (acquirer ledger or journal).
    pub(crate) double_charges: Vec<String>,
    /// Whether everything agrees.
    pub(crate) ok: bool,
}

/// Runs a soak and prints its report; an error when the views differ.
///
/// # Errors
/// Setup failures, and a check that finds differences.
pub(crate) async fn run(args: SoakArgs, out: &mut dyn Write) -> Result<()> {
    let report = soak(&args).await?;
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        print_report(&report, out)?;
    }
    if !report.ok {
        bail!("ledger check failed: the views differ");
    }
    Ok(())
}

fn print_report(r: &SoakReport, out: &mut dyn Write) -> Result<()> {
    writeln!(
        out,
        "traffic: {} requests in {:.0} s ({:.0} TPS); codes {:?}; 96 while PostgreSQL was down: {}",
        r.requests, r.duration_s, r.tps, r.response_codes, r.outage_96
    )?;
    let at = |v: &[f64]| v.iter().map(|s| format!("{s:.1}")).collect::<Vec<_>>();
    writeln!(
        out,
        "restarts at (s): switch {:?}, PostgreSQL {:?}",
        at(&r.restarts_at_s),
        at(&r.db_restarts_at_s)
    )?;
    writeln!(
        out,
        "terminals: {} unanswered, {} reversals sent, {} resends ({} answered differently), {} unresolved",
        r.unanswered, r.terminal_reversals_sent, r.resends, r.resend_mismatches, r.unresolved
    )?;
    writeln!(out, "acquirer faults: {:?}", r.faults)?;
    writeln!(out, "store-and-forward: {:?}", r.saf)?;
    writeln!(out, "journal states: {:?}", r.journal_states)?;
    writeln!(out, "charged (approved, not reversed): {:?}", r.charged)?;
    for (what, keys) in &r.differences {
        writeln!(
            out,
            "DIFFERENCE {what}: {} e.g. {:?}",
            keys.len(),
            keys.iter().take(5).collect::<Vec<_>>()
        )?;
    }
    writeln!(out, "double charges: {}", r.double_charges.len())?;
    writeln!(
        out,
        "ledger check: {}",
        if r.ok { "PASS (0 differences)" } else { "FAIL" }
    )?;
    Ok(())
}

/// A fresh database for the run: a new schema in PostgreSQL (the soak's own cluster with
/// `--restart-db`), a new file for SQLite.
async fn database(args: &SoakArgs, own: Option<&OwnCluster>) -> Result<String> {
    let base = own.map(OwnCluster::url).unwrap_or_else(|| {
        args.database_url
            .clone()
            .or_else(|| std::env::var("DATABASE_URL").ok())
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into())
    });
    if base.starts_with("sqlite:") {
        return Ok(base);
    }
    let schema = format!("soak_{}_{}", std::process::id(), fastrand::u32(..));
    let pool = sqlx::PgPool::connect(&base)
        .await
        .with_context(|| format!("connecting to {base}"))?;
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&pool)
        .await?;
    let sep = if base.contains('?') { '&' } else { '?' };
    Ok(format!("{base}{sep}options=-csearch_path%3D{schema}"))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct SwitchProcess {
    config: PathBuf,
    child: Option<Child>,
}

impl SwitchProcess {
    fn start(&mut self) -> Result<()> {
        let exe = std::env::current_exe()?;
        let child = Command::new(exe)
            .args(["run", "--config"])
            .arg(&self.config)
            .env(
                "RUST_LOG",
                std::env::var("SOAK_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the switch")?;
        self.child = Some(child);
        Ok(())
    }

    fn stop(&mut self, how: Restart) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if how == Restart::Term {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for SwitchProcess {
    fn drop(&mut self) {
        self.stop(Restart::Kill);
    }
}

#[allow(clippy::too_many_lines)]
async fn soak(args: &SoakArgs) -> Result<SoakReport> {
    let own = if args.restart_db || args.db_outage.is_some() || args.db_crash {
        Some(tokio::task::spawn_blocking(OwnCluster::start).await??)
    } else {
        None
    };
    let url = database(args, own.as_ref()).await?;
    let dialect = Dialect::builtin("iso87-ascii")?;
    let rules = Rules {
        latency: Latency {
            min_ms: 0,
            max_ms: 2,
        },
        faults: Faults {
            no_reply: args.drop,
            late: args.late,
            late_ms: ENDPOINT_TIMEOUT_MS + 500,
            disconnect: args.disconnect,
            ..Faults::default()
        },
        ..Rules::default_rules()
    };
    let acquirer = Acquirer::start(AcquirerConfig {
        listen: "127.0.0.1:0".parse()?,
        dialect: dialect.clone(),
        framing: Framing::default(),
        rules,
        tls: None,
        security: None,
    })
    .await?;
    let port = free_port()?;
    let port_full = free_port()?;
    let links = (0..4)
        .map(|_| format!("\"{}\"", acquirer.local_addr()))
        .collect::<Vec<_>>()
        .join(", ");
    let dir = std::env::temp_dir().join(format!("cardswitch-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("switch.toml");
    let spool = dir.join("spool").display().to_string();
    let mode = &args.journal_mode;
    std::fs::write(
        &config,
        format!(
            r#"
[switch]
node = "soak"
shutdown_grace_ms = 5000
drain_delay_ms = 0
[journal]
url = "{url}"
mode = "{mode}"
spool_dir = "{spool}"
pan_hmac_key = "{KEY}"
data_key = "{KEY}"
[[listeners]]
name = "pos"
address = "127.0.0.1:{port}"
partial_approvals = true
[[listeners]]
name = "pos-full"
address = "127.0.0.1:{port_full}"
[[endpoints]]
name = "acq"
links = [{links}]
strategy = "round-robin"
acquirer_id = "123456"
request_timeout_ms = {ENDPOINT_TIMEOUT_MS}
reconnect_min_ms = 20
reconnect_max_ms = 500
[endpoints.saf]
initial_delay_ms = 200
retry_min_ms = 200
retry_max_ms = 2000
poll_ms = 200
[[routes]]
prefix = "476173"
endpoint = "acq"
[[routes]]
prefix = "541333"
endpoint = "acq"
"#
        ),
    )?;
    let mut switch = SwitchProcess {
        config,
        child: None,
    };
    switch.start()?;
    let target: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let target_full: SocketAddr = format!("127.0.0.1:{port_full}").parse()?;
    wait_listening(target, Duration::from_secs(20)).await?;

    let started = Instant::now();
    let traffic_end = started + args.duration;
    let connections = args.connections.max(1);
    let interval = Duration::from_secs_f64(connections as f64 / args.rate.max(1) as f64);
    let mut tasks = Vec::new();
    for i in 0..connections {
        let dialect = dialect.clone();
        tasks.push(tokio::spawn(terminal(
            u32::try_from(i).unwrap_or(0) + 1,
            if i % 2 == 0 { target } else { target_full },
            dialect,
            interval,
            traffic_end,
        )));
    }
    // The restarts: each of the switch at a random moment of its own stretch of the traffic,
    // PostgreSQL's at a random moment of the middle.
    let total = args.duration.as_secs_f64();
    let mut events: Vec<(f64, bool)> = Vec::new();
    if args.restart != Restart::None && args.kills > 0 {
        let stretch = total / f64::from(args.kills);
        for k in 0..args.kills {
            events.push((
                stretch * (f64::from(k) + 0.15 + 0.7 * fastrand::f64()),
                false,
            ));
        }
    }
    if own.is_some() {
        events.push((total * (0.3 + 0.4 * fastrand::f64()), true));
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut restarts_at_s, mut db_restarts_at_s) = (Vec::new(), Vec::new());
    for (at, is_db) in events {
        let wait = at - started.elapsed().as_secs_f64();
        if wait > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
        let now = started.elapsed().as_secs_f64();
        if let (true, Some(c)) = (is_db, own.as_ref()) {
            db_restarts_at_s.push(now);
            tokio::task::block_in_place(|| if args.db_crash { c.crash() } else { c.stop() })?;
            DB_DOWN.store(true, std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs_f64(
                args.db_outage.unwrap_or(3.0).max(0.0),
            ))
            .await;
            tokio::task::block_in_place(|| c.start_again())?;
            DB_DOWN.store(false, std::sync::atomic::Ordering::Relaxed);
        } else {
            restarts_at_s.push(now);
            switch.stop(args.restart);
            switch.start()?;
            wait_listening(target, Duration::from_secs(20)).await?;
        }
    }
    let mut views = Vec::new();
    for t in tasks {
        views.push(t.await?);
    }
    let duration_s = args.duration.as_secs_f64();
    // The switch's queue drains (reversals of timeouts, late and lost replies).
    let backend = Backend::connect(&url).await?;
    let drain_deadline = Instant::now() + Duration::from_secs(120);
    drain(&backend, drain_deadline).await?;
    // Replies that may still be on their way late have had their time.
    tokio::time::sleep(Duration::from_millis(ENDPOINT_TIMEOUT_MS + 1_000)).await;
    drain(&backend, drain_deadline).await?;
    switch.stop(Restart::Term);

    // The three views.
    let ledger = LedgerSummary::of(&acquirer.ledger());
    let journal = journal_charged(&backend).await?;
    let mut terminals = BTreeMap::new();
    let mut report = SoakReport {
        duration_s,
        restarts_at_s,
        db_restarts_at_s,
        requests: 0,
        tps: 0.0,
        response_codes: BTreeMap::new(),
        outage_96: 0,
        unanswered: 0,
        terminal_reversals_sent: 0,
        resends: 0,
        resend_mismatches: 0,
        unresolved: 0,
        faults: BTreeMap::new(),
        saf: saf_counts(&backend).await?,
        journal_states: journal_states(&backend).await?,
        charged: BTreeMap::new(),
        differences: BTreeMap::new(),
        double_charges: Vec::new(),
        ok: false,
    };
    for v in views {
        report.requests += v.requests;
        report.outage_96 += v.outage_96;
        report.unanswered += v.unanswered;
        report.terminal_reversals_sent += v.reversals_sent;
        report.resends += v.resends;
        report.resend_mismatches += v.resend_mismatches;
        report.unresolved += v.unresolved;
        for (c, n) in v.codes {
            *report.response_codes.entry(c).or_default() += n;
        }
        terminals.extend(v.charged);
    }
    #[allow(clippy::cast_precision_loss)]
    {
        report.tps = report.requests as f64 / duration_s.max(1e-9);
    }
    let s = acquirer.stats();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    report.faults.insert("requests".into(), load(&s.requests));
    report.faults.insert("dropped".into(), load(&s.dropped));
    report.faults.insert("late".into(), load(&s.late));
    report
        .faults
        .insert("disconnects".into(), load(&s.disconnects));
    report
        .charged
        .insert("acquirer".into(), ledger.charged.len());
    report.charged.insert("journal".into(), journal.0.len());
    report.charged.insert("terminals".into(), terminals.len());
    let terminal_keys: Keys = terminals.keys().cloned().collect();
    let show = |k: &(String, String)| format!("{}/{}", k.0, k.1);
    let diff = |a: &BTreeSet<(String, String)>, b: &BTreeSet<(String, String)>| -> Vec<String> {
        a.difference(b).map(show).collect()
    };
    for (name, d) in [
        ("acquirer not journal", diff(&ledger.charged, &journal.0)),
        ("journal not acquirer", diff(&journal.0, &ledger.charged)),
        ("terminals not journal", diff(&terminal_keys, &journal.0)),
        ("journal not terminals", diff(&journal.0, &terminal_keys)),
        (
            "amounts differ",
            amounts_differ(&ledger.amounts, &journal.2, &terminals),
        ),
    ] {
        if !d.is_empty() {
            report.differences.insert(name.into(), d);
        }
    }
    // What the journal holds of the first few differences, to see why.
    for keys in report.differences.values() {
        for key in keys.iter().take(3) {
            let key = key.split_once(' ').map_or(key.as_str(), |(k, _)| k);
            let Some((terminal, rrn)) = key.split_once('/') else {
                continue;
            };
            let st = Statement::new(
                "SELECT t.id, t.mti, t.stan, t.response_code, t.decided_by, t.state, \
                 COALESCE(string_agg(e.state || ':' || e.cause, ', ' ORDER BY e.at_us), '') \
                 FROM transactions t LEFT JOIN transaction_events e ON e.txn_id = t.id \
                 WHERE t.terminal_id = $1 AND t.rrn = $2 GROUP BY t.id ORDER BY t.id",
            )
            .bind(terminal)
            .bind(rrn);
            for r in backend.fetch_all(&st).await.unwrap_or_default() {
                let col = |i| r.get::<String>(i).unwrap_or_default();
                eprintln!(
                    "{key}: id {} {} stan {} rc {} by {} state {} events [{}]",
                    r.get::<i64>(0).unwrap_or_default(),
                    col(1),
                    col(2),
                    col(3),
                    col(4),
                    col(5),
                    col(6)
                );
            }
        }
    }
    report.double_charges = ledger
        .double_charges
        .iter()
        .chain(&journal.1)
        .map(show)
        .collect();
    report.ok = report.differences.is_empty()
        && report.double_charges.is_empty()
        && report.unresolved == 0
        && report.resend_mismatches == 0
        && report.requests > 0;
    acquirer.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

async fn wait_listening(target: SocketAddr, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if TcpStream::connect(target).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the switch did not start listening on {target}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the store-and-forward queue is empty, or `deadline`.
async fn drain(backend: &Backend, deadline: Instant) -> Result<()> {
    loop {
        let counts = saf_counts(backend).await?;
        if counts.get("pending").copied().unwrap_or(0) == 0 || Instant::now() > deadline {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn saf_counts(backend: &Backend) -> Result<BTreeMap<String, i64>> {
    counts(backend, "SELECT state, count(*) FROM saf GROUP BY state").await
}

async fn journal_states(backend: &Backend) -> Result<BTreeMap<String, i64>> {
    counts(
        backend,
        "SELECT mti || ' ' || state, count(*) FROM transactions GROUP BY mti, state",
    )
    .await
}

/// A `name, count` query as a map.
async fn counts(backend: &Backend, sql: &str) -> Result<BTreeMap<String, i64>> {
    backend
        .fetch_all(&Statement::new(sql))
        .await?
        .iter()
        .map(|r| Ok((r.get::<String>(0)?, r.get::<i64>(1)?)))
        .collect()
}

type Keys = BTreeSet<(String, String)>;
type Amounts = BTreeMap<(String, String), u64>;

/// The keys charged in all three views whose amounts standing are not the same, each with
/// the three amounts.
fn amounts_differ(acquirer: &Amounts, journal: &Amounts, terminals: &Amounts) -> Vec<String> {
    acquirer
        .iter()
        .filter_map(|(k, a)| {
            let (j, t) = (journal.get(k)?, terminals.get(k)?);
            (a != j || a != t)
                .then(|| format!("{}/{} acquirer {a} journal {j} terminal {t}", k.0, k.1))
        })
        .collect()
}

/// Authorization and financial rows whose state charges, keys charged more than once, and
/// the amount that stands of each.
async fn journal_charged(backend: &Backend) -> Result<(Keys, Vec<(String, String)>, Amounts)> {
    let sql = "SELECT terminal_id, rrn, \
        CAST(COALESCE(amount_minor, 0) - COALESCE(amount_reversed_minor, 0) AS BIGINT) \
        FROM transactions WHERE mti IN ('0100', '0101', '0200', '0201') \
        AND state IN ('approved', 'partially_reversed', 'advice_pending', 'advised')";
    let rows = backend
        .fetch_all(&Statement::new(sql))
        .await?
        .iter()
        .map(|r| Ok(((r.get::<String>(0)?, r.get::<String>(1)?), r.get::<i64>(2)?)))
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let mut set = BTreeSet::new();
    let mut twice = Vec::new();
    let mut amounts = Amounts::new();
    for (k, amount) in rows {
        *amounts.entry(k.clone()).or_default() += u64::try_from(amount).unwrap_or(0);
        if !set.insert(k.clone()) {
            twice.push(k);
        }
    }
    Ok((set, twice, amounts))
}

/// Set while the soak's PostgreSQL is stopped.
static DB_DOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What one terminal saw.
#[derive(Default)]
struct View {
    requests: u64,
    outage_96: u64,
    codes: HashMap<String, u64>,
    unanswered: u64,
    reversals_sent: u64,
    resends: u64,
    resend_mismatches: u64,
    unresolved: u64,
    /// Keys approved and not reversed, with the amount approved.
    charged: Amounts,
}

enum Sent {
    /// A first transmission: its RRN.
    Original(String, Message),
    /// A resend of a completed request, with the reply it got the first time.
    Resend(Message),
    /// A reversal (own or for an unanswered request): the RRN it reverses.
    Reversal(String),
}

struct PendingReversal {
    rrn: String,
    msg: Message,
    sent: u32,
    due: Instant,
}

/// One terminal connection: sends at its pace until `end`, then finishes its reversals.
#[allow(clippy::too_many_lines)]
async fn terminal(
    id: u32,
    target: SocketAddr,
    dialect: Dialect,
    interval: Duration,
    end: Instant,
) -> View {
    let mut gen = Generator::new(vec!["476173".into(), "541333".into()], id, true);
    let terminal_id = format!("T{:07}", id % 10_000_000);
    let mut view = View::default();
    let mut pending: HashMap<u32, (Sent, Instant)> = HashMap::new();
    let mut approved: VecDeque<Message> = VecDeque::new();
    let mut completed: VecDeque<(Message, Message)> = VecDeque::new();
    let mut reversals: VecDeque<PendingReversal> = VecDeque::new();
    let mut reversal_stan: u32 = 500_000;
    let mut framed: Option<Framed<TcpStream, FrameCodec>> = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let hard_end = end + Duration::from_secs(180);

    // A request with no reply: the terminal reverses it (0420, then 0421 until acknowledged).
    let unanswered = |sent: Sent,
                      reversals: &mut VecDeque<PendingReversal>,
                      stan: &mut u32,
                      view: &mut View| match sent {
        Sent::Original(rrn, msg) => {
            view.unanswered += 1;
            *stan = *stan % 999_999 + 1;
            reversals.push_back(PendingReversal {
                msg: reversal_of(&msg, Mti::REVERSAL_ADVICE, *stan),
                rrn,
                sent: 0,
                due: Instant::now(),
            });
        }
        Sent::Reversal(_) | Sent::Resend(_) => {}
    };

    loop {
        let now = Instant::now();
        let sending = now < end;
        if !sending && pending.is_empty() && reversals.is_empty() {
            break;
        }
        if now > hard_end {
            view.unresolved += u64::try_from(reversals.len()).unwrap_or(0);
            break;
        }
        let Some(conn) = framed.as_mut() else {
            match TcpStream::connect(target).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    framed = Some(Framed::new(s, FrameCodec::new(Framing::default())));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
            continue;
        };
        // Timed-out requests.
        let expired: Vec<u32> = pending
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) > TERMINAL_TIMEOUT)
            .map(|(s, _)| *s)
            .collect();
        for stan in expired {
            if let Some((sent, _)) = pending.remove(&stan) {
                unanswered(sent, &mut reversals, &mut reversal_stan, &mut view);
            }
        }
        // A reversal due (not while one is in flight for it).
        let mut out: Option<(u32, Sent, Message)> = None;
        if let Some(pos) = reversals.iter().position(|r| r.due <= now) {
            if let Some(mut r) = reversals.remove(pos) {
                if r.sent > 0 {
                    // Repeats keep the STAN and DE7: the switch sees the same request again.
                    if let Ok(m) = Mti::new(*b"0421") {
                        r.msg.set_mti(m);
                    }
                }
                r.sent += 1;
                r.due = now + Duration::from_secs(1);
                let stan = r.msg.stan().unwrap_or(0);
                view.reversals_sent += 1;
                out = Some((stan, Sent::Reversal(r.rrn.clone()), r.msg.clone()));
                reversals.push_back(r);
            }
        }
        let frame_or_tick = if out.is_some() {
            // A reversal goes out first.
            Some(Some(Ok(Frame::new(Vec::new()))))
        } else {
            tokio::select! {
                f = conn.next() => Some(f),
                _ = tick.tick(), if sending => None,
                () = tokio::time::sleep(Duration::from_millis(50)) => Some(Some(Ok(Frame::new(Vec::new())))),
            }
        };
        if out.is_none() {
            match frame_or_tick {
                None => {
                    let roll = fastrand::u8(0..100);
                    if roll < 1 && !completed.is_empty() {
                        if let Some((req, reply)) = completed.pop_front() {
                            view.resends += 1;
                            let stan = req.stan().unwrap_or(0);
                            out = Some((stan, Sent::Resend(reply), req));
                        }
                    } else if roll < 4 && !approved.is_empty() {
                        if let Some(orig) = approved.pop_front() {
                            reversal_stan = reversal_stan % 999_999 + 1;
                            let rrn = orig.rrn().unwrap_or("").to_owned();
                            let msg = reversal_of(&orig, Mti::REVERSAL_REQUEST, reversal_stan);
                            view.reversals_sent += 1;
                            // Until acknowledged, it is also queued to be repeated as an advice.
                            let mut again = reversal_of(&orig, Mti::REVERSAL_ADVICE, reversal_stan);
                            again.set(7, msg.get(7).unwrap_or_default());
                            reversals.push_back(PendingReversal {
                                rrn: rrn.clone(),
                                msg: again,
                                sent: 1,
                                due: Instant::now() + TERMINAL_TIMEOUT,
                            });
                            out = Some((reversal_stan, Sent::Reversal(rrn), msg));
                        }
                    } else {
                        let (stan, msg) = gen.next_request();
                        let rrn = msg.rrn().unwrap_or("").to_owned();
                        view.requests += 1;
                        out = Some((stan, Sent::Original(rrn, msg.clone()), msg));
                    }
                }
                Some(Some(Ok(frame))) if frame.body.is_empty() => {}
                Some(Some(Ok(frame))) => {
                    let Ok(reply) = dialect.decode(&frame.body) else {
                        continue;
                    };
                    let Some(stan) = reply.stan() else { continue };
                    let Some((sent, _)) = pending.remove(&stan) else {
                        continue;
                    };
                    let code = reply
                        .response_code()
                        .map_or_else(|| "--".to_owned(), |c| c.to_string());
                    match sent {
                        Sent::Original(rrn, req) => {
                            *view.codes.entry(code.clone()).or_default() += 1;
                            if code == "96" && DB_DOWN.load(std::sync::atomic::Ordering::Relaxed) {
                                view.outage_96 += 1;
                            }
                            if code == "00" || code == "10" {
                                view.charged.insert(
                                    (terminal_id.clone(), rrn),
                                    reply.amount().unwrap_or(0),
                                );
                                if approved.len() < 64 {
                                    approved.push_back(req.clone());
                                }
                            }
                            if completed.len() < 16 {
                                completed.push_back((req, reply));
                            }
                        }
                        Sent::Resend(first) => {
                            if first.response_code() != reply.response_code()
                                || first.auth_code() != reply.auth_code()
                                || first.amount() != reply.amount()
                            {
                                view.resend_mismatches += 1;
                                if view.resend_mismatches <= 3 {
                                    eprintln!(
                                        "resend {}/{}: first {} {:?}, again {} {:?}",
                                        terminal_id,
                                        first.rrn().unwrap_or(""),
                                        first
                                            .response_code()
                                            .map(|c| c.to_string())
                                            .unwrap_or_default(),
                                        first.auth_code(),
                                        code,
                                        reply.auth_code()
                                    );
                                }
                            }
                        }
                        Sent::Reversal(rrn) => {
                            if matches!(code.as_str(), "00" | "25") {
                                view.charged.remove(&(terminal_id.clone(), rrn.clone()));
                                reversals.retain(|r| r.rrn != rrn);
                            }
                        }
                    }
                }
                // The connection is gone: everything in flight on it is unanswered.
                Some(_) => {
                    framed = None;
                    for (_, (sent, _)) in pending.drain() {
                        unanswered(sent, &mut reversals, &mut reversal_stan, &mut view);
                    }
                }
            }
        }
        if let (Some((stan, sent, msg)), Some(conn)) = (out, framed.as_mut()) {
            let Ok(body) = dialect.encode_to_vec(&msg) else {
                continue;
            };
            if conn.send(Frame::new(body)).await.is_err() {
                framed = None;
                unanswered(sent, &mut reversals, &mut reversal_stan, &mut view);
                for (_, (sent, _)) in pending.drain() {
                    unanswered(sent, &mut reversals, &mut reversal_stan, &mut view);
                }
            } else {
                pending.insert(stan, (sent, Instant::now()));
            }
        }
    }
    view
}

/// A reversal of `original`: new STAN and DE7, DE90 naming the original.
fn reversal_of(original: &Message, mti: Mti, stan: u32) -> Message {
    let mut r = original.clone();
    r.set_mti(mti);
    let de90 = format!(
        "{}{}{}{:0>11}{:0>11}",
        original.mti(),
        original.get_str(11).unwrap_or("000000"),
        original.get_str(7).unwrap_or("0000000000"),
        "",
        ""
    );
    r.set(90, de90.as_bytes());
    let (de7, _, _) = cardswitch_codec::clock::now_fields();
    r.set(7, de7.as_bytes());
    r.set_stan(stan);
    for f in [52, 55] {
        r.remove(f);
    }
    r
}
