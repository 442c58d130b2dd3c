//! The messages of the protocol. Each is the rkyv archive of one struct below, behind a frame
//! header whose `kind` names it.
//!
//! Do not reorder fields of any archived type in this file; bump [`crate::PROTOCOL_VERSION`].

use rkyv::{Archive, Deserialize, Serialize};

use crate::{ErrorCode, Event, WireError, limits::*};

/// The kind byte of a frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Welcome = 2,
    Events = 3,
    Ack = 4,
    Error = 5,
    Busy = 6,
    Ping = 7,
    Pong = 8,
    Goodbye = 9,
}

impl Kind {
    pub fn from_u8(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Events,
            4 => Kind::Ack,
            5 => Kind::Error,
            6 => Kind::Busy,
            7 => Kind::Ping,
            8 => Kind::Pong,
            9 => Kind::Goodbye,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Hello => "hello",
            Kind::Welcome => "welcome",
            Kind::Events => "events",
            Kind::Ack => "ack",
            Kind::Error => "error",
            Kind::Busy => "busy",
            Kind::Ping => "ping",
            Kind::Pong => "pong",
            Kind::Goodbye => "goodbye",
        }
    }
}

/// When the server acknowledges a batch.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[rkyv(derive(Debug, PartialEq, Eq))]
#[repr(u8)]
pub enum AckMode {
    /// After the transaction holding every event of the batch has committed.
    #[default]
    Durable = 0,
    /// After the events are validated and queued in the server's memory.
    Accepted = 1,
}

/// Client -> server, first frame of a connection.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Hello {
    pub protocol_version: u8,
    pub api_key: String,
    /// Free text for logs, e.g. `tally-client/0.1`.
    pub client_name: String,
    pub ack_mode: AckMode,
}

/// Server -> client, answer to a valid `Hello`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Welcome {
    /// The tenant the key belongs to; every event of the connection is stored under it.
    pub tenant_id: String,
    pub server_version: String,
    /// Largest payload the server accepts in one frame.
    pub max_frame_bytes: u32,
    /// Largest number of events in one `Events` message.
    pub max_events_per_batch: u32,
    /// Most `Events` messages the client may have sent and not yet seen answered.
    pub credits: u32,
    /// The ack mode in force (the one asked for).
    pub ack_mode: AckMode,
}

/// Client -> server: a batch of events.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct EventBatch {
    /// Chosen by the client, unique among its unanswered batches; echoed in the answer.
    pub sequence: u64,
    pub events: Vec<Event>,
}

/// Server -> client: the batch `sequence` was handled.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Ack {
    pub sequence: u64,
    /// Events newly stored.
    pub stored: u32,
    /// Events already stored earlier (same tenant, event id and timestamp): not counted again.
    pub duplicate: u32,
    /// Events refused, by index in the batch. Refused events were not stored.
    pub rejected: Vec<Rejection>,
}

/// One refused event of a batch.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Rejection {
    pub index: u32,
    pub code: ErrorCode,
    pub message: String,
}

/// Either direction: something went wrong.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct ErrorMessage {
    pub code: ErrorCode,
    pub message: String,
    /// The sender closes the connection after a fatal error.
    pub fatal: bool,
    /// The batch this error answers, when it answers one: none of its events were stored.
    pub sequence: Option<u64>,
}

/// Server -> client: the batch `sequence` was not taken; send it again after the delay.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Busy {
    pub sequence: u64,
    pub retry_after_ms: u32,
}

/// Either direction: liveness check.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Ping {
    pub nonce: u64,
}

/// Answer to `Ping` with its nonce.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Pong {
    pub nonce: u64,
}

/// Server -> client: the server is draining. Batches already sent are still answered; send no
/// new ones and reconnect after the delay.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Goodbye {
    pub reason: String,
    pub reconnect_after_ms: u32,
}

/// Any message, owned.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Events(EventBatch),
    Ack(Ack),
    Error(ErrorMessage),
    Busy(Busy),
    Ping(Ping),
    Pong(Pong),
    Goodbye(Goodbye),
}

