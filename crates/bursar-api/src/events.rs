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
    /// `false` pauses deliveries; `true` resumes them (also after an automatic disable).
    #[serde(default)]
    pub enabled: Option<bool>,
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
    /// Why Bursar disabled it (`gone`: the receiver answered 410).
    pub disabled_reason: Option<String>,
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
