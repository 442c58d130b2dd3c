//! One test per kind of bad input, each asserting its specific error and the `ErrorCode` it maps
//! to on the wire.

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};
use wire::limits::{
    FRAME_PAYLOAD_BYTES_CEILING, HEADER_BYTES, IDENT_BYTES_MAX, METADATA_ENTRIES_MAX, METADATA_KEY_BYTES_MAX,
    METADATA_VALUE_BYTES_MAX, NAME_BYTES_MAX, TAG_BYTES_MAX, TAGS_MAX, TIMESTAMP_US_MAX, TIMESTAMP_US_MIN,
    USER_ID_BYTES_MAX,
};
use wire::{
    ErrorCode, Event, EventBatch, EventError, HANDSHAKE_PAYLOAD_BYTES_MAX, Hello, Kind, Message, Ping,
    QUANTITIES_MAX, QuantityKind, Status, TEXT_BYTES_MAX, WireCodec, WireError,
};

/// 2026-01-01T00:00:00Z.
const TIMESTAMP_US: i64 = 1_767_225_600_000_000;

fn typical_event() -> Event {
    Event::new("user-000123", "llm_service", "openai", "completion")
        .with_id(uuid::Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001))
        .at(TIMESTAMP_US)
        .with_model("gpt-4o-mini")
        .with_quantity(QuantityKind::InputTokens, 1200.0)
        .with_quantity(QuantityKind::OutputTokens, 350.0)
        .with_latency_ms(812.0)
}

fn open_codec() -> WireCodec {
    let mut codec = WireCodec::new();
    codec.set_limits(FRAME_PAYLOAD_BYTES_CEILING, FRAME_PAYLOAD_BYTES_CEILING);
    codec
}

fn encode(message: &Message) -> BytesMut {
    let mut buffer = BytesMut::new();
    open_codec().encode(message, &mut buffer).expect("encodes");
    buffer
}

fn events_payload(events: Vec<Event>) -> Bytes {
    let mut frame = encode(&Message::Events(EventBatch { sequence: 1, events }));
    let _ = frame.split_to(HEADER_BYTES);
    frame.freeze()
}

/// A header with the given bytes; `payload_len` in little-endian at 8..12.
fn header(
    magic: &[u8; 2],
    version: u8,
    kind: u8,
    flags: u8,
    reserved: [u8; 3],
    payload_len: u32,
) -> BytesMut {
    let mut bytes = BytesMut::new();
    bytes.extend_from_slice(magic);
    bytes.extend_from_slice(&[version, kind, flags]);
    bytes.extend_from_slice(&reserved);
    bytes.extend_from_slice(&payload_len.to_le_bytes());
    bytes
}

fn decode_header_error(mut bytes: BytesMut) -> WireError {
    match WireCodec::new().decode(&mut bytes) {
        Err(error) => error,
        Ok(frame) => panic!("expected an error, decoded {frame:?}"),
    }
}

/// Asserts that the owned event and its archive are both refused for `field`, with the same error.
fn assert_invalid(event: Event, field: &str) -> EventError {
    let owned = wire::validate(&event).expect_err("the owned event is invalid");
    assert_eq!(owned.field, field, "{owned}");
    let payload = events_payload(vec![event]);
    let archived = wire::access_events(&payload, 1).expect("an invalid event is still a valid payload");
    assert_eq!(wire::validate(&archived.events[0]), Err(owned.clone()));
    owned
}

fn assert_valid(event: Event) {
    assert_eq!(wire::validate(&event), Ok(()));
    let payload = events_payload(vec![event]);
    let archived = wire::access_events(&payload, 1).expect("valid payload");
    assert_eq!(wire::validate(&archived.events[0]), Ok(()));
}

// ---------------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------------

#[test]
fn truncated_frame_at_eof_is_truncated() {
    let whole = encode(&Message::Ping(Ping { nonce: 42 }));
    for cut in [1, 5, HEADER_BYTES, whole.len() - 1] {
        let mut bytes = BytesMut::from(&whole[..cut]);
        let mut codec = open_codec();
        assert_eq!(codec.decode(&mut bytes), Ok(None), "an incomplete frame is not an error yet");
        let error = codec.decode_eof(&mut bytes).expect_err("the stream ended mid-frame");
        assert_eq!(error, WireError::Truncated { buffered: cut });
        assert_eq!(error.code(), ErrorCode::BadFrame);
    }
    let mut empty = BytesMut::new();
    assert_eq!(open_codec().decode_eof(&mut empty), Ok(None), "a clean end of stream is not an error");
}

