//! Plain records passed through the port. They carry domain types, never wire types.

use bursar_domain::apikey::{KeyMode, Scope};
use bursar_domain::{AccountId, Metadata, Money, OrderStatus, Timestamp};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: AccountId,
    pub name: String,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub account_id: AccountId,
    pub mode: KeyMode,
    pub key_hash: String,
    pub start: String,
    pub last4: String,
    /// A label for people; never used for lookups.
    pub name: String,
    /// `None`: full access.
    pub scopes: Option<Vec<Scope>>,
    pub expires_at: Option<Timestamp>,
}

/// What authentication needs of a key, cached per instance for at most a few seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: i64,
    pub account_id: AccountId,
    pub mode: KeyMode,
    pub revoked: bool,
    pub expires_at: Option<Timestamp>,
    /// `None`: full access.
    pub scopes: Option<Vec<Scope>>,
    /// The key whose rate-limit buckets this key uses: the first key of its roll chain, so a
    /// rolled key does not start with a fresh burst.
    pub limit_id: i64,
    /// The account's plan (`None`: the configured default), read with the key so that the
    /// limits of a request need no second lookup; a plan change shows within the cache TTL.
    pub plan: Option<String>,
}

/// A key as its owner sees it: never the secret, only its start and last four characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyInfo {
    pub id: i64,
    pub name: String,
    pub mode: KeyMode,
    pub start: String,
    pub last4: String,
    pub scopes: Option<Vec<Scope>>,
    pub created_at: Timestamp,
    /// Updated with the usage flush, so up to a few seconds behind.
    pub last_used_at: Option<Timestamp>,
    pub expires_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
    /// The key this one was rolled from.
    pub rotated_from: Option<i64>,
}

/// One request's claim on its account's monthly quota.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaCharge {
    pub account_id: AccountId,
    pub period_start: Timestamp,
    pub limit: i64,
    pub cost: i64,
    /// Charged once per key and period: a replay of an idempotent request costs nothing.
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaOutcome {
    /// Charged; `used` is the period's count after this charge.
    Charged { used: i64 },
    /// This idempotency key was charged before in the period; nothing was charged now.
    AlreadyCharged { used: i64 },
    /// The charge would pass the limit; nothing was written.
    Exhausted { used: i64 },
}

/// Requests counted for one (account, key, route class, UTC day).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub account_id: AccountId,
    pub key_id: i64,
    pub route_class: String,
    /// Midnight UTC.
    pub day: Timestamp,
    pub requests: i64,
    /// The latest request among them (sets the key's `last_used_at`).
    pub last_at: Timestamp,
}

/// Who is writing, when, and for which request: copied onto the outbox event so every
/// downstream delivery can be traced back to the call that caused it.
#[derive(Debug, Clone)]
pub struct WriteMeta {
    pub account_id: AccountId,
    pub at: Timestamp,
    pub request_id: String,
    pub trace_id: String,
}

/// What an update expects the current version to be (`If-Match`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// `If-Match: *`: any existing version.
    Any,
    /// A strong `If-Match: "<n>"` or a body `version`.
    Version(i64),
}

impl Precondition {
    /// The version to compare against in SQL; `None` means no comparison.
    pub fn version(self) -> Option<i64> {
        match self {
            Precondition::Any => None,
            Precondition::Version(v) => Some(v),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    pub id: i64,
    pub account_id: AccountId,
    pub name: Option<String>,
    pub email: Option<String>,
    pub metadata: Metadata,
    pub version: i64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, Default)]
pub struct NewCustomer {
    pub name: Option<String>,
    pub email: Option<String>,
    pub metadata: Metadata,
}

#[derive(Debug, Clone, Default)]
pub struct CustomerPatch {
    pub name: Option<String>,
    pub email: Option<String>,
    pub metadata: Option<Metadata>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub id: i64,
    pub account_id: AccountId,
    pub customer_id: i64,
    pub amount: Money,
    pub status: OrderStatus,
    pub description: Option<String>,
    pub metadata: Metadata,
    pub version: i64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone)]
pub struct NewOrder {
    pub customer_id: i64,
    pub amount: Money,
    pub description: Option<String>,
    pub metadata: Metadata,
}

#[derive(Debug, Clone, Default)]
pub struct OrderPatch {
    pub description: Option<String>,
    pub metadata: Option<Metadata>,
}

/// Cursor page request: newest first, rows with `id < starting_after`.
#[derive(Debug, Clone, Copy)]
pub struct PageRequest {
    pub limit: u32,
    pub starting_after: Option<i64>,
}

