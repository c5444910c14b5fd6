//! The `cardswitch` command.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use cardswitch::cli::{Cli, Command};

// Every transaction allocates a little (messages, rows, summaries); glibc's allocator showed up as
// a quarter of the switch's CPU under load, mimalloc does the same work in a fraction of it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let result = match cli.command {
        Command::Demo => runtime().and_then(|rt| rt.block_on(cardswitch::demo::run(&mut out))),
        Command::Run(args) => {
            runtime().and_then(|rt| rt.block_on(cardswitch::run::run(args, &mut out)))
        }
        Command::Decode(args) => {
            cardswitch::tools::decode(&args, &mut std::io::stdin().lock(), &mut out)
        }
        Command::Encode(args) => {
            cardswitch::tools::encode(&args, &mut std::io::stdin().lock(), &mut out)
        }
        Command::Dialects(args) => cardswitch::tools::dialects(&args, &mut out),
        Command::Soak(args) => {
            runtime().and_then(|rt| rt.block_on(cardswitch::soak::run(args, &mut out)))
        }
        Command::Txn(args) => cardswitch::tools::txn(&args, &mut out),
        Command::Reconcile(args) => runtime()
            .and_then(|rt| rt.block_on(cardswitch::settlement::reconcile_cmd(args, &mut out))),
        Command::Settlement(args) => runtime()
            .and_then(|rt| rt.block_on(cardswitch::settlement::settlement_cmd(args, &mut out))),
        Command::Sim(sim) => {
            runtime().and_then(|rt| rt.block_on(cardswitch::sim::run(sim, &mut out)))
        }
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
