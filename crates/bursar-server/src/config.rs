//! Configuration: documented defaults (below, printed by `bursar config print-default`) →
//! optional TOML file → `BURSAR_*` environment → command-line flags. Loaded and validated once
//! at start; the binary does the layering, this module owns the shape and the rules.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Every key with its default and what it is for. A unit test checks it parses to
/// `Config::default()`, so the documentation cannot drift from the code.
pub const DEFAULT_TOML: &str = r#"# Bursar configuration. Every key is optional; these are the defaults.
# Environment variables override the file: BURSAR_LISTEN, BURSAR_DATA_DIR, BURSAR_DATABASE_URL,
# and for nested keys a double underscore, e.g. BURSAR_HTTP__BODY_LIMIT_BYTES.

# Address the HTTP API listens on.
listen = "127.0.0.1:8080"

# Directory of the embedded SQLite database, used when database_url is empty.
data_dir = "./bursar-data"

# Empty: embedded SQLite file <data_dir>/bursar.db.
# "postgres://user:password@host:5432/db": PostgreSQL (shared by many Bursar processes).
# "sqlite:///path/to/file.db": a SQLite file elsewhere.
database_url = ""

[http]
# Largest accepted request body in bytes; larger bodies get 413 payload_too_large.
body_limit_bytes = 1048576
# Time limit for one request; past it the answer is 503 request_timeout.
request_timeout_ms = 30000
# On SIGTERM / Ctrl-C, how long in-flight requests may take to finish.
shutdown_grace_ms = 10000

[database]
# Pool size (PostgreSQL, plus up to 2 sessions of the webhook worker's completer) or
# read-pool size capped at 8 (SQLite, which always has one writer).
max_connections = 16
# How long a request waits for a pooled connection before 503 service_unavailable.
acquire_timeout_ms = 5000
# SQLite: how long a writer waits for the file lock.
busy_timeout_ms = 5000
# PostgreSQL: schema to use (created if missing); empty means the server's search_path.
schema = ""

[idempotency]
# How long a key's record (and the response stored with it) lasts; a retry after that runs as
# a new request. Expired records count as absent at once and are deleted in the background.
retention_hours = 24
# How often expired records are deleted (in batches of 1000).
sweep_interval_secs = 60
# Routes that refuse requests without Idempotency-Key (400 idempotency_key_missing), written
# as "METHOD /template", e.g. ["POST /api/orders"]. By default the key is optional.
required_routes = []
# Work that leaves the database (a payment processor call) runs under a lease: a retry while
# it lives gets 409 idempotency_request_in_progress; a lapsed lease (a crashed instance) is
# taken over by the next retry or by the completer.
lease_secs = 90
# How often the completer looks for abandoned work, and how long work must have been idle
# before it is picked up.
completer_interval_secs = 10
completer_idle_secs = 30
# After this many runs, abandoned work is given up and its final (failure) answer stored.
max_attempts = 10

[processor]
# The payment processor's URL. Empty: `bursar serve` runs the sandbox processor inside the
# process (test mode: test cards only, nothing is really charged).
url = ""
# Each call's time limit, and how many attempts a call gets (timeouts, connection errors and
# 5xx are retried with the same idempotency key).
timeout_ms = 10000
attempts = 3

[fx]
# Market rates as JSON, loaded at start: {"rates": [{"base": "USD", "quote": "EUR",
# "rate": "0.92"}]}. Empty: use the rates already stored (`bursar admin rates load FILE`).
rates_file = ""
# Taken off the market rate in every quote, in basis points (50 = 0.5 %).
spread_bps = 50
# How long a quote's rate is locked, in seconds.
quote_ttl_secs = 60

