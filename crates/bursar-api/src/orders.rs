//! Order wire types.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

use crate::Amount;

/// Order status on the wire (the state machine lives in `bursar-domain`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Pending,
    Paid,
    Refunded,
    Canceled,
}

/// An order: an amount owed by a customer, in one currency.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Order {
    pub id: i64,
    /// Always `"order"`.
    pub object: String,
    pub customer_id: i64,
    /// The amount with exactly the currency's decimals, as a JSON number (`199.00`).
    pub amount: Amount,
    /// The same amount in integer minor units (`19900`): what is stored.
    pub amount_minor: i64,
    /// ISO 4217 code.
    #[schema(example = "USD")]
    pub currency: String,
    pub status: OrderStatus,
    pub description: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrder {
    /// A customer of the same account.
    #[schema(example = 44)]
    pub customer_id: i64,
    pub amount: Amount,
    /// ISO 4217 code, upper case.
    #[schema(example = "USD")]
    pub currency: String,
    /// At most 1000 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// Partial update of an order's descriptive fields. Needs `If-Match` or `version`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateOrder {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
}
