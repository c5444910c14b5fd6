//! Card security in the pipeline: the terminal's MAC verified over the frame as received, and
//! the PIN block translated from the terminal's TPK to the acquirer's ZPK, both through the HSM.
//! Keys appear here only as the HSM's encrypted fields.

use cardswitch_codec::hsm::{account_of, KeyType};
use cardswitch_codec::{Dialect, Message, Pan};
use cardswitch_routing::Failure;
use tracing::{debug, warn};

use super::Pipeline;
use crate::upstream::Endpoint;

impl Pipeline {
    /// Verifies a terminal's MAC over the frame as received; `Err` with the failure to answer.
    pub(super) async fn check_mac(
        &self,
        listener: &str,
        dialect: &Dialect,
        body: &[u8],
        request: &Message,
    ) -> Result<(), Failure> {
        let Some(sec) = self.security.get(listener) else {
            return Ok(());
        };
        if !sec.verify_mac || !matches!(request.mti().class(), 1 | 2 | 4) {
            return Ok(());
        }
        let (_, tak) = sec.keys_for(request.terminal_id());
        let (Some(tak), Some(hsm)) = (tak, &self.hsm) else {
            warn!(listener, "no TAK for this terminal: MAC cannot be verified");
            return Err(Failure::BadMac);
        };
        let Some((data, mac)) = dialect.mac_span(body, request) else {
            debug!("MAC missing");
            return Err(Failure::BadMac);
        };
        match hsm.verify_mac(KeyType::TAK, &tak.key, data, mac).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                debug!("MAC does not verify");
                Err(Failure::BadMac)
            }
            Err(e) => {
                warn!(error = %e, "MAC verification failed at the HSM");
                Err(Failure::HsmUnavailable)
            }
        }
    }

    /// The request as it goes to `endpoint`: its PIN block translated from the terminal's TPK
    /// to the endpoint's ZPK. `Ok(None)` when there is nothing to translate.
    pub(super) async fn translate_pin(
        &self,
        listener: &str,
        request: &Message,
        pan: &Pan,
        endpoint: &Endpoint,
    ) -> Result<Option<Message>, Failure> {
        let Some(block) = request.get(52) else {
            return Ok(None);
        };
        let terminal = self.security.get(listener);
        let zone = endpoint.security();
        if terminal.is_none() && zone.is_none() {
            // No keys on either side: the PIN block passes as it came.
            return Ok(None);
        }
        let tpk = terminal.and_then(|t| t.keys_for(request.terminal_id()).0.as_ref());
        let zpk = zone.and_then(|z| z.keys.zpk());
        let (Some(tpk), Some(zpk), Some(hsm), Some(t), Some(z)) =
            (tpk, zpk, &self.hsm, terminal, zone)
        else {
            warn!(
                listener,
                endpoint = endpoint.name(),
                "PIN block present but a TPK or ZPK is not configured"
            );
            return Err(Failure::HsmUnavailable);
        };
        let Some(account) = account_of(pan.expose()) else {
            return Err(Failure::BadPinBlock);
        };
        match hsm
            .translate_pin(
                &tpk.key,
                &zpk.key,
                block,
                &t.pin_format,
                &z.keys.pin_format,
                &account,
            )
            .await
        {
            Ok(translated) => {
                let mut out = request.clone();
                out.set(52, &translated);
                Ok(Some(out))
            }
            Err(e) if e.is_bad_pin_block() => {
                debug!(error = %e, "PIN block refused by the HSM");
                Err(Failure::BadPinBlock)
            }
            Err(e) => {
                warn!(error = %e, "PIN translation failed at the HSM");
                Err(Failure::HsmUnavailable)
            }
        }
    }
}
