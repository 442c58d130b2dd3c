//! The edge's configuration: every limit and address, with its default, validated once at
//! start-up. The binary fills it from flags and environment variables.

use std::net::SocketAddr;
use std::time::Duration;

use sink::{BatchLimits, QueueLimits, Retention};

use crate::ingest::TimeWindow;

/// Everything the edge server needs to know.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// Binary protocol listener. Default `0.0.0.0:7000`.
    pub wire_addr: SocketAddr,
    /// HTTP listener. Default `0.0.0.0:8000`.
    pub http_addr: SocketAddr,
    /// Binary protocol connections open at once; more wait in the listen backlog. Default 1,024.
    pub wire_connections_max: usize,
    /// Negotiated frame payload limit in bytes. Default 4 MiB.
    pub wire_frame_bytes_max: u32,
    /// Negotiated events per binary batch. Default 10,000.
    pub wire_batch_events_max: u32,
    /// Negotiated unanswered batches per connection. Default 8.
    pub wire_credits: u32,
    /// Longest the edge waits for a binary client to take one answer before dropping the
    /// connection (a client that does not read its acks). Default 10 s.
    pub wire_write_timeout: Duration,
    /// Events per HTTP batch request. Default 1,000 (the older system's limit), at most 10,000.
    pub http_batch_events_max: usize,
    /// Bytes of an HTTP request body. Default 16 MiB.
    pub http_body_bytes_max: usize,
    /// Deadlines for reading HTTP requests and the cap on open HTTP connections.
    pub http: serve::HttpLimits,
    /// TLS for both listeners (HTTP and the binary protocol). Unset: plain TCP.
    pub tls: Option<serve::Tls>,
    /// Ring buffers, their depth, and the events all of them may hold.
    pub queue: QueueLimits,
    /// When a sink worker commits.
    pub batch: BatchLimits,
    /// How long a looked-up API key is trusted before it is checked again. Default 30 s.
    pub key_cache_ttl: Duration,
    /// How long a tenant's settings, services and prices are used before they are read again
    /// (changes through this edge apply at once; through another edge within this). Default 10 s.
    pub tenant_cache_ttl: Duration,
    /// The operator key: manages every tenant through `/api/v1/admin/tenants`. Unset: no operator.
    pub operator_key: Option<String>,
    /// Redis overflow for when PostgreSQL is slow or down. Unset: no overflow (a full queue
    /// blocks binary clients and refuses HTTP requests with 503).
    pub overflow: Option<sink::overflow::OverflowConfig>,
    /// The timestamps accepted.
    pub window: TimeWindow,
    /// Data retention and partitions.
    pub retention: Retention,
    /// Time between maintenance runs (partitions ahead, retention). Default 1 hour.
    pub maintenance_interval: Duration,
    /// How often and how much the rollup materializer folds (see `sink::fold`).
    pub fold: sink::FoldLimits,
    /// How long a graceful shutdown may take before remaining work is abandoned. Default 30 s.
    pub shutdown_timeout: Duration,
    /// The process's Prometheus recorder, rendered on `GET /metrics`; installed by the binary
    /// (`telemetry::install_metrics`), never by the edge. Unset: `/metrics` answers 404.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            wire_addr: SocketAddr::from(([0, 0, 0, 0], 7000)),
            http_addr: SocketAddr::from(([0, 0, 0, 0], 8000)),
            wire_connections_max: 1024,
            wire_frame_bytes_max: wire::limits::FRAME_PAYLOAD_BYTES_DEFAULT,
            wire_batch_events_max: wire::limits::BATCH_EVENTS_DEFAULT,
            wire_credits: wire::limits::CREDITS_DEFAULT,
            wire_write_timeout: Duration::from_secs(10),
            http_batch_events_max: 1000,
            http_body_bytes_max: 16 * 1024 * 1024,
            http: serve::HttpLimits::default(),
            tls: None,
            queue: QueueLimits { shards: 2, submissions_per_shard: 1024, events_max: 200_000 },
            batch: BatchLimits::default(),
            key_cache_ttl: Duration::from_secs(30),
            tenant_cache_ttl: Duration::from_secs(10),
            operator_key: None,
            overflow: None,
            window: TimeWindow::default(),
            retention: Retention::default(),
            maintenance_interval: Duration::from_secs(3600),
            fold: sink::FoldLimits::default(),
            shutdown_timeout: Duration::from_secs(30),
            metrics: None,
        }
    }
}

/// A configuration value that cannot work, and how to fix it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid configuration: {field} {problem}")]
pub struct ConfigError {
    pub field: &'static str,
    pub problem: String,
}

impl EdgeConfig {
    /// Checks every value and the relations between them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |field, problem: String| Err(ConfigError { field, problem });
        if self.wire_frame_bytes_max < wire::limits::HANDSHAKE_PAYLOAD_BYTES_MAX
            || self.wire_frame_bytes_max > wire::limits::FRAME_PAYLOAD_BYTES_CEILING
        {
            return fail(
                "wire_frame_bytes_max",
                format!("must be from 16 KiB to 16 MiB, got {}", self.wire_frame_bytes_max),
            );
        }
        if self.wire_batch_events_max == 0 || self.wire_batch_events_max > wire::limits::BATCH_EVENTS_CEILING
        {
            return fail(
                "wire_batch_events_max",
                format!("must be from 1 to 50,000, got {}", self.wire_batch_events_max),
            );
        }
        if self.wire_credits == 0 || self.wire_credits > wire::limits::CREDITS_CEILING {
            return fail("wire_credits", format!("must be from 1 to 256, got {}", self.wire_credits));
        }
        if self.wire_connections_max == 0 {
            return fail("wire_connections_max", "must be at least 1".into());
        }
        if self.http_batch_events_max == 0 || self.http_batch_events_max > 10_000 {
            return fail(
                "http_batch_events_max",
                format!("must be from 1 to 10,000, got {}", self.http_batch_events_max),
            );
        }
        if self.queue.shards == 0 || self.queue.shards > 64 {
            return fail("sink_workers", format!("must be from 1 to 64, got {}", self.queue.shards));
        }
        if self.queue.events_max < self.wire_batch_events_max as usize {
            return fail("queue_events_max", "must hold at least one full binary batch".into());
        }
        if self.batch.events_max == 0 {
            return fail("batch_events_max", "must be at least 1".into());
        }
        if self.operator_key.as_ref().is_some_and(|key| key.len() < 32) {
            return fail("operator_key", "must be at least 32 characters".into());
        }
        let late_days = self.window.late.as_secs().div_ceil(86_400) as u32;
        if self.retention.event_retention_days <= late_days {
            return fail(
                "event_retention_days",
                format!(
                    "must exceed the late-event window of {late_days} days, or late events would be dropped at once"
                ),
            );
        }
        Ok(())
    }

    /// Partitions must reach back over the whole late-event window.
    pub fn retention_with_window(&self) -> Retention {
        let late_days = self.window.late.as_secs().div_ceil(86_400) as u32;
        Retention {
            partitions_behind_days: self.retention.partitions_behind_days.max(late_days + 1),
            ..self.retention
        }
    }
}
