//! Durable ingest into the embedded SQLite store, measured: batches of realistic events go
//! through `SqliteStore::commit` (insert, dedup, hourly rollups, one transaction, fsync) from one
//! or more concurrent committers, as the sink workers do, and the achieved rate is printed.
//!
//! ```text
//! cargo run --release -p sink --example sqlite_ingest -- [--events 500000] [--batch 10000]
//!     [--writers 2] [--synchronous full|normal] [--dir /tmp/somewhere] [--duplicates 0.0]
//!     [--scatter] [--users 50] [--page-size 4096] [--cache-mib 64] [--checkpoint-pages 16384]
//! ```
//!
//! Event times move forward through the last 6 hours as the run goes, as live traffic does, with
//! one event in ten up to 5 minutes late; `--scatter` spreads every batch over all 6 hours instead
//! (inserts land all over the table: the worst case for the page cache).
//!
//! The database is created fresh in a temporary directory (or `--dir`) and removed afterwards.

use std::sync::Arc;
use std::time::Instant;

use rust_decimal::Decimal;
use sink::sqlite::{SqliteOptions, SqliteStore, Synchronous};
use sink::{EventRow, Outcome, Store};
use uuid::Uuid;

#[derive(Debug)]
struct Args {
    events: usize,
    batch: usize,
    writers: usize,
    synchronous: Synchronous,
    dir: Option<std::path::PathBuf>,
    duplicates: f64,
    scatter: bool,
    users: usize,
    options: SqliteOptions,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        events: 500_000,
        batch: 10_000,
        writers: 2,
        synchronous: Synchronous::Full,
        dir: None,
        duplicates: 0.0,
        scatter: false,
        users: 50,
        options: SqliteOptions::default(),
    };
    let mut iter = std::env::args().skip(1);
    while let Some(flag) = iter.next() {
        let mut value = || iter.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--events" => args.events = value()?.parse().map_err(|_| "--events: a number")?,
            "--batch" => args.batch = value()?.parse().map_err(|_| "--batch: a number")?,
            "--writers" => args.writers = value()?.parse().map_err(|_| "--writers: a number")?,
            "--duplicates" => args.duplicates = value()?.parse().map_err(|_| "--duplicates: a fraction")?,
            "--scatter" => args.scatter = true,
            "--page-size" => {
                args.options.page_size_bytes = value()?.parse().map_err(|_| "--page-size: a number")?
            }
            "--users" => args.users = value()?.parse().map_err(|_| "--users: a number")?,
            "--cache-mib" => {
                args.options.writer_cache_kib =
                    value()?.parse::<u32>().map_err(|_| "--cache-mib: a number")? * 1024
            }
            "--checkpoint-pages" => {
                args.options.wal_autocheckpoint_pages =
                    value()?.parse().map_err(|_| "--checkpoint-pages: a number")?
            }
            "--dir" => args.dir = Some(value()?.into()),
            "--synchronous" => {
                args.synchronous = match value()?.as_str() {
                    "full" => Synchronous::Full,
                    "normal" => Synchronous::Normal,
                    other => return Err(format!("--synchronous {other:?}: full or normal")),
                }
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

const SIX_HOURS_US: i64 = 6 * 3_600_000_000;

/// A batch of events of `--users` users, 4 models and 3 tenants within the last 6 hours, with
/// fractional quantities and costs, latencies, and now and then custom quantities and metadata.
fn batch(tenants: &[Uuid], first: usize, events: usize, args: &Args, now_us: i64) -> Vec<EventRow> {
    let step_us = SIX_HOURS_US / args.events.max(1) as i64;
    const MODELS: [&str; 4] = ["gpt-4o", "gpt-4o-mini", "claude-3", "in-house-7b"];
    (first..first + events)
        .map(|index| {
            let mut event = wire::Event::new(
                format!("user-{}", index % args.users.max(1)),
                "llm_service",
                "openai",
                if index % 7 == 0 { "embedding" } else { "completion" },
            )
            .at(if args.scatter {
                now_us - (index as i64 * 7_919_993) % SIX_HOURS_US
            } else {
                let late_us = if index % 10 == 3 { (index as i64 * 7_919) % 300_000_000 } else { 0 };
                now_us - SIX_HOURS_US + index as i64 * step_us - late_us
            })
            .with_model(MODELS[index % MODELS.len()])
            .with_quantity(wire::QuantityKind::InputTokens, (index % 4000) as f64 + 0.5)
            .with_quantity(wire::QuantityKind::OutputTokens, (index % 700) as f64)
            .with_latency_ms(((index * 37) % 5000) as f64 / 3.0);
            if index % 10 == 0 {
                event = event.with_custom_quantity("images", 2.0).with_metadata("region", "eu-west");
            }
            if index % 50 == 0 {
                event = event.with_error(Some("rate_limit".into()));
            }
            let cost = (index % 5 != 0).then(|| Decimal::new((index % 9000) as i64 + 1, 6));
            EventRow::new(tenants[index % tenants.len()], event, cost)
        })
        .collect()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("tally-bench-{}", Uuid::new_v4())));
    let options = SqliteOptions { synchronous: args.synchronous, ..args.options.clone() };
    let sqlite = SqliteStore::open_with(dir.join("tally.db"), &options).await?;
    let store = Arc::new(Store::from(sqlite.clone()));
    let mut tenants = Vec::new();
    for name in ["acme", "globex", "initech"] {
        tenants.push(store.create_tenant(name).await?.id);
    }
    let now_us = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros()) as i64;
    let batches: Vec<Vec<EventRow>> = (0..args.events.div_ceil(args.batch))
        .map(|index| batch(&tenants, index * args.batch, args.batch, &args, now_us))
        .collect();
    // Resend a share of the previous batch, as clients do after a lost ack.
    let repeats = (args.batch as f64 * args.duplicates) as usize;
    let mut batches = batches;
    for index in (1..batches.len()).rev() {
        let previous: Vec<EventRow> = batches[index - 1].iter().take(repeats).cloned().collect();
        batches[index].truncate(args.batch - repeats);
        batches[index].extend(previous);
    }
    let batches = Arc::new(batches);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.writers {
        let (store, batches, next) = (store.clone(), batches.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let (mut stored, mut duplicate, mut slowest) = (0usize, 0usize, std::time::Duration::ZERO);
            loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(rows) = batches.get(index) else { break };
                let commit_started = Instant::now();
                let outcomes = store.commit(rows).await?;
                slowest = slowest.max(commit_started.elapsed());
                stored += outcomes.iter().filter(|outcome| **outcome == Outcome::Stored).count();
                duplicate += outcomes.iter().filter(|outcome| **outcome == Outcome::Duplicate).count();
            }
            Ok::<_, sink::StoreError>((stored, duplicate, slowest))
        }));
    }
    let (mut stored, mut duplicate, mut slowest) = (0, 0, std::time::Duration::ZERO);
    for task in tasks {
        let (task_stored, task_duplicate, task_slowest) = task.await??;
        stored += task_stored;
        duplicate += task_duplicate;
        slowest = slowest.max(task_slowest);
    }
    let elapsed = started.elapsed();
    let sent: usize = batches.iter().map(Vec::len).sum();
    println!(
        "sqlite {:?}: {sent} events in {:.2} s = {:.0} events/s ({stored} stored, {duplicate} duplicate; \
         {} writers, batches of {}, slowest commit {} ms)",
        args.synchronous,
        elapsed.as_secs_f64(),
        sent as f64 / elapsed.as_secs_f64(),
        args.writers,
        args.batch,
        slowest.as_millis(),
    );
    sqlite.close().await;
    let size: u64 =
        std::fs::read_dir(&dir)?.filter_map(|entry| entry.ok()?.metadata().ok()).map(|meta| meta.len()).sum();
    println!(
        "database files: {:.1} MiB ({:.0} bytes per stored event)",
        size as f64 / 1048576.0,
        size as f64 / stored.max(1) as f64
    );
    if args.dir.is_none() {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}