[webhooks]
# Run the event relay and the webhook delivery worker inside `bursar serve` (`bursar worker`
# runs them alone; any number of either may share one database).
run_workers = true
# Addresses webhook URLs may resolve to although they are private, loopback or link-local,
# as CIDRs, e.g. ["127.0.0.0/8"] for local development (`--webhook-allow-cidr`). Every other
# non-public address is refused when the endpoint is created and again at connect time.
allow_cidrs = []
# Require https:// URLs. Unset (the default): required unless allow_cidrs is set, i.e. in
# local development.
# require_https = true
# The key that encrypts endpoint secrets at rest: 32 bytes, base64. Empty: a key file
# <data_dir>/webhook-secrets.key is created on first use. Instances sharing a database must
# share the key.
encryption_key = ""
# Delays before attempts 2, 3, … in seconds (±20 % jitter); after the last, a delivery fails.
schedule_secs = [5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400]
# After a timeout, 429, 502 or 504, the next attempt waits at least this long.
overload_floor_secs = 60
# Each delivery attempt's time limit.
timeout_ms = 15000
# A claimed delivery's lease; a worker that dies mid-send loses it after this long.
lease_secs = 90
# How often the relay and the worker look for work when idle.
poll_interval_ms = 25
# Deliveries in flight per process.
concurrency = 128
# How long a rotated-out secret keeps signing deliveries.
rotation_grace_secs = 86400
# Circuit breaker per endpoint: this many failed attempts in a row open it; while open its
# deliveries wait (without spending attempts); after the cooldown one probe goes out: success
# closes it and sends the backlog at once, failure reopens it.
circuit_failure_threshold = 5
circuit_cooldown_secs = 60
# An endpoint whose attempts have all failed for longer than this (no 2xx in between) is
# disabled, with a webhook.endpoint.disabled event. 432000 s = 5 days.
disable_after_secs = 432000
# Finished deliveries (succeeded, failed, cancelled) and their attempts are deleted this many
# days after their last change, in batches of at most 1000 rows, every purge_interval_secs.
# Pending and retrying deliveries are never deleted; events stay in the log.
retention_days = 30
purge_interval_secs = 3600

[live]
# Events this process keeps for its live subscribers (SSE and WebSocket). A subscriber that
# falls further behind is disconnected and resumes from the log with its last seq.
buffer = 4096
# How often an idle stream gets a keep-alive: an SSE comment or a WebSocket ping.
keep_alive_secs = 15
# The reconnect delay SSE clients are told (the `retry:` field), in milliseconds.
retry_ms = 3000

[nats]
# NATS server with JetStream, e.g. "nats://127.0.0.1:4222" (`--nats-url`). Set: every event is
# published to <subject_prefix>.events.<account>.<type> (Nats-Msg-Id = the event id), and
# live subscribers see events from every instance. Empty: no publishing, and live
# subscribers see the events this process sequenced (one instance, or a resume from the log).
url = ""
# First subject token. The stream is named after it: upper-cased, with "_EVENTS" appended.
subject_prefix = "bursar"
# How long JetStream remembers a Nats-Msg-Id to drop a re-published copy.
duplicate_window_secs = 120
# How long the stream keeps events (0: until removed by other limits).
max_age_secs = 604800

[limits]
# The plan of accounts that have none (`bursar admin accounts set-plan` gives one).
default_plan = "default"
# Redis shared by every instance for the short-window limits (`--redis-url`), e.g.
# "redis://127.0.0.1:6379". Empty: each instance limits in-process.
redis_url = ""
# First part of every Redis key Bursar writes.
redis_key_prefix = "bursar"
# Redis unreachable or slower than redis_timeout_ms: "open" answers from the in-process limiter
# with every limit divided by `instances` (a warning and the ratelimit_fallback_total metric);
# "closed" answers 503 with Retry-After.
fail_mode = "open"
instances = 1
redis_timeout_ms = 50
# Requests per client IP, before authentication (0: no per-IP limit), per ip_window_secs.
ip_limit = 0
ip_window_secs = 1
# Failed authentications per client IP (IPv6 by /64) before it gets 429 ip-auth, per
# auth_failures_window_secs.
auth_failures_limit = 20
auth_failures_window_secs = 60
# Peers whose X-Forwarded-For is believed, as CIDRs; the right-most address that is not one of
# them is the client. Empty: the TCP peer is the client.
trusted_proxies = []
# Keys the in-process limiter tracks at most (idle ones are dropped first).
max_tracked_keys = 1000000

