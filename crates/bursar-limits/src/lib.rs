//! Short-window rate limits (spec `api-product.md` §2.2–2.3): one GCRA arithmetic, kept
//! in-process or in Redis.
//!
//! # Why our own GCRA and not `governor`
//!
//! - **One arithmetic, two stores.** The same integer-microsecond GCRA decides in-process (single
//!   node, and the fallback while Redis is down) and in the Redis Lua script (multi-instance), so
//!   decisions and the `RateLimit` numbers agree whichever store answered. `governor` only runs
//!   in-process and its state cannot be mirrored into a script.
//! - **All-or-nothing over several policies.** A request is checked against its key, account and
//!   IP policies at once; if any denies, *nothing* is stored for any of them, so a request that
//!   one policy rejects does not eat another policy's budget. `governor` checks one limiter at a
//!   time and has no such transaction.
//! - **Headers need per-policy numbers.** `RateLimit` reports remaining and reset per policy,
//!   which falls out of GCRA directly (`remaining = ⌊(burst·T − (tat′ − now))/T⌋`).
//! - **Bounded memory with exact eviction.** A stored TAT that is not in the future (`tat ≤ now`)
//!   is equivalent to no entry, so dropping it changes no decision. The store has a hard key cap
//!   (see [`LocalConfig`]), which `governor`'s keyed limiter does not.
//!
//! # Layout
//!
//! A [`Check`] names a `scope` (the Redis hash tag: an account like `a42`, or `ip:203.0.113.7`)
//! and one [`Item`] per policy, each with a `subject` such as `key:17`. The storage key is
//! `<prefix>:rl:{<scope>}:<subject>`: every key of a check shares one hash tag (one cluster slot,
//! one script call, one local shard), and no key contains a limit value, so changing a limit
//! keeps the bucket. Concurrent checks of one scope share script calls (decided in arrival order
//! inside the script, so exactly as separate calls would be); see `redis_store`.

#![warn(missing_docs)]

mod clock;
mod gcra;
mod headers;
mod local;
mod redis_store;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

pub use headers::{client_subject, policy_header, ratelimit_header, retry_after_secs};

use clock::Clock;
use gcra::{Decision, Spec, emission_interval_us};
use local::LocalStore;
use redis_store::RedisStore;

/// A GCRA policy: `limit` requests per `window`, i.e. emission interval `T = window / limit` and
/// burst = `limit`.
///
/// Why burst = limit: it is what `RateLimit-Policy: q=…;w=…` advertises, so a client that reads
/// `q` can send that many at once, and the long-run rate is still `limit / window`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Name shown in the `RateLimit` fields and `violated-policies`: `key`, `account`, `ip`,
    /// `ip-auth`, ….
    pub name: String,
    /// Requests per window; also the burst. Must be ≥ 1.
    pub limit: u32,
    /// The window; must be at least 1 µs. Advertised as whole seconds (rounded up).
    pub window: Duration,
}

impl Policy {
    /// A policy of `limit` requests per `window`.
    pub fn new(name: impl Into<String>, limit: u32, window: Duration) -> Policy {
        Policy {
            name: name.into(),
            limit,
            window,
        }
    }
}

/// One policy applied to one subject.
///
/// `subject` is the storage key suffix, e.g. `key:17`; it must identify the policy too (two
/// policies with the same subject share one bucket) and must never contain the limit value, so a
/// limit change keeps the existing state (checklist 23).
#[derive(Debug, Clone)]
pub struct Item<'a> {
    /// The policy to apply.
    pub policy: &'a Policy,
    /// The storage key suffix.
    pub subject: String,
}

impl<'a> Item<'a> {
    /// An item for `policy` on `subject`.
    pub fn new(policy: &'a Policy, subject: impl Into<String>) -> Item<'a> {
        Item {
            policy,
            subject: subject.into(),
        }
    }
}

/// A check of several policies under one `scope`, all-or-nothing: allowed only if every item
/// allows `cost`; on deny nothing is stored for any item.
///
/// Why one scope per check: the scope is the Redis hash tag and picks the local shard, which is
/// what makes the multi-policy check one atomic script call (and one lock) without `CROSSSLOT`.
#[derive(Debug, Clone)]
pub struct Check<'a> {
    /// The hash tag shared by every key of the check, e.g. `a42` or `ip:203.0.113.7`. Must be
    /// non-empty and contain neither `{` nor `}`.
    pub scope: String,
    /// The policies to apply, in the order the states come back (and the headers list them).
    pub items: Vec<Item<'a>>,
    /// Units this request costs in every item (weighted endpoints). 0 only inspects.
    pub cost: u32,
    /// Decide but never store, e.g. "is this IP currently blocked for failed auth?" before
    /// spending a real attempt.
    pub dry_run: bool,
}

