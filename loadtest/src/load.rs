//! The load itself: one task per connection, each sending its share of an open-loop schedule
//! (or as fast as the server takes it), through the binary client or plain HTTP.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use client::{Client, ClientConfig, ClientError};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::generator::{Batch, Generator, GeneratorConfig};
use crate::http::HttpConnection;
use crate::json::{self, Reading};
use crate::ledger::{Answer, InFlight, Recorder, TenantLedger};
use crate::progress::Progress;
use crate::stats::Stats;

/// How events travel to the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The binary protocol, through the `client` crate, pipelined within the server's credits.
    Binary,
    /// `POST /api/v1/events/batch`, one request at a time per connection.
    HttpBatch,
    /// `POST /api/v1/events`, one event per request, one request at a time per connection.
    HttpSingle,
}

/// How much load, and how it is shaped.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub mode: Mode,
    pub connections: usize,
    /// Events per batch (1 in `http-single`).
    pub batch_size: usize,
    /// Target events per second (open loop); `None`: as fast as the server acknowledges.
    pub rate: Option<f64>,
    pub duration: Option<Duration>,
    /// Total events to send.
    pub events: Option<u64>,
    /// Unanswered batches per binary connection.
    pub max_in_flight: usize,
    pub generator: GeneratorConfig,
}

/// A running edge and the keys of the tenants to load it with.
#[derive(Debug, Clone)]
pub struct Target {
    pub wire_addr: String,
    pub http_addr: String,
    /// One key per tenant; connection `i` uses key `i % len`.
    pub api_keys: Vec<String>,
}

/// What a load run leaves for the report and verification.
#[derive(Debug)]
pub struct LoadOutcome {
    pub stats: Arc<Stats>,
    pub ledgers: Vec<TenantLedger>,
    /// The schedule's span at the target rate; zero when unthrottled.
    pub window: Duration,
}

/// How long an in-flight batch may stay unanswered after the last send before the run gives up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest pause before resending an HTTP request refused with busy or unavailable.
const HTTP_RETRY_PAUSE_MAX: Duration = Duration::from_secs(1);
/// How long an HTTP request is resent after busy answers before it counts as an error.
const HTTP_RETRY_DEADLINE: Duration = Duration::from_secs(60);

impl LoadOptions {
    /// Events in one batch for the mode.
    pub fn effective_batch_size(&self) -> usize {
        if self.mode == Mode::HttpSingle { 1 } else { self.batch_size.max(1) }
    }

