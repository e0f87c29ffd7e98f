//! The wire format of the peer transport: frames and the handshake.
//!
//! Pure encoding and decoding, no I/O, so every malformed input can be tested
//! without a socket. A frame is a 16-byte header followed by its payload; every
//! integer is big-endian:
//!
//! ```text
//! offset size field
//!      0    4 magic            b"PXWF"
//!      4    2 protocol version PROTOCOL_VERSION
//!      6    2 kind             1 = hello, 2 = message
//!      8    4 payload length   bytes that follow the header, <= frame_bytes_max
//!     12    4 checksum         CRC-32C of header bytes 0..12, then the payload
//!     16    N payload
//! ```
//!
//! The decoder checks magic, version, kind and the length limit as soon as the
//! header is in, before it reserves room for the payload: a peer that claims a
//! 4 GiB frame is refused without the process allocating it. The checksum
//! covers the header too, so a flipped kind or length bit is caught as well.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// First four bytes of every frame: catches a peer that speaks another protocol.
pub const MAGIC: [u8; 4] = *b"PXWF";
/// The protocol version this build speaks. A peer with another version is refused.
pub const PROTOCOL_VERSION: u16 = 1;
/// Size of the fixed frame header.
pub const HEADER_BYTES: usize = 16;
/// Payload size of a hello frame: cluster id and node id, 8 bytes each.
pub const HELLO_BYTES: usize = 16;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// The handshake: first frame in each direction of a connection.
    Hello,
    /// An opaque payload for the layer above (an encoded Paxos message).
    Message,
}

impl FrameKind {
    fn to_wire(self) -> u16 {
        match self {
            FrameKind::Hello => 1,
            FrameKind::Message => 2,
        }
    }

    fn from_wire(kind: u16) -> Option<FrameKind> {
        match kind {
            1 => Some(FrameKind::Hello),
            2 => Some(FrameKind::Message),
            _ => None,
        }
    }
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Bytes,
}

/// Why a byte stream is not a valid frame sequence. Each of these closes the
/// connection it came from; none is a programmer error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    BadMagic {
        found: [u8; 4],
    },
    UnsupportedVersion {
        found: u16,
    },
    UnknownKind {
        found: u16,
    },
    TooLarge {
        length_bytes: u64,
        frame_bytes_max: u32,
    },
    BadChecksum {
        expected: u32,
        computed: u32,
    },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::BadMagic { found } => write!(f, "bad magic {found:02x?}"),
            FrameError::UnsupportedVersion { found } => {
                write!(
                    f,
                    "protocol version {found}, this node speaks {PROTOCOL_VERSION}"
                )
            }
            FrameError::UnknownKind { found } => write!(f, "unknown frame kind {found}"),
            FrameError::TooLarge {
                length_bytes,
                frame_bytes_max,
            } => {
                write!(
                    f,
                    "frame of {length_bytes} bytes exceeds frame_bytes_max {frame_bytes_max}"
                )
            }
            FrameError::BadChecksum { expected, computed } => {
                write!(f, "checksum mismatch: frame says {expected:#010x}, payload gives {computed:#010x}")
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// Appends one frame to `out`. `version` is a parameter only so tests can build
/// frames of another version; the transport always passes `PROTOCOL_VERSION`.
///
/// Panics if the payload does not fit the 32-bit length field: the caller checks
/// `frame_bytes_max` (which is a `u32`) before it queues a payload.
pub fn encode_frame(out: &mut BytesMut, version: u16, kind: FrameKind, payload: &[u8]) {
    let length =
        u32::try_from(payload.len()).expect("payload length checked against frame_bytes_max");
    out.reserve(HEADER_BYTES + payload.len());
    let header_start = out.len();
    out.put_slice(&MAGIC);
    out.put_u16(version);
    out.put_u16(kind.to_wire());
    out.put_u32(length);
    let checksum = checksum(&out[header_start..header_start + 12], payload);
    out.put_u32(checksum);
    out.put_slice(payload);
    debug_assert_eq!(out.len() - header_start, HEADER_BYTES + payload.len());
}

fn checksum(header: &[u8], payload: &[u8]) -> u32 {
    debug_assert_eq!(header.len(), 12);
    crc32c::crc32c_append(crc32c::crc32c(header), payload)
}

/// Splits frames off the front of a read buffer, checking each.
#[derive(Clone, Copy, Debug)]
pub struct FrameDecoder {
    frame_bytes_max: u32,
}

impl FrameDecoder {
    pub fn new(frame_bytes_max: u32) -> FrameDecoder {
        FrameDecoder { frame_bytes_max }
    }

    /// Returns the next complete frame and removes it from `buffer`, `Ok(None)`
    /// if more bytes are needed, or the first problem found. When the header is
    /// valid but the payload incomplete, reserves exactly the missing room so the
    /// next read can fill it; it never reserves before the limit check.
    pub fn decode(&self, buffer: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if buffer.len() < HEADER_BYTES {
            // Check the magic early: a peer speaking HTTP is refused on its first bytes.
            let seen = buffer.len().min(MAGIC.len());
            if buffer[..seen] != MAGIC[..seen] {
                let mut found = [0u8; 4];
                found[..seen].copy_from_slice(&buffer[..seen]);
                return Err(FrameError::BadMagic { found });
            }
            return Ok(None);
        }
        let header = &buffer[..HEADER_BYTES];
        let magic: [u8; 4] = header[0..4].try_into().expect("slice of 4");
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let version = u16::from_be_bytes([header[4], header[5]]);
        if version != PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion { found: version });
        }
        let kind_wire = u16::from_be_bytes([header[6], header[7]]);
        let Some(kind) = FrameKind::from_wire(kind_wire) else {
            return Err(FrameError::UnknownKind { found: kind_wire });
        };
        let length = u32::from_be_bytes(header[8..12].try_into().expect("slice of 4"));
        if length > self.frame_bytes_max {
            return Err(FrameError::TooLarge {
                length_bytes: u64::from(length),
                frame_bytes_max: self.frame_bytes_max,
            });
        }
        let expected = u32::from_be_bytes(header[12..16].try_into().expect("slice of 4"));
        let frame_bytes = HEADER_BYTES + length as usize;
        if buffer.len() < frame_bytes {
            buffer.reserve(frame_bytes - buffer.len());
            return Ok(None);
        }
        let computed = checksum(&buffer[..12], &buffer[HEADER_BYTES..frame_bytes]);
        if computed != expected {
            return Err(FrameError::BadChecksum { expected, computed });
        }
        buffer.advance(HEADER_BYTES);
        let payload = buffer.split_to(length as usize).freeze();
        Ok(Some(Frame { kind, payload }))
    }
}

