//! Bounded, sharded, lock-free ring buffers between the edge's connections and the sink workers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use crossbeam_queue::ArrayQueue;
use tokio::sync::{Notify, oneshot};

use crate::overflow::Overflow;
use crate::row::{EventRow, Outcome};
use crate::store::StoreError;

/// What the caller learns once a submission's transaction has ended.
pub type CommitResult = Result<Vec<Outcome>, StoreError>;

/// Rows from one request or one protocol batch, and where to send the outcome.
#[derive(Debug)]
pub struct Submission {
    pub rows: Vec<EventRow>,
    /// `None` when the caller does not wait for the commit (ack mode `accepted`).
    pub reply: Option<oneshot::Sender<CommitResult>>,
    pub enqueued_at: Instant,
}

impl Submission {
    /// A submission and the receiver of its outcome.
    pub fn durable(rows: Vec<EventRow>) -> (Submission, oneshot::Receiver<CommitResult>) {
        let (reply, receiver) = oneshot::channel();
        (Submission { rows, reply: Some(reply), enqueued_at: Instant::now() }, receiver)
    }

    /// A submission whose outcome nobody waits for.
    pub fn accepted(rows: Vec<EventRow>) -> Submission {
        Submission { rows, reply: None, enqueued_at: Instant::now() }
    }
}

/// What a producer does when the queue is full. Matched in exactly one place,
/// [`IngestQueue::submit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhenFull {
    /// Wait until there is room. The producer stops reading its connection meanwhile, so the
    /// client sees TCP and credit backpressure. For the binary protocol.
    #[default]
    Block,
    /// Refuse at once; the caller answers "busy, retry after" (HTTP 503 + `Retry-After`, or the
    /// protocol's `Busy`).
    Reject,
    /// Spill the submission to the Redis overflow and answer once Redis has it. Without an
    /// overflow, or when the overflow refuses (full, unreachable), or for a `durable` submission
    /// when the overflow is not configured as durable: like `Reject`.
    Overflow,
}

/// Why a submission was not queued. The submission is handed back.
#[derive(Debug)]
pub enum SubmitError {
    /// The queue is full and the policy was [`WhenFull::Reject`].
    Full(Submission),
    /// The queue is closed: the server is shutting down.
    Closed(Submission),
}

/// Sizes of an [`IngestQueue`].
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Shards; producers pick one by a hint, each worker drains its own first.
    pub shards: usize,
    /// Submissions each shard's ring holds.
    pub submissions_per_shard: usize,
    /// Events queued in all shards together; a submission that would pass it waits or is refused.
    pub events_max: usize,
}

/// The sharded queue. Cheap to share: wrap in an `Arc`.
#[derive(Debug)]
pub struct IngestQueue {
    shards: Vec<Shard>,
    events_queued: AtomicUsize,
    events_max: usize,
    closed: AtomicBool,
    /// Producers waiting for room.
    room: Notify,
    overflow: Option<Arc<Overflow>>,
}

#[derive(Debug)]
struct Shard {
    ring: ArrayQueue<Submission>,
    /// The worker that owns this shard waits here.
    work: Notify,
}

impl IngestQueue {
    pub fn new(limits: QueueLimits) -> Arc<IngestQueue> {
        Self::with_overflow(limits, None)
    }