impl PageRequest {
    /// The backends fetch one row more than asked to learn `has_more` without a COUNT.
    pub fn fetch_limit(&self) -> i64 {
        i64::from(self.limit) + 1
    }

    /// The id bound, `i64::MAX` when paging from the start.
    pub fn before_id(&self) -> i64 {
        self.starting_after.unwrap_or(i64::MAX)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct OrderFilter {
    pub page: PageRequest,
    pub customer_id: Option<i64>,
    pub status: Option<OrderStatus>,
    /// Inclusive lower bound on `created_at`.
    pub created_gte: Option<Timestamp>,
    /// Exclusive upper bound on `created_at`.
    pub created_lt: Option<Timestamp>,
}

#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub has_more: bool,
}

impl<T> Page<T> {
    /// Trims the extra look-ahead row fetched by the backend.
    pub fn from_lookahead(mut items: Vec<T>, page: PageRequest) -> Page<T> {
        let limit = page.limit as usize;
        let has_more = items.len() > limit;
        items.truncate(limit);
        Page { items, has_more }
    }
}

/// An outbox event as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: i64,
    pub account_id: AccountId,
    pub event_type: String,
    pub aggregate_type: String,
    pub aggregate_id: i64,
    pub aggregate_version: i64,
    pub payload: serde_json::Value,
    pub request_id: String,
    pub trace_id: String,
    pub created_at: Timestamp,
}

/// An event about to be appended, built from the record it describes so both backends emit
/// exactly the same events.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_type: String,
    pub aggregate_type: &'static str,
    pub aggregate_id: i64,
    pub aggregate_version: i64,
    pub payload: String,
}

impl NewEvent {
    pub fn for_customer(kind: &str, c: &Customer) -> NewEvent {
        NewEvent::snapshot(format!("customer.{kind}"), "customer", c.id, c.version, c)
    }

    pub fn for_order(kind: &str, o: &Order) -> NewEvent {
        NewEvent::snapshot(format!("order.{kind}"), "order", o.id, o.version, o)
    }

    pub fn for_payment(kind: &str, p: &crate::money::Payment) -> NewEvent {
        NewEvent::snapshot(format!("payment.{kind}"), "payment", p.id, p.version, p)
    }

    /// The event of a payment as it was first recorded: `payment.failed`,
    /// `payment.authorized` or, captured at once, `payment.succeeded`.
    pub fn for_recorded_payment(p: &crate::money::Payment) -> NewEvent {
        use crate::money::PaymentStatus;
        let kind = match p.status {
            PaymentStatus::Failed => "failed",
            PaymentStatus::RequiresCapture => "authorized",
            PaymentStatus::Succeeded | PaymentStatus::Canceled => "succeeded",
        };
        NewEvent::for_payment(kind, p)
    }

    /// Refunds change status once, so their version is 1 when pending and 2 when settled.
    pub fn for_refund(kind: &str, r: &crate::money::Refund) -> NewEvent {
        let version = if r.status == crate::money::RefundStatus::Pending {
            1
        } else {
            2
        };
        NewEvent::snapshot(format!("refund.{kind}"), "refund", r.id, version, r)
    }

    pub fn for_conversion(c: &crate::money::Conversion) -> NewEvent {
        NewEvent::snapshot("conversion.completed".into(), "conversion", c.id, 1, c)
    }

    fn snapshot<T: Serialize>(
        event_type: String,
        aggregate_type: &'static str,
        aggregate_id: i64,
        aggregate_version: i64,
        record: &T,
    ) -> NewEvent {
        NewEvent {
            event_type,
            aggregate_type,
            aggregate_id,
            aggregate_version,
            payload: serde_json::to_string(record)
                .expect("records are plain data and always serialise"),
        }
    }
}

/// Rebuilds records from the column values both backends store, so decoding rules (and
/// their failure modes) are written once.
pub mod decode {
    use super::*;
    use crate::StorageError;
    use bursar_domain::Currency;
    use bursar_domain::ledger::{EntryKind, LedgerAccount};

    fn corrupt(what: String) -> StorageError {
        StorageError::Internal(what.into())
    }

    pub fn currency(code: &str) -> Result<Currency, StorageError> {
        Currency::from_code(code).ok_or_else(|| corrupt(format!("stored currency {code:?}")))
    }

    pub fn payment_status(s: &str) -> Result<crate::money::PaymentStatus, StorageError> {
        crate::money::PaymentStatus::parse(s)
            .ok_or_else(|| corrupt(format!("stored payment status {s:?}")))
    }

    pub fn refund_status(s: &str) -> Result<crate::money::RefundStatus, StorageError> {
        crate::money::RefundStatus::parse(s)
            .ok_or_else(|| corrupt(format!("stored refund status {s:?}")))
    }

