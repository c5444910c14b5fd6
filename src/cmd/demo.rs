//! `cardswitch demo`: the switch with the embedded journal, two acquirer simulators and a
//! terminal simulator at a modest rate, on loopback; one line per second until Ctrl-C.
//!
//! Acquirer A speaks `iso87-ascii` with 2-byte binary lengths and serves card range 476173;
//! acquirer B speaks `iso87-bcd` with 4-digit ASCII lengths and serves 541333. Terminals speak
//! `iso87-ascii`. No services are needed: the journal is a SQLite file in the temp directory.
//!
//! Card security is on, with the HSM simulator and the public test keys: terminals send PIN
//! blocks under their TPK and MAC every request under their TAK; the switch verifies the MAC,
//! translates each PIN block to the acquirer's ZPK and MACs what it sends under the ZAK, all
//! through the HSM; both acquirers check PIN and MAC under their own keys.

use std::io::Write;
use std::time::Duration;

use anyhow::Result;
use cardswitch_codec::framing::{Framing, LengthPrefix};
use cardswitch_codec::Dialect;
use cardswitch_simulators::acquirer::AcquirerSecurity;
use cardswitch_simulators::hsm::{ClearKey, KeyType, PinFormat};
use cardswitch_simulators::terminal::TerminalSecurity;
use cardswitch_simulators::{
    terminal, Acquirer, AcquirerConfig, HsmConfig, HsmFaults, HsmSim, Load, Rules, Stop,
    TerminalConfig, TestKeys,
};

use cardswitch::config::Config;
use cardswitch::server::Switch;

/// Terminal requests per second in the demo.
const RATE: u64 = 200;

/// Runs the demo until Ctrl-C.
///
/// # Errors
/// When a port cannot be bound or the journal cannot be created.
pub(crate) async fn run(out: &mut dyn Write) -> Result<()> {
    super::run::init_logs(false);
    cardswitch::telemetry::install()?;
    let token = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    let keys = TestKeys::fixed();
    let hsm = HsmSim::start(HsmConfig {
        listen: "127.0.0.1:0".parse()?,
        header_len: 4,
        faults: HsmFaults::default(),
    })
    .await?;
    let acquirer_keys = AcquirerSecurity {
        zpk: Some(keys.zpk.clone()),
        zak: Some(keys.zak.clone()),
        zmk: Some(keys.zmk.clone()),
        pin: "1234".into(),
        pin_format: PinFormat::Iso0,
    };
    let start = |dialect: &str, prefix: LengthPrefix| {
        let security = Some(acquirer_keys.clone());
        let dialect = Dialect::builtin(dialect);
        async move {
            Acquirer::start(AcquirerConfig {
                listen: "127.0.0.1:0".parse()?,
                dialect: dialect?,
                framing: Framing::with_prefix(prefix),
                rules: Rules::default_rules(),
                tls: None,
                security,
            })
            .await
        }
    };
    let key = |k: &ClearKey, kt: KeyType| {
        format!(
            "{{ key = \"{}\", check = \"{}\" }}",
            TestKeys::under_lmk(k, kt),
            k.kcv6()
        )
    };
    let zone = format!(
        "zpk = {}\nzak = {}\nzmk = {}\n",
        key(&keys.zpk, KeyType::ZPK),
        key(&keys.zak, KeyType::ZAK),
        key(&keys.zmk, KeyType::ZMK)
    );
    let acquirer_a = start("iso87-ascii", LengthPrefix::Bin2).await?;
    let acquirer_b = start("iso87-bcd", LengthPrefix::Ascii4).await?;
    let journal = std::env::temp_dir().join(format!("cardswitch-demo-{}.db", std::process::id()));
    let text = format!(
        r#"
[switch]
node = "demo"
[journal]
url = "sqlite://{journal}"
ephemeral_keys = true
spool_dir = "{spool}"
[hsm]
addresses = ["{hsm}"]
[admin]
address = "127.0.0.1:0"
token = "{token}"
[[listeners]]
name = "pos"
address = "127.0.0.1:0"
[listeners.security]
tpk = {tpk}
tak = {tak}
[[endpoints]]
name = "acquirer-a"
links = ["{a}"]
acquirer_id = "111111"
[endpoints.security]
{zone}
[[endpoints]]
name = "acquirer-b"
dialect = "iso87-bcd"
framing = {{ prefix = "ascii4" }}
links = ["{b}"]
acquirer_id = "222222"
[endpoints.security]
{zone}
[[routes]]
prefix = "476173"
endpoint = "acquirer-a"
[[routes]]
prefix = "541333"
endpoint = "acquirer-b"
"#,
        journal = journal.display(),
        spool = std::env::temp_dir()
            .join(format!("cardswitch-demo-spool-{}", std::process::id()))
            .display(),
        a = acquirer_a.local_addr(),
        b = acquirer_b.local_addr(),
        hsm = hsm.local_addr(),
        token = token,
        tpk = key(&keys.tpk, KeyType::TPK),
        tak = key(&keys.tak, KeyType::TAK),
    );
    let switch = Switch::start(Config::from_toml(&text, Vec::new())?).await?;
    switch.wait_ready(Duration::from_secs(5)).await;
    let target = switch
        .listener_addrs()
        .first()
        .copied()
        .ok_or_else(|| anyhow::anyhow!("no listener"))?;
    writeln!(out, "cardswitch demo: terminals -> {target} -> acquirer A {} (iso87-ascii) and B {} (iso87-bcd)", acquirer_a.local_addr(), acquirer_b.local_addr())?;
    writeln!(
        out,
        "HSM simulator {} (Thales test LMK): PIN blocks translated, MACs verified and made",
        hsm.local_addr()
    )?;
    if let Some(admin) = switch.admin_addr() {
        writeln!(out, "dashboard: http://{admin}/?token={token}")?;
        writeln!(
            out,
            "metrics:   http://{admin}/metrics (Grafana dashboard: specs/grafana/cardswitch.json)"
        )?;
        writeln!(
            out,
            "look-up:   cardswitch txn --admin http://{admin} --token {token} --rc 51"
        )?;
        writeln!(
            out,
            "settlement: http://{admin}/api/settlement?date={}&token={token}",
            cardswitch::settlement::format_date(cardswitch::settlement::today())
        )?;
    }
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
            security: Some(TerminalSecurity {
                tpk: Some(keys.tpk.clone()),
                tak: Some(keys.tak.clone()),
                pin: "1234".into(),
                pin_format: PinFormat::Iso0,
                pin_on_every: false,
            }),
        });
        tokio::select! {
            _ = &mut stop => break,
            report = second => {
                let r = report?;
                let hsm_commands: u64 = hsm.stats().commands.values().sum();
                writeln!(out, "{:>6.0} TPS  p99 {:>6.2} ms  approval {:>5.1}%  timeouts {}  journal rows {}  HSM commands {}",
                    r.tps, r.latency_us.p99 as f64 / 1000.0, r.approval_rate * 100.0, r.timeouts,
                    switch.pipeline().journal().stats.committed.load(std::sync::atomic::Ordering::Relaxed),
                    hsm_commands)?;
                out.flush()?;
            }
        }
    }
    writeln!(out, "stopping")?;
    switch.shutdown().await;
    acquirer_a.stop().await;
    acquirer_b.stop().await;
    hsm.stop().await;
    Ok(())
}
