//! `/api/orders`.

use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use bursar_api::{CreateOrder, ErrorBody, ErrorCode, List, Order, UpdateOrder};
use bursar_domain::OrderStatus;
use bursar_storage::OrderFilter;
use serde::Deserialize;
use utoipa::IntoParams;

use super::{parse_id, parse_page, parse_time};
use crate::http::error::{ApiError, issue};
use crate::http::extract::{Id, IfMatch, Json, JsonWithBytes, Params, if_none_match_hits};
use crate::http::idempotency;
use crate::http::render;
use crate::services::{Call, orders};

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListOrdersQuery {
    /// Page size, 1–100 (default 10).
    #[param(value_type = Option<u32>)]
    pub limit: Option<String>,
    /// Return orders created before this id (the last id of the previous page).
    #[param(value_type = Option<i64>)]
    pub starting_after: Option<String>,
    /// Only orders of this customer.
    #[param(value_type = Option<i64>)]
    pub customer_id: Option<String>,
    /// Only orders in this status.
    #[param(value_type = Option<bursar_api::OrderStatus>)]
    pub status: Option<String>,
    /// Created at or after (RFC 3339 or Unix seconds).
    #[serde(rename = "created[gte]")]
    #[param(rename = "created[gte]")]
    pub created_gte: Option<String>,
    /// Created before (RFC 3339 or Unix seconds).
    #[serde(rename = "created[lt]")]
    #[param(rename = "created[lt]")]
    pub created_lt: Option<String>,
}

impl ListOrdersQuery {
    fn filter(&self) -> Result<OrderFilter, ApiError> {
        let status = match self.status.as_deref() {
            None => None,
            Some(s) => Some(OrderStatus::parse(s).ok_or_else(|| {
                ApiError::new(
                    bursar_api::ErrorCode::InvalidParameter,
                    "Invalid query parameter `status`: use pending, paid, refunded or canceled.",
                )
                .with_details(vec![issue("status", "invalid", "unknown status")])
            })?),
        };
        Ok(OrderFilter {
            page: parse_page(self.limit.as_deref(), self.starting_after.as_deref())?,
            customer_id: parse_id("customer_id", self.customer_id.as_deref())?,
            status,
            created_gte: parse_time("created[gte]", self.created_gte.as_deref())?,
            created_lt: parse_time("created[lt]", self.created_lt.as_deref())?,
        })
    }
}

#[utoipa::path(post, path = "/api/orders", tag = "orders", request_body = CreateOrder,
    params(("Idempotency-Key" = Option<String>, Header, description = "1-255 printable ASCII characters, bare or as a quoted string. A retry with the same key and request gets the first response again, with Idempotent-Replayed: true; kept 24 h.")),
    responses(
        (status = 201, description = "Created (or the replay of the first response)", body = Order,
         headers(("ETag" = String), ("Location" = String),
                 ("Idempotent-Replayed" = String, description = "true on a replay"))),
        (status = 400, description = "idempotency_key_invalid, idempotency_key_missing, malformed_json", body = ErrorBody),
        (status = 422, description = "validation_failed, unknown_customer, idempotency_key_reused", body = ErrorBody),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn create(
    call: Call,
    headers: HeaderMap,
    uri: Uri,
    JsonWithBytes(req, body): JsonWithBytes<CreateOrder>,
) -> Result<Response, ApiError> {
    let key = idempotency::parse_key(&headers)?;
    match key {
        Some(key) => orders::create_idempotent(&call, key, uri.query(), &body, req).await,
        None if call
            .state
            .config
            .idempotency
            .requires("POST", orders::CREATE_ROUTE) =>
        {
            Err(ApiError::new(
                ErrorCode::IdempotencyKeyMissing,
                "POST /api/orders requires an Idempotency-Key header on this server.",
            ))
        }
        None => {
            let o = orders::create(&call, req).await?;
            Ok(render::created(
                format!("/api/orders/{}", o.id),
                o.version,
                &render::order(&o),
            ))
        }
    }
}

#[utoipa::path(get, path = "/api/orders/{id}", tag = "orders",
    params(("id" = i64, Path, description = "Order id")),
    responses(
        (status = 200, description = "The order", body = Order, headers(("ETag" = String))),
        (status = 304, description = "Not modified (If-None-Match matched)"),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get(call: Call, Id(id): Id, headers: HeaderMap) -> Result<Response, ApiError> {
    let o = orders::get(&call, id).await?;
    if if_none_match_hits(&headers, o.version) {
        return Ok(render::not_modified(o.version));
    }
    Ok(render::with_etag(
        StatusCode::OK,
        o.version,
        &render::order(&o),
    ))
}

#[utoipa::path(get, path = "/api/orders", tag = "orders", params(ListOrdersQuery),
    responses(
        (status = 200, description = "A page of orders, newest first", body = List<Order>),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list(
    call: Call,
    Params(q): Params<ListOrdersQuery>,
) -> Result<axum::Json<List<Order>>, ApiError> {
    let p = orders::list(&call, q.filter()?).await?;
    Ok(axum::Json(List::new(
        p.items.iter().map(render::order).collect(),
        p.has_more,
    )))
}

#[utoipa::path(patch, path = "/api/orders/{id}", tag = "orders", request_body = UpdateOrder,
    params(("id" = i64, Path, description = "Order id"),
           ("If-Match" = Option<String>, Header, description = "Strong entity tag, e.g. \"3\"; or send `version` in the body")),
    responses(
        (status = 200, description = "Updated", body = Order, headers(("ETag" = String))),
        (status = 412, description = "version_mismatch", body = ErrorBody),
        (status = 428, description = "precondition_required", body = ErrorBody),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn update(
    call: Call,
    Id(id): Id,
    headers: HeaderMap,
    Json(req): Json<UpdateOrder>,
) -> Result<Response, ApiError> {
    let o = orders::update(&call, id, IfMatch::from_headers(&headers)?, req).await?;
    Ok(render::with_etag(
        StatusCode::OK,
        o.version,
        &render::order(&o),
    ))
}

#[utoipa::path(post, path = "/api/orders/{id}/cancel", tag = "orders",
    params(("id" = i64, Path, description = "Order id"),
           ("If-Match" = Option<String>, Header, description = "Optional strong entity tag")),
    responses(
        (status = 200, description = "Canceled", body = Order, headers(("ETag" = String))),
        (status = 409, description = "invalid_state: only pending orders can be canceled", body = ErrorBody),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn cancel(call: Call, Id(id): Id, headers: HeaderMap) -> Result<Response, ApiError> {
    let o = orders::cancel(&call, id, IfMatch::from_headers(&headers)?).await?;
    Ok(render::with_etag(
        StatusCode::OK,
        o.version,
        &render::order(&o),
    ))
}
