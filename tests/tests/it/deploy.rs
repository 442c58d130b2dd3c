//! The deployment files (`Dockerfile`, `deploy/compose.yaml`, `deploy/k8s/`, the Prometheus
//! scrape configuration) checked against the binaries they run, since no container engine runs
//! here: every environment variable they set for a Tally binary is one that binary reads (from
//! its `--help`), every entry point is a binary, and every port and HTTP path they probe or
//! scrape is served by that binary on that port (started here, on free ports standing in for the
//! defaults).
//!
//! The files are read line by line with two conventions they follow: environment variables are
//! upper-case mapping keys (or `- name:` entries of a container's `env`), and each one belongs to
//! the compose service or Kubernetes object it is written under.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result, ensure};

use crate::prometheus::{built_binary, deploy_dir, loopback};

/// What a Tally binary accepts, from its `--help`.
#[derive(Debug, Default)]
struct Accepted {
    env: BTreeSet<String>,
    /// Default listen port -> the flag that sets that listener.
    ports: BTreeMap<u16, String>,
}

async fn accepted(binary: &str) -> Result<Accepted> {
    let output = tokio::process::Command::new(built_binary(binary)?).arg("--help").output().await?;
    ensure!(output.status.success(), "{binary} --help failed");
    let help = String::from_utf8(output.stdout)?;
    let mut accepted = Accepted::default();
    // Clap's layout depends on the terminal width: read the markers wherever they are, each for
    // the last flag named before it.
    let mut flag = String::new();
    let mut rest = help.as_str();
    while let Some(start) = rest.find(['-', '[']) {
        rest = &rest[start..];
        if let Some(after) =
            rest.strip_prefix("--").filter(|after| after.starts_with(|c: char| c.is_ascii_lowercase()))
        {
            let name =
                after.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).next().unwrap_or_default();
            flag = format!("--{name}");
        } else if let Some(after) = rest.strip_prefix("[env: ") {
            let name: String = after.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            accepted.env.insert(name);
        } else if let Some(after) = rest.strip_prefix("[default: ")
            && let Some(Ok(addr)) = after.split(']').next().map(str::parse::<SocketAddr>)
        {
            accepted.ports.insert(addr.port(), flag.clone());
        }
        rest = &rest[1..];
    }
    ensure!(
        !accepted.env.is_empty() && !accepted.ports.is_empty(),
        "{binary} --help lists no env or address: {help}"
    );
    Ok(accepted)
}

/// What a deployment file asks of one binary.
#[derive(Debug, Default)]
struct Asked {
    env: BTreeSet<String>,
    /// (port, HTTP path) probed or scraped.
    paths: BTreeSet<(u16, String)>,
    /// Ports exposed.
    ports: BTreeSet<u16>,
}

/// Stands for "one of the binaries" (the keys of the shared Secret).
const EITHER: &str = "either binary";

/// The binary a compose service or Kubernetes object runs, by its name.
fn binary_of(owner: &str) -> Option<&'static str> {
    match owner {
        "tally-edge" => Some("tally-edge"),
        "tally-query" => Some("tally-query"),
        _ => None,
    }
}

