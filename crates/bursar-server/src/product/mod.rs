//! The API as a product (issue 6) on the request path: rate limits per client IP, per key and
//! per account (`bursar-limits`), failed-authentication throttling, monthly quotas, metering,
//! and the revocation broadcast that keeps every instance's key cache honest.
//!
//! Order on each request (spec `api-product.md` §1 "Limit layers"): per-IP limit → failed-auth
//! check (in-process, no I/O) → key verification → scope (403) → key and account rates (429,
//! never stored) → monthly quota (charged once per idempotency key) → the handler, whose
//! idempotency layer runs after all of these.

pub mod access;
pub mod meter;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bursar_domain::pricing::Period;
use bursar_domain::{AccountId, Timestamp};
use bursar_limits::{Check, FailMode, Limiter, LocalConfig, Outcome, Policy, PolicyState};
use bursar_storage::{ApiKeyRecord, QuotaCharge, QuotaOutcome, Storage};
use ipnet::IpNet;

use crate::config::{Config, PlanConfig};

/// How long a revoked key id stays refused from this instance's cache (longer than the key
/// cache's 5 s, so a stale entry filled during a revoke can never be used).
const TOMBSTONE_TTL: Duration = Duration::from_secs(10);

/// Limits of one plan, built once from the configuration.
struct PlanPolicies {
    key: Option<Policy>,
    account: Option<Policy>,
}

/// Everything the request path needs for limits, quotas and metering.
pub struct Product {
    /// Key, account and per-IP rates: shared through Redis when configured.
    limiter: Limiter,
    /// Failed authentications per IP: always in-process, so refusing a malformed key needs no
    /// I/O at all (spec checklist 2); with N instances a guesser gets N× the per-IP budget.
    auth_failures: Limiter,
    ip: Option<Policy>,
    auth: Option<Policy>,
    plans: std::collections::HashMap<String, PlanPolicies>,
    pub trusted: Vec<IpNet>,
    pub meter: Arc<meter::Meter>,
    /// Key ids revoked recently, refused even if a cache still holds them.
    tombstones: moka::sync::Cache<i64, ()>,
    /// Redis pub/sub for key invalidations, when Redis is configured.
    bus: Option<Bus>,
    /// Per rate-limit identity (`limit_id`): whether its last shared check left at least a tenth
    /// of every policy's burst. Only such keys have reads run while their check is on the wire
    /// (see [`Product::speculate`]); cleared when it grows past `OPEN_BUDGETS_MAX` entries,
    /// which only makes the next requests check first.
    open_budgets: std::sync::Mutex<std::collections::HashMap<i64, bool>>,
    /// Reads whose rate check ran alongside the handler (also `ratelimit_overlapped_reads_total`).
    overlapped: std::sync::atomic::AtomicU64,
}

/// Bound on `Product::open_budgets`; past it the hints are dropped, not the limits.
const OPEN_BUDGETS_MAX: usize = 10_000;

/// A read whose rate check runs while the handler does (see [`Product::speculate`]): settled
/// by the request-context layer once the handler has answered.
pub struct PendingRates {
    pub task: tokio::task::JoinHandle<Result<Limits, Refusal>>,
    /// The states of the checks already decided (the per-IP limit), to send with the key's.
    pub front: Limits,
    /// Set only if the check allows, so a refused read is neither metered nor charged.
    pub billing: Billing,
}

impl std::fmt::Debug for PendingRates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingRates").finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct Bus {
    client: redis::Client,
    publisher: redis::aio::ConnectionManager,
    channel: String,
}

/// What the request path learned, for the response headers and the after-response work.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    pub states: Vec<PolicyState>,
    /// `Bursar-Rate-Limited-Reason` of a 429.
    pub reason: Option<&'static str>,
}

impl Limits {
    pub fn policy_header(&self) -> Option<String> {
        (!self.states.is_empty()).then(|| bursar_limits::policy_header(&self.states))
    }

