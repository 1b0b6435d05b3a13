//! Wire types of payments, refunds, balances, the ledger, rates, quotes and conversions.
//! Amounts are [`Amount`]s with exactly the currency's decimals, each beside its integer
//! minor units (`*_minor`), as orders have them; rates are decimal strings, never numbers,
//! so no client parses them into binary floating point.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Amount;

/// A payment's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    /// Authorized; capture or cancel it.
    RequiresCapture,
    /// Captured, in full or in part.
    Succeeded,
    /// Voided before capture.
    Canceled,
    /// Declined by the processor; see `failure_code`.
    Failed,
}

/// A card payment for an order.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Payment {
    pub id: i64,
    /// Always `"payment"`.
    pub object: String,
    pub order_id: i64,
    /// The authorized amount.
    pub amount: Amount,
    pub amount_minor: i64,
    pub currency: String,
    pub status: PaymentStatus,
    pub payment_method: String,
    pub amount_captured: Amount,
    pub amount_captured_minor: i64,
    /// Refunded or being refunded.
    pub amount_refunded: Amount,
    pub amount_refunded_minor: i64,
    /// `card_declined`, `insufficient_funds`, … when `failed`.
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePayment {
    pub order_id: i64,
    /// Defaults to the order's amount; at most the order's amount, in its currency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<Amount>,
    /// `pm_card_visa`, `pm_card_declined`, … (the processor's payment method id).
    pub payment_method: String,
    /// Capture at once (default `true`), or only authorize and capture later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<bool>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CapturePayment {
    /// Defaults to the whole authorized amount; the rest is released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<Amount>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RefundStatus {
    /// Reserved against the payment, awaiting the processor.
    Pending,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Refund {
    pub id: i64,
    /// Always `"refund"`.
    pub object: String,
    pub payment_id: i64,
    pub amount: Amount,
    pub amount_minor: i64,
    pub currency: String,
    pub status: RefundStatus,
    pub failure_code: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRefund {
    pub payment_id: i64,
    /// Defaults to what is captured and not yet refunded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<Amount>,
}

/// The ledger accounts of one currency. Each is the sum of its postings; see
/// `GET /api/ledger_entries`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Balance {
    /// Always `"balance"`.
    pub object: String,
    pub currency: String,
    /// Captured funds: what refunds and conversions draw on.
    pub available: Amount,
    pub available_minor: i64,
    /// Authorized, not yet captured.
    pub pending: Amount,
    pub pending_minor: i64,
    /// The processor's side of card movements (negative: owed to the account).
    pub processor_clearing: Amount,
    pub processor_clearing_minor: i64,
    /// The other side of conversions.
    pub fx_clearing: Amount,
    pub fx_clearing_minor: i64,
}

/// One signed line of a journal entry (debit positive).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Posting {
    /// `available`, `pending`, `processor_clearing` or `fx_clearing`.
    pub ledger_account: String,
    pub currency: String,
    pub amount: Amount,
    pub amount_minor: i64,
}

/// A journal entry: postings that sum to zero in every currency. Immutable.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LedgerEntry {
    pub id: i64,
    /// Always `"ledger_entry"`.
    pub object: String,
    /// `authorization`, `capture`, `void`, `refund` or `conversion`.
    pub kind: String,
    /// `payment`, `refund` or `conversion`.
    pub reference_type: String,
    pub reference_id: i64,
    pub postings: Vec<Posting>,
    pub created_at: String,
}

/// A market rate: `rate` units of `quote_currency` for one unit of `base_currency`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Rate {
    /// Always `"rate"`.
    pub object: String,
    pub base_currency: String,
    pub quote_currency: String,
    /// Decimal text, e.g. `"0.9213"`.
    pub rate: String,
    pub set_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateQuote {
    pub from_currency: String,
    pub to_currency: String,
    /// In `from_currency`.
    pub amount: Amount,
}

/// A rate locked for a while: converting it moves exactly these two amounts.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Quote {
    pub id: i64,
    /// Always `"quote"`.
    pub object: String,
    pub from_currency: String,
    pub from_amount: Amount,
    pub from_amount_minor: i64,
    pub to_currency: String,
    /// `from_amount × rate`, rounded half-even to `to_currency`'s minor unit.
    pub to_amount: Amount,
    pub to_amount_minor: i64,
    /// The rate applied: the market rate less the spread.
    pub rate: String,
    pub market_rate: String,
    pub spread_bps: u32,
    pub created_at: String,
    pub expires_at: String,
    /// Whether it was converted (a quote converts once).
    pub used: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateConversion {
    pub quote_id: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Conversion {
    pub id: i64,
    /// Always `"conversion"`.
    pub object: String,
    pub quote_id: i64,
    pub from_currency: String,
    pub from_amount: Amount,
    pub from_amount_minor: i64,
    pub to_currency: String,
    pub to_amount: Amount,
    pub to_amount_minor: i64,
    pub rate: String,
    pub created_at: String,
}
