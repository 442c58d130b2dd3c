//! How a client connects, waits and retries.

use std::time::Duration;

use wire::{AckMode, TEXT_BYTES_MAX, limits::BATCH_EVENTS_DEFAULT};

use crate::ClientError;

/// Settings of a [`Client`](crate::Client). Build one with [`ClientConfig::new`] and change the
/// fields you need; every field documents its default.
#[derive(Clone)]
pub struct ClientConfig {
    /// `host:port` of the ingest server, resolved again on every (re)connection.
    pub address: String,
    /// The tenant's API key, sent in `Hello`. At most 1,024 bytes. Never printed by `Debug`.
    pub api_key: String,
    /// Free text for the server's logs. Default: `tally-client/<version>`.
    pub client_name: String,
    /// When the server acknowledges a batch. Default: [`AckMode::Durable`].
    pub ack_mode: AckMode,
    /// Limit on opening the TCP connection. Default: 5 s.
    pub connect_timeout: Duration,
    /// Limit on `Hello` -> `Welcome`. Default: 5 s.
    pub handshake_timeout: Duration,
    /// How long a sent batch may stay without any answer before the connection is considered
    /// broken (it is then closed, reopened, and the batch sent again). Also bounds every write.
    /// Default: 30 s.
    pub ack_timeout: Duration,
    /// First delay before reconnecting, and before resending a batch refused with a retryable
    /// error; doubled on each consecutive failure up to `reconnect_backoff_max`, with jitter.
    /// Default: 100 ms.
    pub reconnect_backoff_initial: Duration,
    /// Longest delay between two attempts. Default: 10 s.
    pub reconnect_backoff_max: Duration,
    /// How long after it was submitted a batch may stay unanswered before the client gives up on
    /// it with [`ClientError::Unacknowledged`]. Default: 60 s.
    pub retry_deadline: Duration,
    /// Most events in one `Events` message; the smaller of this and the server's limit applies.
    /// Larger submissions are split. Default: 10,000.
    pub max_batch_events: u32,
    /// Batches that may wait in the client's queue for a credit. When the queue is full,
    /// [`Client::submit`](crate::Client::submit) waits. Default: 64.
    pub queue_batches: usize,
}

impl ClientConfig {
    /// A config with every default, for this server and key.
    pub fn new(address: impl Into<String>, api_key: impl Into<String>) -> ClientConfig {
        ClientConfig {
            address: address.into(),
            api_key: api_key.into(),
            client_name: concat!("tally-client/", env!("CARGO_PKG_VERSION")).to_owned(),
            ack_mode: AckMode::Durable,
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(30),
            reconnect_backoff_initial: Duration::from_millis(100),
            reconnect_backoff_max: Duration::from_secs(10),
            retry_deadline: Duration::from_secs(60),
            max_batch_events: BATCH_EVENTS_DEFAULT,
            queue_batches: 64,
        }
    }

    /// Checks every value once, before connecting.
    pub(crate) fn validate(&self) -> Result<(), ClientError> {
        let invalid = |reason: String| Err(ClientError::InvalidConfig(reason));
        let timeouts = [
            ("connect_timeout", self.connect_timeout),
            ("handshake_timeout", self.handshake_timeout),
            ("ack_timeout", self.ack_timeout),
            ("reconnect_backoff_initial", self.reconnect_backoff_initial),
            ("retry_deadline", self.retry_deadline),
        ];
        if let Some((name, _)) = timeouts.iter().find(|(_, value)| value.is_zero()) {
            return invalid(format!("{name} must be more than zero"));
        }
        if self.reconnect_backoff_max < self.reconnect_backoff_initial {
            return invalid("reconnect_backoff_max is below reconnect_backoff_initial".to_owned());
        }
        if self.max_batch_events == 0 || self.queue_batches == 0 {
            return invalid("max_batch_events and queue_batches must be at least 1".to_owned());
        }
        if self.api_key.len() > TEXT_BYTES_MAX || self.client_name.len() > TEXT_BYTES_MAX {
            return invalid(format!("api_key and client_name are limited to {TEXT_BYTES_MAX} bytes"));
        }
        Ok(())
    }
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("address", &self.address)
            .field("api_key", &"<redacted>")
            .field("client_name", &self.client_name)
            .field("ack_mode", &self.ack_mode)
            .field("connect_timeout", &self.connect_timeout)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("ack_timeout", &self.ack_timeout)
            .field("reconnect_backoff_initial", &self.reconnect_backoff_initial)
            .field("reconnect_backoff_max", &self.reconnect_backoff_max)
            .field("retry_deadline", &self.retry_deadline)
            .field("max_batch_events", &self.max_batch_events)
            .field("queue_batches", &self.queue_batches)
            .finish()
    }
}

/// The delay before attempt `attempt + 1`: `initial * 2^attempt`, capped at `max`, then
/// jittered into its upper half so that many clients cut off at once do not come back at once.
pub(crate) fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let base = initial.saturating_mul(1 << attempt.min(20)).min(max);
    // A v4 UUID is 122 random bits; the client needs no other source of randomness.
    let random = (uuid::Uuid::new_v4().as_u128() % 1_000) as u32;
    base / 2 + (base / 2) * random / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_bounds_and_caps() {
        let (initial, max) = (Duration::from_millis(100), Duration::from_secs(2));
        for attempt in 0..40 {
            let base = (initial * 2u32.pow(attempt.min(20))).min(max);
            let delay = backoff(initial, max, attempt);
            assert!(delay >= base / 2 && delay <= base, "attempt {attempt}: {delay:?} for base {base:?}");
        }
    }

    #[test]
    fn validate_refuses_zero_timeouts_and_inverted_backoff() {
        let mut config = ClientConfig::new("127.0.0.1:1", "key");
        assert!(config.validate().is_ok());
        config.ack_timeout = Duration::ZERO;
        assert!(
            matches!(config.validate(), Err(ClientError::InvalidConfig(reason)) if reason.contains("ack_timeout"))
        );
        config.ack_timeout = Duration::from_secs(1);
        config.reconnect_backoff_max = Duration::from_millis(1);
        assert!(config.validate().is_err());
    }

    #[test]
    fn debug_hides_the_api_key() {
        let config = ClientConfig::new("127.0.0.1:1", "secret-key");
        assert!(!format!("{config:?}").contains("secret-key"));
    }
}
