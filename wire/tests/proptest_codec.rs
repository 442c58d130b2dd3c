//! Property tests of the frame codec, the payloads and event validation: round trips, arbitrary
//! chunking, arbitrary and mutated bytes, and owned/archived agreement of `validate`.

use bytes::BytesMut;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use tokio_util::codec::{Decoder, Encoder};
use wire::limits::{
    FRAME_PAYLOAD_BYTES_CEILING, HEADER_BYTES, IDENT_BYTES_MAX, LATENCY_US_MAX, METADATA_KEY_BYTES_MAX,
    METADATA_VALUE_BYTES_MAX, NAME_BYTES_MAX, QUANTITY_VALUE_MAX, TAG_BYTES_MAX, TIMESTAMP_US_MAX,
    TIMESTAMP_US_MIN, USER_ID_BYTES_MAX,
};
use wire::{
    Ack, AckMode, Busy, CustomQuantity, ErrorCode, ErrorMessage, Event, EventBatch, Extra, Frame, Goodbye,
    HANDSHAKE_PAYLOAD_BYTES_MAX, Hello, Kind, Message, MetadataEntry, Ping, Pong, Quantity, QuantityKind,
    Rejection, Status, Welcome, WireCodec, WireError,
};

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

/// Any string at all: every `char` (control characters, newlines, astral planes), short or long.
fn any_text(chars_max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..=chars_max).prop_map(String::from_iter)
}

/// Text around the limit of a field: valid printable text, ASCII at and just past `bytes_max`,
/// empty, wide characters and arbitrary characters.
fn text_around(bytes_max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "\\PC{1,24}",
        1 => Just(String::new()),
        1 => Just("a".repeat(bytes_max)),
        1 => Just("a".repeat(bytes_max + 1)),
        // Four bytes a character: over the limit in bytes long before it is in characters.
        1 => Just("\u{1F600}".repeat(bytes_max / 4 + 1)),
        2 => any_text(bytes_max + 8),
    ]
}

/// A name of the `A-Z a-z 0-9 _ . : -` alphabet, or something that is not one.
fn name_around() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => "[A-Za-z0-9_.:-]{1,64}",
        2 => "[A-Za-z0-9_.:-]{65,70}",
        4 => text_around(NAME_BYTES_MAX),
        // Far over the limit: a client bug, or an attacker probing how much of it is echoed.
        1 => "[A-Za-z0-9 ]{1000,1100}",
    ]
}

fn any_quantity_value() -> impl Strategy<Value = f64> {
    prop_oneof![
        6 => 0.0..1.0e9f64,
        1 => Just(0.0),
        1 => Just(-0.0),
        1 => Just(QUANTITY_VALUE_MAX),
        1 => Just(QUANTITY_VALUE_MAX * 2.0),
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => -1.0e9..0.0f64,
        2 => any::<f64>(),
    ]
}

fn any_latency_ms() -> impl Strategy<Value = f64> {
    let max = f64::from(LATENCY_US_MAX) / 1000.0;
    prop_oneof![4 => 0.0..=max, 1 => Just(max), 1 => Just(max + 0.001), 2 => any_quantity_value()]
}

fn any_status() -> impl Strategy<Value = Status> {
    prop_oneof![Just(Status::Success), Just(Status::Error)]
}

fn any_quantity_kind() -> impl Strategy<Value = QuantityKind> {
    prop::sample::select(QuantityKind::ALL.to_vec())
}

fn any_custom_name() -> impl Strategy<Value = String> {
    let well_known = QuantityKind::ALL.map(QuantityKind::as_str).map(str::to_owned).to_vec();
    prop_oneof![
        6 => "[a-z0-9_]{1,24}",
        1 => prop::sample::select(well_known),
        1 => Just("a".repeat(NAME_BYTES_MAX + 1)),
        1 => any_text(20),
    ]
}

