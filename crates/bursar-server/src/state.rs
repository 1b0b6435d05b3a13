//! Shared state handed to every handler.

use std::sync::Arc;
use std::time::Duration;

use bursar_domain::{AccountId, Clock, Timestamp};
use bursar_storage::{ApiKeyRecord, IdempotencyRecord, Storage};

use crate::Config;
use crate::services::operations::Operations;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Storage>,
    pub clock: Arc<dyn Clock>,
    pub config: Arc<Config>,
    /// Verified keys by hash, so most requests authenticate without a database read.
    pub keys: KeyCache,
    /// Completed idempotency records, which never change until they expire: replays are
    /// answered from here without a database read. Correctness never depends on it — a miss
    /// reads the database, and every hit is re-checked against the record's expiry.
    pub replays: ReplayCache,
    /// A crash to stage at a named point, for the crash-recovery tests. Always `None` unless
    /// the operator sets `BURSAR_TEST_FAULT`; nothing else enables it.
    pub fault: Option<FaultPoint>,
    /// Work that leaves the database, by route (`services::operations`); each one mounts
    /// `POST <route>`, and the completer finishes its abandoned runs.
    pub operations: Arc<Operations>,
    /// The payment processor (`processor`), once `serve` has set one up: the configured URL,
    /// or the sandbox running in-process.
    pub processor: Option<Arc<dyn crate::processor::Processor>>,
    /// Event relay, webhook worker and endpoint secrets (`webhooks`).
    pub webhooks: Arc<crate::webhooks::Webhooks>,
    /// The live tail for SSE and WebSocket subscribers (`live`).
    pub live: Arc<crate::live::Live>,
    /// NATS JetStream, when configured ([`AppState::connect_nats`]).
    pub nats: Option<Arc<crate::live::nats::Link>>,
    /// Rate limits, quotas, metering and key invalidation (`product`); shared through Redis
    /// once [`AppState::connect_redis`] ran with `limits.redis_url` set.
    pub product: Arc<crate::product::Product>,
}

/// See [`AppState::replays`]. Keyed by account and client key; bounded by the bytes of the
/// stored responses it holds.
#[derive(Clone)]
pub struct ReplayCache(moka::sync::Cache<(AccountId, String), Arc<IdempotencyRecord>>);

impl ReplayCache {
    /// At most this many bytes of stored responses are kept in memory.
    pub const MAX_BYTES: u64 = 64 * 1024 * 1024;
    /// An entry is dropped after this long even if its record lives on (memory, not safety).
    pub const TTL: Duration = Duration::from_secs(600);

    pub fn new() -> ReplayCache {
        ReplayCache(
            moka::sync::Cache::builder()
                .max_capacity(Self::MAX_BYTES)
                .weigher(
                    |(_, key): &(AccountId, String), r: &Arc<IdempotencyRecord>| {
                        let headers: usize = r
                            .response
                            .headers
                            .iter()
                            .map(|(n, v)| n.len() + v.len())
                            .sum();
                        u32::try_from(r.response.body.len() + headers + key.len() + 128)
                            .unwrap_or(u32::MAX)
                    },
                )
                .time_to_live(Self::TTL)
                .build(),
        )
    }

    /// The record, if cached and still live at `now`.
    pub fn get(
        &self,
        account: AccountId,
        key: &str,
        now: Timestamp,
    ) -> Option<Arc<IdempotencyRecord>> {
        self.0
            .get(&(account, key.to_owned()))
            .filter(|r| r.expires_at > now)
    }

    pub fn insert(&self, account: AccountId, key: String, record: Arc<IdempotencyRecord>) {
        self.0.insert((account, key), record);
    }
}

impl Default for ReplayCache {
    fn default() -> Self {
        ReplayCache::new()
    }
}