#[test]
fn oversized_length_is_frame_too_large_and_reserves_nothing() {
    let mut bytes = header(b"TL", 1, Kind::Events as u8, 0, [0; 3], HANDSHAKE_PAYLOAD_BYTES_MAX + 1);
    let capacity_before = bytes.capacity();
    let error = WireCodec::new().decode(&mut bytes).expect_err("over the handshake limit");
    assert_eq!(
        error,
        WireError::FrameTooLarge { len: HANDSHAKE_PAYLOAD_BYTES_MAX + 1, max: HANDSHAKE_PAYLOAD_BYTES_MAX }
    );
    assert_eq!(error.code(), ErrorCode::TooLarge);
    assert_eq!(bytes.capacity(), capacity_before, "nothing was reserved for the refused payload");

    // After the handshake the limit is the negotiated one, never above the ceiling.
    let mut codec = WireCodec::new();
    codec.set_limits(u32::MAX, u32::MAX);
    let mut bytes = header(b"TL", 1, Kind::Events as u8, 0, [0; 3], u32::MAX);
    let capacity_before = bytes.capacity();
    let error = codec.decode(&mut bytes).expect_err("over the ceiling");
    assert_eq!(error, WireError::FrameTooLarge { len: u32::MAX, max: FRAME_PAYLOAD_BYTES_CEILING });
    assert_eq!(error.code(), ErrorCode::TooLarge);
    assert_eq!(bytes.capacity(), capacity_before);
}

#[test]
fn length_at_the_limit_waits_and_reserves_at_most_the_frame() {
    let mut bytes = header(b"TL", 1, Kind::Events as u8, 0, [0; 3], HANDSHAKE_PAYLOAD_BYTES_MAX);
    assert_eq!(WireCodec::new().decode(&mut bytes), Ok(None));
    let frame_bytes = HEADER_BYTES + HANDSHAKE_PAYLOAD_BYTES_MAX as usize;
    assert!(bytes.capacity() >= frame_bytes);
    assert!(
        bytes.capacity() <= 2 * frame_bytes,
        "capacity {} for a frame of {frame_bytes}",
        bytes.capacity()
    );
}

#[test]
fn wrong_magic_is_bad_magic() {
    let error = decode_header_error(header(b"XL", 1, Kind::Ping as u8, 0, [0; 3], 8));
    assert_eq!(error, WireError::BadMagic(*b"XL"));
    assert_eq!(error.code(), ErrorCode::BadFrame);
    // HTTP sent to the binary port.
    let error = decode_header_error(BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]));
    assert_eq!(error, WireError::BadMagic(*b"GE"));
}

#[test]
fn wrong_version_is_unsupported_version() {
    for version in [0, 2, 255] {
        let error = decode_header_error(header(b"TL", version, Kind::Ping as u8, 0, [0; 3], 8));
        assert_eq!(error, WireError::UnsupportedVersion(version));
        assert_eq!(error.code(), ErrorCode::UnsupportedVersion);
    }
}

#[test]
fn unknown_kind_is_unknown_kind() {
    for kind in [0, 10, 255] {
        let error = decode_header_error(header(b"TL", 1, kind, 0, [0; 3], 8));
        assert_eq!(error, WireError::UnknownKind(kind));
        assert_eq!(error.code(), ErrorCode::BadFrame);
    }
}

#[test]
fn reserved_bits_are_refused() {
    let error = decode_header_error(header(b"TL", 1, Kind::Ping as u8, 0x80, [0; 3], 8));
    assert_eq!(error, WireError::ReservedBits { flags: 0x80, reserved: [0; 3] });
    assert_eq!(error.code(), ErrorCode::BadFrame);
    let error = decode_header_error(header(b"TL", 1, Kind::Ping as u8, 0, [0, 0, 1], 8));
    assert_eq!(error, WireError::ReservedBits { flags: 0, reserved: [0, 0, 1] });
    assert_eq!(error.code(), ErrorCode::BadFrame);
}

