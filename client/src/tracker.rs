//! Fire-and-forget event tracking on top of a [`Client`]: buffer, batch, flush in the background.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::{StreamExt, future::BoxFuture, stream::FuturesUnordered};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use wire::{ErrorCode, Event};

use crate::{BatchOutcome, Client, ClientError, driver::sleep_until};

/// Settings of a [`Tracker`]; [`TrackerConfig::default`] documents each default.
#[derive(Debug, Clone)]
pub struct TrackerConfig {
    /// A batch is sent once it holds this many events (capped by the server's batch limit).
    /// Default: 500.
    pub batch_size: usize,
    /// A batch is sent at the latest this long after its first event was tracked. Default: 1 s.
    pub flush_interval: Duration,
    /// Events that may wait for the background task; when full, [`Tracker::track`] waits.
    /// Default: 10,000.
    pub buffer_events: usize,
    /// Most rejected events and unacknowledged event ids kept with their details between two
    /// flushes; beyond it they are only counted. Default: 1,000.
    pub report_details_max: usize,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            batch_size: 500,
            flush_interval: Duration::from_secs(1),
            buffer_events: 10_000,
            report_details_max: 1_000,
        }
    }
}

/// What happened to the events tracked since the previous flush.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// Events newly stored.
    pub stored: u64,
    /// Events the server already held (sent again after a lost answer): not counted twice.
    pub duplicate: u64,
    /// Events refused by the server; resending them will not help.
    pub rejected: u64,
    /// The first [`TrackerConfig::report_details_max`] rejected events, with the reason.
    pub rejections: Vec<RejectedEvent>,
    /// Events that got no final answer (details in the [`FlushError`]).
    pub unacknowledged: u64,
}

/// One tracked event the server refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedEvent {
    /// The id the event was tracked with.
    pub event_id: uuid::Uuid,
    /// Why, e.g. [`ErrorCode::InvalidEvent`].
    pub code: ErrorCode,
    /// The server's explanation, naming the field.
    pub message: String,
}

/// A flush or close during which some events got no final answer. `error` is
/// [`ClientError::Unacknowledged`] with their ids (the first
/// [`TrackerConfig::report_details_max`]; `report.unacknowledged` counts them all), or
/// [`ClientError::Closed`] when the tracker's task is gone.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{error}")]
pub struct FlushError {
    /// Everything else that happened since the previous flush.
    pub report: FlushReport,
    /// Why some events have no final answer.
    pub error: ClientError,
}

/// Buffers single events and sends them in batches, in the background.
///
/// A batch leaves when it has [`TrackerConfig::batch_size`] events or its first event is
/// [`TrackerConfig::flush_interval`] old. The buffer is bounded: when
/// [`TrackerConfig::buffer_events`] events wait, [`Tracker::track`] waits too, which is how a slow
/// or unreachable server slows the caller down instead of exhausting memory.
///
/// Nothing is dropped silently: [`Tracker::flush`] and [`Tracker::close`] return what happened
/// to every event tracked since the previous flush. A tracker dropped without `close` logs a
/// warning with the number of events not yet acknowledged, and its task still delivers them
/// (logging the result) as long as the runtime runs.
#[derive(Debug)]
pub struct Tracker {
    commands: mpsc::Sender<Command>,
    /// Tracked and not yet finally answered.
    unsettled: Arc<AtomicU64>,
    closed: bool,
}

#[derive(Debug)]
enum Command {
    Track(Event),
    Flush(oneshot::Sender<Result<FlushReport, FlushError>>),
}

impl Tracker {
    pub(crate) fn start(client: Client, config: TrackerConfig) -> Tracker {
        let (commands, receiver) = mpsc::channel(config.buffer_events.max(1));
        let unsettled = Arc::new(AtomicU64::new(0));
        let batch_size = config.batch_size.clamp(1, client.limits().batch_events_max as usize);
        let task = TrackerTask {
            client,
            config: TrackerConfig { batch_size, ..config },
            commands: receiver,
            buffer: Vec::new(),
            buffer_started: None,
            pending: FuturesUnordered::new(),
            report: Report::default(),
            unsettled: unsettled.clone(),
        };
        tokio::spawn(task.run());
        Tracker { commands, unsettled, closed: false }
    }

    /// Adds one event to the buffer. Waits while the buffer is full. Fails with
    /// [`ClientError::Closed`] only when the tracker's task is gone (the event is then dropped,
    /// and the caller knows it).
    pub async fn track(&self, event: Event) -> Result<(), ClientError> {
        self.unsettled.fetch_add(1, Ordering::Relaxed);
        if self.commands.send(Command::Track(event)).await.is_err() {
            self.unsettled.fetch_sub(1, Ordering::Relaxed);
            return Err(ClientError::Closed);
        }
        Ok(())
    }

    /// Sends everything tracked so far and waits until each event has its final answer (or was
    /// given up on); returns what happened to the events tracked since the previous flush.
    pub async fn flush(&self) -> Result<FlushReport, FlushError> {
        let (reply, answer) = oneshot::channel();
        let closed = || FlushError { report: FlushReport::default(), error: ClientError::Closed };
        self.commands.send(Command::Flush(reply)).await.map_err(|_| closed())?;
        answer.await.unwrap_or_else(|_| Err(closed()))
    }

    /// Flushes, then stops the tracker's task. The client stays open.
    pub async fn close(mut self) -> Result<FlushReport, FlushError> {
        let result = self.flush().await;
        self.closed = true;
        // Dropping the sender ends the task, which has nothing left to send.
        result
    }

