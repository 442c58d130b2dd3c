//! The series the edge (and the sink workers it runs) report, with their help texts, and the
//! `/metrics` page. The recorder is installed by the binary (`telemetry::install_metrics`) and
//! handed in as [`EdgeConfig::metrics`](crate::EdgeConfig::metrics); this module only emits.
//!
//! Every series an alert or a dashboard reads is registered at start with all its label
//! values, so that it exists at 0 before its first event ("no failures" reads 0, not "no data").
//! Labels are bounded: no tenant or user labels; routes are the router's patterns.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use wire::AckMode;

use crate::EdgeState;

/// A counter: name, help, and the (label, value) pairs registered at start, one series each.
type Counter = (&'static str, &'static str, &'static [(&'static str, &'static str)]);

const COUNTERS: &[Counter] = &[
    (
        "tally_events_received_total",
        "Events received, by protocol (http, wire).",
        &[("protocol", "http"), ("protocol", "wire")],
    ),
    (
        "tally_events_rejected_total",
        "Events refused, by cause (invalid_event, rate_limited, quota).",
        &[("cause", "invalid_event"), ("cause", "rate_limited"), ("cause", "quota")],
    ),
    ("tally_events_unpriced_total", "Events stored without a price (no rule matched).", &[]),
    ("tally_events_stored_total", "Events committed (new rows).", &[]),
    (
        "tally_events_duplicate_total",
        "Events committed before (same tenant, id, timestamp), not counted again.",
        &[],
    ),
    (
        "tally_events_lost_total",
        "Accepted-mode events dropped after storage stayed down past the retry window.",
        &[],
    ),
    (
        "tally_cost_microunits_total",
        "Sum of the per-event costs priced at ingest, in millionths of the price book's currency (approximate; bills are exact).",
        &[],
    ),
    ("tally_commit_failures_total", "Sink transactions that failed.", &[]),
    (
        "tally_dedup_path_total",
        "Batches whose COPY met stored rows the resend hint did not know (then probed row by row).",
        &[],
    ),
    (
        "tally_queue_full_total",
        "Submissions that found the queue full, by policy (block, reject, overflow).",
        &[("policy", "block"), ("policy", "reject"), ("policy", "overflow")],
    ),
    ("tally_queue_pushes_total", "Submissions queued.", &[]),
    ("tally_queue_pops_total", "Submissions taken by sink workers.", &[]),
    ("tally_overflow_spilled_events_total", "Events spilled to the Redis overflow.", &[]),
    ("tally_overflow_spilled_bytes_total", "Bytes spilled to the Redis overflow.", &[]),
    ("tally_overflow_drained_events_total", "Events drained from the overflow into storage.", &[]),
    (
        "tally_auth_failures_total",
        "Refused API keys, by transport (http, wire).",
        &[("transport", "http"), ("transport", "wire")],
    ),
    (
        "tally_key_cache_total",
        "API key look-ups, by component and result (hit, miss).",
        &[("result", "hit"), ("result", "miss")],
    ),
    ("tally_wire_protocol_errors_total", "Binary connections closed for a protocol error, by code.", &[]),
    ("tally_http_requests_total", "HTTP requests answered, by route and status.", &[]),
    ("tally_rollup_folded_total", "Pending rollup entries folded into the rollups.", &[]),
    ("tally_rollup_fold_failures_total", "Rollup folds that failed (retried).", &[]),
];

/// Gauges: name and help.
const GAUGES: &[(&str, &str)] = &[
    ("tally_queue_events", "Events queued in memory, waiting for a sink worker."),
    ("tally_queue_events_max", "Events the queue may hold (the bound)."),
    ("tally_wire_connections_open", "Open binary-protocol connections."),
    ("tally_http_requests_in_flight", "HTTP requests being answered."),
    ("tally_overflow_entries", "Batches held in the Redis overflow."),
    ("tally_overflow_bytes", "Bytes held in the Redis overflow."),
    ("tally_overflow_bytes_max", "Bytes the overflow may hold (the bound)."),
    ("tally_overflow_oldest_age_seconds", "Age of the oldest batch in the overflow."),
    (
        "tally_rollup_unfolded_entries",
        "Committed rollup entries not yet folded into the rollups (readers add them).",
    ),
    ("tally_rollup_fold_lag_seconds", "Age of the oldest committed rollup entry not yet folded."),
];

/// Histograms: name and help.
const HISTOGRAMS: &[(&str, &str)] = &[
    ("tally_ack_seconds", "Time from a batch's arrival to its answer, by protocol and ack mode."),
    ("tally_commit_seconds", "Duration of a sink transaction."),
    ("tally_batch_events", "Events per sink transaction."),
    ("tally_http_request_seconds", "Duration of HTTP requests, by route."),
];

/// Describes every series and registers those with known labels at 0. Called by
/// [`start`](crate::start); a no-op without a recorder.
pub(crate) fn register() {
    for &(name, help, labels) in COUNTERS {
        metrics::describe_counter!(name, help);
        let component = if name == "tally_key_cache_total" { Some(("component", "edge")) } else { None };
        if labels.is_empty() && !name.starts_with("tally_wire_") && !name.starts_with("tally_http_") {
            let _ = metrics::counter!(name);
        }
        for &(label, value) in labels {
            match component {
                Some((key, component)) => {
                    let _ = metrics::counter!(name, key => component, label => value);
                }
                None => {
                    let _ = metrics::counter!(name, label => value);
                }
            }
        }
    }
    for &(name, help) in GAUGES {
        metrics::describe_gauge!(name, help);
        let _ = metrics::gauge!(name);
    }
    for &(name, help) in HISTOGRAMS {
        metrics::describe_histogram!(name, help);
    }
}

/// The label of an ack mode.
pub(crate) fn ack_mode_label(mode: AckMode) -> &'static str {
    match mode {
        AckMode::Durable => "durable",
        AckMode::Accepted => "accepted",
    }
}

/// Records the time from `started` to an answer of `protocol` in `mode`.
pub(crate) fn record_ack(protocol: &'static str, mode: AckMode, started: Instant) {
    metrics::histogram!("tally_ack_seconds", "protocol" => protocol, "ack_mode" => ack_mode_label(mode))
        .record(started.elapsed().as_secs_f64());
}

/// Counts HTTP requests by route and status and times them by route.
pub(crate) async fn record_request(request: Request<Body>, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let started = Instant::now();
    let in_flight = metrics::gauge!("tally_http_requests_in_flight");
    in_flight.increment(1.0);
    let response = next.run(request).await;
    in_flight.decrement(1.0);
    let status = response.status().as_u16().to_string();
    metrics::histogram!("tally_http_request_seconds", "route" => route.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("tally_http_requests_total", "route" => route, "status" => status).increment(1);
    response
}

/// `GET /metrics`: the gauges read at scrape time, then every series of the process.
pub(crate) async fn metrics_text(State(state): State<Arc<EdgeState>>) -> Response {
    let Some(handle) = &state.config.metrics else {
        return (StatusCode::NOT_FOUND, "this process exports no metrics\n").into_response();
    };
    let queue = state.ingestor.queue();
    metrics::gauge!("tally_queue_events").set(queue.events_queued() as f64);
    metrics::gauge!("tally_queue_events_max").set(queue.events_max() as f64);
    if let Some(overflow) = &state.config.overflow {
        metrics::gauge!("tally_overflow_bytes_max").set(overflow.bytes_max as f64);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
}