fn is_env_name(text: &str) -> bool {
    text.len() > 1 && text.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// Reads `compose.yaml` and `k8s/*.yaml`: per binary, what they ask of it. The compose anchor
/// `x-tally-database` and the Secret `tally` are shared by both binaries.
fn asked() -> Result<BTreeMap<&'static str, Asked>> {
    let mut asked: BTreeMap<&'static str, Asked> = BTreeMap::new();
    let deploy = deploy_dir();
    let mut files = vec![deploy.join("compose.yaml")];
    for entry in std::fs::read_dir(deploy.join("k8s"))? {
        files.push(entry?.path());
    }
    for file in &files {
        let text = std::fs::read_to_string(file)?;
        let compose = file.ends_with("compose.yaml");
        let mut owner = String::new();
        for line in text.lines().filter(|line| !line.trim_start().starts_with('#')) {
            let indent = line.len() - line.trim_start().len();
            let trimmed = line.trim();
            // Who the following lines belong to: a compose service or anchor, a k8s object.
            if compose && (indent == 2 && trimmed.ends_with(':') || indent == 0 && trimmed.starts_with("x-"))
            {
                owner = trimmed.split(':').next().unwrap_or_default().to_owned();
            }
            if !compose && trimmed == "---" {
                owner.clear();
            }
            if !compose
                && owner.is_empty()
                && indent == 2
                && let Some(name) = trimmed.strip_prefix("name: ")
            {
                owner = name.trim().to_owned();
            }
            let owners: Vec<&'static str> = match owner.as_str() {
                "x-tally-database" => vec!["tally-edge", "tally-query"],
                // The Secret: each key is read by the binaries whose `env` names it.
                "tally" => vec![EITHER],
                other => binary_of(other).into_iter().collect(),
            };
            for binary in owners {
                let entry = asked.entry(binary).or_default();
                collect_line(file, trimmed, entry)?;
            }
        }
    }
    Ok(asked)
}

