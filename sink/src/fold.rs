//! The rollup materializer's loop: folds what commits left pending into the rollups, in windows
//! large enough that a rollup key written by many commits is written once.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::store::{FoldReport, Store};

/// How often and how much the materializer folds.
#[derive(Debug, Clone, Copy)]
pub struct FoldLimits {
    /// Pause between folds while less than a full fold is pending.
    pub interval: Duration,
    /// Pending entries folded in one transaction.
    pub entries_max: usize,
}

impl Default for FoldLimits {
    fn default() -> Self {
        FoldLimits { interval: Duration::from_secs(2), entries_max: 300_000 }
    }
}

/// Folds forever: every `interval`, and at once again while a full fold's worth is pending.
/// A failed fold changes nothing (it is one transaction) and is tried again next round. Abort
/// the task to stop it; an aborted fold is rolled back, and what it held stays pending.
pub async fn run_folder(store: Arc<Store>, limits: FoldLimits) {
    loop {
        tokio::time::sleep(limits.interval).await;
        // A full fold means more is waiting: fold again at once.
        loop {
            match store.fold_rollups(limits.entries_max).await {
                Ok(report) => {
                    record(&report);
                    if (report.folded as usize) < limits.entries_max {
                        break;
                    }
                }
                Err(error) => {
                    metrics::counter!("tally_rollup_fold_failures_total").increment(1);
                    tracing::warn!(%error, "rollup fold failed; retrying next round");
                    break;
                }
            }
        }
    }
}

fn record(report: &FoldReport) {
    if report.skipped {
        return;
    }
    metrics::counter!("tally_rollup_folded_total").increment(report.folded);
    metrics::gauge!("tally_rollup_unfolded_entries").set(report.pending as f64);
    let lag = report.oldest_pending_us.map_or(0.0, |oldest_us| {
        let now_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
        (now_us.saturating_sub(oldest_us)).max(0) as f64 / 1e6
    });
    metrics::gauge!("tally_rollup_fold_lag_seconds").set(lag);
}
