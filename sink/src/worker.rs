//! Sink workers: take submissions from the queue, group them into one transaction, commit, and
//! only then release each submission's ack.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::task::JoinHandle;

use crate::overflow::Overflow;
use crate::queue::{IngestQueue, Submission};
use crate::row::{EventRow, Outcome};
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
    /// Longest one commit may take before it is given up as unavailable (and the worker counts
    /// as stalled for `/ready`).
    pub commit_timeout: Duration,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            events_max: 10_000,
            bytes_max: 16 * 1024 * 1024,
            age_max: Duration::from_millis(100),
            accepted_retry_max: Duration::from_secs(60),
            commit_timeout: Duration::from_secs(30),
        }
    }
}

/// Whether the sink workers are up and making progress; `/ready` reports it. A worker is down
/// from the moment its task dies until the supervisor has started it again, and stalled while one
/// commit has been running longer than [`BatchLimits::commit_timeout`].
#[derive(Debug)]
pub struct WorkerHealth {
    alive: Vec<AtomicBool>,
    /// Milliseconds since `epoch` at which each worker's current commit started; 0 when idle.
    commit_started_ms: Vec<AtomicU64>,
    epoch: Instant,
}

impl WorkerHealth {
    pub fn new(workers: usize) -> Arc<WorkerHealth> {
        Arc::new(WorkerHealth {
            alive: (0..workers).map(|_| AtomicBool::new(true)).collect(),
            commit_started_ms: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
        })
    }

    /// Workers down now (dead and not yet restarted).
    pub fn workers_down(&self) -> usize {
        self.alive.iter().filter(|alive| !alive.load(Ordering::Acquire)).count()
    }

    /// Workers whose current commit has run longer than `limit`.
    pub fn workers_stalled(&self, limit: Duration) -> usize {
        let now_ms = self.now_ms();
        let limit_ms = limit.as_millis() as u64;
        self.commit_started_ms
            .iter()
            .map(|started| started.load(Ordering::Acquire))
            .filter(|&started| started != 0 && now_ms.saturating_sub(started) > limit_ms)
            .count()
    }

    fn now_ms(&self) -> u64 {
        (self.epoch.elapsed().as_millis() as u64).max(1)
    }

    fn set_alive(&self, worker: usize, alive: bool) {
        self.alive[worker].store(alive, Ordering::Release);
        metrics::gauge!("tally_sink_workers_down").set(self.workers_down() as f64);
    }

    fn commit_started(&self, worker: usize) {
        self.commit_started_ms[worker].store(self.now_ms(), Ordering::Release);
    }

    fn commit_ended(&self, worker: usize) {
        self.commit_started_ms[worker].store(0, Ordering::Release);
    }
}

/// How long a dead worker stays down before it is started again, so a worker that dies at once
/// again does not spin.
const RESTART_DELAY: Duration = Duration::from_millis(500);

/// Starts one worker per queue shard, each under a supervisor that starts it again if it dies
/// (marking it down in `health` meanwhile). They stop once the queue is closed and drained.
pub fn spawn_workers(
    queue: Arc<IngestQueue>,
    store: Arc<Store>,
    overflow: Option<Arc<Overflow>>,
    limits: BatchLimits,
    health: Arc<WorkerHealth>,
) -> Vec<JoinHandle<()>> {
    assert_eq!(health.alive.len(), queue.shard_count(), "one health slot per worker");
    (0..queue.shard_count())
        .map(|shard| {
            let overflow = overflow.clone();
            let worker = Worker {
                shard,
                queue: queue.clone(),
                store: store.clone(),
                overflow,
                limits,
                health: health.clone(),
            };
            tokio::spawn(worker.supervise())
        })
        .collect()
}

#[derive(Clone)]
struct Worker {
    shard: usize,
    queue: Arc<IngestQueue>,
    store: Arc<Store>,
    overflow: Option<Arc<Overflow>>,
    limits: BatchLimits,
    health: Arc<WorkerHealth>,
}