    pub fn ratelimit_header(&self) -> Option<String> {
        (!self.states.is_empty()).then(|| bursar_limits::ratelimit_header(&self.states))
    }
}

/// A request that passed every limit: what to meter, and the quota charge to give back if
/// Bursar fails it (5xx).
pub struct Billing {
    pub product: Arc<Product>,
    pub store: Arc<dyn Storage>,
    pub account: AccountId,
    pub key_id: i64,
    pub class: &'static str,
    pub at: Timestamp,
    pub charge: Option<QuotaCharge>,
}

impl std::fmt::Debug for Billing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Billing")
            .field("account", &self.account)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Billing {
    /// Runs after the response: meters a counted answer, refunds the quota of a 5xx.
    /// Replays are neither metered nor charged (their first answer was).
    pub fn finish(&self, status: u16, replayed: bool) {
        if status >= 500 {
            if let Some(charge) = self.charge.clone() {
                let store = self.store.clone();
                tokio::spawn(async move {
                    if let Err(e) = store.refund_quota(&charge).await {
                        tracing::warn!(error = %e, "could not give back the quota of a failed request");
                    }
                });
            }
            return;
        }
        if !replayed && status != 401 && status != 403 {
            self.product
                .meter
                .record(self.account, self.key_id, self.class, self.at);
        }
    }
}

/// Why a request is refused before its handler.
pub enum Refusal {
    /// 429: the policies that denied, the states for the headers, the reason, Retry-After.
    Limited {
        limits: Limits,
        violated: Vec<String>,
        retry_after: u64,
        quota: bool,
    },
    /// 503: the limiter store is down and the fail mode is closed, or the quota store failed.
    Unavailable,
}

fn policy(name: &str, limit: u32, window_secs: u64) -> Option<Policy> {
    (limit > 0).then(|| Policy::new(name, limit, Duration::from_secs(window_secs.max(1))))
}

