//! Wire types of the API as a product: keys, usage and the invoice preview.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An API key as its owner sees it. The secret is in `secret` only in the answer that created
/// it (create or roll); afterwards only `start` and `last4` identify it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiKey {
    #[schema(example = 7)]
    pub id: i64,
    /// Always `"api_key"`.
    pub object: String,
    pub name: String,
    /// `test` or `live`.
    pub mode: String,
    /// The whole key, shown once: store it now, Bursar keeps only its SHA-256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Prefix and the first four random characters.
    #[schema(example = "bsr_test_Ab3x")]
    pub start: String,
    pub last4: String,
    /// `null`: full access. Otherwise `resource:read|write` items (`write` implies `read`).
    pub scopes: Option<Vec<String>>,
    pub created_at: String,
    /// Updated with the usage flush (about a second behind).
    pub last_used_at: Option<String>,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    /// The key this one was rolled from.
    pub rotated_from: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    /// A label, at most 100 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `test` or `live`; default: the mode of the calling key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Omit for full access. A restricted key can only create keys within its own scopes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// RFC 3339; must be in the future.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollApiKey {
    /// How long the old key keeps working, 0 to 2,592,000 s (30 days); default 86,400.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_secs: Option<u64>,
}

/// Metered requests, grouped as asked.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    /// Always `"usage"`.
    pub object: String,
    /// First and last-exclusive day, `YYYY-MM-DD` (UTC).
    pub from: String,
    pub to: String,
    pub group_by: Vec<String>,
    pub total: i64,
    pub data: Vec<UsageGroup>,
}

/// One group of [`Usage`]; the members not grouped by are absent.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageGroup {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_class: Option<String>,
    pub requests: i64,
}

/// The invoice the current period would produce: the plan's fee plus usage priced by its
/// tiers, each line rounded once (half-even) to the currency's minor unit.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Invoice {
    /// Always `"invoice"`.
    pub object: String,
    /// `upcoming`: a preview, changing as usage arrives.
    pub status: String,
    pub plan: String,
    pub currency: String,
    pub period_start: String,
    pub period_end: String,
    /// Metered requests in the period so far.
    pub units: i64,
    pub included_units: u64,
    /// `graduated`, `volume`, or absent when the plan does not price usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing: Option<String>,
    pub lines: Vec<InvoiceLine>,
    /// Decimal text in the currency's minor unit.
    #[schema(example = "600.00")]
    pub total: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InvoiceLine {
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub units: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_amount: Option<String>,
    pub amount: String,
}