    /// Events tracked and not yet finally answered.
    pub fn unsettled_events(&self) -> u64 {
        self.unsettled.load(Ordering::Relaxed)
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let unsettled = self.unsettled.load(Ordering::Relaxed);
        if !self.closed && unsettled > 0 {
            tracing::warn!(
                unsettled,
                "tracker dropped without close: {unsettled} events not yet acknowledged; they are still \
                 sent in the background and their outcome is only logged",
            );
        }
    }
}

type PendingResult = (Arc<[uuid::Uuid]>, Result<BatchOutcome, ClientError>);

struct TrackerTask {
    client: Client,
    config: TrackerConfig,
    commands: mpsc::Receiver<Command>,
    buffer: Vec<Event>,
    buffer_started: Option<Instant>,
    /// Bounded by what the client holds: `submit` waits when the client's queue is full.
    pending: FuturesUnordered<BoxFuture<'static, PendingResult>>,
    report: Report,
    unsettled: Arc<AtomicU64>,
}

impl TrackerTask {
    async fn run(mut self) {
        loop {
            let flush_at = self.buffer_started.map(|started| started + self.config.flush_interval);
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(Command::Track(event)) => self.push(event).await,
                    Some(Command::Flush(reply)) => {
                        let _ = reply.send(self.flush().await);
                    }
                    None => return self.finish_abandoned().await,
                },
                Some(result) = self.pending.next(), if !self.pending.is_empty() => self.record(result),
                () = sleep_until(flush_at) => self.send_buffer().await,
            }
        }
    }

    async fn push(&mut self, event: Event) {
        self.buffer_started.get_or_insert_with(Instant::now);
        self.buffer.push(event);
        if self.buffer.len() >= self.config.batch_size {
            self.send_buffer().await;
        }
    }

    async fn send_buffer(&mut self) {
        self.buffer_started = None;
        if self.buffer.is_empty() {
            return;
        }
        let events = std::mem::replace(&mut self.buffer, Vec::with_capacity(self.config.batch_size));
        let event_ids: Arc<[uuid::Uuid]> = events.iter().map(Event::id).collect();
        match self.client.submit(events).await {
            Ok(pending) => self.pending.push(Box::pin(async move { (event_ids, pending.outcome().await) })),
            Err(error) => self.record((event_ids, Err(error))),
        }
    }

    async fn flush(&mut self) -> Result<FlushReport, FlushError> {
        self.send_buffer().await;
        while let Some(result) = self.pending.next().await {
            self.record(result);
        }
        std::mem::take(&mut self.report).finish()
    }

    /// The handle was dropped without `close`: deliver what is left, and log what happened, since
    /// nobody is left to return it to.
    async fn finish_abandoned(mut self) {
        match self.flush().await {
            Ok(report) if report.stored + report.duplicate + report.rejected == 0 => {}
            Ok(report) => tracing::info!(?report, "abandoned tracker delivered its last events"),
            Err(error) => tracing::error!(%error, report = ?error.report, "abandoned tracker lost events"),
        }
    }

    fn record(&mut self, (event_ids, result): PendingResult) {
        self.unsettled.fetch_sub(event_ids.len() as u64, Ordering::Relaxed);
        let details_max = self.config.report_details_max;
        let report = &mut self.report;
        match result {
            Ok(outcome) => {
                report.flush.stored += outcome.stored;
                report.flush.duplicate += outcome.duplicate;
                for rejection in outcome.rejected {
                    let Some(&event_id) = event_ids.get(rejection.index as usize) else { continue };
                    report.reject(event_id, rejection.code, rejection.message, details_max);
                }
            }
            Err(ClientError::Rejected { code, message }) => {
                for &event_id in event_ids.iter() {
                    report.reject(event_id, code, message.clone(), details_max);
                }
            }
            Err(ClientError::Unacknowledged { event_ids: lost, last_error }) => {
                tracing::warn!(events = lost.len(), error = %last_error, "tracked events unacknowledged");
                report.unacknowledge(&lost, *last_error, details_max);
            }
            Err(error) => {
                tracing::warn!(events = event_ids.len(), %error, "tracked events unacknowledged");
                report.unacknowledge(&event_ids, error, details_max);
            }
        }
    }
}

/// Accumulates outcomes between two flushes, with bounded detail.
#[derive(Debug, Default)]
struct Report {
    flush: FlushReport,
    unacknowledged_ids: Vec<uuid::Uuid>,
    last_error: Option<ClientError>,
}

impl Report {
    fn reject(&mut self, event_id: uuid::Uuid, code: ErrorCode, message: String, details_max: usize) {
        self.flush.rejected += 1;
        if self.flush.rejections.len() < details_max {
            self.flush.rejections.push(RejectedEvent { event_id, code, message });
        }
    }

    fn unacknowledge(&mut self, event_ids: &[uuid::Uuid], error: ClientError, details_max: usize) {
        self.flush.unacknowledged += event_ids.len() as u64;
        let room = details_max.saturating_sub(self.unacknowledged_ids.len());
        self.unacknowledged_ids.extend(event_ids.iter().take(room));
        self.last_error = Some(error);
    }

    fn finish(self) -> Result<FlushReport, FlushError> {
        match self.last_error {
            None => Ok(self.flush),
            Some(last_error) => {
                let error = ClientError::Unacknowledged {
                    event_ids: self.unacknowledged_ids,
                    last_error: Box::new(last_error),
                };
                Err(FlushError { report: self.flush, error })
            }
        }
    }
}
