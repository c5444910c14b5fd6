#![no_main]
//! The framing decoder on every prefix: no panic, and a buffer never grows past the frame cap.

use bytes::BytesMut;
use cardswitch_codec::framing::{FrameCodec, Framing, LengthPrefix};
use tokio_util::codec::Decoder;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let prefix = match selector % 5 {
        0 => LengthPrefix::Bin2,
        1 => LengthPrefix::Bin4,
        2 => LengthPrefix::Ascii4,
        3 => LengthPrefix::Bcd2,
        _ => LengthPrefix::Hex4,
    };
    let framing = Framing {
        includes_prefix: selector & 0x10 != 0,
        tpdu: selector & 0x20 != 0,
        trailer: (selector & 0x40 != 0).then_some(0x03),
        max_frame: 512,
        ..Framing::with_prefix(prefix)
    };
    let mut codec = FrameCodec::new(framing);
    let mut buf = BytesMut::from(rest);
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        assert!(frame.body.len() <= 512);
    }
    assert!(buf.capacity() <= rest.len().max(8) + 512 + 8);
});
