//! The dashboards and alert rules in `deploy/` checked against real software: Debian's
//! `prometheus` scrapes a running `tally-edge` (PostgreSQL, Redis overflow) and `tally-query`
//! (Redis cache) under a short load, and then every dashboard panel's expression and every alert
//! rule's expression is evaluated through Prometheus's HTTP API. Any invalid expression, or one
//! that returns no series (a renamed metric or label), fails the test; so do `promtool check
//! rules` and `promtool test rules`.
//!
//! Alert rules follow one shape, `<base expression> <comparison> <number>` (see
//! `deploy/prometheus/alerts.yml`): the threshold is cut off the expression Prometheus reports
//! for the rule and the base alone must return series, since under a healthy load no alert fires.
//!
//! The binaries are the ones `cargo test --workspace` builds next to this test binary
//! (`target/debug/tally-edge`, `target/debug/tally-query`). Prometheus must be installed
//! (`scripts/test` installs Debian's package); without it the test fails, it never skips.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// Scrape and rule evaluation interval of the test's Prometheus.
const SCRAPE_INTERVAL: &str = "1s";
/// What Grafana's `$__rate_interval` stands for when the test evaluates a panel.
const RATE_INTERVAL: &str = "1m";
/// Samples of each target the test waits for after the load, so that every `rate` has data.
const SAMPLES_AFTER_LOAD: u32 = 4;

#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_panel_and_alert_rule_returns_series_from_a_running_tally() -> Result<()> {
    let prometheus_binary = installed("prometheus")?;
    check_rules_with_promtool()?;
    let (edge_binary, query_binary) = (built_binary("tally-edge")?, built_binary("tally-query")?);
    let database = tests::postgres().await.fresh_database().await?;
    let redis = tests::dedicated_redis(tests::RedisPersistence::None).await?;
    let env = [("DATABASE_URL", database.url.clone()), ("REDIS_URL", redis.url())];
    run(&edge_binary, &["tenant", "create", "acme"], &env).await?;
    let created =
        run(&edge_binary, &["key", "create", "--tenant", "acme", "--scopes", "ingest,query"], &env).await?;
    let key = created.lines().last().context("no key printed")?.trim().to_owned();

    let (wire, http, query) = (loopback()?, loopback()?, loopback()?);
    let edge_args = ["--wire-addr".to_owned(), wire.to_string(), "--http-addr".to_owned(), http.to_string()];
    let _edge = tests::Service::start("tally-edge", &edge_binary, &edge_args, &env, http).await?;
    let query_args = ["--addr".to_owned(), query.to_string()];
    let _query = tests::Service::start("tally-query", &query_binary, &query_args, &env, query).await?;
    let prometheus = start_prometheus(&prometheus_binary, http, query).await?;

    load(http, query, &key).await?;
    let api = prometheus.addr;
    wait_for_samples(api, SAMPLES_AFTER_LOAD).await?;

    let mut failures = Vec::new();
    for (panel, expr) in dashboard_expressions()? {
        let expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__interval", RATE_INTERVAL);
        if let Err(error) = expect_series(api, &expr).await {
            failures.push(format!("{panel}: {error:#}"));
        }
    }
    for (alert, expr) in evaluated_alert_rules(api).await? {
        if let Err(error) = expect_series(api, &expr).await {
            failures.push(format!("alert {alert}: {error:#}"));
        }
    }
    ensure!(failures.is_empty(), "{} expressions failed:\n{}", failures.len(), failures.join("\n"));
    Ok(())
}

