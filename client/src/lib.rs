//! Async Rust client for Tally's binary ingest protocol.
//!
//! [`Client`] speaks the protocol specified in the [`wire`] crate over one TCP connection: it
//! does the handshake, pipelines batches of [`Event`]s within the server's credits, matches every
//! answer to its batch, and resends what got no final answer, reconnecting as needed. [`Tracker`]
//! sits on top for code that wants to record events one at a time and have them batched.
//!
//! ```no_run
//! use client::{Client, ClientConfig, TrackerConfig};
//! use wire::{Event, QuantityKind};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::connect(ClientConfig::new("ingest.example.com:7400", "tk_live_...")).await?;
//!
//! // One batch, waiting for its answer.
//! let event = Event::new("user-42", "llm_service", "openai", "completion")
//!     .with_model("gpt-4o")
//!     .with_quantity(QuantityKind::InputTokens, 1_200.0)
//!     .with_quantity(QuantityKind::OutputTokens, 350.0);
//! let outcome = client.send(vec![event]).await?;
//! for rejection in &outcome.rejected {
//!     eprintln!("event {} refused: {}: {}", rejection.index, rejection.code, rejection.message);
//! }
//!
//! // Pipelining: queue several batches, then wait for their answers.
//! let first = client.submit(vec![Event::new("user-1", "llm_service", "openai", "completion")]).await?;
//! let second = client.submit(vec![Event::new("user-2", "llm_service", "openai", "completion")]).await?;
//! let (first, second) = (first.await?, second.await?);
//! assert_eq!(first.accepted() + second.accepted(), 2);
//!
//! // One event at a time, batched in the background.
//! let tracker = client.tracker(TrackerConfig::default());
//! tracker.track(Event::new("user-7", "ocr_service", "textract", "analyze").with_quantity(QuantityKind::Pages, 3.0)).await?;
//! let report = tracker.close().await?; // flushes; fails with the ids of any unacknowledged event
//! println!("stored {}, rejected {}", report.stored, report.rejected);
//!
//! client.close().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//!
//! - **Credits**: never more batches sent and unanswered than the server's `credits`; callers
//!   beyond that wait in a bounded queue ([`ClientConfig::queue_batches`]), then in
//!   [`Client::submit`].
//! - **Same bytes on resend**: each batch is encoded once, with its sequence and event ids, and
//!   resent byte for byte after a `Busy`, a retryable `Error`, a lost connection, an ack timeout
//!   or a `Goodbye`. The server deduplicates by event id and timestamp, so an event is never
//!   counted twice; one stored before a lost answer comes back as `duplicate`.
//! - **Final answers only**: every submitted event ends as stored, duplicate, rejected (with its
//!   index, code and message), or listed in [`ClientError::Unacknowledged`] once
//!   [`ClientConfig::retry_deadline`] has passed since it was submitted.
//! - With [`wire::AckMode::Durable`] (the default), stored means committed to the database.

mod client;
mod config;
mod driver;
mod error;
mod outcome;
mod session;
mod tracker;

pub use client::Client;
pub use config::ClientConfig;
pub use error::ClientError;
pub use outcome::{BatchOutcome, PendingBatch};
pub use tracker::{FlushError, FlushReport, RejectedEvent, Tracker, TrackerConfig};
pub use wire::{AckMode, ErrorCode, Event, Rejection};
