//! The event log and webhook delivery (issue 5): sequencing committed outbox rows, the
//! events API, webhook endpoints, and the delivery queue with leases and fencing tokens.
//!
//! Business commands append `outbox_events` rows in their own transaction (no dual write).
//! A relay then *sequences* them: in one transaction, serialised across relays, it gives each
//! committed, unsequenced row its public `event_id`, the next per-account `seq` and its rendered
//! body (the exact bytes every webhook, SSE frame and NATS message carries), and fans it out to
//! one `webhook_deliveries` row per matching endpoint (`UNIQUE (event_id, endpoint_id)`).
//! Assigning `seq` after commit, in one serialised step, is what keeps a `seq > last` reader
//! from skipping a row that committed late (the sequence-gap trap of spec §3.5).

use async_trait::async_trait;
use bursar_domain::{AccountId, Timestamp};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::{PageRequest, Result};

/// A sequenced event, as the events API, SSE, NATS and webhooks serve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEvent {
    pub event_id: String,
    pub seq: i64,
    pub account_id: AccountId,
    pub event_type: String,
    pub aggregate_type: String,
    pub aggregate_id: i64,
    pub aggregate_version: i64,
    pub request_id: String,
    pub trace_id: String,
    pub created_at: Timestamp,
    /// The rendered event (see [`render_body`]): sent byte for byte, never re-serialised.
    pub body: String,
}

/// The wire form of an event. Field order is fixed here, once, for every transport.
#[derive(Serialize)]
struct Envelope<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    /// The event time (RFC 3339, UTC, milliseconds).
    timestamp: String,
    seq: i64,
    account_id: AccountId,
    request_id: &'a str,
    trace_id: &'a str,
    data: Data<'a>,
}

#[derive(Serialize)]
struct Data<'a> {
    aggregate_type: &'a str,
    aggregate_id: i64,
    aggregate_version: i64,
    object: &'a RawValue,
}

/// Renders an event's body: `{"id","type","timestamp","seq","account_id","request_id",
/// "trace_id","data":{"aggregate_type","aggregate_id","aggregate_version","object"}}`.
/// `e.body` is ignored; `payload` is the record snapshot written with the business change.
pub fn render_body(e: &LoggedEvent, payload: &str) -> Result<String> {
    let object: &RawValue = serde_json::from_str(payload)
        .map_err(|err| crate::StorageError::Internal(Box::new(err)))?;
    let envelope = Envelope {
        id: &e.event_id,
        event_type: &e.event_type,
        timestamp: e.created_at.rfc3339(),
        seq: e.seq,
        account_id: e.account_id,
        request_id: &e.request_id,
        trace_id: &e.trace_id,
        data: Data {
            aggregate_type: &e.aggregate_type,
            aggregate_id: e.aggregate_id,
            aggregate_version: e.aggregate_version,
            object,
        },
    };
    serde_json::to_string(&envelope).map_err(|err| crate::StorageError::Internal(Box::new(err)))
}

/// Does `event_type` match one of `patterns`? `*` matches everything; `order.*` matches every
/// type whose first segment is `order`; anything else matches exactly.
pub fn type_matches(patterns: &[String], event_type: &str) -> bool {
    patterns.iter().any(|p| {
        p == "*"
            || p == event_type
            || p.strip_suffix(".*").is_some_and(|prefix| {
                event_type
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('.'))
            })
    })
}

/// A webhook endpoint. Secrets are stored encrypted; the store never sees them in clear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub id: i64,
    pub account_id: AccountId,
    pub url: String,
    pub description: Option<String>,
    /// Event-type patterns (see [`type_matches`]).
    pub event_types: Vec<String>,
    pub secret_enc: String,
    /// The secret replaced by the last rotation, while it still signs deliveries.
    pub previous_secret_enc: Option<String>,
    pub previous_secret_expires_at: Option<Timestamp>,
    pub enabled: bool,
    pub disabled_reason: Option<String>,
    pub max_concurrency: i64,
    pub version: i64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

pub struct NewEndpoint {
    pub url: String,
    pub description: Option<String>,
    pub event_types: Vec<String>,
    pub secret_enc: String,
    pub max_concurrency: i64,
}

/// Fields an update may change (`None` = unchanged).
#[derive(Default)]
pub struct EndpointPatch {
    pub url: Option<String>,
    pub description: Option<Option<String>>,
    pub event_types: Option<Vec<String>>,
    pub enabled: Option<bool>,
}

/// Delivery states (spec §2.3).
pub mod state {
    pub const PENDING: &str = "pending";
    pub const IN_FLIGHT: &str = "in_flight";
    pub const RETRYING: &str = "retrying";
    pub const SUCCEEDED: &str = "succeeded";
    pub const FAILED: &str = "failed";
    pub const CANCELLED: &str = "cancelled";
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub id: i64,
    pub account_id: AccountId,
    pub endpoint_id: i64,
    pub event_id: String,
    pub event_type: String,
    pub state: String,
    pub attempt_count: i64,
    pub next_attempt_at: Timestamp,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub delivery_id: i64,
    pub attempt_no: i64,
    pub status_code: Option<i64>,
    pub duration_ms: i64,
    /// `None` on success; otherwise `timeout`, `connect`, `tls`, `blocked_ip`, `http_status`,
    /// `lease_lost`.
    pub error_kind: Option<String>,
    /// At most 16 KiB of the answer's body.
    pub response_snippet: Option<String>,
    pub created_at: Timestamp,
}

