//! The peer protocol's envelope: how a request or a response is laid out in one
//! [`Channel::Peer`](crate::net::Channel::Peer) frame. Pure: no I/O, no tokio.
//!
//! Every envelope is a MessagePack map written with `rmp_serde::to_vec_named` (field names on
//! the wire, so fields can be added without breaking older readers):
//!
//! ```text
//! { "v": u16, "id": u64, "t": "req",  "deadline_ms": u32, "body": <request body> }
//! { "v": u16, "id": u64, "t": "resp", "body": {"Ok": <response body>} | {"Err": PeerError} }
//! ```
//!
//! `v` is the protocol version: the high byte is the major version, the low byte the minor.
//! Peers with the same major version understand each other (a newer minor only adds optional
//! fields); a request from another major version is answered with
//! [`PeerErrorKind::Unsupported`]. The header (`v`, `id`, `t`) and the error response's shape
//! stay the same across major versions, so that refusal can always be read.
//!
//! Decoding reads the header first, so a frame whose body does not decode still yields the
//! request id to answer with [`PeerErrorKind::BadRequest`].
//!
//! This module must never panic on input, never encode a message over the frame limit, and
//! never read past (or allocate in proportion to anything but) the frame it is given.

use std::fmt;
use std::io;

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks: major 1, minor 3.
///
/// Minor 1 lets a result or a replica carry small output files inline (`WireOutput::data`)
/// instead of in `PutOutput` chunks; members send that only to peers known to speak it.
/// Minor 2 adds the `find_key` request; a member before it answers `bad_request`, which the
/// asker takes as "key not known here". Minor 3 adds `find_keys` (several lookups in one
/// message, each answered unknown, the same job, a conflict, or in progress), sent only to
/// peers known to speak it.
pub const PROTOCOL_VERSION: u16 = 0x0103;

/// The major part of a protocol version.
pub fn major(version: u16) -> u8 {
    version.to_be_bytes()[0]
}

/// The minor part of a protocol version.
pub fn minor(version: u16) -> u8 {
    version.to_be_bytes()[1]
}

/// Whether a peer that speaks `version` understands what this build's major version added in
/// minor `since`.
pub fn speaks(version: u16, since: u8) -> bool {
    major(version) == major(PROTOCOL_VERSION) && minor(version) >= since
}

/// `major.minor`, for messages.
pub fn version_string(version: u16) -> String {
    format!("{}.{}", major(version), minor(version))
}

/// A request to a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<T> {
    /// Unique per sending process; the response carries it back.
    pub id: u64,
    /// How long the caller still waits for the answer, in milliseconds, as of sending.
    pub deadline_ms: u32,
    pub body: T,
}

/// The answer to a [`Request`] with the same `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response<T> {
    pub id: u64,
    pub body: Result<T, PeerError>,
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Envelope<Req, Resp> {
    Request(Request<Req>),
    Response(Response<Resp>),
}

/// What went wrong at the peer, machine-readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerErrorKind {
    /// The request did not decode or made no sense.
    BadRequest,
    /// The peer does not speak this protocol version or does not know this request.
    Unsupported,
    /// The peer refused the request for lack of capacity; trying another peer or later helps.
    Overloaded,
    /// The peer could not answer within the request's deadline.
    DeadlineExceeded,
    /// The peer failed while handling the request.
    Internal,
    /// The thing the request names does not exist at the peer.
    NotFound,
    /// A kind this build does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

impl fmt::Display for PeerErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeerErrorKind::BadRequest => "bad_request",
            PeerErrorKind::Unsupported => "unsupported",
            PeerErrorKind::Overloaded => "overloaded",
            PeerErrorKind::DeadlineExceeded => "deadline_exceeded",
            PeerErrorKind::Internal => "internal",
            PeerErrorKind::NotFound => "not_found",
            PeerErrorKind::Unknown => "unknown",
        })
    }
}

/// An error answer from a peer: a machine-readable kind and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct PeerError {
    pub kind: PeerErrorKind,
    pub message: String,
}

