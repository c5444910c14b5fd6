//! Transport framing: the length prefix (and optional TPDU header and trailer byte) around each
//! message on a TCP stream, as `tokio_util::codec` decoders and encoders.
//!
//! Supported prefixes: 2-byte binary (the default, NAC/Postilion style), 4-byte binary, four
//! ASCII digits, two BCD bytes and four hex characters. The length may count itself
//! (`includes_prefix`, jPOS `include-header-length`). An optional 5-byte TPDU follows the prefix
//! and an optional trailer byte (BASE24's ETX) ends the frame; both are counted by the length.
//!
//! A frame longer than `max_frame` is refused from its prefix alone, before any buffer grows. A
//! zero-length frame is a keepalive: it is returned as a [`Frame`] with an empty body, and the
//! connection usually echoes it. After a [`FrameError`] the stream is out of step and the
//! connection must be closed.
//!
//! Why not `LengthDelimitedCodec`: it covers the two binary prefixes only; one decoder for all
//! five keeps limits, keepalives and errors identical whatever the prefix.

use std::fmt;
use std::str::FromStr;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Default cap on one frame's length (8 KiB).
pub const DEFAULT_MAX_FRAME: usize = 8 * 1024;

/// The length prefix in front of each frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum LengthPrefix {
    /// Two bytes, big-endian binary.
    #[default]
    Bin2,
    /// Four bytes, big-endian binary.
    Bin4,
    /// Four ASCII decimal digits.
    Ascii4,
    /// Two bytes of packed BCD (four digits).
    Bcd2,
    /// Four ASCII hexadecimal characters.
    Hex4,
}

impl LengthPrefix {
    /// Bytes the prefix takes.
    #[must_use]
    pub const fn len(self) -> usize {
        match self {
            Self::Bin2 | Self::Bcd2 => 2,
            Self::Bin4 | Self::Ascii4 | Self::Hex4 => 4,
        }
    }

    /// Whether the prefix takes no bytes (never).
    #[must_use]
    pub const fn is_empty(self) -> bool {
        false
    }

    /// The largest length the prefix can express.
    #[must_use]
    pub const fn max_value(self) -> usize {
        match self {
            Self::Bin2 | Self::Hex4 => 0xFFFF,
            Self::Bin4 => 0xFFFF_FFFF,
            Self::Ascii4 | Self::Bcd2 => 9999,
        }
    }

    fn parse(self, raw: &[u8]) -> Option<usize> {
        match (self, raw) {
            (Self::Bin2, [a, b]) => Some(usize::from(u16::from_be_bytes([*a, *b]))),
            (Self::Bin4, [a, b, c, d]) => {
                usize::try_from(u32::from_be_bytes([*a, *b, *c, *d])).ok()
            }
            (Self::Ascii4, _) => raw.iter().try_fold(0usize, |acc, &c| {
                c.is_ascii_digit().then(|| acc * 10 + usize::from(c - b'0'))
            }),
            (Self::Bcd2, _) => raw.iter().try_fold(0usize, |acc, &b| {
                let (h, l) = (b >> 4, b & 0x0F);
                (h < 10 && l < 10).then(|| acc * 100 + usize::from(h) * 10 + usize::from(l))
            }),
            (Self::Hex4, _) => raw.iter().try_fold(0usize, |acc, &c| {
                char::from(c).to_digit(16).map(|d| acc * 16 + d as usize)
            }),
            _ => None,
        }
    }

    fn write(self, len: usize, dst: &mut BytesMut) {
        let digit = |n: usize| b"0123456789ABCDEF".get(n % 16).copied().unwrap_or(b'0');
        match self {
            Self::Bin2 => dst.put_u16(u16::try_from(len).unwrap_or(u16::MAX)),
            Self::Bin4 => dst.put_u32(u32::try_from(len).unwrap_or(u32::MAX)),
            Self::Ascii4 => {
                for p in [1000, 100, 10, 1] {
                    dst.put_u8(digit(len / p % 10));
                }
            }
            Self::Bcd2 => {
                dst.put_u8(u8::try_from(len / 1000 % 10 * 16 + len / 100 % 10).unwrap_or(0));
                dst.put_u8(u8::try_from(len / 10 % 10 * 16 + len % 10).unwrap_or(0));
            }
            Self::Hex4 => {
                for shift in [12, 8, 4, 0] {
                    dst.put_u8(digit(len >> shift & 0xF));
                }
            }
        }
    }
}

impl FromStr for LengthPrefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bin2" | "2" => Ok(Self::Bin2),
            "bin4" => Ok(Self::Bin4),
            "ascii4" => Ok(Self::Ascii4),
            "bcd2" => Ok(Self::Bcd2),
            "hex4" => Ok(Self::Hex4),
            other => Err(format!(
                "unknown length prefix {other:?} (bin2, bin4, ascii4, bcd2, hex4)"
            )),
        }
    }
}

impl fmt::Display for LengthPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Bin2 => "bin2",
            Self::Bin4 => "bin4",
            Self::Ascii4 => "ascii4",
            Self::Bcd2 => "bcd2",
            Self::Hex4 => "hex4",
        })
    }
}

