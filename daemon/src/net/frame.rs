//! The frame header every transport carries, as pure encode/decode functions.
//!
//! A frame is the content of one QUIC uni stream, one length-prefixed record on a TLS-over-TCP
//! connection, or one in-memory message:
//!
//! ```text
//! magic "Kn" (2) | wire version (1) | channel (1) | scheme (1) | family 4|6 (1) | IP (4|16)
//!   | port u16 BE (2) | payload
//! ```
//!
//! The address is the sender's *advertised* address, so a receiver answers the member, not
//! whatever NAT source address the packets came from. This module does no I/O and must never
//! panic on any input: garbage decodes to a [`FrameError`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{BufMut, Bytes, BytesMut};

use super::{Channel, PeerAddr, Scheme};

/// The first two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"Kn";
/// The frame layout version; bump (with [`super::ALPN`]) on any change.
pub const WIRE_VERSION: u8 = 1;
/// The longest header: an IPv6 address.
pub const MAX_HEADER_LEN: usize = 2 + 1 + 1 + 1 + 1 + 16 + 2;

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame truncated: {len} bytes is shorter than its header")]
    Truncated { len: usize },
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 2]),
    #[error("unsupported wire version {0} (this node speaks {WIRE_VERSION})")]
    Version(u8),
    #[error("unknown channel {0}")]
    Channel(u8),
    #[error("unknown scheme {0}")]
    Scheme(u8),
    #[error("unknown address family {0}")]
    Family(u8),
}

/// A decoded frame: who sent it (advertised), on which channel, and the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub channel: Channel,
    pub from: PeerAddr,
    pub payload: Bytes,
}

fn scheme_byte(scheme: Scheme) -> u8 {
    match scheme {
        Scheme::Quic => 1,
        Scheme::Tcp => 2,
        Scheme::Mem => 3,
    }
}

fn scheme_from(byte: u8) -> Result<Scheme, FrameError> {
    match byte {
        1 => Ok(Scheme::Quic),
        2 => Ok(Scheme::Tcp),
        3 => Ok(Scheme::Mem),
        other => Err(FrameError::Scheme(other)),
    }
}

/// The header length for a sender address.
pub fn header_len(from: &PeerAddr) -> usize {
    match from.addr.ip() {
        IpAddr::V4(_) => MAX_HEADER_LEN - 12,
        IpAddr::V6(_) => MAX_HEADER_LEN,
    }
}

/// Encodes the header for `from` on `channel` followed by `payload`.
pub fn encode(channel: Channel, from: &PeerAddr, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(header_len(from) + payload.len());
    buf.put_slice(&MAGIC);
    buf.put_u8(WIRE_VERSION);
    buf.put_u8(channel as u8);
    buf.put_u8(scheme_byte(from.scheme));
    match from.addr.ip() {
        IpAddr::V4(ip) => {
            buf.put_u8(4);
            buf.put_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            buf.put_u8(6);
            buf.put_slice(&ip.octets());
        }
    }
    buf.put_u16(from.addr.port());
    buf.put_slice(payload);
    buf.freeze()
}