#[test]
fn encode_over_the_limit_is_frame_too_large_and_leaves_the_buffer_as_it_was() {
    let message = Message::Events(EventBatch { sequence: 1, events: vec![typical_event(); 200] });
    let mut buffer = BytesMut::from(&b"earlier frames"[..]);
    let error = wire::encode_message(&message, 1024, &mut buffer).expect_err("over the limit");
    assert!(matches!(error, WireError::FrameTooLarge { max: 1024, .. }), "{error:?}");
    assert_eq!(error.code(), ErrorCode::TooLarge);
    assert_eq!(&buffer[..], b"earlier frames");
}

// ---------------------------------------------------------------------------------------------
// Payloads
// ---------------------------------------------------------------------------------------------

fn assert_invalid_payload(error: WireError, kind: &str) {
    match &error {
        WireError::InvalidPayload { kind: got, detail } => {
            assert_eq!(*got, kind);
            // rancor's `alloc` feature is on, so the detail says what was wrong.
            assert!(!detail.is_empty() && !detail.contains("without error information"), "{detail}");
        }
        other => panic!("expected InvalidPayload, got {other:?}"),
    }
    assert_eq!(error.code(), ErrorCode::BadFrame);
}

#[test]
fn garbage_payload_is_invalid_payload() {
    let mut bytes = header(b"TL", 1, Kind::Events as u8, 0, [0; 3], 40);
    bytes.extend_from_slice(&[0xff; 40]);
    let frame = WireCodec::new().decode(&mut bytes).expect("header is fine").expect("whole frame");
    assert_invalid_payload(frame.message().expect_err("garbage"), "events");
    assert_invalid_payload(wire::access_events(&frame.payload, 10).expect_err("garbage"), "events");

    // Too short for its kind, and empty.
    let ping = encode(&Message::Ping(Ping { nonce: 1 }));
    assert_invalid_payload(
        Message::decode(Kind::Events, &ping[HEADER_BYTES..]).expect_err("short"),
        "events",
    );
    assert_invalid_payload(Message::decode(Kind::Ping, &[]).expect_err("empty"), "ping");
}

#[test]
fn payload_at_any_offset_is_accessible() {
    let events =
        vec![typical_event(), typical_event().with_tag("batch").with_metadata("region", "eu-west-1")];
    let payload = events_payload(events.clone());
    for offset in 1..16 {
        let mut buffer = rkyv::util::AlignedVec::<16>::new();
        buffer.extend_from_slice(&vec![0u8; offset]);
        buffer.extend_from_slice(&payload);
        let at_offset = &buffer[offset..];
        assert_eq!(at_offset.as_ptr() as usize % 16, offset, "the payload really is misaligned");
        let archived = wire::access_events(at_offset, 10).expect("unaligned payloads validate");
        assert_eq!(archived.events.len(), 2);
        for event in archived.events.iter() {
            assert_eq!(wire::validate(event), Ok(()));
        }
        assert_eq!(archived.events[1].extra.as_ref().map(|extra| extra.get().tags.len()), Some(1));
        let owned = Message::decode(Kind::Events, at_offset).expect("decodes");
        assert_eq!(owned, Message::Events(EventBatch { sequence: 1, events: events.clone() }));
    }
}

/// Replaces the first occurrence of `needle` in `haystack` with `replacement`.
fn replace_once(haystack: &mut [u8], needle: &[u8], replacement: &[u8]) {
    let at = haystack.windows(needle.len()).position(|window| window == needle).expect("needle present");
    haystack[at..at + replacement.len()].copy_from_slice(replacement);
}

#[test]
fn invalid_utf8_in_a_string_is_invalid_payload() {
    // An out-of-line string in an event.
    let event = typical_event().with_model("model-name-long-enough-to-be-out-of-line");
    let mut payload = events_payload(vec![event]).to_vec();
    replace_once(&mut payload, b"model-name", b"\xffodel-name");
    assert_invalid_payload(wire::access_events(&payload, 10).expect_err("bad utf-8"), "events");
    assert_invalid_payload(Message::decode(Kind::Events, &payload).expect_err("bad utf-8"), "events");

    // An inline (short) string in a handshake.
    let hello = Hello {
        protocol_version: 1,
        api_key: "tk_abc".to_owned(),
        client_name: "cli".to_owned(),
        ack_mode: wire::AckMode::Durable,
    };
    let mut frame = encode(&Message::Hello(hello)).to_vec();
    replace_once(&mut frame, b"tk_abc", b"tk_\xc3(c");
    let error = Message::decode(Kind::Hello, &frame[HEADER_BYTES..]).expect_err("bad utf-8");
    assert_invalid_payload(error, "hello");
}

