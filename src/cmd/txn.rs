//! `cardswitch txn`: transaction look-up through the admin API.

use std::io::Write;

use anyhow::{Context, Result};
use clap::Args;

/// `cardswitch txn`.
#[derive(Debug, Args)]
pub(crate) struct TxnArgs {
    /// A transaction id: print its whole story (request, route, reply, reversals, events).
    pub(crate) id: Option<i64>,
    /// The switch's admin address.
    #[arg(
        long,
        env = "CARDSWITCH_ADMIN",
        default_value = "http://127.0.0.1:9090"
    )]
    pub(crate) admin: String,
    /// The admin bearer token.
    #[arg(long, env = "CARDSWITCH_ADMIN_TOKEN", hide_env_values = true)]
    pub(crate) token: String,
    /// DE37.
    #[arg(long)]
    pub(crate) rrn: Option<String>,
    /// DE11.
    #[arg(long)]
    pub(crate) stan: Option<String>,
    /// DE41.
    #[arg(long)]
    pub(crate) terminal: Option<String>,
    /// DE42.
    #[arg(long)]
    pub(crate) merchant: Option<String>,
    /// Response code.
    #[arg(long)]
    pub(crate) rc: Option<String>,
    /// Only transactions received in the last (e.g. 10m, 2h).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) since: Option<std::time::Duration>,
    /// Most rows.
    #[arg(long, default_value_t = 50)]
    pub(crate) limit: u32,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `cardswitch txn`: asks the admin API and prints a table (or JSON).
///
/// # Errors
/// The admin address cannot be reached, refuses the token, or answers something unreadable.
pub(crate) fn txn(args: &TxnArgs, out: &mut dyn Write) -> Result<()> {
    let base = args.admin.trim_end_matches('/');
    let url = match args.id {
        Some(id) => format!("{base}/api/transactions/{id}"),
        None => {
            let mut params = vec![format!("limit={}", args.limit)];
            for (k, v) in [
                ("rrn", &args.rrn),
                ("stan", &args.stan),
                ("terminal", &args.terminal),
                ("merchant", &args.merchant),
                ("rc", &args.rc),
            ] {
                if let Some(v) = v {
                    params.push(format!("{k}={}", url_escape(v)));
                }
            }
            if let Some(d) = args.since {
                let now = cardswitch::journal::Journal::now_us();
                let back = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
                params.push(format!("from_us={}", now.saturating_sub(back)));
            }
            format!("{base}/api/transactions?{}", params.join("&"))
        }
    };
    let mut response = ureq::get(&url)
        .header("Authorization", &format!("Bearer {}", args.token))
        .call()
        .with_context(|| format!("GET {url}"))?;
    let body: serde_json::Value =
        serde_json::from_str(&response.body_mut().read_to_string()?).context("admin API answer")?;
    if args.json || args.id.is_some() {
        writeln!(out, "{}", serde_json::to_string_pretty(&body)?)?;
        return Ok(());
    }
    let rows = body
        .get("transactions")
        .and_then(serde_json::Value::as_array)
        .cloned()
        .unwrap_or_default();
    writeln!(
        out,
        "{:<20} {:<4} {:<6} {:<12} {:<8} {:<19} {:>12} {:<2} {:<18} endpoint",
        "id", "mti", "stan", "rrn", "terminal", "pan", "amount", "rc", "state"
    )?;
    let s = |r: &serde_json::Value, k: &str| {
        r.get(k)
            .and_then(|v| match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .unwrap_or_default()
    };
    for r in &rows {
        writeln!(
            out,
            "{:<20} {:<4} {:<6} {:<12} {:<8} {:<19} {:>12} {:<2} {:<18} {}",
            s(r, "id"),
            s(r, "mti"),
            s(r, "stan"),
            s(r, "rrn"),
            s(r, "terminal_id").trim_end(),
            s(r, "pan_masked"),
            s(r, "amount_minor"),
            s(r, "response_code"),
            s(r, "state"),
            s(r, "endpoint")
        )?;
    }
    writeln!(out, "{} transaction(s)", rows.len())?;
    Ok(())
}

/// Percent-encodes a query value.
fn url_escape(v: &str) -> String {
    percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC).to_string()
}