fn any_extra() -> impl Strategy<Value = Extra> {
    let custom =
        (any_custom_name(), any_quantity_value()).prop_map(|(name, value)| CustomQuantity { name, value });
    let entry = (text_around(METADATA_KEY_BYTES_MAX), text_around(METADATA_VALUE_BYTES_MAX))
        .prop_map(|(key, value)| MetadataEntry { key, value });
    (
        prop::option::of(text_around(IDENT_BYTES_MAX)),
        prop::option::of(text_around(IDENT_BYTES_MAX)),
        prop::option::of(text_around(IDENT_BYTES_MAX)),
        prop::collection::vec(custom, 0..36),
        prop::collection::vec(entry, 0..36),
        prop::collection::vec(text_around(TAG_BYTES_MAX), 0..36),
    )
        .prop_map(|(error_code, session_id, request_id, custom_quantities, metadata, tags)| Extra {
            error_code,
            session_id,
            request_id,
            custom_quantities,
            metadata,
            tags,
        })
}

/// Any event, valid or not, built field by field from values in and around every limit.
fn wild_event() -> impl Strategy<Value = Event> {
    let identity = (
        prop_oneof![1 => Just([0u8; 16]), 15 => any::<[u8; 16]>()],
        prop_oneof![
            4 => TIMESTAMP_US_MIN..TIMESTAMP_US_MAX,
            1 => Just(TIMESTAMP_US_MIN - 1),
            1 => Just(TIMESTAMP_US_MAX),
            1 => any::<i64>(),
        ],
        text_around(USER_ID_BYTES_MAX),
    );
    let names = (name_around(), name_around(), name_around(), prop::option::of(text_around(IDENT_BYTES_MAX)));
    let amounts = (
        any_status(),
        prop::option::of(any_latency_ms()),
        prop::collection::vec((any_quantity_kind(), any_quantity_value()), 0..12),
        prop::option::weighted(0.4, any_extra().prop_map(Box::new)),
    );
    (identity, names, amounts).prop_map(
        |(
            (event_id, timestamp_us, user_id),
            (service_type, service_provider, event_type, model),
            (status, latency_ms, quantities, extra),
        )| Event {
            event_id,
            timestamp_us,
            user_id,
            service_type,
            service_provider,
            event_type,
            model,
            status,
            latency_ms,
            quantities: quantities.into_iter().map(|(kind, value)| Quantity { kind, value }).collect(),
            extra,
        },
    )
}

/// An event that satisfies every rule of the protocol.
fn valid_event() -> impl Strategy<Value = Event> {
    let name = "[A-Za-z0-9_.:-]{1,64}";
    let identity = (
        any::<[u8; 16]>().prop_filter("nil id", |id| *id != [0; 16]),
        TIMESTAMP_US_MIN..TIMESTAMP_US_MAX,
        "\\PC{1,63}",
    );
    let names = (name, name, name, prop::option::of("\\PC{1,32}"));
    let amounts = (
        any_status(),
        prop::option::of(0.0..=f64::from(LATENCY_US_MAX) / 1000.0),
        prop::sample::subsequence(QuantityKind::ALL.to_vec(), 0..=QuantityKind::ALL.len()),
        prop::collection::vec(0.0..=QUANTITY_VALUE_MAX, QuantityKind::ALL.len()),
        prop::option::weighted(0.4, valid_extra()),
    );
    (identity, names, amounts).prop_map(
        |(
            (event_id, timestamp_us, user_id),
            (service_type, service_provider, event_type, model),
            (status, latency_ms, kinds, values, extra),
        )| {
            let quantities = kinds.into_iter().zip(values).map(|(kind, value)| Quantity { kind, value });
            let mut extra = extra.map(Box::new);
            if status == Status::Success
                && let Some(extra) = extra.as_mut()
            {
                extra.error_code = None;
            }
            Event {
                event_id,
                timestamp_us,
                user_id,
                service_type,
                service_provider,
                event_type,
                model,
                status,
                latency_ms,
                quantities: quantities.collect(),
                extra,
            }
        },
    )
}

