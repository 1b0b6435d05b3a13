//! Payments, captures, cancels, refunds, quotes and conversions (issue 4): each a phased
//! [`Operation`], so every create is idempotent and survives a crash at any instant.
//!
//! The phases (recovery points in brackets):
//!
//! - **payment** `[started]` checks the order and commits the request → `[authorizing]` calls
//!   the processor with the outbound key and records the answer — payment row, ledger entry,
//!   events, the order's status and the stored response in one transaction. A crash after the
//!   processor charged reruns `[authorizing]`; the processor answers the same key with the
//!   same charge, so the charge is recorded once and made once. The order is checked before
//!   the recovery point, never after, so a rerun cannot refuse a charge already made.
//! - **capture / cancel** `[started]` checks the payment, calls the processor, records. A
//!   rerun repeats the check against Bursar's own record, which only the recording changes.
//! - **refund** `[started]` reserves the amount against the payment in one conditional write
//!   (so concurrent refunds never exceed the capture) → `[reserved]` calls the processor and
//!   settles (or releases) the reservation.
//! - **quote** and **conversion** never leave the database: one phase, one transaction.
//!
//! Deterministic refusals (a decline, an expired quote, a refund that does not fit) are
//! stored answers, replayed to every retry with the same key; only an unreachable processor
//! or database leaves the work unfinished for the retry or the completer.

use std::sync::Arc;

use async_trait::async_trait;
use bursar_api::{
    Amount, CapturePayment, CreateConversion, CreatePayment, CreateQuote, CreateRefund, ErrorCode,
    FieldIssue,
};
use bursar_domain::fx::{self, FxError, Rate};
use bursar_domain::{Currency, Money, Timestamp};
use bursar_storage::money::{
    Conversion, FxRate, NewPayment, NewQuote, Payment, PaymentStatus, Quote, Refund, RefundOutcome,
    Responder,
};
use bursar_storage::operations::{FirstStep, Prefetch, Prefetched, STARTED};
use bursar_storage::{Rule, StorageError, StoredResponse};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::operations::{Operation, Operations, Phase, PhaseCtx, PhaseError};
use crate::http::error::{ApiError, issue};
use crate::http::extract::parse_json;
use crate::http::render;
use crate::processor::{PaymentRequest, Processor, ProcessorError};

pub const PAYMENTS_ROUTE: &str = "/api/payments";
pub const CAPTURE_ROUTE: &str = "/api/payments/{id}/capture";
pub const CANCEL_ROUTE: &str = "/api/payments/{id}/cancel";
pub const REFUNDS_ROUTE: &str = "/api/refunds";
pub const QUOTES_ROUTE: &str = "/api/quotes";
pub const CONVERSIONS_ROUTE: &str = "/api/conversions";

/// Mounts every money operation.
pub fn register(ops: &mut Operations) {
    ops.register(Arc::new(CreatePaymentOp));
    ops.register(Arc::new(SettlePaymentOp {
        route: CAPTURE_ROUTE,
        capture: true,
    }));
    ops.register(Arc::new(SettlePaymentOp {
        route: CANCEL_ROUTE,
        capture: false,
    }));
    ops.register(Arc::new(CreateRefundOp));
    ops.register(Arc::new(CreateQuoteOp));
    ops.register(Arc::new(CreateConversionOp));
}

const AUTHORIZING: &str = "authorizing";
const RESERVED: &str = "reserved";
const PAYMENT_METHOD_MAX: usize = 100;

/// What a phase answers with when a rule refuses the request: stored, replayed.
fn refuse(ctx: &PhaseCtx, err: ApiError) -> Result<Phase, PhaseError> {
    Ok(Phase::Finish(ctx.error_response(&err)))
}

fn processor(ctx: &PhaseCtx) -> Result<Arc<dyn Processor>, PhaseError> {
    ctx.state
        .processor
        .clone()
        .ok_or_else(|| PhaseError::Retryable("no payment processor is configured".into()))
}

/// The stored request, parsed again by a later phase (it was validated before it was stored).
fn request<T: serde::de::DeserializeOwned>(ctx: &PhaseCtx) -> Result<T, ApiError> {
    parse_json(&ctx.request)
}

