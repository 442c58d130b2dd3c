//! Feeds arbitrary bytes to the frame decoder the way a server reads a connection, and every
//! frame it returns to the payload decoders and to `validate`.
//!
//! Input: one mode byte, then the stream. The mode's low six bits are the size of the pieces the
//! stream arrives in (0: all at once). With bit 0x40 set, the stream is written as records
//! `[kind u8][payload length u16 LE][payload]`, each wrapped in a valid header, so mutations reach
//! the payloads without having to keep a length field right.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;
use wire::limits::{BATCH_EVENTS_DEFAULT, FRAME_PAYLOAD_BYTES_DEFAULT, HEADER_BYTES};
use wire::{ErrorCode, Frame, Kind, MAGIC, Message, PROTOCOL_VERSION, WireCodec};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let stream = if mode & 0x40 != 0 { frame_records(rest) } else { rest.to_vec() };
    let piece_len = match usize::from(mode & 0x3f) {
        0 => stream.len().max(1),
        len => len,
    };
    let mut connection = Connection::new();
    let mut buffer = BytesMut::new();
    for piece in stream.chunks(piece_len) {
        buffer.extend_from_slice(piece);
        if !connection.read_frames(&mut buffer) {
            return;
        }
    }
    match connection.codec.decode_eof(&mut buffer) {
        Ok(Some(frame)) => panic!("a whole frame was left in the buffer: {frame:?}"),
        Ok(None) => assert!(buffer.is_empty()),
        Err(error) => assert_eq!(error.code(), ErrorCode::BadFrame, "{error}"),
    }
});

/// The server side of one connection: handshake limits until the first frame, then the defaults.
struct Connection {
    codec: WireCodec,
    handshake_done: bool,
}

impl Connection {
    fn new() -> Connection {
        Connection { codec: WireCodec::new(), handshake_done: false }
    }

    /// Decodes every whole frame in `buffer`; false once the stream is refused.
    fn read_frames(&mut self, buffer: &mut BytesMut) -> bool {
        loop {
            match self.codec.decode(buffer) {
                Ok(Some(frame)) => self.handle(&frame),
                Ok(None) => return true,
                Err(error) => {
                    let _ = error.code();
                    return false;
                }
            }
        }
    }

    fn handle(&mut self, frame: &Frame) {
        let limit = self.codec.receive_payload_bytes_max() as usize;
        assert!(frame.payload.len() <= limit, "payload of {} bytes over {limit}", frame.payload.len());
        let owned = frame.message();
        if let Ok(message) = &owned {
            let _ = message.check_limits(BATCH_EVENTS_DEFAULT);
        }
        if frame.kind == Kind::Events {
            check_events(frame, &owned);
        }
        if !self.handshake_done {
            self.handshake_done = true;
            self.codec.set_limits(FRAME_PAYLOAD_BYTES_DEFAULT, FRAME_PAYLOAD_BYTES_DEFAULT);
        }
    }
}

/// The zero-copy path and the owned path agree on every payload and every event.
fn check_events(frame: &Frame, owned: &Result<Message, wire::WireError>) {
    match wire::access_events(&frame.payload, u32::MAX) {
        Ok(batch) => {
            let Ok(Message::Events(owned)) = owned else {
                panic!("access_events accepted what Message::decode refused: {owned:?}")
            };
            assert_eq!(batch.events.len(), owned.events.len());
            for (archived, owned) in batch.events.iter().zip(&owned.events) {
                assert_eq!(wire::validate(archived), wire::validate(owned));
            }
            let _ = wire::access_events(&frame.payload, BATCH_EVENTS_DEFAULT);
        }
        Err(error) => {
            assert_eq!(error.code(), ErrorCode::BadFrame, "{error}");
            assert!(owned.is_err(), "Message::decode accepted what access_events refused");
        }
    }
}

/// `[kind][len u16 LE][payload]` records to frames with valid headers.
fn frame_records(mut records: &[u8]) -> Vec<u8> {
    let mut stream = Vec::with_capacity(records.len() + HEADER_BYTES);
    while let [kind, len_low, len_high, rest @ ..] = records {
        let len = usize::from(u16::from_le_bytes([*len_low, *len_high])).min(rest.len());
        let (payload, tail) = rest.split_at(len);
        stream.extend_from_slice(&MAGIC);
        stream.extend_from_slice(&[PROTOCOL_VERSION, kind % 10, 0, 0, 0, 0]);
        stream.extend_from_slice(&(len as u32).to_le_bytes());
        stream.extend_from_slice(payload);
        records = tail;
    }
    stream
}
