//! The in-process store: sharded `Mutex<HashMap<key, tat>>` with a hard cap on tracked keys.
//!
//! Why sharded mutexes rather than one lock-free map: a check covers several keys (key, account,
//! …) and must be all-or-nothing. All keys of a check share its `scope`, and the shard is chosen
//! by hashing the scope, so one short lock makes the whole check atomic while unrelated scopes
//! proceed in parallel on other shards.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::gcra::{Evaluation, Spec, evaluate};

/// Upper bound on shards: enough to spread contention over many cores, few enough that a small
/// `max_keys` still gives each shard a useful share.
const MAX_SHARDS: usize = 32;

/// In-process GCRA state with bounded memory.
#[derive(Debug)]
pub(crate) struct LocalStore {
    shards: Box<[Mutex<HashMap<String, u64>>]>,
    /// Each shard's share of `max_keys`; `shards × per_shard ≤ max_keys`.
    per_shard: usize,
    hasher: RandomState,
}

impl LocalStore {
    /// A store that never tracks more than `max_keys` keys (at least 1).
    pub(crate) fn new(max_keys: usize) -> LocalStore {
        let max_keys = max_keys.max(1);
        let shard_count = max_keys.min(MAX_SHARDS);
        let per_shard = max_keys / shard_count;
        let shards = (0..shard_count)
            .map(|_| Mutex::new(HashMap::new()))
            .collect::<Vec<_>>()
            .into_boxed_slice();
        LocalStore {
            shards,
            per_shard,
            hasher: RandomState::new(),
        }
    }

    /// The shard that owns every key of `scope`.
    fn shard(&self, scope: &str) -> MutexGuard<'_, HashMap<String, u64>> {
        let hash = self.hasher.hash_one(scope);
        let len = u64::try_from(self.shards.len()).unwrap_or(1);
        let index = usize::try_from(hash % len).unwrap_or(0);
        // The map holds plain numbers, so a panic elsewhere cannot leave it inconsistent.
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Decides a whole check under one shard lock and, if allowed and not a dry run, stores the
    /// new TATs.
    pub(crate) fn check(
        &self,
        scope: &str,
        specs: &[Spec],
        now_us: u64,
        cost: u32,
        dry_run: bool,
    ) -> Evaluation {
        let mut map = self.shard(scope);
        let evaluation = evaluate(specs, |key| map.get(key).copied(), now_us, cost);
        if evaluation.allowed && !dry_run {
            for &(index, tat) in &evaluation.writes {
                self.store(&mut map, &specs[index].key, tat, now_us);
            }
        }
        evaluation
    }

    /// Stores one TAT, making room first if the shard is at its share of `max_keys`.
    fn store(&self, map: &mut HashMap<String, u64>, key: &str, tat: u64, now_us: u64) {
        if let Some(slot) = map.get_mut(key) {
            *slot = tat;
            return;
        }
        if map.len() >= self.per_shard {
            self.make_room(map, now_us);
        }
        map.insert(key.to_owned(), tat);
    }

    /// Frees at least one slot: first every stale entry (`tat ≤ now`, which is exactly
    /// equivalent to no entry), then, if the shard is still full, the entries closest to expiry
    /// (smallest TAT). Forgetting a live entry can only make a later check see more room than it
    /// should (over-admit), never less; and the entries chosen are the ones with the least
    /// history left to forget. An eighth of the shard goes at once so the scan is amortised.
    fn make_room(&self, map: &mut HashMap<String, u64>, now_us: u64) {
        map.retain(|_, tat| *tat > now_us);
        if map.len() < self.per_shard {
            return;
        }
        let must_free = map.len() + 1 - self.per_shard;
        let count = must_free.max(self.per_shard / 8).clamp(1, map.len());
        let mut tats: Vec<u64> = map.values().copied().collect();
        let (_, threshold, _) = tats.select_nth_unstable(count - 1);
        let threshold = *threshold;
        let below = tats.iter().filter(|&&tat| tat < threshold).count();
        let mut equal_budget = count - below;
        map.retain(|_, tat| {
            if *tat < threshold {
                false
            } else if *tat == threshold && equal_budget > 0 {
                equal_budget -= 1;
                false
            } else {
                true
            }
        });
    }