/// Counts the `accepted` events of a batch as lost if it is dropped before they were stored,
/// spilled or counted: when a worker dies mid-batch, nobody else would.
struct LostUnlessResolved(usize);

impl Drop for LostUnlessResolved {
    fn drop(&mut self) {
        if self.0 > 0 {
            tracing::error!(events = self.0, "accepted events lost: their sink worker died");
            metrics::counter!("tally_events_lost_total").increment(self.0 as u64);
        }
    }
}

impl Worker {
    async fn supervise(self) {
        loop {
            match tokio::spawn(self.clone().run()).await {
                Ok(()) => break,
                Err(error) => {
                    self.health.set_alive(self.shard, false);
                    self.health.commit_ended(self.shard);
                    metrics::counter!("tally_sink_worker_restarts_total").increment(1);
                    tracing::error!(shard = self.shard, %error, "sink worker died; starting it again");
                    tokio::time::sleep(RESTART_DELAY).await;
                    self.health.set_alive(self.shard, true);
                }
            }
        }
    }

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
        let mut accepted_events = 0;
        for submission in submissions.iter_mut() {
            counts.push(submission.rows.len());
            if submission.reply.is_none() {
                accepted_events += submission.rows.len();
            }
            rows.append(&mut submission.rows);
        }
        let mut unresolved = LostUnlessResolved(accepted_events);
        let started = Instant::now();
        let result = self.commit_or_spill(rows, accepted_events > 0).await;
        let elapsed = started.elapsed();
        metrics::histogram!("tally_commit_seconds").record(elapsed.as_secs_f64());
        metrics::histogram!("tally_batch_events").record(rows.len() as f64);
        match result {
            Ok(outcomes) => {
                count_outcomes(&outcomes);
                let mut outcomes = outcomes.into_iter();
                for (submission, count) in submissions.drain(..).zip(counts) {
                    let mine: Vec<_> = outcomes.by_ref().take(count).collect();
                    match submission.reply {
                        Some(reply) => {
                            let _ = reply.send(Ok(mine));
                        }
                        None => {
                            let lost = mine.iter().filter(|outcome| **outcome == Outcome::Rejected).count();
                            if lost > 0 {
                                metrics::counter!("tally_events_lost_total").increment(lost as u64);
                            }
                        }
                    }
                }
            }
            Err(BatchError::Spilled(error)) => {
                let durable = self.overflow.as_ref().is_some_and(|overflow| overflow.is_durable());
                for (submission, count) in submissions.drain(..).zip(counts) {
                    if let Some(reply) = submission.reply {
                        let answer =
                            if durable { Ok(vec![Outcome::Spilled; count]) } else { Err(error.clone()) };
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
        unresolved.0 = 0;
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
            StoreError::unavailable("ingest queue saturated")
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
    /// when somebody has been acked already (`accepted` mode), up to `accepted_retry_max`. A
    /// batch that fails for any other reason is isolated: see [`commit_isolating`].
    async fn commit_with_retries(
        &self,
        rows: &[EventRow],
        accepted_inside: bool,
    ) -> Result<Vec<crate::Outcome>, StoreError> {
        let started = Instant::now();
        let mut conflicts = 0;
        let mut backoff = Duration::from_millis(50);
        loop {
            self.health.commit_started(self.shard);
            let result = commit_isolating(self.store.as_ref(), rows, self.limits.commit_timeout).await;
            self.health.commit_ended(self.shard);
            match result {
                Ok(outcomes) => return Ok(outcomes),
                Err(error @ StoreError::Conflict { .. }) if conflicts < 5 => {
                    conflicts += 1;
                    tracing::debug!(%error, "transaction conflict, retrying batch");
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

fn count_outcomes(outcomes: &[Outcome]) {
    let count = |wanted: Outcome| outcomes.iter().filter(|outcome| **outcome == wanted).count() as u64;
    metrics::counter!("tally_events_stored_total").increment(count(Outcome::Stored));
    metrics::counter!("tally_events_duplicate_total").increment(count(Outcome::Duplicate));
    let rejected = count(Outcome::Rejected);
    if rejected > 0 {
        metrics::counter!("tally_events_rejected_total", "cause" => "storage_refused").increment(rejected);
    }
}

/// One commit attempt, bounded in time, with a panic inside the store turned into an error of
/// this batch rather than the death of the task. A timed-out commit may still have committed; it
/// is reported as unavailable (never as success), and a resend is deduplicated.
async fn commit_guarded(
    store: &Store,
    rows: &[EventRow],
    timeout: Duration,
) -> Result<Vec<Outcome>, StoreError> {
    let attempt = std::panic::AssertUnwindSafe(store.commit(rows)).catch_unwind();
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(result)) => result,
        Ok(Err(_panic)) => {
            metrics::counter!("tally_sink_commit_panics_total").increment(1);
            tracing::error!(events = rows.len(), "a commit panicked; isolating its rows");
            Err(StoreError::internal("the commit panicked"))
        }
        Err(elapsed) => {
            Err(StoreError::unavailable(format!("commit did not finish within {} s", timeout.as_secs()))
                .with_source(elapsed))
        }
    }
}

/// Commits a batch; if it fails for a reason that retrying will not cure (a row the database
/// refuses, sums out of range, a panic), finds the rows responsible and refuses only them, so
/// that one tenant's bad row never fails another's events. The rows are first committed per
/// tenant, then the failing tenant's rows in halves, down to single rows, which are
/// [`Outcome::Rejected`]. Each part is its own transaction, so every row is committed at most
/// once, with its rollups. A retryable error on the way ends the search with that error: the
/// parts committed so far stay, and a resend finds them as duplicates.
pub(crate) async fn commit_isolating(
    store: &Store,
    rows: &[EventRow],
    timeout: Duration,
) -> Result<Vec<Outcome>, StoreError> {
    let error = match commit_guarded(store, rows, timeout).await {
        Err(error) if !error.is_retryable() => error,
        other => return other,
    };
    tracing::warn!(events = rows.len(), %error, "batch refused; isolating the rows responsible");
    metrics::counter!("tally_sink_isolations_total").increment(1);
    let mut outcomes: Vec<Option<Outcome>> = vec![None; rows.len()];
    let mut by_tenant: std::collections::BTreeMap<uuid::Uuid, Vec<usize>> = Default::default();
    for (index, row) in rows.iter().enumerate() {
        by_tenant.entry(row.tenant_id).or_default().push(index);
    }
    let mut pending: Vec<Vec<usize>> = match by_tenant.len() {
        1 => halves((0..rows.len()).collect()),
        _ => by_tenant.into_values().collect(),
    };
    while let Some(part) = pending.pop() {
        let part_rows: Vec<EventRow> = part.iter().map(|&index| rows[index].clone()).collect();
        match commit_guarded(store, &part_rows, timeout).await {
            Ok(part_outcomes) => {
                for (index, outcome) in part.iter().zip(part_outcomes) {
                    outcomes[*index] = Some(outcome);
                }
            }
            Err(error) if error.is_retryable() => return Err(error),
            Err(error) if part.len() == 1 => {
                let row = &rows[part[0]];
                tracing::warn!(tenant = %row.tenant_id, event_id = %row.event.id(), %error, "row refused alone");
                outcomes[part[0]] = Some(Outcome::Rejected);
            }
            Err(_) => pending.extend(halves(part)),
        }
    }
    Ok(outcomes.into_iter().map(|outcome| outcome.unwrap_or(Outcome::Rejected)).collect())
}

fn halves(mut part: Vec<usize>) -> Vec<Vec<usize>> {
    let second = part.split_off(part.len() / 2);
    vec![part, second]
}

/// How a batch ended when it was not committed.
enum BatchError {
    /// In the overflow; `durable` submissions are acked only if the overflow is durable, else
    /// they get this storage error.
    Spilled(StoreError),
    /// Nowhere: every submission gets the error.
    Failed(StoreError),
}
