//! Live counters and latency histograms of a run, and the summaries the report prints.
//!
//! Latencies are recorded per event (a batch's ack latency counts once for each of its events),
//! in microseconds, in HDR histograms with three significant digits.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

/// Largest latency a histogram holds: one hour, in microseconds. Longer ones are clamped.
const LATENCY_US_MAX: u64 = 3_600_000_000;
const SIGNIFICANT_DIGITS: u8 = 3;

/// A new, empty latency histogram.
pub fn latency_histogram() -> Histogram<u64> {
    // The bounds are constants that `new_with_bounds` accepts.
    Histogram::new_with_bounds(1, LATENCY_US_MAX, SIGNIFICANT_DIGITS).expect("valid histogram bounds")
}

/// Records `count` samples of `latency`, clamped into the histogram's range.
pub fn record_latency(histogram: &mut Histogram<u64>, latency: Duration, count: u64) {
    let micros = (latency.as_micros() as u64).clamp(1, LATENCY_US_MAX);
    // In range by construction; a failure would only lose a sample.
    let _ = histogram.record_n(micros, count);
}

/// The counters every connection task updates, and the histograms behind the report.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    /// Events handed to the transport.
    pub sent: AtomicU64,
    /// Events acknowledged as newly stored.
    pub stored: AtomicU64,
    /// Events acknowledged as stored before (resends).
    pub duplicate: AtomicU64,
    /// Events refused one by one (invalid).
    pub rejected: AtomicU64,
    /// Events without a final answer (transport errors, batch-level errors, deadlines).
    pub errors: AtomicU64,
    /// Microseconds after `started` of the last send and the last answer.
    send_end_us: AtomicU64,
    last_answer_us: AtomicU64,
    latencies: Mutex<Latencies>,
}

#[derive(Debug)]
struct Latencies {
    /// From the intended send time (the schedule), so stalls are not hidden.
    intended: Histogram<u64>,
    /// From the actual send time: the system's own service time.
    service: Histogram<u64>,
    /// Since the progress bar last looked.
    recent: Histogram<u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            started: Instant::now(),
            sent: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            duplicate: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            send_end_us: AtomicU64::new(0),
            last_answer_us: AtomicU64::new(0),
            latencies: Mutex::new(Latencies {
                intended: latency_histogram(),
                service: latency_histogram(),
                recent: latency_histogram(),
            }),
        }
    }

    /// When the run's clock started (the schedule's zero).
    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn record_sent(&self, events: u64) {
        self.sent.fetch_add(events, Ordering::Relaxed);
        self.send_end_us.fetch_max(self.micros_since_start(Instant::now()), Ordering::Relaxed);
    }

    /// Records a batch's final answer: its counts, and its latency once per event.
    pub fn record_answer(&self, intended: Instant, sent_at: Instant, answer: &AnswerCounts) {
        let now = Instant::now();
        self.stored.fetch_add(answer.stored, Ordering::Relaxed);
        self.duplicate.fetch_add(answer.duplicate, Ordering::Relaxed);
        self.rejected.fetch_add(answer.rejected, Ordering::Relaxed);
        self.errors.fetch_add(answer.errors, Ordering::Relaxed);
        self.last_answer_us.fetch_max(self.micros_since_start(now), Ordering::Relaxed);
        let answered = answer.stored + answer.duplicate + answer.rejected;
        if answered == 0 {
            return;
        }
        let mut latencies = self.latencies.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        record_latency(&mut latencies.intended, now.saturating_duration_since(intended), answered);
        record_latency(&mut latencies.recent, now.saturating_duration_since(intended), answered);
        record_latency(&mut latencies.service, now.saturating_duration_since(sent_at), answered);
    }

    /// Events with a final answer from the server (stored, duplicate or rejected).
    pub fn answered(&self) -> u64 {
        self.stored.load(Ordering::Relaxed)
            + self.duplicate.load(Ordering::Relaxed)
            + self.rejected.load(Ordering::Relaxed)
    }

    /// Latencies since the last call, for the progress bar.
    pub fn take_recent(&self) -> LatencySummary {
        let mut latencies = self.latencies.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let summary = LatencySummary::of(&latencies.recent);
        latencies.recent.reset();
        summary
    }

    /// Ack latency from the intended send time, and service latency from the actual one.
    pub fn latencies(&self) -> (LatencySummary, LatencySummary) {
        let latencies = self.latencies.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        (LatencySummary::of(&latencies.intended), LatencySummary::of(&latencies.service))
    }

    pub fn send_end(&self) -> Duration {
        Duration::from_micros(self.send_end_us.load(Ordering::Relaxed))
    }

    pub fn last_answer(&self) -> Duration {
        Duration::from_micros(self.last_answer_us.load(Ordering::Relaxed))
    }

    fn micros_since_start(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.started).as_micros() as u64
    }
}

/// What one batch's answer counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AnswerCounts {
    pub stored: u64,
    pub duplicate: u64,
    pub rejected: u64,
    pub errors: u64,
}

