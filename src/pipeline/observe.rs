//! The dashboard feed: metrics by listener, MTI, code and stage, and the live view, for every
//! answered message.

use std::time::Duration;

use cardswitch_codec::Message;

use super::outcome::Outcome;
use super::{build, Pipeline};
use crate::admin::live::Decline;
use crate::journal::{DecidedBy, Journal};
use crate::telemetry::Stage;

impl Pipeline {
    /// Metrics and the live view for one answered message.
    pub(super) fn observe(
        &self,
        listener: &str,
        request: &Message,
        outcome: &Outcome,
        decode: Duration,
        mac: Duration,
        total: Duration,
    ) {
        let code = outcome.reply.response_code();
        let rc_bytes = code.map_or(*b"--", |c| {
            let mut b = [b'-'; 2];
            for (o, i) in b.iter_mut().zip(c.as_str().bytes()) {
                *o = i;
            }
            b
        });
        self.metrics
            .message(listener, *request.mti().as_bytes(), rc_bytes);
        if let (Some(e), DecidedBy::Acquirer) = (&outcome.endpoint, outcome.decided_by) {
            self.metrics.endpoint_reply(e, rc_bytes);
        }
        let m = &self.metrics;
        m.stage(Stage::Decode, decode);
        if let Some(d) = outcome.fraud_time {
            m.stage(Stage::Fraud, d);
        }
        if let Some(d) = outcome.routing {
            m.stage(Stage::Route, d);
        }
        if let Some(d) = outcome.upstream {
            m.stage(Stage::Upstream, d);
        }
        let hsm = mac + outcome.hsm.unwrap_or_default();
        if !hsm.is_zero() {
            m.stage(Stage::Hsm, hsm);
        }
        m.stage(Stage::Total, total);
        let card = matches!(request.mti().class(), 1 | 2);
        let approved = outcome
            .reply
            .response_code()
            .is_some_and(|c| c.is_approved());
        let decline = (card && !approved).then(|| Decline {
            at_ms: u64::try_from(Journal::now_us() / 1000).unwrap_or(0),
            mti: request.mti().to_string(),
            rc: String::from_utf8_lossy(&rc_bytes).into_owned(),
            pan: build::card_pan(request)
                .map(|p| p.masked().to_string())
                .unwrap_or_default(),
            terminal: request.terminal_id().unwrap_or("").trim_end().to_owned(),
            amount: request.amount(),
        });
        self.live.record(card, approved, total, decline);
    }
}
