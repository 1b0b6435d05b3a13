//! Events and webhook endpoints (issue 5).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An event as every transport carries it: the exact bytes webhooks are signed over.
/// `{"id","type","timestamp","seq","account_id","request_id","trace_id","data":{"aggregate_type",
/// "aggregate_id","aggregate_version","object"}}`.
pub type Event = serde_json::Value;

/// `POST /api/webhook_endpoints`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhookEndpoint {
    /// Where deliveries go. `https://` (plain `http://` only where the operator allows it);
    /// addresses must be public unless the operator allow-lists them.
    pub url: String,
    /// Event types to receive: exact (`order.paid`), a prefix wildcard (`order.*`) or `*`
    /// (the default).
    #[serde(default)]
    pub event_types: Option<Vec<String>>,
    #[serde(default)]
    pub description: Option<String>,
    /// At most this many deliveries to it at once (1–100, default 4).
    #[serde(default)]
    pub max_concurrency: Option<i64>,
    /// Per-aggregate FIFO (default false): the events of one object (an order, a payment …)
    /// reach it one at a time, in version order, each only after the previous one finished
    /// (delivered, or failed for good), retries included.
    #[serde(default)]
    pub fifo_per_aggregate: Option<bool>,
}

/// `PATCH /api/webhook_endpoints/{id}`: only the fields present change.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateWebhookEndpoint {
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub event_types: Option<Vec<String>>,
    #[serde(default)]
    pub description: Option<String>,
    /// `false` pauses deliveries; `true` resumes them (also after an automatic disable) and
    /// resets the endpoint's health: the failure clock and the circuit breaker.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// At most this many deliveries to it at once (1–100).
    #[serde(default)]
    pub max_concurrency: Option<i64>,
    /// Per-aggregate FIFO: see `CreateWebhookEndpoint`.
    #[serde(default)]
    pub fifo_per_aggregate: Option<bool>,
}

/// A webhook endpoint. `secret` is shown in full only when created or rotated; otherwise
/// masked (`whsec_…abcd`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WebhookEndpoint {
    pub id: i64,
    /// Always `"webhook_endpoint"`.
    pub object: String,
    pub url: String,
    pub description: Option<String>,
    pub event_types: Vec<String>,
    pub enabled: bool,
    /// Why Bursar disabled it (`gone`: the receiver answered 410; `failing`: every attempt
    /// failed for longer than the operator's `disable_after`, 5 days by default).
    pub disabled_reason: Option<String>,
    /// At most this many deliveries to it are in flight at once.
    pub max_concurrency: i64,
    /// The events of one object reach it one at a time, in version order.
    pub fifo_per_aggregate: bool,
    /// `closed` (deliveries flow), `open` (held back until `circuit_open_until`, attempts not
    /// spent) or `half_open` (one probe at a time; its success closes the circuit).
    pub circuit_state: String,
    pub circuit_open_until: Option<String>,
    /// When the current run of failed attempts began; null after any 2xx.
    pub first_failure_at: Option<String>,
    /// Failed attempts since the last 2xx.
    pub consecutive_failures: i64,
    pub secret: String,
    /// While a rotated-out secret still signs deliveries: until when (RFC 3339).
    pub previous_secret_expires_at: Option<String>,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
}

/// `POST /api/webhook_endpoints/{id}/redeliver`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Redeliver {
    pub event_id: String,
}

/// One event's delivery to one endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WebhookDelivery {
    pub id: i64,
    pub endpoint_id: i64,
    pub event_id: String,
    pub event_type: String,
    /// `pending`, `in_flight`, `retrying`, `succeeded`, `failed` or `cancelled`.
    pub state: String,
    pub attempt_count: i64,
    pub next_attempt_at: String,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// One attempt of a delivery.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WebhookAttempt {
    /// The cursor for `starting_after` when paging the attempts.
    pub id: i64,
    pub delivery_id: i64,
    pub attempt_no: i64,
    pub status_code: Option<i64>,
    pub duration_ms: i64,
    /// `timeout`, `connect`, `tls`, `blocked_ip`, `http_status`, `lease_lost`; none on success.
    pub error_kind: Option<String>,
    /// At most 16 KiB of the receiver's answer.
    pub response_snippet: Option<String>,
    pub created_at: String,
}

/// `POST /api/webhook_endpoints/{id}/replay`: resend the endpoint's events of a time range.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateReplay {
    /// Events at or after this event time (RFC 3339).
    pub since: String,
    /// Events before this event time (RFC 3339); default: now.
    #[serde(default)]
    pub until: Option<String>,
    /// Also resend events the endpoint already received (default false).
    #[serde(default)]
    pub include_succeeded: Option<bool>,
}

/// A replay and what it queued. Replays run within the request, so `status` is `completed`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WebhookReplay {
    pub id: i64,
    /// Always `"webhook_replay"`.
    pub object: String,
    pub endpoint_id: i64,
    pub status: String,
    pub since: String,
    pub until: String,
    pub include_succeeded: bool,
    /// Events of the range that the endpoint's `event_types` match, oldest first, at most
    /// `max_events`.
    pub events_matched: i64,
    /// Deliveries created for matched events the endpoint never had.
    pub deliveries_created: i64,
    /// Failed or cancelled (with `include_succeeded`, also succeeded) deliveries queued again.
    pub deliveries_requeued: i64,
    /// More events matched than `max_events`; the oldest were taken.
    pub capped: bool,
    /// When capped: the `since` of the next replay (the event time of the first event left
    /// out; events already queued are not queued twice).
    pub next_since: Option<String>,
    /// The most events one replay resends (10,000).
    pub max_events: i64,
    pub created_at: String,
}
