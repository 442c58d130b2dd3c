//! What the run sent and what the server answered, per tenant: the book that verification checks
//! the database against.

use std::sync::{Arc, Mutex};

use tokio::time::Instant;
use wire::Event;

use crate::generator::{Batch, Plan};
use crate::stats::{AnswerCounts, Stats};

/// Messages kept as examples of unexpected answers.
const SAMPLES_MAX: usize = 5;

/// One tenant's side of the run.
#[derive(Debug, Clone, Default)]
pub struct TenantLedger {
    /// Ids of events acknowledged as stored or duplicate (resends appear more than once).
    pub accepted_ids: Vec<u128>,
    /// Acknowledged `stored` counts, summed.
    pub acked_stored: u64,
    /// Acknowledged `duplicate` counts, summed.
    pub acked_duplicate: u64,
    /// Deliberate resends the server accepted.
    pub resends_accepted: u64,
    /// Invalid events rejected, as planned.
    pub invalid_rejected_ids: Vec<u128>,
    /// Invalid events the server accepted: a bug.
    pub invalid_accepted_ids: Vec<u128>,
    /// Valid events the server rejected: a bug (or a generator that breaks the rules).
    pub unexpected_rejections: u64,
    pub rejection_samples: Vec<String>,
    /// Events without a final answer: they may or may not be stored.
    pub unacked_ids: Vec<u128>,
    pub error_samples: Vec<String>,
    /// The span of event timestamps sent, in microseconds since the epoch.
    pub timestamp_min_us: Option<i64>,
    pub timestamp_max_us: Option<i64>,
}

/// A server's final answer to one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Every event is accounted for: `stored + duplicate + rejected.len()` is the batch size.
    Acked { stored: u64, duplicate: u64, rejected: Vec<(u32, String)> },
    /// No final answer; nothing is known of the batch's events.
    Failed(String),
}

/// A batch on its way: what is needed to book its answer.
#[derive(Debug)]
pub struct InFlight {
    pub tenant: usize,
    pub ids: Vec<u128>,
    pub plans: Vec<Plan>,
    pub timestamp_range_us: (i64, i64),
    /// When the schedule wanted it sent (or, unthrottled, when the sender was ready).
    pub intended: Instant,
    pub sent_at: Instant,
}

impl InFlight {
    pub fn new(tenant: usize, batch: &Batch, intended: Instant) -> InFlight {
        InFlight {
            tenant,
            ids: batch.events.iter().map(|event| event.id().as_u128()).collect(),
            plans: batch.plans.clone(),
            timestamp_range_us: timestamp_range(&batch.events),
            intended,
            sent_at: Instant::now(),
        }
    }
}

fn timestamp_range(events: &[Event]) -> (i64, i64) {
    events.iter().fold((i64::MAX, i64::MIN), |(low, high), event| {
        (low.min(event.timestamp_us), high.max(event.timestamp_us))
    })
}

/// Books answers into the stats and the tenants' ledgers. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Recorder {
    pub stats: Arc<Stats>,
    ledgers: Arc<[Mutex<TenantLedger>]>,
}

impl Recorder {
    pub fn new(stats: Arc<Stats>, tenants: usize) -> Recorder {
        let ledgers = (0..tenants).map(|_| Mutex::new(TenantLedger::default())).collect();
        Recorder { stats, ledgers }
    }

    pub fn record(&self, batch: InFlight, answer: Answer) {
        let counts = {
            let mut ledger =
                self.ledgers[batch.tenant].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            book(&mut ledger, &batch, answer)
        };
        self.stats.record_answer(batch.intended, batch.sent_at, &counts);
    }

    /// Copies of the ledgers, in tenant order.
    pub fn ledgers(&self) -> Vec<TenantLedger> {
        self.ledgers
            .iter()
            .map(|ledger| ledger.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone())
            .collect()
    }
}