/// Percentiles of a latency histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub samples: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl LatencySummary {
    pub fn of(histogram: &Histogram<u64>) -> LatencySummary {
        if histogram.is_empty() {
            return LatencySummary::default();
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        LatencySummary {
            samples: histogram.len(),
            mean_ms: histogram.mean() / 1000.0,
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p90_ms: ms(histogram.value_at_quantile(0.90)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p999_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
        }
    }

    /// `p50 12.3 / p90 ... / max ...` with units.
    pub fn line(&self) -> String {
        format!(
            "p50 {} / p90 {} / p99 {} / p99.9 {} / max {}",
            format_ms(self.p50_ms),
            format_ms(self.p90_ms),
            format_ms(self.p99_ms),
            format_ms(self.p999_ms),
            format_ms(self.max_ms)
        )
    }
}

/// Milliseconds with a precision that suits their size.
pub fn format_ms(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.2} s", ms / 1000.0)
    }
}

/// How long a run took, for its achieved rate.
///
/// The time to the last answer, less the typical service latency (the median time from the
/// actual send to the ack), and never less than the schedule's window. So a run at a fixed rate
/// that keeps up achieves exactly that rate, whatever the latency of its last batch; one that
/// falls behind shows the lag (its sends run late, its answers come late).
pub fn elapsed_for_rate(window: Duration, last_answer: Duration, service_p50: Duration) -> Duration {
    window.max(last_answer.saturating_sub(service_p50))
}

/// Events per second over `elapsed`; 0 for an empty run.
pub fn rate(events: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() { 0.0 } else { events as f64 / elapsed.as_secs_f64() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_histogram_in_milliseconds() {
        let mut histogram = latency_histogram();
        for millis in 1..=1000u64 {
            record_latency(&mut histogram, Duration::from_millis(millis), 1);
        }
        let summary = LatencySummary::of(&histogram);
        assert_eq!(summary.samples, 1000);
        let close = |actual: f64, expected: f64| (actual - expected).abs() <= expected * 0.002;
        assert!(close(summary.p50_ms, 500.0), "{summary:?}");
        assert!(close(summary.p90_ms, 900.0), "{summary:?}");
        assert!(close(summary.p99_ms, 990.0), "{summary:?}");
        assert!(close(summary.p999_ms, 999.0), "{summary:?}");
        assert!(close(summary.max_ms, 1000.0), "{summary:?}");
        assert!(close(summary.mean_ms, 500.5), "{summary:?}");
    }

    #[test]
    fn per_event_weighting_and_clamping() {
        let mut histogram = latency_histogram();
        record_latency(&mut histogram, Duration::from_millis(2), 999);
        record_latency(&mut histogram, Duration::from_secs(10_000), 1);
        record_latency(&mut histogram, Duration::ZERO, 0);
        let summary = LatencySummary::of(&histogram);
        assert_eq!(summary.samples, 1000);
        assert!((summary.p99_ms - 2.0).abs() < 0.01);
        assert!((summary.max_ms - 3_600_000.0).abs() / 3_600_000.0 < 0.001, "clamped to an hour");
        assert_eq!(LatencySummary::of(&latency_histogram()), LatencySummary::default());
    }

    #[test]
    fn stats_count_answers_and_latencies_from_the_intended_time() {
        let stats = Stats::new();
        let intended = stats.started();
        stats.record_sent(10);
        let answer = AnswerCounts { stored: 7, duplicate: 2, rejected: 1, errors: 0 };
        stats.record_answer(intended, intended, &answer);
        stats.record_answer(intended, intended, &AnswerCounts { errors: 5, ..AnswerCounts::default() });
        assert_eq!(stats.answered(), 10);
        assert_eq!(stats.errors.load(Ordering::Relaxed), 5);
        let (ack, service) = stats.latencies();
        assert_eq!(ack.samples, 10, "errors have no latency");
        assert_eq!(service.samples, 10);
        assert_eq!(stats.take_recent().samples, 10);
        assert_eq!(stats.take_recent().samples, 0, "recent resets");
    }

    #[test]
    fn achieved_rate_ignores_the_last_batch_latency_but_not_lag() {
        let window = Duration::from_secs(20);
        // Kept up: the last batch went at 19.9 s and was acked 150 ms later.
        let on_time = elapsed_for_rate(window, Duration::from_millis(20_050), Duration::from_millis(150));
        assert_eq!(rate(200_000, on_time), 10_000.0);
        // Fell behind: the last ack came 5 s late.
        let late = elapsed_for_rate(window, Duration::from_millis(25_150), Duration::from_millis(150));
        assert_eq!(late, Duration::from_secs(25));
        assert_eq!(rate(200_000, late), 8_000.0);
        // Unthrottled: no window.
        assert_eq!(
            elapsed_for_rate(Duration::ZERO, Duration::from_secs(3), Duration::from_secs(1)),
            Duration::from_secs(2)
        );
        assert_eq!(rate(5, Duration::ZERO), 0.0);
    }
}