[metering]
# How often metered usage is written to the database (it is counted in memory in between, and
# flushed on shutdown).
flush_interval_ms = 1000

# Plans, by name. Rates: `*_limit` requests per `*_window_secs` (also the burst); 0 means no
# limit. `monthly_quota`: requests per calendar month (UTC), 0 for none. A plan may price usage:
# [plans.NAME.price] mode = "graduated" | "volume", included_units = N,
# tiers = [{ up_to = 1000, unit_amount = "0.10" }, …, { unit_amount = "0.01" }].
[plans.default]
key_limit = 0
key_window_secs = 1
account_limit = 0
account_window_secs = 1
monthly_quota = 0
currency = "USD"
base_fee = "0.00"

[log]
# "json": one JSON object per line on stderr. "pretty": human-readable.
format = "json"
# A tracing filter directive, e.g. "info" or "bursar_server=debug,info".
level = "info"
"#;

#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub database_url: String,
    pub http: HttpConfig,
    pub database: DatabaseConfig,
    pub idempotency: IdempotencyConfig,
    pub processor: ProcessorConfig,
    pub fx: FxConfig,
    pub webhooks: WebhooksConfig,
    pub live: LiveConfig,
    pub nats: NatsConfig,
    pub limits: LimitsConfig,
    pub metering: MeteringConfig,
    pub plans: BTreeMap<String, PlanConfig>,
    pub log: LogConfig,
}

/// Rate limits around the plans (spec `api-product.md` §2.2). `Debug` hides the Redis URL's
/// credentials.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub default_plan: String,
    #[serde(deserialize_with = "empty_as_none")]
    pub redis_url: Option<String>,
    pub redis_key_prefix: String,
    pub fail_mode: FailMode,
    pub instances: u32,
    pub redis_timeout_ms: u64,
    pub ip_limit: u32,
    pub ip_window_secs: u64,
    pub auth_failures_limit: u32,
    pub auth_failures_window_secs: u64,
    pub trusted_proxies: Vec<String>,
    pub max_tracked_keys: usize,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    Open,
    Closed,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            default_plan: "default".into(),
            redis_url: None,
            redis_key_prefix: "bursar".into(),
            fail_mode: FailMode::Open,
            instances: 1,
            redis_timeout_ms: 50,
            ip_limit: 0,
            ip_window_secs: 1,
            auth_failures_limit: 20,
            auth_failures_window_secs: 60,
            trusted_proxies: Vec::new(),
            max_tracked_keys: 1_000_000,
        }
    }
}

impl std::fmt::Debug for LimitsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimitsConfig")
            .field("default_plan", &self.default_plan)
            .field("redis_url", &self.redis_url.clone().map(redact_password))
            .field("fail_mode", &self.fail_mode)
            .field("instances", &self.instances)
            .finish_non_exhaustive()
    }
}

/// Usage metering.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MeteringConfig {
    pub flush_interval_ms: u64,
}

impl MeteringConfig {
    pub fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.flush_interval_ms.max(10))
    }
}

impl Default for MeteringConfig {
    fn default() -> Self {
        MeteringConfig {
            flush_interval_ms: 1000,
        }
    }
}

/// One plan: limits, monthly quota and price.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PlanConfig {
    pub key_limit: u32,
    pub key_window_secs: u64,
    pub account_limit: u32,
    pub account_window_secs: u64,
    pub monthly_quota: i64,
    pub currency: String,
    pub base_fee: rust_decimal::Decimal,
    pub price: Option<bursar_domain::pricing::UsagePrice>,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            key_limit: 0,
            key_window_secs: 1,
            account_limit: 0,
            account_window_secs: 1,
            monthly_quota: 0,
            currency: "USD".into(),
            base_fee: rust_decimal::Decimal::ZERO,
            price: None,
        }
    }
}

