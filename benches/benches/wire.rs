//! The wire protocol's hot paths on batches of 1, 100 and 1,000 events: encode, decode with
//! validation (what the server does with every `Events` frame), and decode into owned messages;
//! serde_json on the same 1,000 events as the baseline.
//!
//! `cargo bench -p benches --bench wire -- --warm-up-time 1 --measurement-time 3`

use std::collections::BTreeMap;
use std::hint::black_box;

use benches::Workload;
use bytes::BytesMut;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group};
use serde::{Deserialize, Serialize};
use tokio_util::codec::Decoder;
use wire::limits::{BATCH_EVENTS_CEILING, FRAME_PAYLOAD_BYTES_CEILING};
use wire::{Event, Message, QuantityKind, Status, WireCodec};

const BATCH_SIZES: [usize; 3] = [1, 100, 1_000];
/// The batch size compared with serde_json.
const JSON_BATCH_SIZE: usize = 1_000;
/// Frames buffered per timed batch: enough to hide the timer, few enough to stay in cache.
const FRAMES_PER_TIMED_BATCH: u64 = 16;

fn main() {
    print_sizes();
    benches();
    Criterion::default().configure_from_args().final_summary();
}

criterion_group!(benches, bench_wire, bench_json);

fn open_codec() -> WireCodec {
    let mut codec = WireCodec::new();
    codec.set_limits(FRAME_PAYLOAD_BYTES_CEILING, FRAME_PAYLOAD_BYTES_CEILING);
    codec
}

fn encode(message: &Message) -> BytesMut {
    let mut buffer = BytesMut::new();
    wire::encode_message(message, FRAME_PAYLOAD_BYTES_CEILING, &mut buffer)
        .expect("a workload batch encodes");
    buffer
}

/// The server's path: frame, bytecheck, then the protocol's rules on every archived event.
fn decode_and_validate(codec: &mut WireCodec, src: &mut BytesMut) -> usize {
    let frame = codec.decode(src).expect("valid frame").expect("whole frame");
    let batch = wire::access_events(&frame.payload, BATCH_EVENTS_CEILING).expect("valid payload");
    batch.events.iter().filter(|event| wire::validate(*event).is_ok()).count()
}

fn decode_owned(codec: &mut WireCodec, src: &mut BytesMut) -> Message {
    codec.decode(src).expect("valid frame").expect("whole frame").message().expect("valid payload")
}

fn bench_wire(c: &mut Criterion) {
    for workload in Workload::ALL {
        let mut group = c.benchmark_group(format!("wire/{}", workload.name()));
        for count in BATCH_SIZES {
            let message = workload.batch(count);
            let frame = encode(&message);
            group.throughput(Throughput::Elements(count as u64));

            group.bench_with_input(BenchmarkId::new("encode", count), &message, |b, message| {
                let mut buffer = BytesMut::with_capacity(frame.len());
                b.iter(|| {
                    buffer.clear();
                    wire::encode_message(message, FRAME_PAYLOAD_BYTES_CEILING, &mut buffer).expect("encodes");
                    black_box(buffer.len())
                })
            });
            group.bench_function(BenchmarkId::new("decode_validate", count), |b| {
                let mut codec = open_codec();
                b.iter_batched_ref(
                    || frame.clone(),
                    |src| decode_and_validate(&mut codec, src),
                    BatchSize::NumIterations(FRAMES_PER_TIMED_BATCH),
                )
            });
            group.bench_function(BenchmarkId::new("decode_owned", count), |b| {
                let mut codec = open_codec();
                b.iter_batched_ref(
                    || frame.clone(),
                    |src| decode_owned(&mut codec, src),
                    BatchSize::NumIterations(FRAMES_PER_TIMED_BATCH),
                )
            });

            // The two halves of decode_validate, to see where its time goes.
            let payload = open_codec().decode(&mut frame.clone()).expect("valid").expect("whole").payload;
            group.bench_function(BenchmarkId::new("bytecheck_only", count), |b| {
                b.iter(|| {
                    let batch =
                        wire::access_events(black_box(&payload), BATCH_EVENTS_CEILING).expect("valid");
                    batch.events.len()
                })
            });
            let batch = wire::access_events(&payload, BATCH_EVENTS_CEILING).expect("valid payload");
            group.bench_function(BenchmarkId::new("validate_only", count), |b| {
                b.iter(|| {
                    black_box(batch).events.iter().filter(|event| wire::validate(*event).is_ok()).count()
                })
            });
        }
        group.finish();
    }
}

