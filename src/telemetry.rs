//! Metric names, labels and histogram buckets, in one place.
//!
//! The switch records through the `metrics` facade; with no recorder installed every call is a
//! no-op. `cardswitch run` (and the demo) install the Prometheus recorder when an `[admin]`
//! section is configured ([`install`]) and the admin server renders it at `/metrics`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `cardswitch_messages_total` | counter | listener, mti, rc |
//! | `cardswitch_endpoint_messages_total` | counter | endpoint, rc |
//! | `cardswitch_stage_seconds` | histogram | stage: decode, fraud, route, hsm, upstream, journal, total |
//! | `cardswitch_requests_in_flight` | gauge | |
//! | `cardswitch_connections` | gauge | listener |
//! | `cardswitch_link_state` | gauge (0 down, 1 connected, 2 ready) | endpoint, link |
//! | `cardswitch_journal_batch_rows` | histogram | |
//! | `cardswitch_journal_commit_seconds` | histogram | |
//! | `cardswitch_journal_backlog` | gauge | |
//! | `cardswitch_journal_breaker_open` | gauge (1 open: nothing is forwarded) | |
//! | `cardswitch_journal_breaker_transitions_total` | counter | to: open, closed |
//! | `cardswitch_journal_spool_bytes` | gauge | |
//! | `cardswitch_journal_dead_letters_total` | counter | |
//! | `cardswitch_saf_depth` | gauge | endpoint |
//! | `cardswitch_saf_unopenable_total` | counter | endpoint |
//! | `cardswitch_node_takeovers_total` | counter | node (the node that was gone) |
//! | `cardswitch_hsm_connections_up` | gauge | |
//! | `cardswitch_hsm_failures_total` | counter | |
//! | `cardswitch_fraud_rule_hits_total` | counter | rule, mode |

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Messages answered to terminals.
pub const MESSAGES: &str = "cardswitch_messages_total";
/// Replies from endpoints, by endpoint and response code.
pub const ENDPOINT_MESSAGES: &str = "cardswitch_endpoint_messages_total";
/// Time per pipeline stage.
pub const STAGE_SECONDS: &str = "cardswitch_stage_seconds";
/// Requests being processed.
pub const IN_FLIGHT: &str = "cardswitch_requests_in_flight";
/// Terminal connections open.
pub const CONNECTIONS: &str = "cardswitch_connections";
/// Link state per link.
pub const LINK_STATE: &str = "cardswitch_link_state";
/// Rows per journal commit.
pub const JOURNAL_BATCH_ROWS: &str = "cardswitch_journal_batch_rows";
/// Time per journal commit (the lag a durable reply waits for).
pub const JOURNAL_COMMIT_SECONDS: &str = "cardswitch_journal_commit_seconds";
/// Rows waiting for the database.
pub const JOURNAL_BACKLOG: &str = "cardswitch_journal_backlog";
/// 1 while the journal's breaker is open (requests answered 96 before forwarding).
pub const JOURNAL_BREAKER_OPEN: &str = "cardswitch_journal_breaker_open";
/// Breaker transitions, by the state entered.
pub const JOURNAL_BREAKER_TRANSITIONS: &str = "cardswitch_journal_breaker_transitions_total";
/// Bytes in the local spool of changes waiting for the database.
pub const JOURNAL_SPOOL_BYTES: &str = "cardswitch_journal_spool_bytes";
/// Changes set aside in the dead-letter table (an alarm: each needs an operator).
pub const JOURNAL_DEAD_LETTERS: &str = "cardswitch_journal_dead_letters_total";
/// Store-and-forward entries pending, per endpoint.
pub const SAF_DEPTH: &str = "cardswitch_saf_depth";
/// Store-and-forward entries that could not be opened (sealed under a key this node lacks).
pub const SAF_UNOPENABLE: &str = "cardswitch_saf_unopenable_total";
/// Forwarded requests of a node that was gone, resolved by this one (the takeover).
pub const NODE_TAKEOVERS: &str = "cardswitch_node_takeovers_total";
/// HSM connections up.
pub const HSM_UP: &str = "cardswitch_hsm_connections_up";
/// HSM commands that failed (no connection, timeout, unreadable reply).
pub const HSM_FAILURES: &str = "cardswitch_hsm_failures_total";
/// Fraud rules that fired (reserved for the fraud rules).
pub const FRAUD_HITS: &str = "cardswitch_fraud_rule_hits_total";