/// Parses `amount` in `currency` (`services::parse_amount`) as a 422.
fn money_in(field: &str, amount: &Amount, currency: Currency) -> Result<Money, ApiError> {
    super::parse_amount(field, amount, currency).map_err(|i| ApiError::validation(vec![i]))
}

fn payment_state(current: PaymentStatus, wanted: &str) -> ApiError {
    ApiError::new(
        ErrorCode::InvalidState,
        format!(
            "The payment is {}; {wanted}.",
            current.as_str().replace('_', " ")
        ),
    )
    .with_extra("current_status", current.as_str())
}

/// A storage refusal turned into the stored answer, or the storage failure passed on.
fn refusal(ctx: &PhaseCtx, e: StorageError, what: &str) -> Result<Phase, PhaseError> {
    let err = match e {
        StorageError::NotFound => ApiError::not_found(what),
        StorageError::Rule(Rule::PaymentState(current)) => {
            payment_state(current, "the request does not apply to it")
        }
        StorageError::Rule(Rule::OrderNotPayable(current)) => ApiError::new(
            ErrorCode::InvalidState,
            format!(
                "The order is {}; only pending orders take payments.",
                current.as_str()
            ),
        )
        .with_extra("current_status", current.as_str()),
        StorageError::Rule(Rule::OrderPaymentInProgress) => ApiError::new(
            ErrorCode::InvalidState,
            "Another payment of this order is in progress or authorized; cancel it first.",
        )
        .with_extra("current_status", "pending"),
        StorageError::Rule(Rule::RefundExceedsCaptured { refundable_minor }) => ApiError::new(
            ErrorCode::RefundExceedsCaptured,
            format!(
                "The refund exceeds what is captured and not yet refunded ({refundable_minor} \
                 minor units)."
            ),
        )
        .with_extra("refundable_minor", refundable_minor),
        StorageError::Rule(Rule::QuoteExpired) => ApiError::new(
            ErrorCode::QuoteExpired,
            "The quote has expired; ask for a new one.",
        ),
        StorageError::Rule(Rule::QuoteUsed) => ApiError::new(
            ErrorCode::QuoteUsed,
            "The quote was already converted; a quote converts once.",
        ),
        StorageError::Rule(Rule::InsufficientFunds { available_minor }) => ApiError::new(
            ErrorCode::InsufficientFunds,
            "The available balance of the source currency is too small.",
        )
        .with_extra("available_minor", available_minor),
        e => return Err(PhaseError::Storage(e)),
    };
    refuse(ctx, err)
}

/// The answer part of an error (never its source), for responders that render it more than
/// once.
fn copy(e: &ApiError) -> ApiError {
    let mut c = ApiError::new(e.code, e.message.clone()).with_details(e.details.clone());
    c.extra = e.extra.clone();
    c
}

fn processor_refused(code: &str, message: &str) -> ApiError {
    ApiError::new(
        ErrorCode::ProcessorError,
        format!("The payment processor refused the request: {message}"),
    )
    .with_extra("processor_code", code)
}

/// `POST /api/payments`.
struct CreatePaymentOp;

#[derive(Serialize, Deserialize)]
struct Authorizing {
    order_id: i64,
    amount_minor: i64,
    currency: String,
    payment_method: String,
    capture: bool,
}

/// The first phase's decision for `req` against its order as read (`None`: not found in the
/// account): the order to claim and the `authorizing` state, or the answer that refuses.
fn authorizing(
    req: CreatePayment,
    found: Option<bursar_storage::Order>,
) -> Result<(i64, Value), ApiError> {
    let Some(order) = found else {
        return Err(ApiError::not_found("order"));
    };
    let amount = match &req.amount {
        None => order.amount,
        Some(a) => money_in("amount", a, order.amount.currency)?,
    };
    if amount.minor > order.amount.minor {
        return Err(ApiError::validation(vec![issue(
            "amount",
            "exceeds_order_amount",
            "must not exceed the order's amount",
        )]));
    }
    let next = Authorizing {
        order_id: order.id,
        amount_minor: amount.minor,
        currency: amount.currency.code().to_owned(),
        payment_method: req.payment_method,
        capture: req.capture.unwrap_or(true),
    };
    Ok((
        order.id,
        serde_json::to_value(next).expect("plain data serialises"),
    ))
}

