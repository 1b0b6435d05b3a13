//! The shared store: one Lua script per check, run with `EVALSHA` over a reconnecting
//! `ConnectionManager`, bounded by a timeout, behind a small breaker.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisError, Script};

use crate::LimitError;
use crate::gcra::{Decision, Spec};

/// Multi-key GCRA, all-or-nothing; the Lua twin of `gcra::evaluate` (spec §2.2).
///
/// - Clock: the server's `TIME`, so instances with skewed clocks share one timeline.
/// - KEYS: one per item, all under one `{scope}` hash tag (one cluster slot, no CROSSSLOT).
/// - ARGV: cost, dry_run (`1`/`0`), then `T_us`, `burst` for each item in KEYS order.
/// - Every decision is made before any write; writes happen only if all allow, cost > 0 and not
///   a dry run, each with `PX` = time-to-full (> 0), so no key ever lives without a TTL.
/// - Returns `{all_allowed, then per item: allowed, remaining, retry_after_us or -1, reset_after_us}`.
pub(crate) const GCRA_LUA: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
local dry = ARGV[2] == '1'
local count = #KEYS
local base, tats, news, ok = {}, {}, {}, {}
local pending = {}
local all = 1
for i = 1, count do
  local key = KEYS[i]
  local T = tonumber(ARGV[1 + 2 * i])
  local burst = tonumber(ARGV[2 + 2 * i])
  local b = tonumber(redis.call('GET', key)) or now
  if b < now then b = now end
  base[i] = b
  local tat = pending[key] or b
  local new_tat = tat + n * T
  tats[i] = tat
  news[i] = new_tat
  if new_tat - now > burst * T then
    ok[i] = false
    all = 0
  else
    ok[i] = true
    pending[key] = new_tat
  end
end
local out = {all}
for i = 1, count do
  local T = tonumber(ARGV[1 + 2 * i])
  local cap = tonumber(ARGV[2 + 2 * i]) * T
  local r
  if not ok[i] then
    r = {0, math.max(0, math.floor((cap - (tats[i] - now)) / T)), news[i] - cap - now, tats[i] - now}
  elseif all == 1 then
    r = {1, math.floor((cap - (news[i] - now)) / T), -1, news[i] - now}
  else
    r = {1, math.max(0, math.floor((cap - (base[i] - now)) / T)), -1, base[i] - now}
  end
  for j = 1, 4 do out[#out + 1] = r[j] end
end
if all == 1 and (not dry) and n > 0 then
  for key, v in pairs(pending) do
    redis.call('SET', key, string.format('%.0f', v), 'PX', math.max(1, math.ceil((v - now) / 1000)))
  end
end
return out
";

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
            StoreError::Malformed(_) => false,
        }
    }
}

/// The Redis side of a `Limiter`.
pub(crate) struct RedisStore {
    conn: ConnectionManager,
    script: Script,
    /// `"<prefix>:"`, or empty.
    prefix: String,
    timeout: Duration,
    /// 0 while healthy; otherwise the clock value from which the next probe may go.
    probe_at_us: AtomicU64,
    /// 0 if never warned; otherwise when the last warning went out.
    last_warn_us: AtomicU64,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
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
        let store = RedisStore {
            conn,
            script: Script::new(GCRA_LUA),
            prefix: if key_prefix.is_empty() {
                String::new()
            } else {
                format!("{key_prefix}:")
            },
            timeout,
            probe_at_us: AtomicU64::new(0),
            last_warn_us: AtomicU64::new(0),
        };
        let mut conn = store.conn.clone();
        match tokio::time::timeout(timeout, store.script.prepare_invoke().load_async(&mut conn))
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
        Ok(store)
    }

    /// The Redis key for a storage key: `<prefix>:rl:{<scope>}:<subject>`.
    pub(crate) fn redis_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// One round trip: run the script over every item. Returns whether the check is allowed and
    /// one decision per item (`new_tat` is not reported and left 0).
    pub(crate) async fn check(
        &self,
        specs: &[Spec],
        cost: u32,
        dry_run: bool,
    ) -> Result<(bool, Vec<Decision>), StoreError> {
        let mut invocation = self.script.prepare_invoke();
        for spec in specs {
            invocation.key(self.redis_key(&spec.key));
        }
        invocation.arg(cost).arg(u8::from(dry_run));
        for spec in specs {
            invocation.arg(spec.t_us).arg(spec.burst);
        }
        let mut conn = self.conn.clone();
        let reply: Vec<i64> =
            tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn))
                .await
                .map_err(|_| StoreError::Timeout(self.timeout))??;
        parse_reply(&reply, specs.len())
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

/// Decodes the script's flat reply.
fn parse_reply(reply: &[i64], items: usize) -> Result<(bool, Vec<Decision>), StoreError> {
    let malformed = || StoreError::Malformed(format!("{reply:?} for {items} items"));
    if reply.len() != 1 + 4 * items {
        return Err(malformed());
    }
    let unsigned = |v: i64| u64::try_from(v).map_err(|_| malformed());
    let mut decisions = Vec::with_capacity(items);
    for chunk in reply[1..].chunks_exact(4) {
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
    let all = reply[0] == 1;
    if all != decisions.iter().all(|d| d.allowed) {
        return Err(malformed());
    }
    Ok((all, decisions))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_replies() {
        let (all, d) = parse_reply(&[1, 1, 9, -1, 100_000], 1).unwrap();
        assert!(all);
        assert_eq!(d[0].remaining, 9);
        assert_eq!(d[0].retry_after_us, None);
        let (all, d) = parse_reply(&[0, 1, 10, -1, 0, 0, 0, 100_000, 200_000], 2).unwrap();
        assert!(!all);
        assert_eq!(d[1].retry_after_us, Some(100_000));
        assert!(parse_reply(&[1, 1, 9, -1], 1).is_err());
        assert!(
            parse_reply(&[1, 0, 0, 5, 5], 1).is_err(),
            "all=1 with a deny"
        );
        assert!(
            parse_reply(&[0, 0, 0, -1, 5], 1).is_err(),
            "deny without retry"
        );
        assert!(
            parse_reply(&[1, 1, -3, -1, 5], 1).is_err(),
            "negative remaining"
        );
    }
}