impl Product {
    /// In-process limits only; [`Product::connect_redis`] shares them.
    pub fn new(config: &Config) -> Product {
        let l = &config.limits;
        let local = local_config(l);
        Product {
            limiter: Limiter::local(local.clone()),
            auth_failures: Limiter::local(local),
            ip: policy("ip", l.ip_limit, l.ip_window_secs),
            auth: policy(
                "ip-auth",
                l.auth_failures_limit,
                l.auth_failures_window_secs,
            ),
            plans: config
                .plans
                .iter()
                .map(|(name, p)| (name.clone(), plan_policies(p)))
                .collect(),
            trusted: l
                .trusted_proxies
                .iter()
                .filter_map(|c| c.parse().ok())
                .collect(),
            meter: Arc::new(meter::Meter::default()),
            tombstones: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(TOMBSTONE_TTL)
                .build(),
            bus: None,
            open_budgets: std::sync::Mutex::new(std::collections::HashMap::new()),
            overlapped: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// With `limits.redis_url`: limits shared by every instance through Redis, and key
    /// invalidations broadcast over Redis pub/sub. Succeeds while Redis is down (the limiter
    /// follows its fail mode until Redis answers).
    pub async fn connect_redis(config: &Config) -> anyhow::Result<Product> {
        let mut product = Product::new(config);
        let l = &config.limits;
        let Some(url) = &l.redis_url else {
            return Ok(product);
        };
        let fail = match l.fail_mode {
            crate::config::FailMode::Open => FailMode::Open,
            crate::config::FailMode::Closed => FailMode::Closed,
        };
        let local = local_config(l);
        product.limiter = Limiter::with_redis(
            url,
            &l.redis_key_prefix,
            fail,
            l.instances,
            local,
            Duration::from_millis(l.redis_timeout_ms.max(1)),
        )
        .await?;
        let client = redis::Client::open(url.as_str())?;
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_connection_timeout(Some(Duration::from_millis(500)));
        // Connecting may fail while Redis is down; invalidations then rely on the cache TTL.
        match redis::aio::ConnectionManager::new_with_config(client.clone(), manager_config).await {
            Ok(publisher) => {
                product.bus = Some(Bus {
                    client,
                    publisher,
                    channel: format!("{}:keys:invalidate", l.redis_key_prefix),
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "Redis is unreachable; key revocations reach other instances only through the cache lifetime")
            }
        }
        Ok(product)
    }

    /// Periodic eviction of idle limiter keys.
    pub fn spawn_sweepers(&self) -> Vec<tokio::task::JoinHandle<()>> {
        vec![
            self.limiter.spawn_sweeper(),
            self.auth_failures.spawn_sweeper(),
        ]
    }

    /// Charges the per-IP request policy (if configured), before anything else.
    pub async fn ip_rate(&self, ip: IpAddr) -> Result<Limits, Refusal> {
        let Some(p) = &self.ip else {
            return Ok(Limits::default());
        };
        let check = Check::new(format!("ip:{}", bursar_limits::client_subject(ip))).item(p, "all");
        let outcome = self.limiter.check(&check).await;
        self.decide(outcome, "ip-rate")
    }

    /// Whether the IP still has failed authentications left (a dry run, in-process). Asked
    /// before a key is looked up — not for a key this instance verified moments ago, which
    /// needs no lookup (the common path costs nothing here).
    pub async fn auth_budget(&self, ip: IpAddr) -> Result<(), Refusal> {
        let Some(p) = &self.auth else {
            return Ok(());
        };
        let scope = format!("ip:{}", bursar_limits::client_subject(ip));
        let check = Check::new(scope).item(p, "auth").with_dry_run(true);
        let outcome = self.auth_failures.check(&check).await;
        self.decide(outcome, "ip-auth").map(|_| ())
    }

    /// Charges one failed authentication to the IP.
    pub async fn failed_auth(&self, ip: IpAddr) {
        if let Some(p) = &self.auth {
            let subject = bursar_limits::client_subject(ip);
            let check = Check::new(format!("ip:{subject}")).item(p, "auth");
            let _ = self.auth_failures.check(&check).await;
        }
    }

    /// The key's and the account's rates, all-or-nothing in one check (one Redis round trip,
    /// one hash slot: the account).
    pub async fn rates(&self, key: &ApiKeyRecord, plan: &str) -> Result<Limits, Refusal> {
        let Some(policies) = self.plans.get(plan) else {
            return Ok(Limits::default());
        };
        let mut check = Check::new(format!("a{}", key.account_id));
        if let Some(p) = &policies.key {
            check = check.item(p, format!("key:{}", key.limit_id));
        }
        if let Some(p) = &policies.account {
            check = check.item(p, "account");
        }
        if check.items.is_empty() {
            return Ok(Limits::default());
        }
        let outcome = self.limiter.check(&check).await;
        if self.limiter.is_shared() {
            self.note_budget(key.limit_id, outcome.as_ref().ok());
        }
        let reason = if outcome
            .as_ref()
            .is_ok_and(|o| o.violated_policies().first() == Some(&"account"))
        {
            "tenant-rate"
        } else {
            "key-rate"
        };
        self.decide(outcome, reason)
    }

    /// Whether a read by `key` on `plan` may run its handler while its key and account rates
    /// are decided in Redis, instead of after: the round trip then overlaps the handler's own
    /// work rather than adding to it. The decision is the same either way (a refused read
    /// answers 429 and its result is dropped; it is neither metered nor charged); what changes
    /// is only that a refused read did its work. So only when all of these hold:
    /// - the limits are shared (an in-process check has no round trip to hide);
    /// - the plan has rates and no monthly quota (a quota charge must follow the rate decision);
    /// - this key's last check left at least a tenth of every burst, so a key at or near its
    ///   limit — a client being throttled, or a flood — is checked first and reaches no handler.
    pub fn speculate(&self, key: &ApiKeyRecord, plan_name: &str, plan: &PlanConfig) -> bool {
        let yes = plan.monthly_quota <= 0
            && self.limiter.is_shared()
            && self
                .plans
                .get(plan_name)
                .is_some_and(|p| p.key.is_some() || p.account.is_some())
            && self
                .open_budgets
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key.limit_id)
                .copied()
                .unwrap_or(false);
        if yes {
            self.overlapped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            metrics::counter!("ratelimit_overlapped_reads_total").increment(1);
        }
        yes
    }

    /// How many reads had their rate check run alongside the handler (see `speculate`).
    pub fn overlapped_reads(&self) -> u64 {
        self.overlapped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Remembers whether `limit_id`'s last check left a tenth of every burst (see `speculate`).
    fn note_budget(&self, limit_id: i64, outcome: Option<&Outcome>) {
        let open = outcome.is_some_and(|o| {
            o.allowed
                && !o.degraded
                && o.states
                    .iter()
                    .all(|s| s.remaining * 10 >= u64::from(s.limit))
        });
        let mut budgets = self.open_budgets.lock().unwrap_or_else(|e| e.into_inner());
        if budgets.len() >= OPEN_BUDGETS_MAX && !budgets.contains_key(&limit_id) {
            budgets.clear();
        }
        budgets.insert(limit_id, open);
    }

    fn decide(
        &self,
        outcome: Result<Outcome, bursar_limits::LimitError>,
        reason: &'static str,
    ) -> Result<Limits, Refusal> {
        let outcome = match outcome {
            Ok(o) => o,
            Err(bursar_limits::LimitError::Unavailable) => return Err(Refusal::Unavailable),
            Err(e) => {
                tracing::error!(error = %e, "rate limit check failed");
                return Err(Refusal::Unavailable);
            }
        };
        if outcome.degraded {
            metrics::counter!("ratelimit_degraded_checks_total").increment(1);
        }
        let retry_after = bursar_limits::retry_after_secs(&outcome);
        let violated: Vec<String> = outcome
            .violated_policies()
            .into_iter()
            .map(str::to_owned)
            .collect();
        let limits = Limits {
            states: outcome.states,
            reason: (!outcome.allowed).then_some(reason),
        };
        if outcome.allowed {
            Ok(limits)
        } else {
            metrics::counter!("rate_limited_total", "reason" => reason).increment(1);
            Err(Refusal::Limited {
                limits,
                violated,
                retry_after,
                quota: false,
            })
        }
    }

    /// Charges the monthly quota, if the plan has one. `Ok(None)`: nothing to give back.
    pub async fn quota(
        &self,
        store: &dyn Storage,
        plan: &PlanConfig,
        account: AccountId,
        idempotency_key: Option<&str>,
        now: Timestamp,
        limits: &mut Limits,
    ) -> Result<Option<QuotaCharge>, Refusal> {
        if plan.monthly_quota <= 0 {
            return Ok(None);
        }
        let period = Period::month_of(now);
        let charge = QuotaCharge {
            account_id: account,
            period_start: period.start,
            limit: plan.monthly_quota,
            cost: 1,
            idempotency_key: idempotency_key.map(str::to_owned),
        };
        let outcome = store.charge_quota(&charge).await.map_err(|e| {
            tracing::warn!(error = %e, "quota store failed; refusing (quotas fail closed)");
            Refusal::Unavailable
        })?;
        let until_end = Duration::from_millis(u64::try_from(period.end.0 - now.0).unwrap_or(0));
        let used = match outcome {
            QuotaOutcome::Charged { used }
            | QuotaOutcome::AlreadyCharged { used }
            | QuotaOutcome::Exhausted { used } => used,
        };
        let window =
            Duration::from_millis(u64::try_from(period.end.0 - period.start.0).unwrap_or(0));
        limits.states.push(PolicyState {
            name: "monthly".into(),
            limit: u32::try_from(plan.monthly_quota).unwrap_or(u32::MAX),
            window,
            remaining: u64::try_from(plan.monthly_quota - used).unwrap_or(0),
            reset_after: until_end,
            retry_after: matches!(outcome, QuotaOutcome::Exhausted { .. }).then_some(until_end),
        });
        match outcome {
            QuotaOutcome::Charged { .. } => Ok(Some(charge)),
            QuotaOutcome::AlreadyCharged { .. } => Ok(None),
            QuotaOutcome::Exhausted { .. } => {
                // Up to 10 % later than the reset, so exhausted clients do not all return at
                // the same instant.
                let secs = until_end.as_secs().max(1);
                let jitter = rand::random_range(0..=secs / 10);
                limits.reason = Some("quota-monthly");
                metrics::counter!("quota_exceeded_total").increment(1);
                Err(Refusal::Limited {
                    limits: limits.clone(),
                    violated: vec!["monthly".into()],
                    retry_after: secs + jitter,
                    quota: true,
                })
            }
        }
    }

    /// Whether key `id` was revoked recently (its cached record must not be used).
    pub fn is_tombstoned(&self, id: i64) -> bool {
        self.tombstones.contains_key(&id)
    }

    /// Applies an invalidation on this instance: a revoked key is tombstoned; every cached
    /// record of the key is dropped so the next request reads the database.
    pub fn invalidate_local(&self, keys: &crate::state::KeyCache, id: i64, revoked: bool) {
        if revoked {
            self.tombstones.insert(id, ());
        }
        keys.remove_id(id);
    }

    /// Tells every other instance (after the commit): `revoke:<id>` or `refresh:<id>`.
    pub async fn publish_invalidation(&self, id: i64, revoked: bool) {
        let Some(mut bus) = self.bus.clone() else {
            return;
        };
        let message = format!("{}:{id}", if revoked { "revoke" } else { "refresh" });
        let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(&bus.channel)
            .arg(&message)
            .query_async(&mut bus.publisher)
            .await;
        if let Err(e) = sent {
            tracing::warn!(error = %e, "could not broadcast a key invalidation; other instances drop the key within the cache lifetime");
        }
    }

    /// Listens for other instances' invalidations until aborted, reconnecting after failures.
    pub async fn run_invalidation_listener(self: Arc<Self>, keys: crate::state::KeyCache) {
        let Some(bus) = self.bus.clone() else {
            return;
        };
        loop {
            if let Err(e) = self.listen_once(&bus, &keys).await {
                tracing::warn!(error = %e, "key invalidation channel lost; reconnecting");
            }
            // Whatever was missed meanwhile expires from the cache within its lifetime.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn listen_once(
        &self,
        bus: &Bus,
        keys: &crate::state::KeyCache,
    ) -> redis::RedisResult<()> {
        use futures_util::StreamExt;
        let mut pubsub = bus.client.get_async_pubsub().await?;
        pubsub.subscribe(&bus.channel).await?;
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            let Ok(text) = msg.get_payload::<String>() else {
                continue;
            };
            let parsed = text
                .split_once(':')
                .and_then(|(kind, id)| id.parse::<i64>().ok().map(|id| (kind == "revoke", id)));
            if let Some((revoked, id)) = parsed {
                self.invalidate_local(keys, id, revoked);
            }
        }
        Ok(())
    }
}

/// The in-process store's bounds (single-node limits, the Redis fallback, failed auth).
fn local_config(l: &crate::config::LimitsConfig) -> LocalConfig {
    LocalConfig {
        max_keys: l.max_tracked_keys,
        ..LocalConfig::default()
    }
}

fn plan_policies(p: &PlanConfig) -> PlanPolicies {
    PlanPolicies {
        key: policy("key", p.key_limit, p.key_window_secs),
        account: policy("account", p.account_limit, p.account_window_secs),
    }
}
