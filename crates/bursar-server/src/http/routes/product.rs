//! `/api/keys`, `/api/usage` and `/api/invoices/upcoming`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bursar_api::{ApiKey, CreateApiKey, ErrorBody, Invoice, List, RollApiKey, Usage};
use serde::Deserialize;
use utoipa::IntoParams;

use super::{PageQuery, bad_param, parse_page, parse_time};
use crate::http::error::ApiError;
use crate::http::extract::{Id, Json, OptionalJsonBytes, Params, parse_json};
use crate::services::Call;
use crate::services::product::{self, GroupBy};

#[utoipa::path(post, path = "/api/keys", tag = "keys", request_body = CreateApiKey,
    responses(
        (status = 201, description = "Created; `secret` is shown this once", body = ApiKey),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn create(call: Call, Json(req): Json<CreateApiKey>) -> Result<Response, ApiError> {
    let key = product::create_key(&call, req).await?;
    Ok((StatusCode::CREATED, axum::Json(key)).into_response())
}

#[utoipa::path(get, path = "/api/keys", tag = "keys", params(PageQuery),
    responses(
        (status = 200, description = "The account's keys, newest first (never their secrets)", body = List<ApiKey>),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list(
    call: Call,
    Params(q): Params<PageQuery>,
) -> Result<axum::Json<List<ApiKey>>, ApiError> {
    let page = parse_page(q.limit.as_deref(), q.starting_after.as_deref())?;
    let keys = product::list_keys(&call, page).await?;
    Ok(axum::Json(List::new(
        keys.items
            .iter()
            .map(|k| product::render_key(k, None))
            .collect(),
        keys.has_more,
    )))
}

#[utoipa::path(get, path = "/api/keys/{id}", tag = "keys",
    params(("id" = i64, Path, description = "Key id")),
    responses(
        (status = 200, description = "The key (never its secret)", body = ApiKey),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get(call: Call, Id(id): Id) -> Result<axum::Json<ApiKey>, ApiError> {
    let key = product::get_key(&call, id).await?;
    Ok(axum::Json(product::render_key(&key, None)))
}

#[utoipa::path(post, path = "/api/keys/{id}/roll", tag = "keys", request_body = RollApiKey,
    params(("id" = i64, Path, description = "Key id")),
    responses(
        (status = 201, description = "The new key, `secret` shown this once; the old key works for the grace period", body = ApiKey),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn roll(
    call: Call,
    Id(id): Id,
    OptionalJsonBytes(body): OptionalJsonBytes,
) -> Result<Response, ApiError> {
    let req: RollApiKey = if body.is_empty() {
        RollApiKey::default()
    } else {
        parse_json(&body)?
    };
    let key = product::roll_key(&call, id, req).await?;
    Ok((StatusCode::CREATED, axum::Json(key)).into_response())
}

#[utoipa::path(post, path = "/api/keys/{id}/revoke", tag = "keys",
    params(("id" = i64, Path, description = "Key id")),
    responses(
        (status = 200, description = "Revoked; every instance refuses it within about a second", body = ApiKey),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn revoke(call: Call, Id(id): Id) -> Result<axum::Json<ApiKey>, ApiError> {
    Ok(axum::Json(product::revoke_key(&call, id).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// First day (RFC 3339 or Unix seconds; the day that contains it). Default: this month's start.
    pub from: Option<String>,
    /// Day after the last (exclusive). Default: tomorrow.
    pub to: Option<String>,
    /// Comma-separated: `day`, `key`, `route_class`. Default: one total.
    pub group_by: Option<String>,
}

#[utoipa::path(get, path = "/api/usage", tag = "usage", params(UsageQuery),
    responses(
        (status = 200, description = "Metered requests, grouped", body = Usage),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn usage(
    call: Call,
    Params(q): Params<UsageQuery>,
) -> Result<axum::Json<Usage>, ApiError> {
    let from = parse_time("from", q.from.as_deref())?;
    let to = parse_time("to", q.to.as_deref())?;
    let mut group = GroupBy::default();
    for part in super::split_types(q.group_by.as_deref()) {
        match part.as_str() {
            "day" => group.day = true,
            "key" => group.key = true,
            "route_class" => group.class = true,
            other => {
                return Err(bad_param(
                    "group_by",
                    format!("{other:?} is not one of day, key, route_class"),
                ));
            }
        }
    }
    Ok(axum::Json(product::usage(&call, from, to, group).await?))
}

#[utoipa::path(get, path = "/api/invoices/upcoming", tag = "usage",
    responses(
        (status = 200, description = "The current period's invoice so far", body = Invoice),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn upcoming_invoice(call: Call) -> Result<axum::Json<Invoice>, ApiError> {
    Ok(axum::Json(product::upcoming_invoice(&call).await?))
}
