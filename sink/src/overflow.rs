//! Overflow to Redis: when PostgreSQL is slow or down and the queues fill, whole batches are
//! spilled to Redis Streams and drained back later, through the same dedup and rollup path.
//!
//! Layout: `streams` stream keys `tally:overflow:{N}` (the hash tag puts each stream and its byte
//! counter `tally:overflow:{N}:bytes` in one cluster slot), entries `b` = an rkyv [`SpilledBatch`].
//! Spilling is one Lua script (bound check, `XADD`, `INCRBY`), so the bound holds with several
//! edges; draining commits a batch, then deletes it with a script that decrements the counter
//! only if this drainer's `XDEL` removed the entry. A batch drained twice (two edges, or a crash
//! between commit and delete) is stored once: the commit deduplicates.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use rkyv::{Archive, Deserialize, Serialize};
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::queue::IngestQueue;
use crate::row::{EventRow, QUANTITY_KINDS};
use crate::store::Store;

/// Where and how much may overflow.
#[derive(Debug, Clone)]
pub struct OverflowConfig {
    /// One `redis://` URL, or several for a Redis Cluster.
    pub urls: Vec<String>,
    /// Redis Cluster (several URLs are seed nodes) rather than one server.
    pub cluster: bool,
    /// Stream keys batches are spread over (spreads load over cluster nodes).
    pub streams: usize,
    /// Bytes all streams together may hold; past it spilling is refused (retryable).
    pub bytes_max: u64,
    /// Age of the oldest entry past which spilling is refused until draining catches up.
    pub age_max: Duration,
    /// Whether a spilled batch counts as durable, so that `durable` acks may be sent after the
    /// spill. Only true when Redis persists every write (AOF); checked at start.
    pub durable: bool,
    /// Time limit of one Redis call.
    pub call_timeout: Duration,
}

impl Default for OverflowConfig {
    fn default() -> Self {
        OverflowConfig {
            urls: Vec::new(),
            cluster: false,
            streams: 4,
            bytes_max: 1 << 30,
            age_max: Duration::from_secs(3600),
            durable: false,
            call_timeout: Duration::from_secs(2),
        }
    }
}

/// An overflow failure. The batch was not spilled.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OverflowError {
    #[error("overflow is full ({0})")]
    Full(String),
    #[error("overflow unavailable: {0}")]
    Unavailable(String),
    #[error("overflow entry is unreadable: {0}")]
    Corrupt(String),
    #[error("overflow misconfigured: {0}")]
    Config(String),
}

impl From<redis::RedisError> for OverflowError {
    fn from(error: redis::RedisError) -> Self {
        OverflowError::Unavailable(error.to_string())
    }
}

/// A batch as spilled: every field of every row, decimals as their exact text.
///
/// Do not reorder fields; entries written by an older edge must stay readable.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SpilledBatch {
    pub rows: Vec<SpilledRow>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SpilledRow {
    pub tenant_id: [u8; 16],
    /// The event without its custom quantities (they are in `custom_quantities`).
    pub event: wire::Event,
    pub quantities: Vec<Option<String>>,
    pub custom_quantities: Vec<(String, String)>,
    pub latency_us: Option<i64>,
    pub cost: Option<String>,
    pub price_rule_ids: Vec<[u8; 16]>,
    pub flags: i16,
}

impl SpilledRow {
    fn of(row: &EventRow) -> SpilledRow {
        SpilledRow {
            tenant_id: *row.tenant_id.as_bytes(),
            event: row.event.clone(),
            quantities: row.quantities.iter().map(|q| q.map(|q| q.to_string())).collect(),
            custom_quantities: row
                .custom_quantities
                .iter()
                .map(|(n, v)| (n.clone(), v.to_string()))
                .collect(),
            latency_us: row.latency_us,
            cost: row.cost.map(|cost| cost.to_string()),
            price_rule_ids: row.price_rule_ids.iter().map(|id| *id.as_bytes()).collect(),
            flags: row.flags,
        }
    }