/// Where a staged crash happens (`BURSAR_TEST_FAULT=<name>`). The process aborts on the spot —
/// no unwinding, no flushing, like a `kill -9` — so tests can show that a crash at that
/// instant loses no committed write and repeats none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// While an idempotent create's response is rendered, before anything commits: inside
    /// the transaction after the writes (SQLite, and PostgreSQL's lone-create path), or just
    /// before PostgreSQL's one-statement batch is sent (which renders responses first).
    MidTransaction,
    /// After an idempotent create committed, before its response is written.
    AfterCommit,
}

impl FaultPoint {
    pub fn parse(name: &str) -> Option<FaultPoint> {
        match name {
            "mid_transaction" => Some(FaultPoint::MidTransaction),
            "after_commit" => Some(FaultPoint::AfterCommit),
            _ => None,
        }
    }
}

impl AppState {
    /// Aborts the process if `point` is the staged fault.
    pub fn crash_if(&self, point: FaultPoint) {
        if self.fault == Some(point) {
            eprintln!("BURSAR_TEST_FAULT: aborting at {point:?}");
            std::process::abort();
        }
    }
}

/// Per-instance cache of key lookups (spec `api-product.md`: parse → checksum → cache with a
/// TTL of at most 5 s → database). Only keys that exist are cached, so a key created a moment
/// ago is never refused. A revoke or roll drops the key's entries on every instance (the
/// broadcast in `product`); if that message is lost, the TTL bounds how long a stale entry lives,
/// and a revoked key's id is tombstoned so a cache fill racing the revoke cannot revive it.
#[derive(Clone)]
pub struct KeyCache(moka::sync::Cache<String, ApiKeyRecord>);

impl KeyCache {
    pub const TTL: Duration = Duration::from_secs(5);

    pub fn new() -> KeyCache {
        KeyCache(
            moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Self::TTL)
                .build(),
        )
    }

    pub fn get(&self, key_hash: &str) -> Option<ApiKeyRecord> {
        self.0.get(key_hash)
    }

    pub fn insert(&self, key_hash: String, record: ApiKeyRecord) {
        self.0.insert(key_hash, record);
    }

    /// Drops every entry of key `id` (entries are keyed by hash; revocations name the id).
    pub fn remove_id(&self, id: i64) {
        for (hash, record) in self.0.iter() {
            if record.id == id {
                self.0.invalidate(hash.as_str());
            }
        }
    }
}

impl Default for KeyCache {
    fn default() -> Self {
        KeyCache::new()
    }
}

impl AppState {
    /// Fails on a bad webhook configuration (allow-list, encryption key).
    pub fn new(
        store: Arc<dyn Storage>,
        clock: Arc<dyn Clock>,
        config: Config,
    ) -> anyhow::Result<AppState> {
        let webhooks = Arc::new(crate::webhooks::Webhooks::from_config(&config)?);
        let live = Arc::new(crate::live::Live::new(config.live.buffer));
        let product = Arc::new(crate::product::Product::new(&config));
        Ok(AppState {
            store,
            clock,
            config: Arc::new(config),
            keys: KeyCache::new(),
            replays: ReplayCache::new(),
            fault: None,
            operations: Arc::new(Operations::money()),
            processor: None,
            webhooks,
            live,
            nats: None,
            product,
        })
    }

    /// Shares rate limits through Redis and broadcasts key invalidations over it when
    /// `limits.redis_url` is set (a Redis that is down is waited for in the background).
    pub async fn connect_redis(&mut self) -> anyhow::Result<()> {
        if self.config.limits.redis_url.is_some() {
            self.product = Arc::new(crate::product::Product::connect_redis(&self.config).await?);
        }
        Ok(())
    }

    /// Connects to NATS when `nats.url` is configured (the connection keeps retrying in the
    /// background if the server is not up yet).
    pub async fn connect_nats(&mut self) -> anyhow::Result<()> {
        self.nats = crate::live::nats::Link::connect(&self.config.nats).await?;
        Ok(())
    }
}

/// The real clock. The only place in the server allowed to read the system time.
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)]
    fn now(&self) -> Timestamp {
        let ms = chrono::Utc::now().timestamp_millis();
        Timestamp(ms)
    }
}
