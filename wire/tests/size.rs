//! The size of a typical event on the wire, which the protocol promises to keep small.

use tokio_util::codec::Decoder;
use wire::{EventBatch, Message, QuantityKind, WireCodec};

#[test]
fn typical_llm_event_encodes_to_at_most_160_bytes() {
    let event = wire::Event::new("user-000123", "llm_service", "openai", "completion")
        .with_model("gpt-4o-mini")
        .with_quantity(QuantityKind::InputTokens, 1200.0)
        .with_quantity(QuantityKind::OutputTokens, 350.0)
        .with_latency_ms(812.0);
    let mut sizes = Vec::new();
    for count in [1usize, 1001] {
        let batch = Message::Events(EventBatch { sequence: 1, events: vec![event.clone(); count] });
        let mut buffer = bytes::BytesMut::new();
        wire::encode_message(&batch, u32::MAX, &mut buffer).expect("encodes");
        sizes.push(buffer.len());
        let mut codec = WireCodec::new();
        codec.set_limits(16 << 20, 16 << 20);
        let frame = codec.decode(&mut buffer).expect("decodes").expect("a whole frame");
        assert_eq!(wire::access_events(&frame.payload, 10_000).expect("valid").events.len(), count);
        assert_eq!(frame.message().expect("owned"), batch);
    }
    let per_event = (sizes[1] - sizes[0]) / 1000;
    assert!(per_event <= 160, "a typical LLM event takes {per_event} bytes");
}