    /// Drops every stale entry and gives memory back; returns how many entries went.
    pub(crate) fn sweep(&self, now_us: u64) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut map = shard.lock().unwrap_or_else(PoisonError::into_inner);
            let before = map.len();
            map.retain(|_, tat| *tat > now_us);
            removed += before - map.len();
            if map.capacity() > map.len().saturating_mul(2).max(16) {
                map.shrink_to_fit();
            }
        }
        removed
    }

    /// Keys currently tracked across all shards.
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// Allocated map slots across all shards (tests: the sweeper gives memory back).
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                shard
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .capacity()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(key: &str) -> Spec {
        Spec {
            key: key.to_owned(),
            t_us: 1_000,
            burst: 10,
        }
    }

    #[test]
    fn never_tracks_more_than_max_keys() {
        for max_keys in [1, 5, 31, 32, 33, 100, 1_000] {
            let store = LocalStore::new(max_keys);
            for i in 0..(max_keys * 3 + 50) {
                let scope = format!("s{i}");
                store.check(&scope, &[spec(&format!("rl:{{{scope}}}:k"))], 1, 1, false);
                assert!(
                    store.len() <= max_keys,
                    "max_keys {max_keys}: {}",
                    store.len()
                );
            }
        }
    }

    #[test]
    fn eviction_prefers_stale_then_smallest_tat() {
        let store = LocalStore::new(1);
        assert_eq!(store.per_shard, 1);
        store.check("a", &[spec("rl:{a}:k")], 10, 1, false);
        store.check("b", &[spec("rl:{b}:k")], 20, 1, false);
        assert_eq!(store.len(), 1);
        {
            let map = store.shard("b");
            assert!(map.contains_key("rl:{b}:k"), "the newest entry is kept");
        }

        let store = LocalStore::new(3);
        assert_eq!(store.per_shard, 1);
        let store = LocalStore {
            per_shard: 3,
            ..store
        };
        let mut map = HashMap::new();
        map.insert("stale".to_owned(), 5);
        map.insert("old".to_owned(), 50);
        map.insert("young".to_owned(), 500);
        store.make_room(&mut map, 10);
        assert!(!map.contains_key("stale"));
        assert_eq!(map.len(), 2, "dropping the stale entry was enough");
        map.insert("third".to_owned(), 700);
        store.make_room(&mut map, 10);
        assert!(!map.contains_key("old"), "the smallest tat goes first");
        assert!(map.contains_key("young") && map.contains_key("third"));
    }

    #[test]
    fn dry_run_and_denied_checks_store_nothing() {
        let store = LocalStore::new(100);
        let e = store.check("a", &[spec("rl:{a}:k")], 1_000, 1, true);
        assert!(e.allowed);
        assert_eq!(store.len(), 0);
        let e = store.check("a", &[spec("rl:{a}:k")], 1_000, 11, false);
        assert!(!e.allowed);
        assert_eq!(store.len(), 0);
    }

    #[test]
    fn sweep_drops_stale_entries_and_shrinks() {
        let store = LocalStore::new(10_000);
        for i in 0..5_000 {
            let scope = format!("s{i}");
            store.check(&scope, &[spec(&format!("rl:{{{scope}}}:k"))], 0, 1, false);
        }
        assert_eq!(store.len(), 5_000);
        assert_eq!(store.sweep(999), 0, "tat 1000 is still live at 999");
        assert_eq!(store.sweep(1_000), 5_000, "tat ≤ now is stale");
        assert_eq!(store.len(), 0);
        assert!(store.capacity() <= 32 * 16, "capacity {}", store.capacity());
    }
}
