//! The final report of a load run: counts, achieved rate, latency percentiles, CPU split and the
//! verification verdict, as text for people and JSON for machines.

use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::cpu::CpuSplit;
use crate::load::{LoadOptions, LoadOutcome, Mode};
use crate::stats::{LatencySummary, elapsed_for_rate, rate};
use crate::verify::Verification;

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub mode: Mode,
    /// Events per second asked for; `None`: unthrottled.
    pub target_rate: Option<f64>,
    pub connections: usize,
    pub batch_size: usize,
    pub tenants: usize,
    pub sent: u64,
    pub acked_stored: u64,
    pub acked_duplicate: u64,
    pub rejected: u64,
    /// Events without a final answer.
    pub errors: u64,
    /// Deliberate resends acknowledged: the duplicates the run expects.
    pub expected_duplicates: u64,
    /// Deliberately invalid events answered: the rejections the run expects.
    pub expected_rejections: u64,
    /// Seconds the achieved rate is computed over (see `stats::elapsed_for_rate`).
    pub elapsed_s: f64,
    /// The schedule's span at the target rate (0 unthrottled).
    pub window_s: f64,
    /// Seconds from the start to the last send and to the last answer.
    pub send_end_s: f64,
    pub last_answer_s: f64,
    /// Answered events (stored, duplicate or rejected) per second.
    pub achieved_events_per_s: f64,
    /// From the intended send time, per event.
    pub ack_latency: LatencySummary,
    /// From the actual send time, per event.
    pub service_latency: LatencySummary,
    pub cpu: Option<CpuSplit>,
    /// The database's version and settings (PostgreSQL, or the embedded SQLite file).
    pub database: Option<String>,
    pub verification: Option<Verification>,
    /// Rollups against raw events at an instant in the middle of the run.
    pub verification_midway: Option<crate::verify::InstantCheck>,
    /// Why the run fails; empty when it passes.
    pub failures: Vec<String>,
    pub passed: bool,
}

impl RunReport {
    /// The report of a finished load, before verification and thresholds.
    pub fn new(options: &LoadOptions, tenants: usize, outcome: &LoadOutcome) -> RunReport {
        let stats = &outcome.stats;
        let (ack_latency, service_latency) = stats.latencies();
        let service_p50 = std::time::Duration::from_secs_f64(service_latency.p50_ms / 1000.0);
        let elapsed = elapsed_for_rate(outcome.window, stats.last_answer(), service_p50);
        let answered = stats.answered();
        let expected_duplicates = outcome.ledgers.iter().map(|ledger| ledger.resends_accepted).sum();
        let expected_rejections = outcome
            .ledgers
            .iter()
            .map(|ledger| (ledger.invalid_rejected_ids.len() + ledger.invalid_accepted_ids.len()) as u64)
            .sum();
        RunReport {
            mode: options.mode,
            target_rate: options.rate,
            connections: options.connections,
            batch_size: options.effective_batch_size(),
            tenants,
            sent: stats.sent.load(Ordering::Relaxed),
            acked_stored: stats.stored.load(Ordering::Relaxed),
            acked_duplicate: stats.duplicate.load(Ordering::Relaxed),
            rejected: stats.rejected.load(Ordering::Relaxed),
            errors: stats.errors.load(Ordering::Relaxed),
            expected_duplicates,
            expected_rejections,
            elapsed_s: elapsed.as_secs_f64(),
            window_s: outcome.window.as_secs_f64(),
            send_end_s: stats.send_end().as_secs_f64(),
            last_answer_s: stats.last_answer().as_secs_f64(),
            achieved_events_per_s: rate(answered, elapsed),
            ack_latency,
            service_latency,
            cpu: None,
            database: None,
            verification: None,
            verification_midway: None,
            failures: Vec::new(),
            passed: true,
        }
    }