/// Live streams (SSE, WebSocket).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LiveConfig {
    pub buffer: usize,
    pub keep_alive_secs: u64,
    pub retry_ms: u64,
}

impl Default for LiveConfig {
    fn default() -> Self {
        LiveConfig {
            buffer: 4096,
            keep_alive_secs: 15,
            retry_ms: 3000,
        }
    }
}

impl LiveConfig {
    pub fn keep_alive(&self) -> Duration {
        Duration::from_secs(self.keep_alive_secs.max(1))
    }
}

/// NATS JetStream publishing and the cross-instance live tail. `Debug` hides the URL's
/// credentials, if any.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    #[serde(deserialize_with = "empty_as_none")]
    pub url: Option<String>,
    pub subject_prefix: String,
    pub duplicate_window_secs: u64,
    pub max_age_secs: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: None,
            subject_prefix: "bursar".into(),
            duplicate_window_secs: 120,
            max_age_secs: 604_800,
        }
    }
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &self.url.clone().map(redact_password))
            .field("subject_prefix", &self.subject_prefix)
            .field("duplicate_window_secs", &self.duplicate_window_secs)
            .field("max_age_secs", &self.max_age_secs)
            .finish()
    }
}

impl NatsConfig {
    /// The URL for banners and logs: a password in it is masked.
    pub fn redacted_url(&self) -> String {
        self.url.clone().map(redact_password).unwrap_or_default()
    }

    /// The JetStream stream: the prefix upper-cased, then `_EVENTS`.
    pub fn stream_name(&self) -> String {
        format!("{}_EVENTS", self.subject_prefix.to_ascii_uppercase())
    }
}

/// Events and webhook delivery (issue 5). `Debug` masks the encryption key.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    pub run_workers: bool,
    pub allow_cidrs: Vec<String>,
    /// `None`: required unless `allow_cidrs` is set.
    pub require_https: Option<bool>,
    #[serde(deserialize_with = "empty_as_none")]
    pub encryption_key: Option<String>,
    pub schedule_secs: Vec<u64>,
    pub overload_floor_secs: u64,
    pub timeout_ms: u64,
    pub lease_secs: u64,
    pub poll_interval_ms: u64,
    pub concurrency: usize,
    pub rotation_grace_secs: u64,
    /// Failed attempts in a row that open an endpoint's circuit.
    pub circuit_failure_threshold: u32,
    /// How long an open circuit holds deliveries back before it lets one probe through.
    pub circuit_cooldown_secs: u64,
    /// Failing with no success for longer than this disables an endpoint.
    pub disable_after_secs: u64,
    /// Finished deliveries and their attempts are deleted this long after their last change.
    pub retention_days: u64,
    /// How often the purge runs.
    pub purge_interval_secs: u64,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            run_workers: true,
            allow_cidrs: Vec::new(),
            require_https: None,
            encryption_key: None,
            schedule_secs: vec![5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400],
            overload_floor_secs: 60,
            timeout_ms: 15_000,
            lease_secs: 90,
            poll_interval_ms: 25,
            concurrency: 128,
            rotation_grace_secs: 86_400,
            circuit_failure_threshold: 5,
            circuit_cooldown_secs: 60,
            disable_after_secs: 432_000,
            retention_days: 30,
            purge_interval_secs: 3600,
        }
    }
}

impl std::fmt::Debug for WebhooksConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhooksConfig")
            .field("run_workers", &self.run_workers)
            .field("allow_cidrs", &self.allow_cidrs)
            .field("require_https", &self.require_https)
            .field(
                "encryption_key",
                &self.encryption_key.as_ref().map(|_| "<set>"),
            )
            .field("schedule_secs", &self.schedule_secs)
            .field("timeout_ms", &self.timeout_ms)
            .field("lease_secs", &self.lease_secs)
            .field("circuit_failure_threshold", &self.circuit_failure_threshold)
            .field("circuit_cooldown_secs", &self.circuit_cooldown_secs)
            .field("disable_after_secs", &self.disable_after_secs)
            .finish_non_exhaustive()
    }
}

