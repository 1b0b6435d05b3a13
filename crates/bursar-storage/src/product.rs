//! The API as a product (issue 6): key management, account plans, monthly quotas and usage.

use async_trait::async_trait;
use bursar_domain::{AccountId, Timestamp};

use crate::{
    ApiKeyInfo, NewApiKey, Page, PageRequest, QuotaCharge, QuotaOutcome, Result, UsageRow,
};

#[async_trait]
pub trait ProductStore: Send + Sync {
    /// The account's keys, newest first, revoked ones included.
    async fn list_api_keys(
        &self,
        account: AccountId,
        page: PageRequest,
    ) -> Result<Page<ApiKeyInfo>>;
    async fn get_api_key(&self, account: AccountId, id: i64) -> Result<Option<ApiKeyInfo>>;
    /// In one transaction: stores `new` as the successor of key `id` — with the old key's name,
    /// scopes, expiry and rate-limit identity, whatever `new` says of them — and makes the old
    /// key expire at `old_expires_at` (or earlier, if it already expires sooner). `NotFound` if
    /// `id` is not a live key of `account`; `Conflict` if `new` is of another mode.
    async fn roll_api_key(
        &self,
        account: AccountId,
        id: i64,
        new: NewApiKey,
        old_expires_at: Timestamp,
        at: Timestamp,
    ) -> Result<ApiKeyInfo>;
    /// Revokes the key (a second revoke changes nothing). `NotFound` outside `account`.
    async fn revoke_api_key(
        &self,
        account: AccountId,
        id: i64,
        at: Timestamp,
    ) -> Result<ApiKeyInfo>;
    /// Sets the account's plan (`None`: the configured default). `NotFound` if no account.
    async fn set_account_plan(&self, account: AccountId, plan: Option<&str>) -> Result<()>;
    /// Charges the period's counter atomically: `used + cost <= limit` or nothing is written.
    async fn charge_quota(&self, charge: &QuotaCharge) -> Result<QuotaOutcome>;
    /// Gives a charge back (its request ended in a server error), forgetting its key.
    async fn refund_quota(&self, charge: &QuotaCharge) -> Result<()>;
    /// The period's count (0 if nothing was charged).
    async fn quota_used(&self, account: AccountId, period_start: Timestamp) -> Result<i64>;
    /// Adds metered counts (upsert: counts add up) and moves each key's `last_used_at`
    /// forward, in one transaction.
    async fn add_usage(&self, rows: &[UsageRow]) -> Result<()>;
    /// The account's usage rows for days in `[from, to)`, by day then key then class. Their
    /// `last_at` is the day (the latest request time is kept on the key, not per row).
    async fn usage(
        &self,
        account: AccountId,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<UsageRow>>;
}
