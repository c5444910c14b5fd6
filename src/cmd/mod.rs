//! The commands: the command line's shape (kept stable and documented in README.md) and one
//! file per command. Only this folder sees clap; the library takes plain values.
//!
//! `demo`, `sim` and `soak` run the simulators and exist with the `simulators` feature
//! (`cargo run --release --features simulators -- demo`); without it the binary is the switch and
//! its operator tools alone, and those three commands say how to get them.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[cfg(feature = "simulators")]
mod cluster;
#[cfg(feature = "simulators")]
mod demo;
mod reseal;
mod run;
mod settlement;
#[cfg(feature = "simulators")]
mod sim;
#[cfg(feature = "simulators")]
mod soak;
mod txn;
mod wire;

/// cardswitch: an ISO 8583 card switch.
#[derive(Debug, Parser)]
#[command(name = "cardswitch", version, about)]
pub(crate) struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the switch.
    Run(run::RunArgs),
    #[cfg(feature = "simulators")]
    /// A working demo: the switch, two acquirer simulators and a terminal simulator, no services needed.
    Demo,
    /// Decode one message from hex and print its fields, card data masked.
    Decode(wire::DecodeArgs),
    /// Encode a message from JSON (the shape `decode --json` prints) and print it as hex.
    Encode(wire::EncodeArgs),
    /// List the shipped dialects, or validate dialect files.
    Dialects(wire::DialectsArgs),
    #[cfg(feature = "simulators")]
    /// Run a simulator: an acquirer host or a terminal load generator.
    #[command(subcommand)]
    Sim(sim::SimCommand),
    #[cfg(feature = "simulators")]
    /// The ledger check: mixed traffic against a faulty acquirer with a switch restart in the
    /// middle, then the journal, the acquirer's ledger and the terminals' view compared.
    Soak(soak::SoakArgs),
    /// Transaction look-up through the admin API: a filtered list, or one transaction's story.
    Txn(txn::TxnArgs),
    /// Reconcile an acquirer's clearing file for a business date against the journal.
    Reconcile(settlement::ReconcileArgs),
    /// The settlement report of a business date: counts and amounts by endpoint, currency and
    /// type, fees and nets.
    Settlement(settlement::SettlementArgs),
    /// Re-seal the journal's stored entries under the current data key (after a rotation).
    Reseal(reseal::ResealArgs),
    #[cfg(not(feature = "simulators"))]
    /// `demo`, `sim` or `soak` in a build without the simulators.
    #[command(external_subcommand)]
    WithoutSimulators(Vec<String>),
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// The answer to a command this build does not have.
#[cfg(not(feature = "simulators"))]
fn without_simulators(args: &[String]) -> anyhow::Error {
    match args.first().map(String::as_str) {
        Some(c @ ("demo" | "sim" | "soak")) => anyhow::anyhow!(
            "`{c}` runs the simulators, which this build leaves out; build with them: \
             cargo run --release --features simulators -- {c}"
        ),
        Some(c) => anyhow::anyhow!("unknown command `{c}` (see --help)"),
        None => anyhow::anyhow!("no command (see --help)"),
    }
}

/// Runs one command to its end.
pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let result = match cli.command {
        #[cfg(feature = "simulators")]
        Command::Demo => runtime().and_then(|rt| rt.block_on(demo::run(&mut out))),
        Command::Run(args) => runtime().and_then(|rt| rt.block_on(run::run(args, &mut out))),
        Command::Decode(args) => wire::decode(&args, &mut std::io::stdin().lock(), &mut out),
        Command::Encode(args) => wire::encode(&args, &mut std::io::stdin().lock(), &mut out),
        Command::Dialects(args) => wire::dialects(&args, &mut out),
        #[cfg(feature = "simulators")]
        Command::Soak(args) => runtime().and_then(|rt| rt.block_on(soak::run(args, &mut out))),
        Command::Txn(args) => txn::txn(&args, &mut out),
        Command::Reconcile(args) => {
            runtime().and_then(|rt| rt.block_on(settlement::reconcile(args, &mut out)))
        }
        Command::Settlement(args) => {
            runtime().and_then(|rt| rt.block_on(settlement::settlement(args, &mut out)))
        }
        Command::Reseal(args) => runtime().and_then(|rt| rt.block_on(reseal::run(&args, &mut out))),
        #[cfg(feature = "simulators")]
        Command::Sim(sim) => runtime().and_then(|rt| rt.block_on(sim::run(sim, &mut out))),
        #[cfg(not(feature = "simulators"))]
        Command::WithoutSimulators(args) => Err(without_simulators(&args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = out.flush();
            // One line: the chain of causes joined, never a value of the message.
            let _ = writeln!(std::io::stderr(), "cardswitch: {e:#}");
            ExitCode::FAILURE
        }
    }
}