    /// Every event the schedule holds at a fixed rate, or the event limit.
    pub fn total_events(&self) -> Option<u64> {
        let by_duration = match (self.rate, self.duration) {
            (Some(rate), Some(duration)) => Some((rate * duration.as_secs_f64()).floor() as u64),
            _ => None,
        };
        match (by_duration, self.events) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Connects every connection, then runs the schedule to its end and waits for every answer.
///
/// With `prepared` batches (one list per connection), each connection sends its list as fast as
/// the server takes it instead of generating events on the way.
pub async fn run_load(
    options: &LoadOptions,
    target: &Target,
    progress: &Progress,
    prepared: Option<Vec<Vec<Batch>>>,
) -> Result<LoadOutcome> {
    if target.api_keys.is_empty() {
        bail!("no API key to send with");
    }
    let connections = options.connections.max(1);
    let senders = connect_all(options, target, connections).await?;
    // The run's clock starts now that every connection is open.
    let stats = Arc::new(Stats::new());
    let recorder = Recorder::new(stats.clone(), target.api_keys.len());
    let schedule = Arc::new(Schedule::new(options, connections, stats.started()));
    let total = match &prepared {
        Some(lists) => Some(lists.iter().flatten().map(|batch| batch.events.len() as u64).sum()),
        None => options.total_events(),
    };
    let ticker = progress.watch(stats.clone(), total);
    let mut prepared = prepared.map(Vec::into_iter);
    let mut tasks = JoinSet::new();
    for (index, sender) in senders.into_iter().enumerate() {
        let source = match prepared.as_mut() {
            Some(lists) => Source::Prepared(lists.next().unwrap_or_default().into_iter()),
            None => Source::Live(Generator::new(options.generator.clone(), index as u64)),
        };
        let context = Worker {
            index,
            tenant: index % target.api_keys.len(),
            schedule: schedule.clone(),
            recorder: recorder.clone(),
            source,
        };
        tasks.spawn(context.run(sender, options.max_in_flight.max(1)));
    }
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        if let Err(error) = joined.context("a connection task failed").and_then(|result| result) {
            failure.get_or_insert(error);
        }
    }
    ticker.abort();
    if let Some(error) = failure {
        return Err(error);
    }
    Ok(LoadOutcome { stats, ledgers: recorder.ledgers(), window: schedule.window() })
}

/// The open transport of one connection.
enum Sender {
    Binary(Client),
    Http { connection: HttpConnection, api_key: String, single: bool },
}

async fn connect_all(options: &LoadOptions, target: &Target, connections: usize) -> Result<Vec<Sender>> {
    let mut senders = Vec::with_capacity(connections);
    for index in 0..connections {
        let api_key = target.api_keys[index % target.api_keys.len()].clone();
        let sender = match options.mode {
            Mode::Binary => {
                let mut config = ClientConfig::new(target.wire_addr.clone(), api_key);
                config.client_name = format!("tally-load/{index}");
                config.max_batch_events = options.effective_batch_size() as u32;
                let client = Client::connect(config).await.with_context(|| {
                    format!("failed to connect to the binary protocol at {}", target.wire_addr)
                })?;
                Sender::Binary(client)
            }
            Mode::HttpBatch | Mode::HttpSingle => {
                let connection = HttpConnection::connect(&target.http_addr)
                    .await
                    .with_context(|| format!("failed to connect to HTTP at {}", target.http_addr))?;
                Sender::Http { connection, api_key, single: options.mode == Mode::HttpSingle }
            }
        };
        senders.push(sender);
    }
    Ok(senders)
}

/// Which batch goes when: fixed intended times at a target rate, or claims on a shared budget.
#[derive(Debug)]
struct Schedule {
    start: Instant,
    rate: Option<f64>,
    batch_size: u64,
    connections: u64,
    total_events: Option<u64>,
    deadline: Option<Instant>,
    claimed: AtomicU64,
}

/// One batch to send: when it was meant to go (`None`: now), and how many events.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Slot {
    intended: Option<Instant>,
    events: u64,
}

impl Schedule {
    fn new(options: &LoadOptions, connections: usize, start: Instant) -> Schedule {
        Schedule {
            start,
            rate: options.rate.filter(|rate| *rate > 0.0),
            batch_size: options.effective_batch_size() as u64,
            connections: connections as u64,
            total_events: options.total_events(),
            deadline: options.duration.map(|duration| start + duration),
            claimed: AtomicU64::new(0),
        }
    }

    /// The `round`-th batch of connection `worker`, or `None` when the schedule is done.
    fn next(&self, worker: usize, round: u64) -> Option<Slot> {
        match self.rate {
            Some(rate) => {
                let global = round * self.connections + worker as u64;
                let first_event = global * self.batch_size;
                let total = self.total_events?;
                if first_event >= total {
                    return None;
                }
                let offset = Duration::from_secs_f64(first_event as f64 / rate);
                Some(Slot {
                    intended: Some(self.start + offset),
                    events: self.batch_size.min(total - first_event),
                })
            }
            None => {
                if self.deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                    return None;
                }
                let first_event = self.claimed.fetch_add(self.batch_size, Ordering::Relaxed);
                let remaining =
                    self.total_events.map_or(self.batch_size, |total| total.saturating_sub(first_event));
                (remaining > 0).then_some(Slot { intended: None, events: self.batch_size.min(remaining) })
            }
        }
    }

    /// The span of the schedule at the target rate.
    fn window(&self) -> Duration {
        match (self.rate, self.total_events) {
            (Some(rate), Some(total)) => Duration::from_secs_f64(total as f64 / rate),
            _ => Duration::ZERO,
        }
    }
}

