//! Network management from terminals (08xx): echo tests, sign-on and sign-off are answered by
//! the switch itself; any other function gets the unsupported code.

use cardswitch_codec::{Message, ResponseCode};
use cardswitch_routing::Failure;

use super::Pipeline;

impl Pipeline {
    /// 0800 from a terminal: echo, sign-on and sign-off are answered by the switch.
    pub(super) fn network(&self, request: &Message) -> Option<Message> {
        let code = match request.network_code() {
            Some(1 | 2 | 301) => ResponseCode::APPROVED,
            _ => Failure::Unsupported.response_code(),
        };
        request.response_with(code)
    }
}