/// Latency buckets, seconds: 50 us to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];
/// Journal batch-size buckets, rows.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder (once per process) and returns its handle.
///
/// # Errors
/// Another recorder is already installed.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = INSTALLING.lock();
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(STAGE_SECONDS.into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(JOURNAL_COMMIT_SECONDS.into()),
            LATENCY_BUCKETS,
        )?
        .set_buckets_for_metric(Matcher::Full(JOURNAL_BATCH_ROWS.into()), BATCH_BUCKETS)?
        .install_recorder()?;
    describe();
    let _ = HANDLE.set(handle.clone());
    Ok(HANDLE.get().cloned().unwrap_or(handle))
}

/// The installed recorder's handle, if [`install`] ran.
#[must_use]
pub fn handle() -> Option<PrometheusHandle> {
    HANDLE.get().cloned()
}

/// Message counters of one listener by (MTI, response code).
type ByCode = HashMap<([u8; 4], [u8; 2]), Counter>;

/// Metric handles the pipeline records into for every message, made once: a handle looks up
/// the registry when made, not when used. Made after [`install`], they record; made without a
/// recorder, they are no-ops.
pub struct PipelineMetrics {
    decode: Histogram,
    fraud: Histogram,
    route: Histogram,
    hsm: Histogram,
    upstream: Histogram,
    journal: Histogram,
    total: Histogram,
    /// Per listener, per (MTI, response code).
    messages: Mutex<HashMap<String, ByCode>>,
    /// Per endpoint, per response code.
    endpoints: Mutex<HashMap<String, HashMap<[u8; 2], Counter>>>,
}

impl std::fmt::Debug for PipelineMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineMetrics").finish_non_exhaustive()
    }
}

impl Default for PipelineMetrics {
    fn default() -> Self {
        let stage = |s: &'static str| metrics::histogram!(STAGE_SECONDS, "stage" => s);
        Self {
            decode: stage("decode"),
            fraud: stage("fraud"),
            route: stage("route"),
            hsm: stage("hsm"),
            upstream: stage("upstream"),
            journal: stage("journal"),
            total: stage("total"),
            messages: Mutex::new(HashMap::new()),
            endpoints: Mutex::new(HashMap::new()),
        }
    }
}

/// A pipeline stage with a latency histogram.
#[derive(Debug, Clone, Copy)]
pub enum Stage {
    /// Frame to message.
    Decode,
    /// The fraud rules.
    Fraud,
    /// Checks, duplicates, routing, up to the HSM or the acquirer.
    Route,
    /// MAC verification and PIN translation.
    Hsm,
    /// Waiting for the acquirer (including its MAC).
    Upstream,
    /// Waiting for the journal commit.
    Journal,
    /// Frame in to reply ready.
    Total,
}

impl PipelineMetrics {
    /// Records a stage's time.
    pub fn stage(&self, stage: Stage, d: Duration) {
        let h = match stage {
            Stage::Decode => &self.decode,
            Stage::Fraud => &self.fraud,
            Stage::Route => &self.route,
            Stage::Hsm => &self.hsm,
            Stage::Upstream => &self.upstream,
            Stage::Journal => &self.journal,
            Stage::Total => &self.total,
        };
        h.record(d.as_secs_f64());
    }