impl WebhooksConfig {
    /// How long finished deliveries are kept.
    pub fn retention(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.retention_days.saturating_mul(86_400))
    }

    pub fn purge_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.purge_interval_secs.max(1))
    }

    pub fn https_required(&self) -> bool {
        self.require_https.unwrap_or(self.allow_cidrs.is_empty())
    }

    /// The endpoint health rules every completion applies.
    pub fn health_policy(&self) -> bursar_storage::events::HealthPolicy {
        let ms = |secs: u64| i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        bursar_storage::events::HealthPolicy {
            breaker_threshold: i64::from(self.circuit_failure_threshold.max(1)),
            cooldown_ms: ms(self.circuit_cooldown_secs),
            disable_after_ms: ms(self.disable_after_secs),
            ..bursar_storage::events::HealthPolicy::default()
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct IdempotencyConfig {
    pub retention_hours: u64,
    pub sweep_interval_secs: u64,
    pub required_routes: Vec<String>,
    pub lease_secs: u64,
    pub completer_interval_secs: u64,
    pub completer_idle_secs: u64,
    pub max_attempts: i64,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig {
            retention_hours: 24,
            sweep_interval_secs: 60,
            required_routes: Vec::new(),
            lease_secs: 90,
            completer_interval_secs: 10,
            completer_idle_secs: 30,
            max_attempts: 10,
        }
    }
}

impl IdempotencyConfig {
    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.retention_hours.saturating_mul(3600))
    }

    pub fn sweep_interval(&self) -> Duration {
        Duration::from_secs(self.sweep_interval_secs.max(1))
    }

    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_secs.max(1))
    }

    pub fn completer_interval(&self) -> Duration {
        Duration::from_secs(self.completer_interval_secs.max(1))
    }

    pub fn completer_idle(&self) -> Duration {
        Duration::from_secs(self.completer_idle_secs)
    }

    /// Whether `METHOD route` must carry a key.
    pub fn requires(&self, method: &str, route: &str) -> bool {
        self.required_routes
            .iter()
            .any(|r| r.split_once(' ') == Some((method, route)))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub body_limit_bytes: usize,
    pub request_timeout_ms: u64,
    pub shutdown_grace_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
    pub busy_timeout_ms: u64,
    #[serde(deserialize_with = "empty_as_none")]
    pub schema: Option<String>,
}

/// Where payments go (issue 4). See `processor` for the client.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProcessorConfig {
    /// `None`: run the sandbox processor in-process (test mode).
    #[serde(deserialize_with = "empty_as_none")]
    pub url: Option<String>,
    pub timeout_ms: u64,
    pub attempts: u32,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        ProcessorConfig {
            url: None,
            timeout_ms: 10_000,
            attempts: 3,
        }
    }
}

/// Currency conversions (issue 4, item 4).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FxConfig {
    /// A JSON file of market rates, loaded into the database at start (and by
    /// `bursar admin rates load`): `{"rates": [{"base": "USD", "quote": "EUR", "rate":
    /// "0.92"}]}`. Empty: the rates already stored are used.
    #[serde(deserialize_with = "empty_as_none")]
    pub rates_file: Option<String>,
    /// Taken off the market rate in every quote, in basis points (50 = 0.5 %).
    pub spread_bps: u32,
    /// How long a quote's rate is locked.
    pub quote_ttl_secs: u64,
}

impl Default for FxConfig {
    fn default() -> Self {
        FxConfig {
            rates_file: None,
            spread_bps: 50,
            quote_ttl_secs: 60,
        }
    }
}