/// `promtool check rules` and `promtool test rules` on the shipped files.
fn check_rules_with_promtool() -> Result<()> {
    let promtool = installed("promtool")?;
    let dir = deploy_dir().join("prometheus");
    let (rules, unit_tests) = (
        std::fs::read_to_string(dir.join("alerts.yml"))?,
        std::fs::read_to_string(dir.join("alerts.test.yml"))?,
    );
    for line in rules.lines() {
        if let Some(alert) = line.trim_start().strip_prefix("- alert:").map(str::trim) {
            ensure!(
                unit_tests.contains(&format!("alertname: {alert}\n")),
                "alert {alert} has no unit test in deploy/prometheus/alerts.test.yml"
            );
        }
    }
    for args in [["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]] {
        let output = std::process::Command::new(&promtool).args(args).current_dir(&dir).output()?;
        ensure!(
            output.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// The test's Prometheus; its configuration directory is removed after it stops.
struct Prometheus {
    addr: SocketAddr,
    _service: tests::Service,
    _config_dir: RemovedOnDrop,
}

struct RemovedOnDrop(PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start_prometheus(binary: &Path, edge: SocketAddr, query: SocketAddr) -> Result<Prometheus> {
    let addr = loopback()?;
    let config_dir = tests::temp_dir("prometheus-config")?;
    let rules = deploy_dir().join("prometheus/alerts.yml");
    let config = format!(
        "global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  evaluation_interval: {SCRAPE_INTERVAL}\n\
         rule_files:\n  - {rules}\n\
         scrape_configs:\n  - job_name: tally-edge\n    static_configs:\n      - targets: [\"{edge}\"]\n\
         \x20 - job_name: tally-query\n    static_configs:\n      - targets: [\"{query}\"]\n",
        rules = rules.display()
    );
    let config_file = config_dir.join("prometheus.yml");
    std::fs::write(&config_file, config)?;
    let args = [
        format!("--config.file={}", config_file.display()),
        // Relative to the service's own directory, which goes with it.
        "--storage.tsdb.path=data".to_owned(),
        format!("--web.listen-address={addr}"),
        "--log.level=warn".to_owned(),
    ];
    let config_dir = RemovedOnDrop(config_dir);
    let service = tests::Service::start("prometheus", binary, &args, &[], addr).await?;
    Ok(Prometheus { addr, _service: service, _config_dir: config_dir })
}

/// A few hundred events, some refused; a few queries, some refused.
async fn load(http: SocketAddr, query: SocketAddr, key: &str) -> Result<()> {
    let headers = [("x-api-key", key), ("content-type", "application/json")];
    for batch in 0..3 {
        let events: Vec<String> = (0..100)
            .map(|index| {
                format!(
                    r#"{{"user_id":"user-{}","service_type":"llm_service","service_provider":"openai","model":"gpt-4o","input_tokens":{},"output_tokens":20,"latency_ms":120}}"#,
                    index % 7,
                    100 + batch * 100 + index
                )
            })
            .collect();
        let body = format!(r#"{{"events":[{}]}}"#, events.join(","));
        let answer = tests::http(http, "POST", "/api/v1/events/batch", &headers, &body).await?;
        ensure!(answer.status == 200, "batch {batch}: {answer:?}");
    }
    let one = r#"{"user_id":"u","service_type":"api_service","service_provider":"internal","endpoint":"/x","method":"GET"}"#;
    for path in ["/api/v1/events", "/api/v1/events?ack=accepted"] {
        let answer = tests::http(http, "POST", path, &headers, one).await?;
        ensure!(answer.status == 200 || answer.status == 202, "{path}: {answer:?}");
    }
    let refused = [
        (http, "POST", "/api/v1/events", key, r#"{"user_id":"u","service_type":"llm_service"}"#, 400),
        (http, "POST", "/api/v1/events", "tally_wrong", "{}", 401),
        (query, "GET", "/api/v1/usage/aggregate?period=fortnight", key, "", 400),
        (query, "GET", "/api/v1/usage", "tally_wrong", "", 401),
    ];
    for (addr, method, path, key, body, status) in refused {
        let answer = tests::http(addr, method, path, &[("x-api-key", key)], body).await?;
        ensure!(answer.status == status, "{method} {path}: expected {status}, got {answer:?}");
    }
    for path in [
        "/api/v1/usage?limit=10",
        "/api/v1/usage/aggregate?period=day",
        "/api/v1/usage/aggregate?period=day",
        "/api/v1/analytics/trends",
        "/api/v1/billing/summary",
    ] {
        let answer = tests::http(query, "GET", path, &[("x-api-key", key)], "").await?;
        ensure!(answer.status == 200, "GET {path}: {answer:?}");
    }
    Ok(())
}

/// Waits (up to 60 s) until both targets are up and Prometheus holds `samples` scrapes of each
/// taken after the load, and every rule group has been evaluated since.
async fn wait_for_samples(api: SocketAddr, samples: u32) -> Result<()> {
    let started = Instant::now();
    let loaded_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    loop {
        let up = query(api, "up").await?;
        let targets_up = up
            .as_array()
            .is_some_and(|series| series.len() == 2 && series.iter().all(|series| series["value"][1] == "1"));
        let recent = query(api, &format!("count_over_time(up[{}s])", samples * 2 + 2)).await?;
        let enough = recent.as_array().is_some_and(|series| {
            series.len() == 2
                && series.iter().all(|series| {
                    series["value"][1].as_str().and_then(|n| n.parse::<u32>().ok()) >= Some(samples)
                })
        });
        let newest_scrape = query(api, "min(timestamp(up))").await?;
        let after_load = newest_scrape[0]["value"][1]
            .as_str()
            .and_then(|at| at.parse::<f64>().ok())
            .is_some_and(|at| at > loaded_at + f64::from(samples));
        if targets_up && enough && after_load {
            return Ok(());
        }
        ensure!(started.elapsed() < Duration::from_secs(60), "targets not scraped within 60 s: up = {up}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every alert rule as Prometheus loaded it, evaluated at least once and healthy, with its
/// threshold comparison cut off: (alert name, base expression).
async fn evaluated_alert_rules(api: SocketAddr) -> Result<Vec<(String, String)>> {
    let shipped = std::fs::read_to_string(deploy_dir().join("prometheus/alerts.yml"))?;
    let expected = shipped.lines().filter(|line| line.trim_start().starts_with("- alert:")).count();
    let answer = get_json(api, "/api/v1/rules?type=alert").await?;
    let mut rules = Vec::new();
    for group in answer["data"]["groups"].as_array().context("no rule groups")? {
        for rule in group["rules"].as_array().context("no rules")? {
            let name = rule["name"].as_str().unwrap_or("?").to_owned();
            ensure!(rule["health"] == "ok", "alert {name} is not healthy: {rule}");
            let expr = rule["query"].as_str().context("rule without query")?;
            rules.push((name.clone(), base_expression(expr).with_context(|| format!("alert {name}"))?));
        }
    }
    ensure!(
        rules.len() == expected,
        "Prometheus loaded {} alert rules, alerts.yml has {expected}",
        rules.len()
    );
    Ok(rules)
}

/// `a > 0.5` -> `a`: the expression without its final comparison with a number.
fn base_expression(expr: &str) -> Result<String> {
    let mut tokens = expr.trim().rsplitn(3, ' ');
    let (number, comparison, base) = (tokens.next(), tokens.next(), tokens.next());
    match (number, comparison, base) {
        (Some(number), Some("==" | "!=" | ">" | "<" | ">=" | "<="), Some(base))
            if number.parse::<f64>().is_ok() =>
        {
            Ok(base.to_owned())
        }
        _ => bail!("{expr:?} is not `<base> <comparison> <number>` (see deploy/prometheus/alerts.yml)"),
    }
}

/// Every panel's expressions: (dashboard / panel title, expression).
fn dashboard_expressions() -> Result<Vec<(String, String)>> {
    let dir = deploy_dir().join("grafana/dashboards");
    let mut found = Vec::new();
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(&dir)?.map(|entry| entry.map(|entry| entry.path())).collect::<Result<_, _>>()?;
    files.sort();
    for file in files.iter().filter(|file| file.extension().is_some_and(|ext| ext == "json")) {
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(file)?)
            .with_context(|| format!("{} is not JSON", file.display()))?;
        let title = dashboard["title"].as_str().unwrap_or("?");
        for panel in dashboard["panels"].as_array().context("no panels")? {
            let targets = panel["targets"].as_array().filter(|targets| !targets.is_empty());
            let targets = targets.with_context(|| format!("{title} / {}: no targets", panel["title"]))?;
            for target in targets {
                let expr = target["expr"].as_str().context("target without expr")?;
                found
                    .push((format!("{title} / {}", panel["title"].as_str().unwrap_or("?")), expr.to_owned()));
            }
        }
    }
    ensure!(
        files.len() >= 4 && found.len() >= 40,
        "expected 4 dashboards, found {} with {} expressions",
        files.len(),
        found.len()
    );
    Ok(found)
}

/// Evaluates `expr` now; an error if Prometheus refuses it or it returns no series.
async fn expect_series(api: SocketAddr, expr: &str) -> Result<()> {
    let result = query(api, expr).await.with_context(|| format!("`{expr}`"))?;
    let count = match &result {
        Value::Array(series) => series.len(),
        // A scalar is one value.
        _ => 1,
    };
    ensure!(count > 0, "`{expr}` returned no series");
    Ok(())
}

/// `GET /api/v1/query`: the result of a successful evaluation.
async fn query(api: SocketAddr, expr: &str) -> Result<Value> {
    let answer = get_json(api, &format!("/api/v1/query?query={}", percent_encode(expr))).await?;
    ensure!(answer["status"] == "success", "{}: {}", answer["errorType"], answer["error"]);
    Ok(answer["data"]["result"].clone())
}

async fn get_json(api: SocketAddr, path: &str) -> Result<Value> {
    let answer = tests::http_get(api, path).await?;
    serde_json::from_str(&answer.body)
        .with_context(|| format!("GET {path}: {} {}", answer.status, answer.body))
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (byte as char).to_string(),
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// Runs a Tally binary to completion; its standard output.
async fn run(binary: &Path, args: &[&str], env: &[(&str, String)]) -> Result<String> {
    let output = tokio::process::Command::new(binary)
        .args(args)
        .envs(env.iter().map(|(key, value)| (key, value)))
        .output()
        .await?;
    ensure!(
        output.status.success(),
        "{} {args:?}: {}",
        binary.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A program that must be installed; the error says how.
fn installed(program: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .with_context(|| {
            format!(
                "{program} is not installed; the dashboards and alerts cannot be checked without it: \
             run scripts/test (it installs Debian's prometheus package) or apt-get install prometheus"
            )
        })
}

/// A binary of the workspace, built next to this test binary (target/debug).
pub(crate) fn built_binary(name: &str) -> Result<PathBuf> {
    let test_binary = std::env::current_exe()?;
    let dir =
        test_binary.parent().and_then(Path::parent).context("test binary without a target directory")?;
    let binary = dir.join(name);
    ensure!(
        binary.is_file(),
        "{} is not built; `cargo test --workspace` builds it, or run `cargo build -p edge -p query --bins` first",
        binary.display()
    );
    Ok(binary)
}

pub(crate) fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

pub(crate) fn loopback() -> Result<SocketAddr> {
    Ok(format!("127.0.0.1:{}", tests::free_port()?).parse()?)
}