#[async_trait]
impl Operation for CreatePaymentOp {
    fn route(&self) -> &'static str {
        PAYMENTS_ROUTE
    }

    fn validate(&self, body: &[u8]) -> Result<(), ApiError> {
        let req: CreatePayment = parse_json(body)?;
        let mut issues = Vec::new();
        if req.order_id <= 0 {
            issues.push(issue("order_id", "invalid", "must be a positive id"));
        }
        let pm = &req.payment_method;
        if pm.is_empty()
            || pm.len() > PAYMENT_METHOD_MAX
            || !pm.bytes().all(|b| b.is_ascii_graphic())
        {
            issues.push(issue(
                "payment_method",
                "invalid",
                format!("1 to {PAYMENT_METHOD_MAX} printable ASCII characters"),
            ));
        }
        check_amount_shape(&mut issues, "amount", req.amount.as_ref());
        super::finish(issues)
    }

    fn prefetch(&self, request: &[u8]) -> Option<Prefetch> {
        let req: CreatePayment = serde_json::from_slice(request).ok()?;
        Some(Prefetch::Order(req.order_id))
    }

    /// The order's claim, when the prefetched order passes the first phase's checks: the
    /// claim of the key then carries it, and the payment goes to the processor with one
    /// step fewer (ADR 0007). A failed check is left to the phase, which stores the answer.
    fn first_step(&self, ctx: &PhaseCtx) -> Option<FirstStep> {
        let req: CreatePayment = request(ctx).ok()?;
        let found = Prefetched::order(ctx.prefetched.as_deref(), req.order_id)?;
        let (order_id, next) = authorizing(req, found).ok()?;
        Some(FirstStep::ClaimOrder {
            step: ctx.advance_step(STARTED, AUTHORIZING, &next),
            order_id,
        })
    }

    fn decides_first_step(&self) -> bool {
        true
    }

    async fn phase(&self, ctx: &PhaseCtx, point: &str, state: &Value) -> Result<Phase, PhaseError> {
        match point {
            STARTED => {
                let req: CreatePayment = match request(ctx) {
                    Ok(r) => r,
                    Err(e) => return refuse(ctx, e),
                };
                let store = &ctx.state.store;
                let found = match Prefetched::order(ctx.prefetched.as_deref(), req.order_id) {
                    Some(found) => found,
                    None => store.get_order(ctx.account_id, req.order_id).await?,
                };
                let (order_id, next) = match authorizing(req, found) {
                    Ok(decided) => decided,
                    Err(e) => return refuse(ctx, e),
                };
                // The order is claimed with the recovery point: from here on the charge may
                // happen, and no second payment of the order can start.
                let step = ctx.advance_step(STARTED, AUTHORIZING, &next);
                match store.claim_order(&ctx.write_meta(), &step, order_id).await {
                    Ok(()) => Ok(Phase::Advanced {
                        to: AUTHORIZING.into(),
                        state: next,
                    }),
                    Err(e) => refusal(ctx, e, "order"),
                }
            }
            AUTHORIZING => {
                let a: Authorizing = serde_json::from_value(state.clone())
                    .map_err(|e| PhaseError::Storage(StorageError::Internal(e.into())))?;
                let currency = Currency::from_code(&a.currency).ok_or_else(|| {
                    PhaseError::Storage(StorageError::Internal("stored currency".into()))
                })?;
                let amount = Money::from_minor(a.amount_minor, currency)
                    .map_err(|e| PhaseError::Storage(StorageError::Internal(e.into())))?;
                let charged = processor(ctx)?
                    .create_payment(
                        &ctx.outbound(),
                        &PaymentRequest {
                            amount_minor: a.amount_minor,
                            currency: a.currency.clone(),
                            payment_method: a.payment_method.clone(),
                            capture: a.capture,
                        },
                    )
                    .await;
                let base = NewPayment {
                    order_id: a.order_id,
                    amount,
                    payment_method: a.payment_method.clone(),
                    processor_id: None,
                    status: PaymentStatus::Failed,
                    captured_minor: 0,
                    failure: None,
                };
                let (new, failure) = match charged {
                    Ok(p) => {
                        let captured = p.status == "captured";
                        let new = NewPayment {
                            processor_id: Some(p.id),
                            status: if captured {
                                PaymentStatus::Succeeded
                            } else {
                                PaymentStatus::RequiresCapture
                            },
                            captured_minor: if captured { p.captured_minor } else { 0 },
                            ..base
                        };
                        (new, None)
                    }
                    Err(ProcessorError::Declined { code, message }) => {
                        let err = ApiError::new(
                            ErrorCode::CardDeclined,
                            format!("The card was declined: {message}."),
                        )
                        .with_extra("decline_code", code.as_str());
                        let new = NewPayment {
                            failure: Some((code, message)),
                            ..base
                        };
                        (new, Some(err))
                    }
                    Err(ProcessorError::Refused { code, message, .. }) => {
                        let err = processor_refused(&code, &message);
                        let new = NewPayment {
                            failure: Some((code, message)),
                            ..base
                        };
                        (new, Some(err))
                    }
                    Err(e @ ProcessorError::Unavailable { .. }) => {
                        return Err(PhaseError::Retryable(e.to_string()));
                    }
                };
                // The store may render the answer in a batch's transaction, off this task.
                let (request_id, trace_id) = (ctx.request_id.clone(), ctx.trace_id.clone());
                let respond: Responder<Payment> = Arc::new(move |p: &Payment| match &failure {
                    None => render::created_stored(
                        format!("/api/payments/{}", p.id),
                        p.version,
                        &render::payment(p),
                    ),
                    Some(err) => super::operations::stored_error(
                        &request_id,
                        &trace_id,
                        &copy(err)
                            .with_extra("payment_id", p.id)
                            .with_extra("payment_status", p.status.as_str()),
                    ),
                });
                let step = ctx.finish_step(AUTHORIZING, state);
                let p = ctx
                    .state
                    .store
                    .record_payment(&ctx.write_meta(), &step, new, respond.clone())
                    .await?;
                Ok(Phase::Stored(respond(&p)))
            }
            other => Err(unknown_point(other)),
        }
    }

    fn abandoned(&self, ctx: &PhaseCtx, point: &str, _state: &Value) -> StoredResponse {
        let message = if point == AUTHORIZING {
            "The payment processor never answered; the outcome of the charge is unknown. \
             Check GET /api/payments before paying this order again."
        } else {
            "The payment could not be started; nothing was charged."
        };
        ctx.error_response(&ApiError::new(ErrorCode::ProcessorError, message))
    }
}

