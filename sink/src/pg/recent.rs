//! Which dedup keys this process committed lately, as a hint for the next commits.
//!
//! A resend usually arrives soon after its original, through the same edge (a client that
//! missed an ack, an HTTP retry). Rows whose keys were committed lately are looked up in the
//! dedup index before the `COPY`, one probe each, so a batch holding a few resends is copied on
//! the fast path instead of failing whole. The hint is never the arbiter: a resend it misses
//! (older, or committed by another edge) makes the `COPY` fail on the unique index, and the
//! commit then probes every row; a key it remembers wrongly (a hash collision) only costs a
//! probe that finds nothing.
//!
//! A resend can also arrive while its original is still being committed by another worker of
//! this process (a client resending at once). Its `COPY` would wait for that transaction and
//! then fail. So commits register their keys while in flight, and a commit holding a key that an
//! earlier commit in flight holds waits for that commit to end first (only for earlier ones, so
//! two commits never wait for each other), after which the key is in the hint if it was stored.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use std::time::{Duration, Instant};
use tokio::sync::watch;

use uuid::Uuid;

/// Keys per generation; two generations are kept, so at most twice this many (8 bytes each,
/// about 40 MB at most with the table's overhead).
const GENERATION_KEYS_MAX: usize = 1_000_000;
/// A generation is retired after this long even if not full.
const GENERATION_AGE_MAX: Duration = Duration::from_secs(120);

#[derive(Debug)]
pub(crate) struct RecentKeys {
    hasher: foldhash::quality::RandomState,
    generations: Mutex<Generations>,
    tickets: AtomicU64,
}

#[derive(Debug)]
struct Generations {
    current: HashSet<u64, Hashed>,
    previous: HashSet<u64, Hashed>,
    started: Instant,
    /// Keys of commits in flight: the earliest commit holding each, and its end signal.
    in_flight: HashMap<u64, (u64, watch::Receiver<bool>), Hashed>,
}

/// The tables' keys are hashes already (by the random-keyed [`RecentKeys::hash`]): used as
/// they are, not hashed again.
type Hashed = BuildHasherDefault<AsIs>;

#[derive(Debug, Default)]
struct AsIs(u64);

impl Hasher for AsIs {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; any other input still hashes deterministically.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

/// A commit in flight: its keys stay registered until it is dropped.
#[derive(Debug)]
pub(crate) struct Flight<'a> {
    recent: &'a RecentKeys,
    ticket: u64,
    hashes: Vec<u64>,
    done: watch::Sender<bool>,
    /// Earlier commits in flight that hold some of this one's keys.
    pub(crate) earlier: Vec<watch::Receiver<bool>>,
}

impl Flight<'_> {
    /// The commit's key hashes, in its rows' order.
    pub(crate) fn hashes(&self) -> &[u64] {
        &self.hashes
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut generations = self.recent.lock();
        for hash in &self.hashes {
            if generations.in_flight.get(hash).is_some_and(|(ticket, _)| *ticket == self.ticket) {
                generations.in_flight.remove(hash);
            }
        }
        drop(generations);
        let _ = self.done.send(true);
    }
}

impl Default for RecentKeys {
    fn default() -> Self {
        RecentKeys {
            hasher: Default::default(),
            generations: Mutex::new(Generations {
                current: HashSet::default(),
                previous: HashSet::default(),
                started: Instant::now(),
                in_flight: HashMap::default(),
            }),
            tickets: AtomicU64::new(0),
        }
    }
}

impl RecentKeys {
    pub(crate) fn hash(&self, key: &(Uuid, [u8; 16], i64)) -> u64 {
        self.hasher.hash_one(key)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        self.generations.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a commit's keys as in flight until the returned value is dropped, and names the
    /// earlier commits in flight that hold some of them (wait for those before looking keys up).
    pub(crate) fn begin(&self, hashes: Vec<u64>) -> Flight<'_> {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        let (done, receiver) = watch::channel(false);
        let mut earlier: HashMap<u64, watch::Receiver<bool>> = HashMap::new();
        let mut generations = self.lock();
        for hash in &hashes {
            match generations.in_flight.get(hash) {
                Some((other, signal)) => {
                    earlier.entry(*other).or_insert_with(|| signal.clone());
                }
                None => {
                    generations.in_flight.insert(*hash, (ticket, receiver.clone()));
                }
            }
        }
        drop(generations);
        Flight { recent: self, ticket, hashes, done, earlier: earlier.into_values().collect() }
    }

    /// Which of `hashes` were committed lately (by position).
    pub(crate) fn seen(&self, hashes: &[u64]) -> Vec<usize> {
        let generations = self.lock();
        hashes
            .iter()
            .enumerate()
            .filter(|(_, hash)| generations.current.contains(hash) || generations.previous.contains(hash))
            .map(|(position, _)| position)
            .collect()
    }

    /// Remembers committed keys.
    pub(crate) fn remember(&self, hashes: impl IntoIterator<Item = u64>) {
        let mut generations = self.lock();
        for hash in hashes {
            if generations.current.len() >= GENERATION_KEYS_MAX
                || generations.started.elapsed() >= GENERATION_AGE_MAX
            {
                let full = std::mem::take(&mut generations.current);
                generations.previous = full;
                generations.started = Instant::now();
            }
            generations.current.insert(hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_commit_waits_only_for_earlier_commits_holding_its_keys() {
        let recent = RecentKeys::default();
        let first = recent.begin(vec![1, 2, 3]);
        assert!(first.earlier.is_empty());
        let second = recent.begin(vec![3, 4]);
        assert_eq!(second.earlier.len(), 1, "key 3 is in flight in the first");
        let third = recent.begin(vec![4, 5]);
        assert!(third.earlier.len() == 1, "key 4 is held by the second");
        let mut waiting = second.earlier[0].clone();
        recent.remember([1, 2, 3]);
        drop(first);
        waiting.wait_for(|done| *done).await.expect("the first signals its end");
        assert_eq!(recent.seen(&[3, 4]), [0], "the first's keys are in the hint");
        drop((second, third));
        assert!(recent.begin(vec![3, 4, 5]).earlier.is_empty(), "nothing in flight any more");
    }

    #[test]
    fn remembers_keys_across_one_rotation() {
        let recent = RecentKeys::default();
        let key = |n: u64| recent.hash(&(Uuid::from_u64_pair(0, n), [0; 16], n as i64));
        recent.remember((0..10).map(key));
        assert_eq!(recent.seen(&[key(3), key(11), key(9)]), [0, 2]);
        recent.remember((100..100 + GENERATION_KEYS_MAX as u64).map(key));
        assert_eq!(recent.seen(&[key(3)]), [0], "the previous generation is still consulted");
        recent.remember((1 << 40..(1 << 40) + GENERATION_KEYS_MAX as u64 + 1).map(key));
        assert!(recent.seen(&[key(3)]).is_empty(), "two rotations later it is forgotten");
    }
}
