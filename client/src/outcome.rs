//! What the server answered for a submission, and the handle that waits for it.

use std::{future::IntoFuture, sync::Arc};

use futures_util::future::BoxFuture;
use tokio::sync::oneshot;
use wire::{Ack, Rejection};

use crate::ClientError;

/// The final answer for a set of events: each was stored, found stored already, or rejected.
/// `stored + duplicate + rejected.len()` equals the number of events sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Events newly stored.
    pub stored: u64,
    /// Events stored earlier (same event id and timestamp): not counted twice.
    pub duplicate: u64,
    /// Events refused, by index in the `Vec` given to [`Client::send`](crate::Client::send),
    /// with the code and a message naming the field. Sending these again will not help.
    pub rejected: Vec<Rejection>,
}

impl BatchOutcome {
    /// Events the server holds, new or not.
    pub fn accepted(&self) -> u64 {
        self.stored + self.duplicate
    }

    pub(crate) fn from_ack(ack: Ack) -> BatchOutcome {
        BatchOutcome { stored: ack.stored.into(), duplicate: ack.duplicate.into(), rejected: ack.rejected }
    }

    /// Adds the outcome of a part that started at `offset` in the caller's events.
    fn absorb(&mut self, part: BatchOutcome, offset: u32) {
        self.stored += part.stored;
        self.duplicate += part.duplicate;
        self.rejected.extend(part.rejected.into_iter().map(|mut rejection| {
            rejection.index += offset;
            rejection
        }));
    }
}

/// One `Events` message of a submission.
#[derive(Debug)]
pub(crate) struct PendingPart {
    /// Index of the part's first event in the caller's events.
    pub(crate) offset: u32,
    pub(crate) event_ids: Arc<[uuid::Uuid]>,
    pub(crate) answer: oneshot::Receiver<Result<BatchOutcome, ClientError>>,
}

/// A submitted set of events, sent in one or more batches; await it (or call
/// [`PendingBatch::outcome`]) for the server's answer.
///
/// Dropping it does not cancel anything: the batches are still delivered, the answer is lost.
#[derive(Debug)]
#[must_use = "the outcome says which events were stored, rejected or unacknowledged"]
pub struct PendingBatch {
    pub(crate) parts: Vec<PendingPart>,
}

impl PendingBatch {
    /// The ids of every submitted event, in order.
    pub fn event_ids(&self) -> impl Iterator<Item = uuid::Uuid> + '_ {
        self.parts.iter().flat_map(|part| part.event_ids.iter().copied())
    }

    /// Waits for every batch of the submission to be answered or given up on.
    ///
    /// A submission sent as one batch yields that batch's result as is. A submission that was
    /// split is merged: outcomes are added with indices remapped to the caller's `Vec`; a part
    /// refused as a whole ([`ClientError::Rejected`]) is reported as a rejection of each of its
    /// events, since the other parts may have been stored; if any part is unacknowledged, the
    /// result is [`ClientError::Unacknowledged`] listing exactly those events (every other event
    /// got a final answer).
    pub async fn outcome(self) -> Result<BatchOutcome, ClientError> {
        let single = self.parts.len() == 1;
        let mut merged = BatchOutcome::default();
        let mut unacknowledged = Vec::new();
        let mut last_error = None;
        for part in self.parts {
            let result = part.answer.await.unwrap_or(Err(ClientError::Closed));
            if single {
                return result.map_err(|error| unacknowledged_unless_final(error, &part.event_ids));
            }
            match result {
                Ok(outcome) => merged.absorb(outcome, part.offset),
                Err(ClientError::Rejected { code, message }) => {
                    let indices = part.offset..part.offset + part.event_ids.len() as u32;
                    let rejections = indices.map(|index| Rejection { index, code, message: message.clone() });
                    merged.rejected.extend(rejections);
                }
                Err(ClientError::Unacknowledged { event_ids, last_error: error }) => {
                    unacknowledged.extend(event_ids);
                    last_error = Some(error);
                }
                Err(error) => {
                    unacknowledged.extend(part.event_ids.iter().copied());
                    last_error = Some(Box::new(error));
                }
            }
        }
        match last_error {
            Some(last_error) => Err(ClientError::Unacknowledged { event_ids: unacknowledged, last_error }),
            None => Ok(merged),
        }
    }
}

/// Any error other than a final refusal leaves the events in doubt, and says which.
fn unacknowledged_unless_final(error: ClientError, event_ids: &[uuid::Uuid]) -> ClientError {
    match error {
        ClientError::Rejected { .. } | ClientError::Unacknowledged { .. } => error,
        other => ClientError::Unacknowledged { event_ids: event_ids.to_vec(), last_error: Box::new(other) },
    }
}

impl IntoFuture for PendingBatch {
    type Output = Result<BatchOutcome, ClientError>;
    type IntoFuture = BoxFuture<'static, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.outcome())
    }
}

#[cfg(test)]
mod tests {
    use wire::ErrorCode;

    use super::*;

    fn part(offset: u32, count: usize, result: Result<BatchOutcome, ClientError>) -> PendingPart {
        let event_ids: Arc<[uuid::Uuid]> = (0..count).map(|_| uuid::Uuid::new_v4()).collect();
        let (sender, answer) = oneshot::channel();
        sender.send(result).expect("receiver is alive");
        PendingPart { offset, event_ids, answer }
    }

    fn rejection(index: u32) -> Rejection {
        Rejection { index, code: ErrorCode::InvalidEvent, message: "user_id: empty".to_owned() }
    }

    #[tokio::test]
    async fn split_outcomes_are_merged_with_indices_remapped() {
        let first = BatchOutcome { stored: 3, duplicate: 0, rejected: vec![rejection(1)] };
        let second = BatchOutcome { stored: 2, duplicate: 1, rejected: vec![rejection(0)] };
        let rejected = Err(ClientError::Rejected { code: ErrorCode::TooLarge, message: "big".to_owned() });
        let pending =
            PendingBatch { parts: vec![part(0, 4, Ok(first)), part(4, 4, Ok(second)), part(8, 2, rejected)] };
        let merged = pending.outcome().await.expect("every part has a final answer");
        assert_eq!((merged.stored, merged.duplicate), (5, 1));
        let indices: Vec<u32> = merged.rejected.iter().map(|rejection| rejection.index).collect();
        assert_eq!(indices, [1, 4, 8, 9]);
        assert_eq!(merged.rejected[3].code, ErrorCode::TooLarge);
    }

    #[tokio::test]
    async fn an_unacknowledged_part_names_only_its_events() {
        let lost = part(2, 2, Err(ClientError::Closed));
        let lost_ids: Vec<uuid::Uuid> = lost.event_ids.to_vec();
        let acked = part(0, 2, Ok(BatchOutcome { stored: 2, ..BatchOutcome::default() }));
        let pending = PendingBatch { parts: vec![acked, lost] };
        match pending.outcome().await {
            Err(ClientError::Unacknowledged { event_ids, last_error }) => {
                assert_eq!(event_ids, lost_ids);
                assert!(matches!(*last_error, ClientError::Closed));
            }
            other => panic!("expected unacknowledged, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_single_batch_keeps_its_batch_level_rejection() {
        let rejected = Err(ClientError::Rejected { code: ErrorCode::TooLarge, message: "big".to_owned() });
        let pending = PendingBatch { parts: vec![part(0, 3, rejected)] };
        assert!(matches!(
            pending.outcome().await,
            Err(ClientError::Rejected { code: ErrorCode::TooLarge, .. })
        ));
    }
}
