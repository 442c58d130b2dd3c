use wire::{EventBatch, Message, QuantityKind, WireCodec};

#[test]
fn typical_llm_event_size() {
    let event = wire::Event::new("user-000123", "llm_service", "openai", "completion")
        .with_model("gpt-4o-mini")
        .with_quantity(QuantityKind::InputTokens, 1200.0)
        .with_quantity(QuantityKind::OutputTokens, 350.0)
        .with_latency_ms(812.0);
    let mut sizes = vec![];
    for n in [1usize, 1000] {
        let batch = Message::Events(EventBatch { sequence: 1, events: vec![event.clone(); n] });
        let mut buf = bytes::BytesMut::new();
        wire::encode_message(&batch, u32::MAX, &mut buf).unwrap();
        sizes.push(buf.len());
        let mut codec = WireCodec::new();
        codec.set_limits(16 << 20, 16 << 20);
        let frame = tokio_util::codec::Decoder::decode(&mut codec, &mut buf).unwrap().unwrap();
        let archived = wire::access_events(&frame.payload, 10_000).unwrap();
        assert_eq!(archived.events.len(), n);
        assert_eq!(frame.message().unwrap(), batch);
    }
    println!("sizes {sizes:?} per event {}", (sizes[1] - sizes[0]) as f64 / 999.0);
}
