//! Every limit of the protocol, in one place. Servers may negotiate smaller values in `Welcome`,
//! never larger ones.

/// Version carried in every frame header. A peer refuses any other value.
pub const PROTOCOL_VERSION: u8 = 1;

/// Bytes in a frame header (see the crate docs for the layout).
pub const HEADER_BYTES: usize = 12;

/// Largest payload a server may ever negotiate: 16 MiB.
pub const FRAME_PAYLOAD_BYTES_CEILING: u32 = 16 * 1024 * 1024;
/// Default negotiated payload limit: 4 MiB holds 10,000 typical events with room to spare.
pub const FRAME_PAYLOAD_BYTES_DEFAULT: u32 = 4 * 1024 * 1024;
/// Payload limit before the handshake is complete (`Hello`, `Welcome`, `Error`).
pub const HANDSHAKE_PAYLOAD_BYTES_MAX: u32 = 16 * 1024;

/// Largest number of events a server may ever allow in one `Events` message.
pub const BATCH_EVENTS_CEILING: u32 = 50_000;
/// Default negotiated number of events per `Events` message.
pub const BATCH_EVENTS_DEFAULT: u32 = 10_000;
/// Default number of unacknowledged `Events` messages a client may have in flight.
pub const CREDITS_DEFAULT: u32 = 8;
/// Largest credit grant a server may ever negotiate.
pub const CREDITS_CEILING: u32 = 256;

/// `user_id`: 1 to this many bytes of UTF-8.
pub const USER_ID_BYTES_MAX: usize = 255;
/// `service_type`, `service_provider`, `event_type`: 1 to this many bytes.
pub const NAME_BYTES_MAX: usize = 64;
/// `model`, `error_code`, `session_id`, `request_id`: at most this many bytes.
pub const IDENT_BYTES_MAX: usize = 128;
/// Named quantities per event, well-known and custom together.
pub const QUANTITIES_MAX: usize = 32;
/// Metadata entries per event.
pub const METADATA_ENTRIES_MAX: usize = 32;
/// Metadata key bytes.
pub const METADATA_KEY_BYTES_MAX: usize = 64;
/// Metadata value bytes.
pub const METADATA_VALUE_BYTES_MAX: usize = 1024;
/// Tags per event.
pub const TAGS_MAX: usize = 32;
/// Bytes per tag.
pub const TAG_BYTES_MAX: usize = 64;
/// Largest value of one quantity (2^53: every integer up to it is exact in an `f64`).
pub const QUANTITY_VALUE_MAX: f64 = 9_007_199_254_740_992.0;
/// Largest latency: one hour, in microseconds.
pub const LATENCY_US_MAX: u32 = 3_600_000_000;
/// Earliest accepted timestamp: 2000-01-01T00:00:00Z in microseconds since the Unix epoch.
pub const TIMESTAMP_US_MIN: i64 = 946_684_800_000_000;
/// Latest accepted timestamp: 2100-01-01T00:00:00Z in microseconds since the Unix epoch.
pub const TIMESTAMP_US_MAX: i64 = 4_102_444_800_000_000;
/// `api_key` and `client_name` in `Hello`; `message` in `Error`, `Goodbye` and rejections.
pub const TEXT_BYTES_MAX: usize = 1024;

const _: () = assert!(FRAME_PAYLOAD_BYTES_DEFAULT <= FRAME_PAYLOAD_BYTES_CEILING);
const _: () = assert!(HANDSHAKE_PAYLOAD_BYTES_MAX <= FRAME_PAYLOAD_BYTES_DEFAULT);
const _: () = assert!(BATCH_EVENTS_DEFAULT <= BATCH_EVENTS_CEILING);
const _: () = assert!(CREDITS_DEFAULT <= CREDITS_CEILING);
// A frame length is a u32 and the ceiling leaves room for the header.
const _: () = assert!((FRAME_PAYLOAD_BYTES_CEILING as u64) + (HEADER_BYTES as u64) < u32::MAX as u64);