impl<'a> Check<'a> {
    /// An empty check under `scope`, costing 1, not a dry run.
    pub fn new(scope: impl Into<String>) -> Check<'a> {
        Check {
            scope: scope.into(),
            items: Vec::new(),
            cost: 1,
            dry_run: false,
        }
    }

    /// Adds `policy` applied to `subject`.
    #[must_use]
    pub fn item(mut self, policy: &'a Policy, subject: impl Into<String>) -> Check<'a> {
        self.items.push(Item::new(policy, subject));
        self
    }

    /// Sets the cost (weighted endpoints).
    #[must_use]
    pub fn with_cost(mut self, cost: u32) -> Check<'a> {
        self.cost = cost;
        self
    }

    /// Makes this a dry run (decide, store nothing) or not.
    #[must_use]
    pub fn with_dry_run(mut self, dry_run: bool) -> Check<'a> {
        self.dry_run = dry_run;
        self
    }
}

/// One policy's state after a check, for the `RateLimit` fields and the 429 body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyState {
    /// The policy's name.
    pub name: String,
    /// The limit (= burst) that was enforced. While degraded this is the per-instance share.
    pub limit: u32,
    /// The policy's window.
    pub window: Duration,
    /// Requests of cost 1 that still fit right now. For an allowed check, after this request; for
    /// a denied one, the unchanged state (nothing was spent).
    pub remaining: u64,
    /// Time until the burst is full again (the storage TTL).
    pub reset_after: Duration,
    /// Only on the items that denied: how long until this request's cost would fit.
    pub retry_after: Option<Duration>,
}

/// The decision for a whole check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Whether every item allowed the cost (and, unless a dry run, it was spent).
    pub allowed: bool,
    /// One state per item, in item order.
    pub states: Vec<PolicyState>,
    /// Answered by the per-instance fallback because the shared store failed: the server
    /// should alert on it, and the limits in `states` are the per-instance shares.
    pub degraded: bool,
}

impl Outcome {
    /// The names of the policies that denied, for the `violated-policies` member of a 429.
    pub fn violated_policies(&self) -> Vec<&str> {
        self.states
            .iter()
            .filter(|s| s.retry_after.is_some())
            .map(|s| s.name.as_str())
            .collect()
    }
}

/// What to do when the shared store fails or times out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// Serve from the per-instance fallback at `limit / instances` (never unlimited), marked
    /// `degraded` and counted in `ratelimit_fallback_total`. The spec's default for rate limits.
    Open,
    /// Refuse with [`LimitError::Unavailable`] (the server answers 503).
    Closed,
}

/// Why a check could not be decided.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LimitError {
    /// The shared store failed or timed out and the fail mode is closed: answer 503, not 429.
    #[error("rate-limit store unavailable")]
    Unavailable,
    /// The request costs more than a policy's whole burst, so it could never be allowed; an
    /// error (429 or 400 with an explanation) instead of a wait that never ends.
    #[error("cost {cost} exceeds the burst {burst} of policy {policy:?}")]
    TooCostly {
        /// The policy whose burst is too small.
        policy: String,
        /// The requested cost.
        cost: u32,
        /// That policy's burst.
        burst: u32,
    },
    /// A policy or check that cannot be evaluated (limit 0, zero window, bad scope or prefix): a
    /// configuration bug, reported rather than guessed around.
    #[error("invalid rate-limit configuration: {reason}")]
    Invalid {
        /// What is wrong.
        reason: String,
    },
    /// The Redis URL could not be parsed.
    #[error("invalid rate-limit store URL")]
    InvalidUrl(#[source] redis::RedisError),
}

/// Bounds for the in-process store (single-node mode, and the fallback in Redis mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalConfig {
    /// Hard cap on tracked keys. When full, stale entries go first, then the entries closest to
    /// expiry; evicting can only over-admit, never under-admit.
    pub max_keys: usize,
    /// How often [`Limiter::spawn_sweeper`] drops stale entries and gives memory back.
    pub sweep_every: Duration,
}

impl Default for LocalConfig {
    /// 100,000 keys (a few MiB) swept every 10 s.
    fn default() -> LocalConfig {
        LocalConfig {
            max_keys: 100_000,
            sweep_every: Duration::from_secs(10),
        }
    }
}