fn valid_extra() -> impl Strategy<Value = Extra> {
    (
        prop::option::of("\\PC{1,32}"),
        prop::option::of("\\PC{1,32}"),
        prop::option::of("[0-9a-f-]{1,36}"),
        prop::collection::btree_map("[a-z0-9_]{1,24}", 0.0..1.0e12f64, 0..8),
        prop::collection::btree_map("\\PC{1,16}", "\\PC{0,64}", 0..6),
        prop::collection::vec("\\PC{1,16}", 0..6),
    )
        .prop_map(|(error_code, session_id, request_id, custom, metadata, tags)| Extra {
            error_code,
            session_id,
            request_id,
            custom_quantities: custom
                .into_iter()
                .filter(|(name, _)| QuantityKind::from_name(name).is_none())
                .map(|(name, value)| CustomQuantity { name, value })
                .collect(),
            metadata: metadata.into_iter().map(|(key, value)| MetadataEntry { key, value }).collect(),
            tags,
        })
}

/// Mostly-valid and wild events, so both outcomes of `validate` are common.
fn any_event() -> impl Strategy<Value = Event> {
    prop_oneof![valid_event(), wild_event()]
}

fn any_ack_mode() -> impl Strategy<Value = AckMode> {
    prop_oneof![Just(AckMode::Durable), Just(AckMode::Accepted)]
}

fn any_error_code() -> impl Strategy<Value = ErrorCode> {
    prop::sample::select(ErrorCode::ALL.to_vec())
}

/// Every variant of `Message`, with events from `events`.
fn any_message_with(
    events: impl Strategy<Value = Vec<Event>> + 'static,
    text_chars_max: usize,
) -> impl Strategy<Value = Message> {
    let text = move || any_text(text_chars_max);
    let rejection = (any::<u32>(), any_error_code(), text()).prop_map(|(index, code, message)| Rejection {
        index,
        code,
        message,
    });
    prop_oneof![
        (any::<u8>(), text(), text(), any_ack_mode()).prop_map(
            |(protocol_version, api_key, client_name, ack_mode)| {
                Message::Hello(Hello { protocol_version, api_key, client_name, ack_mode })
            }
        ),
        (text(), text(), any::<u32>(), any::<u32>(), any::<u32>(), any_ack_mode()).prop_map(
            |(tenant_id, server_version, max_frame_bytes, max_events_per_batch, credits, ack_mode)| {
                Message::Welcome(Welcome {
                    tenant_id,
                    server_version,
                    max_frame_bytes,
                    max_events_per_batch,
                    credits,
                    ack_mode,
                })
            }
        ),
        (any::<u64>(), events)
            .prop_map(|(sequence, events)| Message::Events(EventBatch { sequence, events })),
        (any::<u64>(), any::<u32>(), any::<u32>(), prop::collection::vec(rejection, 0..8)).prop_map(
            |(sequence, stored, duplicate, rejected)| Message::Ack(Ack {
                sequence,
                stored,
                duplicate,
                rejected
            })
        ),
        (any_error_code(), text(), any::<bool>(), any::<Option<u64>>()).prop_map(
            |(code, message, fatal, sequence)| Message::Error(ErrorMessage {
                code,
                message,
                fatal,
                sequence
            })
        ),
        (any::<u64>(), any::<u32>())
            .prop_map(|(sequence, retry_after_ms)| Message::Busy(Busy { sequence, retry_after_ms })),
        any::<u64>().prop_map(|nonce| Message::Ping(Ping { nonce })),
        any::<u64>().prop_map(|nonce| Message::Pong(Pong { nonce })),
        (text(), any::<u32>()).prop_map(|(reason, reconnect_after_ms)| Message::Goodbye(Goodbye {
            reason,
            reconnect_after_ms
        })),
    ]
}

