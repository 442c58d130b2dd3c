//! Re-rating as a background job. The admin handler writes the run's audit row first (status
//! running), then a job here re-prices the range in bounded batches, writes its progress on the
//! row after each batch and its end (finished, failed or interrupted). Jobs are tracked so that
//! shutdown stops them between batches and records them as interrupted; a process that crashes
//! leaves its row running, which stops counting as running once its progress is older than
//! [`RERATE_STALE_SECONDS`]. Re-rating is idempotent, so any run that did not finish may simply be
//! run again.

use std::sync::Arc;
use std::time::Duration;

use sink::{Repriced, RerateRequest, RerateRun, RerateStatus, StoreError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::EdgeState;

/// Events re-priced per transaction; progress is written after each.
pub const RERATE_BATCH_EVENTS: u32 = 5_000;
/// Longest range one re-rate may cover.
pub const RERATE_RANGE_DAYS_MAX: i64 = 400;
/// A running re-rate whose progress has not moved for this long was left by a stopped process:
/// it no longer blocks a new run of its tenant. Far above the time one batch takes.
pub const RERATE_STALE_SECONDS: i64 = 600;
/// Runs listed by `GET /api/v1/admin/rerate`, newest first.
pub const RERATE_LIST_MAX: u32 = 100;

/// The new price of an event under the tenant's current rules.
pub type Reprice = Box<dyn Fn(&wire::Event) -> Repriced + Send + Sync>;

/// The re-rate jobs of this process.
#[derive(Debug, Default)]
pub struct RerateJobs {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl RerateJobs {
    /// Starts a run whose audit row [`sink::Store::start_rerate`] has written.
    pub fn spawn(&self, state: Arc<EdgeState>, run: RerateRun, reprice: Reprice) {
        let stop = self.stop.clone();
        self.tracker.spawn(run_job(state, run, reprice, stop));
    }

    /// Stops every job after the batch in hand (each records its run as interrupted) and waits
    /// for them up to `timeout`. Returns whether they all ended in time.
    pub async fn stop(&self, timeout: Duration) -> bool {
        self.stop.cancel();
        self.tracker.close();
        tokio::time::timeout(timeout, self.tracker.wait()).await.is_ok()
    }
}

/// How a run ended, with its public message.
enum End {
    Finished,
    Failed(String),
    Interrupted,
}

async fn run_job(state: Arc<EdgeState>, mut run: RerateRun, reprice: Reprice, stop: CancellationToken) {
    let request = RerateRequest {
        tenant_id: run.tenant_id,
        start_us: run.start_us,
        end_us: run.end_us,
        batch_events: RERATE_BATCH_EVENTS,
    };
    let end = run_batches(&state, &mut run, &request, &reprice, &stop).await;
    // Rollup costs may have moved: the tenant's month-to-date must be read again.
    state.ingestor.tenants().invalidate(run.tenant_id);
    let (status, error) = match &end {
        End::Finished => (RerateStatus::Finished, None),
        End::Failed(message) => (RerateStatus::Failed, Some(message.as_str())),
        End::Interrupted => (
            RerateStatus::Interrupted,
            Some("the server shut down during this re-rate; re-rating is idempotent, run it again"),
        ),
    };
    if let Err(error) = state.store.update_rerate(&run, status, error).await {
        // The row stays running until it is stale; a new run of the tenant then replaces it.
        tracing::warn!(rerate_id = %run.id, %error, "failed to record the end of a re-rate");
    }
    tracing::info!(rerate_id = %run.id, tenant_id = %run.tenant_id, status = status.as_str(),
        events_scanned = run.events_scanned, events_changed = run.events_changed, "re-rate ended");
}

/// Re-prices batch after batch until the range is done, a batch fails or the process stops,
/// writing the figures so far on the run's row after each batch.
async fn run_batches(
    state: &EdgeState,
    run: &mut RerateRun,
    request: &RerateRequest,
    reprice: &Reprice,
    stop: &CancellationToken,
) -> End {
    let mut after = None;
    loop {
        if stop.is_cancelled() {
            return End::Interrupted;
        }
        let batch = match state.store.rerate_batch(request, after, &**reprice).await {
            Ok(batch) => batch,
            Err(error) => return failed(run, error),
        };
        run.events_scanned += batch.scanned;
        run.events_changed += batch.changed;
        let sums = sink::add_money(run.cost_before, batch.cost_before)
            .and_then(|before| Ok((before, sink::add_money(run.cost_after, batch.cost_after)?)));
        match sums {
            Ok((before, after)) => (run.cost_before, run.cost_after) = (before, after),
            Err(error) => return failed(run, error),
        }
        let Some(last) = batch.last else { return End::Finished };
        after = Some(last);
        if let Err(error) = state.store.update_rerate(run, RerateStatus::Running, None).await {
            // Progress is only a report: the run goes on, and its end is written again below.
            tracing::warn!(rerate_id = %run.id, %error, "failed to record re-rate progress");
        }
    }
}

/// The public message of a run stopped by `error`; the internal detail is logged here, once.
fn failed(run: &RerateRun, error: StoreError) -> End {
    let scanned = run.events_scanned;
    End::Failed(match error {
        StoreError::Invalid { message: detail, .. } => {
            format!("{detail}; the {scanned} events re-rated before it keep their new prices")
        }
        other => {
            tracing::warn!(rerate_id = %run.id, error = %other, "re-rate batch failed");
            format!(
                "storage failed after {scanned} events; the events re-rated before it keep their new prices \
                 and re-rating is idempotent, so it may be run again"
            )
        }
    })
}
