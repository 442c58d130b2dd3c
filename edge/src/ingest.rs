//! The ingest path shared by the binary protocol and HTTP: rules, then the queue, then (in
//! durable mode) the commit's outcome per event.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sink::{EventRow, IngestQueue, Outcome, StoreError, Submission, SubmitError, WhenFull};
use wire::{AckMode, ErrorCode, Event, EventError};

use crate::auth::{Caller, now_us};
use crate::tenants::{Admission, TenantContext, Tenants};

/// The time window an event's timestamp must fall in.
#[derive(Debug, Clone, Copy)]
pub struct TimeWindow {
    /// How far back an event may be (late events): default 35 days.
    pub late: Duration,
    /// How far ahead an event may be (clock skew): default 5 minutes.
    pub ahead: Duration,
}

impl Default for TimeWindow {
    fn default() -> Self {
        TimeWindow { late: Duration::from_secs(35 * 86_400), ahead: Duration::from_secs(300) }
    }
}

/// What became of one event of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventStatus {
    /// Committed.
    Stored,
    /// Stored before (same tenant, id, timestamp); not counted again.
    Duplicate,
    /// Queued, not yet committed (ack mode `accepted`).
    Accepted,
    Rejected {
        code: ErrorCode,
        message: String,
    },
}

/// Why a whole request was not taken. Nothing of it was stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    #[error("ingest queue is full, retry after {retry_after_ms} ms")]
    Busy { retry_after_ms: u32 },
    #[error("rate limit exceeded, retry after {retry_after_ms} ms")]
    RateLimited { retry_after_ms: u32 },
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("server is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Storage(StoreError),
}

impl IngestError {
    /// What a client is told, over HTTP and the binary protocol alike: never the text of an
    /// internal error (it is logged here, once, instead).
    pub fn public_message(&self) -> String {
        match self {
            IngestError::Storage(store) if store.is_retryable() => {
                tracing::warn!(error = %store, "ingest failed");
                "storage is unavailable; nothing was stored, retry later".to_owned()
            }
            IngestError::Storage(StoreError::Invalid { message, .. }) => message.clone(),
            IngestError::Storage(store) => {
                tracing::error!(error = %store, "ingest failed");
                "internal error; nothing was stored".to_owned()
            }
            other => other.to_string(),
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            IngestError::Busy { .. } => ErrorCode::Busy,
            IngestError::RateLimited { .. } | IngestError::QuotaExceeded(_) => ErrorCode::RateLimited,
            IngestError::ShuttingDown => ErrorCode::Unavailable,
            IngestError::Storage(error) => error.code(),
        }
    }
}

/// Set only by `tally-edge --bench-skip-pricing-and-validation`. A process-wide switch rather
/// than a field of [`EdgeConfig`](crate::EdgeConfig) threaded into [`Ingestor::new`], so that a
/// benchmark-only knob changes no constructor; read once per request, never per event.
static BENCH_SKIP_PRICING_AND_VALIDATION: AtomicBool = AtomicBool::new(false);

/// For benchmarks only: from now on, [`Ingestor::prepare`] in this process neither checks events
/// against the tenant's service registry nor prices them (rows are stored unpriced: cost NULL,
/// no rule ids). Time window, dedup and rollups stay on. It exists to measure what validation
/// and pricing cost on the ingest path; nothing else may call it.
pub fn bench_skip_pricing_and_validation() {
    BENCH_SKIP_PRICING_AND_VALIDATION.store(true, Ordering::Relaxed);
}

/// Why an event the database refused alone was not stored (its batch was).
const STORAGE_REFUSED: &str = "storage refused this event alone; it was not stored (the other events were)";

/// Delay suggested to clients refused because the queue is full.
pub const BUSY_RETRY_AFTER_MS: u32 = 1000;

/// Events of one request after the rules: rows to store and, per event, where its row is or
/// why it was refused.
#[derive(Debug, Default)]
pub struct Prepared {
    pub rows: Vec<EventRow>,
    slots: Vec<Result<(), (ErrorCode, String)>>,
    /// Sum of the per-event costs of `rows`.
    cost: rust_decimal::Decimal,
}