impl PeerError {
    pub fn new(kind: PeerErrorKind, message: impl Into<String>) -> PeerError {
        PeerError {
            kind,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> PeerError {
        PeerError::new(PeerErrorKind::BadRequest, message)
    }

    pub fn unsupported(message: impl Into<String>) -> PeerError {
        PeerError::new(PeerErrorKind::Unsupported, message)
    }

    pub fn overloaded(message: impl Into<String>) -> PeerError {
        PeerError::new(PeerErrorKind::Overloaded, message)
    }

    pub fn deadline_exceeded(message: impl Into<String>) -> PeerError {
        PeerError::new(PeerErrorKind::DeadlineExceeded, message)
    }

    pub fn internal(message: impl Into<String>) -> PeerError {
        PeerError::new(PeerErrorKind::Internal, message)
    }

    pub fn not_found(message: impl Into<String>) -> PeerError {
        PeerError::new(PeerErrorKind::NotFound, message)
    }
}

/// Whether an envelope is a request or a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    #[serde(rename = "req")]
    Request,
    #[serde(rename = "resp")]
    Response,
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The encoded message (or the frame handed to decode) is over the limit.
    #[error("message of at least {len} bytes exceeds max_frame_bytes = {max}")]
    TooLarge { len: usize, max: usize },
    /// The message could not be encoded (a body type that MessagePack cannot represent).
    #[error("cannot encode the message: {0}")]
    Encode(String),
    /// Not even the header decodes: there is nobody to answer.
    #[error("malformed peer frame: {0}")]
    Malformed(String),
    /// The header decodes but names another major protocol version.
    #[error("{kind:?} {id} uses protocol version {}, this node speaks {}", version_string(*.version), version_string(PROTOCOL_VERSION))]
    Version { kind: Kind, id: u64, version: u16 },
    /// The header decodes but the rest does not.
    #[error("{kind:?} {id} does not decode: {reason}")]
    Body { kind: Kind, id: u64, reason: String },
}

#[derive(Serialize)]
struct RequestOut<'a, T> {
    v: u16,
    id: u64,
    t: Kind,
    deadline_ms: u32,
    body: &'a T,
}

#[derive(Serialize)]
struct ResponseOut<'a, T> {
    v: u16,
    id: u64,
    t: Kind,
    body: Result<&'a T, &'a PeerError>,
}

#[derive(Deserialize)]
struct Head {
    v: u16,
    id: u64,
    t: Kind,
}

#[derive(Deserialize)]
struct RequestIn<T> {
    deadline_ms: u32,
    body: T,
}

#[derive(Deserialize)]
struct ResponseIn<T> {
    body: Result<T, PeerError>,
}

/// An `io::Write` that refuses to grow past `max` bytes, so an oversized message fails while
/// encoding instead of after allocating all of it.
struct Bounded {
    buf: Vec<u8>,
    max: usize,
    overflowed: bool,
}

