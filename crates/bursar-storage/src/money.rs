//! Payments, refunds, the double-entry ledger and currency conversions (issue 4): the records
//! and the [`MoneyStore`] port.
//!
//! Every command that moves money is one transaction that changes the business row, writes
//! the ledger entry (`bursar_domain::ledger`, balanced by construction) and the balances
//! beside it, appends the outbox events, and commits the phased work's next step under its
//! fencing token ([`Step`]). So a crash leaves either all of it or none of it, and a driver
//! that lost its lease writes nothing at all.

use async_trait::async_trait;
use bursar_domain::ledger::{EntryKind, LedgerAccount, Posting};
use bursar_domain::{AccountId, Currency, Money, OrderStatus, Timestamp};
use serde::{Deserialize, Serialize};

use crate::{Lease, Page, PageRequest, Result, StoredResponse, WriteMeta};

/// The committed end of a phase, written by a money command in its own transaction.
#[derive(Debug, Clone)]
pub struct Step {
    pub lease: Lease,
    /// The recovery point the work stands at; the write is fenced on it too.
    pub from: String,
    /// The phase state to store (JSON text).
    pub state: String,
    pub now: Timestamp,
    pub end: StepEnd,
}

/// Where the step leaves the work.
#[derive(Debug, Clone)]
pub enum StepEnd {
    /// At recovery point `to`, still leased.
    Advance { to: String, lease_until: Timestamp },
    /// Finished: the response the command's responder renders is stored and replayed until
    /// `expires_at`.
    Finish { expires_at: Timestamp },
}

/// Renders the response stored with a finishing step, from the row the command wrote. It
/// runs inside the transaction, so the stored answer always names the committed row.
pub type Respond<'a, T> = &'a (dyn Fn(&T) -> StoredResponse + Send + Sync);

/// A [`Respond`] that can travel: a backend may hand the command to a group-commit writer
/// that renders the response in the transaction of a batch (SQLite's payments).
pub type Responder<T> = std::sync::Arc<dyn Fn(&T) -> StoredResponse + Send + Sync>;

/// Where a payment is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    /// Authorized; waiting for a capture or a void.
    RequiresCapture,
    /// Captured (in full or in part).
    Succeeded,
    /// Voided before capture.
    Canceled,
    /// Declined or refused by the processor; nothing moved.
    Failed,
}

