//! The one GCRA arithmetic (spec §2.2). The local store calls it directly and the Lua script in
//! `redis_store` mirrors it line for line, so a decision and its header numbers are the same
//! whichever store answered.

/// What GCRA decided for one policy at one instant, in integer microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Decision {
    /// Whether `cost` fits into this policy's burst at `now`.
    pub(crate) allowed: bool,
    /// The theoretical arrival time to store if the whole check is allowed (on deny: the
    /// unchanged `tat`, which is never stored).
    pub(crate) new_tat: u64,
    /// Whole requests of cost 1 that would still fit after this decision.
    pub(crate) remaining: u64,
    /// Time until the policy is back to a full burst; also the storage TTL on allow.
    pub(crate) reset_after_us: u64,
    /// On deny: the earliest wait after which the same cost fits. `None` on allow.
    pub(crate) retry_after_us: Option<u64>,
}

/// Emission interval `T = window / limit`, rounded **up** to whole microseconds (at least 1 µs),
/// so rounding can only make the limiter slightly stricter than configured, never laxer.
pub(crate) fn emission_interval_us(window_us: u64, limit: u32) -> u64 {
    let limit = u64::from(limit.max(1));
    window_us.div_ceil(limit).max(1)
}

/// GCRA for one policy: `tat = max(stored or now, now)`, `new_tat = tat + cost·T`, allow iff
/// `new_tat − now ≤ burst·T`. A deny reports the state as it is (nothing changes), so rejected
/// requests never push the horizon back.
pub(crate) fn gcra(
    stored_tat: Option<u64>,
    now_us: u64,
    t_us: u64,
    burst: u32,
    cost: u32,
) -> Decision {
    let t_us = t_us.max(1);
    let tat = stored_tat.map_or(now_us, |stored| stored.max(now_us));
    let new_tat = tat.saturating_add(u64::from(cost).saturating_mul(t_us));
    let cap = u64::from(burst).saturating_mul(t_us);
    let needed = new_tat - now_us;
    if needed > cap {
        Decision {
            allowed: false,
            new_tat: tat,
            remaining: cap.saturating_sub(tat - now_us) / t_us,
            reset_after_us: tat - now_us,
            retry_after_us: Some(needed - cap),
        }
    } else {
        Decision {
            allowed: true,
            new_tat,
            remaining: (cap - needed) / t_us,
            reset_after_us: needed,
            retry_after_us: None,
        }
    }
}

/// The state of a policy that would have allowed but whose check was denied by another policy:
/// nothing was stored, so report the stored state unchanged (cost 0).
pub(crate) fn unchanged(stored_tat: Option<u64>, now_us: u64, t_us: u64, burst: u32) -> Decision {
    let t_us = t_us.max(1);
    let tat = stored_tat.map_or(now_us, |stored| stored.max(now_us));
    let cap = u64::from(burst).saturating_mul(t_us);
    Decision {
        allowed: true,
        new_tat: tat,
        remaining: cap.saturating_sub(tat - now_us) / t_us,
        reset_after_us: tat - now_us,
        retry_after_us: None,
    }
}

/// One item of a check after validation: its storage key and GCRA parameters.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    /// Storage key without the deployment prefix: `rl:{scope}:subject`.
    pub(crate) key: String,
    pub(crate) t_us: u64,
    pub(crate) burst: u32,
}

/// The result of evaluating every item of one check against one snapshot of stored TATs.
#[derive(Debug)]
pub(crate) struct Evaluation {
    pub(crate) allowed: bool,
    pub(crate) decisions: Vec<Decision>,
    /// Keys and TATs to store; empty unless the check is allowed and `cost > 0`.
    pub(crate) writes: Vec<(usize, u64)>,
}

