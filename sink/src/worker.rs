//! Sink workers: take submissions from the queue, group them into one transaction, commit, and
//! only then release each submission's ack.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::overflow::Overflow;
use crate::queue::{IngestQueue, Submission};
use crate::row::EventRow;
use crate::store::{Store, StoreError};

/// When a worker stops adding submissions to a batch and commits it.
///
/// A worker commits as soon as the queue is empty (natural group commit: under load, what
/// arrived during one commit forms the next batch, so batches grow with the load and latency
/// stays low when it is light), or earlier when the batch reaches one of these limits.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Events in one transaction. 10,000-row COPY batches loaded about as fast as 100,000-row
    /// ones here and much faster than 1,000-row ones.
    pub events_max: usize,
    /// Approximate in-memory bytes of one batch.
    pub bytes_max: usize,
    /// How long a worker may keep adding queued submissions to one batch before committing it.
    pub age_max: Duration,
    /// How long a batch holding `accepted` submissions (whose callers have their ack already)
    /// is retried while storage is unavailable before its events are given up and counted lost.
    pub accepted_retry_max: Duration,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            events_max: 10_000,
            bytes_max: 16 * 1024 * 1024,
            age_max: Duration::from_millis(100),
            accepted_retry_max: Duration::from_secs(60),
        }
    }
}

/// Starts one worker per queue shard. They stop once the queue is closed and drained.
pub fn spawn_workers(
    queue: Arc<IngestQueue>,
    store: Arc<dyn Store>,
    overflow: Option<Arc<Overflow>>,
    limits: BatchLimits,
) -> Vec<JoinHandle<()>> {
    (0..queue.shard_count())
        .map(|shard| {
            let overflow = overflow.clone();
            let worker = Worker { shard, queue: queue.clone(), store: store.clone(), overflow, limits };
            tokio::spawn(worker.run())
        })
        .collect()
}

struct Worker {
    shard: usize,
    queue: Arc<IngestQueue>,
    store: Arc<dyn Store>,
    overflow: Option<Arc<Overflow>>,
    limits: BatchLimits,
}

impl Worker {
    async fn run(self) {
        let mut submissions: Vec<Submission> = Vec::new();
        let mut rows: Vec<EventRow> = Vec::new();
        while self.queue.wait_for_work(self.shard).await {
            self.collect(&mut submissions);
            if submissions.is_empty() {
                continue;
            }
            self.flush(&mut submissions, &mut rows).await;
        }
        tracing::debug!(shard = self.shard, "sink worker stopped");
    }

    /// Pops submissions until the queue is empty or a batch limit is reached.
    fn collect(&self, submissions: &mut Vec<Submission>) {
        let (mut events, mut bytes) = (0usize, 0usize);
        // The age limit counts from the moment this batch took its first submission: measured from
        // enqueue time, every batch of a backlogged queue would be one submission long, exactly
        // when big batches matter most.
        let started = Instant::now();
        while let Some(submission) = self.queue.pop(self.shard) {
            events += submission.rows.len();
            bytes += submission.rows.iter().map(EventRow::approximate_bytes).sum::<usize>();
            submissions.push(submission);
            if events >= self.limits.events_max
                || bytes >= self.limits.bytes_max
                || started.elapsed() >= self.limits.age_max
            {
                break;
            }
        }
    }