impl Message {
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Welcome(_) => Kind::Welcome,
            Message::Events(_) => Kind::Events,
            Message::Ack(_) => Kind::Ack,
            Message::Error(_) => Kind::Error,
            Message::Busy(_) => Kind::Busy,
            Message::Ping(_) => Kind::Ping,
            Message::Pong(_) => Kind::Pong,
            Message::Goodbye(_) => Kind::Goodbye,
        }
    }

    /// Decodes a whole frame's payload into an owned message, validating every byte.
    /// Servers read `Events` with [`access_events`] instead, without copying events.
    pub fn decode(kind: Kind, payload: &[u8]) -> Result<Message, WireError> {
        Ok(match kind {
            Kind::Hello => Message::Hello(owned::<Hello>(kind, payload)?),
            Kind::Welcome => Message::Welcome(owned::<Welcome>(kind, payload)?),
            Kind::Events => Message::Events(owned::<EventBatch>(kind, payload)?),
            Kind::Ack => Message::Ack(owned::<Ack>(kind, payload)?),
            Kind::Error => Message::Error(owned::<ErrorMessage>(kind, payload)?),
            Kind::Busy => Message::Busy(owned::<Busy>(kind, payload)?),
            Kind::Ping => Message::Ping(owned::<Ping>(kind, payload)?),
            Kind::Pong => Message::Pong(owned::<Pong>(kind, payload)?),
            Kind::Goodbye => Message::Goodbye(owned::<Goodbye>(kind, payload)?),
        })
    }

    /// Checks the limits that bytecheck cannot know: text lengths and batch size.
    pub fn check_limits(&self, max_events_per_batch: u32) -> Result<(), WireError> {
        let text_ok = |kind: Kind, text: &str| {
            if text.len() > TEXT_BYTES_MAX {
                let detail = format!("text of {} bytes exceeds {TEXT_BYTES_MAX}", text.len());
                return Err(WireError::InvalidPayload { kind: kind.as_str(), detail });
            }
            Ok(())
        };
        match self {
            Message::Hello(hello) => {
                text_ok(Kind::Hello, &hello.api_key)?;
                text_ok(Kind::Hello, &hello.client_name)
            }
            Message::Events(batch) => batch_size_ok(batch.events.len(), max_events_per_batch),
            Message::Error(error) => text_ok(Kind::Error, &error.message),
            Message::Goodbye(goodbye) => text_ok(Kind::Goodbye, &goodbye.reason),
            Message::Ack(ack) => ack.rejected.iter().try_for_each(|r| text_ok(Kind::Ack, &r.message)),
            Message::Welcome(_) | Message::Busy(_) | Message::Ping(_) | Message::Pong(_) => Ok(()),
        }
    }
}

/// Validates an `Events` payload in place and returns the archived batch without copying it.
/// Events beyond `max_events_per_batch` make the whole batch too large.
pub fn access_events(payload: &[u8], max_events_per_batch: u32) -> Result<&ArchivedEventBatch, WireError> {
    let batch = access::<ArchivedEventBatch>(Kind::Events, payload)?;
    batch_size_ok(batch.events.len(), max_events_per_batch)?;
    Ok(batch)
}

fn batch_size_ok(count: usize, max: u32) -> Result<(), WireError> {
    if count > max as usize {
        return Err(WireError::TooManyEvents { count, max });
    }
    Ok(())
}

/// Validated access. The fast path validates without collecting error details; only a payload
/// that fails is validated again to say why, so the common case never allocates.
fn access<T>(kind: Kind, payload: &[u8]) -> Result<&T, WireError>
where
    T: rkyv::Portable
        + for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Failure>>
        + for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>,
{
    match rkyv::access::<T, rancor::Failure>(payload) {
        Ok(archived) => Ok(archived),
        Err(_) => {
            let detail = match rkyv::access::<T, rancor::Error>(payload) {
                Err(error) => error.to_string(),
                Ok(_) => "validation failed".to_owned(),
            };
            Err(WireError::InvalidPayload { kind: kind.as_str(), detail })
        }
    }
}

fn owned<T>(kind: Kind, payload: &[u8]) -> Result<T, WireError>
where
    T: Archive,
    T::Archived: rkyv::Portable
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rancor::Error>>
        + for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Failure>>
        + for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>,
{
    let archived = access::<T::Archived>(kind, payload)?;
    rkyv::deserialize::<T, rancor::Error>(archived)
        .map_err(|error| WireError::InvalidPayload { kind: kind.as_str(), detail: error.to_string() })
}