    /// Counts a message answered on `listener`.
    pub fn message(&self, listener: &str, mti: [u8; 4], rc: [u8; 2]) {
        let Ok(mut by_listener) = self.messages.lock() else {
            return;
        };
        if !by_listener.contains_key(listener) {
            by_listener.insert(listener.to_owned(), HashMap::new());
        }
        if let Some(m) = by_listener.get_mut(listener) {
            m.entry((mti, rc))
                .or_insert_with(|| {
                    metrics::counter!(MESSAGES, "listener" => listener.to_owned(),
                        "mti" => String::from_utf8_lossy(&mti).into_owned(),
                        "rc" => String::from_utf8_lossy(&rc).into_owned())
                })
                .increment(1);
        }
    }

    /// Counts an acquirer's reply.
    pub fn endpoint_reply(&self, endpoint: &str, rc: [u8; 2]) {
        let Ok(mut by_endpoint) = self.endpoints.lock() else {
            return;
        };
        if !by_endpoint.contains_key(endpoint) {
            by_endpoint.insert(endpoint.to_owned(), HashMap::new());
        }
        if let Some(m) = by_endpoint.get_mut(endpoint) {
            m.entry(rc)
                .or_insert_with(|| {
                    metrics::counter!(ENDPOINT_MESSAGES, "endpoint" => endpoint.to_owned(),
                        "rc" => String::from_utf8_lossy(&rc).into_owned())
                })
                .increment(1);
        }
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(MESSAGES, "Messages answered to terminals");
    describe_counter!(ENDPOINT_MESSAGES, "Replies received from endpoints");
    describe_histogram!(STAGE_SECONDS, Unit::Seconds, "Time per pipeline stage");
    describe_gauge!(IN_FLIGHT, "Requests being processed");
    describe_gauge!(CONNECTIONS, "Terminal connections open");
    describe_gauge!(LINK_STATE, "Link state: 0 down, 1 connected, 2 ready");
    describe_histogram!(JOURNAL_BATCH_ROWS, "Rows per journal commit");
    describe_histogram!(
        JOURNAL_COMMIT_SECONDS,
        Unit::Seconds,
        "Time per journal commit"
    );
    describe_gauge!(JOURNAL_BACKLOG, "Journal rows waiting for the database");
    describe_gauge!(
        JOURNAL_BREAKER_OPEN,
        "1 while journal commits fail and nothing is forwarded"
    );
    describe_counter!(JOURNAL_BREAKER_TRANSITIONS, "Journal breaker transitions");
    describe_gauge!(JOURNAL_SPOOL_BYTES, "Bytes in the journal's local spool");
    describe_counter!(
        JOURNAL_DEAD_LETTERS,
        "Journal changes set aside as dead letters (each needs an operator)"
    );
    describe_gauge!(SAF_DEPTH, "Store-and-forward entries pending");
    describe_counter!(
        SAF_UNOPENABLE,
        "Store-and-forward entries that could not be opened (left pending)"
    );
    describe_counter!(
        NODE_TAKEOVERS,
        "Forwarded requests of a gone node whose reversal this node queued"
    );
    describe_gauge!(HSM_UP, "HSM connections up");
    describe_counter!(HSM_FAILURES, "HSM commands failed");
    describe_counter!(FRAUD_HITS, "Fraud rules fired");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    #[test]
    fn the_grafana_dashboard_uses_only_metrics_that_exist() {
        let known = [
            MESSAGES,
            ENDPOINT_MESSAGES,
            STAGE_SECONDS,
            IN_FLIGHT,
            CONNECTIONS,
            LINK_STATE,
            JOURNAL_BATCH_ROWS,
            JOURNAL_COMMIT_SECONDS,
            JOURNAL_BACKLOG,
            SAF_DEPTH,
            HSM_UP,
            HSM_FAILURES,
            FRAUD_HITS,
        ];
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../specs/grafana/cardswitch.json")).unwrap();
        let text = dashboard.to_string();
        let mut used = 0;
        for (at, _) in text.match_indices("cardswitch_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let base = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_count")
                .trim_end_matches("_sum");
            assert!(known.contains(&base), "{name} is not a metric");
            used += 1;
        }
        assert!(used >= known.len());
    }
}