impl io::Write for Bounded {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > self.max {
            self.overflowed = true;
            return Err(io::Error::other("over max_frame_bytes"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn encode_bounded<T: Serialize>(value: &T, max: usize) -> Result<Vec<u8>, WireError> {
    let mut out = Bounded {
        buf: Vec::with_capacity(max.min(512)),
        max,
        overflowed: false,
    };
    match rmp_serde::encode::write_named(&mut out, value) {
        Ok(()) => Ok(out.buf),
        Err(_) if out.overflowed => Err(WireError::TooLarge { len: max + 1, max }),
        Err(error) => Err(WireError::Encode(error.to_string())),
    }
}

/// Encodes a request; refuses one over `max_frame_bytes`.
pub fn encode_request<T: Serialize>(
    request: &Request<T>,
    max_frame_bytes: usize,
) -> Result<Vec<u8>, WireError> {
    encode_bounded(
        &RequestOut {
            v: PROTOCOL_VERSION,
            id: request.id,
            t: Kind::Request,
            deadline_ms: request.deadline_ms,
            body: &request.body,
        },
        max_frame_bytes,
    )
}

/// Encodes a response; refuses one over `max_frame_bytes`.
pub fn encode_response<T: Serialize>(
    response: &Response<T>,
    max_frame_bytes: usize,
) -> Result<Vec<u8>, WireError> {
    encode_bounded(
        &ResponseOut {
            v: PROTOCOL_VERSION,
            id: response.id,
            t: Kind::Response,
            body: response.body.as_ref(),
        },
        max_frame_bytes,
    )
}

/// Encodes an error response, which has the same shape in every protocol version. Error
/// messages are cut so that the answer always fits in a frame of at least 1 KiB.
pub fn encode_error(
    id: u64,
    error: &PeerError,
    max_frame_bytes: usize,
) -> Result<Vec<u8>, WireError> {
    const MAX_MESSAGE: usize = 512;
    let mut error = error.clone();
    if error.message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !error.message.is_char_boundary(cut) {
            cut -= 1;
        }
        error.message.truncate(cut);
    }
    encode_response::<()>(
        &Response {
            id,
            body: Err(error),
        },
        max_frame_bytes,
    )
}

fn decoder(bytes: &[u8]) -> rmp_serde::Deserializer<rmp_serde::decode::ReadRefReader<'_, [u8]>> {
    rmp_serde::Deserializer::from_read_ref(bytes)
}

/// Decodes a frame. A frame over `max_frame_bytes` is refused unread.
///
/// Allocation is bounded by the frame: the header is read in a pass that skips the body
/// without allocating (and fails on any length the frame does not hold), so the typed pass
/// only ever sees lengths backed by bytes present.
pub fn decode<Req: DeserializeOwned, Resp: DeserializeOwned>(
    bytes: &[u8],
    max_frame_bytes: usize,
) -> Result<Envelope<Req, Resp>, WireError> {
    decode_versioned(bytes, max_frame_bytes).map(|(_, envelope)| envelope)
}

/// [`decode`], also giving the protocol version the sender speaks.
pub fn decode_versioned<Req: DeserializeOwned, Resp: DeserializeOwned>(
    bytes: &[u8],
    max_frame_bytes: usize,
) -> Result<(u16, Envelope<Req, Resp>), WireError> {
    if bytes.len() > max_frame_bytes {
        return Err(WireError::TooLarge {
            len: bytes.len(),
            max: max_frame_bytes,
        });
    }
    let head =
        Head::deserialize(&mut decoder(bytes)).map_err(|e| WireError::Malformed(e.to_string()))?;
    if major(head.v) != major(PROTOCOL_VERSION) {
        return Err(WireError::Version {
            kind: head.t,
            id: head.id,
            version: head.v,
        });
    }
    let body_error = |e: rmp_serde::decode::Error| WireError::Body {
        kind: head.t,
        id: head.id,
        reason: e.to_string(),
    };
    match head.t {
        Kind::Request => {
            let request = RequestIn::<Req>::deserialize(&mut decoder(bytes)).map_err(body_error)?;
            Ok((
                head.v,
                Envelope::Request(Request {
                    id: head.id,
                    deadline_ms: request.deadline_ms,
                    body: request.body,
                }),
            ))
        }
        Kind::Response => {
            let response =
                ResponseIn::<Resp>::deserialize(&mut decoder(bytes)).map_err(body_error)?;
            Ok((
                head.v,
                Envelope::Response(Response {
                    id: head.id,
                    body: response.body,
                }),
            ))
        }
    }
}

/// Reads the error out of a response in any protocol version, if it carries one (the error
/// shape is the same in every version).
pub fn decode_error_any_version(bytes: &[u8], max_frame_bytes: usize) -> Option<PeerError> {
    if bytes.len() > max_frame_bytes {
        return None;
    }
    ResponseIn::<IgnoredAny>::deserialize(&mut decoder(bytes))
        .ok()
        .and_then(|r| r.body.err())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Msg {
        Ping,
        Echo(String),
        Job {
            account: String,
            priority: u8,
            tags: BTreeMap<String, i64>,
            blob: Vec<u8>,
        },
    }

    const MAX: usize = 128 * 1024;

    fn msg() -> impl Strategy<Value = Msg> {
        prop_oneof![
            Just(Msg::Ping),
            ".{0,64}".prop_map(Msg::Echo),
            (
                ".{0,32}",
                any::<u8>(),
                prop::collection::btree_map(".{0,8}", any::<i64>(), 0..8),
                prop::collection::vec(any::<u8>(), 0..256),
            )
                .prop_map(|(account, priority, tags, blob)| Msg::Job {
                    account,
                    priority,
                    tags,
                    blob
                }),
        ]
    }

    fn kind() -> impl Strategy<Value = PeerErrorKind> {
        prop_oneof![
            Just(PeerErrorKind::BadRequest),
            Just(PeerErrorKind::Unsupported),
            Just(PeerErrorKind::Overloaded),
            Just(PeerErrorKind::DeadlineExceeded),
            Just(PeerErrorKind::Internal),
            Just(PeerErrorKind::NotFound),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(id in any::<u64>(), deadline_ms in any::<u32>(), body in msg()) {
            let request = Request { id, deadline_ms, body };
            let bytes = encode_request(&request, MAX).expect("encodes");
            let decoded = decode::<Msg, Msg>(&bytes, MAX).expect("decodes");
            prop_assert_eq!(decoded, Envelope::Request(request));
        }

        #[test]
        fn responses_round_trip(
            id in any::<u64>(),
            body in msg(),
            error in (kind(), ".{0,64}"),
            ok in any::<bool>(),
        ) {
            let body = if ok { Ok(body) } else { Err(PeerError::new(error.0, error.1)) };
            let response = Response { id, body };
            let bytes = encode_response(&response, MAX).expect("encodes");
            let decoded = decode::<Msg, Msg>(&bytes, MAX).expect("decodes");
            prop_assert_eq!(decoded, Envelope::Response(response));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Msg, Msg>(&bytes, MAX);
            let _ = decode::<Vec<String>, BTreeMap<String, Vec<u64>>>(&bytes, MAX);
            let _ = decode_error_any_version(&bytes, MAX);
        }

        #[test]
        fn mutated_frames_never_panic(
            body in msg(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut bytes = encode_request(&Request { id: 1, deadline_ms: 5, body }, MAX)
                .expect("encodes");
            for (at, value) in flips {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            let _ = decode::<Msg, Msg>(&bytes, MAX);
        }
    }

    #[test]
    fn oversized_messages_are_refused_both_ways() {
        let request = Request {
            id: 1,
            deadline_ms: 1,
            body: Msg::Echo("x".repeat(2000)),
        };
        let err = encode_request(&request, 1000).expect_err("too large");
        assert!(
            matches!(err, WireError::TooLarge { max: 1000, .. }),
            "{err}"
        );
        let bytes = encode_request(&request, MAX).expect("fits the default");
        let err = decode::<Msg, Msg>(&bytes, 1000).expect_err("too large");
        assert!(
            matches!(err, WireError::TooLarge { max: 1000, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_huge_length_prefix_does_not_allocate_it() {
        // A request whose body claims a 4 GiB array but carries nothing.
        let mut bytes = encode_request(
            &Request {
                id: 9,
                deadline_ms: 5,
                body: Vec::<u64>::new(),
            },
            MAX,
        )
        .expect("encodes");
        let last = bytes.len() - 1;
        assert_eq!(bytes[last], 0x90, "an empty fixarray ends the frame");
        bytes.truncate(last);
        bytes.extend_from_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff]);
        // The header is only read with the whole map, so a truncated body is malformed.
        let err = decode::<Vec<u64>, ()>(&bytes, MAX).expect_err("truncated");
        assert!(matches!(err, WireError::Malformed(_)), "{err}");
    }

    #[test]
    fn another_major_version_is_reported_with_its_id() {
        #[derive(Serialize)]
        struct Future<'a> {
            v: u16,
            id: u64,
            t: Kind,
            deadline_ms: u32,
            body: &'a str,
            extra: u8,
        }
        let bytes = rmp_serde::to_vec_named(&Future {
            v: 0x0203,
            id: 42,
            t: Kind::Request,
            deadline_ms: 10,
            body: "hi",
            extra: 1,
        })
        .expect("encodes");
        let err = decode::<String, String>(&bytes, MAX).expect_err("another major");
        assert_eq!(
            err,
            WireError::Version {
                kind: Kind::Request,
                id: 42,
                version: 0x0203
            }
        );
        assert!(err.to_string().contains("2.3"), "{err}");

        // A newer minor version with an added field is understood.
        let bytes = rmp_serde::to_vec_named(&Future {
            v: 0x0105,
            id: 43,
            t: Kind::Request,
            deadline_ms: 10,
            body: "hi",
            extra: 1,
        })
        .expect("encodes");
        let (version, decoded) =
            decode_versioned::<String, String>(&bytes, MAX).expect("same major");
        assert_eq!(version, 0x0105);
        assert_eq!(
            decoded,
            Envelope::Request(Request {
                id: 43,
                deadline_ms: 10,
                body: "hi".to_string()
            })
        );
    }

    #[test]
    fn an_undecodable_body_keeps_the_id() {
        let bytes = encode_request(
            &Request {
                id: 7,
                deadline_ms: 1,
                body: "not a number",
            },
            MAX,
        )
        .expect("encodes");
        let err = decode::<u64, u64>(&bytes, MAX).expect_err("wrong body type");
        assert!(
            matches!(
                err,
                WireError::Body {
                    kind: Kind::Request,
                    id: 7,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn error_responses_read_in_any_version_and_fit() {
        let error = PeerError::internal("é".repeat(5000));
        let bytes = encode_error(3, &error, 2048).expect("cut to fit");
        let read = decode_error_any_version(&bytes, 2048).expect("an error");
        assert_eq!(read.kind, PeerErrorKind::Internal);
        assert!(read.message.len() <= 512);
        let decoded = decode::<u8, Vec<String>>(&bytes, 2048).expect("decodes");
        assert!(matches!(
            decoded,
            Envelope::Response(Response { id: 3, body: Err(e) }) if e.kind == PeerErrorKind::Internal
        ));
    }

    #[test]
    fn an_unknown_error_kind_decodes_as_unknown() {
        #[derive(Serialize)]
        struct E<'a> {
            kind: &'a str,
            message: &'a str,
        }
        let bytes = rmp_serde::to_vec_named(&E {
            kind: "quota_exceeded",
            message: "m",
        })
        .expect("encodes");
        let e: PeerError = rmp_serde::from_slice(&bytes).expect("decodes");
        assert_eq!(e.kind, PeerErrorKind::Unknown);
    }
}