impl PaymentStatus {
    pub const ALL: [PaymentStatus; 4] = [
        PaymentStatus::RequiresCapture,
        PaymentStatus::Succeeded,
        PaymentStatus::Canceled,
        PaymentStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::RequiresCapture => "requires_capture",
            PaymentStatus::Succeeded => "succeeded",
            PaymentStatus::Canceled => "canceled",
            PaymentStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<PaymentStatus> {
        PaymentStatus::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// A payment as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    pub id: i64,
    pub account_id: AccountId,
    pub order_id: i64,
    /// The processor's id; `None` when the processor refused to create one.
    pub processor_id: Option<String>,
    pub payment_method: String,
    /// The authorized amount.
    pub amount: Money,
    pub status: PaymentStatus,
    pub captured_minor: i64,
    /// Refunded or being refunded (reserved by a pending refund).
    pub refunded_minor: i64,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    pub version: i64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// What the processor answered for a new payment.
#[derive(Debug, Clone)]
pub struct NewPayment {
    pub order_id: i64,
    pub amount: Money,
    pub payment_method: String,
    pub processor_id: Option<String>,
    /// `RequiresCapture`, `Succeeded` (captured at once) or `Failed`.
    pub status: PaymentStatus,
    pub captured_minor: i64,
    /// `(code, message)` of a failed payment.
    pub failure: Option<(String, String)>,
}

impl NewPayment {
    /// The journal entries its record posts, the booking rule both backends write: an
    /// authorization unless it failed, and its capture when it was captured at once.
    pub fn entries(&self) -> Vec<bursar_domain::ledger::Entry> {
        use bursar_domain::ledger::Entry;
        let mut entries = Vec::new();
        if self.status != PaymentStatus::Failed {
            entries.push(Entry::authorization(self.amount));
        }
        if self.status == PaymentStatus::Succeeded {
            entries.push(Entry::capture(self.amount, self.captured_minor));
        }
        entries
    }
}

/// Where a refund is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefundStatus {
    /// Reserved against the payment; the processor has not confirmed it yet.
    Pending,
    Succeeded,
    /// The processor refused; the reservation was released.
    Failed,
}

impl RefundStatus {
    pub const ALL: [RefundStatus; 3] = [
        RefundStatus::Pending,
        RefundStatus::Succeeded,
        RefundStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefundStatus::Pending => "pending",
            RefundStatus::Succeeded => "succeeded",
            RefundStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<RefundStatus> {
        RefundStatus::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    pub id: i64,
    pub account_id: AccountId,
    pub payment_id: i64,
    pub amount: Money,
    pub status: RefundStatus,
    pub processor_id: Option<String>,
    pub failure_code: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// What the processor said about a reserved refund.
#[derive(Debug, Clone)]
pub enum RefundOutcome {
    Succeeded { processor_id: String },
    Failed { code: String },
}

/// A market rate as configured: `rate` units of `quote` per unit of `base` (decimal text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FxRate {
    pub base: Currency,
    pub quote: Currency,
    pub rate: String,
    pub set_at: Timestamp,
}

#[derive(Debug, Clone)]
pub struct NewQuote {
    pub from: Money,
    pub to: Money,
    /// The market rate the quote was made from, and the rate after the spread (decimal text).
    pub market_rate: String,
    pub rate: String,
    pub spread_bps: u32,
    pub expires_at: Timestamp,
}

/// A locked rate: converting it moves exactly `from` and `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quote {
    pub id: i64,
    pub account_id: AccountId,
    pub from: Money,
    pub to: Money,
    pub market_rate: String,
    pub rate: String,
    pub spread_bps: u32,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    /// When it was converted; a quote converts once.
    pub used_at: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversion {
    pub id: i64,
    pub account_id: AccountId,
    pub quote_id: i64,
    pub from: Money,
    pub to: Money,
    pub rate: String,
    pub created_at: Timestamp,
}

/// One ledger account's balance: always the sum of its postings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Balance {
    pub ledger_account: LedgerAccount,
    pub currency: Currency,
    pub minor: i64,
}

/// A journal entry with its postings, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JournalEntry {
    pub id: i64,
    pub account_id: AccountId,
    pub kind: EntryKind,
    /// `payment`, `refund` or `conversion`.
    pub reference_type: String,
    pub reference_id: i64,
    pub postings: Vec<Posting>,
    pub created_at: Timestamp,
}

/// A money rule that refused a command. Nothing was written; the caller answers with the
/// matching business error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The payment is not in a status the command applies to.
    PaymentState(PaymentStatus),
    /// The order is not pending: it takes no payment.
    OrderNotPayable(OrderStatus),
    /// Another payment of the order is being made or is authorized; cancel it first.
    OrderPaymentInProgress,
    /// The refund asks for more than what is captured and not yet refunded.
    RefundExceedsCaptured {
        refundable_minor: i64,
    },
    QuoteExpired,
    /// The quote was already converted (under another key).
    QuoteUsed,
    /// The available balance of the source currency is too small.
    InsufficientFunds {
        available_minor: i64,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct PaymentFilter {
    pub page: PageRequest,
    pub order_id: Option<i64>,
}

#[async_trait]
pub trait MoneyStore: Send + Sync {
    /// Claims a pending order for the payment made by the step's work and commits `step`
    /// (an advance), so no second payment of the order starts while this one is made or
    /// authorized. The claim is released when the payment fails or is voided. `NotFound`,
    /// `Rule(OrderNotPayable)` or `Rule(OrderPaymentInProgress)` otherwise.
    async fn claim_order(&self, meta: &WriteMeta, step: &Step, order_id: i64) -> Result<()>;

    /// Inserts the payment with its ledger entry (authorization, and capture when captured)
    /// and events (`payment.authorized`, `payment.succeeded` or `payment.failed`), moves a
    /// pending order captured in full to paid (`order.paid`), releases the order's claim if
    /// the payment failed, and commits `step`.
    async fn record_payment(
        &self,
        meta: &WriteMeta,
        step: &Step,
        new: NewPayment,
        respond: Responder<Payment>,
    ) -> Result<Payment>;

    /// Records the processor's capture of `captured_minor` of the authorized payment `read`
    /// (as the caller read it: the capture's ledger entry releases the rest of its amount),
    /// `payment.captured`, the order's move to paid when captured in full, and `step`.
    /// `Rule(PaymentState)` unless the payment requires capture. A backend may write against
    /// `read` when the payment is still as read (its version), and must otherwise settle
    /// from the payment as stored.
    async fn capture_payment(
        &self,
        meta: &WriteMeta,
        step: &Step,
        read: &Payment,
        captured_minor: i64,
        respond: Responder<Payment>,
    ) -> Result<Payment>;

    /// Records the void of an authorized payment (`payment.canceled`), releases the order's
    /// claim, and commits `step`.
    async fn void_payment(
        &self,
        meta: &WriteMeta,
        step: &Step,
        payment_id: i64,
        respond: Respond<'_, Payment>,
    ) -> Result<Payment>;

    async fn get_payment(&self, account: AccountId, id: i64) -> Result<Option<Payment>>;
    async fn list_payments(
        &self,
        account: AccountId,
        filter: PaymentFilter,
    ) -> Result<Page<Payment>>;

    /// Reserves `amount_minor` (what is left when `None`) of a captured payment for a new
    /// pending refund owned by the step's work, atomically against every other refund, and
    /// commits `step` (an advance). `Rule(RefundExceedsCaptured)` if it does not fit.
    async fn reserve_refund(
        &self,
        meta: &WriteMeta,
        step: &Step,
        payment_id: i64,
        amount_minor: Option<i64>,
    ) -> Result<Refund>;

    /// Settles the pending refund of the step's work: on success the ledger entry,
    /// `refund.created`, and the order's move to refunded once the payment is refunded in
    /// full; on failure the reservation is released (`refund.failed`). Commits `step`.
    async fn settle_refund(
        &self,
        meta: &WriteMeta,
        step: &Step,
        outcome: RefundOutcome,
        respond: Respond<'_, Refund>,
    ) -> Result<Refund>;

    /// The refund reserved by the work of idempotency record `operation_id`.
    async fn refund_for_operation(
        &self,
        account: AccountId,
        operation_id: i64,
    ) -> Result<Option<Refund>>;
    async fn get_refund(&self, account: AccountId, id: i64) -> Result<Option<Refund>>;
    async fn list_refunds(
        &self,
        account: AccountId,
        payment_id: Option<i64>,
        page: PageRequest,
    ) -> Result<Page<Refund>>;

    /// Replaces the rates of the given pairs (decimal text), stamped `at`. Rates are shared
    /// by all accounts.
    async fn set_rates(&self, rates: &[(Currency, Currency, String)], at: Timestamp) -> Result<()>;
    async fn rates(&self) -> Result<Vec<FxRate>>;

    /// Inserts a quote and commits `step` with its response.
    async fn record_quote(
        &self,
        meta: &WriteMeta,
        step: &Step,
        new: NewQuote,
        respond: Respond<'_, Quote>,
    ) -> Result<Quote>;
    async fn get_quote(&self, account: AccountId, id: i64) -> Result<Option<Quote>>;

    /// Converts a quote once: marks it used, checks and moves the available balances (ledger
    /// entry), `conversion.completed`, and `step`. `NotFound`, `Rule(QuoteExpired)`,
    /// `Rule(QuoteUsed)` or `Rule(InsufficientFunds)` otherwise.
    async fn convert(
        &self,
        meta: &WriteMeta,
        step: &Step,
        quote_id: i64,
        respond: Respond<'_, Conversion>,
    ) -> Result<Conversion>;
    async fn get_conversion(&self, account: AccountId, id: i64) -> Result<Option<Conversion>>;

    /// Every ledger account of the account that has postings, by currency then ledger
    /// account.
    async fn balances(&self, account: AccountId) -> Result<Vec<Balance>>;
    /// Journal entries with their postings, newest first.
    async fn journal(&self, account: AccountId, page: PageRequest) -> Result<Page<JournalEntry>>;
}
