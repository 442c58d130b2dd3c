//! The series the query service reports, with their help texts. The recorder is installed by
//! the binary (`telemetry::install_metrics`) and handed in as
//! [`QueryConfig::metrics`](crate::QueryConfig::metrics); this module only describes and
//! registers, so that every series an alert or a dashboard reads exists at 0 from the start.
//! Labels are bounded: routes are the router's patterns; no tenant or user labels.

/// A counter: name, help, and the (label, value) pairs registered at start, one series each.
type Counter = (&'static str, &'static str, &'static [(&'static str, &'static str)]);

const COUNTERS: &[Counter] = &[
    ("tally_query_requests_total", "Query requests answered, by route and status.", &[]),
    ("tally_query_errors_total", "Query errors, by error code.", &[]),
    (
        "tally_query_cache_total",
        "Cached answers looked up, by result (miss, memory, redis).",
        &[("result", "miss"), ("result", "memory"), ("result", "redis")],
    ),
    (
        "tally_query_cache_errors_total",
        "Redis cache operations that failed (the answer is computed instead).",
        &[],
    ),
    (
        "tally_key_cache_total",
        "API key look-ups, by component and result (hit, miss).",
        &[("result", "hit"), ("result", "miss")],
    ),
];

/// Describes every series and registers those with known labels at 0; a no-op without a
/// recorder.
pub(crate) fn register() {
    for &(name, help, labels) in COUNTERS {
        metrics::describe_counter!(name, help);
        if name == "tally_query_cache_errors_total" {
            let _ = metrics::counter!(name);
        }
        for &(label, value) in labels {
            if name == "tally_key_cache_total" {
                let _ = metrics::counter!(name, "component" => "query", label => value);
            } else {
                let _ = metrics::counter!(name, label => value);
            }
        }
    }
    metrics::describe_histogram!("tally_query_seconds", "Duration of query requests, by route.");
}