/// One line's environment variables, ports and paths.
fn collect_line(file: &Path, line: &str, asked: &mut Asked) -> Result<()> {
    let key = line.trim_start_matches("- ").split(':').next().unwrap_or_default().trim();
    if is_env_name(key) {
        asked.env.insert(key.to_owned());
    }
    if let Some(name) = line.strip_prefix("- name: ").map(str::trim).filter(|name| is_env_name(name)) {
        asked.env.insert(name.to_owned());
    }
    let number_after = |marker: &str| -> Option<u16> {
        let rest = &line[line.find(marker)? + marker.len()..];
        rest.trim_start_matches(['"', ' '])
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok()
    };
    for marker in ["containerPort:", "prometheus.io/port:", "/dev/tcp/127.0.0.1/", "- \""] {
        if let Some(port) = number_after(marker) {
            asked.ports.insert(port);
        }
    }
    // k8s probes: `httpGet: {path: /ready, port: 8000}`; compose health checks: a request line
    // written to /dev/tcp/127.0.0.1/PORT.
    if let (Some(start), Some(port)) = (line.find("path: "), number_after("port: ")) {
        let path = line[start + 6..].split([',', '}']).next().unwrap_or_default().trim();
        asked.paths.insert((port, path.to_owned()));
    }
    if let (Some(start), Some(port)) = (line.find("GET "), number_after("/dev/tcp/127.0.0.1/")) {
        let path = line[start + 4..].split_whitespace().next().unwrap_or_default();
        asked.paths.insert((port, path.to_owned()));
    }
    ensure!(!line.contains("\t"), "{}: tab in {line:?}", file.display());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn deployment_files_set_only_what_the_binaries_accept_and_probe_what_they_serve() -> Result<()> {
    let asked = asked()?;
    ensure!(asked.contains_key("tally-edge") && asked.contains_key("tally-query"), "{asked:?}");
    let mut served: BTreeMap<&str, Accepted> = BTreeMap::new();
    for binary in ["tally-edge", "tally-query"] {
        served.insert(binary, accepted(binary).await?);
    }
    let mut problems = Vec::new();
    let union: BTreeSet<String> = served.values().flat_map(|accepted| accepted.env.iter().cloned()).collect();
    for (binary, asked) in &asked {
        if *binary == EITHER {
            for name in asked.env.difference(&union) {
                problems.push(format!("the Secret holds {name}, which no binary reads"));
            }
            continue;
        }
        let accepted = &served[binary];
        for name in asked.env.difference(&accepted.env) {
            problems.push(format!("{binary} does not read {name}"));
        }
        for port in asked.ports.iter().chain(asked.paths.iter().map(|(port, _)| port)) {
            if !accepted.ports.contains_key(port) {
                problems
                    .push(format!("{binary} listens on no port {port} by default ({:?})", accepted.ports));
            }
        }
    }
    // The Dockerfile: its ENV for both binaries, its entry point a binary; compose and k8s
    // entry points / commands name binaries.
    let dockerfile = std::fs::read_to_string(deploy_dir().join("../Dockerfile"))?;
    for name in dockerfile
        .split_whitespace()
        .filter_map(|word| word.split('=').next())
        .filter(|word| word.starts_with("TALLY_") || *word == "DATABASE_URL" || *word == "REDIS_URL")
    {
        if !served.values().any(|accepted| accepted.env.contains(name)) {
            problems.push(format!("Dockerfile sets {name}, which no binary reads"));
        }
    }
    for text in [dockerfile.clone(), std::fs::read_to_string(deploy_dir().join("compose.yaml"))?] {
        for line in text.lines().filter(|line| line.contains("ENTRYPOINT") || line.contains("entrypoint:")) {
            if !line.contains("\"tally-edge\"") && !line.contains("\"tally-query\"") {
                problems.push(format!("entry point of no Tally binary: {line}"));
            }
        }
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    check_paths_are_served(&asked, &served).await
}

/// Starts each binary with every listener on a free port and asks each probed path of the
/// listener its default port stands for: 200 expected.
async fn check_paths_are_served(
    asked: &BTreeMap<&'static str, Asked>,
    served: &BTreeMap<&str, Accepted>,
) -> Result<()> {
    let database = tests::postgres().await.fresh_database().await?;
    let env = [("DATABASE_URL", database.url.clone())];
    let mut problems = Vec::new();
    for (binary, asked) in asked.iter().filter(|(binary, _)| **binary != EITHER) {
        let mut args = Vec::new();
        let mut actual: BTreeMap<u16, SocketAddr> = BTreeMap::new();
        for (port, flag) in &served[binary].ports {
            let addr = loopback()?;
            args.extend([flag.clone(), addr.to_string()]);
            actual.insert(*port, addr);
        }
        let (first_port, first) =
            asked.paths.iter().next().map(|(port, _)| (*port, actual[port])).context("no probes")?;
        let service = tests::Service::start(binary, &built_binary(binary)?, &args, &env, first).await?;
        for (port, path) in &asked.paths {
            let answer = tests::http_get(actual[port], path).await?;
            if answer.status != 200 {
                problems.push(format!("{binary} :{port}{path} answered {} {}", answer.status, answer.body));
            }
        }
        ensure!(asked.paths.iter().any(|(port, _)| *port == first_port), "{}", service.log_tail());
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

/// Migration 0006: on plain PostgreSQL `usage_events` is natively partitioned, so partitions are
/// created and dropped by day; the dedup index is its only index (TimescaleDB's default time
/// index, which `create_hypertable` used to add, is dropped where it exists).
#[tokio::test(flavor = "multi_thread")]
async fn partition_maintenance_follows_the_table_and_the_dedup_index_stands_alone() -> Result<()> {
    let database = tests::postgres().await.fresh_database().await?;
    let store = sink::pg::PgStore::connect_lazy(&database.url, &sink::pg::PgOptions::default())?;
    store.migrate().await?;
    let store = sink::Store::from(store);
    let mut db = database.connect().await?;
    let native: bool =
        sqlx::query_scalar("SELECT tally_events_natively_partitioned()").fetch_one(&mut db).await?;
    ensure!(native, "usage_events is natively partitioned on plain PostgreSQL");
    let created: i32 =
        sqlx::query_scalar("SELECT tally_ensure_partitions(DATE '2030-01-01', DATE '2030-01-03')")
            .fetch_one(&mut db)
            .await?;
    ensure!(created == 3, "created {created} partitions");
    let dropped: i32 =
        sqlx::query_scalar("SELECT tally_drop_events_before(DATE '2030-01-03')").fetch_one(&mut db).await?;
    ensure!(dropped >= 2, "dropped {dropped} partitions");
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE tablename = 'usage_events' ORDER BY indexname",
    )
    .fetch_all(&mut db)
    .await?;
    ensure!(indexes == ["usage_events_dedup"], "indexes on usage_events: {indexes:?}");
    store.maintain(&sink::Retention::default()).await?;
    Ok(())
}