    pub fn ledger_account(s: &str) -> Result<LedgerAccount, StorageError> {
        LedgerAccount::parse(s).ok_or_else(|| corrupt(format!("stored ledger account {s:?}")))
    }

    pub fn entry_kind(s: &str) -> Result<EntryKind, StorageError> {
        EntryKind::parse(s).ok_or_else(|| corrupt(format!("stored entry kind {s:?}")))
    }

    pub fn metadata(json: &str) -> Result<Metadata, StorageError> {
        serde_json::from_str(json).map_err(|e| corrupt(format!("stored metadata: {e}")))
    }

    pub fn metadata_json(m: &Metadata) -> String {
        serde_json::to_string(m).expect("a string map always serialises")
    }

    pub fn headers_json(h: &[(String, String)]) -> String {
        serde_json::to_string(h).expect("string pairs always serialise")
    }

    pub fn headers(json: &str) -> Result<Vec<(String, String)>, StorageError> {
        serde_json::from_str(json).map_err(|e| corrupt(format!("stored headers: {e}")))
    }

    /// Scopes are stored as one space-separated text; NULL means full access.
    pub fn scopes(s: Option<&str>) -> Result<Option<Vec<Scope>>, StorageError> {
        s.map(|text| {
            text.split_whitespace()
                .map(|one| {
                    Scope::parse(one).ok_or_else(|| corrupt(format!("stored scope {one:?}")))
                })
                .collect()
        })
        .transpose()
    }

    /// The stored form of [`scopes`].
    pub fn scopes_text(scopes: Option<&[Scope]>) -> Option<String> {
        scopes.map(|v| v.iter().map(|s| s.render()).collect::<Vec<_>>().join(" "))
    }

    pub fn key_mode(s: &str) -> Result<KeyMode, StorageError> {
        KeyMode::parse(s).ok_or_else(|| corrupt(format!("stored key mode {s:?}")))
    }

    pub fn status(s: &str) -> Result<OrderStatus, StorageError> {
        OrderStatus::parse(s).ok_or_else(|| corrupt(format!("stored order status {s:?}")))
    }

    pub fn money(minor: i64, currency: &str) -> Result<Money, StorageError> {
        let c = Currency::from_code(currency)
            .ok_or_else(|| corrupt(format!("stored currency {currency:?}")))?;
        Money::from_minor(minor, c).map_err(|e| corrupt(format!("stored amount {minor}: {e}")))
    }

    /// `,pending,paid,`: the legal source statuses of an action as one bindable string, for
    /// backends that match membership with a string search instead of an array parameter.
    pub fn status_set(statuses: &[OrderStatus]) -> String {
        let mut s = String::from(",");
        for st in statuses {
            s.push_str(st.as_str());
            s.push(',');
        }
        s
    }
}

/// The client's `Idempotency-Key` for one create, scoped to the writing account, with what the
/// request looked like so a different request under the same key can be recognised.
#[derive(Debug, Clone)]
pub struct IdempotencyClaim {
    pub key: String,
    pub method: String,
    /// The route template (`/api/orders`), not the concrete path.
    pub route: String,
    /// Hex SHA-256 of method, route, sorted query and canonical JSON body.
    pub fingerprint: String,
    /// When the record stops counting (created + retention).
    pub expires_at: Timestamp,
}

/// A response exactly as it was sent: replays return these bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    /// Only the replayable headers (Location, ETag, Content-Type, …).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A stored idempotency record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    pub id: i64,
    pub method: String,
    pub route: String,
    pub fingerprint: String,
    /// Meaningful only when `in_flight` is `None`.
    pub response: StoredResponse,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    /// The resource the request created (an order's id), if it created one. The record
    /// names the resource rather than the other way round, so sweeping a record never
    /// touches the resource's table.
    pub resource_id: Option<i64>,
    /// `None` once the response is stored. While phased work (`operations`) is unfinished,
    /// the end of its current lease, which may lie in the past (the driver died).
    pub in_flight: Option<Timestamp>,
}

/// The outcome of an idempotent create.
#[derive(Debug)]
pub enum Idempotent {
    /// The key was new: the create ran, and this response was stored with it.
    Fresh(StoredResponse),
    /// The key was already used (and has not expired): nothing was written.
    Existing(IdempotencyRecord),
}

/// Turns the outcome of the protected write into the response to store with it. `None` means
/// "do not store; roll back" (failures that are not deterministic business answers). Owned
/// (`Arc`), because the write may run on the group-commit writer's task.
pub type OrderResponder = std::sync::Arc<
    dyn Fn(Result<&Order, &crate::StorageError>) -> Option<StoredResponse> + Send + Sync,
>;