fn any_message() -> impl Strategy<Value = Message> {
    any_message_with(prop::collection::vec(any_event(), 0..12), 300)
}

/// Smaller messages for tests that send several of them.
fn small_message() -> impl Strategy<Value = Message> {
    any_message_with(prop::collection::vec(any_event(), 0..4), 40)
}

/// Bytes close to valid: an encoded frame (header included) with some bytes flipped, some
/// truncated away or some appended.
fn mutated_frame() -> impl Strategy<Value = Vec<u8>> {
    (small_message(), prop::collection::vec((any::<prop::sample::Index>(), 1..=255u8), 0..6), 0..3u8)
        .prop_flat_map(|(message, flips, tail)| {
            let mut bytes = encode_one(&message).to_vec();
            for (index, mask) in flips {
                let at = index.index(bytes.len());
                bytes[at] ^= mask;
            }
            let len = bytes.len();
            match tail {
                0 => Just(bytes).boxed(),
                1 => (0..=len).prop_map(move |keep| bytes[..keep].to_vec()).boxed(),
                _ => prop::collection::vec(any::<u8>(), 1..64)
                    .prop_map(move |extra| [bytes.clone(), extra].concat())
                    .boxed(),
            }
        })
}

/// The payload of a valid `Events` frame with some bytes flipped: reaches deep into bytecheck
/// and, when the flips land in string bytes or numbers, into `validate`.
fn mutated_events_payload() -> impl Strategy<Value = Vec<u8>> {
    let events = prop::collection::vec(any_event(), 1..4);
    let flips = prop::collection::vec((any::<prop::sample::Index>(), 1..=255u8), 1..4);
    (events, flips).prop_map(|(events, flips)| {
        let frame = encode_one(&Message::Events(EventBatch { sequence: 7, events }));
        let mut payload = frame[HEADER_BYTES..].to_vec();
        for (index, mask) in flips {
            let at = index.index(payload.len());
            payload[at] ^= mask;
        }
        payload
    })
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn open_codec() -> WireCodec {
    let mut codec = WireCodec::new();
    codec.set_limits(FRAME_PAYLOAD_BYTES_CEILING, FRAME_PAYLOAD_BYTES_CEILING);
    codec
}

fn encode_one(message: &Message) -> BytesMut {
    let mut buffer = BytesMut::new();
    open_codec().encode(message, &mut buffer).expect("every generated message fits the ceiling");
    buffer
}

/// Every `f64` of a message as bits, in order: NaN-proof equality of the numbers.
fn float_bits(message: &Message) -> Vec<u64> {
    let Message::Events(batch) = message else { return Vec::new() };
    let mut bits = Vec::new();
    for event in &batch.events {
        bits.extend(event.latency_ms.map(f64::to_bits));
        bits.extend(event.quantities.iter().map(|quantity| quantity.value.to_bits()));
        if let Some(extra) = &event.extra {
            bits.extend(extra.custom_quantities.iter().map(|quantity| quantity.value.to_bits()));
        }
    }
    bits
}

fn has_nan(message: &Message) -> bool {
    float_bits(message).into_iter().any(|bits| f64::from_bits(bits).is_nan())
}

/// Feeds `bytes` to a codec with `limit` the way a connection would, then ends the stream.
/// Returns the frames and the error that ended decoding, if any.
fn decode_all(bytes: &[u8], limit: u32) -> (Vec<Frame>, Option<WireError>) {
    let mut codec = WireCodec::new();
    codec.set_limits(limit, limit);
    let mut buffer = BytesMut::from(bytes);
    let mut frames = Vec::new();
    loop {
        match codec.decode_eof(&mut buffer) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => return (frames, None),
            Err(error) => return (frames, Some(error)),
        }
    }
}