/// The rate limiter. Cheap to clone (shared state), so one instance serves every request.
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

struct Inner {
    local: LocalStore,
    clock: Clock,
    sweep_every: Duration,
    shared: Option<Shared>,
}

struct Shared {
    store: RedisStore,
    fail: FailMode,
    instances: u32,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Limiter");
        d.field("sweep_every", &self.inner.sweep_every);
        if let Some(shared) = &self.inner.shared {
            d.field("store", &shared.store)
                .field("fail", &shared.fail)
                .field("instances", &shared.instances);
        }
        d.finish_non_exhaustive()
    }
}

/// A check after validation: one storage spec per item and the limit to report for it.
struct Resolved {
    specs: Vec<Spec>,
    limits: Vec<u32>,
}

impl Limiter {
    /// An in-process limiter (single-node mode): state lives in this process only.
    pub fn local(config: LocalConfig) -> Limiter {
        Limiter::local_with_clock(config, Clock::monotonic())
    }

    fn local_with_clock(config: LocalConfig, clock: Clock) -> Limiter {
        Limiter {
            inner: Arc::new(Inner {
                local: LocalStore::new(config.max_keys),
                clock,
                sweep_every: config.sweep_every,
                shared: None,
            }),
        }
    }

    /// A limiter shared by `instances` servers through Redis at `url`, keys under `key_prefix`.
    ///
    /// Succeeds even while Redis is down (the connection is made lazily and re-made after
    /// failures), so a server can start during a Redis outage and heal without a restart. Every
    /// store call is bounded by `timeout`; on failure `fail` decides, and the fallback uses
    /// `local` with each limit divided by `instances` (at least 1) so N instances together stay
    /// near the configured limit.
    pub async fn with_redis(
        url: &str,
        key_prefix: &str,
        fail: FailMode,
        instances: u32,
        local: LocalConfig,
        timeout: Duration,
    ) -> Result<Limiter, LimitError> {
        Limiter::with_redis_and_clock(
            url,
            key_prefix,
            fail,
            instances,
            local,
            timeout,
            Clock::monotonic(),
        )
        .await
    }

    async fn with_redis_and_clock(
        url: &str,
        key_prefix: &str,
        fail: FailMode,
        instances: u32,
        local: LocalConfig,
        timeout: Duration,
        clock: Clock,
    ) -> Result<Limiter, LimitError> {
        let store = RedisStore::connect(url, key_prefix, timeout).await?;
        Ok(Limiter {
            inner: Arc::new(Inner {
                local: LocalStore::new(local.max_keys),
                clock,
                sweep_every: local.sweep_every,
                shared: Some(Shared {
                    store,
                    fail,
                    instances: instances.max(1),
                }),
            }),
        })
    }

    /// Decides `check`: all-or-nothing over its items, storing the spend only if allowed and not
    /// a dry run.
    ///
    /// Errors before any I/O if the cost exceeds a policy's burst ([`LimitError::TooCostly`]) or
    /// the check is malformed; with Redis, one script call bounded by the timeout (shared with the
    /// scope's other queued checks, after at most the call ahead of it), then the
    /// fail mode.
    pub async fn check(&self, check: &Check<'_>) -> Result<Outcome, LimitError> {
        let mut resolved = resolve(check, 1)?;
        if check.items.is_empty() {
            return Ok(Outcome {
                allowed: true,
                states: Vec::new(),
                degraded: false,
            });
        }
        let Some(shared) = &self.inner.shared else {
            return Ok(self.local_outcome(check, &resolved, false));
        };
        if shared.store.should_try(self.inner.clock.now_us()) {
            match shared
                .store
                .check(
                    &check.scope,
                    std::mem::take(&mut resolved.specs),
                    check.cost,
                    check.dry_run,
                )
                .await
            {
                Ok((allowed, decisions)) => {
                    shared.store.succeeded();
                    return Ok(outcome(check, &resolved, allowed, &decisions, false));
                }
                Err(error) => shared.store.failed(
                    self.inner.clock.now_us(),
                    &error,
                    shared.fail == FailMode::Open,
                ),
            }
        }
        match shared.fail {
            FailMode::Closed => Err(LimitError::Unavailable),
            FailMode::Open => {
                metrics::counter!("ratelimit_fallback_total").increment(1);
                let resolved = resolve(check, shared.instances)?;
                Ok(self.local_outcome(check, &resolved, true))
            }
        }
    }

