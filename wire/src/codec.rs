//! Frames: a fixed header and a payload, as a tokio-util `Decoder` and `Encoder`.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::{Kind, Message, WireError, limits::*};

/// The most the decoder allocates ahead of bytes received.
const RESERVE_AHEAD_BYTES: usize = 64 * 1024;

/// The two bytes every frame starts with: `TL`.
pub const MAGIC: [u8; 2] = *b"TL";

/// A whole frame, validated up to its payload (which is checked when it is accessed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Bytes,
}

impl Frame {
    /// Decodes the payload into an owned message.
    pub fn message(&self) -> Result<Message, WireError> {
        Message::decode(self.kind, &self.payload)
    }
}

/// The bytes of a frame encoded earlier, header included; sent again as they are (resends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedFrame(pub Bytes);

impl EncodedFrame {
    /// Encodes a message once, to be written any number of times.
    pub fn encode(message: &Message, max_payload_bytes: u32) -> Result<EncodedFrame, WireError> {
        let mut buffer = BytesMut::new();
        encode_message(message, max_payload_bytes, &mut buffer)?;
        Ok(EncodedFrame(buffer.freeze()))
    }
}

/// Frame codec. Decoding refuses, before allocating, any payload longer than the current limit;
/// the limit starts at [`HANDSHAKE_PAYLOAD_BYTES_MAX`] and is raised by [`WireCodec::set_limits`]
/// once the handshake is done.
#[derive(Debug, Clone)]
pub struct WireCodec {
    /// Largest payload this side accepts.
    receive_payload_bytes_max: u32,
    /// Largest payload the peer accepts.
    send_payload_bytes_max: u32,
}

impl Default for WireCodec {
    fn default() -> Self {
        WireCodec::new()
    }
}

impl WireCodec {
    /// A codec in the handshake state.
    pub fn new() -> WireCodec {
        WireCodec {
            receive_payload_bytes_max: HANDSHAKE_PAYLOAD_BYTES_MAX,
            send_payload_bytes_max: HANDSHAKE_PAYLOAD_BYTES_MAX,
        }
    }

    /// Applies the negotiated payload limits (capped at the protocol's ceiling).
    pub fn set_limits(&mut self, receive_payload_bytes_max: u32, send_payload_bytes_max: u32) {
        self.receive_payload_bytes_max = receive_payload_bytes_max.min(FRAME_PAYLOAD_BYTES_CEILING);
        self.send_payload_bytes_max = send_payload_bytes_max.min(FRAME_PAYLOAD_BYTES_CEILING);
    }

    pub fn receive_payload_bytes_max(&self) -> u32 {
        self.receive_payload_bytes_max
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub payload_len: u32,
}

/// Parses and checks the first [`HEADER_BYTES`] of a frame.
pub fn parse_header(bytes: &[u8; HEADER_BYTES], payload_bytes_max: u32) -> Result<Header, WireError> {
    let magic = [bytes[0], bytes[1]];
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    if bytes[2] != PROTOCOL_VERSION {
        return Err(WireError::UnsupportedVersion(bytes[2]));
    }
    let kind = Kind::from_u8(bytes[3]).ok_or(WireError::UnknownKind(bytes[3]))?;
    let (flags, reserved) = (bytes[4], [bytes[5], bytes[6], bytes[7]]);
    if flags != 0 || reserved != [0; 3] {
        return Err(WireError::ReservedBits { flags, reserved });
    }
    let payload_len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if payload_len > payload_bytes_max {
        return Err(WireError::FrameTooLarge { len: payload_len, max: payload_bytes_max });
    }
    Ok(Header { kind, payload_len })
}

impl Decoder for WireCodec {
    type Item = Frame;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        let Some(header_bytes) = src.first_chunk::<HEADER_BYTES>() else {
            return Ok(None);
        };
        let header = parse_header(header_bytes, self.receive_payload_bytes_max)?;
        let frame_len = HEADER_BYTES + header.payload_len as usize;
        if src.len() < frame_len {
            // Grow by at most 64 KiB ahead of the bytes that actually arrived, so a header alone
            // cannot pin a whole frame's worth of memory; the length was checked above.
            src.reserve((frame_len - src.len()).min(RESERVE_AHEAD_BYTES));
            return Ok(None);
        }
        src.advance(HEADER_BYTES);
        let payload = src.split_to(header.payload_len as usize).freeze();
        Ok(Some(Frame { kind: header.kind, payload }))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(WireError::Truncated { buffered: src.len() }),
        }
    }
}

