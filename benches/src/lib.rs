//! Criterion benchmarks of Tally's hot paths, and the workloads they share; they need no services.

use wire::{Event, EventBatch, Message, QuantityKind};

/// 2026-01-01T00:00:00Z: every workload event is stamped from here on, one microsecond apart.
pub const WORKLOAD_START_US: i64 = 1_767_225_600_000_000;

/// A deterministic, never-nil event id for event number `index` (UUIDv7-shaped).
pub fn event_id(index: u64) -> uuid::Uuid {
    let time_ms = (WORKLOAD_START_US / 1000) as u128 + u128::from(index / 1000);
    uuid::Uuid::from_u128((time_ms << 80) | (0x7 << 76) | (0b10 << 62) | (u128::from(index) + 1))
}

/// The typical event: one LLM completion with input and output tokens and a latency.
pub fn llm_event(index: u64) -> Event {
    Event::new(format!("user-{:06}", index % 1_000), "llm_service", "openai", "completion")
        .with_id(event_id(index))
        .at(WORKLOAD_START_US + index as i64)
        .with_model("gpt-4o-mini")
        .with_quantity(QuantityKind::InputTokens, 200.0 + (index % 4_000) as f64)
        .with_quantity(QuantityKind::OutputTokens, 50.0 + (index % 900) as f64)
        .with_latency_ms(150.0 + (index % 2_000) as f64)
}

/// A mix: 70% LLM completions (some failed, some with cached tokens), 10% document pages,
/// 10% plain API calls and 10% custom quantities with metadata and tags.
pub fn mixed_event(index: u64) -> Event {
    match index % 10 {
        0 => Event::new(format!("user-{:06}", index % 1_000), "document_service", "textract", "page_ocr")
            .with_id(event_id(index))
            .at(WORKLOAD_START_US + index as i64)
            .with_quantity(QuantityKind::Pages, 1.0 + (index % 12) as f64)
            .with_quantity(QuantityKind::Bytes, 48_000.0 + (index % 100_000) as f64)
            .with_latency_ms(900.0),
        1 => Event::new(format!("user-{:06}", index % 1_000), "api_service", "stripe", "charge.create")
            .with_id(event_id(index))
            .at(WORKLOAD_START_US + index as i64)
            .with_quantity(QuantityKind::Requests, 1.0)
            .with_latency_ms(85.5),
        2 => Event::new(format!("user-{:06}", index % 1_000), "image_service", "replicate", "generation")
            .with_id(event_id(index))
            .at(WORKLOAD_START_US + index as i64)
            .with_model("sdxl")
            .with_custom_quantity("images", 4.0)
            .with_custom_quantity("gpu_seconds", 12.5)
            .with_metadata("region", "eu-west-1")
            .with_metadata("feature", "avatar")
            .with_tag("beta")
            .with_request_id(format!("req-{index:08}")),
        3 => llm_event(index).with_error(Some("rate_limit_exceeded".to_owned())),
        4 => llm_event(index).with_quantity(QuantityKind::CachedInputTokens, 1_024.0),
        _ => llm_event(index),
    }
}

/// The two workloads every wire benchmark runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Only typical LLM events.
    Llm,
    /// See [`mixed_event`].
    Mixed,
}

impl Workload {
    pub const ALL: [Workload; 2] = [Workload::Llm, Workload::Mixed];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Llm => "llm",
            Workload::Mixed => "mixed",
        }
    }

    pub fn events(self, count: usize) -> Vec<Event> {
        let event = match self {
            Workload::Llm => llm_event,
            Workload::Mixed => mixed_event,
        };
        (0..count as u64).map(event).collect()
    }

    pub fn batch(self, count: usize) -> Message {
        Message::Events(EventBatch { sequence: 1, events: self.events(count) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_workload_event_is_valid() {
        for workload in Workload::ALL {
            for event in workload.events(1_000) {
                assert_eq!(event.validate(), Ok(()), "{event:?}");
            }
        }
    }
}