fn unknown_point(point: &str) -> PhaseError {
    PhaseError::Storage(StorageError::Internal(
        format!("unknown recovery point {point:?}").into(),
    ))
}

/// A decimal amount, if given, must at least be a number; its decimals are checked against
/// the currency once the currency is known.
fn check_amount_shape(issues: &mut Vec<FieldIssue>, field: &str, amount: Option<&Amount>) {
    if let Some(a) = amount
        && a.text().is_none()
    {
        issues.push(super::amount_shape_issue(field));
    }
}

/// The path id of `/api/payments/{id}/…`, as `Id` reads it: anything else names nothing.
fn path_id(params: &[(String, String)]) -> Result<i64, ApiError> {
    params
        .iter()
        .find(|(k, _)| k == "id")
        .and_then(|(_, v)| v.parse::<i64>().ok())
        .filter(|v| *v > 0)
        .ok_or_else(|| ApiError::not_found("payment"))
}

/// `POST /api/payments/{id}/capture` and `POST /api/payments/{id}/cancel`.
struct SettlePaymentOp {
    route: &'static str,
    capture: bool,
}

impl SettlePaymentOp {
    /// The body, checked: a cancel takes no amount; an amount must be decimal text.
    fn parse(&self, body: &[u8]) -> Result<CapturePayment, ApiError> {
        let req: CapturePayment = parse_json(body)?;
        if !self.capture && req.amount.is_some() {
            return Err(ApiError::validation(vec![issue(
                "amount",
                "unknown_field",
                "a cancel releases the whole authorization",
            )]));
        }
        let mut issues = Vec::new();
        check_amount_shape(&mut issues, "amount", req.amount.as_ref());
        super::finish(issues)?;
        Ok(req)
    }
}

