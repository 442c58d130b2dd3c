//! The client handle: connect, submit batches, close.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use wire::{EncodedFrame, Event, EventBatch, Message, Welcome, WireError};

use crate::{
    BatchOutcome, ClientConfig, ClientError, PendingBatch, Tracker, TrackerConfig,
    driver::{Driver, Submission},
    outcome::PendingPart,
    session::{self, Limits},
};

/// A connection to a Tally ingest server, shared by cloning.
///
/// One background task owns the TCP connection; every clone submits to it through a bounded
/// queue. The task is stopped by [`Client::close`], or once every clone (and every
/// [`Tracker`]) is dropped and the batches already submitted are answered.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Arc<ClientConfig>,
    submissions: mpsc::Sender<Submission>,
    welcome: watch::Receiver<Welcome>,
    /// Unique for the client's life, so never reused among unanswered batches.
    next_sequence: AtomicU64,
    close: CancellationToken,
    finished: CancellationToken,
}

impl Client {
    /// Connects and completes the handshake, then starts the background task.
    ///
    /// Fails with [`ClientError::Connect`] or [`ClientError::Timeout`] when the server cannot be
    /// reached, and [`ClientError::Handshake`] when it refuses the key
    /// ([`wire::ErrorCode::Unauthorized`]), the scope or the protocol version. This first
    /// connection is not retried; later ones are.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        config.validate()?;
        let config = Arc::new(config);
        let session = session::open(config.clone()).await?;
        tracing::info!(
            address = %config.address,
            tenant_id = %session.welcome.tenant_id,
            server_version = %session.welcome.server_version,
            credits = session.welcome.credits,
            "connected",
        );
        let (submissions, submissions_receiver) = mpsc::channel(config.queue_batches);
        let (welcome_sender, welcome) = watch::channel(session.welcome.clone());
        let (close, finished) = (CancellationToken::new(), CancellationToken::new());
        let driver =
            Driver::new(config.clone(), session, submissions_receiver, welcome_sender, close.clone());
        tokio::spawn(driver.run(finished.clone()));
        let next_sequence = AtomicU64::new(1);
        Ok(Client { inner: Arc::new(Inner { config, submissions, welcome, next_sequence, close, finished }) })
    }

    /// Sends events and waits for the server's answer: `submit(events).await?.await`.
    pub async fn send(&self, events: Vec<Event>) -> Result<BatchOutcome, ClientError> {
        self.submit(events).await?.outcome().await
    }

    /// Queues events for sending and returns once they are queued, so that callers can pipeline;
    /// await the returned [`PendingBatch`] for the answer.
    ///
    /// Each batch is encoded once, here, and those bytes are what every resend writes. Events
    /// beyond the negotiated batch size (the smaller of [`ClientConfig::max_batch_events`] and the
    /// server's) or the frame size are split into several batches. Waits while the queue is full:
    /// that is the server's backpressure reaching the caller. Fails with [`ClientError::Closed`]
    /// after [`Client::close`]. If the future is dropped while waiting, a prefix of the batches
    /// may already be queued; they are still delivered.
    pub async fn submit(&self, events: Vec<Event>) -> Result<PendingBatch, ClientError> {
        if self.inner.close.is_cancelled() {
            return Err(ClientError::Closed);
        }
        let limits = self.limits();
        let mut encoded = Vec::new();
        for (chunk_index, chunk) in chunks(events, limits.batch_events_max as usize).into_iter().enumerate() {
            let offset = u32::try_from(chunk_index * limits.batch_events_max as usize)
                .map_err(|_| WireError::TooManyEvents { count: usize::MAX, max: u32::MAX })?;
            let sequences = &self.inner.next_sequence;
            encode(chunk, offset, limits.frame_payload_bytes_max, sequences, &mut encoded)?;
        }
        let submitted_at = Instant::now();
        let mut parts = Vec::with_capacity(encoded.len());
        for batch in encoded {
            let (reply, answer) = oneshot::channel();
            let part = PendingPart { offset: batch.offset, event_ids: batch.event_ids.clone(), answer };
            let submission = Submission {
                sequence: batch.sequence,
                frame: batch.frame,
                event_ids: batch.event_ids,
                submitted_at,
                reply,
            };
            if let Err(mpsc::error::SendError(submission)) = self.inner.submissions.send(submission).await {
                if parts.is_empty() {
                    return Err(ClientError::Closed);
                }
                // Earlier parts are queued and will be answered; this one will not.
                let _ = submission.reply.send(Err(ClientError::Closed));
            }
            parts.push(part);
        }
        Ok(PendingBatch { parts })
    }

    /// A [`Tracker`] on this client: buffers single events and sends them in batches.
    pub fn tracker(&self, config: TrackerConfig) -> Tracker {
        Tracker::start(self.clone(), config)
    }

    /// What the server granted on the current (or last) connection.
    pub fn welcome(&self) -> Welcome {
        self.inner.welcome.borrow().clone()
    }

    /// The config the client was built with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Stops accepting submissions (from every clone) and waits until every batch already
    /// submitted has its final answer or was given up on at its deadline; then the connection is
    /// closed. Answers still go to the [`PendingBatch`]es.
    pub async fn close(&self) {
        self.inner.close.cancel();
        self.inner.finished.cancelled().await;
    }

    pub(crate) fn limits(&self) -> Limits {
        Limits::new(&self.inner.welcome.borrow(), &self.inner.config)
    }
}

