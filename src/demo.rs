//! `cardswitch demo`: the switch with the embedded journal, two acquirer simulators and a
//! terminal simulator at a modest rate, on loopback; one line per second until Ctrl-C.
//!
//! Acquirer A speaks `iso87-ascii` with 2-byte binary lengths and serves card range 476173;
//! acquirer B speaks `iso87-bcd` with 4-digit ASCII lengths and serves 541333. Terminals speak
//! `iso87-ascii`. No services are needed: the journal is a SQLite file in the temp directory.

use std::io::Write;
use std::time::Duration;

use anyhow::Result;
use cardswitch_codec::framing::{Framing, LengthPrefix};
use cardswitch_codec::Dialect;
use cardswitch_simulators::{
    terminal, Acquirer, AcquirerConfig, Load, Rules, Stop, TerminalConfig,
};

use crate::config::Config;
use crate::server::Switch;

/// Terminal requests per second in the demo.
const RATE: u64 = 200;

/// Runs the demo until Ctrl-C.
///
/// # Errors
/// When a port cannot be bound or the journal cannot be created.
pub async fn run(out: &mut dyn Write) -> Result<()> {
    crate::run::init_logs(false);
    let start = |dialect: &str, prefix: LengthPrefix| {
        let dialect = Dialect::builtin(dialect);
        async move {
            Acquirer::start(AcquirerConfig {
                listen: "127.0.0.1:0".parse()?,
                dialect: dialect?,
                framing: Framing::with_prefix(prefix),
                rules: Rules::default_rules(),
                tls: None,
                security: None,
            })
            .await
        }
    };
    let acquirer_a = start("iso87-ascii", LengthPrefix::Bin2).await?;
    let acquirer_b = start("iso87-bcd", LengthPrefix::Ascii4).await?;
    let journal = std::env::temp_dir().join(format!("cardswitch-demo-{}.db", std::process::id()));
    let text = format!(
        r#"
[switch]
node = "demo"
[journal]
url = "sqlite://{journal}"
[[listeners]]
name = "pos"
address = "127.0.0.1:0"
[[endpoints]]
name = "acquirer-a"
links = ["{a}"]
acquirer_id = "111111"
[[endpoints]]
name = "acquirer-b"
dialect = "iso87-bcd"
framing = {{ prefix = "ascii4" }}
links = ["{b}"]
acquirer_id = "222222"
[[routes]]
prefix = "476173"
endpoint = "acquirer-a"
[[routes]]
prefix = "541333"
endpoint = "acquirer-b"
"#,
        journal = journal.display(),
        a = acquirer_a.local_addr(),
        b = acquirer_b.local_addr()
    );
    let switch = Switch::start(Config::from_toml(&text, Vec::new())?).await?;
    switch.wait_ready(Duration::from_secs(5)).await;
    let target = switch
        .listener_addrs()
        .first()
        .copied()
        .ok_or_else(|| anyhow::anyhow!("no listener"))?;
    writeln!(out, "cardswitch demo: terminals -> {target} -> acquirer A {} (iso87-ascii) and B {} (iso87-bcd)", acquirer_a.local_addr(), acquirer_b.local_addr())?;
    writeln!(out, "journal: {} | Ctrl-C to stop", journal.display())?;
    out.flush()?;
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        let second = terminal::run(TerminalConfig {
            target,
            dialect: Dialect::builtin("iso87-ascii")?,
            framing: Framing::default(),
            load: Load::Open {
                rate: RATE,
                connections: 4,
            },
            stop: Stop::After(Duration::from_secs(1)),
            timeout: Duration::from_secs(5),
            bins: vec!["476173".into(), "541333".into()],
            card_only: false,
            security: None,
        });
        tokio::select! {
            _ = &mut stop => break,
            report = second => {
                let r = report?;
                writeln!(out, "{:>6.0} TPS  p99 {:>6.2} ms  approval {:>5.1}%  timeouts {}  journal rows {}",
                    r.tps, r.latency_us.p99 as f64 / 1000.0, r.approval_rate * 100.0, r.timeouts,
                    switch.pipeline().journal().stats.committed.load(std::sync::atomic::Ordering::Relaxed))?;
                out.flush()?;
            }
        }
    }
    writeln!(out, "stopping")?;
    switch.shutdown().await;
    acquirer_a.stop().await;
    acquirer_b.stop().await;
    Ok(())
}