impl Prepared {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Per-event statuses given the outcomes of the stored rows, in order.
    fn statuses(
        slots: Vec<Result<(), (ErrorCode, String)>>,
        outcomes: Option<Vec<Outcome>>,
    ) -> Vec<EventStatus> {
        let mut outcomes = outcomes.map(Vec::into_iter);
        slots
            .into_iter()
            .map(|slot| match slot {
                Err((code, message)) => EventStatus::Rejected { code, message },
                Ok(()) => match outcomes.as_mut().and_then(Iterator::next) {
                    Some(Outcome::Stored) => EventStatus::Stored,
                    Some(Outcome::Duplicate) => EventStatus::Duplicate,
                    Some(Outcome::Rejected) => EventStatus::Rejected {
                        code: ErrorCode::InvalidEvent,
                        message: STORAGE_REFUSED.to_owned(),
                    },
                    Some(Outcome::Spilled) | None => EventStatus::Accepted,
                },
            })
            .collect()
    }
}

/// Applies the ingest rules and hands events to the sink.
#[derive(Debug, Clone)]
pub struct Ingestor {
    queue: Arc<IngestQueue>,
    tenants: Arc<Tenants>,
    /// The widest window any tenant may have: storage has partitions for it (see
    /// `EdgeConfig::retention_with_window`), so an event validation accepts can always be stored.
    window_max: TimeWindow,
}

impl Ingestor {
    pub fn new(queue: Arc<IngestQueue>, tenants: Arc<Tenants>, window_max: TimeWindow) -> Ingestor {
        Ingestor { queue, tenants, window_max }
    }

    /// The widest late and early windows a tenant may set.
    pub fn window_max(&self) -> TimeWindow {
        self.window_max
    }

    pub fn queue(&self) -> &Arc<IngestQueue> {
        &self.queue
    }

    pub fn tenants(&self) -> &Arc<Tenants> {
        &self.tenants
    }

    /// The caller's tenant context, with the rate limit and quotas applied to `events` events.
    /// Returns whether the tenant is over a quota whose policy is to flag.
    pub async fn admit(
        &self,
        caller: &Caller,
        events: usize,
    ) -> Result<(Arc<TenantContext>, bool), IngestError> {
        let context = self.tenants.get(caller.tenant_id).await.map_err(IngestError::Storage)?;
        match context.admit(u32::try_from(events).unwrap_or(u32::MAX)) {
            Admission::Admit { over_quota } => Ok((context, over_quota)),
            Admission::RateLimited { retry_after_ms } => {
                metrics::counter!("tally_events_rejected_total", "cause" => "rate_limited")
                    .increment(events as u64);
                Err(IngestError::RateLimited { retry_after_ms })
            }
            Admission::QuotaExceeded { message } => {
                metrics::counter!("tally_events_rejected_total", "cause" => "quota").increment(events as u64);
                Err(IngestError::QuotaExceeded(message))
            }
        }
    }

    /// Checks each event (decoded and protocol-validated by the caller, or refused with its
    /// error) against the tenant's registry and time window, prices it, and makes rows of the
    /// good ones. Under [`bench_skip_pricing_and_validation`] the registry check and pricing
    /// are left out.
    pub fn prepare(
        &self,
        context: &TenantContext,
        over_quota: bool,
        events: impl IntoIterator<Item = Result<Event, EventError>>,
    ) -> Prepared {
        let window = TimeWindow {
            late: Duration::from_secs(u64::from(context.settings.late_window_seconds))
                .min(self.window_max.late),
            ahead: Duration::from_secs(u64::from(context.settings.future_window_seconds))
                .min(self.window_max.ahead),
        };
        let prepared = match BENCH_SKIP_PRICING_AND_VALIDATION.load(Ordering::Relaxed) {
            false => prepare_rows::<true>(context, window, over_quota, events),
            true => prepare_rows::<false>(context, window, over_quota, events),
        };
        metrics::counter!("tally_cost_microunits_total").increment(cost_microunits(prepared.cost));
        context.record(prepared.rows.len() as i64, prepared.cost);
        prepared
    }

