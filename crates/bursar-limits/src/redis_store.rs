//! The shared store: one Lua script per round trip, run with `EVALSHA` over a reconnecting
//! `ConnectionManager`, bounded by a timeout, behind a small breaker.
//!
//! **Checks of one scope share round trips.** While a script call for a scope is in flight, the
//! checks that arrive for the same scope queue up and go together in the next call, where the
//! script decides them one after another in arrival order, each all-or-nothing, against the state
//! the earlier ones left. That is exactly what separate calls would decide, since a script runs
//! with nothing interleaved; only the Redis round trip, `TIME`, the reads and the writes are paid
//! once per batch instead of once per check. A lone check goes out at once, so an idle scope adds
//! no wait; under load a check waits at most for the call ahead of it. Batches stay within one
//! scope, so every key of a call keeps one hash tag (one cluster slot).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisError, Script};
use tokio::sync::oneshot;

use crate::LimitError;
use crate::gcra::{Decision, Spec};

/// Multi-check, multi-key GCRA; the Lua twin of `gcra::evaluate` applied to each check in turn
/// (spec §2.2).
///
/// - Clock: the server's `TIME`, read once, so instances with skewed clocks share one timeline and
///   every check of a batch is decided at the same instant.
/// - KEYS: the distinct keys of the batch, all under one `{scope}` hash tag (one cluster slot).
/// - ARGV: the number of checks, then per check `cost`, `dry_run` (`1`/`0`), the item count, and
///   per item the KEYS index, `T_us` and `burst`.
/// - Each check sees what the checks before it stored; within a check, items sharing a key see
///   each other's pending TAT. A check stores only if all its items allow, cost > 0 and it is not
///   a dry run. Writes happen once per key at the end, each with `PX` = time-to-full (> 0), so no
///   key ever lives without a TTL.
/// - Returns, per check, `{all_allowed, then per item: allowed, remaining, retry_after_us or -1,
///   reset_after_us}`, flattened.
pub(crate) const GCRA_LUA: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state, dirty, out = {}, {}, {}
local a = 2
for c = 1, tonumber(ARGV[1]) do
  local n = tonumber(ARGV[a])
  local dry = ARGV[a + 1] == '1'
  local count = tonumber(ARGV[a + 2])
  a = a + 3
  local ks, Ts, caps, base, tats, news, ok = {}, {}, {}, {}, {}, {}, {}
  local pending = {}
  local all = 1
  for i = 1, count do
    local k = tonumber(ARGV[a])
    local T = tonumber(ARGV[a + 1])
    local burst = tonumber(ARGV[a + 2])
    a = a + 3
    ks[i], Ts[i], caps[i] = k, T, burst * T
    local b = state[k]
    if b == nil then
      b = tonumber(redis.call('GET', KEYS[k])) or now
      state[k] = b
    end
    if b < now then b = now end
    base[i] = b
    local tat = pending[k] or b
    local new_tat = tat + n * T
    tats[i] = tat
    news[i] = new_tat
    if new_tat - now > caps[i] then
      ok[i] = false
      all = 0
    else
      ok[i] = true
      pending[k] = new_tat
    end
  end
  out[#out + 1] = all
  for i = 1, count do
    local T, cap = Ts[i], caps[i]
    if not ok[i] then
      out[#out + 1] = 0
      out[#out + 1] = math.max(0, math.floor((cap - (tats[i] - now)) / T))
      out[#out + 1] = news[i] - cap - now
      out[#out + 1] = tats[i] - now
    elseif all == 1 then
      out[#out + 1] = 1
      out[#out + 1] = math.floor((cap - (news[i] - now)) / T)
      out[#out + 1] = -1
      out[#out + 1] = news[i] - now
    else
      out[#out + 1] = 1
      out[#out + 1] = math.max(0, math.floor((cap - (base[i] - now)) / T))
      out[#out + 1] = -1
      out[#out + 1] = base[i] - now
    end
  end
  if all == 1 and (not dry) and n > 0 then
    for k, v in pairs(pending) do
      state[k] = v
      dirty[k] = true
    end
  end
end
for k in pairs(dirty) do
  local v = state[k]
  redis.call('SET', KEYS[k], string.format('%.0f', v), 'PX', math.max(1, math.ceil((v - now) / 1000)))
end
return out
";

/// At most this many checks go in one script call; the rest wait for the next one.
const MAX_BATCH: usize = 64;

/// Script calls of one scope in flight at once: more than one, so a check that arrives while a
/// call is on the wire need not wait for its whole round trip; few, so batches stay full.
const MAX_IN_FLIGHT: usize = 2;

/// While the store is failing, only one call per this interval probes it; the others go straight
/// to the fail mode instead of each waiting out the timeout.
const PROBE_EVERY_US: u64 = 250_000;

/// Store errors are logged at most this often; the counter carries the exact number.
const WARN_EVERY_US: u64 = 1_000_000;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("unexpected script reply: {0}")]
    Malformed(String),
    /// The call that carried this check (with others of its scope) failed.
    #[error("{0}")]
    Batch(Arc<StoreError>),
    /// The task running the batch ended without answering (the runtime is shutting down).
    #[error("the batch carrying this check was dropped")]
    Dropped,
}

impl StoreError {
    /// Whether the store itself is unreachable or too slow, rather than refusing one call.
    fn is_connection_failure(&self) -> bool {
        match self {
            StoreError::Timeout(_) => true,
            StoreError::Redis(error) => {
                error.is_io_error()
                    || error.is_timeout()
                    || error.is_connection_dropped()
                    || error.is_connection_refusal()
                    || error.is_unrecoverable_error()
            }
            StoreError::Batch(error) => error.is_connection_failure(),
            StoreError::Malformed(_) => false,
            StoreError::Dropped => true,
        }
    }
}

/// The Redis side of a `Limiter`.
pub(crate) struct RedisStore {
    core: Arc<Core>,
    /// 0 while healthy; otherwise the clock value from which the next probe may go.
    probe_at_us: AtomicU64,
    /// 0 if never warned; otherwise when the last warning went out.
    last_warn_us: AtomicU64,
}

/// What the batch-running tasks need: shared with them, so a check whose caller went away is
/// still answered and its scope's queue still drained.
struct Core {
    conn: ConnectionManager,
    script: Script,
    /// `"<prefix>:"`, or empty.
    prefix: String,
    timeout: Duration,
    /// Scopes with a call in flight, each with the checks waiting for the next call. A scope is
    /// present exactly while a task is running its calls.
    queues: Mutex<HashMap<String, Queue>>,
    /// Script calls made (each carrying one or more checks).
    calls: AtomicU64,
}

/// The checks of one scope waiting for a call, and how many tasks are running its calls.
struct Queue {
    waiting: Vec<Waiter>,
    runners: usize,
}

/// One check waiting for its scope's next call.
struct Waiter {
    specs: Vec<Spec>,
    cost: u32,
    dry_run: bool,
    reply: oneshot::Sender<Result<(bool, Vec<Decision>), StoreError>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.core.prefix)
            .field("timeout", &self.core.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Builds the store without needing Redis to be up: the connection is made lazily and
    /// re-made after failures. Loading the script now is only an optimisation, bounded by
    /// `timeout`; `EVALSHA` falls back to loading it on `NOSCRIPT`.
    pub(crate) async fn connect(
        url: &str,
        key_prefix: &str,
        timeout: Duration,
    ) -> Result<RedisStore, LimitError> {
        if key_prefix.contains(['{', '}']) {
            return Err(LimitError::Invalid {
                reason: "the key prefix must not contain '{' or '}' (it would change the hash tag)"
                    .to_owned(),
            });
        }
        let client = Client::open(url).map_err(LimitError::InvalidUrl)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            // One attempt per (re)connect; the breaker decides when to try again, so a dead
            // server costs one bounded probe per interval instead of a long backoff chain.
            .set_number_of_retries(0)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(LimitError::InvalidUrl)?;
        let core = Core {
            conn,
            script: Script::new(GCRA_LUA),
            prefix: if key_prefix.is_empty() {
                String::new()
            } else {
                format!("{key_prefix}:")
            },
            timeout,
            queues: Mutex::new(HashMap::new()),
            calls: AtomicU64::new(0),
        };
        let mut conn = core.conn.clone();
        match tokio::time::timeout(timeout, core.script.prepare_invoke().load_async(&mut conn))
            .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "rate-limit script not loaded at startup; will load on first use")
            }
            Err(_) => tracing::warn!(
                ?timeout,
                "rate-limit store did not answer at startup; will connect on first use"
            ),
        }
        Ok(RedisStore {
            core: Arc::new(core),
            probe_at_us: AtomicU64::new(0),
            last_warn_us: AtomicU64::new(0),
        })
    }

    /// Decides one check of `scope`: sent at once if no call for the scope is in flight, else in
    /// the scope's next call together with the other checks that arrived meanwhile. Returns
    /// whether the check is allowed and one decision per item (`new_tat` is not reported and
    /// left 0).
    pub(crate) async fn check(
        &self,
        scope: &str,
        specs: Vec<Spec>,
        cost: u32,
        dry_run: bool,
    ) -> Result<(bool, Vec<Decision>), StoreError> {
        let (reply, answer) = oneshot::channel();
        let waiter = Waiter {
            specs,
            cost,
            dry_run,
            reply,
        };
        let lead = {
            let mut queues = self.core.queues.lock().unwrap_or_else(|e| e.into_inner());
            match queues.get_mut(scope) {
                Some(queue) => {
                    queue.waiting.push(waiter);
                    let lead = queue.runners < MAX_IN_FLIGHT;
                    queue.runners += usize::from(lead);
                    lead
                }
                None => {
                    queues.insert(
                        scope.to_owned(),
                        Queue {
                            waiting: vec![waiter],
                            runners: 1,
                        },
                    );
                    true
                }
            }
        };
        if lead {
            // A task of its own, so the queue is drained even if this caller is cancelled.
            tokio::spawn(Arc::clone(&self.core).run(scope.to_owned()));
        }
        answer.await.unwrap_or(Err(StoreError::Dropped))
    }

    /// Script calls made so far (each deciding one or more checks).
    pub(crate) fn calls(&self) -> u64 {
        self.core.calls.load(Ordering::Relaxed)
    }

    /// Decides `checks` (specs, cost, dry run) in one script call, in this order: the batching
    /// of concurrent checks made deterministic, for tests.
    #[cfg(test)]
    pub(crate) async fn decide_batch(
        &self,
        checks: Vec<(Vec<Spec>, u32, bool)>,
    ) -> Result<Vec<(bool, Vec<Decision>)>, StoreError> {
        let batch: Vec<Waiter> = checks
            .into_iter()
            .map(|(specs, cost, dry_run)| Waiter {
                specs,
                cost,
                dry_run,
                reply: oneshot::channel().0,
            })
            .collect();
        let counts: Vec<usize> = batch.iter().map(|w| w.specs.len()).collect();
        parse_reply(&self.core.call(&batch).await?, &counts)
    }

    /// Whether this call should use Redis: always while healthy; while failing, one caller per
    /// probe interval (the one that wins the swap).
    pub(crate) fn should_try(&self, now_us: u64) -> bool {
        let probe_at = self.probe_at_us.load(Ordering::Acquire);
        if probe_at == 0 {
            return true;
        }
        now_us >= probe_at
            && self
                .probe_at_us
                .compare_exchange(
                    probe_at,
                    now_us.saturating_add(PROBE_EVERY_US).max(1),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    /// Redis answered: use it for every call again. (Read first so the healthy path does not
    /// write a cache line every call shares.)
    pub(crate) fn succeeded(&self) {
        if self.probe_at_us.load(Ordering::Acquire) != 0 {
            self.probe_at_us.store(0, Ordering::Release);
        }
    }

    /// Redis failed: count it and log it (rate-limited). A connection failure or timeout also
    /// holds every call off until the next probe; an error the server answered with (say
    /// `WRONGTYPE` on one key) says nothing about other keys, so it does not.
    pub(crate) fn failed(&self, now_us: u64, error: &StoreError, fail_open: bool) {
        metrics::counter!("ratelimit_store_errors_total").increment(1);
        if error.is_connection_failure() {
            self.probe_at_us.store(
                now_us.saturating_add(PROBE_EVERY_US).max(1),
                Ordering::Release,
            );
        }
        let last = self.last_warn_us.load(Ordering::Acquire);
        let due = last == 0 || now_us >= last.saturating_add(WARN_EVERY_US);
        if due
            && self
                .last_warn_us
                .compare_exchange(last, now_us.max(1), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let fallback = if fail_open {
                "serving from the per-instance fallback limiter"
            } else {
                "failing closed"
            };
            tracing::warn!(%error, fallback, "rate-limit store error");
        }
    }
}

impl Core {
    /// Runs the calls of `scope` until its queue is empty, then removes the scope (under the
    /// lock, so a check arriving after that starts a new run).
    async fn run(self: Arc<Core>, scope: String) {
        loop {
            let batch: Vec<Waiter> = {
                let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
                let Some(queue) = queues.get_mut(&scope) else {
                    return;
                };
                if queue.waiting.is_empty() {
                    queue.runners -= 1;
                    if queue.runners == 0 {
                        queues.remove(&scope);
                    }
                    return;
                }
                let take = queue.waiting.len().min(MAX_BATCH);
                queue.waiting.drain(..take).collect()
            };
            let counts: Vec<usize> = batch.iter().map(|w| w.specs.len()).collect();
            match self.call(&batch).await {
                Ok(reply) => match parse_reply(&reply, &counts) {
                    Ok(results) => {
                        for (waiter, result) in batch.into_iter().zip(results) {
                            let _ = waiter.reply.send(Ok(result));
                        }
                    }
                    Err(error) => answer_all(batch, error),
                },
                Err(error) => {
                    let down = error.is_connection_failure();
                    answer_all(batch, error);
                    if down {
                        // Every queued check would wait out its own timeout against a store that
                        // just failed: answer them now and let the breaker pace the next try.
                        let rest = {
                            let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
                            match queues.get_mut(&scope) {
                                Some(queue) => {
                                    queue.runners -= 1;
                                    let rest = std::mem::take(&mut queue.waiting);
                                    if queue.runners == 0 {
                                        queues.remove(&scope);
                                    }
                                    rest
                                }
                                None => Vec::new(),
                            }
                        };
                        answer_all(rest, StoreError::Timeout(self.timeout));
                        return;
                    }
                }
            }
        }
    }

    /// One round trip for `batch`, bounded by the timeout.
    async fn call(&self, batch: &[Waiter]) -> Result<Vec<i64>, StoreError> {
        let mut invocation = self.script.prepare_invoke();
        let mut keys: Vec<&str> = Vec::new();
        invocation.arg(batch.len());
        for waiter in batch {
            invocation
                .arg(waiter.cost)
                .arg(u8::from(waiter.dry_run))
                .arg(waiter.specs.len());
            for spec in &waiter.specs {
                let index = match keys.iter().position(|k| *k == spec.key) {
                    Some(i) => i,
                    None => {
                        keys.push(&spec.key);
                        invocation.key(format!("{}{}", self.prefix, spec.key));
                        keys.len() - 1
                    }
                };
                invocation.arg(index + 1).arg(spec.t_us).arg(spec.burst);
            }
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("ratelimit_store_calls_total").increment(1);
        let mut conn = self.conn.clone();
        Ok(
            tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn))
                .await
                .map_err(|_| StoreError::Timeout(self.timeout))??,
        )
    }
}

/// Gives every waiter of a failed call the same error.
fn answer_all(batch: Vec<Waiter>, error: StoreError) {
    let error = Arc::new(error);
    for waiter in batch {
        let _ = waiter
            .reply
            .send(Err(StoreError::Batch(Arc::clone(&error))));
    }
}

/// Decodes the script's flat reply for checks of `items[i]` items each.
fn parse_reply(reply: &[i64], items: &[usize]) -> Result<Vec<(bool, Vec<Decision>)>, StoreError> {
    let malformed = || StoreError::Malformed(format!("{reply:?} for checks of {items:?} items"));
    if reply.len() != items.iter().map(|n| 1 + 4 * n).sum::<usize>() {
        return Err(malformed());
    }
    let unsigned = |v: i64| u64::try_from(v).map_err(|_| malformed());
    let mut results = Vec::with_capacity(items.len());
    let mut rest = reply;
    for &count in items {
        let (check, tail) = rest.split_at(1 + 4 * count);
        rest = tail;
        let mut decisions = Vec::with_capacity(count);
        for chunk in check[1..].chunks_exact(4) {
            let allowed = chunk[0] == 1;
            let retry_after_us = match (allowed, chunk[2]) {
                (true, -1) => None,
                (false, v) if v > 0 => Some(unsigned(v)?),
                _ => return Err(malformed()),
            };
            decisions.push(Decision {
                allowed,
                new_tat: 0,
                remaining: unsigned(chunk[1])?,
                reset_after_us: unsigned(chunk[3])?,
                retry_after_us,
            });
        }
        let all = check[0] == 1;
        if all != decisions.iter().all(|d| d.allowed) {
            return Err(malformed());
        }
        results.push((all, decisions));
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_replies() {
        let one = |reply: &[i64], items: usize| {
            parse_reply(reply, &[items]).map(|mut v| v.pop().unwrap())
        };
        let (all, d) = one(&[1, 1, 9, -1, 100_000], 1).unwrap();
        assert!(all);
        assert_eq!(d[0].remaining, 9);
        assert_eq!(d[0].retry_after_us, None);
        let (all, d) = one(&[0, 1, 10, -1, 0, 0, 0, 100_000, 200_000], 2).unwrap();
        assert!(!all);
        assert_eq!(d[1].retry_after_us, Some(100_000));
        assert!(one(&[1, 1, 9, -1], 1).is_err());
        assert!(one(&[1, 0, 0, 5, 5], 1).is_err(), "all=1 with a deny");
        assert!(one(&[0, 0, 0, -1, 5], 1).is_err(), "deny without retry");
        assert!(one(&[1, 1, -3, -1, 5], 1).is_err(), "negative remaining");
        // Two checks in one reply, split by their item counts.
        let both = parse_reply(
            &[1, 1, 9, -1, 100, 0, 0, 0, 50, 900, 1, 3, -1, 700],
            &[1, 2],
        )
        .unwrap();
        assert_eq!(both.len(), 2);
        assert!(both[0].0 && !both[1].0);
        assert_eq!(both[1].1[1].remaining, 3);
        assert!(parse_reply(&[1, 1, 9, -1, 100], &[1, 1]).is_err(), "short");
    }
}
