//! Network management on an acquirer link: the switch's own 0800s (sign-on, echo, sign-off)
//! and the acquirer's (key exchange, cutover, its echo tests and sign-ons, answered 00). The
//! link's main loop hands every 0800 it receives to [`LinkTask::acquirer_request`].

use bytes::Bytes;
use cardswitch_codec::framing::{Frame, FrameCodec};
use cardswitch_codec::hsm::KeyType;
use cardswitch_codec::{Message, Mti, ResponseCode};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::Framed;
use tracing::{info, warn};

use super::LinkTask;
use crate::net::connection::Ended;
use crate::security::{EndpointSecurity, Key};
use crate::settlement::{self, Cutover};

impl LinkTask {
    /// Signs on (0800/001) and waits for its 00 within the request timeout.
    pub(super) async fn sign_on<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        framed: &mut Framed<S, FrameCodec>,
    ) -> Result<(), Ended> {
        let Some(stan) = self.send_network(framed, "001").await else {
            return Err(Ended::Broken);
        };
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let next = tokio::select! {
                () = self.shutdown.cancelled() => return Err(Ended::Shutdown),
                n = tokio::time::timeout_at(deadline, framed.next()) => n,
            };
            let Ok(Some(Ok(frame))) = next else {
                warn!(endpoint = %self.endpoint, link = %self.link.addr, "sign-on not answered");
                return Err(Ended::Broken);
            };
            let Ok(reply) = self.dialect.decode(&frame.body) else {
                continue;
            };
            if reply.mti() == Mti::NETWORK_RESPONSE && reply.stan() == Some(stan) {
                if reply.response_code() == Some(ResponseCode::APPROVED) {
                    return Ok(());
                }
                warn!(endpoint = %self.endpoint, link = %self.link.addr, "sign-on refused");
                return Err(Ended::Broken);
            }
        }
    }

    /// An 0800 from the acquirer: its key exchange, its cutover, or its own echo test or
    /// sign-on, answered 00.
    pub(super) async fn acquirer_request<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        request: Message,
        framed: &mut Framed<S, FrameCodec>,
    ) {
        let code = request.network_code();
        if self
            .security
            .as_ref()
            .is_some_and(|s| code == Some(s.keys.key_exchange_code))
        {
            self.key_exchange(request);
        } else if code == Some(201) {
            self.cutover(&request, framed).await;
        } else if let Some(mut rsp) = request.response_with(ResponseCode::APPROVED) {
            rsp.remove(39);
            rsp.set_response_code(ResponseCode::APPROVED);
            if let Ok(body) = self.dialect.encode_to_vec(&rsp) {
                let _ = framed.send(Frame::new(body)).await;
            }
        }
    }

    /// An acquirer's key change: the new ZPK arrives under the ZMK with its check value. The
    /// HSM imports it under the LMK; when the check values agree it replaces the ZPK in use and
    /// is kept in the database; the 0810 says 00, or 63 (check value differs) or 96 (no ZMK,
    /// unreadable field, HSM failure). Runs beside the link so that traffic keeps flowing.
    fn key_exchange(&self, request: Message) {
        let Some(sec) = self.security.clone() else {
            return;
        };
        let (endpoint, dialect, queue) = (
            self.endpoint.clone(),
            self.dialect.clone(),
            self.link.queue.clone(),
        );
        tokio::spawn(async move {
            let code = match (
                &sec.keys.zmk,
                request
                    .get(sec.keys.key_field)
                    .and_then(EndpointSecurity::parse_key_field),
            ) {
                (Some(zmk), Some((under_zmk, check))) => {
                    match sec.hsm.import_key(KeyType::ZPK, &zmk.key, &under_zmk).await {
                        Ok((under_lmk, kcv))
                            if kcv.starts_with(&check) || check.starts_with(&kcv) =>
                        {
                            let key = Key {
                                key: under_lmk,
                                check: kcv.clone(),
                                kind: KeyType::ZPK,
                            };
                            sec.keys.set_zpk(key.clone());
                            let _ = sec.changes.send((endpoint.clone(), key)).await;
                            info!(endpoint = %endpoint, check_value = %kcv, "ZPK changed by key exchange");
                            ResponseCode::APPROVED
                        }
                        Ok((_, kcv)) => {
                            warn!(endpoint = %endpoint, sent = %check, computed = %kcv, "key exchange: check values differ; key refused");
                            ResponseCode::SECURITY_VIOLATION
                        }
                        Err(e) => {
                            warn!(endpoint = %endpoint, error = %e, "key exchange: HSM import failed");
                            ResponseCode::SYSTEM_MALFUNCTION
                        }
                    }
                }
                (None, _) => {
                    warn!(endpoint = %endpoint, "key exchange but no ZMK configured");
                    ResponseCode::SYSTEM_MALFUNCTION
                }
                (_, None) => {
                    warn!(endpoint = %endpoint, "key exchange: key field missing or unreadable");
                    ResponseCode::SYSTEM_MALFUNCTION
                }
            };
            if let Some(mut rsp) = request.response_with(code) {
                rsp.remove(sec.keys.key_field);
                if let Ok(body) = dialect.encode_to_vec(&rsp) {
                    let _ = queue.send(Frame::new(Bytes::from(body))).await;
                }
            }
        });
    }

    /// The acquirer's cutover (0800, DE70 201): the business date advances to DE15 (nearest
    /// year) or, without it, to the next day, and the 0810 says 00. A repeat (same or earlier
    /// date, as when every link of the endpoint receives it) changes nothing and is answered 00
    /// too.
    async fn cutover<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        request: &Message,
        framed: &mut Framed<S, FrameCodec>,
    ) {
        let current = self.day.day.current();
        let to = request
            .get_str(15)
            .and_then(|d| settlement::resolve_mmdd(d, current));
        if let Some((closed, opened)) = self.day.day.advance(to) {
            let _ = self
                .day
                .cutovers
                .send(Cutover {
                    endpoint: self.endpoint.clone(),
                    closed,
                    opened,
                    cause: "0800/201".to_owned(),
                })
                .await;
        }
        if let Some(mut rsp) = request.response_with(ResponseCode::APPROVED) {
            rsp.set(15, settlement::mmdd(self.day.day.current()).as_bytes());
            if let Ok(body) = self.dialect.encode_to_vec(&rsp) {
                let _ = framed.send(Frame::new(body)).await;
            }
        }
    }

    pub(super) fn network_message(&self, code: &str) -> (u32, Message) {
        let stan = self.link.next_stan();
        let (de7, _, _) = cardswitch_codec::clock::now_fields();
        (
            stan,
            Message::builder(Mti::NETWORK_REQUEST)
                .field(7, de7)
                .stan(stan)
                .field(70, code)
                .build(),
        )
    }

    pub(super) async fn send_network<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        framed: &mut Framed<S, FrameCodec>,
        code: &str,
    ) -> Option<u32> {
        let (stan, msg) = self.network_message(code);
        let body = self.dialect.encode_to_vec(&msg).ok()?;
        framed.send(Frame::new(body)).await.ok()?;
        Some(stan)
    }
}