/// What a server does with every frame: decode it, and for events check each one both ways.
fn inspect_frame(frame: &Frame) -> Result<(), TestCaseError> {
    let owned = frame.message();
    if frame.kind == Kind::Events {
        match wire::access_events(&frame.payload, u32::MAX) {
            Ok(archived) => {
                let Ok(Message::Events(batch)) = &owned else {
                    return Err(TestCaseError::fail(format!("archived ok but owned decode gave {owned:?}")));
                };
                prop_assert_eq!(archived.events.len(), batch.events.len());
                for (archived, owned) in archived.events.iter().zip(&batch.events) {
                    prop_assert_eq!(wire::validate(archived), wire::validate(owned));
                }
            }
            Err(error) => {
                prop_assert_eq!(error.code(), ErrorCode::BadFrame);
                prop_assert!(owned.is_err(), "owned decode accepted what access refused");
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        // Integration tests have no lib.rs above them, so name the file: wire/proptest-regressions/.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/proptest_codec.txt",
        ))),
        ..ProptestConfig::default()
    })]

    /// (a) encode -> decode -> `Frame::message()` gives the message back, bit for bit.
    #[test]
    fn every_message_round_trips(message in any_message()) {
        let mut codec = open_codec();
        let mut buffer = BytesMut::new();
        codec.encode(&message, &mut buffer)?;
        let encoded = buffer.clone().freeze();
        prop_assert_eq!(&wire::EncodedFrame::encode(&message, FRAME_PAYLOAD_BYTES_CEILING)?.0, &encoded);
        let payload_len = u32::from_le_bytes(encoded[8..12].try_into().expect("four bytes"));
        prop_assert_eq!(payload_len as usize, encoded.len() - HEADER_BYTES);

        let frame = codec.decode(&mut buffer)?.expect("a whole frame decodes");
        prop_assert!(buffer.is_empty());
        prop_assert_eq!(frame.kind, message.kind());
        let decoded = frame.message()?;
        prop_assert_eq!(float_bits(&decoded), float_bits(&message));
        prop_assert_eq!(format!("{decoded:?}"), format!("{message:?}"));
        if !has_nan(&message) {
            prop_assert_eq!(&decoded, &message);
        }
        // Encoding the decoded message gives the same bytes.
        prop_assert_eq!(encode_one(&decoded).freeze(), encoded);
    }

    /// (b) Several frames fed to the decoder in arbitrary pieces decode to the same frames.
    #[test]
    fn chunked_stream_decodes_to_the_same_frames(
        messages in prop::collection::vec(small_message(), 1..8),
        chunk_lens in prop_oneof![
            prop::collection::vec(1usize..8, 1..16),
            prop::collection::vec(1usize..600, 1..16),
        ],
    ) {
        let mut stream = BytesMut::new();
        let mut expected = Vec::new();
        for message in &messages {
            let frame = encode_one(message);
            let whole = open_codec().decode(&mut frame.clone())?.expect("a whole frame decodes");
            expected.push(whole);
            stream.extend_from_slice(&frame);
        }

        let mut codec = open_codec();
        let mut buffer = BytesMut::new();
        let mut frames = Vec::new();
        let mut rest = &stream[..];
        for chunk_len in chunk_lens.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (chunk, tail) = rest.split_at((*chunk_len).min(rest.len()));
            rest = tail;
            buffer.extend_from_slice(chunk);
            while let Some(frame) = codec.decode(&mut buffer)? {
                frames.push(frame);
            }
        }
        prop_assert_eq!(codec.decode_eof(&mut buffer)?, None);
        prop_assert_eq!(&frames, &expected);
        for (frame, message) in frames.iter().zip(&messages) {
            prop_assert_eq!(format!("{:?}", frame.message()?), format!("{message:?}"));
        }
    }

    /// (c) Arbitrary bytes never panic the decoder, nor `Frame::message()` on what it returns,
    /// and no frame is ever longer than the limit in force.
    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..2048),
            // A valid header start, then anything: reaches the length and payload checks.
            prop::collection::vec(any::<u8>(), 0..512).prop_map(|tail| [&b"TL\x01"[..], &tail].concat()),
            mutated_frame(),
        ],
        limit in prop_oneof![Just(0u32), 1..64u32, Just(HANDSHAKE_PAYLOAD_BYTES_MAX), Just(u32::MAX)],
    ) {
        let (frames, error) = decode_all(&bytes, limit);
        let limit = limit.min(FRAME_PAYLOAD_BYTES_CEILING);
        let mut consumed = 0;
        for frame in &frames {
            prop_assert!(frame.payload.len() <= limit as usize);
            consumed += HEADER_BYTES + frame.payload.len();
            inspect_frame(frame)?;
        }
        prop_assert!(consumed <= bytes.len());
        if error.is_none() {
            prop_assert_eq!(consumed, bytes.len(), "bytes left over without an error");
        }
    }

    /// (d) Arbitrary bytes as an `Events` payload never panic `access_events`; whatever it
    /// accepts, `validate` handles every archived event, and agrees with the owned decode.
    #[test]
    fn arbitrary_events_payloads_never_panic(
        payload in prop_oneof![prop::collection::vec(any::<u8>(), 0..1024), mutated_events_payload()],
        offset in 0usize..16,
    ) {
        // At any address: payloads need no alignment.
        let mut buffer = vec![0u8; offset];
        buffer.extend_from_slice(&payload);
        if let Ok(archived) = wire::access_events(&buffer[offset..], u32::MAX) {
            for event in archived.events.iter() {
                let _ = wire::validate(event);
            }
        }
        // And the same bytes as a frame: owned and archived decodes agree.
        let frame = Frame { kind: Kind::Events, payload: bytes::Bytes::from(payload) };
        inspect_frame(&frame)?;
    }

    /// (e) `validate` gives the same answer for an event and its archive.
    #[test]
    fn validate_agrees_on_owned_and_archived(events in prop::collection::vec(any_event(), 1..16)) {
        let batch = Message::Events(EventBatch { sequence: 1, events: events.clone() });
        let frame = open_codec().decode(&mut encode_one(&batch))?.expect("a whole frame decodes");
        let archived = wire::access_events(&frame.payload, u32::MAX)?;
        prop_assert_eq!(archived.events.len(), events.len());
        for (archived, owned) in archived.events.iter().zip(&events) {
            prop_assert_eq!(wire::validate(archived), wire::validate(owned));
        }
    }

    /// Events built to satisfy every rule are accepted, owned and archived.
    #[test]
    fn valid_events_validate(events in prop::collection::vec(valid_event(), 1..8)) {
        let batch = Message::Events(EventBatch { sequence: 1, events: events.clone() });
        let frame = open_codec().decode(&mut encode_one(&batch))?.expect("a whole frame decodes");
        let archived = wire::access_events(&frame.payload, u32::MAX)?;
        for (archived, owned) in archived.events.iter().zip(&events) {
            prop_assert_eq!(wire::validate(owned), Ok(()), "{:?}", owned);
            prop_assert_eq!(wire::validate(archived), Ok(()));
        }
    }

    /// The reason an event was refused fits in a `Rejection`'s message, so a server can send it
    /// back without the client refusing the `Ack` (`Message::check_limits`).
    #[test]
    fn event_errors_fit_in_a_rejection(event in wild_event()) {
        if let Err(error) = wire::validate(&event) {
            let ack = Message::Ack(Ack {
                sequence: 1,
                stored: 0,
                duplicate: 0,
                rejected: vec![Rejection { index: 0, code: ErrorCode::InvalidEvent, message: error.to_string() }],
            });
            prop_assert!(
                ack.check_limits(1).is_ok(),
                "{} bytes: {}", error.to_string().len(), error
            );
        }
    }
}
