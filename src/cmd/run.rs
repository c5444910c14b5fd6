//! `cardswitch run`: configuration -> telemetry -> the switch, until Ctrl-C or SIGTERM.

use std::io::Write;

use anyhow::Result;
use tracing_subscriber::EnvFilter;

use cardswitch::config::Config;
use cardswitch::server::Switch;
use clap::Args;

/// `cardswitch run`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Configuration file (TOML); see specs/cardswitch.toml.
    #[arg(long, short)]
    pub(crate) config: std::path::PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    pub(crate) check: bool,
    /// Log as JSON lines.
    #[arg(long)]
    pub(crate) json_logs: bool,
}

/// Installs the log subscriber (`RUST_LOG` filters, default `info`).
pub(crate) fn init_logs(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Runs the switch until asked to stop.
///
/// # Errors
/// A configuration that does not validate, an address that cannot be bound.
pub(crate) async fn run(args: RunArgs, out: &mut dyn Write) -> Result<()> {
    let config = Config::load(&args.config)?;
    if args.check {
        writeln!(
            out,
            "{}: ok ({} listeners, {} endpoints, {} routes)",
            args.config.display(),
            config.config.listeners.len(),
            config.config.endpoints.len(),
            config.config.routes.len()
        )?;
        return Ok(());
    }
    init_logs(args.json_logs);
    if config.config.admin.is_some() {
        cardswitch::telemetry::install()?;
    }
    let switch = Switch::start(config).await?;
    #[cfg(unix)]
    {
        // SIGHUP reloads the fraud rules; a file that does not validate leaves them as they are.
        let pipeline = std::sync::Arc::clone(switch.pipeline());
        if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    match pipeline.fraud().map(|f| f.reload()) {
                        Some(Ok(n)) => tracing::info!(rules = n, "fraud rules reloaded"),
                        Some(Err(e)) => {
                            tracing::error!(error = %format!("{e:#}"), "fraud rules not reloaded; the running rules stay");
                        }
                        None => tracing::info!("SIGHUP: no fraud rules configured"),
                    }
                }
            });
        }
    }
    #[cfg(unix)]
    {
        // SIGTERM (a service manager, an orchestrator) drains; a second signal, or Ctrl-C,
        // cuts the drain delay short. Ctrl-C alone stops at once.
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let terminated = async {
            match term.as_mut() {
                Some(t) => t.recv().await.is_some(),
                None => std::future::pending().await,
            }
        };
        let drain = tokio::select! {
            _ = tokio::signal::ctrl_c() => false,
            d = terminated => d,
        };
        if drain {
            let again = async {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    () = async { if let Some(t) = term.as_mut() { t.recv().await; } } => {}
                }
            };
            switch.drain(again).await;
        } else {
            switch.shutdown().await;
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        switch.shutdown().await;
    }
    Ok(())
}
