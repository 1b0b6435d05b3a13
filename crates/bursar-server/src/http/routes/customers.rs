//! `/api/customers`.

use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bursar_api::{CreateCustomer, Customer, ErrorBody, List, UpdateCustomer};
use serde::Deserialize;
use utoipa::IntoParams;

use super::parse_page;
use crate::http::error::ApiError;
use crate::http::extract::{Id, IfMatch, Json, Params, if_none_match_hits};
use crate::http::render;
use crate::services::{Call, customers};

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListCustomersQuery {
    /// Page size, 1–100 (default 10).
    #[param(value_type = Option<u32>)]
    pub limit: Option<String>,
    /// Return customers created before this id (the last id of the previous page).
    #[param(value_type = Option<i64>)]
    pub starting_after: Option<String>,
}

#[utoipa::path(post, path = "/api/customers", tag = "customers", request_body = CreateCustomer,
    responses(
        (status = 201, description = "Created", body = Customer,
         headers(("ETag" = String, description = "Strong tag of the version"), ("Location" = String))),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn create(call: Call, Json(req): Json<CreateCustomer>) -> Result<Response, ApiError> {
    let c = customers::create(&call, req).await?;
    Ok(render::created(
        format!("/api/customers/{}", c.id),
        c.version,
        &render::customer(&c),
    ))
}

#[utoipa::path(get, path = "/api/customers/{id}", tag = "customers",
    params(("id" = i64, Path, description = "Customer id")),
    responses(
        (status = 200, description = "The customer", body = Customer, headers(("ETag" = String))),
        (status = 304, description = "Not modified (If-None-Match matched)"),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get(call: Call, Id(id): Id, headers: HeaderMap) -> Result<Response, ApiError> {
    let c = customers::get(&call, id).await?;
    if if_none_match_hits(&headers, c.version) {
        return Ok(render::not_modified(c.version));
    }
    Ok(render::with_etag(
        StatusCode::OK,
        c.version,
        &render::customer(&c),
    ))
}

#[utoipa::path(get, path = "/api/customers", tag = "customers", params(ListCustomersQuery),
    responses(
        (status = 200, description = "A page of customers, newest first", body = List<Customer>),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list(
    call: Call,
    Params(q): Params<ListCustomersQuery>,
) -> Result<axum::Json<List<Customer>>, ApiError> {
    let page = parse_page(q.limit.as_deref(), q.starting_after.as_deref())?;
    let p = customers::list(&call, page).await?;
    Ok(axum::Json(List::new(
        p.items.iter().map(render::customer).collect(),
        p.has_more,
    )))
}

#[utoipa::path(patch, path = "/api/customers/{id}", tag = "customers", request_body = UpdateCustomer,
    params(("id" = i64, Path, description = "Customer id"),
           ("If-Match" = Option<String>, Header, description = "Strong entity tag, e.g. \"3\"; or send `version` in the body")),
    responses(
        (status = 200, description = "Updated", body = Customer, headers(("ETag" = String))),
        (status = 412, description = "version_mismatch", body = ErrorBody),
        (status = 428, description = "precondition_required", body = ErrorBody),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn update(
    call: Call,
    Id(id): Id,
    headers: HeaderMap,
    Json(req): Json<UpdateCustomer>,
) -> Result<Response, ApiError> {
    let c = customers::update(&call, id, IfMatch::from_headers(&headers)?, req).await?;
    Ok(render::with_etag(
        StatusCode::OK,
        c.version,
        &render::customer(&c),
    ))
}
