//! `cardswitch reconcile` and `cardswitch settlement`: a clearing file against the journal, and
//! the settlement report of a business date.

use anyhow::{Context, Result};
use cardswitch::journal::Backend;
use clap::Args;

/// Where the journal is: `--database`, else `journal.url` of `--config`, else `$DATABASE_URL`.
#[derive(Debug, Args)]
pub(crate) struct DatabaseArgs {
    /// The journal database (postgres://... or sqlite://...).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub(crate) database: Option<String>,
    /// The switch's configuration file (its journal URL and endpoint fee settings).
    #[arg(long)]
    pub(crate) config: Option<std::path::PathBuf>,
}

/// Output of `reconcile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ReportFormat {
    /// Counts, totals and every exception as a table.
    Table,
    /// The whole report as JSON.
    Json,
    /// The exceptions as CSV.
    Csv,
}

/// `cardswitch reconcile`.
#[derive(Debug, Args)]
pub(crate) struct ReconcileArgs {
    /// The endpoint (as named in the configuration and the journal).
    #[arg(long)]
    pub(crate) endpoint: String,
    /// The business date (YYYY-MM-DD).
    #[arg(long, value_parser = cardswitch::settlement::date_arg)]
    pub(crate) date: String,
    /// The clearing file (CSV).
    #[arg(long)]
    pub(crate) file: std::path::PathBuf,
    /// How the result is printed.
    #[arg(long, value_enum, default_value = "table")]
    pub(crate) format: ReportFormat,
    /// How many days before the date an approval may still be presented (late presentment).
    #[arg(long, default_value_t = 45)]
    pub(crate) late_days: i64,
    /// The journal.
    #[command(flatten)]
    pub(crate) db: DatabaseArgs,
}

/// `cardswitch settlement`.
#[derive(Debug, Args)]
pub(crate) struct SettlementArgs {
    /// The business date (YYYY-MM-DD).
    #[arg(long, value_parser = cardswitch::settlement::date_arg)]
    pub(crate) date: String,
    /// Only this endpoint.
    #[arg(long)]
    pub(crate) endpoint: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// The journal.
    #[command(flatten)]
    pub(crate) db: DatabaseArgs,
}

/// The journal URL and endpoint settings a settlement command works with.
fn database(
    args: &DatabaseArgs,
) -> Result<(
    String,
    std::collections::BTreeMap<String, cardswitch::settlement::EndpointSettlement>,
)> {
    let config = args
        .config
        .as_deref()
        .map(cardswitch::config::Config::load)
        .transpose()?;
    let fees = config
        .as_ref()
        .map(|c| {
            c.config
                .endpoints
                .iter()
                .map(|e| (e.name.clone(), e.settlement.clone()))
                .collect()
        })
        .unwrap_or_default();
    let url = args
        .database
        .clone()
        .or_else(|| config.map(|c| c.config.journal.url))
        .filter(|u| !u.is_empty())
        .context("no journal: give --database, --config or DATABASE_URL")?;
    Ok((url, fees))
}

/// `cardswitch reconcile`.
///
/// # Errors
/// The file or the database cannot be read, or the result cannot be stored.
pub(crate) async fn reconcile(args: ReconcileArgs, out: &mut dyn std::io::Write) -> Result<()> {
    let (url, _) = database(&args.db)?;
    let backend = Backend::connect(&url).await?;
    let report = cardswitch::settlement::recon::reconcile(
        &backend,
        &cardswitch::settlement::recon::Request {
            endpoint: &args.endpoint,
            date: cardswitch::settlement::parse_date(&args.date)?,
            file: &args.file,
            late_days: args.late_days,
        },
    )
    .await?;
    match args.format {
        ReportFormat::Table => cardswitch::settlement::recon::print_table(&report, out)?,
        ReportFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, &report)?;
            writeln!(out)?;
        }
        ReportFormat::Csv => cardswitch::settlement::recon::print_csv(&report, out)?,
    }
    Ok(())
}

/// `cardswitch settlement`.
///
/// # Errors
/// The database cannot be read.
pub(crate) async fn settlement(args: SettlementArgs, out: &mut dyn std::io::Write) -> Result<()> {
    let (url, fees) = database(&args.db)?;
    let backend = Backend::connect(&url).await?;
    let r = cardswitch::settlement::report::build(
        &backend,
        &args.date,
        args.endpoint.as_deref(),
        &fees,
    )
    .await?;
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &r)?;
        writeln!(out)?;
    } else {
        cardswitch::settlement::report::print_table(&r, out)?;
    }
    Ok(())
}