impl Encoder<&Message> for WireCodec {
    type Error = WireError;

    fn encode(&mut self, message: &Message, dst: &mut BytesMut) -> Result<(), WireError> {
        encode_message(message, self.send_payload_bytes_max, dst)
    }
}

impl Encoder<Message> for WireCodec {
    type Error = WireError;

    fn encode(&mut self, message: Message, dst: &mut BytesMut) -> Result<(), WireError> {
        encode_message(&message, self.send_payload_bytes_max, dst)
    }
}

impl Encoder<EncodedFrame> for WireCodec {
    type Error = WireError;

    fn encode(&mut self, frame: EncodedFrame, dst: &mut BytesMut) -> Result<(), WireError> {
        dst.extend_from_slice(&frame.0);
        Ok(())
    }
}

/// Appends one frame to `dst`: the payload is serialized straight into the buffer, then the
/// header's length is filled in. On error `dst` is left as it was.
pub fn encode_message(
    message: &Message,
    payload_bytes_max: u32,
    dst: &mut BytesMut,
) -> Result<(), WireError> {
    let start = dst.len();
    dst.put_slice(&MAGIC);
    dst.put_u8(PROTOCOL_VERSION);
    dst.put_u8(message.kind() as u8);
    dst.put_slice(&[0; 4]);
    dst.put_u32_le(0);
    let payload_start = dst.len();
    let result = {
        let writer = FrameWriter { buffer: dst, start: payload_start };
        match message {
            Message::Hello(m) => serialize(m, writer),
            Message::Welcome(m) => serialize(m, writer),
            Message::Events(m) => serialize(m, writer),
            Message::Ack(m) => serialize(m, writer),
            Message::Error(m) => serialize(m, writer),
            Message::Busy(m) => serialize(m, writer),
            Message::Ping(m) => serialize(m, writer),
            Message::Pong(m) => serialize(m, writer),
            Message::Goodbye(m) => serialize(m, writer),
        }
    };
    let payload_len = dst.len() - payload_start;
    let outcome = match result {
        Err(error) => Err(WireError::Encode { kind: message.kind().as_str(), detail: error.to_string() }),
        Ok(()) if payload_len > payload_bytes_max as usize => {
            let len = u32::try_from(payload_len).unwrap_or(u32::MAX);
            Err(WireError::FrameTooLarge { len, max: payload_bytes_max })
        }
        Ok(()) => Ok(()),
    };
    match outcome {
        Ok(()) => {
            dst[payload_start - 4..payload_start].copy_from_slice(&(payload_len as u32).to_le_bytes());
            Ok(())
        }
        Err(error) => {
            dst.truncate(start);
            Err(error)
        }
    }
}

/// rkyv writer that appends to a `BytesMut`; positions count from the payload's start.
struct FrameWriter<'a> {
    buffer: &'a mut BytesMut,
    start: usize,
}

impl rkyv::ser::Positional for FrameWriter<'_> {
    fn pos(&self) -> usize {
        self.buffer.len() - self.start
    }
}

impl<E> rkyv::ser::Writer<E> for FrameWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), E> {
        self.buffer.extend_from_slice(bytes);
        Ok(())
    }
}

fn serialize<T>(value: &T, writer: FrameWriter<'_>) -> Result<(), rancor::Error>
where
    T: for<'a, 'b> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                FrameWriter<'b>,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rancor::Error,
            >,
        >,
{
    rkyv::api::high::to_bytes_in::<_, rancor::Error>(value, writer).map(|_| ())
}