/// Where a connection's events come from.
enum Source {
    Live(Generator),
    Prepared(std::vec::IntoIter<Batch>),
}

/// One connection's task.
struct Worker {
    index: usize,
    tenant: usize,
    schedule: Arc<Schedule>,
    recorder: Recorder,
    source: Source,
}

impl Worker {
    fn next_slot(&self, round: u64) -> Option<Slot> {
        match &self.source {
            Source::Live(_) => self.schedule.next(self.index, round),
            Source::Prepared(batches) => (batches.len() > 0).then_some(Slot { intended: None, events: 0 }),
        }
    }

    /// The slot's events, generated now (so timestamps are fresh) or taken from the list.
    fn batch(&mut self, slot: Slot) -> Batch {
        match &mut self.source {
            Source::Live(generator) => generator.batch(slot.events as usize, now_us()),
            Source::Prepared(batches) => batches.next().unwrap_or_default(),
        }
    }

    async fn run(self, sender: Sender, max_in_flight: usize) -> Result<()> {
        match sender {
            Sender::Binary(client) => self.run_binary(client, max_in_flight).await,
            Sender::Http { connection, api_key, single } => self.run_http(connection, api_key, single).await,
        }
    }

    /// Pipelined: submits within `max_in_flight` unanswered batches; a task per batch waits
    /// for its answer.
    async fn run_binary(mut self, client: Client, max_in_flight: usize) -> Result<()> {
        let permits = Arc::new(Semaphore::new(max_in_flight));
        let mut answers = JoinSet::new();
        let mut round = 0;
        while let Some(slot) = self.next_slot(round) {
            round += 1;
            if let Some(intended) = slot.intended {
                tokio::time::sleep_until(intended).await;
            }
            let ready = Instant::now();
            let permit = permits.clone().acquire_owned().await.context("permits closed")?;
            let batch = self.batch(slot);
            let events = batch.events.len() as u64;
            let in_flight = InFlight::new(self.tenant, &batch, slot.intended.unwrap_or(ready));
            let submitted = client.submit(batch.events).await;
            self.recorder.stats.record_sent(events);
            let recorder = self.recorder.clone();
            match submitted {
                Ok(pending) => {
                    answers.spawn(async move {
                        let answer = binary_answer(pending.await);
                        recorder.record(in_flight, answer);
                        drop(permit);
                    });
                }
                Err(error) => recorder.record(in_flight, Answer::Failed(error.to_string())),
            }
            while answers.try_join_next().is_some() {}
        }
        let drained =
            tokio::time::timeout(DRAIN_TIMEOUT, async { while answers.join_next().await.is_some() {} });
        if drained.await.is_err() {
            tracing::warn!(connection = self.index, "answers still missing after the drain timeout");
        }
        client.close().await;
        Ok(())
    }

    /// One request at a time; busy answers are retried with the same body.
    async fn run_http(mut self, mut connection: HttpConnection, api_key: String, single: bool) -> Result<()> {
        let path = if single { "/api/v1/events" } else { "/api/v1/events/batch" };
        let mut body = Vec::with_capacity(64 * 1024);
        let mut round = 0;
        while let Some(slot) = self.next_slot(round) {
            round += 1;
            if let Some(intended) = slot.intended {
                tokio::time::sleep_until(intended).await;
            }
            let ready = Instant::now();
            let batch = self.batch(slot);
            if batch.events.is_empty() {
                continue;
            }
            body.clear();
            if single {
                json::write_event(&batch.events[0], &mut body);
            } else {
                json::write_batch(&batch.events, &mut body);
            }
            let in_flight = InFlight::new(self.tenant, &batch, slot.intended.unwrap_or(ready));
            self.recorder.stats.record_sent(batch.events.len() as u64);
            let answer =
                post_until_final(&mut connection, path, &api_key, &body, batch.events.len(), single).await;
            self.recorder.record(in_flight, answer);
        }
        Ok(())
    }
}

