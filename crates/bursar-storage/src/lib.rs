//! The storage port: a few per-aggregate traits whose methods are atomic commands.
//!
//! Each write method is one database transaction that changes the aggregate *and* appends its
//! outbox event (and, once idempotency lands, stores the idempotency record) — so a caller can
//! never commit one without the other. Transactions never leak through the traits.
//! Both backends (`bursar-storage-sqlite`, `bursar-storage-postgres`) run the same
//! [`conformance`] suite.

pub mod conformance;
pub mod events;
pub mod group_commit;
pub mod money;
pub mod operations;
pub mod product;
mod records;

pub use events::EventLogStore;
pub use money::{MoneyStore, Rule, Step, StepEnd};
pub use operations::{Begun, Lease, LeasedOperation, OperationStore};
pub use product::ProductStore;
pub use records::*;

use async_trait::async_trait;
use bursar_domain::{AccountId, OrderAction, OrderStatus, Timestamp};

/// What a storage command can fail with. Business outcomes (`VersionMismatch`, `InvalidState`,
/// `UnknownCustomer`) are distinct variants so the service maps them to stable error codes.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("not found")]
    NotFound,
    #[error("version mismatch, current version is {current}")]
    VersionMismatch { current: i64 },
    #[error("order is {current:?}, the action is not allowed")]
    InvalidState { current: OrderStatus },
    #[error("customer does not exist in this account")]
    UnknownCustomer,
    #[error("unique constraint violated")]
    Conflict,
    /// A write under a lease that another driver has since taken over (or whose record has
    /// moved on): the write did not happen. See `operations`.
    #[error("the lease on this work was taken over")]
    Fenced,
    /// A money rule refused the command (`money::Rule`); nothing was written.
    #[error("refused by a money rule: {0:?}")]
    Rule(Rule),
    /// The database could not be reached or is overloaded; the request may be retried.
    #[error("database unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("storage failure")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

#[async_trait]
pub trait AccountStore: Send + Sync {
    /// Creates an account; `Conflict` if the name is taken.
    async fn create_account(&self, name: &str, at: Timestamp) -> Result<Account>;
    /// Finds an account by numeric id or, failing that, by name.
    async fn find_account(&self, name_or_id: &str) -> Result<Option<Account>>;
    async fn count_accounts(&self) -> Result<i64>;
    /// Stores a key by its hash; the plaintext never reaches storage.
    async fn create_api_key(&self, key: NewApiKey, at: Timestamp) -> Result<i64>;
    /// Looks a key up by the SHA-256 of its secret.
    async fn find_api_key(&self, key_hash: &str) -> Result<Option<ApiKeyRecord>>;
}

#[async_trait]
pub trait CustomerStore: Send + Sync {
    /// Inserts the customer and its `customer.created` event in one transaction.
    async fn create_customer(&self, meta: &WriteMeta, new: NewCustomer) -> Result<Customer>;
    async fn get_customer(&self, account: AccountId, id: i64) -> Result<Option<Customer>>;
    async fn list_customers(&self, account: AccountId, page: PageRequest)
    -> Result<Page<Customer>>;
    /// Compare-and-set on `version` in one statement, plus the `customer.updated` event.
    async fn update_customer(
        &self,
        meta: &WriteMeta,
        id: i64,
        expected: Precondition,
        patch: CustomerPatch,
    ) -> Result<Customer>;
}

#[async_trait]
pub trait OrderStore: Send + Sync {
    /// Inserts the order (if the customer belongs to the same account, else `UnknownCustomer`)
    /// and its `order.created` event in one transaction.
    async fn create_order(&self, meta: &WriteMeta, new: NewOrder) -> Result<Order>;
    async fn get_order(&self, account: AccountId, id: i64) -> Result<Option<Order>>;
    async fn list_orders(&self, account: AccountId, filter: OrderFilter) -> Result<Page<Order>>;
    /// Compare-and-set on `version` in one statement, plus the `order.updated` event.
    async fn update_order(
        &self,
        meta: &WriteMeta,
        id: i64,
        expected: Precondition,
        patch: OrderPatch,
    ) -> Result<Order>;
    /// Claims `claim` and, if it is new, inserts the order and its event, then stores the
    /// response `respond` renders for the outcome — all in one transaction. A key already used
    /// (and not expired) writes nothing and returns the stored record; an expired record is
    /// replaced.
    async fn create_order_idempotent(
        &self,
        meta: &WriteMeta,
        claim: &IdempotencyClaim,
        new: NewOrder,
        respond: OrderResponder,
    ) -> Result<Idempotent>;
    /// Applies a state-machine action with `WHERE status IN (action.sources())`, so two racing
    /// actions cannot both succeed; emits `order.<target status>`.
    async fn transition_order(
        &self,
        meta: &WriteMeta,
        id: i64,
        expected: Precondition,
        action: OrderAction,
    ) -> Result<Order>;
}

#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// The live (unexpired at `now`) record of `key` in `account`. Creates do not need it
    /// (their claim reports a used key); it serves lookups and tests.
    async fn find_idempotency(
        &self,
        account: AccountId,
        key: &str,
        now: Timestamp,
    ) -> Result<Option<IdempotencyRecord>>;
    /// Deletes up to `limit` records expired at `now`; returns how many. Resources that
    /// pointed at them keep their data (`idempotency_key_id` becomes NULL).
    async fn sweep_idempotency(&self, now: Timestamp, limit: u32) -> Result<u64>;
}

#[async_trait]
pub trait EventStore: Send + Sync {
    /// Outbox events of one aggregate, oldest first. The events API and dispatcher build on it.
    async fn events_for(
        &self,
        account: AccountId,
        aggregate_type: &str,
        aggregate_id: i64,
    ) -> Result<Vec<Event>>;
}

/// The whole port, as the server holds it (`Arc<dyn Storage>`).
#[async_trait]
pub trait Storage:
    AccountStore
    + CustomerStore
    + OrderStore
    + IdempotencyStore
    + OperationStore
    + MoneyStore
    + EventStore
    + EventLogStore
    + ProductStore
{
    /// `"sqlite"` or `"postgres"`.
    fn backend(&self) -> &'static str;
    /// Cheap round trip for `/readyz`.
    async fn ping(&self) -> Result<()>;
    /// Waits for checked-out connections and closes the pools.
    async fn close(&self);
    /// How many writes so far took effect in a group-commit batch with others, over every
    /// writer of this store ([`group_commit::GroupCommit::taken_together`]): lets the
    /// conformance cases of writes made together show that they shared a transaction, which
    /// their outcomes alone cannot.
    fn writes_taken_together(&self) -> u64;
}