    /// Commits every row of `submissions` in one transaction, then answers each submission.
    async fn flush(&self, submissions: &mut Vec<Submission>, rows: &mut Vec<EventRow>) {
        let mut counts = Vec::with_capacity(submissions.len());
        for submission in submissions.iter_mut() {
            counts.push(submission.rows.len());
            rows.append(&mut submission.rows);
        }
        let has_accepted = submissions.iter().any(|submission| submission.reply.is_none());
        let started = Instant::now();
        let result = self.commit_or_spill(rows, has_accepted).await;
        let elapsed = started.elapsed();
        metrics::histogram!("tally_commit_seconds").record(elapsed.as_secs_f64());
        metrics::histogram!("tally_batch_events").record(rows.len() as f64);
        match result {
            Ok(outcomes) => {
                let stored = outcomes.iter().filter(|o| **o == crate::Outcome::Stored).count();
                metrics::counter!("tally_events_stored_total").increment(stored as u64);
                metrics::counter!("tally_events_duplicate_total").increment((outcomes.len() - stored) as u64);
                let mut outcomes = outcomes.into_iter();
                for (submission, count) in submissions.drain(..).zip(counts) {
                    let mine: Vec<_> = outcomes.by_ref().take(count).collect();
                    if let Some(reply) = submission.reply {
                        let _ = reply.send(Ok(mine));
                    }
                }
            }
            Err(BatchError::Spilled(error)) => {
                let durable = self.overflow.as_ref().is_some_and(|overflow| overflow.is_durable());
                for (submission, count) in submissions.drain(..).zip(counts) {
                    if let Some(reply) = submission.reply {
                        let answer = if durable {
                            Ok(vec![crate::Outcome::Spilled; count])
                        } else {
                            Err(error.clone())
                        };
                        let _ = reply.send(answer);
                    }
                }
            }
            Err(BatchError::Failed(error)) => {
                tracing::warn!(events = rows.len(), %error, "failed to commit batch");
                metrics::counter!("tally_commit_failures_total").increment(1);
                for (submission, count) in submissions.drain(..).zip(counts) {
                    match submission.reply {
                        Some(reply) => {
                            let _ = reply.send(Err(error.clone()));
                        }
                        None => {
                            tracing::error!(events = count, %error, "accepted events lost: storage failed");
                            metrics::counter!("tally_events_lost_total").increment(count as u64);
                        }
                    }
                }
            }
        }
        rows.clear();
    }

    /// Commits, or spills to the overflow when storage is unavailable (or the queue saturated,
    /// so that a slow database does not stall ingest). Without an overflow, a batch holding
    /// `accepted` submissions is retried for up to `accepted_retry_max`.
    async fn commit_or_spill(
        &self,
        rows: &[EventRow],
        has_accepted: bool,
    ) -> Result<Vec<crate::Outcome>, BatchError> {
        let Some(overflow) = &self.overflow else {
            return self.commit_with_retries(rows, has_accepted).await.map_err(BatchError::Failed);
        };
        let error = if self.queue.is_saturated() {
            StoreError::Unavailable("ingest queue saturated".into())
        } else {
            match self.commit_with_retries(rows, false).await {
                Err(error) if error.is_retryable() => error,
                other => return other.map_err(BatchError::Failed),
            }
        };
        match overflow.spill(rows).await {
            Ok(()) => Err(BatchError::Spilled(error)),
            Err(spill_error) => {
                tracing::warn!(%spill_error, "overflow refused a batch storage could not take");
                self.commit_with_retries(rows, has_accepted).await.map_err(BatchError::Failed)
            }
        }
    }

    /// Conflicts are retried at once (a few times); unavailability is retried with backoff only
    /// when somebody has been acked already (`accepted` mode), up to `accepted_retry_max`.
    async fn commit_with_retries(
        &self,
        rows: &[EventRow],
        accepted_inside: bool,
    ) -> Result<Vec<crate::Outcome>, StoreError> {
        let started = Instant::now();
        let mut conflicts = 0;
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.store.commit(rows).await {
                Ok(outcomes) => return Ok(outcomes),
                Err(StoreError::Conflict(detail)) if conflicts < 5 => {
                    conflicts += 1;
                    tracing::debug!(%detail, "transaction conflict, retrying batch");
                }
                Err(error)
                    if accepted_inside
                        && error.is_retryable()
                        && started.elapsed() < self.limits.accepted_retry_max =>
                {
                    tracing::warn!(%error, "storage unavailable, retrying accepted batch");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(error) => return Err(error),
            }
        }
    }
}

/// How a batch ended when it was not committed.
enum BatchError {
    /// In the overflow; `durable` submissions are acked only if the overflow is durable, else
    /// they get this storage error.
    Spilled(StoreError),
    /// Nowhere: every submission gets the error.
    Failed(StoreError),
}