impl ProcessorConfig {
    pub fn retry_policy(&self) -> crate::processor::RetryPolicy {
        crate::processor::RetryPolicy {
            attempts: self.attempts,
            timeout: Duration::from_millis(self.timeout_ms),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

/// `scheme://user:***@host…`: the password of a URL masked, the rest kept for debugging.
impl Config {
    fn validate_plans(&self) -> Result<(), String> {
        if !self.plans.contains_key(&self.limits.default_plan) {
            return Err(format!(
                "limits.default_plan {:?} is not one of the [plans]",
                self.limits.default_plan
            ));
        }
        for (name, plan) in &self.plans {
            let currency = bursar_domain::Currency::from_code(&plan.currency)
                .ok_or_else(|| format!("plans.{name}.currency {:?} is unknown", plan.currency))?;
            if plan.key_window_secs == 0 || plan.account_window_secs == 0 {
                return Err(format!("plans.{name}: window_secs must be at least 1"));
            }
            if plan.monthly_quota < 0 || plan.base_fee.is_sign_negative() {
                return Err(format!("plans.{name}: quota and fee must not be negative"));
            }
            if plan.base_fee.normalize().scale() > u32::from(currency.minor_units()) {
                return Err(format!(
                    "plans.{name}.base_fee has more decimals than {currency}"
                ));
            }
            if let Some(price) = &plan.price {
                price
                    .validate(currency)
                    .map_err(|e| format!("plans.{name}.price: {e}"))?;
            }
        }
        if self.limits.ip_window_secs == 0 || self.limits.auth_failures_window_secs == 0 {
            return Err("limits: window_secs must be at least 1".into());
        }
        if let Some(bad) = self
            .limits
            .trusted_proxies
            .iter()
            .find(|c| c.parse::<ipnet::IpNet>().is_err())
        {
            return Err(format!("limits.trusted_proxies: {bad:?} is not a CIDR"));
        }
        Ok(())
    }

    /// The plan called `name`, or the default plan when `name` is `None` or unknown (a plan
    /// removed from the configuration falls back rather than locking its accounts out).
    pub fn plan(&self, name: Option<&str>) -> (&str, &PlanConfig) {
        name.and_then(|n| self.plans.get_key_value(n))
            .or_else(|| self.plans.get_key_value(&self.limits.default_plan))
            .map(|(k, v)| (k.as_str(), v))
            .expect("validate() checked that the default plan exists")
    }
}

fn redact_password(url: String) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url,
            }
        }
        _ => url,
    }
}

fn empty_as_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    Ok(s.filter(|s| !s.is_empty()))
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./bursar-data"),
            database_url: String::new(),
            http: HttpConfig::default(),
            database: DatabaseConfig::default(),
            idempotency: IdempotencyConfig::default(),
            processor: ProcessorConfig::default(),
            fx: FxConfig::default(),
            webhooks: WebhooksConfig::default(),
            live: LiveConfig::default(),
            nats: NatsConfig::default(),
            limits: LimitsConfig::default(),
            metering: MeteringConfig::default(),
            plans: BTreeMap::from([("default".to_owned(), PlanConfig::default())]),
            log: LogConfig::default(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            body_limit_bytes: 1024 * 1024,
            request_timeout_ms: 30_000,
            shutdown_grace_ms: 10_000,
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            max_connections: 16,
            acquire_timeout_ms: 5_000,
            busy_timeout_ms: 5_000,
            schema: None,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Json,
            level: "info".into(),
        }
    }
}

/// The database URL may carry a password, so `Debug` shows it redacted.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("database_url", &self.redacted_database_url())
            .field("http", &self.http)
            .field("database", &self.database)
            .field("idempotency", &self.idempotency)
            .field("processor_url", &self.redacted_processor_url())
            .field("fx", &self.fx)
            .field("webhooks", &self.webhooks)
            .field("live", &self.live)
            .field("nats", &self.nats)
            .field("log", &self.log)
            .finish()
    }
}