/// Decodes a frame; the payload shares `bytes`' buffer.
pub fn decode(bytes: &Bytes) -> Result<Frame, FrameError> {
    let truncated = FrameError::Truncated { len: bytes.len() };
    let fixed = bytes.get(..6).ok_or(truncated.clone())?;
    let magic = [fixed[0], fixed[1]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    if fixed[2] != WIRE_VERSION {
        return Err(FrameError::Version(fixed[2]));
    }
    let channel = Channel::try_from(fixed[3]).map_err(|_| FrameError::Channel(fixed[3]))?;
    let scheme = scheme_from(fixed[4])?;
    let (ip, rest_at) = match fixed[5] {
        4 => {
            let raw = bytes.get(6..10).ok_or(truncated.clone())?;
            let octets: [u8; 4] = [raw[0], raw[1], raw[2], raw[3]];
            (IpAddr::V4(Ipv4Addr::from(octets)), 10)
        }
        6 => {
            let raw = bytes.get(6..22).ok_or(truncated.clone())?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(raw);
            (IpAddr::V6(Ipv6Addr::from(octets)), 22)
        }
        other => return Err(FrameError::Family(other)),
    };
    let port = bytes.get(rest_at..rest_at + 2).ok_or(truncated)?;
    let port = u16::from_be_bytes([port[0], port[1]]);
    Ok(Frame {
        channel,
        from: PeerAddr {
            scheme,
            addr: SocketAddr::new(ip, port),
        },
        payload: bytes.slice(rest_at + 2..),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> PeerAddr {
        PeerAddr {
            scheme: Scheme::Tcp,
            addr: "10.1.2.3:7946".parse().expect("address"),
        }
    }

    #[test]
    fn round_trip_v4_and_v6() {
        for from in [
            sample(),
            PeerAddr {
                scheme: Scheme::Quic,
                addr: "[2001:db8::7]:9".parse().expect("address"),
            },
        ] {
            let bytes = encode(Channel::Peer, &from, b"hello");
            assert_eq!(bytes.len(), header_len(&from) + 5);
            let frame = decode(&bytes).expect("decodes");
            assert_eq!(frame.channel, Channel::Peer);
            assert_eq!(frame.from, from);
            assert_eq!(&frame.payload[..], b"hello");
        }
    }

    #[test]
    fn garbage_is_named() {
        let good = encode(Channel::Gossip, &sample(), b"x");
        assert_eq!(
            decode(&Bytes::from_static(b"Kn")),
            Err(FrameError::Truncated { len: 2 })
        );
        let mut bad = good.to_vec();
        bad[0] = b'X';
        assert!(matches!(
            decode(&Bytes::from(bad)),
            Err(FrameError::BadMagic(_))
        ));
        let mut bad = good.to_vec();
        bad[2] = 9;
        assert_eq!(decode(&Bytes::from(bad)), Err(FrameError::Version(9)));
        let mut bad = good.to_vec();
        bad[3] = 0;
        assert_eq!(decode(&Bytes::from(bad)), Err(FrameError::Channel(0)));
        let mut bad = good.to_vec();
        bad[4] = 7;
        assert_eq!(decode(&Bytes::from(bad)), Err(FrameError::Scheme(7)));
        let mut bad = good.to_vec();
        bad[5] = 5;
        assert_eq!(decode(&Bytes::from(bad)), Err(FrameError::Family(5)));
        let cut = good.slice(..good.len() - 3);
        assert!(matches!(decode(&cut), Err(FrameError::Truncated { .. })));
    }

    fn any_scheme() -> impl Strategy<Value = Scheme> {
        prop_oneof![Just(Scheme::Quic), Just(Scheme::Tcp), Just(Scheme::Mem)]
    }

    fn any_channel() -> impl Strategy<Value = Channel> {
        prop_oneof![Just(Channel::Gossip), Just(Channel::Peer)]
    }

    proptest! {
        #[test]
        fn encode_decode_round_trips(
            scheme in any_scheme(),
            channel in any_channel(),
            addr in any::<SocketAddr>(),
            payload in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            let from = PeerAddr { scheme, addr };
            let frame = decode(&encode(channel, &from, &payload)).expect("round trip");
            prop_assert_eq!(frame.channel, channel);
            // IPv6 flow info and scope ids are not carried: members advertise routable addresses.
            prop_assert_eq!(frame.from.scheme, scheme);
            prop_assert_eq!(frame.from.addr.ip(), addr.ip());
            prop_assert_eq!(frame.from.addr.port(), addr.port());
            prop_assert_eq!(&frame.payload[..], &payload[..]);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&Bytes::from(bytes));
        }

        #[test]
        fn corrupted_headers_never_panic(
            addr in any::<SocketAddr>(),
            at in 0usize..22,
            value in any::<u8>(),
            cut in 0usize..24,
        ) {
            let from = PeerAddr { scheme: Scheme::Quic, addr };
            let mut bytes = encode(Channel::Gossip, &from, b"payload").to_vec();
            if let Some(b) = bytes.get_mut(at) { *b = value; }
            bytes.truncate(cut.max(1));
            let _ = decode(&Bytes::from(bytes));
        }
    }
}
