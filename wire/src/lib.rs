//! Tally's binary ingest protocol, sans IO: frames, messages, the usage event, limits and error
//! codes. This page is the normative specification; a second client can be written from it.
//!
//! # Transport
//!
//! One TCP connection carries a sequence of frames in each direction. All integers in headers are
//! little-endian. A connection starts with a handshake (`Hello` -> `Welcome`), after which the
//! client sends `Events` and the server answers each with exactly one of `Ack`, `Busy` or `Error`
//! carrying the batch's `sequence`.
//!
//! # Frame layout
//!
//! ```text
//!  0       2       3       4       5                       8                              12
//!  +-------+-------+-------+-------+-----------------------+-------------------------------+
//!  | 'T' 'L'       |version| kind  | flags | reserved (3)  | payload length (u32 LE)       |
//!  +-------+-------+-------+-------+-----------------------+-------------------------------+
//!  | payload: `payload length` bytes, the rkyv archive of the message named by `kind`     |
//!  +---------------------------------------------------------------------------------------+
//! ```
//!
//! - `magic` is the two bytes `TL`. Anything else: [`WireError::BadMagic`], fatal.
//! - `version` is [`PROTOCOL_VERSION`] (1). Any other value: [`ErrorCode::UnsupportedVersion`],
//!   fatal. A frame of an unknown version is never interpreted.
//! - `kind` is one of [`Kind`]: 1 Hello, 2 Welcome, 3 Events, 4 Ack, 5 Error, 6 Busy, 7 Ping,
//!   8 Pong, 9 Goodbye. Any other value: [`ErrorCode::BadFrame`], fatal.
//! - `flags` and the three reserved bytes are zero in version 1; anything else is a bad frame.
//! - `payload length` is checked against the receiver's limit before any byte of the payload is
//!   buffered: [`HANDSHAKE_PAYLOAD_BYTES_MAX`] (16 KiB) until `Welcome`, then the negotiated
//!   `max_frame_bytes` (default 4 MiB, never above 16 MiB). Over it: [`ErrorCode::TooLarge`], fatal.
//!
//! # Payloads
//!
//! A payload is an archive made by rkyv 0.8 with the features `little_endian`, `unaligned` and
//! `pointer_width_32` (so a payload may start at any address and needs no copy), with the root
//! object at the end, as `rkyv::to_bytes` writes it. Receivers always validate payloads
//! (bytecheck) before use; a payload that fails validation (bad pointers, invalid UTF-8, invalid
//! enum tags, trailing garbage) is [`ErrorCode::BadFrame`], fatal. The structs are:
//! [`Hello`], [`Welcome`], [`EventBatch`], [`Ack`], [`ErrorMessage`], [`Busy`], [`Ping`], [`Pong`],
//! [`Goodbye`]; their field order is the archive layout. **Do not reorder fields of an archived
//! type: change the layout only with a new protocol version.**
//!
//! # Handshake
//!
//! 1. Client sends `Hello { protocol_version: 1, api_key, client_name, ack_mode }`. `api_key` and
//!    `client_name` are at most [`TEXT_BYTES_MAX`] bytes.
//! 2. Server answers `Welcome { tenant_id, server_version, max_frame_bytes, max_events_per_batch,
//!    credits, ack_mode }`, or a fatal `Error` (`unauthorized` for a missing, unknown, revoked or
//!    expired key; `forbidden` for a key without the ingest scope; `unsupported_version`) and closes.
//! 3. Both sides then apply `max_frame_bytes` to every frame.
//!
//! # Batches, credits and answers
//!
//! - `EventBatch { sequence, events }` carries 1 to `max_events_per_batch` events. `sequence` is the
//!   client's choice and must be unique among its unanswered batches.
//! - The client may have at most `credits` batches sent and not yet answered. The server stops
//!   reading a connection that exceeds it; that is the protocol's backpressure.
//! - Each batch gets exactly one answer with its sequence:
//!   - `Ack { sequence, stored, duplicate, rejected }`: every event of the batch was either stored
//!     (`stored`), found stored already (`duplicate`: same tenant, `event_id` and `timestamp_us`),
//!     or refused (`rejected`: index, code, message). `stored + duplicate + rejected.len()` equals
//!     the batch size. One bad event never affects the others.
//!   - `Busy { sequence, retry_after_ms }`: nothing of the batch was taken; send it again later.
//!   - `Error { code, message, fatal, sequence: Some(sequence) }`: nothing of the batch was stored
//!     (e.g. `too_large`, `unavailable`); retry if `code` is retryable.
//! - Answers may arrive in any order.
//!
//! # What an ack means
//!
//! With `ack_mode = durable` (the default), an `Ack` is sent only after the database transaction
//! holding every stored event of the batch has committed: an acknowledged event survives a crash
//! of the server. With `accepted`, the ack is sent once the events are validated and queued in
//! the server's memory: faster, and lost if the server crashes before the commit. In both modes,
//! sending a batch again with the same event ids and timestamps never counts an event twice, so a
//! client that did not receive an answer resends the batch unchanged.
//!
//! # The event
//!
//! [`Event`]: `event_id` (16 bytes, a UUID, never nil), `timestamp_us` (microseconds since the Unix
//! epoch, UTC, from 2000 to 2100), `user_id` (1-255 bytes), `service_type`, `service_provider`,
//! `event_type` (1-64 bytes of `A-Z a-z 0-9 _ . : -`), optional `model` (1-128 bytes), `status`,
//! optional `latency_ms` (finite, 0 to 3,600,000), `quantities` (well-known [`QuantityKind`]s,
//! each at most once, finite, 0 to 2^53), and an optional out-of-line [`Extra`] with `error_code`
//! (only when `status` is error), `session_id`, `request_id` (1-128 bytes each),
//! `custom_quantities` (names of `a-z 0-9 _`, 1-64 bytes, unique, not well-known names; at most
//! [`QUANTITIES_MAX`] quantities in all), `metadata` (at most 32 unique keys of 1-64 bytes, values
//! up to 1,024 bytes) and `tags` (at most 32, 1-64 bytes each). Text never holds control
//! characters. An event that breaks a rule is rejected alone with [`ErrorCode::InvalidEvent`] and
//! a message that names the field ([`validate`]). The tenant is never in an event.
//!
//! # Errors
//!
//! [`ErrorCode`] is closed: `bad_frame`, `unsupported_version`, `unauthorized`, `forbidden`,
//! `invalid_event`, `too_large`, `rate_limited`, `busy`, `unavailable`, `internal`. The HTTP API
//! uses the same codes ([`ErrorCode::http_status`]). `rate_limited`, `busy`, `unavailable` and
//! `internal` are retryable ([`ErrorCode::is_retryable`]).
//!
//! # Other messages
//!
//! `Ping { nonce }` is answered by `Pong { nonce }` (either side may ping). `Goodbye { reason,
//! reconnect_after_ms }` from the server means it is draining: it still answers every batch
//! already received, then closes; the client sends nothing new on that connection and reconnects
//! after the delay.
//!
//! # Versioning
//!
//! The version byte changes whenever any archived layout, kind, code or rule changes. Peers do not
//! negotiate down: a server that does not speak the client's version answers
//! `unsupported_version` (encoded in version 1 framing) and closes.

mod codec;
mod error;
mod event;
pub mod limits;
mod message;

pub use codec::{EncodedFrame, Frame, Header, MAGIC, WireCodec, encode_message, parse_header};
pub use error::{ErrorCode, WireError};
pub use event::{
    ArchivedEvent, ArchivedExtra, ArchivedQuantityKind, ArchivedStatus, CustomQuantity, Event, EventError,
    EventFields, Extra, MetadataEntry, Quantity, QuantityKind, Status, validate,
};
pub use limits::{HANDSHAKE_PAYLOAD_BYTES_MAX, PROTOCOL_VERSION, QUANTITIES_MAX, TEXT_BYTES_MAX};
pub use message::{
    Ack, AckMode, ArchivedEventBatch, Busy, ErrorMessage, EventBatch, Goodbye, Hello, Kind, Message, Ping,
    Pong, Rejection, Welcome, access_events,
};