/// A 5-byte TPDU header: protocol id (0x60), destination and source network identifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tpdu(pub [u8; 5]);

impl Tpdu {
    /// The header for a reply: destination and source swapped.
    #[must_use]
    pub fn swapped(self) -> Self {
        let [id, d1, d2, s1, s2] = self.0;
        Self([id, s1, s2, d1, d2])
    }
}

/// How frames are delimited on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Framing {
    /// The length prefix.
    pub prefix: LengthPrefix,
    /// Whether the length counts the prefix's own bytes.
    pub includes_prefix: bool,
    /// Whether a 5-byte TPDU follows the prefix.
    pub tpdu: bool,
    /// A byte that ends every frame (BASE24 uses 0x03), counted by the length.
    pub trailer: Option<u8>,
    /// Largest accepted frame (the length's value), refused before any allocation.
    pub max_frame: usize,
}

impl Default for Framing {
    fn default() -> Self {
        Self {
            prefix: LengthPrefix::Bin2,
            includes_prefix: false,
            tpdu: false,
            trailer: None,
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

impl Framing {
    /// Framing with the given prefix and the other settings at their defaults.
    #[must_use]
    pub fn with_prefix(prefix: LengthPrefix) -> Self {
        Self {
            prefix,
            ..Self::default()
        }
    }
}

/// One frame: the optional TPDU and the message bytes. An empty body is a keepalive.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Frame {
    /// The TPDU header, when the framing has one (absent on keepalives).
    pub tpdu: Option<Tpdu>,
    /// The message bytes.
    pub body: Bytes,
}

impl Frame {
    /// A frame with no TPDU.
    #[must_use]
    pub fn new(body: impl Into<Bytes>) -> Self {
        Self {
            tpdu: None,
            body: body.into(),
        }
    }

    /// Whether this is a zero-length keepalive frame.
    #[must_use]
    pub fn is_keepalive(&self) -> bool {
        self.body.is_empty() && self.tpdu.is_none()
    }
}

/// Why a frame could not be read or written. The connection must be closed after a read error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The socket failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The prefix announces more than the configured maximum.
    #[error("frame of {length} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// The announced length.
        length: usize,
        /// The maximum.
        max: usize,
    },
    /// The prefix is not a number in its encoding.
    #[error("length prefix is not valid {0}")]
    BadPrefix(LengthPrefix),
    /// The frame is too short for its TPDU, trailer or (when the length counts itself) prefix.
    #[error("frame of {length} bytes is too short for its header and trailer")]
    TooShort {
        /// The announced length.
        length: usize,
    },
    /// The frame does not end with the configured trailer byte.
    #[error("frame does not end with the trailer byte")]
    MissingTrailer,
}

/// `Decoder` and `Encoder` for one [`Framing`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FrameCodec {
    framing: Framing,
}

impl FrameCodec {
    /// A codec for the framing.
    #[must_use]
    pub fn new(framing: Framing) -> Self {
        Self { framing }
    }

    /// The framing.
    #[must_use]
    pub fn framing(&self) -> &Framing {
        &self.framing
    }