#[test]
fn too_many_events_is_too_many_events() {
    let payload = events_payload(vec![typical_event(); 3]);
    let error = wire::access_events(&payload, 2).expect_err("three events, two allowed");
    assert_eq!(error, WireError::TooManyEvents { count: 3, max: 2 });
    assert_eq!(error.code(), ErrorCode::TooLarge);
    assert!(wire::access_events(&payload, 3).is_ok());

    let message = Message::decode(Kind::Events, &payload).expect("decodes");
    assert_eq!(message.check_limits(2), Err(WireError::TooManyEvents { count: 3, max: 2 }));
    assert_eq!(message.check_limits(3), Ok(()));
}

#[test]
fn handshake_text_over_its_limit_is_invalid_payload() {
    let hello = Message::Hello(Hello {
        protocol_version: 1,
        api_key: "k".repeat(TEXT_BYTES_MAX + 1),
        client_name: "cli".to_owned(),
        ack_mode: wire::AckMode::Durable,
    });
    assert_invalid_payload(hello.check_limits(1).expect_err("api key too long"), "hello");
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

#[test]
fn typical_event_is_valid() {
    assert_valid(typical_event());
}

#[test]
fn non_finite_and_negative_quantities_name_the_field() {
    for value in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0, wire::limits::QUANTITY_VALUE_MAX * 2.0] {
        let mut event = typical_event();
        event.quantities[1].value = value;
        assert_invalid(event, "output_tokens");

        assert_invalid(typical_event().with_latency_ms(value), "latency_ms");
        assert_invalid(typical_event().with_custom_quantity("images", value), "images");
    }
    assert_invalid(typical_event().with_latency_ms(3_600_000.5), "latency_ms");
    assert_valid(typical_event().with_latency_ms(3_600_000.0));
    assert_valid(typical_event().with_latency_ms(0.0).with_quantity(QuantityKind::Pages, 0.0));
}

#[test]
fn strings_over_their_limits_name_the_field() {
    let long = |bytes: usize| "a".repeat(bytes);
    let mut event = typical_event();
    event.user_id = long(USER_ID_BYTES_MAX + 1);
    assert_invalid(event, "user_id");
    let mut event = typical_event();
    event.user_id = String::new();
    assert_invalid(event, "user_id");
    let mut event = typical_event();
    event.user_id = "user\n1".to_owned();
    assert_invalid(event, "user_id");
    let mut event = typical_event();
    event.service_type = long(NAME_BYTES_MAX + 1);
    assert_invalid(event, "service_type");
    let mut event = typical_event();
    event.service_provider = "open ai".to_owned();
    assert_invalid(event, "service_provider");
    let mut event = typical_event();
    event.event_type = "compl\u{e9}tion".to_owned();
    assert_invalid(event, "event_type");
    assert_invalid(typical_event().with_model(long(IDENT_BYTES_MAX + 1)), "model");
    assert_invalid(typical_event().with_session_id(long(IDENT_BYTES_MAX + 1)), "session_id");
    assert_invalid(typical_event().with_request_id(""), "request_id");
    assert_invalid(typical_event().with_error(Some(long(IDENT_BYTES_MAX + 1))), "error_code");

    let event = typical_event().with_metadata("a", "1").with_metadata(long(METADATA_KEY_BYTES_MAX + 1), "2");
    assert_invalid(event, "metadata[1].key");
    assert_invalid(typical_event().with_metadata("", "1"), "metadata[0].key");
    assert_invalid(
        typical_event().with_metadata("k", long(METADATA_VALUE_BYTES_MAX + 1)),
        "metadata[0].value",
    );
    assert_invalid(typical_event().with_metadata("k", "a\u{7}b"), "metadata[0].value");
    let event = typical_event().with_tag("a").with_tag("b").with_tag(long(TAG_BYTES_MAX + 1));
    assert_invalid(event, "tags[2]");
    assert_invalid(
        typical_event().with_custom_quantity(long(NAME_BYTES_MAX + 1), 1.0),
        "custom_quantities[0]",
    );
    assert_invalid(typical_event().with_custom_quantity("Images", 1.0), "custom_quantities[0]");

    // Exactly at every limit is fine.
    let mut event = typical_event()
        .with_model(long(IDENT_BYTES_MAX))
        .with_error(Some(long(IDENT_BYTES_MAX)))
        .with_session_id(long(IDENT_BYTES_MAX))
        .with_request_id(long(IDENT_BYTES_MAX))
        .with_metadata(long(METADATA_KEY_BYTES_MAX), long(METADATA_VALUE_BYTES_MAX))
        .with_metadata("empty", "")
        .with_tag(long(TAG_BYTES_MAX))
        .with_custom_quantity("z".repeat(NAME_BYTES_MAX), 1.0);
    event.user_id = "\u{e9}".repeat(USER_ID_BYTES_MAX / 2);
    event.service_type = long(NAME_BYTES_MAX);
    assert_valid(event);
}