/// The stored request of a capture or cancel: the path id folded into the body.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SettleRequest {
    payment_id: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    amount: Option<Amount>,
}

#[async_trait]
impl Operation for SettlePaymentOp {
    fn route(&self) -> &'static str {
        self.route
    }

    fn validate(&self, body: &[u8]) -> Result<(), ApiError> {
        self.parse(body).map(|_| ())
    }

    fn prepare(&self, params: &[(String, String)], body: &[u8]) -> Result<Vec<u8>, ApiError> {
        let payment_id = path_id(params)?;
        // An empty body means "no options".
        let body = if body.iter().all(u8::is_ascii_whitespace) {
            b"{}".as_slice()
        } else {
            body
        };
        let req = self.parse(body)?;
        Ok(serde_json::to_vec(&SettleRequest {
            payment_id,
            amount: req.amount,
        })
        .expect("plain data serialises"))
    }

    fn prefetch(&self, request: &[u8]) -> Option<Prefetch> {
        let req: SettleRequest = serde_json::from_slice(request).ok()?;
        Some(Prefetch::Payment(req.payment_id))
    }

    async fn phase(&self, ctx: &PhaseCtx, point: &str, state: &Value) -> Result<Phase, PhaseError> {
        if point != STARTED {
            return Err(unknown_point(point));
        }
        let req: SettleRequest = match request(ctx) {
            Ok(r) => r,
            Err(e) => return refuse(ctx, e),
        };
        let store = &ctx.state.store;
        let found = match Prefetched::payment(ctx.prefetched.as_deref(), req.payment_id) {
            Some(found) => found,
            None => store.get_payment(ctx.account_id, req.payment_id).await?,
        };
        let Some(p) = found else {
            return refuse(ctx, ApiError::not_found("payment"));
        };
        let wanted = if self.capture {
            "only authorized payments can be captured"
        } else {
            "only authorized payments can be canceled"
        };
        if p.status != PaymentStatus::RequiresCapture {
            return refuse(ctx, payment_state(p.status, wanted));
        }
        let Some(processor_id) = p.processor_id.clone() else {
            return refuse(ctx, payment_state(p.status, wanted));
        };
        let amount = match &req.amount {
            None => p.amount,
            Some(a) => match money_in("amount", a, p.amount.currency) {
                Ok(m) => m,
                Err(e) => return refuse(ctx, e),
            },
        };
        if amount.minor > p.amount.minor {
            return refuse(
                ctx,
                ApiError::validation(vec![issue(
                    "amount",
                    "exceeds_authorized_amount",
                    "must not exceed the authorized amount",
                )]),
            );
        }
        let processor = processor(ctx)?;
        let call = ctx.outbound();
        let answered = if self.capture {
            processor
                .capture(&call, &processor_id, Some(amount.minor))
                .await
        } else {
            processor.void(&call, &processor_id).await
        };
        let settled = match answered {
            Ok(settled) => settled,
            Err(e @ ProcessorError::Unavailable { .. }) => {
                return Err(PhaseError::Retryable(e.to_string()));
            }
            Err(
                ProcessorError::Declined { code, message }
                | ProcessorError::Refused { code, message, .. },
            ) => return refuse(ctx, processor_refused(&code, &message)),
        };
        let respond: Responder<Payment> =
            Arc::new(|p: &Payment| render::ok_stored(p.version, &render::payment(p)));
        let step = ctx.finish_step(STARTED, state);
        let meta = ctx.write_meta();
        let recorded = if self.capture {
            let captured = settled.captured_minor;
            store
                .capture_payment(&meta, &step, &p, captured, respond.clone())
                .await
        } else {
            store
                .void_payment(&meta, &step, p.id, respond.as_ref())
                .await
        };
        match recorded {
            Ok(p) => Ok(Phase::Stored(respond(&p))),
            Err(e) => refusal(ctx, e, "payment"),
        }
    }

    fn abandoned(&self, ctx: &PhaseCtx, _point: &str, _state: &Value) -> StoredResponse {
        ctx.error_response(&ApiError::new(
            ErrorCode::ProcessorError,
            "The payment processor never answered; the payment is unchanged in Bursar. \
             Check GET /api/payments/{id} and retry with a new key.",
        ))
    }
}

