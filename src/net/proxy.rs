//! PROXY protocol version 2 on terminal listeners that opt in (`proxy_protocol = true`): a
//! balancer in front (HAProxy `send-proxy-v2`) opens each connection with a binary header naming
//! the terminal's address, so that logs and the journal carry the terminal's address, not the
//! balancer's. The header is read before anything else (TLS included), exactly as long as it
//! says it is, so no byte of the first frame is taken with it; the header is parsed by the `ppp`
//! crate.
//!
//! On such a listener every connection must begin with the header, within the header timeout:
//! a connection that does not (a terminal connecting past the balancer, a stray probe, garbage)
//! is closed with nothing read from it as a message. A `LOCAL` header (the balancer's own
//! health check) keeps the connection's own address.

use std::net::SocketAddr;
use std::time::Duration;

use ppp::v2::{Addresses, Command, Header, PROTOCOL_PREFIX};
use tokio::io::{AsyncRead, AsyncReadExt};

/// How long a connection may take to send its header.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest address and TLV part accepted (HAProxy sends tens of bytes; the protocol allows
/// 65,535, which a peer could use to make the switch wait and hold memory).
const MAX_PAYLOAD: usize = 1_024;

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    /// Not a version 2 header (its first 16 bytes say so).
    #[error("not a PROXY protocol v2 header")]
    NotProxy,
    /// It announces more than [`MAX_PAYLOAD`] bytes.
    #[error("PROXY header of {0} bytes refused (at most {MAX_PAYLOAD})")]
    TooLong(usize),
    /// The header does not parse.
    #[error("PROXY header invalid: {0}")]
    Invalid(String),
    /// The connection ended or failed before the header was whole.
    #[error("connection ended in the PROXY header: {0}")]
    Io(#[from] std::io::Error),
    /// Not whole within [`HEADER_TIMEOUT`].
    #[error("no PROXY header within {HEADER_TIMEOUT:?}")]
    Timeout,
}

/// Reads the PROXY v2 header at the start of `stream`: the terminal's address it names, or
/// `peer` (the connection's own) for a `LOCAL` header or an address family without one.
///
/// # Errors
/// See [`ProxyError`]; the connection is then to be closed.
pub(crate) async fn read_header<S>(
    stream: &mut S,
    peer: SocketAddr,
) -> Result<SocketAddr, ProxyError>
where
    S: AsyncRead + Unpin,
{
    match tokio::time::timeout(HEADER_TIMEOUT, read(stream, peer)).await {
        Ok(r) => r,
        Err(_) => Err(ProxyError::Timeout),
    }
}

async fn read<S>(stream: &mut S, peer: SocketAddr) -> Result<SocketAddr, ProxyError>
where
    S: AsyncRead + Unpin,
{
    // 12-byte signature, version and command, family and protocol, 2-byte length.
    let mut fixed = [0_u8; 16];
    stream.read_exact(&mut fixed).await?;
    if !fixed.starts_with(PROTOCOL_PREFIX) || fixed[12] >> 4 != 2 {
        return Err(ProxyError::NotProxy);
    }
    let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if len > MAX_PAYLOAD {
        return Err(ProxyError::TooLong(len));
    }
    let mut rest = vec![0_u8; len];
    stream.read_exact(&mut rest).await?;
    let mut whole = Vec::with_capacity(16 + len);
    whole.extend_from_slice(&fixed);
    whole.extend_from_slice(&rest);
    address_of(&whole, peer)
}

/// The terminal's address a whole header names.
fn address_of(whole: &[u8], peer: SocketAddr) -> Result<SocketAddr, ProxyError> {
    let header = Header::try_from(whole).map_err(|e| ProxyError::Invalid(e.to_string()))?;
    if header.command == Command::Local {
        return Ok(peer);
    }
    Ok(match header.addresses {
        Addresses::IPv4(a) => SocketAddr::from((a.source_address, a.source_port)),
        Addresses::IPv6(a) => SocketAddr::from((a.source_address, a.source_port)),
        Addresses::Unspecified | Addresses::Unix(_) => peer,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn v4(command: u8, src: [u8; 4], port: u16, tlvs: &[u8]) -> Vec<u8> {
        let mut h = PROTOCOL_PREFIX.to_vec();
        let len = u16::try_from(12 + tlvs.len()).unwrap();
        h.extend([0x20 | command, 0x11]);
        h.extend(len.to_be_bytes());
        h.extend(src);
        h.extend([10, 0, 0, 1]);
        h.extend(port.to_be_bytes());
        h.extend(8583_u16.to_be_bytes());
        h.extend(tlvs);
        h
    }

    const PEER: ([u8; 4], u16) = ([127, 0, 0, 9], 40_000);

    async fn read_all(bytes: &[u8]) -> (Result<SocketAddr, ProxyError>, Vec<u8>) {
        let mut r = bytes;
        let got = read_header(&mut r, PEER.into()).await;
        (got, r.to_vec())
    }

    #[tokio::test]
    async fn a_proxy_header_names_the_terminal_and_leaves_the_first_frame_whole() {
        let mut bytes = v4(1, [192, 0, 2, 7], 51_000, &[0x04, 0, 1, 0]);
        bytes.extend(b"\x00\x04ABCD");
        let (got, rest) = read_all(&bytes).await;
        assert_eq!(got.unwrap(), SocketAddr::from(([192, 0, 2, 7], 51_000)));
        assert_eq!(rest, b"\x00\x04ABCD");
    }

    #[tokio::test]
    async fn a_local_header_keeps_the_connections_address() {
        let (got, rest) = read_all(&v4(0, [192, 0, 2, 7], 51_000, &[])).await;
        assert_eq!(got.unwrap(), SocketAddr::from(PEER));
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn anything_else_is_refused_with_a_reason() {
        // An ISO 8583 frame where the header should be.
        let frame = b"\x00\x2e0800822000000000000004000000000000001201120000000001301";
        assert!(matches!(read_all(frame).await.0, Err(ProxyError::NotProxy)));
        // Version 1 (text) is not taken.
        let v1 = b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 8583\r\n";
        assert!(matches!(read_all(v1).await.0, Err(ProxyError::NotProxy)));
        // Too long, cut short, or inconsistent.
        let mut long = v4(1, [1, 2, 3, 4], 1, &[]);
        long[14..16].copy_from_slice(&60_000_u16.to_be_bytes());
        assert!(matches!(
            read_all(&long).await.0,
            Err(ProxyError::TooLong(60_000))
        ));
        let whole = v4(1, [1, 2, 3, 4], 1, &[]);
        for cut in 0..whole.len() {
            assert!(
                matches!(read_all(&whole[..cut]).await.0, Err(ProxyError::Io(_))),
                "{cut}"
            );
        }
        let mut short = v4(1, [1, 2, 3, 4], 1, &[]);
        short[15] = 4; // announces 4 bytes: too few for IPv4 addresses
        short.truncate(20);
        assert!(matches!(
            read_all(&short).await.0,
            Err(ProxyError::Invalid(_))
        ));
    }

    #[test]
    fn any_bytes_after_a_valid_prefix_give_an_answer() {
        // The header parser is total over what the length admits.
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let len = rng.usize(0..64);
            let mut h = PROTOCOL_PREFIX.to_vec();
            h.extend([rng.u8(..), rng.u8(..)]);
            h.extend(u16::try_from(len).unwrap().to_be_bytes());
            h.extend((0..len).map(|_| rng.u8(..)));
            let _ = address_of(&h, PEER.into());
        }
    }
}