/// Books one answer and returns what it counted.
fn book(ledger: &mut TenantLedger, batch: &InFlight, answer: Answer) -> AnswerCounts {
    let (low, high) = batch.timestamp_range_us;
    ledger.timestamp_min_us = Some(ledger.timestamp_min_us.map_or(low, |min| min.min(low)));
    ledger.timestamp_max_us = Some(ledger.timestamp_max_us.map_or(high, |max| max.max(high)));
    let (stored, duplicate, mut rejected) = match answer {
        Answer::Acked { stored, duplicate, rejected } => (stored, duplicate, rejected),
        Answer::Failed(error) => {
            ledger.unacked_ids.extend_from_slice(&batch.ids);
            if ledger.error_samples.len() < SAMPLES_MAX {
                ledger.error_samples.push(error);
            }
            return AnswerCounts { errors: batch.ids.len() as u64, ..AnswerCounts::default() };
        }
    };
    ledger.acked_stored += stored;
    ledger.acked_duplicate += duplicate;
    rejected.sort_unstable_by_key(|(index, _)| *index);
    let mut rejections = rejected.iter().peekable();
    for (index, (id, plan)) in batch.ids.iter().zip(&batch.plans).enumerate() {
        let is_rejected = rejections.next_if(|(rejected, _)| *rejected as usize == index);
        match (plan, is_rejected) {
            (Plan::Invalid, Some(_)) => ledger.invalid_rejected_ids.push(*id),
            (Plan::Invalid, None) => ledger.invalid_accepted_ids.push(*id),
            (_, Some((_, message))) => {
                ledger.unexpected_rejections += 1;
                if ledger.rejection_samples.len() < SAMPLES_MAX {
                    ledger.rejection_samples.push(format!("{}: {message}", uuid::Uuid::from_u128(*id)));
                }
            }
            (plan, None) => {
                ledger.accepted_ids.push(*id);
                ledger.resends_accepted += u64::from(*plan == Plan::Resend);
            }
        }
    }
    AnswerCounts { stored, duplicate, rejected: rejected.len() as u64, errors: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_flight(plans: Vec<Plan>) -> InFlight {
        let now = Instant::now();
        InFlight {
            tenant: 0,
            ids: (1..=plans.len() as u128).collect(),
            plans,
            timestamp_range_us: (10, 20),
            intended: now,
            sent_at: now,
        }
    }

    #[test]
    fn answers_are_booked_against_the_plan() {
        let recorder = Recorder::new(Arc::new(Stats::new()), 1);
        let plans = vec![Plan::Fresh, Plan::Invalid, Plan::Resend, Plan::Invalid, Plan::Fresh];
        let rejected = vec![(3, "pages: negative".to_owned()), (4, "model: required".to_owned())];
        recorder.record(in_flight(plans), Answer::Acked { stored: 2, duplicate: 1, rejected });
        let ledger = &recorder.ledgers()[0];
        assert_eq!(ledger.accepted_ids, [1, 3]);
        assert_eq!(ledger.invalid_accepted_ids, [2]);
        assert_eq!(ledger.invalid_rejected_ids, [4]);
        assert_eq!(ledger.unexpected_rejections, 1);
        assert_eq!(ledger.resends_accepted, 1);
        assert_eq!((ledger.acked_stored, ledger.acked_duplicate), (2, 1));
        assert_eq!(recorder.stats.answered(), 5);
    }

    #[test]
    fn failures_leave_the_events_in_doubt() {
        let recorder = Recorder::new(Arc::new(Stats::new()), 1);
        recorder.record(in_flight(vec![Plan::Fresh, Plan::Fresh]), Answer::Failed("reset".into()));
        let ledger = &recorder.ledgers()[0];
        assert_eq!(ledger.unacked_ids, [1, 2]);
        assert_eq!(ledger.error_samples, ["reset"]);
        assert_eq!(ledger.timestamp_min_us, Some(10));
        assert_eq!(recorder.stats.errors.load(std::sync::atomic::Ordering::Relaxed), 2);
    }
}