/// `POST /api/refunds`.
struct CreateRefundOp;

#[async_trait]
impl Operation for CreateRefundOp {
    fn route(&self) -> &'static str {
        REFUNDS_ROUTE
    }

    fn validate(&self, body: &[u8]) -> Result<(), ApiError> {
        let req: CreateRefund = parse_json(body)?;
        let mut issues = Vec::new();
        if req.payment_id <= 0 {
            issues.push(issue("payment_id", "invalid", "must be a positive id"));
        }
        check_amount_shape(&mut issues, "amount", req.amount.as_ref());
        super::finish(issues)
    }

    async fn phase(&self, ctx: &PhaseCtx, point: &str, state: &Value) -> Result<Phase, PhaseError> {
        let store = &ctx.state.store;
        match point {
            STARTED => {
                let req: CreateRefund = match request(ctx) {
                    Ok(r) => r,
                    Err(e) => return refuse(ctx, e),
                };
                let Some(p) = store.get_payment(ctx.account_id, req.payment_id).await? else {
                    return refuse(ctx, ApiError::not_found("payment"));
                };
                let amount = match &req.amount {
                    None => None,
                    Some(a) => match money_in("amount", a, p.amount.currency) {
                        Ok(m) => Some(m.minor),
                        Err(e) => return refuse(ctx, e),
                    },
                };
                let step = ctx.advance_step(STARTED, RESERVED, state);
                match store
                    .reserve_refund(&ctx.write_meta(), &step, p.id, amount)
                    .await
                {
                    Ok(_) => Ok(Phase::Advanced {
                        to: RESERVED.into(),
                        state: state.clone(),
                    }),
                    Err(e) => refusal(ctx, e, "payment"),
                }
            }
            RESERVED => {
                let Some(r) = store
                    .refund_for_operation(ctx.account_id, ctx.lease.record_id)
                    .await?
                else {
                    return Err(unknown_point("reserved without a refund"));
                };
                let p = store
                    .get_payment(ctx.account_id, r.payment_id)
                    .await?
                    .ok_or(PhaseError::Storage(StorageError::NotFound))?;
                let processor_id = p.processor_id.clone().unwrap_or_default();
                let answered = processor(ctx)?
                    .refund(&ctx.outbound(), &processor_id, Some(r.amount.minor))
                    .await;
                let (outcome, failure) = match answered {
                    Ok(done) => (
                        RefundOutcome::Succeeded {
                            processor_id: done.id,
                        },
                        None,
                    ),
                    Err(e @ ProcessorError::Unavailable { .. }) => {
                        return Err(PhaseError::Retryable(e.to_string()));
                    }
                    Err(
                        ProcessorError::Declined { code, message }
                        | ProcessorError::Refused { code, message, .. },
                    ) => (
                        RefundOutcome::Failed { code: code.clone() },
                        Some(processor_refused(&code, &message)),
                    ),
                };
                let respond = |r: &Refund| match &failure {
                    None => render::created_stored(
                        format!("/api/refunds/{}", r.id),
                        1,
                        &render::refund(r),
                    ),
                    Some(err) => ctx.error_response(&copy(err).with_extra("refund_id", r.id)),
                };
                let step = ctx.finish_step(RESERVED, state);
                let r = store
                    .settle_refund(&ctx.write_meta(), &step, outcome, &respond)
                    .await?;
                Ok(Phase::Stored(respond(&r)))
            }
            other => Err(unknown_point(other)),
        }
    }

    fn abandoned(&self, ctx: &PhaseCtx, point: &str, _state: &Value) -> StoredResponse {
        // The reservation stays: the processor may have refunded, so the money is not
        // offered to another refund until someone settles it.
        let message = if point == RESERVED {
            "The payment processor never answered; the refund stays pending (reserved)."
        } else {
            "The refund could not be started; nothing was reserved."
        };
        ctx.error_response(&ApiError::new(ErrorCode::ProcessorError, message))
    }
}

