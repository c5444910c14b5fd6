//! `cardswitch sim ...`: the simulators from the command line.

use std::io::Write;

use anyhow::{Context, Result};
use cardswitch_codec::framing::Framing;
use cardswitch_codec::Dialect;
use cardswitch_simulators::{
    terminal, Acquirer, AcquirerConfig, Load, Rules, Stop, TerminalConfig,
};

use crate::cli::{AcquirerArgs, SimCommand, TerminalArgs};

/// Runs a simulator until it finishes (terminal) or Ctrl-C (acquirer).
///
/// # Errors
/// Bad arguments, a rules file that does not validate, an address that cannot be used.
pub async fn run(cmd: SimCommand, out: &mut dyn Write) -> Result<()> {
    match cmd {
        SimCommand::Acquirer(args) => acquirer(args, out).await,
        SimCommand::Terminal(args) => terminal_run(args, out).await,
    }
}

async fn acquirer(args: AcquirerArgs, out: &mut dyn Write) -> Result<()> {
    let rules = match &args.rules {
        Some(path) => Rules::from_toml(
            &std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?,
        )?,
        None => Rules::default_rules(),
    };
    let acquirer = Acquirer::start(AcquirerConfig {
        listen: args.listen,
        dialect: Dialect::load(&args.dialect)?,
        framing: Framing::with_prefix(args.framing),
        rules,
        tls: None,
    })
    .await?;
    writeln!(
        out,
        "acquirer simulator on {} ({}, {}); Ctrl-C to stop",
        acquirer.local_addr(),
        args.dialect,
        args.framing
    )?;
    out.flush()?;
    tokio::signal::ctrl_c().await?;
    acquirer.stop().await;
    if args.ledger {
        writeln!(out, "{}", serde_json::to_string_pretty(&acquirer.ledger())?)?;
    }
    Ok(())
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
    let report = terminal::run(TerminalConfig {
        target: args.target,
        dialect: Dialect::load(&args.dialect)?,
        framing: Framing::with_prefix(args.framing),
        load,
        stop,
        timeout: args.timeout,
        bins: args.bins,
        card_only: args.card_only,
    })
    .await?;
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        writeln!(out, "{}", report.summary())?;
    }
    Ok(())
}
