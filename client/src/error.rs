//! The errors of the client.

use std::{sync::Arc, time::Duration};

use wire::{ErrorCode, WireError};

/// Everything that can go wrong between a caller and the server.
///
/// The error is `Clone` (IO errors are shared behind an `Arc`) because one broken connection is
/// the `last_error` of every batch that was waiting on it. Each message includes its cause, so
/// `to_string()` reads as a whole sentence, e.g. `3 events unacknowledged after the retry deadline:
/// server error: unavailable: storage down`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// A [`ClientConfig`](crate::ClientConfig) value is out of range.
    #[error("invalid client config: {0}")]
    InvalidConfig(String),
    /// The TCP connection could not be opened.
    #[error("failed to connect to {address}: {error}")]
    Connect { address: String, error: Arc<std::io::Error> },
    /// The server refused the `Hello`, e.g. with [`ErrorCode::Unauthorized`] for a bad key.
    #[error("handshake refused: {code}: {message}")]
    Handshake { code: ErrorCode, message: String },
    /// An operation took longer than its configured limit.
    #[error("{operation} timed out after {after:?}")]
    Timeout { operation: &'static str, after: Duration },
    /// The batch got no final answer before [`ClientConfig::retry_deadline`](crate::ClientConfig)
    /// (or the client gave up on it for another reason). These events may or may not be stored:
    /// sending them again with the same ids and timestamps is safe, the server deduplicates.
    #[error("{} events unacknowledged: {last_error}", event_ids.len())]
    Unacknowledged {
        /// The events that got no answer, in the order they were given.
        event_ids: Vec<uuid::Uuid>,
        /// What happened on the last attempt.
        last_error: Box<ClientError>,
    },
    /// The server refused the whole batch with a code that retrying cannot fix (e.g.
    /// [`ErrorCode::TooLarge`]). Nothing of the batch was stored.
    #[error("batch rejected: {code}: {message}")]
    Rejected { code: ErrorCode, message: String },
    /// The server reported an error that is not final by itself: a retryable answer to a batch
    /// or a fatal error on the connection. Seen as the `last_error` of [`ClientError::Unacknowledged`].
    #[error("server error: {code}: {message}")]
    Server { code: ErrorCode, message: String },
    /// The client (or tracker) was closed, or its background task is gone.
    #[error("client is closed")]
    Closed,
    /// A frame could not be encoded or decoded, or the server broke the protocol.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The connection failed after it was established.
    #[error("io: {0}")]
    Io(Arc<std::io::Error>),
}

impl From<std::io::Error> for ClientError {
    fn from(error: std::io::Error) -> Self {
        ClientError::Io(Arc::new(error))
    }
}

impl ClientError {
    /// The protocol code behind this error, when the server sent one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Handshake { code, .. }
            | ClientError::Rejected { code, .. }
            | ClientError::Server { code, .. } => Some(*code),
            ClientError::Unacknowledged { last_error, .. } => last_error.code(),
            _ => None,
        }
    }

    pub(crate) fn connection_closed() -> ClientError {
        let error = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed by the server");
        ClientError::from(error)
    }

    /// A handshake refusal that reconnecting cannot fix (bad key, wrong scope, wrong version).
    pub(crate) fn is_permanent_refusal(&self) -> bool {
        matches!(self, ClientError::Handshake { code, .. } if !code.is_retryable())
    }
}