    fn local_outcome(&self, check: &Check<'_>, resolved: &Resolved, degraded: bool) -> Outcome {
        let evaluation = self.inner.local.check(
            &check.scope,
            &resolved.specs,
            self.inner.clock.now_us(),
            check.cost,
            check.dry_run,
        );
        outcome(
            check,
            resolved,
            evaluation.allowed,
            &evaluation.decisions,
            degraded,
        )
    }

    /// Starts the periodic eviction of the in-process store (every `sweep_every`): drops entries
    /// whose TAT has passed (exact: they decide nothing) and gives the memory back, so idle
    /// subjects do not accumulate. Must be called inside a Tokio runtime; the task ends by itself
    /// once every clone of this limiter is dropped.
    pub fn spawn_sweeper(&self) -> tokio::task::JoinHandle<()> {
        let inner = Arc::downgrade(&self.inner);
        let every = self.inner.sweep_every.max(Duration::from_millis(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(inner) = inner.upgrade() else {
                    break;
                };
                let removed = inner.local.sweep(inner.clock.now_us());
                tracing::trace!(removed, "rate-limit sweep");
            }
        })
    }

    /// Runs one sweep now; returns how many stale entries were dropped. For shutdown hooks and
    /// tests; the sweeper task calls the same thing.
    pub fn sweep(&self) -> usize {
        self.inner.local.sweep(self.inner.clock.now_us())
    }

    /// Whether checks go to a shared store (Redis), i.e. cost a round trip.
    pub fn is_shared(&self) -> bool {
        self.inner.shared.is_some()
    }

    /// Script calls made to the shared store so far (0 without Redis). Concurrent checks of one
    /// scope share calls, so under load this grows slower than the number of checks; exported as
    /// `ratelimit_store_calls_total` too.
    pub fn shared_store_calls(&self) -> u64 {
        self.inner.shared.as_ref().map_or(0, |s| s.store.calls())
    }

    /// Keys held by the in-process store (the fallback store in Redis mode), to export as a
    /// gauge and to prove the memory bound.
    pub fn tracked_keys(&self) -> usize {
        self.inner.local.len()
    }
}

/// Validates a check and turns each item into storage parameters. `divisor` > 1 gives the
/// fallback's per-instance share: limit `max(1, limit / divisor)` at the same window, with the
/// burst raised to `cost` if needed so a weighted request stays possible while degraded.
fn resolve(check: &Check<'_>, divisor: u32) -> Result<Resolved, LimitError> {
    if check.scope.is_empty() || check.scope.contains(['{', '}']) {
        return Err(LimitError::Invalid {
            reason: format!(
                "scope {:?} must be non-empty and contain neither '{{' nor '}}' (it is the hash tag)",
                check.scope
            ),
        });
    }
    let mut specs = Vec::with_capacity(check.items.len());
    let mut limits = Vec::with_capacity(check.items.len());
    for item in &check.items {
        let policy = item.policy;
        let window_us = u64::try_from(policy.window.as_micros()).unwrap_or(u64::MAX);
        if policy.limit == 0 || window_us == 0 {
            return Err(LimitError::Invalid {
                reason: format!(
                    "policy {:?} needs a limit ≥ 1 and a window ≥ 1 µs",
                    policy.name
                ),
            });
        }
        if check.cost > policy.limit {
            return Err(LimitError::TooCostly {
                policy: policy.name.clone(),
                cost: check.cost,
                burst: policy.limit,
            });
        }
        let share = (policy.limit / divisor.max(1)).max(1);
        let burst = share.max(check.cost);
        specs.push(Spec {
            key: format!("rl:{{{}}}:{}", check.scope, item.subject),
            t_us: emission_interval_us(window_us, share),
            burst,
        });
        limits.push(burst);
    }
    Ok(Resolved { specs, limits })
}

/// Builds the public outcome from per-item decisions.
fn outcome(
    check: &Check<'_>,
    resolved: &Resolved,
    allowed: bool,
    decisions: &[Decision],
    degraded: bool,
) -> Outcome {
    let states = check
        .items
        .iter()
        .zip(&resolved.limits)
        .zip(decisions)
        .map(|((item, &limit), decision)| PolicyState {
            name: item.policy.name.clone(),
            limit,
            window: item.policy.window,
            remaining: decision.remaining,
            reset_after: Duration::from_micros(decision.reset_after_us),
            retry_after: decision.retry_after_us.map(Duration::from_micros),
        })
        .collect();
    Outcome {
        allowed,
        states,
        degraded,
    }
}