/// The handshake payload. The connecting side sends its hello first; the
/// accepting side checks it and answers with its own, which the connecting side
/// checks in turn (so an address that points at the wrong node is noticed). The
/// protocol version travels in the frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub cluster_id: u64,
    pub node_id: u64,
}

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut bytes = [0u8; HELLO_BYTES];
        bytes[0..8].copy_from_slice(&self.cluster_id.to_be_bytes());
        bytes[8..16].copy_from_slice(&self.node_id.to_be_bytes());
        bytes
    }

    /// `None` when the payload has the wrong size.
    pub fn decode(payload: &[u8]) -> Option<Hello> {
        if payload.len() != HELLO_BYTES {
            return None;
        }
        let cluster_id = u64::from_be_bytes(payload[0..8].try_into().expect("slice of 8"));
        let node_id = u64::from_be_bytes(payload[8..16].try_into().expect("slice of 8"));
        Some(Hello {
            cluster_id,
            node_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: u32 = 1024;

    fn frame_bytes(kind: FrameKind, payload: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        encode_frame(&mut out, PROTOCOL_VERSION, kind, payload);
        out
    }

    fn decode_all(mut buffer: BytesMut) -> Result<Vec<Frame>, FrameError> {
        let decoder = FrameDecoder::new(LIMIT);
        let mut frames = Vec::new();
        while let Some(frame) = decoder.decode(&mut buffer)? {
            frames.push(frame);
        }
        assert!(buffer.is_empty(), "left over: {buffer:?}");
        Ok(frames)
    }

    #[test]
    fn frames_round_trip_back_to_back() {
        let mut stream = frame_bytes(
            FrameKind::Hello,
            &Hello {
                cluster_id: 7,
                node_id: 3,
            }
            .encode(),
        );
        stream.extend_from_slice(&frame_bytes(FrameKind::Message, b"first"));
        stream.extend_from_slice(&frame_bytes(FrameKind::Message, b""));
        stream.extend_from_slice(&frame_bytes(FrameKind::Message, &[0xab; LIMIT as usize]));
        let frames = decode_all(stream).unwrap();
        assert_eq!(frames.len(), 4);
        assert_eq!(frames[0].kind, FrameKind::Hello);
        assert_eq!(
            Hello::decode(&frames[0].payload),
            Some(Hello {
                cluster_id: 7,
                node_id: 3
            })
        );
        assert_eq!(
            frames[1],
            Frame {
                kind: FrameKind::Message,
                payload: Bytes::from_static(b"first")
            }
        );
        assert_eq!(frames[2].payload.len(), 0);
        assert_eq!(frames[3].payload, Bytes::from(vec![0xab; LIMIT as usize]));
    }

    #[test]
    fn header_layout_is_as_documented() {
        let bytes = frame_bytes(FrameKind::Message, b"xyz");
        assert_eq!(&bytes[0..4], b"PXWF");
        assert_eq!(&bytes[4..6], &PROTOCOL_VERSION.to_be_bytes());
        assert_eq!(&bytes[6..8], &2u16.to_be_bytes());
        assert_eq!(&bytes[8..12], &3u32.to_be_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[0..12]), b"xyz");
        assert_eq!(&bytes[12..16], &crc.to_be_bytes());
        assert_eq!(&bytes[16..], b"xyz");
    }

    #[test]
    fn every_prefix_of_a_frame_asks_for_more() {
        let whole = frame_bytes(FrameKind::Message, b"hello world");
        let decoder = FrameDecoder::new(LIMIT);
        for cut in 0..whole.len() {
            let mut partial = BytesMut::from(&whole[..cut]);
            assert_eq!(
                decoder.decode(&mut partial),
                Ok(None),
                "prefix of {cut} bytes"
            );
            assert_eq!(partial.len(), cut, "a partial frame is not consumed");
        }
    }

    #[test]
    fn bad_magic_is_refused_on_the_first_bytes() {
        let decoder = FrameDecoder::new(LIMIT);
        let mut http = BytesMut::from(&b"GE"[..]);
        assert_eq!(
            decoder.decode(&mut http),
            Err(FrameError::BadMagic { found: *b"GE\0\0" })
        );
        let mut http = BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]);
        assert_eq!(
            decoder.decode(&mut http),
            Err(FrameError::BadMagic { found: *b"GET " })
        );
    }

    #[test]
    fn other_version_is_refused() {
        let mut out = BytesMut::new();
        encode_frame(&mut out, PROTOCOL_VERSION + 1, FrameKind::Message, b"x");
        assert_eq!(
            decode_all(out),
            Err(FrameError::UnsupportedVersion {
                found: PROTOCOL_VERSION + 1
            })
        );
    }

    #[test]
    fn unknown_kind_is_refused() {
        let mut bytes = frame_bytes(FrameKind::Message, b"x");
        bytes[6..8].copy_from_slice(&9u16.to_be_bytes());
        assert_eq!(decode_all(bytes), Err(FrameError::UnknownKind { found: 9 }));
    }

    #[test]
    fn flipped_bits_fail_the_checksum() {
        let clean = frame_bytes(FrameKind::Message, b"payload");
        // A flipped payload byte, and a flipped length byte that still fits the limit.
        for (offset, flip) in [(HEADER_BYTES + 2, 0x01u8), (11, 0x02)] {
            let mut bytes = clean.clone();
            bytes[offset] ^= flip;
            bytes.extend_from_slice(&[0u8; 8]); // room for the longer claimed length
            let decoder = FrameDecoder::new(LIMIT);
            let result = decoder.decode(&mut bytes);
            assert!(
                matches!(result, Err(FrameError::BadChecksum { .. })),
                "offset {offset}: {result:?}"
            );
        }
    }

    #[test]
    fn oversized_length_is_refused_before_any_allocation() {
        let mut bytes = BytesMut::with_capacity(HEADER_BYTES);
        bytes.put_slice(&MAGIC);
        bytes.put_u16(PROTOCOL_VERSION);
        bytes.put_u16(2);
        bytes.put_u32(u32::MAX);
        bytes.put_u32(0);
        let decoder = FrameDecoder::new(LIMIT);
        assert_eq!(
            decoder.decode(&mut bytes),
            Err(FrameError::TooLarge {
                length_bytes: u64::from(u32::MAX),
                frame_bytes_max: LIMIT
            })
        );
        assert!(
            bytes.capacity() < 1024,
            "reserved {} bytes for a refused frame",
            bytes.capacity()
        );
    }

    #[test]
    fn limit_is_inclusive() {
        let decoder = FrameDecoder::new(4);
        let mut fits = frame_bytes(FrameKind::Message, b"abcd");
        assert!(decoder.decode(&mut fits).unwrap().is_some());
        let mut over = frame_bytes(FrameKind::Message, b"abcde");
        assert_eq!(
            decoder.decode(&mut over),
            Err(FrameError::TooLarge {
                length_bytes: 5,
                frame_bytes_max: 4
            })
        );
    }

    #[test]
    fn hello_of_wrong_size_is_refused() {
        assert_eq!(Hello::decode(&[0u8; HELLO_BYTES - 1]), None);
        assert_eq!(Hello::decode(&[0u8; HELLO_BYTES + 1]), None);
        assert_eq!(
            Hello::decode(&[0u8; HELLO_BYTES]),
            Some(Hello {
                cluster_id: 0,
                node_id: 0
            })
        );
    }
}
