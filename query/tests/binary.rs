//! The `tally-query` binary as an operator runs it: its `/metrics` carries the query service's
//! series and the process's, and a port in use is named.

use std::net::SocketAddr;

use anyhow::{Result, ensure};

const QUERY: &str = env!("CARGO_BIN_EXE_tally-query");

const SERIES: &[&str] = &[
    "tally_query_requests_total{",
    "tally_query_seconds_bucket{",
    "tally_query_cache_total{result=\"miss\"}",
    "tally_key_cache_total{component=\"query\"",
    "process_resident_memory_bytes ",
    "process_open_fds ",
];

#[tokio::test(flavor = "multi_thread")]
async fn metrics_carry_query_and_process_series() -> Result<()> {
    let database = tests::postgres().await.fresh_database().await?;
    let addr: SocketAddr = format!("127.0.0.1:{}", tests::free_port()?).parse()?;
    let args = ["--addr".to_owned(), addr.to_string()];
    let query = tests::Service::start(
        "tally-query",
        QUERY.as_ref(),
        &args,
        &[("DATABASE_URL", database.url.clone())],
        addr,
    )
    .await?;
    let answer = tests::http_get(addr, "/api/v1/usage/aggregate").await?;
    ensure!(answer.status == 401, "{answer:?}");
    let metrics = tests::http_get(addr, "/metrics").await?;
    ensure!(metrics.status == 200, "{metrics:?}");
    let missing: Vec<_> = SERIES.iter().filter(|series| !metrics.body.contains(*series)).collect();
    ensure!(
        missing.is_empty(),
        "/metrics lacks {missing:?}:\n{}\n--- log ---\n{}",
        metrics.body,
        query.log_tail()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_port_in_use_is_named() -> Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let taken_addr = taken.local_addr()?;
    let output = tokio::process::Command::new(QUERY)
        .args(["--addr", &taken_addr.to_string()])
        .env("DATABASE_URL", "postgres://tally@127.0.0.1:1/tally")
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(!output.status.success(), "{stderr}");
    ensure!(stderr.contains(&format!("failed to listen on {taken_addr} (query HTTP)")), "{stderr}");
    ensure!(stderr.contains("--addr"), "{stderr}");
    drop(taken);
    Ok(())
}
