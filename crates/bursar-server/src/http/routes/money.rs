//! Reads of payments, refunds, balances, the ledger, rates, quotes and conversions. Their
//! creates are phased operations (`services::money`), mounted by the operations registry.

use axum::Json as AxumJson;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bursar_api::{Balance, Conversion, LedgerEntry, List, Payment, Quote, Rate, Refund};
use bursar_storage::money::PaymentFilter;
use serde::Deserialize;

use super::{parse_id, parse_page};
use crate::http::error::ApiError;
use crate::http::extract::{Id, Params, if_none_match_hits};
use crate::http::render;
use crate::services::Call;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub limit: Option<String>,
    pub starting_after: Option<String>,
    /// Payments of this order only.
    pub order_id: Option<String>,
    /// Refunds of this payment only.
    pub payment_id: Option<String>,
}

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

pub async fn list_payments(
    call: Call,
    Params(q): Params<ListQuery>,
) -> Result<AxumJson<List<Payment>>, ApiError> {
    if q.payment_id.is_some() {
        return Err(unknown_param("payment_id"));
    }
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

fn unknown_param(name: &str) -> ApiError {
    ApiError::new(
        bursar_api::ErrorCode::InvalidParameter,
        format!("Invalid query parameter `{name}`: not accepted here."),
    )
    .with_details(vec![crate::http::error::issue(
        name,
        "unknown_parameter",
        "not accepted here",
    )])
}

pub async fn get_refund(call: Call, Id(id): Id) -> Result<AxumJson<Refund>, ApiError> {
    let r = call
        .state
        .store
        .get_refund(call.auth.account_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("refund"))?;
    Ok(AxumJson(render::refund(&r)))
}

pub async fn list_refunds(
    call: Call,
    Params(q): Params<ListQuery>,
) -> Result<AxumJson<List<Refund>>, ApiError> {
    if q.order_id.is_some() {
        return Err(unknown_param("order_id"));
    }
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

/// `GET /api/balances`: every currency the account has moved, with its ledger accounts.
pub async fn balances(call: Call) -> Result<AxumJson<List<Balance>>, ApiError> {
    let all = call.state.store.balances(call.auth.account_id).await?;
    Ok(AxumJson(List::new(render::balances(&all), false)))
}

pub async fn ledger_entries(
    call: Call,
    Params(q): Params<ListQuery>,
) -> Result<AxumJson<List<LedgerEntry>>, ApiError> {
    if let Some(name) = [("order_id", &q.order_id), ("payment_id", &q.payment_id)]
        .iter()
        .find_map(|(n, v)| v.is_some().then_some(*n))
    {
        return Err(unknown_param(name));
    }
    let page = parse_page(q.limit.as_deref(), q.starting_after.as_deref())?;
    let found = call.state.store.journal(call.auth.account_id, page).await?;
    Ok(AxumJson(List::new(
        found.items.iter().map(render::ledger_entry).collect(),
        found.has_more,
    )))
}

/// `GET /api/rates`: the market rates quotes are made from, with when each was set.
pub async fn rates(call: Call) -> Result<AxumJson<List<Rate>>, ApiError> {
    let all = call.state.store.rates().await?;
    Ok(AxumJson(List::new(
        all.iter().map(render::rate).collect(),
        false,
    )))
}

pub async fn get_quote(call: Call, Id(id): Id) -> Result<AxumJson<Quote>, ApiError> {
    let q = call
        .state
        .store
        .get_quote(call.auth.account_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("quote"))?;
    Ok(AxumJson(render::quote(&q)))
}

pub async fn get_conversion(call: Call, Id(id): Id) -> Result<AxumJson<Conversion>, ApiError> {
    let c = call
        .state
        .store
        .get_conversion(call.auth.account_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("conversion"))?;
    Ok(AxumJson(render::conversion(&c)))
}