    fn into_row(self) -> Result<EventRow, OverflowError> {
        let decimal = |text: &str| text.parse::<Decimal>().map_err(|e| OverflowError::Corrupt(e.to_string()));
        let mut quantities = [None; QUANTITY_KINDS];
        for (slot, value) in quantities.iter_mut().zip(&self.quantities) {
            *slot = value.as_deref().map(decimal).transpose()?;
        }
        let custom_quantities = self
            .custom_quantities
            .iter()
            .map(|(name, value)| Ok((name.clone(), decimal(value)?)))
            .collect::<Result<Vec<_>, OverflowError>>()?;
        Ok(EventRow {
            tenant_id: Uuid::from_bytes(self.tenant_id),
            event: self.event,
            quantities,
            custom_quantities,
            latency_us: self.latency_us,
            cost: self.cost.as_deref().map(decimal).transpose()?,
            price_rule_ids: self.price_rule_ids.into_iter().map(Uuid::from_bytes).collect(),
            flags: self.flags,
        })
    }
}

/// Encodes rows as a spilled batch.
pub fn encode_batch(rows: &[EventRow]) -> Result<Vec<u8>, OverflowError> {
    let batch = SpilledBatch { rows: rows.iter().map(SpilledRow::of).collect() };
    rkyv::to_bytes::<rancor::Error>(&batch)
        .map(|bytes| bytes.to_vec())
        .map_err(|error| OverflowError::Corrupt(error.to_string()))
}

/// Decodes a spilled batch, validating every byte.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<EventRow>, OverflowError> {
    let archived = rkyv::access::<ArchivedSpilledBatch, rancor::Error>(bytes)
        .map_err(|error| OverflowError::Corrupt(error.to_string()))?;
    let batch: SpilledBatch = rkyv::deserialize::<SpilledBatch, rancor::Error>(archived)
        .map_err(|error| OverflowError::Corrupt(error.to_string()))?;
    batch.rows.into_iter().map(SpilledRow::into_row).collect()
}

#[derive(Clone)]
enum Connection {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Connection::Single(_) => "Connection::Single",
            Connection::Cluster(_) => "Connection::Cluster",
        })
    }
}

/// Longest one drain commit may take.
const DRAIN_COMMIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

const SPILL_SCRIPT: &str = r"
local bytes = tonumber(redis.call('GET', KEYS[2]) or '0')
if bytes + tonumber(ARGV[2]) > tonumber(ARGV[3]) then return false end
local id = redis.call('XADD', KEYS[1], '*', 'b', ARGV[1])
redis.call('INCRBY', KEYS[2], ARGV[2])
return id
";