impl Config {
    /// Rejects values that would only fail later, at an awkward moment.
    pub fn validate(&self) -> Result<(), String> {
        self.validate_plans()?;
        let url = &self.database_url;
        if !(url.is_empty()
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://")
            || url.starts_with("sqlite:"))
        {
            return Err("database_url must be empty, postgres://… or sqlite:…".into());
        }
        if self.http.body_limit_bytes < 1024 {
            return Err("http.body_limit_bytes must be at least 1024".into());
        }
        if self.idempotency.retention_hours == 0 {
            return Err("idempotency.retention_hours must be at least 1".into());
        }
        if self.idempotency.lease_secs == 0 || self.idempotency.max_attempts < 1 {
            return Err(
                "idempotency.lease_secs and idempotency.max_attempts must be at least 1".into(),
            );
        }
        if let Some(url) = &self.processor.url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(format!("processor.url must be an http(s) URL, got {url:?}"));
        }
        if self.fx.spread_bps >= 10_000 || self.fx.quote_ttl_secs == 0 {
            return Err("fx.spread_bps must be below 10000 and fx.quote_ttl_secs above 0".into());
        }
        if self.processor.attempts == 0 || self.processor.timeout_ms == 0 {
            return Err("processor.attempts and processor.timeout_ms must be at least 1".into());
        }
        if let Some(bad) = self.idempotency.required_routes.iter().find(
            |r| !matches!(r.split_once(' '), Some((m, t)) if !m.is_empty() && t.starts_with('/')),
        ) {
            return Err(format!(
                "idempotency.required_routes: {bad:?} is not \"METHOD /route\""
            ));
        }
        let prefix = &self.nats.subject_prefix;
        if prefix.is_empty()
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(format!(
                "nats.subject_prefix must be letters, digits, '_' or '-', got {prefix:?}"
            ));
        }
        if let Some(url) = &self.nats.url
            && !(url.starts_with("nats://") || url.starts_with("tls://"))
        {
            return Err("nats.url must be nats://… or tls://…".into());
        }
        if self.live.buffer == 0 {
            return Err("live.buffer must be at least 1".into());
        }
        if self.webhooks.circuit_failure_threshold == 0 {
            return Err("webhooks.circuit_failure_threshold must be at least 1".into());
        }
        if self.http.request_timeout_ms == 0 || self.database.max_connections == 0 {
            return Err("http.request_timeout_ms and database.max_connections must be > 0".into());
        }
        Ok(())
    }

    pub fn default_sqlite_url(&self) -> String {
        format!("sqlite://{}", self.data_dir.join("bursar.db").display())
    }

    pub fn effective_database_url(&self) -> String {
        if self.database_url.is_empty() {
            self.default_sqlite_url()
        } else {
            self.database_url.clone()
        }
    }

    /// The database URL with any password replaced, for logs and start-up messages.
    pub fn redacted_database_url(&self) -> String {
        redact_password(self.effective_database_url())
    }

    /// The processor URL for banners and logs: a password in it is masked.
    pub fn redacted_processor_url(&self) -> Option<String> {
        self.processor.url.clone().map(redact_password)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.http.request_timeout_ms)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.http.shutdown_grace_ms)
    }
}

impl DatabaseConfig {
    pub fn acquire_timeout(&self) -> Duration {
        Duration::from_millis(self.acquire_timeout_ms)
    }

    pub fn busy_timeout(&self) -> Duration {
        Duration::from_millis(self.busy_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_defaults_are_the_real_defaults() {
        let parsed: Config = toml::from_str(DEFAULT_TOML).unwrap();
        assert_eq!(parsed, Config::default());
        parsed.validate().unwrap();
    }

    #[test]
    fn unknown_keys_and_bad_urls_are_refused() {
        assert!(toml::from_str::<Config>("lisen = \"x\"").is_err());
        let c = Config {
            database_url: "mysql://x".into(),
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn passwords_never_reach_messages() {
        let c = Config {
            database_url: "postgres://app:s3cret@db:5432/bursar".into(),
            processor: ProcessorConfig {
                url: Some("https://acct:pr0cess@psp.example/v1".into()),
                ..ProcessorConfig::default()
            },
            ..Config::default()
        };
        assert_eq!(
            c.redacted_database_url(),
            "postgres://app:***@db:5432/bursar"
        );
        assert_eq!(
            c.redacted_processor_url().as_deref(),
            Some("https://acct:***@psp.example/v1")
        );
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("pr0cess"),
            "{shown}"
        );
    }
}
