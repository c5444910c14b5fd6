//! Terminal batches: a batch settlement (0500/0520) compares the terminal's totals with the
//! journal's, a batch-upload record (0320) is journaled and acknowledged. The totals themselves
//! are computed in [`crate::settlement::batch`].

use cardswitch_codec::totals::Totals;
use cardswitch_codec::{Message, ResponseCode};
use cardswitch_routing::Failure;
use tracing::{debug, info, warn};

use super::outcome::Outcome;
use super::Pipeline;
use crate::journal::DecidedBy;
use crate::settlement::batch;
use crate::state::TxnState;

impl Pipeline {
    /// A terminal's batch settlement (0500/0520): its totals against the journal's; 00 and the
    /// batch closed when they agree, 95 and the switch's totals when they do not (see
    /// [`crate::settlement::batch`]).
    pub(super) async fn settle_batch(&self, request: &Message) -> Option<Outcome> {
        let (Some(terminal), Some(batch)) = (
            request.get_str(41),
            batch::batch_of(request, self.batch_field),
        ) else {
            return Outcome::refused(request, Failure::Format);
        };
        let theirs = match Totals::read(request) {
            Ok(t) => t,
            Err(e) => {
                debug!(error = %e, "settlement request unreadable");
                return Outcome::refused(request, Failure::Format);
            }
        };
        // Every row already answered must be in the totals.
        self.journal.flush().await;
        match batch::settle(self.journal.backend(), terminal, &batch, &theirs).await {
            Ok(settled) => {
                let agreed = settled.code.is_approved();
                let mut reply = self.batch_reply(request, settled.code)?;
                settled.view.totals.write(&mut reply);
                reply.set(66, if agreed { b"1" } else { b"2" });
                info!(terminal = terminal.trim_end(), batch = %batch, code = %settled.code, uploaded = settled.view.uploaded, exceptions = settled.view.exceptions.len(), "batch settlement");
                let state = if agreed {
                    TxnState::Approved
                } else {
                    TxnState::Declined
                };
                Some(Outcome::new(reply, DecidedBy::Switch, state))
            }
            Err(e) => {
                warn!(error = %e, "batch totals could not be read");
                Outcome::refused(request, Failure::JournalUnavailable)
            }
        }
    }

    /// A batch-upload record (0320): journaled as `uploaded` and acknowledged.
    pub(super) fn upload(&self, request: &Message) -> Option<Outcome> {
        if batch::batch_of(request, self.batch_field).is_none() {
            return Outcome::refused(request, Failure::Format);
        }
        let reply = self.batch_reply(request, ResponseCode::APPROVED)?;
        Some(Outcome::new(reply, DecidedBy::Switch, TxnState::Uploaded))
    }

    /// The response to a batch message, its batch number echoed.
    fn batch_reply(&self, request: &Message, code: ResponseCode) -> Option<Message> {
        let mut reply = request.response_with(code)?;
        if let Some(v) = request.get(self.batch_field) {
            reply.set(self.batch_field, v);
        }
        Some(reply)
    }
}