const DELETE_SCRIPT: &str = r"
if redis.call('XDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('DECRBY', KEYS[2], ARGV[2])
  return 1
end
return 0
";

/// The overflow store.
#[derive(Debug)]
pub struct Overflow {
    connection: Connection,
    config: OverflowConfig,
    next_stream: AtomicUsize,
    /// Age of the oldest entry seen by the last drain pass, in ms (0: empty).
    oldest_age_ms: AtomicU64,
    spill: redis::Script,
    delete: redis::Script,
}

impl Overflow {
    /// Connects, and refuses a `durable` overflow on a Redis that does not persist with AOF.
    pub async fn connect(config: OverflowConfig) -> Result<Overflow, OverflowError> {
        if config.urls.is_empty() || config.streams == 0 {
            return Err(OverflowError::Config("give at least one Redis URL and one stream".into()));
        }
        let connection = if config.cluster {
            let client = redis::cluster::ClusterClient::new(config.urls.clone())?;
            Connection::Cluster(client.get_async_connection().await?)
        } else {
            let client = redis::Client::open(config.urls[0].as_str())?;
            Connection::Single(client.get_connection_manager().await?)
        };
        let overflow = Overflow {
            connection,
            next_stream: AtomicUsize::new(0),
            oldest_age_ms: AtomicU64::new(0),
            spill: redis::Script::new(SPILL_SCRIPT),
            delete: redis::Script::new(DELETE_SCRIPT),
            config,
        };
        if overflow.config.durable {
            overflow.check_persistence().await?;
        }
        Ok(overflow)
    }

    async fn check_persistence(&self) -> Result<(), OverflowError> {
        let mut command = redis::cmd("CONFIG");
        command.arg("GET").arg("appendonly");
        let reply: Result<Vec<String>, _> =
            self.call(|mut c| async move { command.query_async(&mut c).await }).await;
        match reply {
            Ok(values) if values.get(1).map(String::as_str) == Some("yes") => Ok(()),
            Ok(_) => Err(OverflowError::Config(
                "overflow is configured as durable but Redis has appendonly off: enable AOF or set durable off".into(),
            )),
            Err(error) => {
                tracing::warn!(%error, "cannot read Redis persistence settings; trusting the durable overflow setting");
                Ok(())
            }
        }
    }

    pub fn is_durable(&self) -> bool {
        self.config.durable
    }

    fn stream(&self, index: usize) -> (String, String) {
        (format!("tally:overflow:{{{index}}}"), format!("tally:overflow:{{{index}}}:bytes"))
    }

    async fn call<T, F, Fut>(&self, f: F) -> Result<T, OverflowError>
    where
        F: FnOnce(ConnectionHandle) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let handle = ConnectionHandle(self.connection.clone());
        match tokio::time::timeout(self.config.call_timeout, f(handle)).await {
            Ok(result) => result.map_err(OverflowError::from),
            Err(_) => {
                Err(OverflowError::Unavailable(format!("no answer within {:?}", self.config.call_timeout)))
            }
        }
    }

    /// Spills rows as one batch. Refused when the overflow is over its byte or age bound.
    pub async fn spill(&self, rows: &[EventRow]) -> Result<(), OverflowError> {
        let oldest_ms = self.oldest_age_ms.load(Ordering::Relaxed);
        if oldest_ms > self.config.age_max.as_millis() as u64 {
            return Err(OverflowError::Full(format!("oldest entry is {} s old", oldest_ms / 1000)));
        }
        let bytes = encode_batch(rows)?;
        let len = bytes.len();
        let per_stream_max = self.config.bytes_max / self.config.streams as u64;
        let first = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let mut last_error = OverflowError::Full("no stream".into());
        // A stream that is full or unreachable (its cluster node down) is skipped for the next.
        for offset in 0..self.config.streams {
            let (key, counter) = self.stream((first + offset) % self.config.streams);
            let script = &self.spill;
            let payload = bytes.clone();
            let result: Result<Option<String>, OverflowError> = self
                .call(|mut c| async move {
                    script
                        .key(&key)
                        .key(&counter)
                        .arg(payload)
                        .arg(len)
                        .arg(per_stream_max)
                        .invoke_async(&mut c)
                        .await
                })
                .await;
            match result {
                Ok(Some(_)) => {
                    metrics::counter!("tally_overflow_spilled_events_total").increment(rows.len() as u64);
                    metrics::counter!("tally_overflow_spilled_bytes_total").increment(len as u64);
                    return Ok(());
                }
                Ok(None) => {
                    last_error = OverflowError::Full(format!(
                        "a stream holds its share of {} bytes",
                        self.config.bytes_max
                    ))
                }
                Err(error) => last_error = error,
            }
        }
        Err(last_error)
    }

    /// The oldest entry of each stream: (stream, id, payload).
    async fn heads(&self) -> Result<Vec<(usize, String, Vec<u8>)>, OverflowError> {
        let mut heads = Vec::new();
        for stream in 0..self.config.streams {
            let (key, _) = self.stream(stream);
            let reply: redis::Value = self
                .call(|mut c| async move {
                    redis::cmd("XRANGE")
                        .arg(&key)
                        .arg("-")
                        .arg("+")
                        .arg("COUNT")
                        .arg(1)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            if let Some((id, payload)) = first_entry(reply) {
                heads.push((stream, id, payload));
            }
        }
        // Oldest first: stream ids start with their millisecond time.
        heads.sort_by_key(|(_, id, _)| entry_millis(id));
        Ok(heads)
    }

    /// Commits the oldest entry into storage and deletes it. Returns the events drained (0 when
    /// the overflow is empty).
    pub async fn drain_one(&self, store: &Store) -> Result<usize, OverflowError> {
        let heads = self.heads().await?;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let oldest_age = heads.first().map_or(0, |(_, id, _)| now_ms.saturating_sub(entry_millis(id)));
        self.oldest_age_ms.store(oldest_age, Ordering::Relaxed);
        metrics::gauge!("tally_overflow_oldest_age_seconds").set(oldest_age as f64 / 1000.0);
        let Some((stream, id, payload)) = heads.into_iter().next() else {
            return Ok(0);
        };
        let rows = match decode_batch(&payload) {
            Ok(rows) => rows,
            Err(error) => {
                // Never drop data silently: park the entry and say so loudly.
                tracing::error!(%id, %error, "unreadable overflow entry left in place");
                return Err(error);
            }
        };
        // Isolating, so that an entry holding a row the database refuses is stored but for that
        // row (counted lost: it was acked) instead of blocking the overflow for good.
        let outcomes = crate::worker::commit_isolating(store, &rows, DRAIN_COMMIT_TIMEOUT)
            .await
            .map_err(|error| OverflowError::Unavailable(format!("drain commit: {error}")))?;
        let refused = outcomes.iter().filter(|outcome| **outcome == crate::Outcome::Rejected).count();
        if refused > 0 {
            tracing::error!(%id, refused, "overflow rows refused by storage: counted lost");
            metrics::counter!("tally_events_lost_total").increment(refused as u64);
        }
        let (key, counter) = self.stream(stream);
        let script = &self.delete;
        let len = payload.len();
        let _: i64 = self
            .call(|mut c| async move {
                script.key(&key).key(&counter).arg(&id).arg(len).invoke_async(&mut c).await
            })
            .await?;
        metrics::counter!("tally_overflow_drained_events_total").increment(rows.len() as u64);
        Ok(rows.len())
    }

    /// Entries and bytes held, over all streams.
    pub async fn depth(&self) -> Result<(u64, u64), OverflowError> {
        let (mut entries, mut bytes) = (0u64, 0u64);
        for stream in 0..self.config.streams {
            let (key, counter) = self.stream(stream);
            let len: u64 = self
                .call(|mut c| async move { redis::cmd("XLEN").arg(&key).query_async(&mut c).await })
                .await?;
            let held: Option<u64> = self
                .call(|mut c| async move { redis::cmd("GET").arg(&counter).query_async(&mut c).await })
                .await?;
            entries += len;
            bytes += held.unwrap_or(0);
        }
        metrics::gauge!("tally_overflow_entries").set(entries as f64);
        metrics::gauge!("tally_overflow_bytes").set(bytes as f64);
        Ok((entries, bytes))
    }
}

/// A cloned connection handle that implements the async `ConnectionLike`.
#[derive(Clone)]
struct ConnectionHandle(Connection);

impl redis::aio::ConnectionLike for ConnectionHandle {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match &mut self.0 {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match &mut self.0 {
            Connection::Single(c) => c.req_packed_commands(cmd, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

fn entry_millis(id: &str) -> u64 {
    id.split('-').next().and_then(|ms| ms.parse().ok()).unwrap_or(0)
}

/// The id and `b` field of the first entry of an `XRANGE` reply.
fn first_entry(reply: redis::Value) -> Option<(String, Vec<u8>)> {
    let redis::Value::Array(entries) = reply else { return None };
    let redis::Value::Array(entry) = entries.into_iter().next()? else { return None };
    let mut entry = entry.into_iter();
    let id = match entry.next()? {
        redis::Value::BulkString(id) => String::from_utf8(id).ok()?,
        redis::Value::SimpleString(id) => id,
        _ => return None,
    };
    let redis::Value::Array(fields) = entry.next()? else { return None };
    let mut fields = fields.into_iter();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        if let (redis::Value::BulkString(name), redis::Value::BulkString(value)) = (name, value)
            && name == b"b"
        {
            return Some((id, value));
        }
    }
    None
}

/// Drains the overflow into storage until aborted: oldest entry first, one batch at a time,
/// pausing while the live queue is more than half full so draining never starves live traffic.
pub async fn run_drainer(overflow: Arc<Overflow>, store: Arc<Store>, queue: Arc<IngestQueue>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if queue.events_queued() * 2 > queue.events_max() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        match overflow.drain_one(store.as_ref()).await {
            Ok(0) => {
                let _ = overflow.depth().await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Ok(_) => backoff = Duration::from_millis(100),
            Err(error) => {
                tracing::debug!(%error, "overflow drain paused");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spilled_batches_round_trip_exactly() {
        let event = wire::Event::new("u", "custom", "p", "e")
            .with_quantity(wire::QuantityKind::Pages, 0.1)
            .with_custom_quantity("gpu_hours", 0.25)
            .with_tag("t");
        let mut row = EventRow::new(Uuid::from_u128(9), event, Some("0.000375".parse().expect("decimal")));
        row.price_rule_ids.push(Uuid::from_u128(3));
        row.flags = 1;
        let bytes = encode_batch(std::slice::from_ref(&row)).expect("encodes");
        assert_eq!(decode_batch(&bytes).expect("decodes"), vec![row]);
        assert!(decode_batch(&bytes[1..]).is_err(), "garbage is refused, never misread");
    }

    #[test]
    fn entry_ids_sort_by_time() {
        assert_eq!(entry_millis("1700000000123-4"), 1_700_000_000_123);
        assert_eq!(entry_millis("junk"), 0);
    }
}
