//! The `tally` binary (ingest and query in one process) as an operator runs it: both of its
//! `/metrics` pages carry the series of both components and of the process, from the one
//! recorder the binary installs.

use std::net::SocketAddr;

use anyhow::{Result, ensure};

const TALLY: &str = env!("CARGO_BIN_EXE_tally");

/// Series of the edge, its sink workers, the query service and the process.
const SERIES: &[&str] = &[
    "tally_events_received_total{protocol=\"http\"}",
    "tally_http_requests_total{",
    "tally_events_stored_total ",
    "tally_commit_failures_total ",
    "tally_queue_events_max ",
    "tally_key_cache_total{component=\"edge\"",
    "tally_query_requests_total{",
    "tally_query_cache_total{result=\"miss\"}",
    "tally_key_cache_total{component=\"query\"",
    "process_resident_memory_bytes ",
    "process_open_fds ",
];

fn loopback() -> Result<SocketAddr> {
    Ok(format!("127.0.0.1:{}", tests::free_port()?).parse()?)
}

#[tokio::test(flavor = "multi_thread")]
async fn both_metrics_pages_carry_every_component() -> Result<()> {
    let (wire, http, query) = (loopback()?, loopback()?, loopback()?);
    let args: Vec<String> = [("--wire-addr", wire), ("--http-addr", http), ("--query-addr", query)]
        .iter()
        .flat_map(|(flag, addr)| [flag.to_string(), addr.to_string()])
        .collect();
    let tally = tests::Service::start("tally", TALLY.as_ref(), &args, &[], query).await?;
    tests::Service::wait_for_port(http).await?;
    // One request to each component.
    let answer =
        tests::http(http, "POST", "/api/v1/events", &[("x-api-key", "tally_nonexistent")], "{}").await?;
    ensure!(answer.status == 401, "{answer:?}");
    let answer = tests::http_get(query, "/api/v1/usage/aggregate").await?;
    ensure!(answer.status == 401, "{answer:?}");
    for (port, addr) in [("ingest", http), ("query", query)] {
        let metrics = tests::http_get(addr, "/metrics").await?;
        ensure!(metrics.status == 200, "{port}: {metrics:?}");
        let missing: Vec<_> = SERIES.iter().filter(|series| !metrics.body.contains(*series)).collect();
        ensure!(
            missing.is_empty(),
            "{port} /metrics lacks {missing:?}:\n{}\n--- log ---\n{}",
            metrics.body,
            tally.log_tail()
        );
    }
    Ok(())
}
