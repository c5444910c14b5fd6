//! The ledger check, 60 seconds of it: `cardswitch soak` against a PostgreSQL cluster of its own
//! with the acquirer matching reversals strictly by DE90, dropping 5% of requests, answering 2%
//! late and disconnecting on 1%, the switch killed (`kill -9`) once at a random moment and
//! PostgreSQL stopped for 5 seconds at another, amounts ending in 10 approved in part. The
//! journal, the acquirer's ledger and the terminals must agree, key by key and amount by amount. (The 10-minute run at 2,000 TPS with three kills and a 20-second outage
//! is the same command with `--duration 10m --kills 3 --db-outage 20`; see the README.)

#[cfg(feature = "simulators")]
use std::process::Command;

#[cfg(feature = "simulators")] // `soak` is one of the simulator commands
#[test]
fn sixty_second_ledger_check_with_a_kill_9_and_a_database_outage() {
    let url = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let out = Command::new(env!("CARGO_BIN_EXE_cardswitch"))
        .args([
            "soak",
            "--duration",
            "60s",
            "--rate",
            "1000",
            "--connections",
            "8",
            "--restart",
            "kill",
            "--kills",
            "1",
            "--db-outage",
            "5",
            "--json",
            "--database-url",
            &url,
        ])
        .output()
        .expect("cardswitch runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "soak failed:\n{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("a JSON report");
    assert_eq!(report["ok"], true, "{stdout}");
    assert!(
        report["requests"].as_u64().unwrap_or(0) > 10_000,
        "{stdout}"
    );
    // The faults happened, and the switch reversed what they left unknown.
    let faults = &report["faults"];
    for f in ["dropped", "late", "disconnects"] {
        assert!(faults[f].as_u64().unwrap_or(0) > 0, "no {f}: {stdout}");
    }
    assert!(
        report["saf"]["delivered"].as_i64().unwrap_or(0) > 0,
        "{stdout}"
    );
    assert_eq!(
        report["db_restarts_at_s"].as_array().map(Vec::len),
        Some(1),
        "{stdout}"
    );
    assert!(
        report["outage_96"].as_u64().unwrap_or(0) > 0,
        "the outage answered 96: {stdout}"
    );
    // Partial approvals were relayed on one listener (the amounts check covers them).
    assert!(
        report["response_codes"]["10"].as_u64().unwrap_or(0) > 0,
        "no partial approval: {stdout}"
    );
    let charged = &report["charged"];
    assert_eq!(charged["acquirer"], charged["journal"]);
    assert_eq!(charged["terminals"], charged["journal"]);
    assert_eq!(report["double_charges"].as_array().map(Vec::len), Some(0));
}
