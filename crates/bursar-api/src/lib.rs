//! Wire types of the Bursar API: what goes over HTTP, shared by the server (which renders them
//! and derives the OpenAPI document from them) and the SDK (which parses them).
//! No I/O and no business rules live here; validation belongs to `bursar-domain`.

pub mod amount;
pub mod customers;
pub mod error;
pub mod events;
pub mod money;
pub mod orders;
pub mod product;

pub use amount::Amount;
pub use customers::{CreateCustomer, Customer, UpdateCustomer};
pub use error::{ErrorBody, ErrorCode, FieldIssue};
pub use events::{
    CreateReplay, CreateWebhookEndpoint, Redeliver, UpdateWebhookEndpoint, WebhookAttempt,
    WebhookDelivery, WebhookEndpoint, WebhookReplay,
};
pub use money::{
    Balance, CapturePayment, Conversion, CreateConversion, CreatePayment, CreateQuote,
    CreateRefund, LedgerEntry, Payment, PaymentStatus, Posting, Quote, Rate, Refund, RefundStatus,
};
pub use orders::{CreateOrder, Order, OrderStatus, UpdateOrder};
pub use product::{ApiKey, CreateApiKey, Invoice, InvoiceLine, RollApiKey, Usage, UsageGroup};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One page of a list. Pages are cut by id (`starting_after`), newest first, so rows inserted
/// while a client pages never shift or repeat the rows it has yet to see.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct List<T> {
    /// Always `"list"`.
    pub object: String,
    pub data: Vec<T>,
    /// Whether another page follows; request it with `starting_after` = the last id of `data`.
    pub has_more: bool,
}

impl<T> List<T> {
    pub fn new(data: Vec<T>, has_more: bool) -> Self {
        List {
            object: "list".into(),
            data,
            has_more,
        }
    }
}
