//! Which dedup keys this process committed lately, as a hint for the next commits.
//!
//! A resend usually arrives soon after its original, through the same edge (a client that
//! missed an ack, an HTTP retry). Rows whose keys were committed lately are looked up in the
//! dedup index before the `COPY`, one probe each, so a batch holding a few resends is copied on
//! the fast path instead of failing whole. The hint is never the arbiter: a resend it misses
//! (older, or committed by another edge) makes the `COPY` fail on the unique index, and the
//! commit then probes every row; a key it remembers wrongly (a hash collision) only costs a
//! probe that finds nothing.

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uuid::Uuid;

/// Keys per generation; two generations are kept, so at most twice this many (8 bytes each,
/// about 40 MB at most with the table's overhead).
const GENERATION_KEYS_MAX: usize = 1_000_000;
/// A generation is retired after this long even if not full.
const GENERATION_AGE_MAX: Duration = Duration::from_secs(120);

#[derive(Debug)]
pub(crate) struct RecentKeys {
    hasher: RandomState,
    generations: Mutex<Generations>,
}

#[derive(Debug)]
struct Generations {
    current: HashSet<u64>,
    previous: HashSet<u64>,
    started: Instant,
}

impl Default for RecentKeys {
    fn default() -> Self {
        RecentKeys {
            hasher: RandomState::new(),
            generations: Mutex::new(Generations {
                current: HashSet::new(),
                previous: HashSet::new(),
                started: Instant::now(),
            }),
        }
    }
}

impl RecentKeys {
    pub(crate) fn hash(&self, key: &(Uuid, [u8; 16], i64)) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Which of `hashes` were committed lately (by position).
    pub(crate) fn seen(&self, hashes: &[u64]) -> Vec<usize> {
        let generations = self.generations.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        hashes
            .iter()
            .enumerate()
            .filter(|(_, hash)| generations.current.contains(hash) || generations.previous.contains(hash))
            .map(|(position, _)| position)
            .collect()
    }

    /// Remembers committed keys.
    pub(crate) fn remember(&self, hashes: impl IntoIterator<Item = u64>) {
        let mut generations = self.generations.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
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