    fn overhead(&self) -> usize {
        usize::from(self.framing.tpdu) * 5 + usize::from(self.framing.trailer.is_some())
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let f = &self.framing;
        let plen = f.prefix.len();
        let Some(raw) = src.get(..plen) else {
            return Ok(None);
        };
        let announced = f.prefix.parse(raw).ok_or(FrameError::BadPrefix(f.prefix))?;
        let length = if f.includes_prefix {
            announced
                .checked_sub(plen)
                .ok_or(FrameError::TooShort { length: announced })?
        } else {
            announced
        };
        if length > f.max_frame {
            return Err(FrameError::TooLarge {
                length,
                max: f.max_frame,
            });
        }
        if length != 0 && length < self.overhead() {
            return Err(FrameError::TooShort { length });
        }
        if src.len() < plen + length {
            // Bounded by `max_frame`, checked above.
            src.reserve(plen + length - src.len());
            return Ok(None);
        }
        src.advance(plen);
        let mut body = src.split_to(length);
        if length == 0 {
            return Ok(Some(Frame::default()));
        }
        let tpdu = if f.tpdu {
            let h = body.split_to(5);
            let mut t = [0u8; 5];
            t.copy_from_slice(&h);
            Some(Tpdu(t))
        } else {
            None
        };
        if let Some(trailer) = f.trailer {
            if body.last() != Some(&trailer) {
                return Err(FrameError::MissingTrailer);
            }
            body.truncate(body.len() - 1);
        }
        Ok(Some(Frame {
            tpdu,
            body: body.freeze(),
        }))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        let f = &self.framing;
        let keepalive = frame.is_keepalive();
        let length = if keepalive {
            0
        } else {
            frame.body.len() + self.overhead()
        };
        let announced = length + if f.includes_prefix { f.prefix.len() } else { 0 };
        if length > f.max_frame || announced > f.prefix.max_value() {
            return Err(FrameError::TooLarge {
                length,
                max: f.max_frame.min(f.prefix.max_value()),
            });
        }
        dst.reserve(f.prefix.len() + length);
        f.prefix.write(announced, dst);
        if keepalive {
            return Ok(());
        }
        if f.tpdu {
            dst.put_slice(&frame.tpdu.unwrap_or(Tpdu([0x60, 0, 0, 0, 0])).0);
        }
        dst.put_slice(&frame.body);
        if let Some(trailer) = f.trailer {
            dst.put_u8(trailer);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(framing: Framing, body: &[u8]) -> BytesMut {
        let mut codec = FrameCodec::new(framing);
        let mut buf = BytesMut::new();
        codec
            .encode(
                Frame {
                    tpdu: framing.tpdu.then_some(Tpdu([0x60, 0, 1, 0, 2])),
                    body: Bytes::copy_from_slice(body),
                },
                &mut buf,
            )
            .unwrap();
        let wire = buf.clone();
        // Byte by byte: "need more" until the last byte.
        let mut feed = BytesMut::new();
        for (i, b) in wire.iter().enumerate() {
            feed.put_u8(*b);
            let got = codec.decode(&mut feed).unwrap();
            if i + 1 < wire.len() {
                assert!(got.is_none(), "frame before its end at {i}");
            } else {
                let frame = got.unwrap();
                assert_eq!(&frame.body[..], body);
                assert_eq!(frame.tpdu.is_some(), framing.tpdu);
            }
        }
        assert!(feed.is_empty());
        wire
    }

    #[test]
    fn every_prefix_round_trips_and_writes_the_expected_header() {
        let body = vec![0xAB; 300];
        let cases = [
            (LengthPrefix::Bin2, &[0x01, 0x2C][..]),
            (LengthPrefix::Bin4, &[0, 0, 0x01, 0x2C][..]),
            (LengthPrefix::Ascii4, &b"0300"[..]),
            (LengthPrefix::Bcd2, &[0x03, 0x00][..]),
            (LengthPrefix::Hex4, &b"012C"[..]),
        ];
        for (prefix, header) in cases {
            let wire = round_trip(Framing::with_prefix(prefix), &body);
            assert_eq!(&wire[..prefix.len()], header, "{prefix}");
        }
    }

    #[test]
    fn inclusive_length_tpdu_and_trailer() {
        let framing = Framing {
            includes_prefix: true,
            tpdu: true,
            trailer: Some(0x03),
            ..Framing::default()
        };
        let wire = round_trip(framing, b"0800");
        // 2 (prefix) + 5 (TPDU) + 4 (body) + 1 (ETX)
        assert_eq!(&wire[..2], &[0, 12]);
        assert_eq!(wire.last(), Some(&0x03));
        assert_eq!(Tpdu([0x60, 0, 1, 0, 2]).swapped(), Tpdu([0x60, 0, 2, 0, 1]));
    }

    #[test]
    fn oversized_frames_are_refused_from_the_prefix_alone() {
        let mut codec = FrameCodec::default();
        let mut src = BytesMut::from(&[0xFF, 0xFF][..]);
        let cap = src.capacity();
        assert!(matches!(
            codec.decode(&mut src),
            Err(FrameError::TooLarge {
                length: 65535,
                max: 8192
            })
        ));
        assert_eq!(src.capacity(), cap);
        let mut bin4 = FrameCodec::new(Framing::with_prefix(LengthPrefix::Bin4));
        let mut src = BytesMut::from(&[0xFF, 0xFF, 0xFF, 0xFF][..]);
        assert!(matches!(
            bin4.decode(&mut src),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn bad_prefixes_and_keepalives() {
        for (prefix, raw) in [
            (LengthPrefix::Ascii4, &b"00x1"[..]),
            (LengthPrefix::Bcd2, &[0x0A, 0x00][..]),
            (LengthPrefix::Hex4, &b"00G0"[..]),
        ] {
            let mut codec = FrameCodec::new(Framing::with_prefix(prefix));
            assert!(
                matches!(
                    codec.decode(&mut BytesMut::from(raw)),
                    Err(FrameError::BadPrefix(_))
                ),
                "{prefix}"
            );
        }
        let mut codec = FrameCodec::new(Framing {
            tpdu: true,
            ..Framing::default()
        });
        let mut src = BytesMut::from(&[0, 0, 0, 3, 1, 2, 3][..]);
        assert!(codec.decode(&mut src).unwrap().unwrap().is_keepalive());
        assert!(matches!(
            codec.decode(&mut src),
            Err(FrameError::TooShort { length: 3 })
        ));
        let mut out = BytesMut::new();
        codec.encode(Frame::default(), &mut out).unwrap();
        assert_eq!(&out[..], &[0, 0]);
        let mut incl = FrameCodec::new(Framing {
            includes_prefix: true,
            ..Framing::default()
        });
        assert!(matches!(
            incl.decode(&mut BytesMut::from(&[0, 1][..])),
            Err(FrameError::TooShort { length: 1 })
        ));
    }
}