    /// Sets `failures` and `passed` from the errors, the verification and the rate floor.
    pub fn judge(&mut self, fail_under: Option<f64>) {
        self.failures.clear();
        if self.sent == 0 {
            self.failures.push("nothing was sent".to_owned());
        }
        if self.errors > 0 {
            self.failures.push(format!("{} events got no final answer", self.errors));
        }
        if let Some(verification) = &self.verification
            && !verification.passed
        {
            self.failures.push(format!("verification found {} problems", verification.problems.len()));
        }
        if let Some(midway) = &self.verification_midway
            && !midway.problems.is_empty()
        {
            self.failures.push(format!(
                "rollups differed from raw events {:.1} s into the run: {}",
                midway.at_s,
                midway.problems.join("; ")
            ));
        }
        // Judged on the figure as printed, in whole events per second: a run reported as
        // achieving 10000 events/s does not fail a floor of 10000.
        if let Some(floor) = fail_under
            && self.achieved_events_per_s.round() < floor
        {
            self.failures.push(format!(
                "achieved {:.0} events/s, below the floor of {floor:.0} events/s",
                self.achieved_events_per_s
            ));
        }
        self.passed = self.failures.is_empty();
    }

    /// The human-readable report.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let target =
            self.target_rate.map_or("unthrottled".to_owned(), |rate| format!("target {rate:.0} events/s"));
        out.push_str(&format!(
            "tally-load: {:?} mode, {target}, {} connections, batches of {}, {} tenants\n",
            self.mode, self.connections, self.batch_size, self.tenants
        ));
        if let Some(database) = &self.database {
            out.push_str(&format!("database      {database}\n"));
        }
        out.push_str(&format!("sent          {}\n", self.sent));
        out.push_str(&format!("acked stored  {}\n", self.acked_stored));
        out.push_str(&format!(
            "acked dup     {} (deliberate resends acked: {})\n",
            self.acked_duplicate, self.expected_duplicates
        ));
        out.push_str(&format!(
            "rejected      {} (deliberately invalid: {})\n",
            self.rejected, self.expected_rejections
        ));
        out.push_str(&format!("errors        {}\n", self.errors));
        out.push_str(&format!(
            "achieved      {:.0} events/s over {:.2} s (last send at {:.2} s, last answer at {:.2} s)\n",
            self.achieved_events_per_s, self.elapsed_s, self.send_end_s, self.last_answer_s
        ));
        out.push_str(&format!("ack latency   {} (from the intended send time)\n", self.ack_latency.line()));
        out.push_str(&format!("service       {} (from the actual send time)\n", self.service_latency.line()));
        if let Some(cpu) = &self.cpu {
            out.push_str(&format!("cpu           {}\n", cpu.line()));
        }
        if let Some(midway) = &self.verification_midway {
            let verdict = if midway.problems.is_empty() { "passed" } else { "FAILED" };
            out.push_str(&format!(
                "midway check  {verdict}: at {:.1} s, {} raw events against {} rollup keys (folded plus pending)\n",
                midway.at_s, midway.raw_events, midway.rollup_rows_compared,
            ));
        }
        if let Some(verification) = &self.verification {
            out.push_str(&verification_text(verification));
        }
        if self.passed {
            out.push_str("result        PASS\n");
        } else {
            for failure in &self.failures {
                out.push_str(&format!("FAIL          {failure}\n"));
            }
        }
        out
    }
}

/// The verification verdict, a line per tenant and per problem.
pub fn verification_text(verification: &Verification) -> String {
    let mut out = String::new();
    let verdict = if verification.passed { "passed" } else { "FAILED" };
    out.push_str(&format!("verification  {verdict}\n"));
    for tenant in &verification.tenants {
        out.push_str(&format!(
            "  tenant {}: {} rows stored, {} distinct acked, acks {} stored + {} duplicate, {} resends, {} rejected, {} unanswered, {} rollup rows match\n",
            tenant.tenant_id,
            tenant.stored_rows,
            tenant.distinct_acked,
            tenant.acked_stored,
            tenant.acked_duplicate,
            tenant.resends_acked,
            tenant.invalid_rejected,
            tenant.unacked,
            tenant.rollup_rows_compared,
        ));
    }
    for problem in &verification.problems {
        out.push_str(&format!("  MISMATCH {problem}\n"));
    }
    out
}