    /// A queue whose [`WhenFull::Overflow`] producers spill to `overflow`.
    pub fn with_overflow(limits: QueueLimits, overflow: Option<Arc<Overflow>>) -> Arc<IngestQueue> {
        assert!(limits.shards > 0 && limits.submissions_per_shard > 0 && limits.events_max > 0);
        let shards = (0..limits.shards)
            .map(|_| Shard { ring: ArrayQueue::new(limits.submissions_per_shard), work: Notify::new() })
            .collect();
        Arc::new(IngestQueue {
            shards,
            events_queued: AtomicUsize::new(0),
            events_max: limits.events_max,
            closed: AtomicBool::new(false),
            room: Notify::new(),
            overflow,
        })
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Events waiting in the queue now.
    pub fn events_queued(&self) -> usize {
        self.events_queued.load(Ordering::Relaxed)
    }

    pub fn events_max(&self) -> usize {
        self.events_max
    }

    /// Whether the queue is over 90% full (readiness reports this as saturated).
    pub fn is_saturated(&self) -> bool {
        self.events_queued() * 10 >= self.events_max * 9
    }

    /// Queues a submission on the shard picked by `shard_hint`, applying `when_full` if there is
    /// no room. The one place the full-queue policy is decided.
    pub async fn submit(
        &self,
        shard_hint: usize,
        mut submission: Submission,
        when_full: WhenFull,
    ) -> Result<(), SubmitError> {
        loop {
            // Register interest before trying, so a pop between the try and the wait wakes us.
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            submission = match self.try_push(shard_hint, submission) {
                Ok(()) => return Ok(()),
                Err(SubmitError::Full(submission)) => submission,
                Err(closed) => return Err(closed),
            };
            match when_full {
                WhenFull::Reject => {
                    metrics::counter!("tally_queue_full_total", "policy" => "reject").increment(1);
                    return Err(SubmitError::Full(submission));
                }
                WhenFull::Block => {
                    metrics::counter!("tally_queue_full_total", "policy" => "block").increment(1);
                    room.await;
                }
                WhenFull::Overflow => {
                    metrics::counter!("tally_queue_full_total", "policy" => "overflow").increment(1);
                    return self.spill(submission).await;
                }
            }
        }
    }

    async fn spill(&self, submission: Submission) -> Result<(), SubmitError> {
        let Some(overflow) = &self.overflow else {
            return Err(SubmitError::Full(submission));
        };
        if submission.reply.is_some() && !overflow.is_durable() {
            return Err(SubmitError::Full(submission));
        }
        match overflow.spill(&submission.rows).await {
            Ok(()) => {
                if let Some(reply) = submission.reply {
                    let _ = reply.send(Ok(vec![Outcome::Spilled; submission.rows.len()]));
                }
                Ok(())
            }
            Err(error) => {
                tracing::warn!(%error, "overflow refused a spill");
                Err(SubmitError::Full(submission))
            }
        }
    }

    fn try_push(&self, shard_hint: usize, submission: Submission) -> Result<(), SubmitError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(SubmitError::Closed(submission));
        }
        let events = submission.rows.len();
        let reserved = self.events_queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
            // An oversized submission is let in alone so it can never wait forever.
            (queued == 0 || queued + events <= self.events_max).then_some(queued + events)
        });
        if reserved.is_err() {
            return Err(SubmitError::Full(submission));
        }
        let shard = &self.shards[shard_hint % self.shards.len()];
        match shard.ring.push(submission) {
            Ok(()) => {
                metrics::counter!("tally_queue_pushes_total").increment(1);
                shard.work.notify_one();
                Ok(())
            }
            Err(submission) => {
                self.events_queued.fetch_sub(events, Ordering::AcqRel);
                Err(SubmitError::Full(submission))
            }
        }
    }

    /// Takes the next submission for worker `shard`: its own shard first, then any other.
    pub fn pop(&self, shard: usize) -> Option<Submission> {
        let count = self.shards.len();
        let submission = (0..count).find_map(|offset| self.shards[(shard + offset) % count].ring.pop())?;
        self.events_queued.fetch_sub(submission.rows.len(), Ordering::AcqRel);
        metrics::counter!("tally_queue_pops_total").increment(1);
        self.room.notify_waiters();
        Some(submission)
    }

    /// Waits until worker `shard` may find work, or the queue closes. Returns false once the
    /// queue is closed and empty.
    pub async fn wait_for_work(&self, shard: usize) -> bool {
        let own = &self.shards[shard % self.shards.len()];
        loop {
            let notified = own.work.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.shards.iter().any(|shard| !shard.ring.is_empty()) {
                return true;
            }
            if self.closed.load(Ordering::Acquire) {
                return false;
            }
            // Work pushed to another shard wakes only its owner; poll now and then so an idle
            // worker helps a busy one.
            let _ = tokio::time::timeout(std::time::Duration::from_millis(5), notified).await;
        }
    }

    /// Refuses new submissions; workers drain what is queued, then stop.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for shard in &self.shards {
            shard.work.notify_waiters();
        }
        self.room.notify_waiters();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(count: usize) -> Vec<EventRow> {
        let event = wire::Event::new("u", "custom", "p", "e");
        (0..count).map(|_| EventRow::new(uuid::Uuid::nil(), event.clone(), None)).collect()
    }

    fn queue(events_max: usize) -> Arc<IngestQueue> {
        IngestQueue::new(QueueLimits { shards: 2, submissions_per_shard: 4, events_max })
    }

    #[tokio::test]
    async fn reject_policy_refuses_when_events_limit_reached() {
        let queue = queue(10);
        queue.submit(0, Submission::accepted(rows(8)), WhenFull::Reject).await.expect("room");
        let refused = queue.submit(1, Submission::accepted(rows(3)), WhenFull::Reject).await;
        assert!(matches!(refused, Err(SubmitError::Full(s)) if s.rows.len() == 3));
        assert_eq!(queue.events_queued(), 8);
        assert_eq!(queue.pop(1).map(|s| s.rows.len()), Some(8));
        assert_eq!(queue.events_queued(), 0);
    }

    #[tokio::test]
    async fn ring_capacity_is_a_limit_too() {
        let queue = queue(1000);
        for _ in 0..4 {
            queue.submit(0, Submission::accepted(rows(1)), WhenFull::Reject).await.expect("room");
        }
        assert!(matches!(
            queue.submit(0, Submission::accepted(rows(1)), WhenFull::Reject).await,
            Err(SubmitError::Full(_))
        ));
        assert_eq!(queue.events_queued(), 4);
    }

    #[tokio::test]
    async fn block_policy_waits_for_room() {
        let queue = queue(5);
        queue.submit(0, Submission::accepted(rows(5)), WhenFull::Block).await.expect("room");
        let producer = {
            let queue = queue.clone();
            tokio::spawn(async move { queue.submit(0, Submission::accepted(rows(5)), WhenFull::Block).await })
        };
        tokio::task::yield_now().await;
        assert!(!producer.is_finished());
        assert!(queue.pop(0).is_some());
        producer.await.expect("join").expect("queued after the pop");
        assert_eq!(queue.events_queued(), 5);
    }

    #[tokio::test]
    async fn closed_queue_refuses_and_drains() {
        let queue = queue(100);
        queue.submit(0, Submission::accepted(rows(1)), WhenFull::Block).await.expect("room");
        queue.close();
        assert!(matches!(
            queue.submit(0, Submission::accepted(rows(1)), WhenFull::Block).await,
            Err(SubmitError::Closed(_))
        ));
        assert!(queue.wait_for_work(0).await);
        assert!(queue.pop(0).is_some());
        assert!(!queue.wait_for_work(0).await);
    }

    #[tokio::test]
    async fn oversized_submission_enters_an_empty_queue() {
        let queue = queue(5);
        queue.submit(0, Submission::accepted(rows(9)), WhenFull::Reject).await.expect("alone");
        assert!(matches!(
            queue.submit(0, Submission::accepted(rows(1)), WhenFull::Reject).await,
            Err(SubmitError::Full(_))
        ));
    }
}
