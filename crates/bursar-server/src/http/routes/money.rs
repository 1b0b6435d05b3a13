//! Reads of payments, refunds, balances, the ledger, rates, quotes and conversions. Their
//! creates are phased operations (`services::money`), mounted by the operations registry.

use axum::Json as AxumJson;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bursar_api::{
    Balance, CapturePayment, Conversion, CreateConversion, CreatePayment, CreateQuote,
    CreateRefund, ErrorBody, LedgerEntry, List, Payment, Quote, Rate, Refund,
};
use bursar_storage::money::PaymentFilter;

use super::{PageQuery, parse_id, parse_page};
use crate::http::error::ApiError;
use crate::http::extract::{Id, Params, if_none_match_hits};
use crate::http::render;
use crate::services::Call;

list_query!(PaymentsQuery, order_id: "Payments of this order only.");
list_query!(RefundsQuery, payment_id: "Refunds of this payment only.");

// The creates are phased operations mounted by the operations registry
// (`services::money`); these items only document them.

#[utoipa::path(post, path = "/api/payments", tag = "payments", request_body = CreatePayment,
    params(("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key and request get the first answer; the processor is never charged twice.")),
    responses(
        (status = 201, description = "Authorized (`capture: false`) or captured", body = Payment,
         headers(("ETag" = String), ("Location" = String))),
        (status = 402, description = "card_declined: stored and replayed; `decline_code`, `payment_id`", body = ErrorBody),
        (status = 409, description = "invalid_state (order not pending), idempotency_request_in_progress", body = ErrorBody),
        (status = 503, description = "The processor did not answer; retry with the same key", body = ErrorBody),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
#[allow(dead_code)]
fn create_payment() {}

#[utoipa::path(post, path = "/api/payments/{id}/capture", tag = "payments", request_body = CapturePayment,
    params(("id" = i64, Path, description = "Payment id"),
           ("Idempotency-Key" = Option<String>, Header, description = "As for creates")),
    responses(
        (status = 200, description = "Captured; the rest of the authorization is released", body = Payment),
        (status = 409, description = "invalid_state: only `requires_capture` payments", body = ErrorBody),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
#[allow(dead_code)]
fn capture_payment() {}

#[utoipa::path(post, path = "/api/payments/{id}/cancel", tag = "payments",
    params(("id" = i64, Path, description = "Payment id"),
           ("Idempotency-Key" = Option<String>, Header, description = "As for creates")),
    responses(
        (status = 200, description = "Voided", body = Payment),
        (status = 409, description = "invalid_state: only `requires_capture` payments", body = ErrorBody),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
#[allow(dead_code)]
fn cancel_payment() {}

#[utoipa::path(post, path = "/api/refunds", tag = "refunds", request_body = CreateRefund,
    params(("Idempotency-Key" = Option<String>, Header, description = "As for creates")),
    responses(
        (status = 201, description = "Refunded", body = Refund, headers(("Location" = String))),
        (status = 422, description = "refund_exceeds_captured (`refundable_minor`), validation_failed", body = ErrorBody),
        (status = 502, description = "processor_error: the processor refused the refund", body = ErrorBody),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
#[allow(dead_code)]
fn create_refund() {}

#[utoipa::path(post, path = "/api/quotes", tag = "fx", request_body = CreateQuote,
    params(("Idempotency-Key" = Option<String>, Header, description = "As for creates")),
    responses(
        (status = 201, description = "A rate locked for `fx.quote_ttl_secs`; `to_amount` rounded half-even", body = Quote),
        (status = 422, description = "rate_unavailable, validation_failed (`conversion_too_small`)", body = ErrorBody),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
#[allow(dead_code)]
fn create_quote() {}

#[utoipa::path(post, path = "/api/conversions", tag = "fx", request_body = CreateConversion,
    params(("Idempotency-Key" = Option<String>, Header, description = "As for creates")),
    responses(
        (status = 201, description = "Converted: exactly the quoted amounts moved", body = Conversion),
        (status = 409, description = "quote_expired, quote_used", body = ErrorBody),
        (status = 422, description = "insufficient_funds (`available_minor`)", body = ErrorBody),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
#[allow(dead_code)]
fn create_conversion() {}

#[utoipa::path(get, path = "/api/payments/{id}", tag = "payments",
    params(("id" = i64, Path, description = "Payment id")),
    responses((status = 200, description = "The payment", body = Payment, headers(("ETag" = String))),
        (status = 304, description = "Not modified"),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_payment(call: Call, Id(id): Id, headers: HeaderMap) -> Result<Response, ApiError> {
    let p = call
        .state
        .store
        .get_payment(call.auth.account_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("payment"))?;
    if if_none_match_hits(&headers, p.version) {
        return Ok(render::not_modified(p.version));
    }
    Ok(render::with_etag(
        StatusCode::OK,
        p.version,
        &render::payment(&p),
    ))
}

#[utoipa::path(get, path = "/api/payments", tag = "payments", params(PaymentsQuery),
    responses((status = 200, description = "Newest first", body = List<Payment>),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_payments(
    call: Call,
    Params(q): Params<PaymentsQuery>,
) -> Result<AxumJson<List<Payment>>, ApiError> {
    let filter = PaymentFilter {
        page: parse_page(q.limit.as_deref(), q.starting_after.as_deref())?,
        order_id: parse_id("order_id", q.order_id.as_deref())?,
    };
    let page = call
        .state
        .store
        .list_payments(call.auth.account_id, filter)
        .await?;
    Ok(AxumJson(List::new(
        page.items.iter().map(render::payment).collect(),
        page.has_more,
    )))
}

#[utoipa::path(get, path = "/api/refunds/{id}", tag = "refunds",
    params(("id" = i64, Path, description = "Refund id")),
    responses((status = 200, description = "The refund", body = Refund),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_refund(call: Call, Id(id): Id) -> Result<AxumJson<Refund>, ApiError> {
    let r = call
        .state
        .store
        .get_refund(call.auth.account_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("refund"))?;
    Ok(AxumJson(render::refund(&r)))
}

#[utoipa::path(get, path = "/api/refunds", tag = "refunds", params(RefundsQuery),
    responses((status = 200, description = "Newest first", body = List<Refund>),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_refunds(
    call: Call,
    Params(q): Params<RefundsQuery>,
) -> Result<AxumJson<List<Refund>>, ApiError> {
    let page = parse_page(q.limit.as_deref(), q.starting_after.as_deref())?;
    let payment_id = parse_id("payment_id", q.payment_id.as_deref())?;
    let found = call
        .state
        .store
        .list_refunds(call.auth.account_id, payment_id, page)
        .await?;
    Ok(AxumJson(List::new(
        found.items.iter().map(render::refund).collect(),
        found.has_more,
    )))
}

#[utoipa::path(get, path = "/api/balances", tag = "ledger",
    responses((status = 200, description = "One object per currency", body = List<Balance>),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
/// `GET /api/balances`: every currency the account has moved, with its ledger accounts.
pub async fn balances(call: Call) -> Result<AxumJson<List<Balance>>, ApiError> {
    let all = call.state.store.balances(call.auth.account_id).await?;
    Ok(AxumJson(List::new(render::balances(&all), false)))
}

#[utoipa::path(get, path = "/api/ledger_entries", tag = "ledger", params(PageQuery),
    responses((status = 200, description = "Journal entries with their postings, newest first", body = List<LedgerEntry>),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn ledger_entries(
    call: Call,
    Params(q): Params<PageQuery>,
) -> Result<AxumJson<List<LedgerEntry>>, ApiError> {
    let page = parse_page(q.limit.as_deref(), q.starting_after.as_deref())?;
    let found = call.state.store.journal(call.auth.account_id, page).await?;
    Ok(AxumJson(List::new(
        found.items.iter().map(render::ledger_entry).collect(),
        found.has_more,
    )))
}

#[utoipa::path(get, path = "/api/rates", tag = "fx",
    responses((status = 200, description = "Market rates with when each was set", body = List<Rate>),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
/// `GET /api/rates`: the market rates quotes are made from, with when each was set.
pub async fn rates(call: Call) -> Result<AxumJson<List<Rate>>, ApiError> {
    let all = call.state.store.rates().await?;
    Ok(AxumJson(List::new(
        all.iter().map(render::rate).collect(),
        false,
    )))
}

#[utoipa::path(get, path = "/api/quotes/{id}", tag = "fx",
    params(("id" = i64, Path, description = "Quote id")),
    responses((status = 200, description = "The quote", body = Quote),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_quote(call: Call, Id(id): Id) -> Result<AxumJson<Quote>, ApiError> {
    let q = call
        .state
        .store
        .get_quote(call.auth.account_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("quote"))?;
    Ok(AxumJson(render::quote(&q)))
}

#[utoipa::path(get, path = "/api/conversions/{id}", tag = "fx",
    params(("id" = i64, Path, description = "Conversion id")),
    responses((status = 200, description = "The conversion", body = Conversion),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_conversion(call: Call, Id(id): Id) -> Result<AxumJson<Conversion>, ApiError> {
    let c = call
        .state
        .store
        .get_conversion(call.auth.account_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("conversion"))?;
    Ok(AxumJson(render::conversion(&c)))
}