/// The market rate of a pair: as configured, or the inverse of the opposite pair.
pub fn market_rate(rates: &[FxRate], from: Currency, to: Currency) -> Option<Rate> {
    let direct = rates.iter().find(|r| r.base == from && r.quote == to);
    if let Some(r) = direct {
        return Rate::parse(&r.rate).ok();
    }
    let opposite = rates.iter().find(|r| r.base == to && r.quote == from)?;
    Rate::parse(&opposite.rate).ok()?.inverse().ok()
}

fn currency_field(issues: &mut Vec<FieldIssue>, field: &str, code: &str) -> Option<Currency> {
    let c = Currency::from_code(code);
    if c.is_none() {
        issues.push(issue(
            field,
            "invalid_currency",
            "an ISO 4217 code, upper case",
        ));
    }
    c
}

fn fx_error(e: FxError) -> ApiError {
    let message = match e {
        FxError::ConversionTooSmall => "converts to less than one minor unit",
        FxError::TooLarge => "too large to convert",
        FxError::SameCurrency => "the currencies must differ",
        FxError::InvalidRate | FxError::InvalidSpread => "no usable rate",
    };
    ApiError::validation(vec![issue("amount", e.code(), message)])
}

/// `POST /api/quotes`.
struct CreateQuoteOp;

impl CreateQuoteOp {
    fn parse(body: &[u8]) -> Result<(Money, Currency), ApiError> {
        let req: CreateQuote = parse_json(body)?;
        let mut issues = Vec::new();
        let from = currency_field(&mut issues, "from_currency", &req.from_currency);
        let to = currency_field(&mut issues, "to_currency", &req.to_currency);
        let amount = from.and_then(|c| match money_in("amount", &req.amount, c) {
            Ok(m) => Some(m),
            Err(e) => {
                issues.extend(e.details);
                None
            }
        });
        if from.is_some() && from == to {
            issues.push(issue(
                "to_currency",
                "same_currency",
                "must differ from from_currency",
            ));
        }
        super::finish(issues)?;
        match (amount, to) {
            (Some(a), Some(t)) => Ok((a, t)),
            _ => Err(ApiError::validation(vec![])),
        }
    }
}

#[async_trait]
impl Operation for CreateQuoteOp {
    fn route(&self) -> &'static str {
        QUOTES_ROUTE
    }

    fn validate(&self, body: &[u8]) -> Result<(), ApiError> {
        Self::parse(body).map(|_| ())
    }

    async fn phase(&self, ctx: &PhaseCtx, point: &str, state: &Value) -> Result<Phase, PhaseError> {
        if point != STARTED {
            return Err(unknown_point(point));
        }
        let (from, to) = match Self::parse(&ctx.request) {
            Ok(v) => v,
            Err(e) => return refuse(ctx, e),
        };
        let store = &ctx.state.store;
        let rates = store.rates().await?;
        let Some(market) = market_rate(&rates, from.currency, to) else {
            return refuse(
                ctx,
                ApiError::new(
                    ErrorCode::RateUnavailable,
                    format!(
                        "No rate is configured for {} to {}.",
                        from.currency.code(),
                        to.code()
                    ),
                ),
            );
        };
        let config = &ctx.state.config.fx;
        let terms = market
            .with_spread(config.spread_bps)
            .and_then(|rate| Ok((rate, fx::convert(from, to, rate)?)));
        let (rate, converted) = match terms {
            Ok(t) => t,
            Err(e) => return refuse(ctx, fx_error(e)),
        };
        let now = ctx.state.clock.now();
        let ttl = i64::try_from(config.quote_ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        let new = NewQuote {
            from,
            to: converted,
            market_rate: market.to_text(),
            rate: rate.to_text(),
            spread_bps: config.spread_bps,
            expires_at: Timestamp(now.0.saturating_add(ttl)),
        };
        let respond = |q: &Quote| {
            render::created_stored(format!("/api/quotes/{}", q.id), 1, &render::quote(q))
        };
        let step = ctx.finish_step(STARTED, state);
        let q = store
            .record_quote(&ctx.write_meta(), &step, new, &respond)
            .await?;
        Ok(Phase::Stored(respond(&q)))
    }

    fn abandoned(&self, ctx: &PhaseCtx, _point: &str, _state: &Value) -> StoredResponse {
        ctx.error_response(&ApiError::new(
            ErrorCode::ServiceUnavailable,
            "The quote could not be made; ask again with a new key.",
        ))
    }
}

