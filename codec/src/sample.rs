//! Sample messages with test card data, shared by tests, benchmarks, fuzz seeds and simulators.

use crate::message::Message;
use crate::types::Mti;

/// A 40-byte DE55 as a chip terminal sends it: 9F26 (cryptogram), 9F27, 9F36, 95, 9A, 9C, 5F2A.
pub const ICC_DATA: [u8; 40] = [
    0x9F, 0x26, 0x08, 0x1A, 0x2B, 0x3C, 0x4D, 0x5E, 0x6F, 0x70,
    0x81, // 9F26 application cryptogram
    0x9F, 0x27, 0x01, 0x80, // 9F27 cryptogram information data
    0x9F, 0x36, 0x02, 0x00, 0x01, // 9F36 application transaction counter
    0x95, 0x05, 0x00, 0x00, 0x00, 0x00, 0x00, // 95 terminal verification results
    0x9A, 0x03, 0x25, 0x11, 0x21, // 9A transaction date
    0x9C, 0x01, 0x00, // 9C transaction type
    0x5F, 0x2A, 0x02, 0x08, 0x40, // 5F2A transaction currency code
];

/// A typical chip 0100 with a PIN block (about 260 bytes in `iso87-ascii`): DE 2, 3, 4, 7, 11,
/// 12, 13, 14, 18, 22, 25, 32, 35, 37, 41, 42, 43, 49, 52, 55. The PAN is the public test card
/// 4761739001010010.
#[must_use]
pub fn auth_request() -> Message {
    Message::builder(Mti::AUTH_REQUEST)
        .field(2, "4761739001010010")
        .field(3, "000000")
        .amount(12_345)
        .field(7, "1121093015")
        .stan(123_456)
        .field(12, "093015")
        .field(13, "1121")
        .field(14, "2812")
        .field(18, "5411")
        .field(22, "051")
        .field(25, "00")
        .field(32, "123456")
        .field(35, "4761739001010010=28122011143878089")
        .field(37, "532509123456")
        .field(41, "TERM0001")
        .field(42, "MERCHANT0000001")
        .field(43, "CARDSWITCH TEST STORE    LONDON       GB")
        .field(49, "826")
        .field(52, [0x04, 0x12, 0x77, 0xCD, 0xDE, 0xEF, 0xF6, 0x69])
        .field(55, ICC_DATA)
        .build()
}