/// A delivery a worker holds a lease on, with what it needs to send it.
#[derive(Debug, Clone)]
pub struct ClaimedDelivery {
    pub delivery_id: i64,
    pub account_id: AccountId,
    pub endpoint_id: i64,
    pub attempt_no: i64,
    pub event_id: String,
    pub body: String,
    pub url: String,
    pub secret_enc: String,
    pub previous_secret_enc: Option<String>,
    pub previous_secret_expires_at: Option<Timestamp>,
    pub request_id: String,
    pub trace_id: String,
}

/// How an attempt ends a delivery's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// Failed; try again at this time.
    Retry(Timestamp),
    /// Failed and out of attempts.
    Exhausted,
    /// The receiver answered 410: the endpoint is disabled and its pending deliveries cancelled.
    Gone,
}

/// What a finished attempt writes.
pub struct Completion {
    pub delivery_id: i64,
    pub lease_token: String,
    pub attempt: Attempt,
    pub outcome: Outcome,
}

/// Events and webhooks, for both backends. Every method scoped to an account takes it.
#[async_trait]
pub trait EventLogStore: Send + Sync {
    /// Sequences up to `limit` committed, unsequenced events in commit order: each gets
    /// `event_id` from `new_id`, the next `seq` of its account and its body, and one pending
    /// delivery per enabled endpoint of its account whose patterns match. One transaction,
    /// serialised against other relays. Returns the events sequenced, in `seq` order.
    async fn sequence_events(
        &self,
        limit: u32,
        now: Timestamp,
        new_id: &(dyn Fn() -> String + Send + Sync),
    ) -> Result<Vec<LoggedEvent>>;

    /// Events of `account` with `seq > after`, oldest first (SSE backfill and resume).
    async fn events_after(
        &self,
        account: AccountId,
        after: i64,
        types: &[String],
        limit: u32,
    ) -> Result<Vec<LoggedEvent>>;

    /// Sequenced events not yet handed to the live fan-out, oldest sequencing first (per
    /// account in `seq` order): the publisher's backlog. Publishing is at least once; a
    /// crash between the hand-off and [`EventLogStore::mark_published`] re-sends, and
    /// JetStream drops the copy by its `Nats-Msg-Id`.
    async fn unpublished_events(&self, limit: u32) -> Result<Vec<LoggedEvent>>;

    /// Records that these events were published (after JetStream acknowledged them, or the
    /// in-process broadcast took them). Returns how many were newly marked.
    async fn mark_published(&self, event_ids: &[String], now: Timestamp) -> Result<u64>;

    /// Events of `account`, newest first, `seq < before` when given (the events API).
    async fn list_events(
        &self,
        account: AccountId,
        types: &[String],
        page: PageRequest,
    ) -> Result<Vec<LoggedEvent>>;

    async fn get_event(&self, account: AccountId, event_id: &str) -> Result<Option<LoggedEvent>>;

    async fn create_endpoint(
        &self,
        account: AccountId,
        new: NewEndpoint,
        now: Timestamp,
    ) -> Result<Endpoint>;
    async fn get_endpoint(&self, account: AccountId, id: i64) -> Result<Option<Endpoint>>;
    async fn list_endpoints(&self, account: AccountId, page: PageRequest) -> Result<Vec<Endpoint>>;
    /// `NotFound` when there is no such endpoint.
    async fn update_endpoint(
        &self,
        account: AccountId,
        id: i64,
        patch: EndpointPatch,
        now: Timestamp,
    ) -> Result<Endpoint>;
    /// Deletes the endpoint with its deliveries and attempts; `false` if there was none.
    async fn delete_endpoint(&self, account: AccountId, id: i64) -> Result<bool>;
    /// Replaces the secret; the old one keeps signing until `previous_expires_at`.
    async fn rotate_secret(
        &self,
        account: AccountId,
        id: i64,
        new_secret_enc: &str,
        previous_expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<Endpoint>;

    async fn list_deliveries(
        &self,
        account: AccountId,
        endpoint_id: i64,
        page: PageRequest,
    ) -> Result<Vec<Delivery>>;
    async fn list_attempts(
        &self,
        account: AccountId,
        endpoint_id: i64,
        page: PageRequest,
    ) -> Result<Vec<Attempt>>;
    /// Queues `event_id` for the endpoint again, now (a new delivery, or an existing one not
    /// in flight made pending). `NotFound` when the event or endpoint is not the account's.
    async fn redeliver(
        &self,
        account: AccountId,
        endpoint_id: i64,
        event_id: &str,
        now: Timestamp,
    ) -> Result<Delivery>;

    /// Leases up to `limit` due deliveries (pending or retrying and due, or in flight with a
    /// lapsed lease) of enabled endpoints, under `lease_token` until `lease_until`; each claim
    /// counts an attempt. An in-flight delivery taken over gets its lost attempt recorded as
    /// `lease_lost`.
    async fn claim_deliveries(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        lease_token: &str,
        limit: u32,
    ) -> Result<Vec<ClaimedDelivery>>;

    /// Records the attempt and applies the outcome if the lease is still `lease_token`'s;
    /// otherwise records the attempt as `lease_lost` and changes nothing else (`false`).
    async fn complete_delivery(&self, c: Completion, now: Timestamp) -> Result<bool>;

    /// Ends leases held under `lease_token` (graceful shutdown): due again now.
    async fn release_deliveries(&self, lease_token: &str, now: Timestamp) -> Result<u64>;
}