/// All-or-nothing over several items. Items sharing a key see each other's pending TAT, so a
/// check naming one key twice behaves like two sequential checks. Mirrored by the Lua script.
pub(crate) fn evaluate(
    specs: &[Spec],
    stored: impl Fn(&str) -> Option<u64>,
    now_us: u64,
    cost: u32,
) -> Evaluation {
    // (index of the first spec with this key, pending tat)
    let mut pending: Vec<(usize, u64)> = Vec::with_capacity(specs.len());
    let mut decisions = Vec::with_capacity(specs.len());
    for spec in specs {
        let slot = pending
            .iter()
            .position(|&(first, _)| specs[first].key == spec.key);
        let current = match slot {
            Some(p) => Some(pending[p].1),
            None => stored(&spec.key),
        };
        let decision = gcra(current, now_us, spec.t_us, spec.burst, cost);
        if decision.allowed {
            match slot {
                Some(p) => pending[p].1 = decision.new_tat,
                None => pending.push((decisions.len(), decision.new_tat)),
            }
        }
        decisions.push(decision);
    }
    let allowed = decisions.iter().all(|d| d.allowed);
    if !allowed {
        for (spec, decision) in specs.iter().zip(decisions.iter_mut()) {
            if decision.allowed {
                *decision = unchanged(stored(&spec.key), now_us, spec.t_us, spec.burst);
            }
        }
        pending.clear();
    }
    if cost == 0 {
        pending.clear();
    }
    Evaluation {
        allowed,
        decisions,
        writes: pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000;
    const MS: u64 = 1_000;

    #[test]
    fn emission_interval_rounds_up_and_is_at_least_one() {
        assert_eq!(emission_interval_us(SEC, 10), 100 * MS);
        assert_eq!(emission_interval_us(SEC, 3), 333_334);
        assert_eq!(emission_interval_us(10, 100), 1);
        assert_eq!(emission_interval_us(SEC, 0), SEC);
    }

    /// Checklist 13 and 14 on the bare arithmetic: 10 per second, burst 10.
    #[test]
    fn burst_then_deny_then_one_more_after_one_interval() {
        let t = emission_interval_us(SEC, 10);
        let now = 5 * SEC;
        let mut tat = None;
        let mut last_remaining = u64::MAX;
        for i in 0..10 {
            let d = gcra(tat, now, t, 10, 1);
            assert!(d.allowed, "request {i} must be allowed");
            assert!(d.remaining < last_remaining, "remaining strictly decreases");
            last_remaining = d.remaining;
            assert_eq!(d.remaining, 9 - i);
            assert_eq!(d.reset_after_us, (i + 1) * t);
            tat = Some(d.new_tat);
        }
        let denied = gcra(tat, now, t, 10, 1);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after_us, Some(100 * MS));
        assert_eq!(denied.remaining, 0);
        assert_eq!(denied.reset_after_us, SEC);
        // A deny stores nothing: its new_tat is the old tat.
        assert_eq!(Some(denied.new_tat), tat);

        let later = now + 100 * MS;
        let one = gcra(tat, later, t, 10, 1);
        assert!(one.allowed);
        let two = gcra(Some(one.new_tat), later, t, 10, 1);
        assert!(!two.allowed);
    }

    #[test]
    fn stale_stored_tat_is_the_same_as_no_entry() {
        let t = 100 * MS;
        let now = 10 * SEC;
        assert_eq!(
            gcra(Some(now - 1), now, t, 10, 3),
            gcra(None, now, t, 10, 3)
        );
        assert_eq!(gcra(Some(now), now, t, 10, 3), gcra(None, now, t, 10, 3));
    }

    #[test]
    fn all_or_nothing_reports_unchanged_state_for_the_items_that_had_room() {
        let specs = vec![
            Spec {
                key: "rl:{a}:key:1".into(),
                t_us: 100 * MS,
                burst: 10,
            },
            Spec {
                key: "rl:{a}:account".into(),
                t_us: 100 * MS,
                burst: 2,
            },
        ];
        let now = SEC;
        // The account is full: its tat is 2 intervals ahead.
        let stored = |k: &str| (k == "rl:{a}:account").then_some(now + 200 * MS);
        let e = evaluate(&specs, stored, now, 1);
        assert!(!e.allowed);
        assert!(e.writes.is_empty());
        assert!(e.decisions[0].allowed);
        assert_eq!(e.decisions[0].remaining, 10, "key state unchanged");
        assert_eq!(e.decisions[0].reset_after_us, 0);
        assert!(!e.decisions[1].allowed);
        assert_eq!(e.decisions[1].retry_after_us, Some(100 * MS));
    }

    #[test]
    fn the_same_key_twice_in_one_check_counts_twice() {
        let spec = Spec {
            key: "rl:{a}:k".into(),
            t_us: 100 * MS,
            burst: 3,
        };
        let specs = vec![spec.clone(), spec];
        let e = evaluate(&specs, |_| None, SEC, 2);
        assert!(!e.allowed, "2 + 2 does not fit a burst of 3");
        let e = evaluate(&specs[..1], |_| None, SEC, 2);
        assert!(e.allowed);
        assert_eq!(e.writes, vec![(0, SEC + 200 * MS)]);
    }

    #[test]
    fn cost_zero_decides_but_writes_nothing() {
        let specs = vec![Spec {
            key: "rl:{a}:k".into(),
            t_us: 100 * MS,
            burst: 3,
        }];
        let e = evaluate(&specs, |_| None, SEC, 0);
        assert!(e.allowed);
        assert!(e.writes.is_empty());
        assert_eq!(e.decisions[0].remaining, 3);
    }
}