    /// Queues the prepared rows and, in durable mode, waits for their commit.
    pub async fn submit(
        &self,
        prepared: Prepared,
        ack_mode: AckMode,
        when_full: WhenFull,
        shard_hint: usize,
    ) -> Result<Vec<EventStatus>, IngestError> {
        let Prepared { rows, slots, .. } = prepared;
        if rows.is_empty() {
            return Ok(Prepared::statuses(slots, Some(Vec::new())));
        }
        let (submission, receiver) = match ack_mode {
            AckMode::Durable => {
                let (submission, receiver) = Submission::durable(rows);
                (submission, Some(receiver))
            }
            AckMode::Accepted => (Submission::accepted(rows), None),
        };
        match self.queue.submit(shard_hint, submission, when_full).await {
            Ok(()) => {}
            Err(SubmitError::Full(_)) => {
                return Err(IngestError::Busy { retry_after_ms: BUSY_RETRY_AFTER_MS });
            }
            Err(SubmitError::Closed(_)) => return Err(IngestError::ShuttingDown),
        }
        let Some(receiver) = receiver else {
            return Ok(Prepared::statuses(slots, None));
        };
        // A dropped sender means the worker died without answering: report it as unavailable,
        // never as success.
        let outcomes = receiver
            .await
            .map_err(|error| {
                IngestError::Storage(StoreError::unavailable("sink worker stopped").with_source(error))
            })?
            .map_err(IngestError::Storage)?;
        Ok(Prepared::statuses(slots, Some(outcomes)))
    }
}

/// [`Ingestor::prepare`]'s loop; `PRICE_AND_VALIDATE` is false only when benchmarking, and is a
/// constant so that the normal loop carries no per-event test of it.
fn prepare_rows<const PRICE_AND_VALIDATE: bool>(
    context: &TenantContext,
    window: TimeWindow,
    over_quota: bool,
    events: impl IntoIterator<Item = Result<Event, EventError>>,
) -> Prepared {
    let now_us = now_us();
    let oldest_us = now_us - window.late.as_micros() as i64;
    let newest_us = now_us + window.ahead.as_micros() as i64;
    let mut prepared = Prepared::default();
    let mut price = pricing::EventPrice::default();
    for event in events {
        let checked = event.and_then(|event| {
            if PRICE_AND_VALIDATE {
                context.registry.check(&event)?;
            }
            check_window(event.timestamp_us, oldest_us, newest_us, &window)?;
            if PRICE_AND_VALIDATE {
                context.prices.price_event_into(&event, &mut price).map_err(|error| {
                    metrics::counter!("tally_events_rejected_total", "cause" => "cost_out_of_range")
                        .increment(1);
                    EventError::new("cost", error.to_string())
                })?;
            }
            Ok(event)
        });
        match checked {
            Ok(event) => {
                let mut row = EventRow::new(context.tenant_id, event, price.cost);
                row.price_rule_ids.extend_from_slice(&price.rule_ids);
                if PRICE_AND_VALIDATE && price.cost.is_none() {
                    metrics::counter!("tally_events_unpriced_total").increment(1);
                }
                if over_quota {
                    row.flags |= sink::FLAG_OVER_QUOTA;
                }
                // Each cost is at most `pricing::EVENT_COST_MAX`, so a request's sum cannot overflow.
                prepared.cost = prepared
                    .cost
                    .checked_add(price.cost.unwrap_or_default())
                    .unwrap_or(rust_decimal::Decimal::MAX);
                prepared.rows.push(row);
                prepared.slots.push(Ok(()));
            }
            Err(error) => {
                metrics::counter!("tally_events_rejected_total", "cause" => "invalid_event").increment(1);
                prepared.slots.push(Err((ErrorCode::InvalidEvent, error.to_string())));
            }
        }
    }
    prepared
}

/// A cost in millionths of its currency, for the cost counter (rounded; negative costs count 0).
fn cost_microunits(cost: rust_decimal::Decimal) -> u64 {
    use rust_decimal::prelude::ToPrimitive;
    (cost * rust_decimal::Decimal::from(1_000_000)).round().to_u64().unwrap_or(0)
}

fn check_window(
    timestamp_us: i64,
    oldest_us: i64,
    newest_us: i64,
    window: &TimeWindow,
) -> Result<(), EventError> {
    if timestamp_us < oldest_us {
        let days = window.late.as_secs() / 86_400;
        return Err(EventError::new(
            "timestamp",
            format!("is older than the late-event window of {days} days"),
        ));
    }
    if timestamp_us > newest_us {
        let seconds = window.ahead.as_secs();
        return Err(EventError::new("timestamp", format!("is more than {seconds} s in the future")));
    }
    Ok(())
}