/// `POST /api/conversions`.
struct CreateConversionOp;

#[async_trait]
impl Operation for CreateConversionOp {
    fn route(&self) -> &'static str {
        CONVERSIONS_ROUTE
    }

    fn validate(&self, body: &[u8]) -> Result<(), ApiError> {
        let req: CreateConversion = parse_json(body)?;
        if req.quote_id <= 0 {
            return Err(ApiError::validation(vec![issue(
                "quote_id",
                "invalid",
                "must be a positive id",
            )]));
        }
        Ok(())
    }

    async fn phase(&self, ctx: &PhaseCtx, point: &str, state: &Value) -> Result<Phase, PhaseError> {
        if point != STARTED {
            return Err(unknown_point(point));
        }
        let req: CreateConversion = match request(ctx) {
            Ok(r) => r,
            Err(e) => return refuse(ctx, e),
        };
        let respond = |c: &Conversion| {
            render::created_stored(
                format!("/api/conversions/{}", c.id),
                1,
                &render::conversion(c),
            )
        };
        let step = ctx.finish_step(STARTED, state);
        match ctx
            .state
            .store
            .convert(&ctx.write_meta(), &step, req.quote_id, &respond)
            .await
        {
            Ok(c) => Ok(Phase::Stored(respond(&c))),
            Err(e) => refusal(ctx, e, "quote"),
        }
    }

    fn abandoned(&self, ctx: &PhaseCtx, _point: &str, _state: &Value) -> StoredResponse {
        ctx.error_response(&ApiError::new(
            ErrorCode::ServiceUnavailable,
            "The conversion could not be made; nothing moved.",
        ))
    }
}

/// The rates file: `{"rates": [{"base": "USD", "quote": "EUR", "rate": "0.92"}]}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RatesFile {
    rates: Vec<RateLine>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLine {
    base: String,
    quote: String,
    rate: String,
}

/// Parses a rates file and stores every rate, stamped `at`; all or nothing. Returns how
/// many rates it set.
pub async fn load_rates(
    store: &dyn bursar_storage::Storage,
    text: &str,
    at: Timestamp,
) -> anyhow::Result<usize> {
    let file: RatesFile = serde_json::from_str(text)
        .map_err(|e| anyhow::anyhow!("the rates file is not valid: {e}"))?;
    let mut rates = Vec::with_capacity(file.rates.len());
    for (i, line) in file.rates.iter().enumerate() {
        let currency = |code: &str| {
            Currency::from_code(code)
                .ok_or_else(|| anyhow::anyhow!("rate {i}: unknown currency {code:?}"))
        };
        let (base, quote) = (currency(&line.base)?, currency(&line.quote)?);
        if base == quote {
            anyhow::bail!("rate {i}: base and quote are both {}", base.code());
        }
        let rate = Rate::parse(&line.rate)
            .map_err(|e| anyhow::anyhow!("rate {i}: {:?} is not a rate: {e}", line.rate))?;
        rates.push((base, quote, rate.to_text()));
    }
    store.set_rates(&rates, at).await?;
    Ok(rates.len())
}