async fn post_until_final(
    connection: &mut HttpConnection,
    path: &str,
    api_key: &str,
    body: &[u8],
    events: usize,
    single: bool,
) -> Answer {
    let deadline = Instant::now() + HTTP_RETRY_DEADLINE;
    let mut transport_retries = 0;
    loop {
        let reading = match connection.request("POST", path, Some(api_key), body).await {
            Ok(response) if single => {
                json::read_single(response.status, response.retry_after_s, &response.body)
            }
            Ok(response) => json::read_batch(response.status, response.retry_after_s, &response.body, events),
            // The request may or may not have been processed: sending it again is safe, the
            // server deduplicates by event id and timestamp. Once, then it is an error.
            Err(error) if transport_retries == 0 => {
                transport_retries += 1;
                Reading::Retry { after_s: 0, reason: error.to_string() }
            }
            Err(error) => return Answer::Failed(format!("http: {error}")),
        };
        match reading {
            Reading::Final(answer) => return answer,
            Reading::Retry { after_s, reason } => {
                if Instant::now() >= deadline {
                    return Answer::Failed(format!("still refused after {HTTP_RETRY_DEADLINE:?}: {reason}"));
                }
                tokio::time::sleep(Duration::from_secs(after_s).min(HTTP_RETRY_PAUSE_MAX)).await;
            }
        }
    }
}

fn binary_answer(result: Result<client::BatchOutcome, ClientError>) -> Answer {
    match result {
        Ok(outcome) => Answer::Acked {
            stored: outcome.stored,
            duplicate: outcome.duplicate,
            rejected: outcome
                .rejected
                .into_iter()
                .map(|rejection| (rejection.index, rejection.message))
                .collect(),
        },
        Err(error) => Answer::Failed(error.to_string()),
    }
}

/// Microseconds since the Unix epoch, now.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_micros() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(rate: Option<f64>, duration_s: Option<u64>, events: Option<u64>) -> LoadOptions {
        LoadOptions {
            mode: Mode::Binary,
            connections: 3,
            batch_size: 100,
            rate,
            duration: duration_s.map(Duration::from_secs),
            events,
            max_in_flight: 4,
            generator: GeneratorConfig::default(),
        }
    }

    #[test]
    fn a_fixed_rate_spreads_batches_over_connections_in_time() {
        let start = Instant::now();
        let schedule = Schedule::new(&options(Some(1000.0), Some(1), None), 3, start);
        assert_eq!(schedule.window(), Duration::from_secs(1));
        let mut slots = Vec::new();
        for worker in 0..3 {
            let mut round = 0;
            while let Some(slot) = schedule.next(worker, round) {
                slots.push(slot);
                round += 1;
            }
        }
        assert_eq!(slots.iter().map(|slot| slot.events).sum::<u64>(), 1000);
        assert_eq!(slots.len(), 10);
        let mut offsets: Vec<Duration> =
            slots.iter().filter_map(|slot| slot.intended).map(|at| at - start).collect();
        offsets.sort();
        let expected: Vec<Duration> = (0..10).map(|index| Duration::from_millis(index * 100)).collect();
        assert_eq!(offsets, expected);
    }

    #[test]
    fn the_event_limit_bounds_both_kinds_of_schedule() {
        let throttled = Schedule::new(&options(Some(1000.0), Some(10), Some(250)), 3, Instant::now());
        assert_eq!(throttled.next(2, 0).map(|slot| slot.events), Some(50));
        assert_eq!(throttled.next(0, 1), None);
        let unthrottled = Schedule::new(&options(None, None, Some(250)), 3, Instant::now());
        let claimed: Vec<u64> =
            std::iter::from_fn(|| unthrottled.next(0, 0).map(|slot| slot.events)).collect();
        assert_eq!(claimed, [100, 100, 50]);
        assert_eq!(unthrottled.window(), Duration::ZERO);
    }

    #[test]
    fn single_mode_sends_one_event_per_request() {
        let single = LoadOptions { mode: Mode::HttpSingle, ..options(None, Some(1), None) };
        assert_eq!(single.effective_batch_size(), 1);
        assert_eq!(options(Some(100.0), Some(2), Some(1000)).total_events(), Some(200));
    }
}
