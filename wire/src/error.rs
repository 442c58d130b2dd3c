//! The closed set of error codes shared by the binary protocol and the HTTP API, and the errors of
//! decoding.

use rkyv::{Archive, Deserialize, Serialize};

/// Why a request, a batch or one event was refused. Closed: a new code needs a protocol version.
///
/// Do not reorder or renumber variants; bump [`crate::PROTOCOL_VERSION`] instead.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug, PartialEq, Eq))]
#[repr(u8)]
pub enum ErrorCode {
    /// The bytes do not form a valid frame or payload. Fatal to a connection.
    BadFrame = 1,
    /// The frame or `Hello` names a protocol version this peer does not speak. Fatal.
    UnsupportedVersion = 2,
    /// No API key, or an unknown, revoked or expired one. Fatal.
    Unauthorized = 3,
    /// The key is valid but may not do this (wrong scope, other tenant).
    Forbidden = 4,
    /// One event breaks a rule of the protocol or of the tenant's service registry.
    InvalidEvent = 5,
    /// A frame, a batch or a field is larger than its limit.
    TooLarge = 6,
    /// The tenant is over its rate limit or quota. Retry later.
    RateLimited = 7,
    /// The server's queues are full. Retry after the given delay.
    Busy = 8,
    /// Storage is unavailable; nothing was stored. Retry later.
    Unavailable = 9,
    /// A bug or an unexpected failure on the server. Nothing was stored.
    Internal = 10,
}

impl ErrorCode {
    /// Every code, in order.
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::BadFrame,
        ErrorCode::UnsupportedVersion,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::InvalidEvent,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::Busy,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    /// The snake_case name used in JSON bodies, metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::InvalidEvent => "invalid_event",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Busy => "busy",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status that carries this code. The one place the mapping is made.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadFrame | ErrorCode::InvalidEvent => 400,
            ErrorCode::UnsupportedVersion => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::TooLarge => 413,
            ErrorCode::RateLimited => 429,
            ErrorCode::Busy | ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }

    /// Whether sending the same thing again later can succeed. Decided here and nowhere else.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::RateLimited | ErrorCode::Busy | ErrorCode::Unavailable | ErrorCode::Internal
        )
    }

    /// The code for a byte on the wire, if it names one.
    pub fn from_u8(byte: u8) -> Option<ErrorCode> {
        ErrorCode::ALL.get(usize::from(byte).wrapping_sub(1)).copied()
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A frame or payload that could not be decoded. Every variant maps to one [`ErrorCode`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad magic bytes {0:02x?}: not a tally frame")]
    BadMagic([u8; 2]),
    #[error("unsupported protocol version {0}, this peer speaks {PROTOCOL_VERSION}", PROTOCOL_VERSION = crate::PROTOCOL_VERSION)]
    UnsupportedVersion(u8),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("reserved header bits are set: flags {flags:#04x}, reserved {reserved:02x?}")]
    ReservedBits { flags: u8, reserved: [u8; 3] },
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: u32, max: u32 },
    #[error("invalid {kind} payload: {detail}")]
    InvalidPayload { kind: &'static str, detail: String },
    #[error("batch of {count} events exceeds the limit of {max}")]
    TooManyEvents { count: usize, max: u32 },
    #[error("expected a {expected} message, got {got}")]
    UnexpectedKind { expected: &'static str, got: &'static str },
    #[error("failed to encode {kind}: {detail}")]
    Encode { kind: &'static str, detail: String },
    #[error("connection closed in the middle of a frame ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
    #[error("io: {0}")]
    Io(String),
}

impl WireError {
    /// The protocol code that reports this error to the peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            WireError::FrameTooLarge { .. } | WireError::TooManyEvents { .. } => ErrorCode::TooLarge,
            WireError::Encode { .. } | WireError::Io(_) => ErrorCode::Internal,
            WireError::BadMagic(_)
            | WireError::UnknownKind(_)
            | WireError::ReservedBits { .. }
            | WireError::InvalidPayload { .. }
            | WireError::UnexpectedKind { .. }
            | WireError::Truncated { .. } => ErrorCode::BadFrame,
        }
    }
}

impl From<std::io::Error> for WireError {
    fn from(error: std::io::Error) -> Self {
        WireError::Io(error.to_string())
    }
}
