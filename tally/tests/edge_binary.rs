//! The `tally-edge` binary as an operator runs it: its `/metrics` carries the series of every
//! component it runs, and a start-up failure says what failed and what to do.

use std::net::SocketAddr;

use anyhow::{Result, ensure};

const EDGE: &str = env!("CARGO_BIN_EXE_tally-edge");

/// Series of the edge, of the sink workers it runs, and of the process.
const EDGE_SERIES: &[&str] = &[
    "tally_events_received_total{protocol=\"http\"}",
    "tally_events_rejected_total{cause=\"invalid_event\"}",
    "tally_http_requests_total{",
    "tally_ack_seconds_bucket{protocol=\"http\",ack_mode=\"durable\"",
    "tally_cost_microunits_total ",
    "tally_key_cache_total{component=\"edge\"",
    "tally_queue_events_max ",
    "tally_events_stored_total ",
    "tally_commit_seconds_bucket",
    "tally_commit_failures_total ",
    "process_resident_memory_bytes ",
    "process_open_fds ",
    "process_cpu_seconds_total ",
];

#[tokio::test(flavor = "multi_thread")]
async fn metrics_carry_edge_sink_and_process_series() -> Result<()> {
    let data_dir = tests::temp_dir("edge-metrics")?;
    let data_dir_arg = data_dir.display().to_string();
    run(&["--data-dir", &data_dir_arg, "tenant", "create", "acme"]).await?;
    let created = run(&["--data-dir", &data_dir_arg, "key", "create", "--tenant", "acme"]).await?;
    let key = created.lines().last().unwrap_or_default().trim().to_owned();
    let wire: SocketAddr = format!("127.0.0.1:{}", tests::free_port()?).parse()?;
    let http: SocketAddr = format!("127.0.0.1:{}", tests::free_port()?).parse()?;
    let args = [
        "--data-dir".to_owned(),
        data_dir_arg.clone(),
        "--wire-addr".to_owned(),
        wire.to_string(),
        "--http-addr".to_owned(),
        http.to_string(),
    ];
    let env = [("TALLY_LOG_FORMAT", "json".to_owned())];
    let edge = tests::Service::start("tally-edge", EDGE.as_ref(), &args, &env, http).await;
    let result = async {
        let edge = edge?;
        // A stored event, a refused one and a refused key, so every kind of series has data.
        let event = r#"{"user_id":"u1","service_type":"llm_service","service_provider":"openai","model":"gpt-4o","input_tokens":10,"output_tokens":5}"#;
        let stored = tests::http(http, "POST", "/api/v1/events", &[("x-api-key", &key)], event).await?;
        ensure!(stored.status == 200, "{stored:?}\n{}", edge.log_tail());
        let refused = tests::http(http, "POST", "/api/v1/events", &[("x-api-key", &key)], "{}").await?;
        ensure!(refused.status == 400, "{refused:?}");
        let unknown = tests::http(http, "POST", "/api/v1/events", &[("x-api-key", "tally_unknown")], "{}").await?;
        ensure!(unknown.status == 401, "{unknown:?}");
        let metrics = tests::http_get(http, "/metrics").await?;
        ensure!(metrics.status == 200, "{metrics:?}");
        let missing: Vec<_> = EDGE_SERIES.iter().filter(|series| !metrics.body.contains(*series)).collect();
        ensure!(missing.is_empty(), "missing {missing:?} in\n{}\n--- log ---\n{}", metrics.body, edge.log_tail());
        // JSON logs: the log holds JSON objects and no colour codes.
        let log = edge.log_tail();
        ensure!(log.lines().any(|line| line.starts_with('{') && line.contains("\"level\"")), "{log}");
        ensure!(!log.contains('\u{1b}'), "colour codes in a log that is not a terminal: {log}");
        Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&data_dir);
    result
}

/// Runs `tally-edge` with `args` to completion; its standard output.
async fn run(args: &[&str]) -> Result<String> {
    let output = tokio::process::Command::new(EDGE).args(args).env_remove("DATABASE_URL").output().await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(output.status.success(), "tally-edge {args:?}: {stderr}");
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_port_in_use_is_named_with_its_listener_and_the_flag_to_change() -> Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let taken_addr = taken.local_addr()?;
    let wire = format!("127.0.0.1:{}", tests::free_port()?);
    let dir = tests::temp_dir("edge-port")?;
    let output = tokio::process::Command::new(EDGE)
        .args(["--wire-addr", &wire, "--http-addr", &taken_addr.to_string()])
        .arg("--data-dir")
        .arg(&dir)
        .env_remove("DATABASE_URL")
        .output()
        .await?;
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(!output.status.success(), "started although {taken_addr} is taken: {stderr}");
    let expected = format!("failed to listen on {taken_addr} (ingest HTTP)");
    ensure!(stderr.contains(&expected), "expected {expected:?} in: {stderr}");
    ensure!(stderr.contains("choose another port with --http-addr"), "{stderr}");
    ensure!(!stderr.contains('\u{1b}'), "colour codes although stderr is not a terminal: {stderr}");
    drop(taken);
    Ok(())
}