fn bench_json(c: &mut Criterion) {
    for workload in Workload::ALL {
        let mut group = c.benchmark_group(format!("json/{}", workload.name()));
        let batch = JsonBatch::from_events(workload.events(JSON_BATCH_SIZE));
        let bytes = serde_json::to_vec(&batch).expect("serializes");
        group.throughput(Throughput::Elements(JSON_BATCH_SIZE as u64));

        group.bench_function(BenchmarkId::new("encode", JSON_BATCH_SIZE), |b| {
            let mut buffer = Vec::with_capacity(bytes.len());
            b.iter(|| {
                buffer.clear();
                serde_json::to_writer(&mut buffer, black_box(&batch)).expect("serializes");
                black_box(buffer.len())
            })
        });
        group.bench_function(BenchmarkId::new("decode_validate", JSON_BATCH_SIZE), |b| {
            b.iter(|| {
                let batch: JsonBatch = serde_json::from_slice(black_box(&bytes)).expect("deserializes");
                batch
                    .events
                    .into_iter()
                    .map(JsonEvent::into_event)
                    .filter(|event| event.validate().is_ok())
                    .count()
            })
        });
        group.bench_function(BenchmarkId::new("decode_owned", JSON_BATCH_SIZE), |b| {
            b.iter(|| serde_json::from_slice::<JsonBatch>(black_box(&bytes)).expect("deserializes"))
        });
        group.finish();
    }
}

/// Frame bytes per event for every batch size, and the JSON body of the same events.
fn print_sizes() {
    println!("bytes per event (frame header included):");
    for workload in Workload::ALL {
        let sizes: Vec<usize> =
            BATCH_SIZES.iter().map(|&count| encode(&workload.batch(count)).len()).collect();
        for (count, size) in BATCH_SIZES.iter().zip(&sizes) {
            println!(
                "  {:5} x{count:<5} frame {size:>7} B  {:7.1} B/event",
                workload.name(),
                *size as f64 / *count as f64
            );
        }
        let marginal = (sizes[2] - sizes[0]) as f64 / (BATCH_SIZES[2] - BATCH_SIZES[0]) as f64;
        let json = serde_json::to_vec(&JsonBatch::from_events(workload.events(JSON_BATCH_SIZE)))
            .expect("serializes")
            .len();
        println!(
            "  {:5} marginal {marginal:.1} B/event; serde_json x{JSON_BATCH_SIZE} {:.1} B/event",
            workload.name(),
            json as f64 / JSON_BATCH_SIZE as f64
        );
    }
}

/// The same batch as a JSON API would carry it, for the serde_json baseline.
#[derive(Debug, Serialize, Deserialize)]
struct JsonBatch {
    sequence: u64,
    events: Vec<JsonEvent>,
}

#[derive(Debug, Serialize, Deserialize)]
struct JsonEvent {
    event_id: uuid::Uuid,
    timestamp_us: i64,
    user_id: String,
    service_type: String,
    service_provider: String,
    event_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    status: JsonStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    latency_ms: Option<f64>,
    quantities: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request_id: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    metadata: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tags: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum JsonStatus {
    Success,
    Error,
}

impl JsonBatch {
    fn from_events(events: Vec<Event>) -> JsonBatch {
        JsonBatch { sequence: 1, events: events.into_iter().map(JsonEvent::from_event).collect() }
    }
}

impl JsonEvent {
    fn from_event(event: Event) -> JsonEvent {
        let mut quantities: BTreeMap<String, f64> = event
            .quantities
            .iter()
            .map(|quantity| (quantity.kind.as_str().to_owned(), quantity.value))
            .collect();
        let extra = event.extra.map(|extra| *extra).unwrap_or_default();
        quantities
            .extend(extra.custom_quantities.into_iter().map(|quantity| (quantity.name, quantity.value)));
        JsonEvent {
            event_id: uuid::Uuid::from_bytes(event.event_id),
            timestamp_us: event.timestamp_us,
            user_id: event.user_id,
            service_type: event.service_type,
            service_provider: event.service_provider,
            event_type: event.event_type,
            model: event.model,
            status: match event.status {
                Status::Success => JsonStatus::Success,
                Status::Error => JsonStatus::Error,
            },
            latency_ms: event.latency_ms,
            quantities,
            error_code: extra.error_code,
            request_id: extra.request_id,
            metadata: extra.metadata.into_iter().map(|entry| (entry.key, entry.value)).collect(),
            tags: extra.tags,
        }
    }

    /// What a JSON endpoint does before `validate`: build the protocol's event.
    fn into_event(self) -> Event {
        let mut event = Event {
            event_id: *self.event_id.as_bytes(),
            timestamp_us: self.timestamp_us,
            user_id: self.user_id,
            service_type: self.service_type,
            service_provider: self.service_provider,
            event_type: self.event_type,
            model: self.model,
            status: match self.status {
                JsonStatus::Success => Status::Success,
                JsonStatus::Error => Status::Error,
            },
            latency_ms: self.latency_ms,
            quantities: Vec::new(),
            extra: None,
        };
        for (name, value) in self.quantities {
            event = match QuantityKind::from_name(&name) {
                Some(kind) => event.with_quantity(kind, value),
                None => event.with_custom_quantity(name, value),
            };
        }
        if let Some(error_code) = self.error_code {
            event.extra_mut().error_code = Some(error_code);
        }
        if let Some(request_id) = self.request_id {
            event = event.with_request_id(request_id);
        }
        for (key, value) in self.metadata {
            event = event.with_metadata(key, value);
        }
        for tag in self.tags {
            event = event.with_tag(tag);
        }
        event
    }
}