#[test]
fn too_many_entries_name_the_list() {
    let mut event = typical_event();
    for index in 0..=METADATA_ENTRIES_MAX {
        event = event.with_metadata(format!("key{index}"), "v");
    }
    assert_invalid(event, "metadata");
    let mut event = typical_event();
    for index in 0..=TAGS_MAX {
        event = event.with_tag(format!("tag{index}"));
    }
    assert_invalid(event, "tags");
    // Two well-known quantities plus 31 custom ones: 33 in all.
    let mut event = typical_event();
    for index in 0..QUANTITIES_MAX - 1 {
        event = event.with_custom_quantity(format!("q{index}"), 1.0);
    }
    assert_invalid(event, "quantities");
}

#[test]
fn error_code_without_error_status_is_refused() {
    let mut event = typical_event().with_error(Some("rate_limit".to_owned()));
    assert_valid(event.clone());
    event.status = Status::Success;
    assert_invalid(event, "error_code");
}

#[test]
fn duplicate_quantity_kinds_are_refused() {
    assert_invalid(typical_event().with_quantity(QuantityKind::InputTokens, 1.0), "input_tokens");
    let event = typical_event().with_custom_quantity("images", 1.0).with_custom_quantity("images", 2.0);
    assert_invalid(event, "custom_quantities[1]");
    assert_invalid(typical_event().with_custom_quantity("input_tokens", 1.0), "custom_quantities[0]");
    let event = typical_event().with_metadata("region", "eu").with_metadata("region", "us");
    assert_invalid(event, "metadata[1].key");
}

#[test]
fn nil_event_id_is_refused() {
    assert_invalid(typical_event().with_id(uuid::Uuid::nil()), "event_id");
}

#[test]
fn timestamp_out_of_range_is_refused() {
    for timestamp_us in [TIMESTAMP_US_MIN - 1, TIMESTAMP_US_MAX, 0, -1, i64::MIN, i64::MAX] {
        assert_invalid(typical_event().at(timestamp_us), "timestamp");
    }
    assert_valid(typical_event().at(TIMESTAMP_US_MIN));
    assert_valid(typical_event().at(TIMESTAMP_US_MAX - 1));
}

#[test]
fn event_errors_do_not_echo_long_values() {
    // The reason travels back in a `Rejection`, whose message is at most TEXT_BYTES_MAX bytes.
    let mut event = typical_event();
    event.service_type = "x ".repeat(5_000);
    let error = assert_invalid(event, "service_type");
    assert!(error.to_string().len() <= TEXT_BYTES_MAX, "{} bytes", error.to_string().len());
    assert!(error.reason.ends_with("got 10000 bytes"), "{error}");
    // A short bad value is still shown, so the client can see what was wrong.
    let mut event = typical_event();
    event.event_type = "chat completion".to_owned();
    let error = assert_invalid(event, "event_type");
    assert!(error.reason.ends_with("got \"chat completion\""), "{error}");
}