struct EncodedBatch {
    sequence: u64,
    offset: u32,
    event_ids: Arc<[uuid::Uuid]>,
    frame: EncodedFrame,
}

/// Encodes one batch; a batch too large for a frame is halved until every half fits.
fn encode(
    events: Vec<Event>,
    offset: u32,
    frame_payload_bytes_max: u32,
    sequences: &AtomicU64,
    encoded: &mut Vec<EncodedBatch>,
) -> Result<(), ClientError> {
    let event_ids: Arc<[uuid::Uuid]> = events.iter().map(Event::id).collect();
    let count = events.len();
    let sequence = sequences.fetch_add(1, Ordering::Relaxed);
    let message = Message::Events(EventBatch { sequence, events });
    match EncodedFrame::encode(&message, frame_payload_bytes_max) {
        Ok(frame) => {
            encoded.push(EncodedBatch { sequence, offset, event_ids, frame });
            Ok(())
        }
        Err(error @ WireError::FrameTooLarge { .. }) if count > 1 => {
            let Message::Events(EventBatch { events: mut first, .. }) = message else {
                return Err(error.into());
            };
            tracing::debug!(count, %error, "batch too large for one frame, splitting it");
            let second = first.split_off(count / 2);
            encode(first, offset, frame_payload_bytes_max, sequences, encoded)?;
            encode(second, offset + (count / 2) as u32, frame_payload_bytes_max, sequences, encoded)
        }
        Err(error) => Err(error.into()),
    }
}

/// Splits events into runs of at most `size`, moving them (no event is cloned).
fn chunks(events: Vec<Event>, size: usize) -> Vec<Vec<Event>> {
    let size = size.max(1);
    if events.len() <= size {
        return if events.is_empty() { Vec::new() } else { vec![events] };
    }
    let mut chunks = Vec::with_capacity(events.len().div_ceil(size));
    let mut events = events.into_iter().peekable();
    while events.peek().is_some() {
        chunks.push(events.by_ref().take(size).collect());
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(count: usize) -> Vec<Event> {
        (0..count)
            .map(|index| Event::new(format!("user-{index}"), "llm_service", "openai", "completion"))
            .collect()
    }

    #[test]
    fn chunks_keep_order_and_size() {
        let input = events(10);
        let ids: Vec<_> = input.iter().map(Event::id).collect();
        let output = chunks(input, 4);
        let sizes: Vec<usize> = output.iter().map(Vec::len).collect();
        assert_eq!(sizes, [4, 4, 2]);
        let output_ids: Vec<_> = output.iter().flatten().map(Event::id).collect();
        assert_eq!(output_ids, ids);
        assert!(chunks(Vec::new(), 4).is_empty());
        assert_eq!(chunks(events(3), 4).len(), 1);
    }

    #[test]
    fn a_batch_too_large_for_a_frame_is_halved_until_it_fits() {
        let input = events(10);
        let ids: Vec<_> = input.iter().map(Event::id).collect();
        let one_event_bytes =
            EncodedFrame::encode(&Message::Events(EventBatch { sequence: 1, events: events(1) }), u32::MAX)
                .expect("one event encodes")
                .0
                .len() as u32;
        let sequences = AtomicU64::new(1);
        let mut encoded = Vec::new();
        encode(input, 0, one_event_bytes * 3, &sequences, &mut encoded).expect("halves fit");
        let offsets: Vec<u32> = encoded.iter().map(|batch| batch.offset).collect();
        let sizes: Vec<usize> = encoded.iter().map(|batch| batch.event_ids.len()).collect();
        assert!(encoded.len() > 1, "ten events do not fit in a frame sized for three");
        let header_bytes = wire::limits::HEADER_BYTES;
        assert!(
            encoded.iter().all(|batch| batch.frame.0.len() - header_bytes <= (one_event_bytes * 3) as usize)
        );
        let mut expected_offset = 0;
        for (offset, size) in offsets.iter().zip(&sizes) {
            assert_eq!(*offset, expected_offset);
            expected_offset += *size as u32;
        }
        let encoded_ids: Vec<_> = encoded.iter().flat_map(|batch| batch.event_ids.iter().copied()).collect();
        assert_eq!(encoded_ids, ids);
        let mut sequences_used: Vec<u64> = encoded.iter().map(|batch| batch.sequence).collect();
        sequences_used.dedup();
        assert_eq!(sequences_used.len(), encoded.len(), "every batch has its own sequence");
    }
}
