//! `cardswitch reseal`: re-seals the journal's stored entries under the current data key (after
//! a rotation), so that the retired key can then be dropped from the configuration.

use std::io::Write;

use anyhow::Result;
use cardswitch::config::Config;
use clap::Args;

/// `cardswitch reseal`.
#[derive(Debug, Args)]
pub(crate) struct ResealArgs {
    /// The switch's configuration file: the journal and its keys (`data_key` with its
    /// `data_key_id`, and `retired_data_keys`).
    #[arg(long)]
    pub(crate) config: std::path::PathBuf,
}

/// Re-seals and prints what it did.
///
/// # Errors
/// A configuration that does not load, keys the journal refuses, database errors.
pub(crate) async fn run(args: &ResealArgs, out: &mut dyn Write) -> Result<()> {
    let v = Config::load(&args.config)?;
    let done = cardswitch::journal::reseal(&v.config.journal, &v.config.switch.node).await?;
    writeln!(
        out,
        "re-sealed {} (already under the current key: {}; no key opens: {})",
        done.resealed, done.current, done.unopenable
    )?;
    Ok(())
}
